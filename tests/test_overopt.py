"""Best-of-n over-optimisation: the exact estimator against brute force, the KL bound, the ceiling, the recipe."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from hhrm import data as hdata
from hhrm import overopt, reporting

from conftest import QUICK_TEST_OFFSET, load_recipe

TEST_OFFSET = QUICK_TEST_OFFSET


def brute_force(proxy: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Per row, the mean of ``values`` at the proxy's pick over every n-subset (argmax: first max in draw order)."""
    out = []
    for p, v in zip(proxy, values):
        picks = [s[int(np.argmax(p[list(s)]))] for s in itertools.combinations(range(len(p)), n)]
        out.append(np.mean([v[i] for i in picks]))
    return np.array(out)


@pytest.mark.parametrize("n_max", [2, 4, 8])
def test_best_of_n_matches_brute_force_with_ties(n_max):
    rng = np.random.default_rng(n_max)
    proxy = rng.integers(0, 3, size=(20, n_max)).astype(float)  # few values: many ties
    proxy[0] = 1.0  # a row that is all ties
    gold = rng.integers(0, 2, size=(20, n_max)).astype(float)
    for n in overopt.ns(n_max):
        np.testing.assert_allclose(overopt.best_of_n(proxy, gold, n), brute_force(proxy, gold, n), rtol=0, atol=1e-12)
        np.testing.assert_allclose(
            overopt.best_of_n(proxy, proxy, n), brute_force(proxy, proxy, n), rtol=0, atol=1e-12
        )
        np.testing.assert_allclose(overopt.gold_ceiling(gold, n), brute_force(gold, gold, n), rtol=0, atol=1e-12)


def test_best_of_n_continuous_rewards_and_weights_sum_to_one():
    rng = np.random.default_rng(0)
    proxy, gold = rng.normal(size=(10, 8)), rng.normal(size=(10, 8))
    for n in (1, 2, 4, 8, 3, 5):
        assert overopt.pick_weights(8, n).sum() == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(overopt.best_of_n(proxy, gold, n), brute_force(proxy, gold, n), atol=1e-12)
    np.testing.assert_allclose(overopt.best_of_n(proxy, gold, 1), gold.mean(axis=1))
    np.testing.assert_allclose(overopt.best_of_n(proxy, proxy, 8), proxy.max(axis=1))


def test_kl_bound_values():
    assert overopt.kl_bound(1) == 0.0
    assert overopt.kl_bound(2) == pytest.approx(math.log(2) - 0.5)
    assert overopt.kl_bound(16) == pytest.approx(math.log(16) - 15 / 16)
    assert overopt.ns(16) == [1, 2, 4, 8, 16]
    rows = overopt.curve(np.zeros((3, 4)))
    assert [r["n"] for r in rows] == [1, 2, 4] and rows[0]["sqrt_kl"] == 0.0
    assert all(r["sqrt_kl"] == pytest.approx(math.sqrt(overopt.kl_bound(r["n"]))) for r in rows)


def test_gold_pick_is_the_ceiling():
    rng = np.random.default_rng(1)
    proxy = rng.normal(size=(50, 16))
    gold = (rng.random(size=(50, 16)) < 0.4).astype(float)
    rows = overopt.curve(proxy, gold)
    assert rows[0]["gold_ceiling_mean"] == pytest.approx(rows[0]["gold_mean"], abs=1e-12)
    assert rows[0]["gold_mean"] == pytest.approx(gold.mean())
    for n in overopt.ns(16):
        assert np.all(overopt.gold_ceiling(gold, n) >= overopt.best_of_n(proxy, gold, n) - 1e-12)
    lo, hi = rows[0]["proxy_ci"]
    assert lo < rows[0]["proxy_mean"] < hi
    assert hi - rows[0]["proxy_mean"] == pytest.approx(1.96 * proxy.mean(axis=1).std(ddof=1) / math.sqrt(50))


@pytest.mark.parametrize("n_max", [1, 0, 6])
def test_n_max_refused(n_max, tmp_path):
    with pytest.raises(ValueError, match=f"^n_max={n_max}: must be a power of 2") as err:
        overopt.OverOptConfig(reward_model_name_or_path="rm", output_dir=str(tmp_path), n_max=n_max)
    assert "\n" not in str(err.value)


def test_existing_curve_refused(tmp_path):
    (tmp_path / overopt.JSON_FILE).write_text("{}")
    with pytest.raises(ValueError, match="overwrite_output_dir"):
        overopt.OverOptConfig(reward_model_name_or_path="rm", output_dir=str(tmp_path))
    overopt.OverOptConfig(reward_model_name_or_path="rm", output_dir=str(tmp_path), overwrite_output_dir=True)


