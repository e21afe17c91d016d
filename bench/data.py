"""Data preparation at full HH-RLHF size: wall time and peak RSS of reading, reporting and tokenizing the data.

For each of the preset's sizes (``data_train_rows`` train rows + ``data_test_rows`` test rows; HH-RLHF has
~161K + 8,552), a raw HH-format folder (``train.jsonl`` + ``test.jsonl``, ``{"chosen", "rejected"}`` whole
dialogues a line) is written to a temp folder, then a fresh process (``python -m bench.data``, so its peak RSS
is that of the data preparation alone) runs and times what the RM recipe does with it:

1. ``load_splits``: read, normalise, the card's split (``test_offset``);
2. ``rm.prepare_pairs(splits, tokenizer, 512)``: every pair tokenized once with the RM's rule (into Arrow
   columns), pairs over 512 tokens dropped, RM-test deduplicated;
3. ``data_report``: length percentiles (from the lengths ``prepare_pairs`` recorded), train/test overlap.

The rows are drawn with replacement from the real HH sample when ``--data`` gives one, else from the embedded
generated data lengthened to HH's length distribution; either way a distinct number is appended to each
row's last human turn, so no two rows are the same pair. The tokenizer is the bench's own BPE tokenizer,
saved to a folder that the child loads.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .common import EMBEDDED_SOURCE, ROOT, Context, logger, round_sig

WHAT = "Data preparation at full size: load_splits + rm.prepare_pairs(512) + data_report, fresh process per size"
TARGETS = {"seconds": 120, "peak_rss_mb": 4096}
MAX_PAIR_TOKENS = 512  # the card's RM cut
EMBEDDED_POOL = 2000
# The embedded dialogues (~100 characters) are lengthened with earlier turns to a log-normal character length
# fit to the shared HH sample's chosen dialogues (1,156 harmless-base test rows: geometric mean 464 characters,
# log-sd 0.85; median 497, p95 1,713).
HH_LOG_MEAN_CHARS = math.log(464.0)
HH_LOG_SD_CHARS = 0.85
MAX_EXTRA_DIALOGUES = 40
CHILD_TIMEOUT_S = 3600


# --------------------------------------------------------------------------------------------
# Building the raw files


def sample_pool(ctx: Context) -> tuple[list[dict[str, str]], str, bool]:
    """Raw rows to draw from, a description of them, and whether they are to be lengthened (embedded)."""
    from hhrm import data_io, synthetic

    if ctx.data.source == EMBEDDED_SOURCE:
        pool = synthetic.generate(EMBEDDED_POOL, seed=0)
        return (
            pool,
            f"embedded generated data (hhrm.synthetic, {EMBEDDED_POOL} rows, seed 0) drawn with replacement, "
            "lengthened with earlier turns to HH's length distribution",
            True,
        )
    rows = data_io.read_rows(ctx.data.source, "test")
    pool = [r for r in rows if isinstance(r, dict) and isinstance(r.get("chosen"), str)]
    pool = [r for r in pool if isinstance(r.get("rejected"), str)]
    return pool, f"real HH sample {ctx.data.source} ({len(pool)} rows), drawn with replacement", False


def tagged(row: dict[str, str], number: int) -> dict[str, str]:
    """``row`` with `` #number`` at the end of its last human turn (before the last ``Assistant:``)."""
    out = {}
    for key in ("chosen", "rejected"):
        text = row[key]
        cut = text.rfind("\n\nAssistant:")
        out[key] = text if cut < 0 else f"{text[:cut]} #{number}{text[cut:]}"
    return out


def lengthened(row: dict[str, str], pool: list[dict[str, str]], rng: random.Random) -> dict[str, str]:
    """``row`` after earlier turns (other dialogues of ``pool``) up to a length drawn from HH's distribution."""
    target = rng.lognormvariate(HH_LOG_MEAN_CHARS, HH_LOG_SD_CHARS)
    context: list[str] = []
    size = len(row["chosen"])
    while size < target and len(context) < MAX_EXTRA_DIALOGUES:
        context.append(pool[rng.randrange(len(pool))]["chosen"])
        size += len(context[-1])
    prefix = "".join(context)
    return {"chosen": prefix + row["chosen"], "rejected": prefix + row["rejected"]}


