"""Baselines a trained reward model must beat: length rules and a linear probe on a frozen model's features.

A reward model that only tracks response length, or only re-reads what the pretrained model already knows,
has not learned from the preference data. Three yardsticks, all on the same held-out pairs:

* ``longer wins`` / ``shorter wins``: pick the response with more (fewer) tokens; a tie counts as wrong,
  as :func:`hhrm.rm.evaluation.exact_accuracy` counts a tied reward;
* a logistic-regression probe: the frozen model's final hidden state at the token the reward head reads
  (the appended EOS of ``prompt + response + EOS``, :func:`hhrm.reward.scoring.encode`), a linear reward
  ``w . h`` fitted with Bradley-Terry on the training pairs (``h_chosen - h_rejected``, no intercept, L2
  picked by k-fold cross-validation). Its input is exactly what the untrained RM's linear head sees, so
  fine-tuning the whole model must beat it to show that training the backbone helped.

Intervals: :func:`wilson` for one accuracy; :func:`paired_difference` (a paired bootstrap over pairs) for
"model A beats B on the same pairs", which overlapping single intervals understate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from hhrm.reward import scoring

Z95 = 1.96
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # per-feature-scaled features: 100 is a near-constant probe


def wilson(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (stays inside [0, 1] and is sound for small n)."""
    if total == 0:
        return (float("nan"), float("nan"))
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


def accuracy(correct: np.ndarray) -> dict[str, float]:
    """An accuracy from per-pair right/wrong, with its 95% Wilson interval and count."""
    correct = np.asarray(correct, dtype=bool)
    low, high = wilson(int(correct.sum()), len(correct))
    return {
        "accuracy": float(correct.mean()) if len(correct) else float("nan"),
        "ci95": [low, high],
        "pairs": len(correct),
    }


def paired_difference(a: np.ndarray, b: np.ndarray, draws: int = 10_000, seed: int = 0) -> dict[str, float]:
    """Mean of ``a - b`` over the same items with a 95% paired-bootstrap interval (percentile method)."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(draws, len(diff)))].mean(axis=1)
    return {"mean": float(diff.mean()), "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]}


def length_rules(chosen_tokens: np.ndarray, rejected_tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Per pair, whether "longer wins" and "shorter wins" pick the chosen response (ties wrong)."""
    c, r = np.asarray(chosen_tokens), np.asarray(rejected_tokens)
    return {"longer_wins": c > r, "shorter_wins": c < r}


@torch.no_grad()
def eos_features(model, tokenizer, texts: Sequence[str], max_tokens_per_batch: int = 8192) -> np.ndarray:
    """Final hidden state at the last token of ``text + EOS`` (what a reward head reads), one row per text.

    ``model``: a causal LM or its backbone (``model.model`` is used when present); texts are batched by
    length with right padding, so every row's read position is its own last token.
    """
    backbone = getattr(model, "model", model)
    ids = scoring.encode(tokenizer, list(texts))
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = np.zeros((len(ids), backbone.config.hidden_size), dtype=np.float32)
    device = next(backbone.parameters()).device
    start = 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and len(ids[order[stop]]) * (stop - start + 1) <= max_tokens_per_batch:
            stop += 1
        batch = order[start:stop]
        width = len(ids[batch[-1]])
        input_ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
            mask[row, : len(ids[i])] = 1
        hidden = backbone(input_ids=input_ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        last = mask.sum(dim=1) - 1
        out[batch] = hidden[torch.arange(len(batch)), last.to(device)].float().cpu().numpy()
        start = stop
    return out


class LinearProbe:
    """A Bradley-Terry linear reward ``w . h`` on fixed features (no intercept: it cancels within a pair)."""

    def __init__(self, l2: float):
        self.l2 = l2
        self.scale: np.ndarray | None = None
        self.weight: np.ndarray | None = None

    def fit(self, chosen: np.ndarray, rejected: np.ndarray) -> LinearProbe:
        diff = np.asarray(chosen, dtype=np.float64) - np.asarray(rejected, dtype=np.float64)
        self.scale = diff.std(axis=0) + 1e-8  # per-feature scale, so one l2 suits every dimension
        x = torch.tensor(diff / self.scale, dtype=torch.float64)
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], lr=1.0, max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

        def loss_fn():
            opt.zero_grad()
            loss = torch.nn.functional.softplus(-(x @ w)).mean() + 0.5 * self.l2 * (w @ w)
            loss.backward()
            return loss

        opt.step(loss_fn)
        self.weight = w.detach().numpy()
        return self

    def reward(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, dtype=np.float64) / self.scale) @ self.weight


def pick_l2(chosen: np.ndarray, rejected: np.ndarray, folds: int = 5, grid: Sequence[float] = L2_GRID) -> dict:
    """The L2 strength with the best k-fold held-out accuracy on the training pairs (folds by position)."""
    n = len(chosen)
    fold_of = np.arange(n) % folds
    scores = {}
    for l2 in grid:
        right = 0
        for k in range(folds):
            train, held = fold_of != k, fold_of == k
            probe = LinearProbe(l2).fit(chosen[train], rejected[train])
            right += int((probe.reward(chosen[held]) > probe.reward(rejected[held])).sum())
        scores[l2] = right / n
    best = max(grid, key=lambda l2: (scores[l2], l2))  # ties: the stronger regularisation
    return {"l2": best, "cv_accuracy": {str(k): v for k, v in scores.items()}}
