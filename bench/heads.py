"""Multi-head RM ensemble (``ensemble_kind=heads``): training and scoring pairs/s of E=5 heads vs one head.

Two reward models of the preset's shape from the same seed (the same backbone weights), one with one score head and
one with E=5 (``num_labels=5``, ``reward_heads=5``), on the same pairs in the same length-grouped padded batches:

* training: one optimizer step per batch; one head with RewardTrainer's Bradley-Terry loss, E heads with
  :func:`hhrm.rm.heads.weighted_bt_loss` on each pair's Poisson(1) bootstrap weights
  (:class:`hhrm.rm.heads.BootstrapCollator`, built into the batches as hhrm's RewardTrainer builds them);
* scoring: :class:`hhrm.reward.scoring.RewardScorer` of both texts of every pair: ``score_ids`` (one head) vs
  ``score_ids_heads`` (all E rewards per text from the same forward).

The goal is ``>= 0.9``: E heads cost one ``hidden x E`` matmul per text more than one head, so an ensemble of E
costs about one RM, where E seeds cost E.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
import torch.nn.functional as F
from transformers import LlamaForSequenceClassification
from trl.trainer.reward_trainer import DataCollatorForPreference

from hhrm.reward.scoring import RewardScorer
from hhrm.rm import heads as rm_heads

from . import rm
from .common import Context, Side, compare, interleave, length_summary, model_config

HEADS = 5
GOAL = 0.9


def reward_model(ctx: Context, heads: int, seed: int = 0):
    """The preset's RM with ``heads`` score heads; the same seed gives the same backbone whatever ``heads``."""
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(model_config(ctx.preset, ctx.tokenizer, num_labels=heads))
    if heads > 1:
        model.config.reward_heads = heads
    return model.to(device=ctx.device, dtype=ctx.dtype)


def padded_batches(ctx: Context, subset: list, order: list[int], heads: int) -> list[dict[str, Any]]:
    """TRL's padded batches of ``rm_batch`` pairs; with E heads also each pair's bootstrap weights."""
    collate = DataCollatorForPreference(pad_token_id=ctx.tokenizer.pad_token_id)
    if heads > 1:
        collate = rm_heads.BootstrapCollator(collate, seed=0, heads=heads)
    B = ctx.preset.rm_batch
    return [
        collate([{"chosen_ids": subset[i][0], "rejected_ids": subset[i][1]} for i in order[s : s + B]])
        for s in range(0, len(order), B)
    ]


def train_side(ctx: Context, model, batches: list[dict[str, Any]], n_pairs: int, label: str) -> Side:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(b: dict[str, Any]) -> None:
        ids, mask = b["input_ids"].to(ctx.device), b["attention_mask"].to(ctx.device)
        rewards = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        if rm_heads.WEIGHTS in b:
            loss = rm_heads.weighted_bt_loss(rewards, b[rm_heads.WEIGHTS].to(ctx.device))
        else:
            chosen, rejected = torch.chunk(rewards[:, 0], chunks=2)
            loss = -F.logsigmoid(chosen - rejected).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def run() -> float:
        for b in batches:
            step(b)
        return n_pairs

    return Side(label, run, warmup=lambda: step(batches[0]))


def score_side(ctx: Context, model, ids: list[list[int]], label: str, results: dict[str, Any]) -> Side:
    scorer = RewardScorer(model, ctx.tokenizer, batch_size=ctx.preset.score_batch)
    score = scorer.score_ids_heads if scorer.heads > 1 else scorer.score_ids

    def run() -> float:
        results[scorer.heads] = score(ids)
        return len(ids) / 2  # pairs: both texts of each

    return Side(label, run, warmup=lambda: score(ids[:4]))


def run(ctx: Context) -> list[dict[str, Any]]:
    p = ctx.preset
    all_pairs = rm.pairs(ctx)
    subset = random.Random(1).sample(all_pairs, min(p.rm_pairs, len(all_pairs)))
    lengths = rm.max_lengths(subset)
    order = rm.grouped_order(lengths, p.rm_batch, 1, max(1, min(50, math.ceil(len(subset) / p.rm_batch))))
    models = {h: reward_model(ctx, h) for h in (1, HEADS)}
    train = {
        h: train_side(ctx, m, padded_batches(ctx, subset, order, h), len(subset), f"{h} score head(s), grouped")
        for h, m in models.items()
    }
    for m in models.values():
        m.train()
    interleave(ctx.clock, [train[HEADS], train[1]], p.repeats)
    for m in models.values():
        m.eval()
    ids = [c for c, _ in subset] + [r for _, r in subset]
    results: dict[int, Any] = {}
    score = {h: score_side(ctx, m, ids, f"RewardScorer, {h} score head(s)", results) for h, m in models.items()}
    interleave(ctx.clock, [score[HEADS], score[1]], p.repeats)
    details = {
        "heads": HEADS,
        "pairs_timed": len(subset),
        "pair_max_length": length_summary(lengths),
        "rewards_per_text": {h: len(results[h][0]) if h > 1 else 1 for h in results},
        "note": "the same backbone weights and batches; E heads add one hidden x E matmul per text and the "
        "bootstrap-weighted loss; an E-seed ensemble would cost E x the one-head figure",
    }
    what = f"RM {{}} pairs/s: {HEADS} bootstrapped score heads (one backbone) vs one head"
    return [
        compare("rm_heads_train_pairs_per_s", what.format("training"), train[HEADS], train[1], "pairs/s", GOAL,
                details),
        compare("rm_heads_score_pairs_per_s", what.format("scoring"), score[HEADS], score[1], "pairs/s", GOAL),
    ]  # fmt: skip
