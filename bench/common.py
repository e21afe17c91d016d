"""What every bench section shares: sizes, timing, entries, machine info, data, tokenizer, models."""

from __future__ import annotations

import gc
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
import trl
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from hhrm import data as hdata
from hhrm import synthetic
from hhrm.embedded import llama_config, train_tokenizer

logger = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DEMO_SUMMARY = ROOT / "outputs" / "tiny" / "demo_summary.json"
EMBEDDED_SOURCE = "embedded (hhrm.synthetic, seed 0)"


# --------------------------------------------------------------------------------------------
# Sizes


@dataclass
class Preset:
    """Model shape and workload sizes of one bench run."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int | None = None  # None: the bench tokenizer's size
    tokenizer_vocab: int = 4096
    repeats: int = 3
    # SFT: documents up to sft_max_length tokens, about sft_tokens of them per side and repeat
    sft_max_length: int = 1024
    sft_rows_per_step: int = 1
    sft_tokens: int = 4096
    # RM: pairs whose texts are <= rm_max_tokens (the card: 512), rm_pairs of them, rm_batch pairs per step
    rm_max_tokens: int = 512
    rm_pairs: int = 32
    rm_batch: int = 8
    # Generation: gen_prompts prompts (<= gen_prompt_max tokens) x K; gen_seq_prompts of them one sequence at a time
    gen_prompts: int = 16
    gen_k: int = 8
    gen_new_tokens: int = 48
    gen_prompt_max: int = 256
    gen_batch: int = 16
    gen_seq_prompts: int = 1
    # Scoring: score_texts prompt+response texts
    score_texts: int = 128
    score_batch: int = 64
    peak_n: int = 2048
    # Data preparation (section data): raw HH-format files of each data_train_rows + data_test_rows rows, read,
    # reported and tokenized in a fresh process per size; data_test_offset test rows join training (the card: 6,275)
    data_train_rows: tuple[int, ...] = (40_000, 80_000, 161_000)
    data_test_rows: int = 8552
    data_test_offset: int = 6275


PRESETS: dict[str, Preset] = {
    # Smoke-test sizes: a few seconds, checks the plumbing only.
    "tiny": Preset(
        hidden=64,
        layers=2,
        heads=4,
        kv_heads=4,
        intermediate=176,
        tokenizer_vocab=512,
        repeats=1,
        sft_max_length=256,
        sft_tokens=768,
        rm_max_tokens=256,
        rm_pairs=8,
        rm_batch=4,
        gen_prompts=3,
        gen_k=2,
        gen_new_tokens=4,
        gen_prompt_max=64,
        gen_batch=3,
        gen_seq_prompts=1,
        score_texts=8,
        score_batch=8,
        peak_n=256,
        data_train_rows=(2000, 4000, 8000),
        data_test_rows=500,
        data_test_offset=300,
    ),
    # The CPU reference: 4 Llama layers at hidden 512 (~15M parameters with a 4k vocabulary).
    "cpu": Preset(hidden=512, layers=4, heads=8, kv_heads=8, intermediate=1408),
    # ~1.1B parameters (TinyLlama's shape) for a GPU run with --device cuda --dtype bf16.
    "1b": Preset(
        hidden=2048,
        layers=22,
        heads=32,
        kv_heads=4,
        intermediate=5632,
        vocab=32000,
        repeats=5,
        sft_rows_per_step=8,
        sft_tokens=65536,
        rm_pairs=512,
        rm_batch=16,
        gen_prompts=64,
        gen_batch=64,
        gen_new_tokens=128,
        gen_seq_prompts=2,
        score_texts=1024,
        score_batch=64,
        peak_n=8192,
    ),
}


# --------------------------------------------------------------------------------------------
# Timing


class Clock:
    """Wall-clock timing that waits for the device (CUDA kernels are asynchronous)."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], float]) -> tuple[float, float]:
        """``(units, seconds)`` of one call of ``fn`` (which returns the units of work it did)."""
        self.sync()
        start = time.perf_counter()
        units = fn()
        self.sync()
        return float(units), time.perf_counter() - start


@dataclass
class Side:
    """One way of doing the work: ``run()`` does it once and returns its units (tokens, pairs...)."""

    label: str
    run: Callable[[], float]
    warmup: Callable[[], Any] | None = None
    runs: list[tuple[float, float]] = field(default_factory=list)  # (units, seconds)

    @property
    def rates(self) -> list[float]:
        return [u / s for u, s in self.runs if s > 0]

    @property
    def median(self) -> float:
        return statistics.median(self.rates) if self.rates else float("nan")


def interleave(clock: Clock, sides: list[Side], repeats: int) -> None:
    """Warm every side up, then run them in turn ``repeats`` times (order rotated each round)."""
    for side in sides:
        (side.warmup or side.run)()
    for r in range(repeats):
        k = r % len(sides)
        for side in sides[k:] + sides[:k]:
            side.runs.append(clock.time(side.run))
            gc.collect()


# --------------------------------------------------------------------------------------------
# Entries


