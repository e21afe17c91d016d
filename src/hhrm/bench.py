"""``make bench``: hhrm's speed and cost, measured as side-by-side ratios in one run.

    python -m hhrm.bench --out bench/results.json                # the reference CPU run (~6-9 min)
    python -m hhrm.bench --size tiny --out /tmp/b.json           # smoke sizes (seconds)
    python -m hhrm.bench --device cuda --dtype bf16 --size 1b    # a ~1.1B Llama on a GPU

Every entry compares two ways of doing the same work on the same model and data, measured
interleaved (A, B, A, B, ...) after a warm-up, and reports both medians and their ratio. Absolute
numbers on a shared machine are noise; the ratios are what the bench is for. See bench/README.md.

Sections (``--sections``, default all):

* ``sft``:   useful (non-pad) tokens/s, TRL packing (hhrm's ``wrapped`` default, and ``bfd``) vs padded
             batches of the same documents; the share of non-pad tokens of each.
* ``rm``:    reward-model training pairs/s and padding share, length-grouped batches (what
             ``train_sampling_strategy="group_by_length"`` does) vs random order.
* ``gen``:   RAFT sampling, generated tokens/s: :func:`hhrm.generation.generate_responses` with many
             prompts x K per call vs one prompt x K per call (the original RAFT aligner) vs one sequence
             per call.
* ``score``: responses/s, :class:`hhrm.scoring.RewardScorer` vs the card's ``pipeline(..., batch_size=1)``.
* ``mfu``:   training FLOP/s (6 N tokens/s, from the packed SFT run) over the peak matmul FLOP/s
             measured in the same run.
* ``demo``:  wall time and peak RSS of each stage of ``make demo``, read from the demo's summary
             (``--demo run`` runs the demo first; ``--demo skip`` leaves it out).

The models are Llamas built from a config with random weights (``--size``): timing does not depend
on the weights, and a realistic width keeps the figures about matmuls rather than Python overhead.
The length distributions come from the real HH-RLHF sample when it is present, else from the
embedded generated data.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

logger = logging.getLogger("hhrm.bench")

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test-first-half.jsonl.gz"
DEFAULT_DEMO_SUMMARY = ROOT / "outputs" / "tiny" / "demo_summary.json"
SECTIONS = ("sft", "rm", "gen", "score", "mfu", "demo")


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


PRESETS: dict[str, Preset] = {
    # Smoke-test sizes: a few seconds, checks the plumbing only.
    "tiny": Preset(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=176, tokenizer_vocab=512, repeats=1,
                   sft_max_length=256, sft_tokens=768, rm_max_tokens=256, rm_pairs=8, rm_batch=4, gen_prompts=3,
                   gen_k=2, gen_new_tokens=4, gen_prompt_max=64, gen_batch=3, gen_seq_prompts=1, score_texts=8,
                   score_batch=8, peak_n=256),
    # The CPU reference: 4 Llama layers at hidden 512 (~15M parameters with a 4k vocabulary).
    "cpu": Preset(hidden=512, layers=4, heads=8, kv_heads=8, intermediate=1408),
    # ~1.1B parameters (TinyLlama's shape) for a GPU run with --device cuda --dtype bf16.
    "1b": Preset(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000, repeats=5,
                 sft_rows_per_step=8, sft_tokens=65536, rm_pairs=512, rm_batch=16, gen_prompts=64, gen_batch=64,
                 gen_new_tokens=128, gen_seq_prompts=2, score_texts=1024, score_batch=64, peak_n=8192),
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


def compare(id_: str, what: str, a: Side, b: Side, unit: str, expect: float | None = None,
            details: dict[str, Any] | None = None) -> dict[str, Any]:
    """An entry: A's and B's median rates and ``ratio = A / B``."""
    return ratio_entry(id_, what, (a.label, a.median, [round(x, 3) for x in a.rates]),
                       (b.label, b.median, [round(x, 3) for x in b.rates]), unit, expect, details)


def ratio_entry(id_: str, what: str, a: tuple, b: tuple, unit: str, expect: float | None = None,
                details: dict[str, Any] | None = None) -> dict[str, Any]:
    ratio = a[1] / b[1] if b[1] else float("nan")
    entry = {
        "id": id_,
        "what": what,
        "a": {"label": a[0], "value": _round(a[1]), "unit": unit, **({"runs": a[2]} if len(a) > 2 else {})},
        "b": {"label": b[0], "value": _round(b[1]), "unit": unit, **({"runs": b[2]} if len(b) > 2 else {})},
        "ratio": _round(ratio),
        "expect": expect,
        "meets": None if expect is None or math.isnan(ratio) else bool(ratio >= expect),
    }
    if details:
        entry["details"] = details
    return entry


def _round(x: float, digits: int = 4) -> float | None:
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return None
    return float(f"{x:.{digits}g}")


# --------------------------------------------------------------------------------------------
# Machine, data, models


def machine_info(device: torch.device, dtype: torch.dtype, threads: int) -> dict[str, Any]:
    import transformers
    import trl

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
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


@dataclass
class BenchData:
    prompts: list[str]
    chosen: list[str]
    rejected: list[str]
    source: str


def load_data(path: Path | None, fallback_rows: int = 1200) -> BenchData:
    """HH rows from ``path`` (the real sample) when it exists, else the embedded generated data."""
    from hhrm import data as hdata
    from hhrm import synthetic

    if path is not None and path.is_file():
        rows, source = hdata.read_rows(str(path), "test"), str(path)
    else:
        if path is not None:
            logger.warning("HH sample %s not found: using the embedded generated data for the length distributions", path)
        rows, source = synthetic.generate(fallback_rows, seed=0), "embedded (hhrm.synthetic, seed 0)"
    ds, _ = hdata.normalize_rows(rows, "raw", "bench")
    return BenchData(list(ds["prompt"]), list(ds["chosen"]), list(ds["rejected"]), source)


def bench_tokenizer(data: BenchData, vocab_size: int):
    from hhrm.embedded import train_tokenizer

    texts = [p + c for p, c in zip(data.prompts, data.chosen)] + [p + r for p, r in zip(data.prompts, data.rejected)]
    return train_tokenizer(texts, vocab_size, max_length=1_000_000)


def llama_config(preset: Preset, tokenizer, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=preset.vocab or len(tokenizer),
        hidden_size=preset.hidden,
        intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        **extra,
    )


def build_model(kind: str, preset: Preset, tokenizer, device: torch.device, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    if kind == "causal":
        model = LlamaForCausalLM(llama_config(preset, tokenizer))
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    else:
        model = LlamaForSequenceClassification(llama_config(preset, tokenizer, num_labels=1))
    return model.to(device=device, dtype=dtype)


def matmul_params(model) -> int:
    """Parameters that take part in matmuls (all but the input embedding table): the N of 6·N·tokens."""
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)


def peak_matmul_flops(clock: Clock, device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> list[float]:
    """FLOP/s of an n x n x n matmul (the best case this machine's BLAS reaches), one figure per repeat."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = max(1, int(4e9 // (2 * n**3)))  # ~4 GFLOP per timed call
    for _ in range(2):
        a @ b
    out = []
    for _ in range(repeats):
        def run() -> float:
            for _ in range(reps):
                a @ b
            return 2.0 * n**3 * reps

        units, seconds = clock.time(run)
        out.append(units / seconds)
    return out


def _stats(values: list[int]) -> dict[str, float]:
    from hhrm.data import length_stats
    import numpy as np

    return {k: round(v, 1) if isinstance(v, float) else v for k, v in length_stats(np.array(values)).items()}


# --------------------------------------------------------------------------------------------
# 1. SFT: packing vs padded batches


def _train_step(model, optimizer, batch: dict[str, Any], device: torch.device) -> None:
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_sft(ctx: "Context") -> list[dict[str, Any]]:
    from datasets import Dataset
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    p, tok = ctx.preset, ctx.tokenizer
    L = p.sft_max_length
    eos = tok.eos_token
    # SFTTrainer's text path: EOS appended, no special tokens added. Documents over L are left out
    # so that every side trains on exactly the same tokens (bfd would truncate them).
    texts = [pr + c + eos for pr, c in zip(ctx.data.prompts, ctx.data.chosen)]
    all_docs = [ids for ids in tok(texts, add_special_tokens=False)["input_ids"] if 1 < len(ids) <= L]
    rng = random.Random(0)
    rng.shuffle(all_docs)
    docs, total = [], 0
    for ids in all_docs:
        if total >= p.sft_tokens:
            break
        docs.append(ids)
        total += len(ids)
    mean_len = total / len(docs)
    pad_batch = max(1, round(p.sft_rows_per_step * L / mean_len))  # same expected useful tokens per step as packed

    def batches_padded() -> list[dict[str, Any]]:
        collate = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)
        return [collate([{"input_ids": d} for d in docs[s : s + pad_batch]]) for s in range(0, len(docs), pad_batch)]

    def batches_packed(strategy: str) -> list[dict[str, Any]]:
        packed = pack_dataset(Dataset.from_dict({"input_ids": docs}), L, strategy)
        rows = [dict(r) for r in packed]
        collate = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=strategy != "wrapped")
        return [collate(rows[s : s + p.sft_rows_per_step]) for s in range(0, len(rows), p.sft_rows_per_step)]

    layouts = {"padded": batches_padded(), "wrapped": batches_packed("wrapped")}
    if "bfd" in ctx.sft_strategies:
        layouts["bfd"] = batches_packed("bfd")

    def useful(batches) -> int:
        # non-pad input tokens (the padded side marks its pads with attention_mask == 0)
        return sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)

    def padded_size(batches) -> int:
        return sum(b["input_ids"].numel() for b in batches)

    counts = {k: useful(v) for k, v in layouts.items()}
    assert len(set(counts.values())) == 1, f"SFT sides see different token counts: {counts}"
    model = build_model("causal", p, tok, ctx.device, ctx.dtype)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ctx.n_params["sft"] = matmul_params(model)

    def side(name: str, label: str) -> Side:
        batches = layouts[name]

        def run() -> float:
            for b in batches:
                _train_step(model, optimizer, b, ctx.device)
            return counts[name]

        return Side(label, run, warmup=lambda: _train_step(model, optimizer, batches[0], ctx.device))

    sides = {
        "padded": side("padded", f"padded batches of {pad_batch} docs (random order)"),
        "wrapped": side("wrapped", f"packed, wrapped {p.sft_rows_per_step}x{L} (hhrm default)"),
    }
    if "bfd" in layouts:
        sides["bfd"] = side("bfd", f"packed, bfd padding-free {p.sft_rows_per_step}x{L}")
    interleave(ctx.clock, list(sides.values()), p.repeats)
    ctx.sft_sides = sides
    del model, optimizer
    gc.collect()

    eff = {k: counts[k] / padded_size(v) for k, v in layouts.items()}
    details = {
        "documents": len(docs),
        "useful_tokens_per_side": counts["padded"],
        "doc_length": _stats([len(d) for d in docs]),
        "steps": {k: len(v) for k, v in layouts.items()},
        "max_length": L,
        "padded_batch_docs": pad_batch,
        "non_pad_share": {k: round(v, 4) for k, v in eff.items()},
    }
    entries = [compare("sft_packing_tokens_per_s", "SFT useful tokens/s: packed (wrapped) vs padded batches",
                       sides["wrapped"], sides["padded"], "tokens/s", 1.5, details)]
    if "bfd" in sides:
        entries.append(compare("sft_bfd_tokens_per_s", "SFT useful tokens/s: packed (bfd, padding-free) vs padded",
                               sides["bfd"], sides["padded"], "tokens/s", 1.5))
    entries.append(ratio_entry("sft_packing_efficiency", "SFT share of non-pad tokens: packed (wrapped) vs padded",
                               ("packed (wrapped)", eff["wrapped"]), ("padded", eff["padded"]), "share"))
    return entries


