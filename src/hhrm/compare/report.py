"""``make compare``'s figures per run (from its folder, and the KL from its final policy) and its tables."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hhrm import logprobs, modeling, reporting
from hhrm.raft.report import TIMED_STAGES
from hhrm.raft.select import distinct_n
from hhrm.reward import sources

# (key, column header) in the tables' order.
METRICS = (
    ("gold_accuracy_sampled", "gold acc. sampled"),
    ("gold_accuracy_greedy", "gold acc. greedy"),
    ("heldout_reward", "held-out proxy reward"),
    ("own_reward", "own reward"),
    ("kl_to_start", "KL(final ‖ start)"),  # not "||": a Markdown table cell
    ("distinct_1", "distinct-1"),
    ("distinct_2", "distinct-2"),
    ("response_tokens", "response tokens"),
    ("seconds", "seconds"),
)
DEFINITIONS = {
    "gold_accuracy_sampled": "gold accuracy of the final policy's sampled answers to the held-out prompts",
    "gold_accuracy_greedy": "gold accuracy of the final policy's greedy answers to the held-out prompts",
    "heldout_reward": "mean proxy (reward model) reward of those sampled held-out answers",
    "own_reward": "mean proxy reward of all K samples of the last iteration on its training prompts "
    "(the policy before its last update)",
    "kl_to_start": "KL(final policy || starting policy) in nats per answer, estimated from the sampled held-out "
    "answers: log-ratio summed over response tokens + EOS, logits / temperature (top-p/top-k not modelled)",
    "distinct_1": "unique word unigrams / all, over the sampled held-out answers",
    "distinct_2": "unique word bigrams / all, over the sampled held-out answers",
    "response_tokens": "mean tokens per sampled held-out answer",
    "seconds": "sum of the run's stage seconds and its final evaluation (no model loading or start-up; the runs are "
    "sequential, so compare them only on an equally loaded machine)",
}


def run_metrics(run_dir: Path) -> dict[str, Any]:
    """A finished run's figures that need no model (see the module docstring)."""
    per = reporting.read_json(run_dir / "metrics_per_iteration.json")
    head = reporting.read_json(run_dir / "metrics.json")
    if not per.get("final") or not head:
        raise ValueError(f"{run_dir}: not a finished RAFT run (no final metrics); run the comparison again")
    final, last = per["final"], per["iterations"][-1]
    sampled = [r["sampled"] for r in reporting.read_jsonl(run_dir / "final" / "heldout_samples.jsonl")]
    seconds = sum(head.get(f"seconds_{s}_total") or 0.0 for s in TIMED_STAGES) + (head.get("seconds_final_eval") or 0)
    return {
        "gold_accuracy_sampled": final.get("gold_accuracy_sampled"),
        "gold_accuracy_greedy": final.get("gold_accuracy"),
        "heldout_reward": final.get("heldout_reward"),
        "own_reward": last.get("reward_mean_all"),
        "distinct_1": distinct_n(sampled, 1),
        "distinct_2": distinct_n(sampled, 2),
        "seconds": seconds,
    }


def kl_to_start(
    runs: dict[str, Path], model_args, temperature: float, max_new_tokens: int, batch_size: int
) -> dict[str, dict[str, Any]]:
    """Per run, KL(final policy || starting policy) from its final sampled held-out answers (CPU, fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    def load(path, revision=None):
        model = AutoModelForCausalLM.from_pretrained(
            path, revision=revision, dtype=torch.float32, trust_remote_code=modeling.trust_remote_code(model_args)
        )
        modeling.match_vocab(model, tokenizer)
        return model.eval()

    tokenizer = modeling.load_tokenizer(model_args)  # the start policy's, as RAFT generates with it
    start = load(model_args.model_name_or_path, model_args.model_revision)
    out = {}
    for name, run_dir in runs.items():
        held = reporting.read_jsonl(run_dir / "final" / "heldout_samples.jsonl")
        prompts, answers = [r["prompt"] for r in held], [r["sampled"] for r in held]
        lengths = [len(ids) for ids in tokenizer(answers, add_special_tokens=False)["input_ids"]] if held else []
        eos = [n < max_new_tokens for n in lengths]  # stopped before the limit: it was sampled with its EOS
        ref = logprobs.sequence_logprobs(start, tokenizer, prompts, answers, temperature, batch_size, eos=eos)
        policy = load(run_dir)
        pol = logprobs.sequence_logprobs(policy, tokenizer, prompts, answers, temperature, batch_size, eos=eos)
        del policy
        kl = logprobs.kl_estimate(pol, ref)
        out[name] = {"kl_to_start": kl["kl"], "kl_to_start_se": kl["kl_se"], "response_tokens": _mean(lengths)}
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per arm (``<update>`` or ``<update>+<reward arm>``, in run order) and metric: mean, sample standard deviation
    over seeds (None for one seed) and n."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for arm in dict.fromkeys(r.get("arm", r["update"]) for r in runs):
        mine = [r["metrics"] for r in runs if r.get("arm", r["update"]) == arm]
        out[arm] = {}
        for key, _ in METRICS:
            values = [m[key] for m in mine if m.get(key) is not None and not math.isnan(m[key])]
            mean = _mean(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
            out[arm][key] = {"mean": mean, "std": std, "n": len(values)}
    return out


def markdown(result: dict[str, Any]) -> str:
    """``compare.md``: what was compared, one row per arm (mean ± std over seeds), then one row per run."""
    keys, headers = [k for k, _ in METRICS], [h for _, h in METRICS]

    def pm(stat: dict[str, Any]) -> str:
        return reporting.fmt(stat["mean"]) + ("" if stat["std"] is None else f" ± {reporting.fmt(stat['std'], 2)}")

    def arm(r: dict[str, Any]) -> str:
        return r.get("arm", r["update"])

    summary = [
        {"arm": a, "seeds": sum(arm(r) == a for r in result["runs"])} | {k: pm(stats[k]) for k in keys}
        for a, stats in result["summary"].items()
    ]
    per_run = [{"arm": arm(r), "seed": r["seed"]} | r["metrics"] for r in result["runs"]]
    shared = result["same_budget"]
    reward = f"reward model `{sources.address(shared)}`"
    if result.get("second_arm"):
        changed = ", ".join(f"{k}={v}" for k, v in result.get("arm_settings", {}).items())
        reward += f"; arms +{result['second_arm']}: {changed} (reward `{result['arm_source']}`)"
    lines = [
        "# make compare: " + ", ".join(result["summary"]),
        "",
        f"Same budget for all: {shared['num_iterations']} iterations x {shared['prompts_per_iteration']} prompts x "
        f"K={shared['num_samples']} samples (temperature {shared['temperature']}, max_new_tokens "
        f"{shared['max_new_tokens']}), {shared['heldout_prompts']} held-out prompts, start policy "
        f"`{shared['model_name_or_path']}`, {reward}. Seeds {result['seeds']}; mean ± sample std over seeds.",
        "",
        *[f"* {h}: {DEFINITIONS[k]}" for k, h in METRICS],
        "",
        reporting.markdown_table(summary, ["arm", "seeds", *keys], ["arm", "seeds", *headers]),
        "",
        reporting.markdown_table(per_run, ["arm", "seed", *keys], ["arm", "seed", *headers]),
    ]
    return "\n".join(lines)
