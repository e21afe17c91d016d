"""A multi-head reward ensemble in one training run (``ensemble_kind=heads``): one backbone, E score heads.

The sequence classifier is built with ``num_labels=E``: its ``score`` layer is E heads reading the same last-token
hidden state, each randomly initialised. Each head is trained by the Bradley-Terry loss on its own bootstrap of the
pairs: pair i counts ``w_ie ~ Poisson(1)`` times for head e (the online bootstrap of Osband et al. 2016), so the
heads see different resamples of the data, as E RMs trained on E bootstrap samples would, for about one RM's cost::

    loss = sum_{i,e} w_ie * -log sigmoid(r_c,ie - r_r,ie - margin_i) / sum_{i,e} w_ie
           (+ center_rewards_coefficient * mean over heads and texts of (r_c + r_r)^2, as TRL's)

``w_ie`` is drawn from a generator seeded by ``seed`` and a hash of the pair's token ids: the same pair gets the same
weights whatever its batch, the process count, or a resume. Evaluation batches weigh every pair 1 for every head.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

# The collator's key for the (B, E) bootstrap weights (popped before the model sees the batch).
WEIGHTS = "bootstrap_weights"


@contextlib.contextmanager
def one_label_for_trl(config):
    """TRL's RewardTrainer refuses a model with ``num_labels != 1``; the E heads' rewards go through
    :func:`compute_loss` instead of TRL's, so its check is passed by showing one label while it is built."""
    saved = dict(config.id2label), dict(config.label2id)
    config.num_labels = 1
    try:
        yield
    finally:
        config.id2label, config.label2id = saved


def bootstrap_weights(chosen_ids, rejected_ids, seed: int, heads: int) -> np.ndarray:
    """``(heads,)`` Poisson(1) counts of one pair, a function of ``seed`` and the pair's token ids only."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(int(seed).to_bytes(8, "little", signed=True))
    for ids in (chosen_ids, rejected_ids):
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
        digest.update(b"|")
    rng = np.random.default_rng(int.from_bytes(digest.digest(), "little"))
    return rng.poisson(1.0, size=heads).astype(np.float32)


@dataclass
class BootstrapCollator:
    """Wraps a preference collator (TRL's padded one or hhrm's packed one) and adds :data:`WEIGHTS`."""

    inner: Any
    seed: int
    heads: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        weights = [bootstrap_weights(ex["chosen_ids"], ex["rejected_ids"], self.seed, self.heads) for ex in examples]
        batch[WEIGHTS] = torch.from_numpy(np.stack(weights))
        return batch


def weighted_bt_loss(
    rewards: torch.Tensor, weights: torch.Tensor, margin: torch.Tensor | None = None, center: float | None = None
) -> torch.Tensor:
    """``rewards``: ``(2B, E)``, chosen rows first; ``weights``: ``(B, E)``. The module docstring's loss."""
    chosen, rejected = torch.chunk(rewards, chunks=2)
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff.dtype).unsqueeze(-1)  # one margin per pair, every head
    weights = weights.to(diff.dtype)
    # A micro-batch whose every weight is 0 (probability e^(-B*E)) contributes no gradient rather than 0/0.
    loss = (weights * -nn.functional.logsigmoid(diff)).sum() / weights.sum().clamp_min(1.0)
    if center is not None:
        loss = loss + center * torch.mean((chosen + rejected) ** 2)
    return loss


def compute_loss(trainer, model, inputs: dict[str, Any], weights: torch.Tensor, return_outputs: bool = False):
    """TRL's ``RewardTrainer.compute_loss`` for E heads: the bootstrap-weighted loss, and TRL's metrics (accuracy
    and margin of the heads' mean: the ensemble's default reward)."""
    mode = "train" if trainer.model.training else "eval"
    margin = inputs.pop("margin", None)
    outputs = model(**inputs, use_cache=False)
    rewards = outputs.logits
    if mode == "eval":
        weights = torch.ones_like(weights)
    loss = weighted_bt_loss(rewards, weights.to(rewards.device), margin, trainer.args.center_rewards_coefficient)
    if mode == "train":
        tokens = trainer.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
        trainer._total_train_tokens += tokens // trainer._tp_size
    metrics = trainer._metrics[mode]
    metrics["num_tokens"] = [trainer._total_train_tokens]
    with torch.no_grad():
        everything = trainer.accelerator.gather(rewards)
        metrics["min_reward"].append(everything.min().item())
        metrics["mean_reward"].append(everything.mean().item())
        metrics["max_reward"].append(everything.max().item())
        chosen, rejected = torch.chunk(rewards.mean(-1), chunks=2)
        accuracy = trainer.accelerator.gather_for_metrics((chosen > rejected).float().mean()).mean()
        metrics["accuracy"].append(accuracy.item())
        margin_mean = trainer.accelerator.gather_for_metrics((chosen - rejected).mean()).mean()
        metrics["margin"].append(margin_mean.item())
    return (loss, outputs) if return_outputs else loss
