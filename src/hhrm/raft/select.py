"""RAFT's pure parts: junk filters, the kept-set selection rules, DPO's pairs, and text diversity statistics.

No models here, so every rule is testable on hand-made rewards. Conventions:

* ``rewards[i][j]`` is the reward of sample ``j`` of prompt ``i``; ``reasons[i][j]`` is ``None`` for a
  sample that passed the filters, else the name of the first filter that rejected it. A filtered
  sample is never kept, whatever its reward.
* Ties are broken by position (lower prompt index, then lower sample index wins), so a selection is a
  pure function of its inputs: a resumed run, another process count, or a re-run keep the same set.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

SELECTIONS = ("best_of_k", "top_fraction")
UPDATES = ("sft", "dpo")
FILTER_REASONS = ("empty", "too_short", "repetitive", "pattern")
# Why a prompt gives no DPO pair: fewer than two samples passed the filters (all junk, or K=1), or its best and
# worst rewards are within pair_margin (all K tied, say).
PAIR_SKIP_REASONS = ("too_few_valid", "within_margin")


@dataclass
class JunkFilter:
    """Rejects samples that are not worth imitating, with a reason per rejection.

    ``min_tokens`` counts policy tokens (the caller passes the count); ``max_repeat_fraction`` bounds
    the share of word 3-grams that repeat an earlier 3-gram of the same response (a looping sample
    like "the the the ..." scores near 1.0); ``patterns`` are regular expressions searched in the
    response (e.g. a refusal phrase you do not want reinforced).
    """

    min_tokens: int = 1
    max_repeat_fraction: float = 0.5
    repeat_ngram: int = 3
    patterns: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.min_tokens < 0:
            raise ValueError(f"filter_min_tokens={self.min_tokens}: must be >= 0")
        if not 0.0 < self.max_repeat_fraction <= 1.0:
            raise ValueError(f"filter_max_repeat_fraction={self.max_repeat_fraction}: must be in (0, 1]")
        if self.repeat_ngram < 1:
            raise ValueError(f"repeat_ngram={self.repeat_ngram}: must be >= 1")
        try:
            self._compiled = [re.compile(p) for p in self.patterns]
        except re.error as e:
            raise ValueError(f"filter_patterns: bad regular expression: {e}") from None

    def reason(self, response: str, num_tokens: int | None = None) -> str | None:
        """The first rule ``response`` breaks (in :data:`FILTER_REASONS` order), or ``None`` if it passes."""
        if not response.strip():
            return "empty"
        if num_tokens is not None and num_tokens < self.min_tokens:
            return "too_short"
        # max_repeat_fraction == 1.0 turns the check off: a fraction can never exceed it.
        if self.max_repeat_fraction < 1.0 and repeat_fraction(response, self.repeat_ngram) > self.max_repeat_fraction:
            return "repetitive"
        if any(p.search(response) for p in self._compiled):
            return "pattern"
        return None


def repeat_fraction(text: str, n: int = 3) -> float:
    """Share of word n-grams that already occurred earlier in ``text`` (0.0 for fewer than 2 n-grams)."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def filter_counts(reasons: list[list[str | None]]) -> dict[str, int]:
    """``{reason: count}`` for every filter reason (zeros included) plus ``passed``."""
    counts = Counter(r for row in reasons for r in row)
    out = {reason: counts.get(reason, 0) for reason in FILTER_REASONS}
    out["passed"] = counts.get(None, 0)
    return out


def _check_shapes(rewards: list[list[float]], reasons: list[list[str | None]]) -> None:
    if len(rewards) != len(reasons) or any(len(a) != len(b) for a, b in zip(rewards, reasons)):
        raise ValueError("rewards and filter reasons must have the same [prompt][sample] shape")


