"""Log-probabilities of given responses under a causal LM, and the sampled-KL estimate built on them.

Texts are tokenized as :mod:`hhrm.generation` tokenizes them to generate: the prompt alone, without special
tokens, then the response's tokens after it (``generate_responses`` cuts the response from the prompt by token
position; its decoded text, re-tokenized, gives back those tokens in the usual case of a BPE whose merges do not
cross the prompt/response boundary). Logits are divided by the sampling temperature, so a log-probability is the
one of the distribution the response was actually sampled from (top-p / top-k truncation is not modelled).

KL(policy || reference) is estimated from responses sampled from the policy: the mean over prompts of
``log policy(y | x) - log reference(y | x)`` summed over the response tokens, an unbiased Monte Carlo estimate
of the sequence-level KL (one sample may be negative; its expectation is not).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from hhrm.generation import length_sorted_batches, prompt_ids


def encode(
    tokenizer, prompts: Sequence[str], responses: Sequence[str], eos: bool | Sequence[bool] = False
) -> list[tuple[list[int], int]]:
    """Per pair, ``(prompt ids + response ids [+ EOS], prompt length)``, as generation tokenizes a prompt.

    ``eos``: append the tokenizer's EOS to the response (one flag for all, or one per response): a response that
    ended by EOS was sampled with it, and that token's probability is part of the response's.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses: one response per prompt")
    flags = [eos] * len(prompts) if isinstance(eos, bool) else list(eos)
    if len(flags) != len(prompts):
        raise ValueError(f"eos: {len(flags)} flags for {len(prompts)} responses")
    if any(flags) and tokenizer.eos_token_id is None:
        raise ValueError("eos=True but the tokenizer has no eos_token")
    p_ids = prompt_ids(tokenizer, list(prompts))  # as generation tokenizes a prompt (LLaMA: BOS first)
    r_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"] if responses else []
    return [(p + r + ([tokenizer.eos_token_id] if e else []), len(p)) for p, r, e in zip(p_ids, r_ids, flags)]


@torch.no_grad()
def sequence_logprobs(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    temperature: float = 1.0,
    batch_size: int = 16,
    eos: bool | Sequence[bool] = False,
) -> list[float]:
    """``sum_t log p(y_t | x, y_<t)`` over each response's tokens, with the model's logits divided by ``temperature``.

    Right-padded, length-sorted batches on the model's device; the result is in the input order.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0 (the sampling temperature the responses came from)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    encoded = encode(tokenizer, prompts, responses, eos)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [0.0] * len(encoded)
    for batch in length_sorted_batches([ids for ids, _ in encoded], batch_size):
        rows = [encoded[i] for i in batch]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.zeros((len(rows), width), dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        scored = torch.zeros((len(rows), width), dtype=torch.bool)  # which positions are response tokens
        for j, (ids, start) in enumerate(rows):
            input_ids[j, : len(ids)] = torch.tensor(ids)
            attention[j, : len(ids)] = 1
            scored[j, start : len(ids)] = True
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)  # position t predicts token t + 1
        token_logp = logp.gather(-1, input_ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
        sums = (token_logp * scored[:, 1:].to(device)).sum(-1)
        for j, i in enumerate(batch):
            out[i] = float(sums[j])
    if was_training:
        model.train()
    return out


def kl_estimate(policy_logprobs: Sequence[float], reference_logprobs: Sequence[float]) -> dict[str, Any]:
    """KL(policy || reference) from responses sampled from the policy: mean log-ratio, its standard error, count."""
    if len(policy_logprobs) != len(reference_logprobs):
        raise ValueError(f"{len(policy_logprobs)} policy log-probs but {len(reference_logprobs)} reference ones")
    ratios = [p - r for p, r in zip(policy_logprobs, reference_logprobs)]
    n = len(ratios)
    if not n:
        return {"kl": float("nan"), "kl_se": None, "samples": 0}
    mean = sum(ratios) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in ratios) / (n - 1) / n) if n > 1 else None
    return {"kl": mean, "kl_se": se, "samples": n}
