"""Best-of-n over-optimisation: how the reward model's pick fares as n grows (Gao et al., 2022, best-of-n).

For one policy and one reward model (the *proxy*), ``n_max`` responses are sampled once per held-out prompt
and scored. For each n = 1, 2, 4, ..., n_max the curve reports, averaged over prompts with a 95% confidence
interval from the prompts (mean +- 1.96 * std / sqrt(prompts)):

* ``proxy``: the proxy reward of the proxy's best-of-n pick;
* ``gold``: the gold accuracy (:func:`hhrm.synthetic.gold_reward`) of that same pick;
* ``gold_ceiling``: the gold accuracy of the gold reward's own best-of-n pick (at least one of n correct);
* ``kl_bound``: the analytic bound KL(best-of-n || policy) <= log n - (n - 1) / n, and its square root, the
  x axis of Gao et al.'s figures.

The estimator is unbiased and exact: for each n it averages over all C(n_max, n) subsets of a prompt's
samples analytically. With the samples sorted by proxy reward (ascending, rank i = 1..n_max), the sample of
rank i is the maximum of a uniformly drawn n-subset with probability C(i - 1, n - 1) / C(n_max, n); with c
gold-correct samples, the probability that an n-subset holds one is 1 - C(n_max - c, n) / C(n_max, n).
Ties in proxy reward go to the earlier-drawn sample (lower sample index), as ``numpy.argmax`` over a subset
in draw order picks it; the samples are i.i.d., so draw order is a random order.

With ``kl_betas`` set, regularised best-of-n curves (RBoN-KL, :mod:`hhrm.overopt_curves`) come beside it on the
same samples: the pick is the argmax of proxy + beta * log pi(y|x) under the sampling policy.

Gold numbers need prompts of the embedded data set (:func:`hhrm.synthetic.is_gold_checkable`); on any other
data the curve has the proxy only, and the files say so.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hhrm import data, finite, generation, logprobs, model_checks, modeling, outputs, reporting, runtime, synthetic
from hhrm.overopt_curves import (  # noqa: F401  (the estimator's names, re-exported: hhrm.overopt.curve etc.)
    SOFT_DRAWS,
    Z95,
    best_of_n,
    check_kl_betas,
    check_n_max,
    check_soft_temperatures,
    curve,
    gold_ceiling,
    kl_bound,
    mean_ci,
    ns,
    pick_weights,
    rank_order,
    regularised_curves,
    regularised_from_samples,
    regularised_markdown,
    soft_best_of_n,
    soft_curves,
    soft_markdown,
)
from hhrm.reward import ensemble, sources

logger = logging.getLogger(__name__)

JSON_FILE, TABLE_FILE, PLOT_FILE, SAMPLES_FILE = "overopt.json", "overopt.md", "overopt.png", "samples.jsonl"
RESULT_FILES = (JSON_FILE, TABLE_FILE, PLOT_FILE, SAMPLES_FILE)
TIE_BREAK = "ties in proxy reward go to the earlier-drawn sample (lower sample index)"


@dataclass
class OverOptConfig(sources.RewardArguments):
    """The curve's settings. The policy is ``model_name_or_path`` (TRL's ModelConfig); prompts: DataArguments. The
    reward (:class:`hhrm.reward.sources.RewardArguments`) is the proxy that picks the best of n: a reward model folder
    (``reward_model_name_or_path``, scored under its ``reward_convention``), a reward server
    or an ensemble of folders (``reward_ensemble``) whose ``reward_aggregation`` picks.
    """

    output_dir: str = field(
        default=None,
        metadata={"help": "Folder for overopt.json, overopt.md, overopt.png and samples.jsonl."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace the results of an earlier curve in output_dir (refused otherwise)."}
    )
    n_max: int = field(
        default=16,
        metadata={"help": "Responses sampled per prompt: a power of 2, >= 2; the curve has n = 1, 2, 4, ..., n_max."},
    )
    heldout_prompts: int = field(
        default=200, metadata={"help": "The first N distinct RM-test prompts (as RAFT's held-out set)."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the policy."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of the policy (1.0: off)."})
    max_new_tokens: int = field(default=32, metadata={"help": "New tokens per response, at most."})
    generation_batch_size: int = field(
        default=32, metadata={"help": "Prompts per generate call (each expanded to n_max sequences)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the sampling (the same settings give the same samples)."})
    kl_betas: list[float] = field(
        default_factory=list,
        metadata={
            "help": "Regularised best-of-n (RBoN-KL, Jinnai et al. 2024) curves beside the plain one, one per "
            "beta > 0: the pick is argmax proxy + beta * log pi(y|x), log pi the sample's log-prob under the "
            "sampling policy summed over its tokens at the sampling temperature (-log pi(y|x) is the KL of the "
            "one-point distribution on y to the policy). Set: samples.jsonl records each sample's log-prob (logprobs)."
        },
    )
    selection_temperatures: list[float] = field(
        default_factory=list,
        metadata={
            "help": "Soft best-of-n curves beside the plain one, one per temperature T > 0, in reward units: the "
            "pick is drawn from the n samples with probability softmax(proxy / T), as RAFT's selection_temperature "
            "keeps one (hhrm.overopt_curves.soft_best_of_n)."
        },
    )
    bf16: bool | None = field(default=None, metadata={"help": "None: bf16 on a bf16-capable GPU, fp32 elsewhere."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self) -> None:
        finite.check_finite_settings(self)
        self.check_reward_source()  # the proxy (make overopt RM=...), before any model loads
        if not self.output_dir:
            raise ValueError("output_dir is required: the folder for the curve's files")
        check_n_max(self.n_max)
        check_kl_betas(list(self.kl_betas or []))
        check_soft_temperatures(list(self.selection_temperatures or []))
        for name in ("heldout_prompts", "generation_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        generation.SamplingArguments(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p
        )
        out = Path(self.output_dir)
        found = [n for n in RESULT_FILES if (out / n).is_file()]
        if found and not self.overwrite_output_dir:
            raise ValueError(
                f"output_dir={self.output_dir!r} already holds a curve ({', '.join(found)}): choose another "
                f"output_dir, or pass --overwrite_output_dir true to replace it"
            )

    def sampling(self) -> generation.SamplingArguments:
        return generation.SamplingArguments(
            max_new_tokens=self.max_new_tokens, do_sample=True, temperature=self.temperature, top_p=self.top_p
        )


# --------------------------------------------------------------------------------------------
# Sampling and scoring


def sample_and_score(args: OverOptConfig, data_args: data.DataArguments, model_args) -> dict[str, Any]:
    """Held-out prompts, ``n_max`` responses each from the policy, their proxy (and gold) rewards."""
    import torch
    from transformers import AutoModelForCausalLM

    device, dtype = runtime.default_device(), runtime.torch_dtype(args.bf16)
    source = sources.build(args, device, dtype)  # checked now; a folder's weights load after the policy is freed
    tokenizer = modeling.load_tokenizer(model_args, padding_side="left")
    splits = data.load_splits(data_args, tokenizer)
    prompts = data.heldout_prompts(splits, args.heldout_prompts)
    if not prompts:
        raise ValueError(f"dataset_name={data_args.dataset_name!r}: the RM-test split has no prompt to sample from")
    policy = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        dtype=dtype,
        trust_remote_code=modeling.trust_remote_code(model_args),
    )
    modeling.match_vocab(policy, tokenizer)
    policy.to(device)
    stats: dict[str, Any] = {}
    responses = generation.generate_responses(
        policy, tokenizer, prompts, args.n_max, args.sampling(), args.generation_batch_size,
        progress=args.progress, seed=args.seed, stats=stats,
    )  # fmt: skip
    logps = sample_logprobs(policy, tokenizer, prompts, responses, args) if args.kl_betas else None
    del policy
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    pairs = [p for p in prompts for _ in range(args.n_max)], [r for rs in responses for r in rs]
    members = None
    if ensemble.has_members(source):  # keep each member's reward: another rule is a recomputation away
        scored = source.score_members(*pairs)
        flat, members = scored["reward"], np.array(scored["members"]).reshape(len(prompts), args.n_max, -1)
    else:
        flat = source.score_pairs(*pairs)
    proxy = np.array(flat, dtype=np.float64).reshape(len(prompts), args.n_max)
    checkable = synthetic.is_gold_checkable(prompts)
    gold = None
    if checkable:
        gold = np.array([[synthetic.gold_reward(p, r) for r in rs] for p, rs in zip(prompts, responses)])
    else:
        logger.warning("the prompts are not the embedded data set's: no gold reward, the curve has the proxy only")
    out = {"prompts": prompts, "responses": responses, "proxy": proxy, "gold": gold, "generation": stats}
    out["members"], out["logprobs"] = members, logps
    return out | {"reward": source.identity()}


def sample_logprobs(policy, tokenizer, prompts: list[str], responses: list[list[str]], args) -> np.ndarray:
    """``[prompts, n_max]``: each sample's log pi(y|x) under the policy that drew it, summed over its tokens at the
    sampling temperature, its EOS included when it stopped before max_new_tokens (it was drawn with it)."""
    flat = [r for rs in responses for r in rs]
    counts = [len(ids) for ids in tokenizer(flat, add_special_tokens=False)["input_ids"]] if flat else []
    values = logprobs.sequence_logprobs(
        policy, tokenizer, [p for p in prompts for _ in range(args.n_max)], flat, args.temperature,
        args.generation_batch_size, eos=[n < args.max_new_tokens for n in counts],
    )  # fmt: skip
    return np.array(values, dtype=np.float64).reshape(len(prompts), args.n_max)


def sample_rows(sampled: dict[str, Any]) -> list[dict[str, Any]]:
    """``samples.jsonl``: one row per prompt, its responses in draw order with their proxy and gold rewards (and,
    from an ensemble, ``proxy_members``: per response its E members' rewards; with kl_betas, ``logprobs``: per
    response its log pi(y|x))."""
    gold, members, logps = sampled["gold"], sampled.get("members"), sampled.get("logprobs")
    rows = [
        {
            "prompt_index": i,
            "prompt": p,
            "responses": rs,
            "proxy": sampled["proxy"][i].tolist(),
            "gold": None if gold is None else gold[i].tolist(),
        }
        for i, (p, rs) in enumerate(zip(sampled["prompts"], sampled["responses"]))
    ]
    for row, ms in zip(rows, members if members is not None else []):
        row["proxy_members"] = ms.tolist()
    for row, lp in zip(rows, logps if logps is not None else []):
        row["logprobs"] = lp.tolist()
    return rows


def curve_from_samples(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The curve recomputed from a ``samples.jsonl``."""
    rows = reporting.read_jsonl(path)
    proxy = np.array([r["proxy"] for r in rows], dtype=np.float64)
    has_gold = all(r.get("gold") is not None for r in rows)
    return curve(proxy, np.array([r["gold"] for r in rows], dtype=np.float64) if has_gold else None)


