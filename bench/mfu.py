"""MFU: training FLOP/s of each timed SFT side over the peak matmul FLOP/s measured in the same run.

A = 6 x N x useful tokens/s (N = matmul parameters, embedding table excluded; attention-score FLOPs not
counted), B = FLOP/s of an n x n x n matmul, the median of runs before and after the sections.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from .common import Clock, Context, ratio_entry


def peak_matmul_flops(clock: Clock, device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> list[float]:
    """FLOP/s of an n x n x n matmul (the best case this machine's BLAS reaches), one figure per repeat."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = max(1, int(4e9 // (2 * n**3)))  # ~4 GFLOP per timed call
    for _ in range(2):
        a @ b

    def run() -> float:
        for _ in range(reps):
            a @ b
        return 2.0 * n**3 * reps

    out = []
    for _ in range(repeats):
        units, seconds = clock.time(run)
        out.append(units / seconds)
    return out


def run(ctx: Context) -> list[dict[str, Any]]:
    peaks = ctx.peak_before + peak_matmul_flops(ctx.clock, ctx.device, ctx.dtype, ctx.preset.peak_n)
    peak = statistics.median(peaks)
    if not ctx.sft_sides:
        return [{"id": "mfu", "what": "MFU", "skipped": "needs the sft section"}]
    n = ctx.n_params["sft"]
    details = {
        "n_matmul_params": n,
        "peak_runs": [f"{x:.4g}" for x in peaks],
        "note": "6*N counts matmul FLOPs only (no attention scores), over useful tokens (pads excluded)",
    }
    return [
        ratio_entry(
            f"mfu_sft_{key}",
            f"MFU: SFT training FLOP/s (6*N*useful tokens/s, {key}) over peak matmul FLOP/s",
            ("training FLOP/s", 6 * n * side.median),
            (f"peak {ctx.preset.peak_n}^3 matmul FLOP/s", peak),
            "FLOP/s",
            None,
            dict(details),
        )
        for key, side in ctx.sft_sides.items()
    ]
