"""RAFT generation: generated (non-pad) tokens/s of sampling K responses per prompt.

A = :func:`hhrm.generation.generate_responses` with many prompts x K per call, B = ``model.generate`` on one
prompt with ``num_return_sequences=K`` per call (the original RAFT aligner), C = one ``generate`` call per
sequence (prompts of median length). Same model, same prompts, same sampling settings.

Then, without stop strings (continuous batching has none), three ways to run the same batched work:
transformers' continuous batching (``model.generate_batch``: paged KV cache, K forked per prompt, prefix
blocks shared), hhrm's ``generate_responses`` (static cache, one prefill per prompt), and plain
``generate(num_return_sequences=K)`` on the same left-padded batches (dynamic cache, K prefills per prompt).
"""

from __future__ import annotations

import gc
import math
import random
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from hhrm.generation import SamplingArguments, generate_responses, left_padded, length_sorted_batches

from .common import Context, Side, build_model, compare, interleave, length_summary


class TokenCounter:
    """Wraps ``model.generate`` to count generated (non-pad) tokens, whatever the caller."""

    def __init__(self, model, pad_id: int):
        self.model, self.pad_id, self.tokens, self.calls = model, pad_id, 0, 0
        self.original = model.generate

    def __enter__(self) -> TokenCounter:
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


# --------------------------------------------------------------------------------------------
# The work: prompts


def prompt_length(ctx: Context, prompt: str) -> int:
    return len(ctx.tokenizer(prompt, add_special_tokens=False)["input_ids"])


def sample_prompts(ctx: Context) -> list[str]:
    """``gen_prompts`` distinct prompts of at most ``gen_prompt_max`` tokens."""
    p = ctx.preset
    ids = ctx.tokenizer(ctx.data.prompts, add_special_tokens=False)["input_ids"]
    candidates = sorted({pr for pr, i in zip(ctx.data.prompts, ids) if len(i) <= p.gen_prompt_max})
    return random.Random(2).sample(candidates, min(p.gen_prompts, len(candidates)))


