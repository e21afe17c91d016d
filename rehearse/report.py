"""Rates, MFU and projections from the measured stages, and the Markdown report."""

from __future__ import annotations

from typing import Any

from .stages import COMPUTE, Stage

# The card's workload. HH-RLHF (Dahoas/full-hh-rlhf): ~112K train rows + the first 6,275 test rows.
DIALOGUES = 118_000
# Assumed, not measured here (no Llama tokenizer offline): mean Llama tokens of an HH prompt + chosen response,
# and of a RAFT fine-tune row (a prompt + one sampled response of up to 128 tokens).
TOKENS_PER_DIALOGUE = 230
TOKENS_PER_RAFT_ROW = 250
SCALING = (
    "ideal data parallelism: each of the N devices takes 1/N of the rows or prompts at this device's measured "
    "per-device rate; no communication, gather or load-imbalance cost (a lower bound)"
)


def measured(stage: Stage, result: dict[str, Any], peaks: dict[str, float], predicted: dict[str, float]):
    """The stage's throughput, MFU and measured-vs-predicted peak from its child's raw result."""
    if "error" in result:
        return {"error": result["error"]}
    s = result["seconds"]
    out: dict[str, Any] = {"seconds": round(s, 2), "build_seconds": result["build_seconds"]}
    out["work"] = {k: result[k] for k in ("tokens", "generated_tokens", "texts", "pairs") if result.get(k)}
    out["matmul_params"] = result["matmul_params"]
    train = stage.kind in ("train", "rm", "finetune")
    flops = (6 if train else 2) * result["matmul_params"] * result["tokens"]
    out["tokens_per_s"] = round(result["tokens"] / s, 2)
    if stage.kind == "rm":
        out["pairs_per_s"] = round(result["pairs"] / s, 3)
    if stage.kind == "generate":
        out["generated_tokens_per_s"] = round(result["generated_tokens"] / s, 3)
    if stage.kind == "score":
        out["texts_per_s"] = round(result["texts"] / s, 3)
    peak = peaks[COMPUTE[stage.precision]]
    out["model_flops_per_s"] = round(flops / s)
    out["mfu"] = round(flops / s / peak, 4)
    out["mfu_note"] = f"{'6' if train else '2'} x matmul params x tokens (attention scores not counted)"
    out["peak_gb"] = result["peak_gb"]
    out["baseline_rss_gb"] = result["baseline_rss_gb"]
    out["measured_over_predicted"] = round(result["peak_gb"] / predicted["total"], 3) if predicted["total"] else None
    return out


def check_fit(rows: list[dict[str, Any]], results: list[dict[str, Any]], scale: str) -> None:
    """On the one-device rows: each stage of that recipe measured at the card's size, measured vs predicted."""
    if scale != "full":
        return
    for row in rows:
        if row["processes"] != 1:
            continue
        checks = [
            f"{e['stage']['id'].split(':')[1]}: {e['peak_gb']:.2f} GB measured / {e['predicted_gb']['total']:.2f} "
            f"predicted at the run's shapes = {e['measured_over_predicted']}"
            for e in results
            if e["stage"]["recipe"] == row["recipe"] and "peak_gb" in e
        ]
        if checks:
            row["measured_check"] = checks


def _rate(by_id: dict[str, dict[str, Any]], stage_id: str, key: str) -> float | None:
    entry = by_id.get(stage_id, {})
    return entry.get(key)


