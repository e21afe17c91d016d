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


def select_best_of_k(rewards: list[list[float]], reasons: list[list[str | None]]) -> list[tuple[int, int]]:
    """The best unfiltered sample of each prompt, as ``(prompt, sample)``; prompts with none are skipped.

    Ties go to the lowest sample index. NaN rewards (a broken score) are never kept.
    """
    _check_shapes(rewards, reasons)
    kept = []
    for i, (row, why) in enumerate(zip(rewards, reasons)):
        best = None
        for j, (r, reason) in enumerate(zip(row, why)):
            if reason is None and not math.isnan(r) and (best is None or r > row[best]):
                best = j
        if best is not None:
            kept.append((i, best))
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
    rewards: list[list[float]], reasons: list[list[str | None]], strategy: str, fraction: float = 0.125
) -> list[tuple[int, int]]:
    """Dispatch on ``strategy`` (one of :data:`SELECTIONS`)."""
    if strategy == "best_of_k":
        return select_best_of_k(rewards, reasons)
    if strategy == "top_fraction":
        return select_top_fraction(rewards, reasons, fraction)
    raise ValueError(f"selection={strategy!r}: expected one of {SELECTIONS}")


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
