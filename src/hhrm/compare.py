"""A fair comparison of the two policy updates on the RAFT loop: RAFT (``update: sft``) vs iterative DPO (``dpo``).

Each update runs from its own RAFT config for several seeds; both configs must agree on everything that fixes
the prompts and the generation budget (:data:`SAME_BUDGET`), so the two arms see the same prompt set, the same
draws per seed, the same K, iterations and sampling settings and the same reward model. Every run is a RAFT
recipe launched as a subprocess into ``<output_dir>/<update>_seed<seed>``: a finished run is resumed (RAFT skips
its finished stages, so a re-run only rewrites its reports), an interrupted one continues.

What is reported per run, all from its folder (and, for the KL, its final policy and the starting policy):

* ``gold_accuracy_sampled`` / ``gold_accuracy_greedy``: gold accuracy of the final policy's sampled (at the run's
  temperature) and greedy answers to the held-out prompts;
* ``heldout_reward``: the reward model's (proxy's) mean reward of those sampled answers;
* ``own_reward``: the mean proxy reward of all K samples of the last iteration, on its own training prompts (the
  policy before its last update: the reward the update was last trained from);
* ``kl_to_start``: KL(final policy || starting policy) on the held-out prompts, from the sampled answers
  (:mod:`hhrm.logprobs`: log-ratio summed over the response tokens and EOS, temperature-scaled logits);
* ``distinct_1`` / ``distinct_2`` and ``response_tokens``: diversity and length of those sampled answers;
* ``seconds``: the run's stage seconds summed over iterations plus the final evaluation (model loading and
  process start-up left out, and a resumed run counts the seconds its stages took when they ran).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import logging
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hhrm import data, finite, lifetime, logprobs, model_checks, modeling, reporting
from hhrm.raft.config import RaftConfig
from hhrm.raft.report import TIMED_STAGES
from hhrm.raft.select import UPDATES, distinct_n
from hhrm.reward import sources

logger = logging.getLogger(__name__)

JSON_FILE, TABLE_FILE = "compare.json", "compare.md"

# What must be equal in the two configs: the prompts, the held-out set, K, iterations, sampling, the models.
SAME_BUDGET = {
    "data": ("dataset_name", "dataset_format", "test_offset", "max_train_rows", "max_test_rows", "use_chat_template"),
    "raft": (
        "prompts_per_iteration", "num_samples", "num_iterations", "max_new_tokens", "temperature", "top_p", "top_k",
        "heldout_prompts", "max_prompt_tokens", *sources.WHICH_MODEL,
    ),
    "model": ("model_name_or_path", "model_revision"),
}  # fmt: skip
OWN_SETTINGS = ("seed", "output_dir")  # set per run by the comparison
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


@dataclass
class CompareConfig:
    """RAFT vs iterative DPO on the same budget, several seeds. Defaults: the embedded default's tiny configs."""

    sft_config: str = field(
        default="recipes/configs/tiny/raft.yaml", metadata={"help": "RAFT config of the update=sft arm."}
    )
    dpo_config: str = field(
        default="recipes/configs/tiny/raft_dpo.yaml", metadata={"help": "RAFT config of the update=dpo arm."}
    )
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds; each arm runs once per seed (same draws)."}
    )
    output_dir: str = field(
        default="outputs/tiny/compare",
        metadata={"help": "Folder for compare.json, compare.md, logs/ and the runs (<update>_seed<seed>/)."},
    )
    overrides: list[str] = field(
        default_factory=list,
        metadata={
            "help": "key=value settings applied to both arms' RAFT configs (e.g. num_iterations=1 "
            "max_new_tokens=16); seed and output_dir are the comparison's own."
        },
    )
    launcher: str = field(
        default="accelerate",
        metadata={
            "help": "accelerate (`accelerate launch --config_file <accelerate_config>`) | python (one process, "
            "this interpreter).",
            "choices": ["accelerate", "python"],
        },
    )
    accelerate_config: str = field(
        default="accelerate_configs/cpu.yaml", metadata={"help": "launcher=accelerate: its --config_file."}
    )
    num_processes: int | None = field(
        default=None, metadata={"help": "launcher=accelerate: --num_processes (unset: the accelerate config's)."}
    )
    num_cpu_threads_per_process: int = field(
        default=0, metadata={"help": "launcher=accelerate: CPU threads per process (0: this machine's cores)."}
    )
    kl_batch_size: int = field(default=16, metadata={"help": "Answers per forward when estimating the KL."})

    def __post_init__(self) -> None:
        finite.check_finite_settings(self)
        if isinstance(self.seeds, (int, str)):
            self.seeds = [int(self.seeds)]
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds}: give one or more distinct seeds (e.g. --seeds 0 1 2)")
        if self.launcher not in ("accelerate", "python"):
            raise ValueError(f"launcher={self.launcher!r}: expected accelerate or python")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"num_processes={self.num_processes}: must be >= 1 (or unset)")
        if self.kl_batch_size < 1:
            raise ValueError(f"kl_batch_size={self.kl_batch_size}: must be >= 1")
        for name in ("sft_config", "dpo_config") + (("accelerate_config",) if self.launcher == "accelerate" else ()):
            if not Path(getattr(self, name)).is_file():
                raise FileNotFoundError(f"{name}={getattr(self, name)!r}: no such file")
        self.override_args()  # refuse a malformed override now

    def override_args(self) -> list[str]:
        """``overrides`` as ``--key value`` pairs: each key a RAFT recipe setting, each value converted as its parser
        converts it (refused in one line here, not by a parser's traceback once the runs have started)."""
        options = _raft_options()
        out = []
        for item in self.overrides:
            key, sep, value = item.partition("=")
            key = key.strip().removeprefix("--").replace("-", "_")
            if not sep or not key:
                raise ValueError(f"overrides: {item!r} is not key=value (e.g. num_iterations=1)")
            if key in OWN_SETTINGS:
                raise ValueError(f"overrides: {key} is set by the comparison; use --seeds / --output_dir instead")
            if key not in options:
                close = " or ".join(map(repr, difflib.get_close_matches(key, options, n=3)))
                raise ValueError(
                    f"overrides: {key!r} is not a setting of the RAFT recipe (DataArguments, RaftConfig, ModelConfig; "
                    f"`python recipes/raft.py --help` lists them){f'; did you mean {close}?' if close else ''}"
                )
            try:
                converted = (options[key].type or str)(value)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
                raise ValueError(f"overrides: {key}={value!r} is not a valid value ({err})") from None
            if options[key].choices and converted not in options[key].choices:
                raise ValueError(f"overrides: {key}={value!r}: expected one of {list(options[key].choices)}")
            out += [f"--{key}", value]
        return out

    def config(self, update: str) -> str:
        return {"sft": self.sft_config, "dpo": self.dpo_config}[update]