# --------------------------------------------------------------------------------------------
# 2. RM: length-grouped vs random batches


def bench_rm(ctx: "Context") -> list[dict[str, Any]]:
    import torch.nn.functional as F
    from transformers.trainer_pt_utils import get_length_grouped_indices
    from trl.trainer.reward_trainer import DataCollatorForPreference

    p, tok = ctx.preset, ctx.tokenizer
    eos = tok.eos_token
    chosen = tok([a + b + eos for a, b in zip(ctx.data.prompts, ctx.data.chosen)], add_special_tokens=False)["input_ids"]
    rejected = tok([a + b + eos for a, b in zip(ctx.data.prompts, ctx.data.rejected)], add_special_tokens=False)["input_ids"]
    pairs = [(c, r) for c, r in zip(chosen, rejected) if len(c) <= p.rm_max_tokens and len(r) <= p.rm_max_tokens]
    B = p.rm_batch
    collate = DataCollatorForPreference(pad_token_id=tok.pad_token_id)

    def order_random(lengths: list[int], seed: int) -> list[int]:
        return torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()

    def order_grouped(lengths: list[int], seed: int, mega: int | None = None) -> list[int]:
        return get_length_grouped_indices(lengths, B, mega_batch_mult=mega, generator=torch.Generator().manual_seed(seed))

    def padding_share(subset: list[tuple[list[int], list[int]]], order: list[int]) -> tuple[float, int, int]:
        useful = padded = 0
        for s in range(0, len(order), B):
            batch = [subset[i] for i in order[s : s + B]]
            width = max(max(len(c), len(r)) for c, r in batch)
            useful += sum(len(c) + len(r) for c, r in batch)
            padded += 2 * len(batch) * width
        return 1 - useful / padded, useful, padded

    # Padding share over every pair of the sample, with Trainer's own megabatching (50 x batch).
    all_len = [max(len(c), len(r)) for c, r in pairs]
    full = {"random": padding_share(pairs, order_random(all_len, 0))[0],
            "grouped": padding_share(pairs, order_grouped(all_len, 0))[0]}

    # Timed: the same rm_pairs pairs in both orders. The subset is smaller than one of Trainer's
    # megabatches, so it is grouped as one megabatch.
    rng = random.Random(1)
    subset = rng.sample(pairs, min(p.rm_pairs, len(pairs)))
    sub_len = [max(len(c), len(r)) for c, r in subset]
    mega = max(1, min(50, math.ceil(len(subset) / B)))
    orders = {"random": order_random(sub_len, 1), "grouped": order_grouped(sub_len, 1, mega)}
    batches = {k: [collate([{"chosen_ids": subset[i][0], "rejected_ids": subset[i][1]} for i in o[s : s + B]])
                   for s in range(0, len(o), B)] for k, o in orders.items()}
    model = build_model("seqcls", p, tok, ctx.device, ctx.dtype)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(b: dict[str, Any]) -> None:
        rewards = model(input_ids=b["input_ids"].to(ctx.device), attention_mask=b["attention_mask"].to(ctx.device),
                        use_cache=False).logits[:, 0]
        n = rewards.shape[0] // 2
        loss = -F.logsigmoid(rewards[:n] - rewards[n:]).mean()  # RewardTrainer's loss (no margin)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def side(name: str, label: str) -> Side:
        def run() -> float:
            for b in batches[name]:
                step(b)
            return len(subset)

        return Side(label, run, warmup=lambda: step(batches[name][0]))

    grouped = side("grouped", f"length-grouped batches of {B} pairs")
    rand = side("random", f"random batches of {B} pairs")
    interleave(ctx.clock, [grouped, rand], p.repeats)
    ctx.rm_model = model
    del optimizer
    sub = {k: padding_share(subset, o)[0] for k, o in orders.items()}
    details = {
        "pairs_timed": len(subset),
        "pairs_in_sample": len(pairs),
        "pair_max_length": _stats(sub_len),
        "padding_share_timed": {k: round(v, 4) for k, v in sub.items()},
        "padding_share_all_pairs": {k: round(v, 4) for k, v in full.items()},
        "note": "grouped order = transformers get_length_grouped_indices (Trainer train_sampling_strategy="
                "'group_by_length'); RewardTrainer needs a `length` column for it (its rows have no input_ids)",
    }
    return [
        compare("rm_grouped_pairs_per_s", "RM training pairs/s: length-grouped vs random order", grouped, rand,
                "pairs/s", None, details),
        ratio_entry("rm_padding_share", "RM share of padding tokens: random order vs length-grouped (all sample pairs)",
                    ("random order", full["random"]), ("length-grouped", full["grouped"]), "share"),
    ]