def projections(
    recipes: dict[str, dict[str, Any]], by_id: dict[str, dict[str, Any]], n: int, at_peak: dict[str, tuple[int, float]]
) -> list[dict]:
    """The card's full run of each recipe at the measured rates, on this device and on ``n`` devices.

    A stage that did not run here (it does not fit) is counted at 100% of the measured matmul peak (model FLOPs:
    6 N per trained token, 2 N per generated or scored token; ``at_peak``: stage id -> (N, peak FLOP/s)), so the
    total is then a lower bound.
    """
    out = []
    for key, r in recipes.items():
        epochs = float(r.get("num_train_epochs", 1))
        parts: dict[str, tuple[float, str, str, float]] = {}  # name -> (units, stage id, rate key, N-FLOPs per unit)
        if "reward_model_name_or_path" in r:
            iters, prompts = int(r.get("num_iterations", 10)), int(r.get("prompts_per_iteration", 2048))
            k, new = int(r.get("num_samples", 8)), int(r.get("max_new_tokens", 128))
            work = f"{iters} iterations x {prompts:,} prompts x K={k}, {new} new tokens, 1 fine-tune epoch"
            parts["generate"] = (iters * prompts * k * new, f"{key}:generate", "generated_tokens_per_s", 2)
            parts["score"] = (iters * prompts * k, f"{key}:score", "texts_per_s", 2 * TOKENS_PER_RAFT_ROW)
            parts["finetune"] = (iters * prompts * TOKENS_PER_RAFT_ROW, f"{key}:finetune", "tokens_per_s", 6)
        elif key.endswith("rm"):
            work = f"{epochs:g} epoch(s) x {DIALOGUES:,} pairs"
            parts["rm"] = (epochs * DIALOGUES, f"{key}:rm", "pairs_per_s", 6 * 2 * TOKENS_PER_DIALOGUE)
        else:
            work = f"{epochs:g} epoch(s) x {DIALOGUES:,} dialogues x {TOKENS_PER_DIALOGUE} tokens, packed"
            parts["train"] = (epochs * DIALOGUES * TOKENS_PER_DIALOGUE, f"{key}:train", "tokens_per_s", 6)
        seconds, bounded, missing = {}, [], []
        for name, (units, stage_id, rate_key, flops_per_n) in parts.items():
            rate = _rate(by_id, stage_id, rate_key)
            if rate:
                seconds[name] = units / rate
            elif stage_id in at_peak:
                params, peak = at_peak[stage_id]
                seconds[name] = units * flops_per_n * params / peak
                bounded.append(name)
            else:
                missing.append(f"{name} ({by_id.get(stage_id, {}).get('error') or 'not run'})")
        total = sum(seconds.values()) if not missing else None
        out.append(
            {
                "recipe": key,
                "work": work,
                "hours_by_stage_this_device": {k: round(v / 3600, 2) for k, v in seconds.items()},
                "at_peak_lower_bound": bounded,
                "hours_this_device": None if total is None else round(total / 3600, 2),
                "devices": n,
                f"hours_{n}_devices": None if total is None else round(total / 3600 / n, 2),
                "scaling": SCALING,
                "missing": missing,
            }
        )
    return out


# --------------------------------------------------------------------------------------------
# Markdown


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _shape(st: dict[str, Any]) -> str:
    if st["kind"] == "generate":
        return f"{st['prompts']} prompts x K={st['k']}, {st['prompt_len']}+{st['new_tokens']} tokens"
    unit = "pairs" if st["kind"] == "rm" else ("texts" if st["kind"] == "score" else "rows")
    return f"{st['rows']} {unit} x {st['seq']} tokens" + (", ckpt" if st["checkpointing"] else "")


