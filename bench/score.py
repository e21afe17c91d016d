"""Reward scoring: responses/s on the same prompt+response texts and the same reward model.

A = :class:`hhrm.reward.scoring.RewardScorer` (length-sorted batches), B = the card's
``pipeline("sentiment-analysis", ..., batch_size=1)`` in its transformers 5 form, EOS appended.
``max_abs_reward_diff`` checks that both compute the same rewards.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from transformers import pipeline

from hhrm.reward.scoring import RewardScorer, with_eos

from .common import Context, Side, build_model, compare, interleave, length_summary


def sample_texts(ctx: Context) -> list[str]:
    """``score_texts`` prompt + chosen texts, drawn at random."""
    data = ctx.data
    idx = random.Random(3).sample(range(len(data.prompts)), min(ctx.preset.score_texts, len(data.prompts)))
    return [data.prompts[i] + data.chosen[i] for i in idx]


def scorer_side(ctx: Context, model, texts: list[str], results: dict[str, list[float]]) -> Side:
    """A: hhrm's RewardScorer; its rewards go to ``results["scorer"]``."""
    scorer = RewardScorer(model, ctx.tokenizer, batch_size=ctx.preset.score_batch)

    def run() -> float:
        results["scorer"] = scorer.score(texts)
        return len(texts)

    return Side(
        f"hhrm RewardScorer (length-sorted, batch {ctx.preset.score_batch})",
        run,
        warmup=lambda: scorer.score(texts[:4]),
    )


def pipeline_side(ctx: Context, model, texts: list[str], results: dict[str, list[float]]) -> Side:
    """B: the card's snippet in its transformers 5 form (``device="auto"`` and ``return_all_scores`` are gone),
    on the same in-memory model, ``texts`` with EOS appended (as RewardTrainer trained it); its rewards go to
    ``results["pipeline"]``."""
    pipe = pipeline("text-classification", model=model, tokenizer=ctx.tokenizer, device=ctx.device)
    kwargs = {"top_k": None, "function_to_apply": "none", "batch_size": 1}

    def run() -> float:
        with torch.no_grad():
            results["pipeline"] = [out[0]["score"] for out in pipe(texts, **kwargs)]
        return len(texts)

    return Side("pipeline('text-classification', batch_size=1)", run, warmup=lambda: pipe(texts[:4], **kwargs))


def run(ctx: Context) -> list[dict[str, Any]]:
    p, tok = ctx.preset, ctx.tokenizer
    model = ctx.rm_model if ctx.rm_model is not None else build_model("seqcls", p, tok, ctx.device, ctx.dtype)
    model.eval()
    texts = sample_texts(ctx)
    results: dict[str, list[float]] = {}
    a = scorer_side(ctx, model, texts, results)
    texts_eos = with_eos(tok, texts)
    b = pipeline_side(ctx, model, texts_eos, results)
    interleave(ctx.clock, [a, b], p.repeats)
    diff = max(abs(x - y) for x, y in zip(results["scorer"], results["pipeline"]))
    lens = [len(x) for x in tok(texts_eos, add_special_tokens=False)["input_ids"]]
    details = {"texts": len(texts), "text_length": length_summary(lens), "max_abs_reward_diff": float(f"{diff:.3g}")}
    ctx.rm_model = None
    return [
        compare(
            "score_scorer_vs_pipeline",
            "Reward scoring responses/s: RewardScorer vs card pipeline(batch_size=1)",
            a,
            b,
            "responses/s",
            5.0,
            details,
        )
    ]