def test_regularised_best_of_n_picks_the_argmax_of_proxy_plus_beta_logprob():
    rng = np.random.default_rng(0)
    proxy = rng.normal(size=(6, 8))
    logps = rng.normal(-20.0, 4.0, size=(6, 8))
    gold = (rng.random((6, 8)) > 0.5).astype(float)
    curves = overopt.regularised_curves(proxy, logps, gold, [0.1, 100.0])
    assert list(curves) == ["0", "0.1", "100"]
    plain = overopt.curve(proxy, gold)
    assert [{k: r[k] for k in plain[0]} for r in curves["0"]] == plain  # beta 0: plain best-of-n
    for n in overopt.ns(8):
        row = curves["0.1"][int(math.log2(n))]
        score = proxy + 0.1 * logps
        assert row["gold_mean"] == pytest.approx(brute_force(score, gold, n).mean())
        assert row["proxy_mean"] == pytest.approx(brute_force(score, proxy, n).mean())  # the pick's proxy reward
        assert row["logprob_mean"] == pytest.approx(brute_force(score, logps, n).mean())
    # a large beta picks the likeliest sample: at n = n_max its log pi is each prompt's highest
    assert curves["100"][-1]["logprob_mean"] == pytest.approx(logps.max(-1).mean())
    assert curves["100"][-1]["logprob_mean"] > curves["0"][-1]["logprob_mean"]
    rows = [{"proxy": p.tolist(), "gold": g.tolist(), "logprobs": lp.tolist()} for p, g, lp in zip(proxy, gold, logps)]
    assert overopt.regularised_from_samples(rows, [0.1, 100.0]) == curves
    assert "| 0.1 |" in overopt.regularised_markdown(curves, True)
    with pytest.raises(ValueError, match="no logprobs: run make overopt with kl_betas"):
        overopt.regularised_from_samples([{"proxy": [1.0, 2.0], "gold": None}], [0.1])
    with pytest.raises(ValueError, match=r"kl_betas=\[-0.1\]: each must be > 0"):
        overopt.OverOptConfig(reward_model_name_or_path="rm", output_dir="unused", kl_betas=[0.1, -0.1])


def test_soft_best_of_n_draws_as_raft_keeps_and_spans_uniform_to_argmax():
    from hhrm.raft import select

    # two samples, proxy 0 and ln 3, T = 1: the pick is the second with probability 3/4, exactly
    assert overopt.soft_best_of_n(np.array([[0.0, math.log(3.0)]]), np.array([[0.0, 1.0]]), 2, 1.0) == (
        pytest.approx([0.75])
    )
    # the same rule RAFT's selection_temperature keeps by: its draws' frequencies are the estimator's weights
    proxy = np.array([0.3, -1.0, 1.2, 0.7])
    weights = [overopt.soft_best_of_n(proxy[None], np.eye(4)[j][None], 4, 0.5)[0] for j in range(4)]
    rows = [proxy.tolist()] * 20000
    kept = select.select_best_of_k(rows, [[None] * 4] * len(rows), temperature=0.5, seed=3)
    freq = np.bincount([k for _, k in kept], minlength=4) / len(rows)
    assert freq == pytest.approx(weights, abs=0.01) and sum(weights) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    proxy, gold = rng.normal(size=(40, 8)), (rng.random((40, 8)) > 0.5).astype(float)
    for n in overopt.ns(8):  # T -> 0: plain best-of-n; T -> inf: one unselected sample; n = 1: one sample
        cold = overopt.soft_best_of_n(proxy, gold, n, 1e-6).mean()
        assert cold == pytest.approx(overopt.best_of_n(proxy, gold, n).mean(), abs=0.02 if n < 8 else 1e-12)
        assert overopt.soft_best_of_n(proxy, gold, n, 1e6).mean() == pytest.approx(gold.mean(), abs=0.02)
    curves = overopt.soft_curves(proxy, gold, [0.5, 2.0])
    assert list(curves) == ["0", "0.5", "2"] and curves["0"] == overopt.curve(proxy, gold)
    assert curves["0.5"] == overopt.soft_curves(proxy, gold, [0.5])["0.5"]  # seeded: reproducible
    assert curves["0.5"][-1]["proxy_mean"] > curves["2"][-1]["proxy_mean"]  # a colder pick has the higher proxy
    assert "| 0.5 |" in overopt.soft_markdown(curves, True)
    with pytest.raises(ValueError, match=r"selection_temperatures=\[0.0\]: each must be > 0"):
        overopt.OverOptConfig(reward_model_name_or_path="rm", output_dir="unused", selection_temperatures=[1.0, 0.0])


