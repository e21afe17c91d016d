"""hhrm.probe (the baselines `make real` sets beside a trained RM) and make real's fixed split (scripts/real.py)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys

import numpy as np
import pytest
import torch

from hhrm import probe

from conftest import ROOT


def test_wilson_interval_matches_the_formula_and_stays_in_bounds():
    low, high = probe.wilson(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert probe.wilson(0, 10)[0] == 0.0 and probe.wilson(10, 10)[1] == 1.0
    assert all(np.isnan(probe.wilson(0, 0)))
    entry = probe.accuracy(np.array([True] * 8 + [False] * 2))
    assert entry["accuracy"] == 0.8 and entry["pairs"] == 10 and entry["ci95"] == pytest.approx([low, high])


def test_paired_difference_is_zero_for_equal_scorers_and_brackets_a_real_gap():
    a = np.array([1, 0, 1, 1, 0, 1, 1, 0] * 20, dtype=bool)
    same = probe.paired_difference(a, a)
    assert same["mean"] == 0 and same["ci95"] == [0, 0]
    better = a | (np.arange(len(a)) % 8 == 1)  # right on 20 more of 160 pairs
    gap = probe.paired_difference(better, a)
    assert gap["mean"] == pytest.approx(20 / 160) and 0 < gap["ci95"][0] < gap["mean"] < gap["ci95"][1]


def test_length_rules_count_a_tie_as_wrong_for_both():
    rules = probe.length_rules(np.array([5, 3, 4]), np.array([3, 5, 4]))
    assert rules["longer_wins"].tolist() == [True, False, False]
    assert rules["shorter_wins"].tolist() == [False, True, False]


def test_linear_probe_learns_a_preference_direction_and_cv_picks_from_the_grid():
    rng = np.random.default_rng(0)
    direction = rng.normal(size=16)

    def pairs(n):
        chosen, rejected = rng.normal(size=(n, 16)), rng.normal(size=(n, 16))
        swap = chosen @ direction < rejected @ direction  # chosen: the higher hidden reward
        chosen[swap], rejected[swap] = rejected[swap].copy(), chosen[swap].copy()
        return chosen, rejected

    train_c, train_r = pairs(300)
    test_c, test_r = pairs(300)
    picked = probe.pick_l2(train_c, train_r)
    assert picked["l2"] in probe.L2_GRID and set(picked["cv_accuracy"]) == {str(x) for x in probe.L2_GRID}
    linear = probe.LinearProbe(picked["l2"]).fit(train_c, train_r)
    assert np.mean(linear.reward(test_c) > linear.reward(test_r)) > 0.9
    # no intercept: a constant shift of both sides changes no preference
    assert np.allclose(
        linear.reward(test_c + 3.0) - linear.reward(test_r + 3.0), linear.reward(test_c) - linear.reward(test_r)
    )


def test_eos_features_are_what_the_reward_head_reads(quick_models):
    """features . head weight == hhrm's scorer of the same texts: the probe sees the untrained RM's input."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hhrm.reward.scoring import RewardScorer

    tok = AutoTokenizer.from_pretrained(quick_models["rm"])
    model = AutoModelForSequenceClassification.from_pretrained(quick_models["rm"], num_labels=1).eval()
    texts = ["###Human: What is 2 plus 3? ###Assistant: 5.", "###Human: Hi ###Assistant: Hello there, friend!", "x"]
    features = probe.eos_features(model, tok, texts, max_tokens_per_batch=64)
    head = model.score.weight.detach().numpy()[0]
    want = RewardScorer(model, tok).score(texts)
    assert features.shape == (3, model.config.hidden_size)
    assert np.allclose(features @ head, want, atol=1e-5)
    with torch.no_grad():  # one text alone gives the same row as in a padded batch
        alone = probe.eos_features(model, tok, texts[:1])
    assert np.allclose(alone[0], features[0], atol=1e-5)


def _real_script():
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("real_script", ROOT / "scripts" / "real.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_real_split_holds_out_the_last_rows_unchanged(tmp_path):
    real = _real_script()
    rows = [json.dumps({"chosen": f"\n\nHuman: q{i}\n\nAssistant: a{i}", "rejected": f"r{i}"}) for i in range(10)]
    hh = tmp_path / "hh.jsonl.gz"
    with gzip.open(hh, "wt") as f:
        f.write("\n".join(rows) + "\n\n")  # a blank last line is not a row
    split = real.write_split(hh, tmp_path / "data", test_rows=3, train_rows=None)
    assert (tmp_path / "data" / "test.jsonl").read_text().splitlines() == rows[7:]
    assert (tmp_path / "data" / "train.jsonl").read_text().splitlines() == rows[:7]
    assert split["train_rows"] == "1-7" and split["test_rows"] == "8-10" and split["source_rows"] == 10
    real.write_split(hh, tmp_path / "few", test_rows=3, train_rows=2)
    assert (tmp_path / "few" / "train.jsonl").read_text().splitlines() == rows[:2]
    with pytest.raises(SystemExit, match="--test_rows 10: must be between 1 and 9"):
        real.write_split(hh, tmp_path / "bad", test_rows=10, train_rows=None)
    with pytest.raises(SystemExit, match="no such file"):
        real.write_split(tmp_path / "absent.jsonl", tmp_path / "bad", test_rows=1, train_rows=None)