def regularised_scores(
    rewards: list[list[float]], logprobs: list[list[float]] | None, kl_beta: float
) -> list[list[float]]:
    """Regularised best-of-K's score (Jinnai et al., 2024, RBoN-KL): ``r_j + kl_beta * log pi(y_j | x)``.

    RBoN-KL picks ``argmax_j r_j - kl_beta * KL(delta_{y_j} || pi(. | x))``, and the KL of the one-point
    distribution on ``y_j`` to the sampling policy is ``-log pi(y_j | x)``. ``logprobs[i][j]`` is that sequence
    log-probability: the sum over the response's tokens (its EOS included when it ended by one), at the sampling
    temperature. The sum, not a per-token mean: it is the KL the rule is defined with, and a mean would stop
    penalising a long unlikely response more than a short one. ``kl_beta = 0`` gives the rewards unchanged.
    """
    if kl_beta < 0:
        raise ValueError(f"selection_kl_beta={kl_beta}: must be >= 0 (0: plain reward argmax)")
    if kl_beta == 0:
        return [list(row) for row in rewards]
    if logprobs is None or any(row is None for row in logprobs):
        raise ValueError(
            f"selection_kl_beta={kl_beta}: the samples have no response_logprobs (written by the generate stage "
            "when selection_kl_beta > 0): generate them again in a new output_dir"
        )
    if len(logprobs) != len(rewards) or any(len(a) != len(b) for a, b in zip(rewards, logprobs)):
        raise ValueError("rewards and log-probs must have the same [prompt][sample] shape")
    return [[r + kl_beta * lp for r, lp in zip(row, lps)] for row, lps in zip(rewards, logprobs)]


def soft_pick(scores: list[float], valid: list[int], temperature: float, rng: np.random.Generator) -> int:
    """One of ``valid`` (sample indices) drawn with probability ``softmax(scores[j] / temperature)``."""
    top = max(scores[j] for j in valid)
    weights = np.array([math.exp((scores[j] - top) / temperature) for j in valid])  # shifted: never overflows
    return valid[int(rng.choice(len(valid), p=weights / weights.sum()))]


def select_best_of_k(
    rewards: list[list[float]], reasons: list[list[str | None]], temperature: float = 0.0, seed: int = 0
) -> list[tuple[int, int]]:
    """The best unfiltered sample of each prompt, as ``(prompt, sample)``; prompts with none are skipped.

    ``rewards`` may be any per-sample score (:func:`regularised_scores`'s). Ties go to the lowest sample index.
    NaN rewards (a broken score) are never kept. ``temperature > 0``: soft best-of-K, the kept sample is drawn
    among the unfiltered ones with probability ``softmax(score / temperature)``, from a generator seeded by
    ``(seed, prompt position)``: the same inputs keep the same set (a resumed run too); 0 is the argmax.
    """
    if temperature < 0:
        raise ValueError(f"selection_temperature={temperature}: must be >= 0 (0: argmax)")
    _check_shapes(rewards, reasons)
    kept = []
    for i, (row, why) in enumerate(zip(rewards, reasons)):
        valid = [j for j, (r, reason) in enumerate(zip(row, why)) if reason is None and not math.isnan(r)]
        if not valid:
            continue
        if temperature > 0:
            kept.append((i, soft_pick(row, valid, temperature, np.random.default_rng([seed % 2**63, i]))))
        else:
            kept.append((i, max(valid, key=lambda j: (row[j], -j))))
    return kept