def _throughput(e: dict[str, Any]) -> str:
    for key, unit in (("generated_tokens_per_s", "gen tok/s"), ("pairs_per_s", "pairs/s"), ("texts_per_s", "texts/s")):
        if key in e:
            return f"{e[key]:.3g} {unit}"
    return f"{e['tokens_per_s']:.3g} tok/s" if "tokens_per_s" in e else "-"


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    peaks = ", ".join(f"{k} {v / 1e9:.3g} GFLOP/s" for k, v in result["peak_matmul_flops"].items())
    lines = [
        f"# `make rehearse` on {m['gpu'] or m['cpu']} ({m['device']}), scale {result['scale']}",
        "",
        f"`{result['command']}`: {result['created']}, {result['total_seconds']} s; {m['available_gb_at_start']} GB "
        f"available at the start; measured matmul peak: {peaks or '-'}.",
        "",
        "## Stages (one process, one device; peak = CUDA max_memory_allocated, or peak RSS above the process's "
        "RSS before the model was built)",
        "",
        "| stage | model | precision | shape | s | throughput | MFU | peak GB | predicted GB | measured/predicted |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in result["stages"]:
        st = e["stage"]
        head = f"| {st['id']} | {st['arch']} | {st['precision']} | {_shape(st)} |"
        pred = f"{e['predicted_gb']['total']:.3g}"
        if "skipped" in e or "error" in e:
            lines.append(f"{head} skipped: {e.get('skipped') or e['error']} | | | | {pred} | |")
            continue
        same = f" (same as {e['same_as']})" if "same_as" in e else ""
        lines.append(
            f"{head} {e['seconds']}{same} | {_throughput(e)} | {e['mfu']:.2%} | {e['peak_gb']} | {pred} | "
            f"{e['measured_over_predicted']} |"
        )
    lines += ["", "## Projected wall time of the card's full run", ""]
    if result["scale"] != "full":
        lines += [f"(scale {result['scale']}: the rates are those of the small stand-in shapes, not the card's)", ""]
    lines += [
        "| recipe | work | hours by stage, this device | hours, this device | hours, N devices | not run here |",
        "|---|---|---|---|---|---|",
    ]
    for p in result["projections"]:
        n, bound = p["devices"], ">= " if p["at_peak_lower_bound"] else ""
        stages = ", ".join(
            f"{k} {v:.3g}" + (" (at peak)" if k in p["at_peak_lower_bound"] else "")
            for k, v in p["hours_by_stage_this_device"].items()
        )
        total, per_n = p["hours_this_device"], p[f"hours_{n}_devices"]
        lines.append(
            f"| {p['recipe']} | {p['work']} | {stages} | {bound}{_num(total)} | {bound}{_num(per_n)} (N={n}) | "
            f"{'; '.join(p['missing']) or ', '.join(p['at_peak_lower_bound']) or '-'} |"
        )
    if result["projections"]:
        lines += [
            "",
            f"Scaling: {result['projections'][0]['scaling']}. A stage that did not run here is counted at 100% of "
            "the measured matmul peak (model FLOPs only), so its total is a lower bound (>=). Assumed: "
            f"{TOKENS_PER_DIALOGUE} tokens per HH dialogue, {TOKENS_PER_RAFT_ROW} per RAFT fine-tune row, every "
            "sample generates max_new_tokens.",
        ]
    gbs = result["fit"]["device_gb"]
    lines += [
        "",
        "## Fit table (computed at the card's sizes, bf16, per device; fits = total <= "
        f"{result['fit']['headroom']:.0%} of the device's memory)",
        "",
        "| recipe | config (N) | micro-batch | heaviest stage | params | grads | optimizer | activations | total | "
        + " | ".join(f"{g} GB" for g in gbs)
        + " |",
        "|---|---|---|---|---|---|---|---|---|" + "---|" * len(gbs),
    ]
    for r in result["fit"]["rows"]:
        g = r["gb_per_device"]
        fits = " | ".join("yes" if r["fits"][str(x)] else "no" for x in gbs)
        lines.append(
            f"| {r['recipe']} ({r['params_b']}B) | {r['config']} ({r['processes']}) | {r['micro_batch']} | "
            f"{r['heaviest_stage']} | {g['params']:.1f} | {g['grads']:.1f} | {g['optimizer']:.1f} | "
            f"{g['activations']:.1f} | {g['total']:.1f} | {fits} |"
        )
    checks = [f"* {r['recipe']}, {c}" for r in result["fit"]["rows"] for c in r.get("measured_check", [])]
    if checks:
        lines += ["", "Measured against the fit model (one device, the shapes that ran):", "", *checks]
    return "\n".join(lines) + "\n"