@functools.cache
def _raft_options() -> dict[str, argparse.Action]:
    """The RAFT recipe's settings (its three configs' fields), each with the parser action that converts it."""
    from dataclasses import fields

    from trl import ModelConfig, TrlParser

    configs = (data.DataArguments, RaftConfig, ModelConfig)
    actions = TrlParser(configs)._option_string_actions
    return {f.name: actions[f"--{f.name}"] for c in configs for f in fields(c) if f"--{f.name}" in actions}


def parse_arm(args: CompareConfig, update: str) -> dict[str, Any]:
    """An arm's RAFT config with the overrides, parsed as ``recipes/raft.py`` parses it: ``{data, raft, model}``."""
    from trl import ModelConfig, TrlParser

    parser = TrlParser((data.DataArguments, RaftConfig, ModelConfig))
    parsed = parser.parse_args_and_config(["--config", args.config(update), *args.override_args()])
    # The start policy: a causal LM whose weights all load (a reward model would be loaded with a random lm_head).
    trust = modeling.trust_remote_code(parsed[2], parsed[1])
    model_checks.check_policy(parsed[2], trust, f"{update}_config's model_name_or_path")
    return dict(zip(("data", "raft", "model"), parsed))


def check_same_budget(args: CompareConfig, parsed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Refuse configs that differ in prompts, K, iterations, sampling or models; returns the shared settings."""
    for update in UPDATES:
        kind = getattr(parsed[update]["raft"], "update", "sft")
        if kind != update:
            raise ValueError(
                f"{update}_config={args.config(update)!r} has update: {kind}; the {update} arm needs update: {update}"
            )
    shared, differ = {}, []
    for part, names in SAME_BUDGET.items():
        for name in names:
            sft, dpo = (getattr(parsed[u][part], name) for u in UPDATES)
            shared[name] = sft
            if sft != dpo:
                differ.append(f"{name} ({sft!r} vs {dpo!r})")
    if differ:
        raise ValueError(
            f"sft_config={args.sft_config!r} and dpo_config={args.dpo_config!r} differ in {', '.join(differ)}: a fair "
            "comparison needs the same prompts, K, iterations, sampling and models; make them equal in both configs"
        )
    return shared


def run_name(update: str, seed: int) -> str:
    return f"{update}_seed{seed}"


def launch_command(args: CompareConfig, script: str | os.PathLike, update: str, seed: int) -> list[str]:
    """The RAFT recipe's command line for one (update, seed) run."""
    recipe = [str(script), "--config", args.config(update), *args.override_args()]
    recipe += ["--seed", str(seed), "--output_dir", str(Path(args.output_dir) / run_name(update, seed))]
    if args.launcher == "python":
        return [sys.executable, *recipe]
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--quiet", "--config_file", args.accelerate_config]
    cmd += ["--num_cpu_threads_per_process", str(args.num_cpu_threads_per_process or os.cpu_count() or 1)]
    if args.num_processes:
        cmd += ["--num_processes", str(args.num_processes)]
    return cmd + recipe


def launch(cmd: list[str], log: Path, name: str) -> None:
    """Run one RAFT command, its output appended to ``log``; a refusal comes back as a one-line ValueError.

    The run is supervised (:func:`hhrm.lifetime.supervise`): if the comparison dies, ``kill -9`` included, the run
    and every process it started die with it instead of racing a re-run in the same folder."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:  # appended: a resumed run's log keeps the first attempt's above it
        start = f.tell()
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        code = lifetime.supervise(cmd, env=os.environ | {"PYTHONUNBUFFERED": "1"}, stdout=f, stderr=subprocess.STDOUT)
    if code == 0:
        return
    with open(log, errors="replace") as f:
        f.seek(start)
        lines = f.read().splitlines()
    refusal = next((line for line in reversed(lines) if line.startswith("hhrm: error:")), None)
    if refusal:
        raise ValueError(f"run {name}: {refusal.removeprefix('hhrm: error:').strip()} (log: {log})")
    tail = "\n".join(lines[-15:])
    raise RuntimeError(f"run {name} failed with exit code {code}; its log is {log}:\n{tail}")


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
    """Per update and metric: mean, sample standard deviation over seeds (None for one seed) and n."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for update in UPDATES:
        mine = [r["metrics"] for r in runs if r["update"] == update]
        out[update] = {}
        for key, _ in METRICS:
            values = [m[key] for m in mine if m.get(key) is not None and not math.isnan(m[key])]
            mean = _mean(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
            out[update][key] = {"mean": mean, "std": std, "n": len(values)}
    return out


def markdown(result: dict[str, Any]) -> str:
    """``compare.md``: what was compared, one row per update (mean ± std over seeds), then one row per run."""
    keys, headers = [k for k, _ in METRICS], [h for _, h in METRICS]

    def pm(stat: dict[str, Any]) -> str:
        return reporting.fmt(stat["mean"]) + ("" if stat["std"] is None else f" ± {reporting.fmt(stat['std'], 2)}")

    summary = [
        {"update": u, "seeds": sum(r["update"] == u for r in result["runs"])} | {k: pm(stats[k]) for k in keys}
        for u, stats in result["summary"].items()
    ]
    per_run = [{"update": r["update"], "seed": r["seed"]} | r["metrics"] for r in result["runs"]]
    shared = result["same_budget"]
    scorer = sources.address(shared)
    lines = [
        "# RAFT (update=sft) vs iterative DPO (update=dpo)",
        "",
        f"Same budget for both: {shared['num_iterations']} iterations x {shared['prompts_per_iteration']} prompts x "
        f"K={shared['num_samples']} samples (temperature {shared['temperature']}, max_new_tokens "
        f"{shared['max_new_tokens']}), {shared['heldout_prompts']} held-out prompts, start policy "
        f"`{shared['model_name_or_path']}`, reward model `{scorer}`. Seeds {result['seeds']}; mean ± sample std "
        "over seeds.",
        "",
        *[f"* {h}: {DEFINITIONS[k]}" for k, h in METRICS],
        "",
        reporting.markdown_table(summary, ["update", "seeds", *keys], ["update", "seeds", *headers]),
        "",
        reporting.markdown_table(per_run, ["update", "seed", *keys], ["update", "seed", *headers]),
    ]
    return "\n".join(lines)


def run(args: CompareConfig, script: str | os.PathLike) -> dict[str, Any]:
    """Check the budget, run (or resume) every (update, seed), measure, and write compare.json / compare.md."""
    parsed = {u: parse_arm(args, u) for u in UPDATES}
    shared = check_same_budget(args, parsed)
    out = Path(args.output_dir)
    lifetime.lock_folder(out, "output_dir")  # one comparison per folder (its runs lock their own folders)
    runs, folders = [], {}
    for seed in args.seeds:
        for update in UPDATES:
            name = run_name(update, seed)
            folders[name] = out / name
            finished = (folders[name] / "metrics.json").is_file()
            logger.info("%s: %s (log: %s)", name, "resuming a finished run" if finished else "running", out / "logs")
            launch(launch_command(args, script, update, seed), out / "logs" / f"{name}.log", name)
            runs.append({"update": update, "seed": seed, "run_dir": str(folders[name]), "finished_before": finished})
    raft = parsed["sft"]["raft"]
    kl = kl_to_start(folders, parsed["sft"]["model"], raft.temperature, raft.max_new_tokens, args.kl_batch_size)
    for r in runs:
        name = run_name(r["update"], r["seed"])
        r["metrics"] = run_metrics(folders[name]) | kl[name]
    result = {
        "configs": {u: args.config(u) for u in UPDATES},
        "seeds": list(args.seeds),
        "overrides": list(args.overrides),
        "same_budget": shared,
        "definitions": DEFINITIONS,
        "runs": runs,
        "summary": summarise(runs),
    }
    reporting.write_json(result, out / JSON_FILE)
    reporting.write_text(markdown(result) + "\n", out / TABLE_FILE)
    return result
