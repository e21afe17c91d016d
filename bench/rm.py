"""RM: reward-model training pairs/s and padding share, length-grouped batches vs random order.

A = length-grouped batches (``transformers.trainer_pt_utils.get_length_grouped_indices``, what Trainer's
``train_sampling_strategy="group_by_length"`` uses), B = the same pairs in random order. Chosen and
rejected go in one padded batch (TRL's ``DataCollatorForPreference``), Bradley-Terry loss.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from transformers.trainer_pt_utils import get_length_grouped_indices
from trl.trainer.reward_trainer import DataCollatorForPreference

from .common import Context, Side, build_model, compare, interleave, length_summary, ratio_entry

Pair = tuple[list[int], list[int]]
Batch = dict[str, Any]


# --------------------------------------------------------------------------------------------
# The work: pairs, their orders, their batches


def pairs(ctx: Context) -> list[Pair]:
    """(chosen, rejected) token ids, EOS appended, of the pairs whose texts are <= ``rm_max_tokens``."""
    tok, limit, data = ctx.tokenizer, ctx.preset.rm_max_tokens, ctx.data
    eos = tok.eos_token
    chosen = tok([a + b + eos for a, b in zip(data.prompts, data.chosen)], add_special_tokens=False)["input_ids"]
    rejected = tok([a + b + eos for a, b in zip(data.prompts, data.rejected)], add_special_tokens=False)["input_ids"]
    return [(c, r) for c, r in zip(chosen, rejected) if len(c) <= limit and len(r) <= limit]


def random_order(lengths: list[int], seed: int) -> list[int]:
    return torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()


def grouped_order(lengths: list[int], batch: int, seed: int, mega: int | None = None) -> list[int]:
    """Trainer's length grouping; ``mega=None`` is its own megabatching (50 x batch)."""
    generator = torch.Generator().manual_seed(seed)
    return get_length_grouped_indices(lengths, batch, mega_batch_mult=mega, generator=generator)


def padding_share(subset: list[Pair], order: list[int], batch: int) -> float:
    """Share of padding when both texts of each pair are padded to the longest text of its batch."""
    useful = padded = 0
    for s in range(0, len(order), batch):
        rows = [subset[i] for i in order[s : s + batch]]
        width = max(max(len(c), len(r)) for c, r in rows)
        useful += sum(len(c) + len(r) for c, r in rows)
        padded += 2 * len(rows) * width
    return 1 - useful / padded


def max_lengths(subset: list[Pair]) -> list[int]:
    return [max(len(c), len(r)) for c, r in subset]


def batches(ctx: Context, subset: list[Pair], order: list[int]) -> list[Batch]:
    collate = DataCollatorForPreference(pad_token_id=ctx.tokenizer.pad_token_id)
    B = ctx.preset.rm_batch
    return [
        collate([{"chosen_ids": subset[i][0], "rejected_ids": subset[i][1]} for i in order[s : s + B]])
        for s in range(0, len(order), B)
    ]


# --------------------------------------------------------------------------------------------
# The sides


def train_step(model, optimizer, device: torch.device) -> Callable[[Batch], None]:
    """One optimizer step with RewardTrainer's loss (Bradley-Terry, no margin): chosen rows first."""

    def step(b: Batch) -> None:
        rewards = model(
            input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device), use_cache=False
        ).logits[:, 0]
        n = rewards.shape[0] // 2
        loss = -F.logsigmoid(rewards[:n] - rewards[n:]).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def training_side(label: str, step: Callable[[Batch], None], batches: list[Batch], n_pairs: int) -> Side:
    def run() -> float:
        for b in batches:
            step(b)
        return n_pairs

    return Side(label, run, warmup=lambda: step(batches[0]))


def grouped_side(ctx: Context, step: Callable[[Batch], None], batches: list[Batch], n_pairs: int) -> Side:
    """A: length-grouped batches."""
    return training_side(f"length-grouped batches of {ctx.preset.rm_batch} pairs", step, batches, n_pairs)


def random_side(ctx: Context, step: Callable[[Batch], None], batches: list[Batch], n_pairs: int) -> Side:
    """B: random batches."""
    return training_side(f"random batches of {ctx.preset.rm_batch} pairs", step, batches, n_pairs)


# --------------------------------------------------------------------------------------------
# The section


def run(ctx: Context) -> list[dict[str, Any]]:
    p = ctx.preset
    B = p.rm_batch
    all_pairs = pairs(ctx)
    # Padding share over every pair of the sample, with Trainer's own megabatching (50 x batch).
    all_len = max_lengths(all_pairs)
    full = {
        "random": padding_share(all_pairs, random_order(all_len, 0), B),
        "grouped": padding_share(all_pairs, grouped_order(all_len, B, 0), B),
    }

    # Timed: the same rm_pairs pairs in both orders. The subset is smaller than one of Trainer's
    # megabatches, so it is grouped as one megabatch.
    subset = random.Random(1).sample(all_pairs, min(p.rm_pairs, len(all_pairs)))
    sub_len = max_lengths(subset)
    mega = max(1, min(50, math.ceil(len(subset) / B)))
    orders = {"random": random_order(sub_len, 1), "grouped": grouped_order(sub_len, B, 1, mega)}
    timed = {k: batches(ctx, subset, o) for k, o in orders.items()}
    model = build_model("seqcls", p, ctx.tokenizer, ctx.device, ctx.dtype)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    step = train_step(model, optimizer, ctx.device)
    grouped = grouped_side(ctx, step, timed["grouped"], len(subset))
    rand = random_side(ctx, step, timed["random"], len(subset))
    interleave(ctx.clock, [grouped, rand], p.repeats)
    ctx.rm_model = model
    del optimizer

    details = {
        "pairs_timed": len(subset),
        "pairs_in_sample": len(all_pairs),
        "pair_max_length": length_summary(sub_len),
        "padding_share_timed": {k: round(padding_share(subset, o, B), 4) for k, o in orders.items()},
        "padding_share_all_pairs": {k: round(v, 4) for k, v in full.items()},
        "note": "grouped order = transformers get_length_grouped_indices (Trainer train_sampling_strategy="
        "'group_by_length'); RewardTrainer needs a `length` column for it (its rows have no input_ids)",
    }
    return [
        compare(
            "rm_grouped_pairs_per_s",
            "RM training pairs/s: length-grouped vs random order",
            grouped,
            rand,
            "pairs/s",
            None,
            details,
        ),
        ratio_entry(
            "rm_padding_share",
            "RM share of padding tokens: random order vs length-grouped (all sample pairs)",
            ("random order", full["random"]),
            ("length-grouped", full["grouped"]),
            "share",
        ),
    ]
