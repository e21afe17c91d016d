"""The card's chain on a real pretrained model and real HH text, on this machine: `make real`.

    python scripts/real.py --hh HH_FILE [--out outputs/real] [--publish results/real/cpu]

1. base: SmolLM2-135M-Instruct imported offline (``make real-base``), or ``--base FOLDER`` / ``--gguf FILE``;
2. data: a fixed split of the raw HH file (``--hh``): its last ``--test_rows`` rows are held out, the rows
   before them (at most ``--train_rows``) are RM-train; written unchanged to ``<out>/data/{train,test}.jsonl``;
3. sft (only with ``--sft true``): the SFT recipe on the chosen dialogues; RM and RAFT then start from it;
4. rm: the RM recipe (``recipes/configs/smollm2_135m/rm.yaml``), which also evaluates the untrained head;
5. baselines: "longer wins", "shorter wins" and a logistic probe on the frozen model's features
   (:mod:`hhrm.probe`), on exactly the pairs the RM was trained and evaluated on;
6. best-of-K: ``make overopt`` on held-out prompts (K samples each from the policy, scored by the RM); the RM's
   pick against a random sample (the first draw), judged by the RM, by the probe (a second opinion the RM did not
   train) and by length, with a few examples as text;
7. raft: one RAFT iteration (``recipes/configs/smollm2_135m/raft.yaml``) that trains on the picks;
8. report: ``<out>/real.json`` and ``<out>/real.md`` (and copies at ``--publish``).

Each stage is the real recipe launched with ``accelerate launch`` as a user would; a stage whose output is
complete is reused, so an interrupted run continues where it stopped (``--fresh true`` starts over).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from hhrm import gguf_import, lifetime, outputs, reporting

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_report  # noqa: E402  (the baselines and the report: scripts/real_report.py)
from demo import launch_command  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs" / "smollm2_135m"


def run_stage(name: str, recipe: str, args: list[str], out: Path, threads: int) -> float:
    """Launch one recipe under accelerate, its output shown and kept in ``<out>/<name>.log``; seconds taken."""
    cmd = launch_command(recipe, args, threads)
    return run_logged(name, cmd, out)


def run_logged(name: str, cmd: list[str], out: Path) -> float:
    log = out / f"{name}.log"
    print(f"\n=== {name}: {' '.join(cmd[2:])}\n    log: {log}", flush=True)
    start = time.perf_counter()
    with open(log, "wb") as f:
        code = _tee(cmd, f)  # progress reaches the console as it happens; the log keeps all of it
    if code != 0:
        raise SystemExit(f"stage {name} failed (exit {code}); the whole output is in {log}")
    seconds = time.perf_counter() - start
    print(f"=== {name}: done in {seconds / 60:.1f} min", flush=True)
    return seconds


def _tee(cmd: list[str], log) -> int:
    """Run ``cmd`` as a supervised child; its output goes to the console and to ``log``."""
    import subprocess
    import threading

    read, write = os.pipe()

    def copy() -> None:
        with os.fdopen(read, "rb") as src:
            for chunk in iter(lambda: src.read1(65536), b""):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                log.write(chunk)
                log.flush()

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    try:
        code = lifetime.supervise(
            cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=write, stderr=subprocess.STDOUT
        )
    finally:
        os.close(write)
        reader.join(timeout=30)
    return code


class Timings:
    """Seconds per stage, written as each stage ends, so a resumed run reports what each stage took when it ran."""

    def __init__(self, path: Path):
        self.path = path
        self.stages: dict[str, float] = reporting.read_json(path) if path.is_file() else {}

    def __setitem__(self, stage: str, seconds: float) -> None:
        self.stages[stage] = round(seconds, 1)
        reporting.write_json(self.stages, self.path)


def read_rows(path: Path) -> list[bytes]:
    """The raw lines of a JSON-lines file (``.gz`` read transparently), blank lines left out."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return [line.rstrip(b"\r\n") for line in f if line.strip()]


def write_split(hh: Path, data: Path, test_rows: int, train_rows: int | None) -> dict:
    """The fixed split: the file's last ``test_rows`` rows held out, up to ``train_rows`` rows before them for
    training (the first ones). Rows are copied unchanged; hhrm's loader counts and reports bad ones."""
    if not hh.is_file():
        raise SystemExit(f"--hh {str(hh)!r}: no such file (a raw HH-RLHF .jsonl or .jsonl.gz, e.g. make real HH=FILE)")
    rows = read_rows(hh)
    if test_rows < 1 or test_rows >= len(rows):
        raise SystemExit(f"--test_rows {test_rows}: must be between 1 and {len(rows) - 1} ({hh} has {len(rows)} rows)")
    first_test = len(rows) - test_rows
    train = rows[: min(first_test, train_rows or first_test)]
    data.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("test", rows[first_test:])):
        reporting.write_text(b"\n".join(part).decode() + "\n", data / f"{name}.jsonl")
    split = {
        "source": str(hh),
        "source_sha256": hashlib.sha256(hh.read_bytes()).hexdigest(),
        "source_rows": len(rows),
        "train_rows": f"1-{len(train)}",
        "test_rows": f"{first_test + 1}-{len(rows)}",
        "rule": f"the file's last {test_rows} rows are held out; the first {len(train)} rows are RM-train "
        "(and RAFT's prompts); the rows themselves are not reordered",
    }
    reporting.write_json(split, data / "split.json")
    return split