def select_top_fraction(
    rewards: list[list[float]], reasons: list[list[str | None]], fraction: float
) -> list[tuple[int, int]]:
    """The global top ``fraction`` of all samples of the batch (RAFT's batch-level ranking).

    Keeps ``ceil(fraction * total samples)`` of the best unfiltered samples (fewer when not enough
    pass the filters), so ``fraction = 1/K`` keeps as many samples as best-of-K does; a prompt may
    contribute several samples or none. Returned in (prompt, sample) order; ties go to the earlier position.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"top_fraction={fraction}: must be in (0, 1]")
    _check_shapes(rewards, reasons)
    total = sum(len(row) for row in rewards)
    candidates = [
        (i, j)
        for i, (row, why) in enumerate(zip(rewards, reasons))
        for j, (r, reason) in enumerate(zip(row, why))
        if reason is None and not math.isnan(r)
    ]
    # sorted() is stable: equal rewards keep their (prompt, sample) order.
    ranked = sorted(candidates, key=lambda ij: -rewards[ij[0]][ij[1]])
    return sorted(ranked[: math.ceil(fraction * total)])


def select(
    rewards: list[list[float]],
    reasons: list[list[str | None]],
    strategy: str,
    fraction: float = 0.125,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[tuple[int, int]]:
    """Dispatch on ``strategy`` (one of :data:`SELECTIONS`); ``temperature``: best_of_k only (see
    :func:`check_selection_rule`)."""
    check_selection_rule(strategy, "sft", 0.0, temperature)
    if strategy == "best_of_k":
        return select_best_of_k(rewards, reasons, temperature, seed)
    if strategy == "top_fraction":
        return select_top_fraction(rewards, reasons, fraction)
    raise ValueError(f"selection={strategy!r}: expected one of {SELECTIONS}")


def check_selection_rule(selection: str, update: str, kl_beta: float, temperature: float) -> None:
    """Where the regularised and the soft rule apply. ``kl_beta``: best_of_k and top_fraction (a per-sample score,
    ranked per prompt or over the batch). ``temperature``: best_of_k only (top_fraction ranks the whole batch; a
    softmax draw there is another rule). Neither with update=dpo: DPO's loss already holds the policy to its
    reference through DPO's ``beta``, and its pair is the reward's best and worst, which pair_margin is about."""
    if kl_beta < 0:
        raise ValueError(f"selection_kl_beta={kl_beta}: must be >= 0 (0: plain reward argmax)")
    if temperature < 0:
        raise ValueError(f"selection_temperature={temperature}: must be >= 0 (0: argmax)")
    if update == "dpo" and (kl_beta or temperature):
        raise ValueError(
            f"selection_kl_beta={kl_beta} / selection_temperature={temperature} with update=dpo: they choose RAFT's "
            "kept sample (update=sft); DPO's pairs are the reward's best and worst (its beta regularises): set them 0"
        )
    if selection == "top_fraction" and temperature:
        raise ValueError(
            f"selection_temperature={temperature} with selection=top_fraction: soft selection draws one sample per "
            "prompt; use selection=best_of_k, or selection_temperature 0 (selection_kl_beta applies to both)"
        )


def selection_rule(selection: str, update: str = "sft", kl_beta: float = 0.0, temperature: float = 0.0) -> str:
    """The kept-set rule in words (metrics and model card)."""
    if update == "dpo":
        return "best and worst reward of the K samples (DPO pair)"
    score = f"reward + {kl_beta} * log pi(y|x) (regularised, RBoN-KL)" if kl_beta else "reward"
    if selection == "top_fraction":
        return f"global top fraction by {score}"
    if temperature:
        return f"one of K drawn with probability softmax(({score}) / {temperature}) (soft best-of-K)"
    return f"argmax of {score} over the K samples (best-of-K)"


def select_pairs(
    rewards: list[list[float]], reasons: list[list[str | None]], margin: float = 0.0
) -> tuple[list[tuple[int, int, int]], dict[str, int]]:
    """Per prompt, its best and its worst unfiltered sample as ``(prompt, chosen, rejected)``, and the skipped
    prompts counted by reason (:data:`PAIR_SKIP_REASONS`).

    A pair needs best - worst > ``margin`` (so tied rewards never make a pair). Both samples must pass the junk
    filters: a pair says which of two real answers the reward model prefers. Ties go to the lowest sample index.
    """
    if margin < 0:
        raise ValueError(f"pair_margin={margin}: must be >= 0")
    _check_shapes(rewards, reasons)
    pairs, skipped = [], dict.fromkeys(PAIR_SKIP_REASONS, 0)
    for i, (row, why) in enumerate(zip(rewards, reasons)):
        valid = [j for j, (r, reason) in enumerate(zip(row, why)) if reason is None and not math.isnan(r)]
        if len(valid) < 2:
            skipped["too_few_valid"] += 1
            continue
        best = max(valid, key=lambda j: (row[j], -j))
        worst = min(valid, key=lambda j: (row[j], j))
        if not row[best] - row[worst] > margin:
            skipped["within_margin"] += 1
            continue
        pairs.append((i, best, worst))
    return pairs, skipped


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n: unique word n-grams / all word n-grams over ``texts`` (0.0 when there are none)."""
    grams = [tuple(w[i : i + n]) for t in texts for w in [t.split()] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
