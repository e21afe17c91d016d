"""``make rehearse``: the card's recipes at the card's model sizes, a few bounded steps of each stage, and a fit table.

    python -m rehearse --scale tiny                  # CI: the same architectures, tiny shapes (~1 min)
    python -m rehearse --scale full                  # the card's sizes (random weights, no download)
    python -m rehearse --scale full --device cuda    # on a GPU: every stage at its recipe's own batch and length

For each card recipe (``--recipes``) the stages (SFT with packing, RM, RAFT's generate / score / fine-tune) run in
one process each, one model at a time, and report peak memory, throughput, MFU against a matmul peak measured in
the same run at the stage's dtype, and the projected wall time of the card's full run. The fit table is computed
(rehearse/fit.py) for every recipe x accelerate config x device memory, at the card's sizes, and compared with each
measured peak. A stage whose predicted memory exceeds what this device has is skipped with that reason, or refused
at the start when asked for by name (``--stages``). Writes ``--out``/<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue as queue_module
import sys
import time
from pathlib import Path
from typing import Any

import torch

from hhrm.runtime import refusals_in_one_line

from . import fit, report
from .models import CARD_RECIPES, KNOWN, ROOT, arch_for, count, read_recipe, recipe_key
from .stages import BYTES, COMPUTE, Stage, available_gb, gpu_name, peak_matmul_flops, plan, run
from bench.common import cpu_name

SCALES = ("tiny", "full")


PRELOAD = ("transformers.models.llama.modeling_llama", "transformers.models.gpt_neo.modeling_gpt_neo")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rehearse", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", default="tiny", help="tiny (CI shapes) | full (the card's model sizes)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--recipes", nargs="+", default=list(CARD_RECIPES), help="recipe YAML files")
    parser.add_argument("--stages", default=None, help="comma list of stage ids to run (default: all that fit)")
    parser.add_argument("--processes", type=int, default=8, help="N of the N-device projection (the configs: 8)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: usable CPUs)")
    parser.add_argument("--out", default="results/rehearse", help="folder for <device>.json and <device>.md")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Checks at the start (refusals: one line, exit 2; nothing is loaded before them)


def check_args(args: argparse.Namespace) -> None:
    if args.scale not in SCALES:
        raise ValueError(f"--scale {args.scale}: unknown; use tiny (small shapes, ~1 min) or full (the card's sizes)")
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA GPU here; use --device cpu")
    elif args.device != "cpu":
        raise ValueError(f"--device {args.device}: unknown; use cpu, cuda or cuda:N")


def resolve(path: str, scale: str) -> tuple[dict[str, Any], Any, Any]:
    """The recipe's settings, its policy's shape and (RAFT) its reward model's shape; a refusal if unknown."""
    if not Path(path).is_file() and (ROOT / path).is_file():
        path = str(ROOT / path)  # the default recipes, run from another folder
    if not Path(path).is_file():
        raise ValueError(f"--recipes {path}: no such file")
    recipe = read_recipe(path)
    shapes = []
    for setting in ("model_name_or_path", "reward_model_name_or_path"):
        name = recipe.get(setting)
        if name is None:
            shapes.append(None)
            continue
        arch = arch_for(str(name), scale)
        if arch is None:
            raise ValueError(
                f"{path}: {setting} {name} is neither a local model folder (with config.json) nor a known card "
                f"architecture ({', '.join(sorted(KNOWN))}); point {setting} at a model folder"
            )
        shapes.append(arch)
    if shapes[0] is None:
        raise ValueError(f"{path}: no model_name_or_path; rehearse runs the card's recipes")
    return recipe, shapes[0], shapes[1]


def predicted(stage: Stage, counts_of) -> fit.Memory:
    """The fit model's memory for this stage at the shapes and precision it runs at here (one device)."""
    a = BYTES[COMPUTE[stage.precision]]  # bf16-mixed: fp32 weights (16P counts them), bf16 activations
    counts = counts_of(stage.arch, stage.seqcls)
    if stage.kind == "generate":
        return fit.generation(stage.arch, counts, stage.prompts * stage.k, stage.prompt_len, stage.new_tokens, a)
    if stage.kind == "score":
        return fit.scoring(stage.arch, counts, stage.rows, stage.seq, a)
    rows = 2 * stage.rows if stage.kind == "rm" else stage.rows
    return fit.training(stage.arch, counts, "single", 1, rows, stage.seq, a, stage.checkpointing, stage.kind != "rm")


def card_fit_entry(key: str, recipe: dict[str, Any], counts_of) -> dict[str, Any]:
    """What the fit table needs of one recipe at the card's sizes, bf16, its own batch and lengths."""
    policy = arch_for(str(recipe["model_name_or_path"]), "full")
    rows, seq = int(recipe.get("per_device_train_batch_size", 1)), int(recipe.get("max_length", 1024))
    is_rm = key.endswith("rm")
    entry = {
        "recipe": key,
        "arch": policy,
        "counts": counts_of(policy, is_rm),
        "rows": 2 * rows if is_rm else rows,
        "seq": seq,
        "checkpointing": bool(recipe.get("activation_checkpointing", False)),
        "lm_head": not is_rm,
        "train_stage": "rm" if is_rm else ("finetune" if "reward_model_name_or_path" in recipe else "train"),
    }
    if "reward_model_name_or_path" in recipe:
        rm = arch_for(str(recipe["reward_model_name_or_path"]), "full")
        seqs = int(recipe.get("generation_batch_size", 16)) * int(recipe.get("num_samples", 8))
        plen, new = int(recipe.get("max_prompt_tokens", 512)), int(recipe.get("max_new_tokens", 128))
        entry["inference"] = {
            "generate": fit.generation(policy, counts_of(policy, False), seqs, plen, new, 2),
            "score": fit.scoring(rm, counts_of(rm, True), int(recipe.get("reward_batch_size", 16)), plen + new, 2),
        }
    return entry