def ensure_base(args, out: Path) -> Path:
    if args.base:
        return Path(args.base)
    base = out / Path(gguf_import.DEFAULT_OUT).name  # where `make real-base` puts it: one import serves both
    if not outputs.holds_model(base):
        print(f"\n=== base: importing {args.gguf or gguf_import.DEFAULT_PACKAGE} into {base}", flush=True)
        if args.gguf:
            gguf_import.import_gguf(args.gguf, base)
        else:
            gguf_import.import_package(gguf_import.DEFAULT_PACKAGE, base)
    return base


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hh", required=True, help="raw HH-RLHF rows ({chosen, rejected} dialogues), .jsonl[.gz]")
    parser.add_argument("--out", default="outputs/real", help="where every stage goes")
    parser.add_argument("--base", help="a model folder to start from instead of SmolLM2-135M-Instruct")
    parser.add_argument("--gguf", help="a local .gguf file to import as the base instead of the PyPI wheel")
    parser.add_argument("--test_rows", type=int, default=300, help="held-out rows: the file's last N")
    parser.add_argument("--train_rows", type=int, help="RM-train rows: at most the first N (default: all the rest)")
    parser.add_argument(
        "--sft",
        type=gguf_import.parse_bool,
        default=False,
        help="SFT on the chosen dialogues first (the card's order)",
    )
    parser.add_argument("--prompts", type=int, default=48, help="held-out prompts for best-of-K")
    parser.add_argument("--k", type=int, default=8, help="samples per prompt for best-of-K (card: 8)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="tokens per sampled response (card: 128)")
    parser.add_argument("--rm_args", type=shlex.split, default=[], help='extra RM recipe settings: --rm_args="--k v"')
    parser.add_argument("--raft_args", type=shlex.split, default=[], help='extra RAFT settings: --raft_args="--k v"')
    parser.add_argument("--publish", help="also write the JSON and Markdown results as <publish>.json / .md")
    parser.add_argument(
        "--fresh", type=gguf_import.parse_bool, default=False, help="delete <out>'s stages (not the base) and rerun"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads per stage")
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        for name in ("data", "sft", "rm", "probe", "bestofk", "raft"):
            shutil.rmtree(out / name, ignore_errors=True)
        (out / "timings.json").unlink(missing_ok=True)
    # Each stage's own time, kept across resumed runs (a reused stage keeps the time it took when it ran).
    seconds = Timings(out / "timings.json")

    base = ensure_base(args, out)
    split = write_split(Path(args.hh), out / "data", args.test_rows, args.train_rows)
    data = ["--dataset_name", str(out / "data"), "--test_offset", "0"]
    policy = base
    if args.sft:
        policy = out / "sft"
        if not (policy / "metrics.json").is_file():
            sft_args = ["--config", str(CONFIGS / "sft.yaml"), "--model_name_or_path", str(base), *data]
            seconds["sft"] = run_stage(
                "sft", "recipes/sft.py", [*sft_args, "--output_dir", str(policy)], out, args.threads
            )

    rm_dir = out / "rm"
    # The untrained head's accuracy comes from the probe's features (real_report.baselines), not a second pass.
    rm_args = ["--config", str(CONFIGS / "rm.yaml"), "--model_name_or_path", str(policy), *data]
    rm_args += ["--eval_before_training", "false", *args.rm_args]
    if not (rm_dir / "eval_rm.json").is_file():
        seconds["rm"] = run_stage("rm", "recipes/rm.py", [*rm_args, "--output_dir", str(rm_dir)], out, args.threads)

    t, cached = time.perf_counter(), (out / "probe" / "test.npz").is_file()
    baselines = real_report.baselines(rm_args + ["--output_dir", str(rm_dir)], policy, out / "probe")
    if not cached:
        seconds["baselines"] = time.perf_counter() - t

    bestofk_dir = out / "bestofk"
    if not (bestofk_dir / "overopt.json").is_file():
        cmd = [sys.executable, str(ROOT / "recipes" / "overopt.py"), "--model_name_or_path", str(policy)]
        cmd += ["--reward_model_name_or_path", str(rm_dir), *data, "--output_dir", str(bestofk_dir)]
        cmd += ["--n_max", str(args.k), "--heldout_prompts", str(args.prompts), "--temperature", "1.0"]
        cmd += ["--max_new_tokens", str(args.max_new_tokens), "--overwrite_output_dir", "true"]
        seconds["bestofk"] = run_logged("bestofk", cmd, out)
    t, cached = time.perf_counter(), (out / "probe" / "bestofk.npz").is_file()
    bestofk = real_report.best_of_k(bestofk_dir / "samples.jsonl", policy, out / "probe")
    if not cached:
        seconds["bestofk_judge"] = time.perf_counter() - t

    raft_dir = out / "raft"
    if not (raft_dir / "metrics.json").is_file():
        raft_args = ["--config", str(CONFIGS / "raft.yaml"), "--model_name_or_path", str(policy), *data]
        raft_args += ["--reward_model_name_or_path", str(rm_dir), "--output_dir", str(raft_dir)]
        raft_args += ["--num_samples", str(args.k), "--max_new_tokens", str(args.max_new_tokens), *args.raft_args]
        seconds["raft"] = run_stage("raft", "recipes/raft.py", raft_args, out, args.threads)

    result = real_report.assemble(
        out, split, base, policy, baselines, bestofk, seconds.stages, sum(seconds.stages.values()), args.threads
    )
    paths = [out / "real"] + ([Path(args.publish)] if args.publish else [])
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        reporting.write_json(result, path.with_suffix(".json"))
        reporting.write_text(real_report.markdown(result), path.with_suffix(".md"))
    print("\n" + real_report.markdown(result))
    print(f"results: {', '.join(str(p.with_suffix('.json')) for p in paths)}")
    return result


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
