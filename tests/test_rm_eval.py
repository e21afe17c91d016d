"""Reward-model evaluation statistics on hand-made rewards (no models)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hhrm.rm import evaluation as rm_eval


def test_ties_count_as_wrong():
    chosen, rejected = np.array([1.0, 2.0, 0.5, 3.0]), np.array([1.0, 1.0, 0.7, 3.0])
    assert rm_eval.exact_accuracy(chosen, rejected) == 0.25
    assert rm_eval.bt_loss(np.array([0.0]), np.array([0.0]))[0] == pytest.approx(math.log(2))
    assert rm_eval.bt_loss(np.array([1000.0]), np.array([0.0]))[0] == pytest.approx(0.0)  # stable, no overflow


def test_auc_and_rank_correlation():
    assert rm_eval.auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert rm_eval.auc(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5  # tie: half
    assert math.isnan(rm_eval.auc(np.array([1.0]), np.array([1])))
    assert rm_eval.spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 25, 100])) == pytest.approx(1.0)


def test_gold_agreement_stats():
    prompts = ["###Human: How many centimeters are in 2 meters? ###Assistant:"]
    responses = [[" 2 meters is 200 centimeters.", " 2 meters is 20 centimeters.", " 2 meters is 2000 centimeters."]]
    stats = rm_eval.gold_agreement_stats(prompts, responses, [[1.0, 2.0, 0.0]])
    assert stats["gold_pairs"] == 2 and stats["gold_pairwise_agreement"] == 0.5
    assert stats["gold_best_of_k_accuracy"] == 0.0 and stats["gold_oracle_best_of_k"] == 1.0
    assert stats["gold_auc"] == 0.5
