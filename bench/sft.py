"""SFT: useful (non-pad) training tokens/s, TRL packing vs padded batches of the same documents.

A = packed rows of ``sft_max_length`` tokens (``wrapped``, hhrm's default; and ``bfd``, padding-free),
B = padded batches of the same documents in random order, with as many documents per batch as give
the same expected useful tokens per step. Every side trains the same model on exactly the same tokens.
"""

from __future__ import annotations

import gc
import random
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset
from trl.data_utils import pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from .common import Context, Preset, Side, build_model, compare, interleave, length_summary, matmul_params, ratio_entry

Batch = dict[str, Any]


# --------------------------------------------------------------------------------------------
# The work: documents and their batches


def documents(ctx: Context) -> list[list[int]]:
    """About ``sft_tokens`` tokens of documents in random order, as SFTTrainer's text path tokenizes them
    (EOS appended, no special tokens added). Documents over ``sft_max_length`` are left out so that every
    side trains on exactly the same tokens (bfd would truncate them)."""
    p, tok = ctx.preset, ctx.tokenizer
    texts = [pr + c + tok.eos_token for pr, c in zip(ctx.data.prompts, ctx.data.chosen)]
    all_docs = [ids for ids in tok(texts, add_special_tokens=False)["input_ids"] if 1 < len(ids) <= p.sft_max_length]
    random.Random(0).shuffle(all_docs)
    docs, total = [], 0
    for ids in all_docs:
        if total >= p.sft_tokens:
            break
        docs.append(ids)
        total += len(ids)
    return docs


def padded_batch_docs(preset: Preset, docs: list[list[int]]) -> int:
    """Documents per padded batch: the same expected useful tokens per step as a packed step."""
    mean_len = sum(len(d) for d in docs) / len(docs)
    return max(1, round(preset.sft_rows_per_step * preset.sft_max_length / mean_len))


def padded_batches(ctx: Context, docs: list[list[int]], batch_docs: int) -> list[Batch]:
    collate = DataCollatorForLanguageModeling(pad_token_id=ctx.tokenizer.pad_token_id)
    return [collate([{"input_ids": d} for d in docs[s : s + batch_docs]]) for s in range(0, len(docs), batch_docs)]


def packed_batches(ctx: Context, docs: list[list[int]], strategy: str) -> list[Batch]:
    """TRL's own packing (``pack_dataset``) and collator; ``bfd`` rows go padding-free (``position_ids``)."""
    rows_per_step = ctx.preset.sft_rows_per_step
    packed = pack_dataset(Dataset.from_dict({"input_ids": docs}), ctx.preset.sft_max_length, strategy)
    rows = [dict(r) for r in packed]
    padding_free = strategy != "wrapped"
    collate = DataCollatorForLanguageModeling(pad_token_id=ctx.tokenizer.pad_token_id, padding_free=padding_free)
    return [collate(rows[s : s + rows_per_step]) for s in range(0, len(rows), rows_per_step)]


def useful_tokens(batches: list[Batch]) -> int:
    """Non-pad input tokens (the padded side marks its pads with ``attention_mask == 0``)."""
    return sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)


def all_tokens(batches: list[Batch]) -> int:
    return sum(b["input_ids"].numel() for b in batches)


# --------------------------------------------------------------------------------------------
# The sides


def train_step(model, optimizer, device: torch.device) -> Callable[[Batch], None]:
    """One optimizer step on a batch (the model computes the LM loss from its ``labels``)."""

    def step(batch: Batch) -> None:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def training_side(label: str, step: Callable[[Batch], None], batches: list[Batch], tokens: int) -> Side:
    """Trains on every batch once per run; its units are the useful tokens of all of them."""

    def run() -> float:
        for b in batches:
            step(b)
        return tokens

    return Side(label, run, warmup=lambda: step(batches[0]))


def padded_side(step: Callable[[Batch], None], batches: list[Batch], batch_docs: int) -> Side:
    """B: padded batches of ``batch_docs`` documents in random order."""
    return training_side(f"padded batches of {batch_docs} docs (random order)", step, batches, useful_tokens(batches))


def packed_side(preset: Preset, step: Callable[[Batch], None], batches: list[Batch], strategy: str) -> Side:
    """A: packed rows, ``wrapped`` (hhrm's default) or ``bfd`` (padding-free)."""
    shape = f"{preset.sft_rows_per_step}x{preset.sft_max_length}"
    labels = {"wrapped": f"packed, wrapped {shape} (hhrm default)", "bfd": f"packed, bfd padding-free {shape}"}
    return training_side(labels[strategy], step, batches, useful_tokens(batches))


# --------------------------------------------------------------------------------------------
# The section


def run(ctx: Context) -> list[dict[str, Any]]:
    p = ctx.preset
    docs = documents(ctx)
    batch_docs = padded_batch_docs(p, docs)
    layouts = {"padded": padded_batches(ctx, docs, batch_docs), "wrapped": packed_batches(ctx, docs, "wrapped")}
    if "bfd" in ctx.sft_strategies:
        layouts["bfd"] = packed_batches(ctx, docs, "bfd")
    counts = {k: useful_tokens(v) for k, v in layouts.items()}
    assert len(set(counts.values())) == 1, f"SFT sides see different token counts: {counts}"

    model = build_model("causal", p, ctx.tokenizer, ctx.device, ctx.dtype)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ctx.n_params["sft"] = matmul_params(model)
    step = train_step(model, optimizer, ctx.device)
    sides = {"padded": padded_side(step, layouts["padded"], batch_docs)}
    sides |= {s: packed_side(p, step, layouts[s], s) for s in ("wrapped", "bfd") if s in layouts}
    interleave(ctx.clock, list(sides.values()), p.repeats)
    ctx.sft_sides = sides
    del model, optimizer, step
    gc.collect()
    return entries(p, docs, layouts, counts, sides, batch_docs)


def entries(
    preset: Preset,
    docs: list[list[int]],
    layouts: dict[str, list[Batch]],
    counts: dict[str, int],
    sides: dict[str, Side],
    batch_docs: int,
) -> list[dict[str, Any]]:
    eff = {k: counts[k] / all_tokens(v) for k, v in layouts.items()}
    details = {
        "documents": len(docs),
        "useful_tokens_per_side": counts["padded"],
        "doc_length": length_summary([len(d) for d in docs]),
        "steps": {k: len(v) for k, v in layouts.items()},
        "max_length": preset.sft_max_length,
        "padded_batch_docs": batch_docs,
        "non_pad_share": {k: round(v, 4) for k, v in eff.items()},
    }
    out = [
        compare(
            "sft_packing_tokens_per_s",
            "SFT useful tokens/s: packed (wrapped) vs padded batches",
            sides["wrapped"],
            sides["padded"],
            "tokens/s",
            1.5,
            details,
        )
    ]
    if "bfd" in sides:
        out.append(
            compare(
                "sft_bfd_tokens_per_s",
                "SFT useful tokens/s: packed (bfd, padding-free) vs padded",
                sides["bfd"],
                sides["padded"],
                "tokens/s",
                1.5,
            )
        )
    out.append(
        ratio_entry(
            "sft_packing_efficiency",
            "SFT share of non-pad tokens: packed (wrapped) vs padded",
            ("packed (wrapped)", eff["wrapped"]),
            ("padded", eff["padded"]),
            "share",
        )
    )
    return out