# --------------------------------------------------------------------------------------------
# Reports


def markdown(result: dict[str, Any]) -> str:
    """``overopt.md``: what was measured, then one table row per n (mean +- 95% half-width)."""

    def pm(row: dict[str, Any], name: str) -> str:
        mean, half = row.get(f"{name}_mean"), row.get(f"{name}_ci_half")
        if mean is None:
            return ""
        return reporting.fmt(mean) + ("" if half is None else f" ± {reporting.fmt(half, 2)}")

    gold = result["gold"]
    convention = f" (reward_convention {result['reward_convention']})" if result.get("reward_convention") else ""
    cols = ["n", "kl_bound", "sqrt_kl", "proxy"] + (["gold", "gold_ceiling"] if gold else [])
    headers = ["n", "KL bound", "sqrt(KL)", "proxy reward (RM pick)"]
    headers += ["gold accuracy (RM pick)", "gold accuracy (gold pick: ceiling)"] if gold else []
    table = [{c: pm(r, c) if c in ("proxy", "gold", "gold_ceiling") else r[c] for c in cols} for r in result["curve"]]
    lines = [
        "# Best-of-n over-optimisation",
        "",
        f"Policy `{result['policy']}`, reward model `{result['reward_model']}`{convention}: {result['prompts']} "
        f"held-out prompts, {result['n_max']} samples each (temperature {result['config']['temperature']}, "
        f"max_new_tokens {result['config']['max_new_tokens']}). Best-of-n averaged exactly over all n-subsets of "
        f"the samples; {TIE_BREAK}. ± is the 95% interval from the prompts (1.96 std / sqrt(prompts)); "
        "KL bound: log n - (n-1)/n.",
        "",
    ]
    if not gold:
        lines += ["No gold reward: the prompts are not the embedded data set's, so the curve has the proxy only.", ""]
    text = "\n".join(lines) + "\n" + reporting.markdown_table(table, cols, headers)
    if result.get("regularised"):
        text += "\n" + regularised_markdown(result["regularised"], gold)
    if result.get("soft"):
        text += "\n" + soft_markdown(result["soft"], gold)
    return text