def median_prompts(ctx: Context, prompts: list[str]) -> list[str]:
    """``gen_seq_prompts`` prompts of median length (for the slowest side)."""
    n = ctx.preset.gen_seq_prompts
    by_length = sorted(prompts, key=lambda q: prompt_length(ctx, q))
    mid = len(by_length) // 2
    return by_length[max(0, mid - n // 2) :][:n]


# --------------------------------------------------------------------------------------------
# The sides


def counted(model, pad_id: int, fn: Callable[[], Any]) -> Callable[[], float]:
    """``fn`` as a side's run: seeded, returning the tokens its ``generate`` calls produced."""

    def run() -> float:
        torch.manual_seed(0)
        with TokenCounter(model, pad_id) as counter:
            fn()
        return counter.tokens

    return run


def plain_generate(ctx: Context, model, sampling: SamplingArguments, prompt: str, n: int) -> None:
    """The original RAFT aligner: ``model.generate`` on one prompt with ``num_return_sequences=n``."""
    tok = ctx.tokenizer
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    model.generate(
        input_ids=enc["input_ids"].to(ctx.device),
        attention_mask=enc["attention_mask"].to(ctx.device),
        generation_config=sampling.generation_config(tok, n),
        tokenizer=tok,
    )


def batched_side(ctx: Context, model, sampling: SamplingArguments, prompts: list[str], note: str = "") -> Side:
    """A: hhrm's ``generate_responses``, ``gen_batch`` prompts x K per call."""
    p, tok = ctx.preset, ctx.tokenizer
    label = f"hhrm generate_responses, {p.gen_batch} prompts x K={p.gen_k} per call{note}"

    def call() -> None:
        generate_responses(model, tok, prompts, p.gen_k, sampling, batch_size=p.gen_batch)

    return Side(label, counted(model, tok.pad_token_id, call))


def per_prompt_side(ctx: Context, model, sampling: SamplingArguments, prompts: list[str]) -> Side:
    """B: one prompt x K per ``generate`` call."""
    K = ctx.preset.gen_k
    return Side(
        f"generate(1 prompt, num_return_sequences={K}) per call",
        counted(
            model, ctx.tokenizer.pad_token_id, lambda: [plain_generate(ctx, model, sampling, q, K) for q in prompts]
        ),
        warmup=lambda: plain_generate(ctx, model, sampling, prompts[0], K),
    )


def one_sequence_side(
    ctx: Context, model, sampling: SamplingArguments, prompts: list[str], seq_prompts: list[str]
) -> Side:
    """C: one sequence per ``generate`` call, K calls for each of ``seq_prompts``."""
    K = ctx.preset.gen_k
    return Side(
        "generate(1 prompt, 1 sequence) per call",
        counted(
            model,
            ctx.tokenizer.pad_token_id,
            lambda: [plain_generate(ctx, model, sampling, q, 1) for q in seq_prompts for _ in range(K)],
        ),
        warmup=lambda: plain_generate(ctx, model, sampling, prompts[0], 1),
    )


def plain_batched_side(ctx: Context, model, sampling: SamplingArguments, prompts: list[str]) -> Side:
    """Plain ``generate(num_return_sequences=K)`` on hhrm's batches (length-sorted, left-padded, ``gen_batch``
    prompts): a dynamic cache, and the prompt repeated K times before the prefill."""
    p, tok = ctx.preset, ctx.tokenizer
    ids = tok(prompts, add_special_tokens=False)["input_ids"]
    config = sampling.generation_config(tok, p.gen_k)

    def call() -> None:
        for batch in length_sorted_batches(ids, p.gen_batch):
            input_ids, attention = left_padded([ids[i] for i in batch], tok.pad_token_id)
            model.generate(
                input_ids=input_ids.to(ctx.device), attention_mask=attention.to(ctx.device), generation_config=config
            )

    label = f"generate(num_return_sequences={p.gen_k}), same {p.gen_batch}-prompt padded batches, no stop string"
    return Side(label, counted(model, tok.pad_token_id, call))


def continuous_config(ids: list[list[int]], k: int, new_tokens: int, page: int = 64):
    """Continuous batching's cache sized to the work (left unset, its size comes from free memory: on a CPU,
    seconds of zero-filling per call), 64-token pages (256-token pages ran at half the speed here), and no
    async double-buffering (no second stream on a CPU to overlap with; 1.5x faster off, measured)."""
    from transformers import ContinuousBatchingConfig

    blocks = len(ids) * k * math.ceil((max(map(len, ids)) + new_tokens) / page)
    return ContinuousBatchingConfig(page_size=page, num_blocks=blocks, use_async_batching=False, seed=0)


def continuous_side(ctx: Context, model, sampling: SamplingArguments, prompts: list[str]) -> Side:
    """transformers' continuous batching, ``model.generate_batch`` over all the prompts at once."""
    p, tok = ctx.preset, ctx.tokenizer
    ids = tok(prompts, add_special_tokens=False)["input_ids"]
    config = sampling.generation_config(tok, p.gen_k)
    cb_config = continuous_config(ids, p.gen_k, p.gen_new_tokens)

    def run() -> float:
        torch.manual_seed(0)
        # warmup: CUDA-graph capture, ~1 s of dummy batches per call on a CPU for nothing
        out = model.generate_batch(
            inputs=ids, generation_config=config, continuous_batching_config=cb_config, warmup=ctx.device.type != "cpu"
        )
        finished = [o for o in out.values() if o.error is None]
        if len(finished) != len(ids) * p.gen_k:  # generate_batch logs a failure and returns what it has
            raise RuntimeError(f"generate_batch returned {len(finished)} of {len(ids) * p.gen_k} sequences")
        return sum(len(o.generated_tokens) for o in finished)

    label = f"generate_batch (continuous batching, sdpa, paged cache), {len(ids)} prompts x K={p.gen_k}"
    return Side(label, run)


# --------------------------------------------------------------------------------------------
# The section


def run(ctx: Context) -> list[dict[str, Any]]:
    p = ctx.preset
    prompts = sample_prompts(ctx)
    sampling = SamplingArguments(max_new_tokens=p.gen_new_tokens)
    model = build_model("causal", p, ctx.tokenizer, ctx.device, ctx.dtype, seed=1).eval()
    seq_prompts = median_prompts(ctx, prompts)
    batched = batched_side(ctx, model, sampling, prompts)
    per_prompt = per_prompt_side(ctx, model, sampling, prompts)
    one_seq = one_sequence_side(ctx, model, sampling, prompts, seq_prompts)
    interleave(ctx.clock, [batched, per_prompt, one_seq], p.repeats)
    no_stop = SamplingArguments(max_new_tokens=p.gen_new_tokens, stop_at_turn_marker=False)
    continuous = continuous_side(ctx, model, no_stop, prompts)
    static = batched_side(ctx, model, no_stop, prompts, ", no stop string")
    plain = plain_batched_side(ctx, model, no_stop, prompts)
    interleave(ctx.clock, [continuous, static, plain], p.repeats)
    del model
    gc.collect()
    details = {
        "prompts": len(prompts),
        "one_sequence_prompts": len(seq_prompts),
        "k": p.gen_k,
        "max_new_tokens": p.gen_new_tokens,
        "prompt_length": length_summary([prompt_length(ctx, q) for q in prompts]),
        "sampling": asdict(sampling),
    }
    return [
        compare(
            "gen_batched_vs_prompt_x_k",
            "RAFT generated tokens/s: many prompts x K per call vs 1 prompt x K",
            batched,
            per_prompt,
            "tokens/s",
            5.0,
            details,
        ),
        compare(
            "gen_batched_vs_one_sequence",
            "RAFT generated tokens/s: many prompts x K per call vs 1 sequence",
            batched,
            one_seq,
            "tokens/s",
        ),
        *continuous_entries(continuous, static, plain, details | {"sampling": asdict(no_stop)}),
    ]


def continuous_entries(continuous: Side, static: Side, plain: Side, details: dict[str, Any]) -> list[dict[str, Any]]:
    what = "RAFT generated tokens/s, no stop string: "
    return [
        compare(
            "gen_continuous_vs_static", what + "generate_batch vs hhrm", continuous, static, "tokens/s", None, details
        ),
        compare(
            "gen_continuous_vs_plain_batched", what + "generate_batch vs plain generate", continuous, plain, "tokens/s"
        ),
        compare(
            "gen_static_vs_plain_batched", what + "hhrm vs plain generate, same batches", static, plain, "tokens/s"
        ),
    ]