def make_rows(pool: list[dict[str, str]], lengthen: bool, n: int, first: int, seed: int) -> Iterator[dict[str, str]]:
    """``n`` rows drawn with replacement from ``pool``, numbered ``first, first + 1, ...``."""
    rng = random.Random(seed)
    for number in range(first, first + n):
        row = pool[rng.randrange(len(pool))]
        yield tagged(lengthened(row, pool, rng) if lengthen else row, number)


def build_folder(folder: Path, pool: list[dict[str, str]], lengthen: bool, train: int, test: int) -> dict[str, Any]:
    """``folder/train.jsonl`` (``train`` rows) and ``folder/test.jsonl`` (``test`` rows); what was written."""
    start = time.perf_counter()
    folder.mkdir(parents=True)
    written = {}
    for name, n, first, seed in (("train", train, 0, 1), ("test", test, train, 2)):
        count = 0
        with (folder / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for row in make_rows(pool, lengthen, n, first, seed):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
        written[f"{name}_rows"] = count
    size = sum(p.stat().st_size for p in folder.iterdir())
    return written | {"file_mb": round(size / 2**20, 1), "build_seconds": round(time.perf_counter() - start, 2)}


# --------------------------------------------------------------------------------------------
# The child process: what is measured


def peak_rss_mb() -> float:
    """This process's peak RSS so far: ``VmHWM`` of its own memory map.

    Not ``ru_maxrss``: Linux carries that over ``fork`` + ``exec``, so a child started by a bench that already
    holds GBs of models would report the parent's peak (2.6 GB at every size, measured).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def child(folder: str, tokenizer_dir: str, test_offset: int, out: str) -> None:
    """Times the three phases on ``folder``; writes seconds, peak RSS after each phase and counts to ``out``."""
    from transformers import AutoTokenizer

    from hhrm import data as hdata
    from hhrm.rm import stage as hrm

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    result: dict[str, Any] = {"rss_after_imports_mb": peak_rss_mb(), "seconds": {}, "peak_rss_mb_after": {}}
    # In the RM recipe's order: the pairs are tokenized once, and the data report reuses their lengths.
    phases = (
        (
            "load_splits",
            lambda o: hdata.load_splits(hdata.DataArguments(dataset_name=folder, test_offset=test_offset)),
        ),
        ("prepare_pairs", lambda o: hrm.prepare_pairs(o["load_splits"], tokenizer, MAX_PAIR_TOKENS)),
        ("data_report", lambda o: hdata.data_report(o["load_splits"], tokenizer, lengths=o["prepare_pairs"].lengths)),
    )
    outputs: dict[str, Any] = {}
    for name, fn in phases:
        start = time.perf_counter()
        outputs[name] = fn(outputs)
        result["seconds"][name] = round(time.perf_counter() - start, 2)
        result["peak_rss_mb_after"][name] = peak_rss_mb()
    splits, report = outputs["load_splits"], outputs["data_report"]
    result["loaded"] = {
        "source_rows": {k: splits.source[k] for k in ("train_rows", "test_rows")},
        "rm_train_rows": len(splits.train),
        "rm_test_rows": len(splits.test),
        "bad_rows": {k: v.dropped for k, v in splits.drops.items()},
        "train_p50_chosen_tokens": report["train"]["chosen_tokens"].get("p50"),
        "train_p95_chosen_tokens": report["train"]["chosen_tokens"].get("p95"),
    }
    result["rm_pairs"] = outputs["prepare_pairs"].counts
    result["peak_rss_mb"] = peak_rss_mb()
    Path(out).write_text(json.dumps(result, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# The parent: one size


def run_child(folder: Path, tokenizer_dir: Path, test_offset: int) -> dict[str, Any]:
    """The child's measurements on ``folder``, or ``{"error": ...}``; ``process_seconds`` includes imports."""
    out = folder / "child.json"
    cmd = [sys.executable, "-m", "bench.data", str(folder), str(tokenizer_dir), str(test_offset), str(out)]
    # The recipes leave TOKENIZERS_PARALLELISM unset: the tokenizers library's default, parallel batches.
    env = os.environ | {"TOKENIZERS_PARALLELISM": "true"}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {CHILD_TIMEOUT_S} s"}
    seconds = round(time.perf_counter() - start, 1)
    if proc.returncode != 0 or not out.is_file():
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        return {"error": f"child failed (rc={proc.returncode}): {last}", "process_seconds": seconds}
    return json.loads(out.read_text()) | {"process_seconds": seconds}


def measure_size(tmp: Path, tokenizer_dir: Path, pool: list, lengthen: bool, train: int, ctx: Context) -> dict:
    """Builds the folder for ``train`` rows, measures it in a child process, removes the folder."""
    p = ctx.preset
    folder = tmp / f"rows_{train}"
    built = build_folder(folder, pool, lengthen, train, p.data_test_rows)
    logger.info("data: %d + %d rows (%.0f MB) built; measuring ...", train, p.data_test_rows, built["file_mb"])
    measured = run_child(folder, tokenizer_dir, p.data_test_offset)
    shutil.rmtree(folder, ignore_errors=True)
    rows = built["train_rows"] + built["test_rows"]
    size = {"rows": rows, **built, **measured}
    if "error" not in measured:
        size["total_seconds"] = round(sum(measured["seconds"].values()), 2)
        size["rows_per_s"] = round_sig(rows / size["total_seconds"]) if size["total_seconds"] > 0 else None
        logger.info("data: %d rows in %.1f s, peak RSS %.0f MB", rows, size["total_seconds"], size["peak_rss_mb"])
    else:
        logger.warning("data: %d rows: %s", rows, measured["error"])
    return size


# --------------------------------------------------------------------------------------------
# The entry


def per_10k_rows(sizes: list[dict[str, Any]], key: str) -> float | None:
    """Least-squares slope of ``key`` against rows, per 10,000 rows (None with fewer than two sizes)."""
    points = [(s["rows"], s[key]) for s in sizes if s.get(key) is not None]
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    var = sum((x - mx) ** 2 for x, _ in points)
    return round_sig(10_000 * sum((x - mx) * (y - my) for x, y in points) / var, 3) if var else None


def make_entry(ctx: Context, source: str, sizes: list[dict[str, Any]]) -> dict[str, Any]:
    p, largest = ctx.preset, sizes[-1] if sizes else {}
    figures = {"seconds": largest.get("total_seconds"), "peak_rss_mb": largest.get("peak_rss_mb")}
    return {
        "id": "data_prep_full_size",
        "what": WHAT,
        "source": source,
        "sample": "embedded" if ctx.data.source == EMBEDDED_SOURCE else "real",
        "files": "train.jsonl + test.jsonl (uncompressed JSON lines, raw HH format), written to a temp folder",
        "tokenizer": f"the bench's BPE tokenizer (vocab {len(ctx.tokenizer)}, trained on the bench data), saved and "
        "loaded by the child; TOKENIZERS_PARALLELISM=true (the library default the recipes run with)",
        "test_rows": p.data_test_rows,
        "test_offset": p.data_test_offset,
        "max_pair_tokens": MAX_PAIR_TOKENS,
        "sizes": sizes,
        "growth": {
            "peak_rss_mb_per_10k_rows": per_10k_rows(sizes, "peak_rss_mb"),
            "seconds_per_10k_rows": per_10k_rows(sizes, "total_seconds"),
        },
        "targets": dict(TARGETS),
        "largest": {"rows": largest.get("rows"), **figures},
        "meets": {k: None if v is None else bool(v <= TARGETS[k]) for k, v in figures.items()},
    }


def run(ctx: Context) -> list[dict[str, Any]]:
    pool, source, lengthen = sample_pool(ctx)
    with tempfile.TemporaryDirectory(prefix="hhrm-bench-data-") as name:
        tmp = Path(name)
        tokenizer_dir = tmp / "tokenizer"
        ctx.tokenizer.save_pretrained(tokenizer_dir)
        sizes = [measure_size(tmp, tokenizer_dir, pool, lengthen, n, ctx) for n in ctx.preset.data_train_rows]
    return [make_entry(ctx, source, sizes)]


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