# --------------------------------------------------------------------------------------------
# 3. RAFT generation


class TokenCounter:
    """Wraps ``model.generate`` to count generated (non-pad) tokens, whatever the caller."""

    def __init__(self, model, pad_id: int):
        self.model, self.pad_id, self.tokens, self.calls = model, pad_id, 0, 0
        self.original = model.generate

    def __enter__(self) -> "TokenCounter":
        def counting(*args, **kwargs):
            out = self.original(*args, **kwargs)
            seqs = out if isinstance(out, torch.Tensor) else out.sequences
            width = kwargs["input_ids"].shape[1] if "input_ids" in kwargs else args[0].shape[1]
            self.tokens += int((seqs[:, width:] != self.pad_id).sum())
            self.calls += 1
            return out

        self.model.generate = counting
        return self

    def __exit__(self, *exc) -> None:
        del self.model.generate  # the instance attribute; the class method is back


def bench_gen(ctx: "Context") -> list[dict[str, Any]]:
    from hhrm.generation import SamplingArguments, generate_responses

    p, tok = ctx.preset, ctx.tokenizer
    ids = tok(ctx.data.prompts, add_special_tokens=False)["input_ids"]
    candidates = sorted({pr for pr, i in zip(ctx.data.prompts, ids) if len(i) <= p.gen_prompt_max})
    prompts = random.Random(2).sample(candidates, min(p.gen_prompts, len(candidates)))
    K = p.gen_k
    sampling = SamplingArguments(max_new_tokens=p.gen_new_tokens)
    model = build_model("causal", p, tok, ctx.device, ctx.dtype, seed=1).eval()
    by_length = sorted(prompts, key=lambda q: len(tok(q, add_special_tokens=False)["input_ids"]))
    mid = len(by_length) // 2  # prompts of median length for the slowest side
    seq_prompts = by_length[max(0, mid - p.gen_seq_prompts // 2) :][: p.gen_seq_prompts]

    def counted(fn: Callable[[], Any]) -> Callable[[], float]:
        def run() -> float:
            torch.manual_seed(0)
            with TokenCounter(model, tok.pad_token_id) as counter:
                fn()
            return counter.tokens

        return run

    def plain_generate(prompt: str, n: int) -> None:
        # The original RAFT aligner: model.generate on one prompt with num_return_sequences=n.
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
        model.generate(input_ids=enc["input_ids"].to(ctx.device), attention_mask=enc["attention_mask"].to(ctx.device),
                       generation_config=sampling.generation_config(tok, n), tokenizer=tok)

    batched = Side(f"hhrm generate_responses, {p.gen_batch} prompts x K={K} per call",
                   counted(lambda: generate_responses(model, tok, prompts, K, sampling, batch_size=p.gen_batch)))
    per_prompt = Side(f"generate(1 prompt, num_return_sequences={K}) per call",
                      counted(lambda: [plain_generate(q, K) for q in prompts]),
                      warmup=lambda: plain_generate(prompts[0], K))
    one_seq = Side("generate(1 prompt, 1 sequence) per call",
                   counted(lambda: [plain_generate(q, 1) for q in seq_prompts for _ in range(K)]),
                   warmup=lambda: plain_generate(prompts[0], 1))
    interleave(ctx.clock, [batched, per_prompt, one_seq], p.repeats)
    del model
    gc.collect()
    details = {
        "prompts": len(prompts),
        "one_sequence_prompts": len(seq_prompts),
        "k": K,
        "max_new_tokens": p.gen_new_tokens,
        "prompt_length": _stats([len(tok(q, add_special_tokens=False)["input_ids"]) for q in prompts]),
        "sampling": asdict(sampling),
    }
    return [
        compare("gen_batched_vs_prompt_x_k", "RAFT generated tokens/s: many prompts x K per call vs 1 prompt x K",
                batched, per_prompt, "tokens/s", 5.0, details),
        compare("gen_batched_vs_one_sequence", "RAFT generated tokens/s: many prompts x K per call vs 1 sequence",
                batched, one_seq, "tokens/s"),
    ]


# --------------------------------------------------------------------------------------------
# 4. Reward scoring


def bench_score(ctx: "Context") -> list[dict[str, Any]]:
    from transformers import pipeline

    from hhrm.scoring import RewardScorer

    p, tok = ctx.preset, ctx.tokenizer
    model = ctx.rm_model if ctx.rm_model is not None else build_model("seqcls", p, tok, ctx.device, ctx.dtype)
    model.eval()
    rng = random.Random(3)
    idx = rng.sample(range(len(ctx.data.prompts)), min(p.score_texts, len(ctx.data.prompts)))
    texts = [ctx.data.prompts[i] + ctx.data.chosen[i] for i in idx]
    scorer = RewardScorer(model, tok, batch_size=p.score_batch)
    # The card's snippet, in its transformers 5 form (device="auto" and return_all_scores are gone),
    # on the same in-memory model; EOS appended as RewardTrainer trained it.
    pipe = pipeline("text-classification", model=model, tokenizer=tok, device=ctx.device)
    with_eos = scorer.with_eos(texts)
    kwargs = {"top_k": None, "function_to_apply": "none", "batch_size": 1}
    results: dict[str, list[float]] = {}

    def run_scorer() -> float:
        results["scorer"] = scorer.score(texts)
        return len(texts)

    def run_pipe() -> float:
        with torch.no_grad():
            results["pipeline"] = [out[0]["score"] for out in pipe(with_eos, **kwargs)]
        return len(texts)

    a = Side(f"hhrm RewardScorer (length-sorted, batch {p.score_batch})", run_scorer,
             warmup=lambda: scorer.score(texts[:4]))
    b = Side("pipeline('text-classification', batch_size=1)", run_pipe, warmup=lambda: pipe(with_eos[:4], **kwargs))
    interleave(ctx.clock, [a, b], p.repeats)
    diff = max(abs(x - y) for x, y in zip(results["scorer"], results["pipeline"]))
    lens = [len(x) for x in tok(with_eos, add_special_tokens=False)["input_ids"]]
    details = {"texts": len(texts), "text_length": _stats(lens), "max_abs_reward_diff": float(f"{diff:.3g}")}
    ctx.rm_model = None
    return [compare("score_scorer_vs_pipeline", "Reward scoring responses/s: RewardScorer vs card pipeline(batch_size=1)",
                    a, b, "responses/s", 5.0, details)]


# --------------------------------------------------------------------------------------------
# 5. MFU


def bench_mfu(ctx: "Context") -> list[dict[str, Any]]:
    peaks = ctx.peak_before + peak_matmul_flops(ctx.clock, ctx.device, ctx.dtype, ctx.preset.peak_n)
    peak = statistics.median(peaks)
    if not ctx.sft_sides:
        return [{"id": "mfu", "what": "MFU", "skipped": "needs the sft section"}]
    n = ctx.n_params["sft"]
    entries = []
    for key, side in ctx.sft_sides.items():
        flops = 6 * n * side.median
        entries.append(ratio_entry(
            f"mfu_sft_{key}", f"MFU: SFT training FLOP/s (6*N*useful tokens/s, {key}) over peak matmul FLOP/s",
            ("training FLOP/s", flops), (f"peak {ctx.preset.peak_n}^3 matmul FLOP/s", peak), "FLOP/s", None,
            {"n_matmul_params": n, "peak_runs": [f"{x:.4g}" for x in peaks],
             "note": "6*N counts matmul FLOPs only (no attention scores), over useful tokens (pads excluded)"}))
    return entries


# --------------------------------------------------------------------------------------------
# 6. Demo


def bench_demo(ctx: "Context") -> list[dict[str, Any]]:
    summary_path = Path(ctx.demo_summary)
    if ctx.demo == "run":
        out = summary_path.parent
        cmd = [sys.executable, "-m", "hhrm.demo", "--out", str(out)]
        logger.info("running the demo: %s", " ".join(cmd))
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            return [{"id": "demo", "what": "make demo stages", "skipped": f"demo failed (rc={proc.returncode}): "
                     f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}",
                     "seconds": round(time.perf_counter() - start, 1)}]
    if not summary_path.is_file():
        return [{"id": "demo", "what": "make demo: wall time and peak RSS per stage",
                 "skipped": f"not measured: {summary_path} not found (run `make demo`, or pass --demo run)"}]
    summary = json.loads(summary_path.read_text())
    stages = summary.get("stages", {})
    rows = []
    for name, st in stages.items():
        rows.append({"stage": name, "seconds": st.get("seconds"), "max_rss_mb": st.get("max_rss_mb")})
    total = sum(r["seconds"] or 0 for r in rows)
    entry = {"id": "demo", "what": "make demo: wall time and peak RSS per stage", "source": str(summary_path),
             "stages": rows, "total_seconds": round(total, 1)}
    for k in ("total_seconds", "seconds"):
        if isinstance(summary.get(k), (int, float)):
            entry["total_seconds"] = summary[k]
    return [entry]


# --------------------------------------------------------------------------------------------
# Driver


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
    n_params: dict[str, int] = field(default_factory=dict)
    sft_sides: dict[str, Side] = field(default_factory=dict)
    rm_model: Any = None
    peak_before: list[float] = field(default_factory=list)


RUNNERS: dict[str, Callable[[Context], list[dict[str, Any]]]] = {
    "sft": bench_sft, "rm": bench_rm, "gen": bench_gen, "score": bench_score, "mfu": bench_mfu, "demo": bench_demo,
}


def pick_threads(requested: int | None) -> tuple[int, float]:
    """``requested``, else the usable CPUs not already busy (1-minute load average), at least 1.

    On a shared machine, OpenMP threads that wait for a descheduled sibling make a 2-thread matmul
    2-3x slower than a 1-thread one (measured here), which would swamp every ratio.
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if requested:
        return requested, load
    return max(1, min(usable, int(usable - load + 0.5))), load


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    threads, load = pick_threads(args.threads)
    if device.type == "cpu":
        torch.set_num_threads(threads)
    preset = PRESETS[args.size]
    overrides = {k: v for k, v in (("repeats", args.repeats),) if v is not None}
    preset = replace(preset, **overrides)
    sections = [s for s in SECTIONS if s in args.sections.split(",")]
    if args.demo == "skip" and "demo" in sections:
        sections.remove("demo")
    data_path = None if args.data == "embedded" else Path(args.data)
    data = load_data(data_path)
    tokenizer = bench_tokenizer(data, preset.tokenizer_vocab)
    clock = Clock(device)
    ctx = Context(preset, device, dtype, clock, data, tokenizer, tuple(args.sft_strategies.split(",")), args.demo,
                  args.demo_summary)
    if "mfu" in sections:
        ctx.peak_before = peak_matmul_flops(clock, device, dtype, preset.peak_n)
    entries: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    for name in sections:
        start = time.perf_counter()
        logger.info("section %s ...", name)
        entries.extend(RUNNERS[name](ctx))
        seconds[name] = round(time.perf_counter() - start, 1)
        logger.info("section %s done in %.1f s", name, seconds[name])
    return {
        "bench": "hhrm make bench",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, "-m", "hhrm.bench", *sys.argv[1:]]),
        "machine": machine_info(device, dtype, threads) | {
            "load_average_1min": {"start": round(load, 2), "end": round(os.getloadavg()[0], 2)}},
        "size": args.size,
        "preset": asdict(preset),
        "model": {"n_matmul_params": ctx.n_params.get("sft"), "vocab_size": preset.vocab or len(tokenizer)},
        "data": {"source": data.source, "rows": len(data.prompts)},
        "entries": entries,
        "section_seconds": seconds,
        "total_seconds": round(time.perf_counter() - started, 1),
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [f"hhrm bench on {result['machine']['cpu']} ({result['machine']['device']}, {result['machine']['dtype']}, "
             f"{result['machine']['torch_threads']} threads), size={result['size']}, data: {result['data']['source']}"]
    head = f"{'entry':<28} {'A':>14} {'B':>14} {'unit':<12} {'A/B':>7} {'expect':>7}"
    lines += [head, "-" * len(head)]
    for e in result["entries"]:
        if "ratio" in e:
            exp = "" if e["expect"] is None else f">={e['expect']:g}" + ("" if e["meets"] else " (!)")
            lines.append(f"{e['id']:<28} {_fmt(e['a']['value']):>14} {_fmt(e['b']['value']):>14} {e['a']['unit']:<12} "
                         f"{_fmt(e['ratio']):>7} {exp:>7}")
            lines.append(f"{'':<28}   A = {e['a']['label']};  B = {e['b']['label']}")
        elif "stages" in e:
            for st in e["stages"]:
                lines.append(f"{'demo ' + st['stage']:<28} {_fmt(st['seconds']):>14} s  peak RSS {_fmt(st['max_rss_mb'])} MB")
        else:
            lines.append(f"{e['id']:<28} skipped: {e.get('skipped')}")
    lines.append(f"total {result['total_seconds']} s; sections {result['section_seconds']}")
    return "\n".join(lines)


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.4g}"
    return str(x)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results.json", help="JSON results file")
    parser.add_argument("--size", choices=sorted(PRESETS), default="cpu", help="model/workload preset")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: usable CPUs minus the 1-minute load average, >= 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per comparison (preset default)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {','.join(SECTIONS)}")
    parser.add_argument("--sft-strategies", default="wrapped,bfd", help="packing strategies to time (wrapped[,bfd])")
    parser.add_argument("--data", default=str(DEFAULT_HH),
                        help="HH-RLHF raw jsonl(.gz) for the length distributions, or 'embedded'")
    parser.add_argument("--demo", choices=("read", "run", "skip"), default="read",
                        help="read the demo summary if present / run the demo first / leave it out")
    parser.add_argument("--demo-summary", default=str(DEFAULT_DEMO_SUMMARY))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import datasets

    datasets.disable_progress_bars()
    args = parse_args(argv)
    result = run_bench(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
