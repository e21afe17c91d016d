"""Reward-model evaluation statistics on hand-made rewards (no models); `make eval-rm` under a reward convention."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hhrm.rm import evaluation as rm_eval

from conftest import QUIET_CPU, load_recipe


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


def test_eval_rm_scores_a_pad_is_eos_rm_by_its_stated_convention(pad_is_eos_rm, tiny, tmp_path):
    """A pad == EOS RM recording no convention (the seed card's shape) is evaluated under --reward_convention: its
    held-out rewards are RewardScorer's under that convention, pair by pair; without it, refused in one line."""
    import json

    import torch
    from trl import ModelConfig

    from hhrm import data
    from hhrm.reward import scoring
    from hhrm.rm import stage as rm

    folder = pad_is_eos_rm
    recipe = load_recipe("eval_rm")
    data_args = data.DataArguments(dataset_name=str(tiny["data"]), test_offset=250)
    args = rm.RewardConfig(output_dir=str(tmp_path / "unused"), gold_prompts=0, **QUIET_CPU)
    policy = ModelConfig(model_name_or_path=str(tiny["base"]))

    def evaluate(convention):
        eval_args = recipe.EvalArguments(
            reward_model=str(folder), eval_output_dir=str(tmp_path / "eval"), skip_gold=True,
            reward_convention=convention,
        )  # fmt: skip
        return recipe.main(data_args, args, policy, eval_args)

    metrics = evaluate("card-pipeline")
    result = json.loads((tmp_path / "eval" / "eval_rm.json").read_text())
    assert result["reward_convention"] == "card-pipeline"
    card = scoring.RewardScorer.from_pretrained(folder, device="cpu", dtype=torch.float32, convention="card-pipeline")
    tok = card.tokenizer
    test = rm.prepare_pairs(data.load_splits(data_args, tok), tok, args.max_length, args.dedup_test).test
    expected = card.score_pairs(list(test["prompt"]) * 2, list(test["chosen"]) + list(test["rejected"]))
    got = result["held_out"]["rewards"]["chosen"] + result["held_out"]["rewards"]["rejected"]
    assert len(got) == 2 * len(test) > 0 and got == pytest.approx(expected, abs=1e-5)
    chosen, rejected = np.array(got[: len(test)]), np.array(got[len(test) :])
    assert metrics["eval_accuracy_exact"] == rm_eval.exact_accuracy(chosen, rejected)
    with pytest.raises(ValueError, match=r"pad == EOS\) and its config.json records no reward_convention") as err:
        evaluate(None)
    assert "\n" not in str(err.value)