def plot(result: dict[str, Any], path: Path) -> None:
    """``overopt.png``: proxy (left) and gold accuracy with its ceiling (right) against sqrt(KL bound)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, gold = result["curve"], result["gold"]
    x = [r["sqrt_kl"] for r in rows]
    fig, axes = plt.subplots(1, 2 if gold else 1, figsize=(11 if gold else 6, 4), squeeze=False)
    panels = [(axes[0][0], [("proxy", "RM's best-of-n pick", "o-")], "proxy reward")]
    if gold:
        series = [("gold", "RM's best-of-n pick", "o-"), ("gold_ceiling", "gold's own pick (ceiling)", "s--")]
        panels.append((axes[0][1], series, "gold accuracy"))
    for ax, series, label in panels:
        for key, name, style in series:
            mean = np.array([r[f"{key}_mean"] for r in rows])
            half = np.array([r[f"{key}_ci_half"] or 0.0 for r in rows])
            ax.plot(x, mean, style, label=name)
            ax.fill_between(x, mean - half, mean + half, alpha=0.2)
        for r in rows:
            ax.annotate(f"n={r['n']}", (r["sqrt_kl"], r[f"{series[0][0]}_mean"]), fontsize=7, xytext=(2, 4),
                        textcoords="offset points")  # fmt: skip
        ax.set_xlabel("sqrt(KL bound)  [KL(best-of-n || policy) <= log n - (n-1)/n]")
        ax.set_ylabel(label)
        if key != "proxy":
            ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
    for beta, reg in (result.get("regularised") or {}).items():  # RBoN-KL: the pick's proxy (and gold) per beta
        for ax, key in zip(axes[0], ("proxy", "gold") if float(beta) else ()):
            ax.plot(x, [r[f"{key}_mean"] for r in reg], ".:", label=f"RBoN-KL pick, beta {beta}")
            ax.legend(fontsize=8)
    for t, soft in (result.get("soft") or {}).items():  # soft best-of-n per temperature
        for ax, key in zip(axes[0], ("proxy", "gold") if float(t) else ()):
            ax.plot(x, [r[f"{key}_mean"] for r in soft], "x-.", label=f"soft pick, T {t}")
            ax.legend(fontsize=8)
    rule = result.get("reward_aggregation")
    rule = f", ensemble {rule}" + (f" (lambda {result['config']['reward_uwo_lambda']})" if rule == "uwo" else "")
    title = f"best-of-n, {result['prompts']} prompts x {result['n_max']} samples"
    axes[0][0].set_title(title + (rule if result.get("reward_aggregation") else ""), fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def run(args: OverOptConfig, data_args: data.DataArguments, model_args) -> dict[str, Any]:
    """Sample, score, compute the curve and write its four files into ``output_dir``; returns the JSON."""
    start = time.perf_counter()
    # A reward model (or a checkpoint lacking a weight) would load with random weights and sample byte soup.
    model_checks.check_policy(model_args, modeling.trust_remote_code(model_args))
    out = Path(args.output_dir)
    if outputs.holds_model(out):
        raise ValueError(f"output_dir={args.output_dir!r} holds a model: choose a folder of its own for the curve")
    outputs.check_output_dir(out, "overopt")
    for name in RESULT_FILES:  # never leave an earlier curve's files beside this one's
        (out / name).unlink(missing_ok=True)
    sampled = sample_and_score(args, data_args, model_args)
    gold = sampled["gold"] is not None
    result = {
        "policy": str(model_args.model_name_or_path),
        "reward_model": sources.address(args),
        "reward": sampled["reward"],  # what scored: weight files and convention, or the served model
        "reward_convention": sampled["reward"].get("convention"),
        "reward_aggregation": sampled["reward"].get("aggregation"),  # an ensemble's rule (None: one model)
        "dataset_name": data_args.dataset_name,
        "prompts": len(sampled["prompts"]),
        "n_max": args.n_max,
        "gold": gold,
        "gold_note": None if gold else "prompts not gold-checkable (not the embedded data set): proxy only",
        "tie_break": TIE_BREAK,
        "ci": "95%: mean +- 1.96 * std / sqrt(prompts), over prompts",
        "curve": curve(sampled["proxy"], sampled["gold"]),
        "kl_betas": list(args.kl_betas),
        "regularised": None,  # with kl_betas: {"beta": curve}, "0" the plain one (RBoN-KL, hhrm.overopt_curves)
        "selection_temperatures": list(args.selection_temperatures),
        "soft": None,  # with selection_temperatures: {"T": curve}, "0" the plain one (soft best-of-n)
        "generation": sampled["generation"],
        "config": reporting.config_dict(args),
        "data": reporting.config_dict(data_args),
    }
    if args.kl_betas:
        result["regularised"] = regularised_curves(
            sampled["proxy"], sampled["logprobs"], sampled["gold"], args.kl_betas
        )
    if args.selection_temperatures:
        result["soft"] = soft_curves(sampled["proxy"], sampled["gold"], args.selection_temperatures, args.seed)
    reporting.write_jsonl(sample_rows(sampled), out / SAMPLES_FILE)
    result["seconds"] = time.perf_counter() - start
    reporting.write_json(result, out / JSON_FILE)
    reporting.write_text(markdown(result), out / TABLE_FILE)
    plot(result, out / PLOT_FILE)
    outputs.release_output_dir(out)
    return result