# --------------------------------------------------------------------------------------------
# The run


def run_stage(stage: Stage, device: str, threads: int) -> dict[str, Any]:
    """The stage in a fresh process: its peak is its own, and its memory is returned when it ends.

    Forked from a server that imported torch and transformers once (no OpenMP threads started there: a fork of a
    process that ran matmuls can hang) instead of a spawn that imports them again for every stage.
    """
    ctx = multiprocessing.get_context("forkserver")
    queue = ctx.Queue()
    proc = ctx.Process(target=run, args=(stage, device, threads, queue))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not proc.is_alive():  # killed (out of memory?) before it could report
                return {"error": f"the stage's process died with exit code {proc.exitcode} (out of memory?)"}
    proc.join()
    return result


def rehearse(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    started = time.perf_counter()
    device = args.device
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    cache: dict[tuple[str, bool], Any] = {}

    def counts_of(arch, seqcls):
        key = (repr(arch), seqcls)
        if key not in cache:
            cache[key] = count(arch, seqcls)
        return cache[key]

    multiprocessing.set_forkserver_preload(["rehearse.stages", "rehearse.models", *PRELOAD])
    recipes, stages = {}, []
    for path in args.recipes:
        recipe, policy, rm = resolve(path, args.scale)
        key = recipe_key(path)
        recipes[key] = recipe
        stages += plan(key, recipe, policy, rm, args.scale, device)
    wanted = set(args.stages.split(",")) if args.stages else None
    if wanted and (unknown := wanted - {s.id for s in stages}):
        raise ValueError(f"--stages {','.join(sorted(unknown))}: no such stage; the stages: {[s.id for s in stages]}")
    avail = available_gb(device)
    plans = []
    for stage in stages:
        if wanted and stage.id not in wanted:
            continue
        mem = predicted(stage, counts_of)
        need = mem.total / fit.GB
        entry = {"stage": stage.as_dict(), "predicted_gb": mem.as_gb()}
        if need > fit.HEADROOM * avail:
            why = (
                f"{stage.id} needs {need:.1f} GB on one device by the fit table ({stage.precision}, "
                f"{'AdamW' if stage.kind in ('train', 'rm', 'finetune') else 'inference'}); {device} has "
                f"{avail:.1f} GB available"
            )
            if wanted:
                raise ValueError(f"{why}; run it on a device with more memory or leave it out of --stages")
            entry["skipped"] = why
        plans.append((stage, entry))
    # the same reward model at the same shapes is scored once (both RAFT recipes use the open_llama_3b RM)
    seen: dict[tuple, str] = {}
    for stage, entry in plans:
        key = (stage.kind, repr(stage.arch), stage.rows, stage.seq, stage.precision)
        if stage.kind == "score" and "skipped" not in entry:
            if key in seen:
                entry["same_as"] = seen[key]
            seen.setdefault(key, stage.id)

    peaks = {}
    if not device.startswith("cuda"):
        torch.set_num_threads(threads)
    for prec in sorted({COMPUTE[s.precision] for s, _ in plans}):  # skipped stages too: their at-peak bound
        peaks[prec] = peak_matmul_flops(device, prec)
    results = []
    by_id: dict[str, dict[str, Any]] = {}
    for stage, entry in plans:
        if "skipped" not in entry and "same_as" not in entry:
            print(f"rehearse: {stage.id} ({stage.arch.name}, {stage.precision}) ...", file=sys.stderr, flush=True)
            entry |= report.measured(stage, run_stage(stage, device, threads), peaks, entry["predicted_gb"])
        elif "same_as" in entry:
            entry |= {k: v for k, v in by_id[entry["same_as"]].items() if k not in ("stage", "predicted_gb")}
        by_id[stage.id] = entry
        results.append(entry)

    at_peak = {s.id: (counts_of(s.arch, s.seqcls).matmul, peaks[COMPUTE[s.precision]]) for s, _ in plans}
    card = [card_fit_entry(k, r, counts_of) for k, r in recipes.items()]
    fit_rows = fit.fit_rows(card)
    report.check_fit(fit_rows, results, args.scale)
    return {
        "rehearse": "hhrm make rehearse",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, "-m", "rehearse", *argv]),
        "scale": args.scale,
        "machine": {
            "device": device,
            "gpu": gpu_name(device),
            "cpu": cpu_name(),
            "torch_threads": threads,
            "available_gb_at_start": round(avail, 1),
        },
        "peak_matmul_flops": {k: round(v) for k, v in peaks.items()},
        "stages": results,
        "projections": report.projections(recipes, by_id, args.processes, at_peak),
        "fit": {"headroom": fit.HEADROOM, "device_gb": list(fit.DEVICE_GB), "rows": fit_rows},
        "total_seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    with refusals_in_one_line():  # a refusal: one line `hhrm: error: ...`, exit code 2
        check_args(args)
        result = rehearse(args, argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "cpu" if args.device == "cpu" else args.device.replace(":", "")
    name += "" if args.scale == "full" else f"-{args.scale}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = report.markdown(result)
    (out / f"{name}.md").write_text(table)
    print(table)
    print(f"wrote {out / name}.json and .md")
    return result


if __name__ == "__main__":
    main()
