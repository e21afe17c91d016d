"""``make bench``: hhrm's speed and cost, measured as side-by-side ratios in one run.

    python -m bench --out bench/results.json                # the reference CPU run (~6-9 min)
    python -m bench --size tiny --out /tmp/b.json           # smoke sizes (seconds)
    python -m bench --device cuda --dtype bf16 --size 1b    # a ~1.1B Llama on a GPU

Every entry compares two ways of doing the same work on the same model and data, measured
interleaved (A, B, A, B, ...) after a warm-up, and reports both medians and their ratio. Absolute
numbers on a shared machine are noise; the ratios are what the bench is for. See bench/README.md.

Sections (``--sections``, default all; one file each under bench/):

* ``sft``:   useful (non-pad) tokens/s, TRL packing (hhrm's ``wrapped`` default, and ``bfd``) vs padded
             batches of the same documents; the share of non-pad tokens of each.
* ``rm``:    reward-model training pairs/s and padding share, length-grouped batches (what
             ``train_sampling_strategy="group_by_length"`` does) vs random order.
* ``heads``: a multi-head RM ensemble (``ensemble_kind=heads``, E=5) vs a one-head RM: training and scoring pairs/s
             on the same pairs and backbone (goal >= 0.9: E heads cost about one RM).
* ``gen``:   RAFT sampling, generated tokens/s: hhrm.generation.generate_responses with many
             prompts x K per call vs one prompt x K per call (the original RAFT aligner) vs one sequence
             per call.
* ``score``: responses/s, hhrm.reward.scoring.RewardScorer vs the card's ``pipeline(..., batch_size=1)``.
* ``serve``: the reward-model server (recipes/serve_rm.py, LitServe) on the loopback address under 8 concurrent
             clients, texts/s vs RewardScorer in-process on the same texts; requests/s, p50/p99 latency, batch fill.
* ``openrlhf``: the same server under OpenRLHF's remote reward client: 64 concurrent one-text ``/get_reward``
             requests, texts/s vs RewardScorer in-process on the same texts (goal >= 0.8).
* ``mfu``:   training FLOP/s (6 N tokens/s, from the packed SFT run) over the peak matmul FLOP/s
             measured in the same run.
* ``demo``:  wall time and peak RSS of each stage of ``make demo``, read from the demo's summary
             (``--demo run`` runs the demo first; ``--demo skip`` leaves it out).
* ``data``:  wall time and peak RSS of the data preparation (load_splits, rm.prepare_pairs, data_report) on
             raw HH-format files of full HH-RLHF size (~161K + 8.5K rows at --size cpu/1b), one fresh process
             per size; an absolute figure against targets (120 s, 4 GB), not a ratio.

The models are Llamas built from a config with random weights (``--size``): timing does not depend
on the weights, and a realistic width keeps the figures about matmuls rather than Python overhead.
The length distributions come from a raw HH-RLHF jsonl(.gz) given by ``--data`` or the environment
variable HHRM_HH_SAMPLE, else from the embedded generated data.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import datasets
import torch

from . import data, demo, gen, heads, mfu, rm, score, serve, sft
from .common import (
    DEFAULT_DEMO_SUMMARY,
    PRESETS,
    Clock,
    Context,
    bench_tokenizer,
    load_data,
    logger,
    machine_info,
    usable_cpus,
)

SECTIONS = ("sft", "rm", "heads", "gen", "score", "serve", "openrlhf", "mfu", "demo", "data")
RUNNERS: dict[str, Callable[[Context], list[dict[str, Any]]]] = {
    "sft": sft.run,
    "rm": rm.run,
    "heads": heads.run,
    "gen": gen.run,
    "score": score.run,
    "serve": serve.run,
    "openrlhf": serve.run_openrlhf,
    "mfu": mfu.run,
    "demo": demo.run,
    "data": data.run,
}
DATA_ENV = "HHRM_HH_SAMPLE"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="bench/results.json", help="JSON results file")
    parser.add_argument("--size", choices=sorted(PRESETS), default="cpu", help="model/workload preset")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: usable CPUs minus the 1-minute load average, >= 1)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per comparison (preset default)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {','.join(SECTIONS)}")
    parser.add_argument("--sft-strategies", default="wrapped,bfd", help="packing strategies to time (wrapped[,bfd])")
    parser.add_argument(
        "--data",
        default=None,
        help=f"HH-RLHF raw jsonl(.gz) for the length distributions, or 'embedded' (the generated "
        f"data); default: ${DATA_ENV} when set, else 'embedded'",
    )
    parser.add_argument(
        "--demo",
        choices=("read", "run", "skip"),
        default="read",
        help="read the demo summary if present / run the demo first / leave it out",
    )
    parser.add_argument("--demo-summary", default=str(DEFAULT_DEMO_SUMMARY))
    args = parser.parse_args(argv)
    check_data(parser, args)
    return args


def check_data(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--data`` defaults to $HHRM_HH_SAMPLE, else 'embedded'; a path that is not a file is an error."""
    given = f"--data {args.data}"
    if args.data is None:
        args.data = os.environ.get(DATA_ENV) or "embedded"
        given = f"{DATA_ENV}={args.data} (the default of --data)"
    if args.data != "embedded" and not Path(args.data).is_file():
        parser.error(f"{given}: no such file (--data takes a raw HH-RLHF jsonl(.gz) file, or 'embedded')")


