"""RAFT's regularised (RBoN-KL, Jinnai et al. 2024) and soft best-of-K: the model-side step and the kept set.

The generate stage, when ``selection_kl_beta > 0``, records each sample's ``response_logprobs``: log pi(y|x) under
the iteration's sampling policy (the one that drew it), summed over the response's tokens at the sampling
temperature, its EOS included when it stopped before max_new_tokens (it was drawn with it; top-p / top-k
truncation is not modelled). The select stage ranks by ``reward + selection_kl_beta * log pi`` and, with
``selection_temperature > 0``, draws the kept sample from the softmax of that score (:mod:`hhrm.raft.select`).
"""

from __future__ import annotations

from typing import Any

from hhrm import generation, logprobs
from hhrm.raft.config import RaftConfig
from hhrm.raft.select import regularised_scores, select
from hhrm.raft.update import kept_rows


def add_response_logprobs(policy, tokenizer, rows: list[dict[str, Any]], args: RaftConfig) -> None:
    """Set ``response_logprobs`` on each generate-stage row (``policy``: :class:`hhrm.raft.models.Policy`)."""
    prompts = [r["prompt"] for r in rows for _ in r["responses"]]
    responses = [x for r in rows for x in r["responses"]]
    eos = [n < args.max_new_tokens for r in rows for n in r["response_tokens"]]
    with generation._whole_model(policy.model, policy.accelerator) as model:  # ZeRO-3/FSDP: every weight present
        flat = logprobs.sequence_logprobs(
            model, tokenizer, prompts, responses, args.temperature, args.generation_batch_size, eos
        )
    for r in rows:
        r["response_logprobs"], flat = flat[: len(r["responses"])], flat[len(r["responses"]) :]


def kept_set(
    scored: list[dict[str, Any]],
    reasons: list[list[str | None]],
    rewards: list[list[float]],
    args: RaftConfig,
    iteration: int,
) -> list[dict[str, Any]]:
    """update=sft's kept rows under ``selection`` with the regularised score and the soft draw (seeded by the run's
    seed and the iteration: a resumed select stage keeps the same set). Rows carry ``selection_score`` when the
    score is not the reward."""
    beta = args.selection_kl_beta
    scores = regularised_scores(rewards, [r.get("response_logprobs") for r in scored] if beta else None, beta)
    seed = args.seed_for(iteration, 4, 0)
    picks = select(scores, reasons, args.selection, args.top_fraction, args.selection_temperature, seed)
    return kept_rows(scored, picks, rewards, scores if beta else None)