def assert_logprobs_are_the_policys(policy_path, samples: list[dict], max_new_tokens: int) -> None:
    from transformers import AutoModelForCausalLM
    from trl import ModelConfig

    from hhrm import logprobs, modeling

    tok = modeling.load_tokenizer(ModelConfig(model_name_or_path=str(policy_path)), padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(policy_path)
    modeling.match_vocab(policy, tok)
    responses = [r for s in samples for r in s["responses"]]
    eos = [len(ids) < max_new_tokens for ids in tok(responses, add_special_tokens=False)["input_ids"]]
    prompts = [s["prompt"] for s in samples for _ in s["responses"]]
    expected = logprobs.sequence_logprobs(policy, tok, prompts, responses, 1.0, eos=eos)
    assert [x for s in samples for x in s["logprobs"]] == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_recipe_end_to_end(quick_models, tmp_path):
    from trl import ModelConfig

    out = tmp_path / "curve"
    args = overopt.OverOptConfig(
        reward_model_name_or_path=str(quick_models["rm"]), output_dir=str(out), n_max=4, heldout_prompts=12,
        max_new_tokens=12, progress=False, kl_betas=[0.5, 5.0], selection_temperatures=[1.0],
    )  # fmt: skip
    data_args = hdata.DataArguments(dataset_name=str(quick_models["data"]), test_offset=TEST_OFFSET)
    result = load_recipe("overopt").main(data_args, args, ModelConfig(model_name_or_path=str(quick_models["policy"])))
    for name in overopt.RESULT_FILES:
        assert (out / name).is_file(), name
    assert result["gold"] and result["prompts"] == 12 and [r["n"] for r in result["curve"]] == [1, 2, 4]
    samples = reporting.read_jsonl(out / overopt.SAMPLES_FILE)
    proxy = np.array([s["proxy"] for s in samples])
    gold = np.array([s["gold"] for s in samples])
    assert proxy.shape == (12, 4) and all(len(s["responses"]) == 4 for s in samples)
    first = result["curve"][0]
    assert first["kl_bound"] == 0.0
    assert first["proxy_mean"] == pytest.approx(proxy.mean()) and first["gold_mean"] == pytest.approx(gold.mean())
    assert first["gold_ceiling_mean"] == pytest.approx(gold.mean())
    assert (
        overopt.curve_from_samples(out / overopt.SAMPLES_FILE) == reporting.read_json(out / overopt.JSON_FILE)["curve"]
    )
    assert "| n | KL bound |" in (out / overopt.TABLE_FILE).read_text()
    # kl_betas: each sample's log pi under the policy is recorded (as hhrm.logprobs computes it), and the regularised
    # curves are recomputed from the samples file alone
    assert_logprobs_are_the_policys(quick_models["policy"], samples, max_new_tokens=12)
    assert overopt.regularised_from_samples(samples, [0.5, 5.0]) == result["regularised"]
    assert list(result["regularised"]) == ["0", "0.5", "5"] and result["regularised"]["0"][0]["gold_mean"] == (
        pytest.approx(first["gold_mean"])
    )
    assert "## Regularised best-of-n (RBoN-KL)" in (out / overopt.TABLE_FILE).read_text()
    assert result["soft"] == overopt.soft_curves(proxy, gold, [1.0], args.seed)  # soft best-of-n, same samples
    assert "## Soft best-of-n" in (out / overopt.TABLE_FILE).read_text()
    with pytest.raises(ValueError, match="already holds a curve"):
        overopt.OverOptConfig(reward_model_name_or_path=str(quick_models["rm"]), output_dir=str(out))


def test_the_proxy_comes_through_the_reward_seam_under_its_convention(pad_is_eos_rm, tiny, tmp_path):
    """The proxy is a reward source (hhrm.reward.sources): a pad == EOS RM under reward_convention=card-pipeline
    scores each sample exactly as RewardScorer does under it, and the curve records the address and convention."""
    import torch
    from trl import ModelConfig

    from hhrm.reward import scoring

    folder = pad_is_eos_rm
    args = overopt.OverOptConfig(
        reward_model_name_or_path=str(folder), reward_convention="card-pipeline", output_dir=str(tmp_path / "curve"),
        n_max=2, heldout_prompts=3, max_new_tokens=6, progress=False,
    )  # fmt: skip
    data_args = hdata.DataArguments(dataset_name=str(tiny["data"]), test_offset=TEST_OFFSET)
    result = overopt.run(args, data_args, ModelConfig(model_name_or_path=str(tiny["base"])))
    assert result["reward_model"] == str(folder) and result["reward_convention"] == "card-pipeline"
    assert result["reward"]["convention"] == "card-pipeline" and "(reward_convention card-pipeline)" in (
        (tmp_path / "curve" / overopt.TABLE_FILE).read_text()
    )
    samples = reporting.read_jsonl(tmp_path / "curve" / overopt.SAMPLES_FILE)
    card = scoring.RewardScorer.from_pretrained(folder, device="cpu", dtype=torch.float32, convention="card-pipeline")
    prompts = [s["prompt"] for s in samples for _ in s["responses"]]
    expected = card.score_pairs(prompts, [r for s in samples for r in s["responses"]])
    assert [x for s in samples for x in s["proxy"]] == pytest.approx(expected, abs=1e-5) and len(expected) == 6
    with pytest.raises(ValueError, match="reward_model_name_or_path is not set"):
        overopt.OverOptConfig(output_dir=str(tmp_path / "other"))