def pick_threads(requested: int | None) -> tuple[int, float]:
    """``requested``, else the usable CPUs not already busy (1-minute load average), at least 1.

    On a shared machine, OpenMP threads that wait for a descheduled sibling make a 2-thread matmul
    2-3x slower than a 1-thread one (measured here), which would swamp every ratio.
    """
    usable = usable_cpus() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if requested:
        return requested, load
    return max(1, min(usable, int(usable - load + 0.5))), load


# --------------------------------------------------------------------------------------------
# The run


def make_context(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Context:
    preset = PRESETS[args.size]
    preset = replace(preset, **{k: v for k, v in (("repeats", args.repeats),) if v is not None})
    data = load_data(None if args.data == "embedded" else Path(args.data))
    tokenizer = bench_tokenizer(data, preset.tokenizer_vocab)
    return Context(
        preset,
        device,
        dtype,
        Clock(device),
        data,
        tokenizer,
        tuple(args.sft_strategies.split(",")),
        args.demo,
        args.demo_summary,
    )


def run_sections(ctx: Context, sections: list[str]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    if "mfu" in sections:
        ctx.peak_before = mfu.peak_matmul_flops(ctx.clock, ctx.device, ctx.dtype, ctx.preset.peak_n)
    entries: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    for name in sections:
        start = time.perf_counter()
        logger.info("section %s ...", name)
        entries.extend(RUNNERS[name](ctx))
        seconds[name] = round(time.perf_counter() - start, 1)
        logger.info("section %s done in %.1f s", name, seconds[name])
    return entries, seconds


def run_bench(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    started = time.perf_counter()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    threads, load = pick_threads(args.threads)
    if device.type == "cpu":
        torch.set_num_threads(threads)
    sections = [s for s in SECTIONS if s in args.sections.split(",")]
    if args.demo == "skip" and "demo" in sections:
        sections.remove("demo")
    ctx = make_context(args, device, dtype)
    entries, seconds = run_sections(ctx, sections)
    return {
        "bench": "hhrm make bench",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, "-m", "bench", *argv]),
        "machine": machine_info(device, dtype, threads)
        | {"load_average_1min": {"start": round(load, 2), "end": round(os.getloadavg()[0], 2)}},
        "size": args.size,
        "preset": asdict(ctx.preset),
        "model": {"n_matmul_params": ctx.n_params.get("sft"), "vocab_size": ctx.preset.vocab or len(ctx.tokenizer)},
        "data": {"source": ctx.data.source, "rows": len(ctx.data.prompts)},
        "entries": entries,
        "section_seconds": seconds,
        "total_seconds": round(time.perf_counter() - started, 1),
    }


# --------------------------------------------------------------------------------------------
# The printed table


def format_table(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"hhrm bench on {m['cpu']} ({m['device']}, {m['dtype']}, {m['torch_threads']} threads), "
        f"size={result['size']}, data: {result['data']['source']}"
    ]
    head = f"{'entry':<28} {'A':>14} {'B':>14} {'unit':<12} {'A/B':>7} {'expect':>7}"
    lines += [head, "-" * len(head)]
    for e in result["entries"]:
        lines += format_entry(e)
    lines.append(f"total {result['total_seconds']} s; sections {result['section_seconds']}")
    return "\n".join(lines)


def format_entry(e: dict[str, Any]) -> list[str]:
    if "ratio" in e:
        exp = "" if e["expect"] is None else f">={e['expect']:g}" + ("" if e["meets"] else " (!)")
        return [
            f"{e['id']:<28} {fmt(e['a']['value']):>14} {fmt(e['b']['value']):>14} {e['a']['unit']:<12} "
            f"{fmt(e['ratio']):>7} {exp:>7}",
            f"{'':<28}   A = {e['a']['label']};  B = {e['b']['label']}",
        ] + ([f"{'':<28}   {e['summary']}"] if e.get("summary") else [])
    if "sizes" in e:
        return data_lines(e)
    if "stages" in e:
        return [
            f"{'demo ' + st['stage']:<28} {fmt(st['seconds']):>14} s  peak RSS {fmt(st['max_rss_mb'])} MB"
            for st in e["stages"]
        ]
    return [f"{e['id']:<28} skipped: {e.get('skipped')}"]


def data_lines(e: dict[str, Any]) -> list[str]:
    lines = []
    for s in e["sizes"]:
        name = f"data {s['rows']:,} rows"
        if "error" in s:
            lines.append(f"{name:<28} {s['error']}")
            continue
        phases = ", ".join(f"{k} {v:.1f}" for k, v in s["seconds"].items())
        lines.append(
            f"{name:<28} {fmt(s['total_seconds']):>14} s  peak RSS {fmt(s['peak_rss_mb'])} MB  "
            f"{fmt(s['rows_per_s'])} rows/s  ({phases} s)"
        )
    meets = ", ".join(f"{k} <= {v}: {e['meets'][k]}" for k, v in e["targets"].items())
    growth = e["growth"]["peak_rss_mb_per_10k_rows"]
    lines.append(f"{'':<28}   {e['sample']} sample; {fmt(growth)} MB per 10K rows; largest size meets {meets}")
    return lines


def fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.4g}"
    return str(x)


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    result = run_bench(args, argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
