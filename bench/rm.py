"""RM: reward-model training pairs/s and padding share: padding-free rows, length-grouped batches, random order.

Four ways to train on the same pairs, interleaved in one run, Bradley-Terry loss, one optimizer step per batch:

* length-grouped padded batches (``transformers.trainer_pt_utils.get_length_grouped_indices``, what Trainer's
  ``train_sampling_strategy="group_by_length"`` uses, hhrm's default), chosen and rejected in one padded batch
  (TRL's ``DataCollatorForPreference``);
* the same pairs in random order, padded;
* padding-free (``RewardConfig.padding_free``): each batch as one packed row
  (:class:`hhrm.rm.trainer.PackedPreferenceCollator`, rewards read by :class:`hhrm.rm.trainer.PackedRewards`,
  the code hhrm's RewardTrainer runs) in random order, and in grouped order; the model's attention
  implementation (the bench's sdpa: a dense block-diagonal T x T mask per row).
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

from hhrm.rm import trainer as rm_trainer

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


def batches(ctx: Context, subset: list[Pair], order: list[int], packed: bool = False) -> list[Batch]:
    """Padded batches (TRL's collator) or packed rows (hhrm's padding-free collator) of ``rm_batch`` pairs."""
    collate = (
        rm_trainer.PackedPreferenceCollator()
        if packed
        else DataCollatorForPreference(pad_token_id=ctx.tokenizer.pad_token_id)
    )
    B = ctx.preset.rm_batch
    return [
        collate([{"chosen_ids": subset[i][0], "rejected_ids": subset[i][1]} for i in order[s : s + B]])
        for s in range(0, len(order), B)
    ]


# --------------------------------------------------------------------------------------------
# The sides


def padded_rewards(model, device: torch.device) -> Callable[[Batch], torch.Tensor]:
    """Rewards of a padded batch: the model's pooled logits (chosen rows first)."""

    def rewards(b: Batch) -> torch.Tensor:
        return model(
            input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device), use_cache=False
        ).logits[:, 0]

    return rewards


def packed_rewards(model, device: torch.device) -> Callable[[Batch], torch.Tensor]:
    """Rewards of a packed row as hhrm's RewardTrainer reads them: the score head at each text's last token."""
    head = rm_trainer.score_head(model)

    def rewards(b: Batch) -> torch.Tensor:
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
        ends = inputs.pop(rm_trainer.SEQUENCE_ENDS)
        return rm_trainer.PackedRewards(model, head, ends)(use_cache=False, **inputs).logits[:, 0]

    return rewards


def train_step(rewards_of: Callable[[Batch], torch.Tensor], optimizer) -> Callable[[Batch], None]:
    """One optimizer step with RewardTrainer's loss (Bradley-Terry, no margin): chosen rewards first."""

    def step(b: Batch) -> None:
        rewards = rewards_of(b)
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


def sides(ctx: Context, model, subset: list[Pair], orders: dict[str, list[int]]) -> dict[str, Side]:
    """Padded (grouped, random order) and padding-free (random, grouped order) sides, one model and optimizer."""
    B, n = ctx.preset.rm_batch, len(subset)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    padded = train_step(padded_rewards(model, ctx.device), optimizer)
    packed = train_step(packed_rewards(model, ctx.device), optimizer)
    made = {}
    for name, step, order, label in (
        ("grouped", padded, "grouped", f"length-grouped padded batches of {B} pairs"),
        ("random", padded, "random", f"random padded batches of {B} pairs"),
        ("padding_free", packed, "random", f"padding-free rows of {B} pairs, random order"),
        ("padding_free_grouped", packed, "grouped", f"padding-free rows of {B} pairs, grouped order"),
    ):
        made[name] = training_side(label, step, batches(ctx, subset, orders[order], packed=step is packed), n)
    return made


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

    # Timed: the same rm_pairs pairs in each way. The subset is smaller than one of Trainer's
    # megabatches, so it is grouped as one megabatch.
    subset = random.Random(1).sample(all_pairs, min(p.rm_pairs, len(all_pairs)))
    sub_len = max_lengths(subset)
    mega = max(1, min(50, math.ceil(len(subset) / B)))
    orders = {"random": random_order(sub_len, 1), "grouped": grouped_order(sub_len, B, 1, mega)}
    model = build_model("seqcls", p, ctx.tokenizer, ctx.device, ctx.dtype)
    model.train()
    side = sides(ctx, model, subset, orders)
    interleave(ctx.clock, list(side.values()), p.repeats)
    ctx.rm_model = model

    details = {
        "pairs_timed": len(subset),
        "pairs_in_sample": len(all_pairs),
        "pair_max_length": length_summary(sub_len),
        "padding_share_timed": {k: round(padding_share(subset, o, B), 4) for k, o in orders.items()},
        "padding_share_all_pairs": {k: round(v, 4) for k, v in full.items()},
        "packed_row_tokens": {k: length_summary(row_tokens(subset, o, B)) for k, o in orders.items()},
        "attn_implementation": model.config._attn_implementation,
        "note": "grouped order = transformers get_length_grouped_indices (Trainer train_sampling_strategy="
        "'group_by_length'), hhrm's RewardConfig default (hhrm.rm.trainer adds the `length` column RewardTrainer "
        "rows lack). Padding-free rows attend through a dense block-diagonal T x T mask under sdpa/eager.",
    }
    return entries(side, full, details)


def row_tokens(subset: list[Pair], order: list[int], batch: int) -> list[int]:
    """Tokens of each packed row (both texts of every pair of a batch)."""
    rows = [order[s : s + batch] for s in range(0, len(order), batch)]
    return [sum(len(subset[i][0]) + len(subset[i][1]) for i in row) for row in rows]


def entries(side: dict[str, Side], full: dict[str, float], details: dict[str, Any]) -> list[dict[str, Any]]:
    unit = "pairs/s"
    return [
        compare(
            "rm_grouped_pairs_per_s",
            "RM training pairs/s: length-grouped vs random order (padded)",
            side["grouped"],
            side["random"],
            unit,
            None,
            details,
        ),
        compare(
            "rm_padding_free_pairs_per_s",
            "RM training pairs/s: padding-free rows vs padded batches, both in random order",
            side["padding_free"],
            side["random"],
            unit,
        ),
        compare(
            "rm_padding_free_vs_grouped",
            "RM training pairs/s: padding-free rows (random order) vs length-grouped padded batches (hhrm's default)",
            side["padding_free"],
            side["grouped"],
            unit,
        ),
        compare(
            "rm_padding_free_grouped_order",
            "RM training pairs/s, padding-free rows: grouped vs random order",
            side["padding_free_grouped"],
            side["padding_free"],
            unit,
        ),
        ratio_entry(
            "rm_padding_share",
            "RM share of padding tokens: random order vs length-grouped (all sample pairs)",
            ("random order", full["random"]),
            ("length-grouped", full["grouped"]),
            "share",
        ),
    ]
