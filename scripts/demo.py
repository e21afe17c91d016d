"""The whole recipe on the embedded default: build it, then SFT -> RM -> score -> RAFT, on this machine.

    python scripts/demo.py --out outputs/tiny        (what `make demo` runs)

Each stage is the real recipe launched with ``accelerate launch`` and the tiny YAML config, exactly
as a user would run it; this driver only times them, reads their ``metrics.json`` and prints where
everything is. The score stage is ``make score`` on the pairs the RM stage evaluated (written by this
driver with the RM config's own data settings): its pairwise accuracy must be the RM's held-out
``eval_accuracy_exact``. Wall time and peak RSS per stage go to ``<out>/demo_summary.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from trl import ModelConfig, TrlParser

from hhrm import data, modeling, reporting, sft
from hhrm.embedded import ensure_embedded
from hhrm.raft import report as raft_report
from hhrm.reward import score_file
from hhrm.rm import stage as rm

ROOT = Path(__file__).resolve().parents[1]

# (stage, recipe, headline metrics shown in the summary): each stage declares its own headline keys.
STAGES = (
    ("sft", "recipes/sft.py", sft.HEADLINE),
    ("rm", "recipes/rm.py", rm.HEADLINE),
    ("score", "recipes/score.py", score_file.HEADLINE),
    ("raft", "recipes/raft.py", raft_report.HEADLINE),
)


def launch_command(recipe: str, args: list[str], threads: int) -> list[str]:
    """``accelerate launch`` of one recipe with the CPU config, as a user runs it (also used by scripts/real.py)."""
    config = str(ROOT / "accelerate_configs" / "cpu.yaml")
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config]
    return [*accelerate, "--num_cpu_threads_per_process", str(threads), str(ROOT / recipe), *args]


def run_stage(name: str, recipe: str, config: Path | None, overrides: list[str], log_path: Path, threads: int) -> dict:
    """Launch one recipe; returns wall seconds and the peak RSS of its process tree (MB)."""
    cmd = launch_command(recipe, [*(["--config", str(config)] if config else []), *overrides], threads)
    print(f"\n=== {name}: {' '.join(cmd[2:])}\n    log: {log_path}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        # wait4 reports the child's peak RSS including the descendants it waited for (the trainer).
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log_path.read_text()[-4000:]
        raise SystemExit(f"stage {name} failed (exit {code}); last lines of {log_path}:\n{tail}")
    return {"seconds": round(seconds, 1), "max_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def heldout_pairs(rm_config: Path, overrides: list[str], path: Path) -> Path:
    """The RM-test pairs the RM recipe evaluated (its config's test_offset, max_length, dedup), as JSON lines."""
    data_args, args, model_args = TrlParser((data.DataArguments, rm.RewardConfig, ModelConfig)).parse_args_and_config(
        ["--config", str(rm_config), *overrides]
    )
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # the summary, not tokenizing bars, is what the demo prints
    tokenizer = modeling.load_tokenizer(ModelConfig(model_name_or_path=args.output_dir))
    pairs = rm.prepare_pairs(data.load_splits(data_args, tokenizer), tokenizer, args.max_length, args.dedup_test)
    return reporting.write_jsonl(pairs.test.select_columns(["prompt", "chosen", "rejected"]), path)


def format_summary(summary: dict) -> str:
    lines = ["", "hhrm demo: embedded default, SFT -> RM -> score -> RAFT", ""]
    for name, _, keys in STAGES:
        stage = summary["stages"].get(name)
        if not stage:
            continue
        shown = reporting.headline(stage["metrics"], keys)
        lines.append(f"  {name:5s} {stage['seconds']:7.1f} s  {stage['max_rss_mb']:7.0f} MB  {stage['output_dir']}")
        if shown:
            lines.append(f"        {shown}")
    lines.append(f"\n  total {summary['total_seconds']:.1f} s; summary: {summary['summary_path']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/tiny", help="where the embedded default and all stages go")
    parser.add_argument("--configs", default=str(ROOT / "recipes" / "configs" / "tiny"), help="folder of stage YAMLs")
    parser.add_argument("--stages", default="sft,rm,score,raft", help="comma-separated subset, in pipeline order")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="CPU threads per stage (the metrics' last digits depend on it; see README)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    wanted = args.stages.split(",")
    unknown = set(wanted) - {s[0] for s in STAGES}
    if unknown:
        raise SystemExit(f"--stages: unknown stage(s) {sorted(unknown)}; choose from sft, rm, score, raft")

    start = time.perf_counter()
    paths = ensure_embedded(out)
    summary: dict = {"out": str(out), "threads": args.threads, "stages": {}}
    for name, recipe, _ in STAGES:
        if name not in wanted:
            continue
        stage_out = out / name
        # Each stage reads the previous stage's folder: the tiny YAMLs name outputs/tiny/...; these
        # overrides keep the chain inside --out wherever it is.
        overrides = ["--dataset_name", str(paths["data"]), "--output_dir", str(stage_out)]
        config: Path | None = Path(args.configs) / f"{name}.yaml"
        if name == "sft":
            overrides += ["--model_name_or_path", str(paths["base"])]
        elif name == "rm":
            overrides += ["--model_name_or_path", str(out / "sft")]
        elif name == "score":  # make score MODEL=<out>/rm DATA=<the RM's held-out pairs> OUT=<out>/score/scores.jsonl
            rm_overrides = ["--dataset_name", str(paths["data"]), "--output_dir", str(out / "rm")]
            pairs = heldout_pairs(Path(args.configs) / "rm.yaml", rm_overrides, out / "rm_heldout_pairs.jsonl")
            config, overrides = None, ["--model_name_or_path", str(out / "rm"), "--dataset_name", str(pairs)]
            overrides += ["--output_file", str(stage_out / "scores.jsonl"), "--progress", "false"]
        elif name == "raft":
            overrides += ["--model_name_or_path", str(out / "sft"), "--reward_model_name_or_path", str(out / "rm")]
        if stage_out.exists():
            # A fresh run: the stages before were just retrained, so a kept RAFT folder would resume
            # iterations made with other models (`make raft` is the way to resume a run).
            shutil.rmtree(stage_out)
        stats = run_stage(name, recipe, config, overrides, out / f"{name}.log", args.threads)
        metrics = stage_out / ("scores.jsonl.metrics.json" if name == "score" else "metrics.json")
        summary["stages"][name] = {**stats, "output_dir": str(stage_out), "metrics": reporting.read_json(metrics)}
    summary["total_seconds"] = round(time.perf_counter() - start, 1)
    summary_path = out / "demo_summary.json"
    summary["summary_path"] = str(summary_path)
    reporting.write_json(summary, summary_path)
    print(format_summary(summary))
    return summary


if __name__ == "__main__":
    main()
