"""A fair comparison of the two policy updates on the RAFT loop: RAFT (``update: sft``) vs iterative DPO (``dpo``).

Each update runs from its own RAFT config for several seeds; both configs must agree on everything that fixes
the prompts and the generation budget (:data:`SAME_BUDGET`), so the two arms see the same prompt set, the same
draws per seed, the same K, iterations and sampling settings and the same reward model. Every run is a RAFT
recipe launched as a subprocess into ``<output_dir>/<update>_seed<seed>``: a finished run is resumed (RAFT skips
its finished stages, so a re-run only rewrites its reports), an interrupted one continues.

With ``arm_overrides`` each update also runs a second arm, ``<update>+<second_arm>`` (folders
``<update>_<second_arm>_seed<seed>``): the same configs with only the reward source's or the selection rule's
settings changed (:data:`ARM_SETTINGS`: e.g. the single RM against its ensemble under a conservative rule, or
against regularised best-of-K), so the arms differ in that and nothing else.

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
import os
import subprocess
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hhrm import data, finite, lifetime, model_checks, modeling, reporting
from hhrm.compare.report import DEFINITIONS, METRICS, kl_to_start, markdown, run_metrics, summarise
from hhrm.raft.config import RaftConfig
from hhrm.raft.select import UPDATES
from hhrm.reward import sources

__all__ = ["DEFINITIONS", "METRICS", "CompareConfig", "kl_to_start", "markdown", "run", "run_metrics", "summarise"]

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
# What a second arm may change (arm_overrides): where the reward comes from and how samples are kept by it.
ARM_SETTINGS = tuple(f.name for f in fields(sources.RewardArguments)) + (
    "selection", "top_fraction", "selection_kl_beta", "selection_temperature",
)  # fmt: skip


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
    updates: list[str] = field(
        default_factory=lambda: list(UPDATES),
        metadata={"help": "Which updates run: sft, dpo or both (the budget check needs both configs either way)."},
    )
    arm_overrides: list[str] = field(
        default_factory=list,
        metadata={
            "help": "key=value settings of a second arm (e.g. 'reward_ensemble=rm_a rm_b rm_c' "
            "reward_aggregation=worst, or selection_kl_beta=0.3): every update also runs with them as "
            "<update>+<second_arm>. Only the reward source's (reward_*) and the selection rule's settings; naming "
            "reward_ensemble drops the configs' reward_model_name_or_path."
        },
    )
    second_arm: str = field(
        default="ensemble", metadata={"help": "arm_overrides: the second arm's name in tables and folders."}
    )

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
        if not self.updates or not set(self.updates) <= set(UPDATES) or len(set(self.updates)) != len(self.updates):
            raise ValueError(f"updates={self.updates}: give sft, dpo or both, each once")
        if not self.second_arm.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"second_arm={self.second_arm!r}: letters, digits, - and _ only (it names folders)")
        for name in ("sft_config", "dpo_config") + (("accelerate_config",) if self.launcher == "accelerate" else ()):
            if not Path(getattr(self, name)).is_file():
                raise FileNotFoundError(f"{name}={getattr(self, name)!r}: no such file")
        self.override_args()  # refuse a malformed override now
        self.second_arm_args()

    def override_args(self) -> list[str]:
        """``overrides`` as ``--key value`` pairs: each key a RAFT recipe setting, each value converted as its parser
        converts it (refused in one line here, not by a parser's traceback once the runs have started)."""
        return _as_args(self.overrides, "overrides")

    def second_arm_args(self) -> list[str]:
        """``arm_overrides`` as ``--key value`` pairs (the second arm's; only :data:`ARM_SETTINGS`)."""
        names = set(ARM_SETTINGS)
        for item in self.arm_overrides:
            key = item.partition("=")[0].strip().removeprefix("--").replace("-", "_")
            if key not in names:
                raise ValueError(
                    f"arm_overrides: {key!r} is not a reward-source or selection setting: the second arm may change "
                    f"only {', '.join(sorted(names))}; use overrides for what both arms share"
                )
        out = _as_args(self.arm_overrides, "arm_overrides")
        if "--reward_ensemble" in out and "--reward_model_name_or_path" not in out:
            out += ["--reward_model_name_or_path", ""]  # the ensemble replaces the configs' single folder
        return out

    def config(self, update: str) -> str:
        return {"sft": self.sft_config, "dpo": self.dpo_config}[update]

    def arms(self) -> list[tuple[str, str | None]]:
        """``(update, reward arm or None)`` in run order."""
        rewards = [None] + ([self.second_arm] if self.arm_overrides else [])
        return [(update, reward) for update in self.updates for reward in rewards]


def _as_args(items: list[str], setting: str) -> list[str]:
    options = _raft_options()
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("--").replace("-", "_")
        if not sep or not key:
            raise ValueError(f"{setting}: {item!r} is not key=value (e.g. num_iterations=1)")
        if key in OWN_SETTINGS:
            raise ValueError(f"{setting}: {key} is set by the comparison; use --seeds / --output_dir instead")
        if key not in options:
            close = " or ".join(map(repr, difflib.get_close_matches(key, options, n=3)))
            raise ValueError(
                f"{setting}: {key!r} is not a setting of the RAFT recipe (DataArguments, RaftConfig, ModelConfig; "
                f"`python recipes/raft.py --help` lists them){f'; did you mean {close}?' if close else ''}"
            )
        try:
            converted = (options[key].type or str)(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
            raise ValueError(f"{setting}: {key}={value!r} is not a valid value ({err})") from None
        if options[key].choices and converted not in options[key].choices:
            raise ValueError(f"{setting}: {key}={value!r}: expected one of {list(options[key].choices)}")
        out += [f"--{key}", *(value.split() if options[key].nargs in ("+", "*") else [value])]
    return out


@functools.cache
def _raft_options() -> dict[str, argparse.Action]:
    """The RAFT recipe's settings (its three configs' fields), each with the parser action that converts it."""
    from trl import ModelConfig, TrlParser

    configs = (data.DataArguments, RaftConfig, ModelConfig)
    actions = TrlParser(configs)._option_string_actions
    return {f.name: actions[f"--{f.name}"] for c in configs for f in fields(c) if f"--{f.name}" in actions}


def parse_arm(args: CompareConfig, update: str, reward: str | None = None) -> dict[str, Any]:
    """An arm's RAFT config with the overrides (and the reward arm's), parsed as ``recipes/raft.py`` parses it:
    ``{data, raft, model}``. The reward arm's source is built now (folders and conventions checked, nothing loaded)."""
    from trl import ModelConfig, TrlParser

    parser = TrlParser((data.DataArguments, RaftConfig, ModelConfig))
    parsed = parser.parse_args_and_config(["--config", args.config(update), *arm_args(args, reward)])
    if reward:
        sources.build(parsed[1]).release()
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


def arm_args(args: CompareConfig, reward: str | None) -> list[str]:
    return args.override_args() + (args.second_arm_args() if reward else [])


def arm_name(update: str, reward: str | None = None) -> str:
    return update + (f"+{reward}" if reward else "")


def run_name(update: str, seed: int, reward: str | None = None) -> str:
    return f"{update}{f'_{reward}' if reward else ''}_seed{seed}"


def launch_command(
    args: CompareConfig, script: str | os.PathLike, update: str, seed: int, reward: str | None = None
) -> list[str]:
    """The RAFT recipe's command line for one (update, reward arm, seed) run."""
    recipe = [str(script), "--config", args.config(update), *arm_args(args, reward)]
    recipe += ["--seed", str(seed), "--output_dir", str(Path(args.output_dir) / run_name(update, seed, reward))]
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


def run(args: CompareConfig, script: str | os.PathLike) -> dict[str, Any]:
    """Check the budget, run (or resume) every (arm, seed), measure, and write compare.json / compare.md."""
    parsed = {u: parse_arm(args, u) for u in UPDATES}
    shared = check_same_budget(args, parsed)
    second_arm = parse_arm(args, args.updates[0], args.second_arm)["raft"] if args.arm_overrides else None
    out = Path(args.output_dir)
    lifetime.lock_folder(out, "output_dir")  # one comparison per folder (its runs lock their own folders)
    runs, folders = [], {}
    for seed in args.seeds:
        for update, reward in args.arms():
            name = run_name(update, seed, reward)
            folders[name] = out / name
            finished = (folders[name] / "metrics.json").is_file()
            logger.info("%s: %s (log: %s)", name, "resuming a finished run" if finished else "running", out / "logs")
            launch(launch_command(args, script, update, seed, reward), out / "logs" / f"{name}.log", name)
            runs.append(
                {"arm": arm_name(update, reward), "update": update, "seed": seed}
                | {"run_dir": str(folders[name]), "finished_before": finished, "name": name}
            )
    raft = parsed["sft"]["raft"]
    kl = kl_to_start(folders, parsed["sft"]["model"], raft.temperature, raft.max_new_tokens, args.kl_batch_size)
    for r in runs:
        name = r.pop("name")
        r["metrics"] = run_metrics(folders[name]) | kl[name]
    result = {
        "configs": {u: args.config(u) for u in args.updates},
        "seeds": list(args.seeds),
        "overrides": list(args.overrides),
        "same_budget": shared,
        "definitions": DEFINITIONS,
        "runs": runs,
        "summary": summarise(runs),
    }
    if second_arm is not None:
        result |= {"arm_overrides": list(args.arm_overrides), "second_arm": args.second_arm}
        result["arm_source"] = sources.address(second_arm)
        result["arm_settings"] = {k.partition("=")[0]: k.partition("=")[2] for k in args.arm_overrides}
    reporting.write_json(result, out / JSON_FILE)
    reporting.write_text(markdown(result) + "\n", out / TABLE_FILE)
    return result