def compare(
    id_: str,
    what: str,
    a: Side,
    b: Side,
    unit: str,
    expect: float | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An entry: A's and B's median rates and ``ratio = A / B``."""
    return ratio_entry(
        id_,
        what,
        (a.label, a.median, [round(x, 3) for x in a.rates]),
        (b.label, b.median, [round(x, 3) for x in b.rates]),
        unit,
        expect,
        details,
    )


def ratio_entry(
    id_: str,
    what: str,
    a: tuple,
    b: tuple,
    unit: str,
    expect: float | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An entry from ``(label, value[, runs])`` of A and B."""
    ratio = a[1] / b[1] if b[1] else float("nan")
    entry = {
        "id": id_,
        "what": what,
        "a": {"label": a[0], "value": round_sig(a[1]), "unit": unit, **({"runs": a[2]} if len(a) > 2 else {})},
        "b": {"label": b[0], "value": round_sig(b[1]), "unit": unit, **({"runs": b[2]} if len(b) > 2 else {})},
        "ratio": round_sig(ratio),
        "expect": expect,
        "meets": None if expect is None or math.isnan(ratio) else bool(ratio >= expect),
    }
    if details:
        entry["details"] = details
    return entry


def round_sig(x: float, digits: int = 4) -> float | None:
    """``x`` to ``digits`` significant digits; None for None, NaN and infinities (not valid JSON)."""
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return None
    return float(f"{x:.{digits}g}")


def length_summary(values: list[int]) -> dict[str, float]:
    """hhrm's length statistics of ``values``, floats to one decimal."""
    stats = hdata.length_stats(np.array(values))
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in stats.items()}


# --------------------------------------------------------------------------------------------
# Machine


def cpu_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def usable_cpus() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine_info(device: torch.device, dtype: torch.dtype, threads: int) -> dict[str, Any]:
    info = {
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "torch_threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# --------------------------------------------------------------------------------------------
# Data, tokenizer, models


@dataclass
class BenchData:
    prompts: list[str]
    chosen: list[str]
    rejected: list[str]
    source: str


def load_data(path: Path | None, embedded_rows: int = 1200) -> BenchData:
    """HH rows from ``path`` (a raw HH-RLHF jsonl(.gz)), or the embedded generated data when None."""
    if path is None:
        rows, source = synthetic.generate(embedded_rows, seed=0), EMBEDDED_SOURCE
    elif path.is_file():
        rows, source = hdata.read_rows(str(path), "test"), str(path)
    else:
        raise FileNotFoundError(f"HH sample {path} not found")
    ds, _ = hdata.normalize_rows(rows, "raw", "bench")
    return BenchData(list(ds["prompt"]), list(ds["chosen"]), list(ds["rejected"]), source)


def bench_tokenizer(data: BenchData, vocab_size: int):
    """A BPE tokenizer trained on the bench data (prompt + chosen and prompt + rejected texts)."""
    texts = [p + c for p, c in zip(data.prompts, data.chosen)] + [p + r for p, r in zip(data.prompts, data.rejected)]
    return train_tokenizer(texts, vocab_size, max_length=1_000_000)


def model_config(preset: Preset, tokenizer, **extra) -> LlamaConfig:
    """The preset's Llama shape, from hhrm's one LlamaConfig builder, with sdpa attention."""
    return llama_config(
        tokenizer,
        hidden_size=preset.hidden,
        num_layers=preset.layers,
        num_heads=preset.heads,
        num_kv_heads=preset.kv_heads,
        intermediate_size=preset.intermediate,
        max_position_embeddings=4096,
        vocab_size=preset.vocab,
        attn_implementation="sdpa",
        **extra,
    )


def build_model(kind: str, preset: Preset, tokenizer, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A randomly initialised ``causal`` LM or ``seqcls`` reward model (one score) of the preset's shape."""
    torch.manual_seed(seed)
    if kind == "causal":
        model = LlamaForCausalLM(model_config(preset, tokenizer))
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    else:
        model = LlamaForSequenceClassification(model_config(preset, tokenizer, num_labels=1))
    return model.to(device=device, dtype=dtype)


def matmul_params(model) -> int:
    """Parameters that take part in matmuls (all but the input embedding table): the N of 6·N·tokens."""
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)


# --------------------------------------------------------------------------------------------
# What the sections share during a run


@dataclass
class Context:
    preset: Preset
    device: torch.device
    dtype: torch.dtype
    clock: Clock
    data: BenchData
    tokenizer: Any
    sft_strategies: tuple[str, ...] = ("wrapped", "bfd")
    demo: str = "read"
    demo_summary: str = str(DEFAULT_DEMO_SUMMARY)
    n_params: dict[str, int] = field(default_factory=dict)  # "sft": N of the SFT model (for MFU)
    sft_sides: dict[str, Side] = field(default_factory=dict)  # the timed SFT sides (for MFU)
    rm_model: Any = None  # the trained RM, reused by the scoring section
    peak_before: list[float] = field(default_factory=list)  # peak matmul FLOP/s before the sections
