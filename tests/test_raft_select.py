"""RAFT selection and junk filters on hand-made rewards (no models)."""

from __future__ import annotations

import math

import pytest

from hhrm.raft import select as raft_select
from hhrm.raft.select import JunkFilter, distinct_n, filter_counts, select, select_best_of_k, select_top_fraction

OK = None


def test_best_of_k_picks_the_highest_reward_per_prompt():
    rewards = [[0.1, 0.9, 0.5], [2.0, -1.0, 1.0]]
    reasons = [[OK] * 3, [OK] * 3]
    assert select_best_of_k(rewards, reasons) == [(0, 1), (1, 0)]


def test_best_of_k_ties_go_to_the_first_sample():
    rewards = [[0.5, 0.7, 0.7, 0.7]]
    assert select_best_of_k(rewards, [[OK] * 4]) == [(0, 1)]


def test_best_of_k_never_keeps_a_filtered_sample_and_skips_all_filtered_prompts():
    rewards = [[9.0, 1.0, 2.0], [5.0, 6.0, 7.0], [float("nan"), 0.0, -1.0]]
    reasons = [["repetitive", OK, OK], ["empty", "too_short", "pattern"], [OK, "empty", OK]]
    # prompt 0: 9.0 is junk -> 2.0; prompt 1: nothing left -> skipped; prompt 2: NaN is never kept -> -1.0
    assert select_best_of_k(rewards, reasons) == [(0, 2), (2, 2)]


def test_top_fraction_ranks_the_whole_batch():
    rewards = [[1.0, 8.0], [7.0, 6.0], [0.0, 5.0]]
    reasons = [[OK, OK], [OK, OK], [OK, OK]]
    # 6 samples, fraction 0.5 -> keep 3: 8.0, 7.0, 6.0 (prompt 2 gets nothing, prompt 1 gets two)
    assert select_top_fraction(rewards, reasons, 0.5) == [(0, 1), (1, 0), (1, 1)]


def test_top_fraction_ties_and_filters():
    rewards = [[3.0, 3.0], [3.0, 10.0]]
    reasons = [[OK, OK], [OK, "pattern"]]
    # ceil(0.5 * 4) = 2 kept; 10.0 is filtered; three 3.0 ties -> the two earliest positions
    assert select_top_fraction(rewards, reasons, 0.5) == [(0, 0), (0, 1)]
    # asking for more than pass the filters keeps only those that pass
    assert select_top_fraction(rewards, reasons, 1.0) == [(0, 0), (0, 1), (1, 0)]


def test_top_fraction_one_over_k_keeps_as_many_as_best_of_k():
    rewards = [[float(i * 3 + j) for j in range(4)] for i in range(5)]
    reasons = [[OK] * 4 for _ in range(5)]
    assert len(select_top_fraction(rewards, reasons, 1 / 4)) == len(select_best_of_k(rewards, reasons)) == 5


def test_select_dispatch_and_errors():
    rewards, reasons = [[1.0, 2.0]], [[OK, OK]]
    assert select(rewards, reasons, "best_of_k") == [(0, 1)]
    assert select(rewards, reasons, "top_fraction", 0.5) == [(0, 1)]
    with pytest.raises(ValueError, match="selection="):
        select(rewards, reasons, "best_of_n")
    with pytest.raises(ValueError, match="top_fraction="):
        select(rewards, reasons, "top_fraction", 0.0)
    with pytest.raises(ValueError, match="shape"):
        select_best_of_k([[1.0, 2.0]], [[OK]])


def test_junk_filter_reasons_in_order():
    f = JunkFilter(min_tokens=3, max_repeat_fraction=0.4, patterns=[r"(?i)i'm sorry"])
    assert f.reason("   ", 0) == "empty"
    assert f.reason(" Yes.", 2) == "too_short"
    assert f.reason(" the cat sat the cat sat the cat sat the cat sat", 20) == "repetitive"
    assert f.reason(" I'm sorry, I can't help with that.", 10) == "pattern"
    assert f.reason(" There are 5 words in the list.", 8) is None


def test_junk_filter_settings_fail_early():
    with pytest.raises(ValueError, match="filter_max_repeat_fraction"):
        JunkFilter(max_repeat_fraction=0.0)
    with pytest.raises(ValueError, match="filter_patterns"):
        JunkFilter(patterns=["("])
    # 1.0 turns the repetition check off
    assert JunkFilter(max_repeat_fraction=1.0).reason(" a a a a a a a a", 8) is None


def test_filter_counts_and_distinct():
    counts = filter_counts([[OK, "empty"], ["empty", "pattern"]])
    assert counts == {"empty": 2, "too_short": 0, "repetitive": 0, "pattern": 1, "passed": 1}
    assert set(raft_select.FILTER_REASONS) <= set(counts)
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b", "a b"], 2) == 0.5
    assert distinct_n([""], 2) == 0.0
    assert math.isclose(raft_select.repeat_fraction("x y z x y z"), 1 - 3 / 4)


# ----- DPO pairs: the best and the worst of each prompt's K samples


def test_pairs_are_each_prompts_best_and_worst_and_skips_are_counted_by_reason():
    nan = float("nan")
    rewards = [
        [0.1, 0.9, 0.5, -2.0],  # best 1, worst 3
        [1.0, 1.0, 1.0, 1.0],  # all tied: no pair at any margin
        [5.0, 6.0, 7.0, 8.0],  # all junk
        [3.0, nan, 9.0, 2.0],  # 9.0 is junk, NaN is never used: best 0, worst 3
        [4.0, 4.0, 4.5, 4.0],  # one sample left after the filters
    ]
    reasons = [
        [OK] * 4,
        [OK] * 4,
        ["empty", "too_short", "repetitive", "pattern"],
        [OK, OK, "repetitive", OK],
        ["empty", OK, "empty", "empty"],
    ]
    pairs, skipped = raft_select.select_pairs(rewards, reasons)
    assert pairs == [(0, 1, 3), (3, 0, 3)]
    assert skipped == {"too_few_valid": 2, "within_margin": 1}
    assert len(pairs) + sum(skipped.values()) == len(rewards)  # every prompt accounted for


def test_pair_margin_and_ties():
    rewards = [[0.0, 0.5, 0.5, 0.0], [0.0, 2.0, 1.0, 1.0]]
    pairs, skipped = raft_select.select_pairs(rewards, [[OK] * 4] * 2, margin=1.0)
    assert pairs == [(1, 1, 0)] and skipped == {"too_few_valid": 0, "within_margin": 1}  # 0.5 apart is within 1.0
    # ties go to the lowest sample index, for the best and for the worst alike
    assert raft_select.select_pairs(rewards, [[OK] * 4] * 2)[0] == [(0, 1, 0), (1, 1, 0)]
    # one sample per prompt (K=1) never makes a pair
    assert raft_select.select_pairs([[1.0], [2.0]], [[OK], [OK]]) == ([], {"too_few_valid": 2, "within_margin": 0})
    with pytest.raises(ValueError, match="pair_margin"):
        raft_select.select_pairs(rewards, [[OK] * 4] * 2, margin=-0.1)


def test_the_dpo_loss_types_checked_at_parse_time_are_trls():
    """hhrm refuses an unknown dpo_loss_type when parsed (TRL only at the first step): the same names as TRL's."""
    import dataclasses
    import re

    import trl

    from hhrm.raft.config import DPO_LOSS_TYPES

    help_text = {f.name: f for f in dataclasses.fields(trl.DPOConfig)}["loss_type"].metadata["help"]
    listed = re.findall(r"`'([a-z_]+)'`", help_text.split("If multiple")[0])
    assert sorted(listed) == sorted(DPO_LOSS_TYPES)


# ----- regularised (RBoN-KL) and soft best-of-K --------------------------------------------------


def test_regularised_score_shifts_the_pick_to_the_likelier_sample():
    from hhrm.raft.select import regularised_scores

    rewards = [[1.0, 1.2, 0.9]]  # sample 1 has the top reward but is the least likely under the policy
    logprobs = [[-10.0, -14.0, -9.0]]
    reasons = [[OK] * 3]
    assert select_best_of_k(regularised_scores(rewards, logprobs, 0.0), reasons) == [(0, 1)]  # beta 0: argmax
    # beta 0.1: 1.0 - 1.0 = 0.0, 1.2 - 1.4 = -0.2, 0.9 - 0.9 = 0.0 -> tie of 0 and 2, the first wins
    assert regularised_scores(rewards, logprobs, 0.1) == [pytest.approx([0.0, -0.2, 0.0])]
    assert select_best_of_k(regularised_scores(rewards, logprobs, 0.1), reasons) == [(0, 0)]
    assert select_best_of_k(regularised_scores(rewards, logprobs, 1.0), reasons) == [(0, 2)]  # the likeliest
    # top_fraction ranks by the same score over the batch
    two = [[1.0, 1.2], [0.0, 0.5]], [[-10.0, -14.0], [-1.0, -3.0]]
    scores = regularised_scores(*two, 0.5)  # [-4, -5.8], [-0.5, -1.0]
    assert select_top_fraction(scores, [[OK, OK], [OK, OK]], 0.5) == [(1, 0), (1, 1)]


def test_soft_best_of_k_is_deterministic_per_seed_and_argmax_as_temperature_goes_to_zero():
    rewards = [[0.1, 0.9, 0.5, 0.2], [2.0, -1.0, 1.0, 1.9], [0.0, 0.0, 0.0, 0.0]]
    reasons = [[OK] * 4, [OK, OK, OK, "empty"], [OK] * 4]
    argmax = select_best_of_k(rewards, reasons)
    assert select_best_of_k(rewards, reasons, temperature=1e-6, seed=3) == argmax
    assert select(rewards, reasons, "best_of_k", temperature=1e-6, seed=3) == argmax
    picks = [select_best_of_k(rewards, reasons, temperature=1.0, seed=s) for s in range(30)]
    assert picks == [select_best_of_k(rewards, reasons, temperature=1.0, seed=s) for s in range(30)]  # a resume
    assert len({tuple(p) for p in picks}) > 1  # another seed, another draw
    assert all((1, 3) not in p for p in picks)  # a filtered sample is never drawn


def test_soft_best_of_k_follows_the_softmax_frequencies():
    scores, temperature, draws = [0.0, 1.0, 2.0], 0.5, 4000
    reasons = [[OK] * 3] * draws
    picks = select_best_of_k([scores] * draws, reasons, temperature=temperature, seed=11)  # one draw per prompt
    weights = [math.exp(s / temperature) for s in scores]
    expected = [w / sum(weights) for w in weights]  # 0.016, 0.117, 0.867
    for j, p in enumerate(expected):
        freq = sum(pick == j for _, pick in picks) / draws
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / draws), (j, freq, p)


def test_regularised_and_soft_refusals():
    from hhrm.raft.select import check_selection_rule, regularised_scores, selection_rule

    with pytest.raises(ValueError, match="selection_kl_beta=-0.1: must be >= 0"):
        regularised_scores([[1.0]], [[-1.0]], -0.1)
    with pytest.raises(ValueError, match="no response_logprobs"):
        regularised_scores([[1.0]], [None], 0.1)
    with pytest.raises(ValueError, match="selection_temperature=-1.0: must be >= 0"):
        select_best_of_k([[1.0]], [[OK]], temperature=-1.0)
    with pytest.raises(ValueError, match="selection_temperature=0.5 with selection=top_fraction"):
        select([[1.0]], [[OK]], "top_fraction", 0.5, temperature=0.5)
    check_selection_rule("top_fraction", "sft", 0.3, 0.0)  # the regularised score ranks a batch as well
    for beta, t in ((0.1, 0.0), (0.0, 1.0)):
        with pytest.raises(ValueError, match="with update=dpo: .*set them 0"):
            check_selection_rule("best_of_k", "dpo", beta, t)
    assert selection_rule("best_of_k") == "argmax of reward over the K samples (best-of-K)"
    assert "softmax((reward + 0.1 * log pi(y|x)" in selection_rule("best_of_k", "sft", 0.1, 2.0)


def test_raft_config_refuses_bad_selection_rules_when_parsed(tmp_path):
    from hhrm.raft import RaftConfig

    base = dict(output_dir=str(tmp_path), reward_model_name_or_path="rm")
    for bad, message in (
        (dict(selection_kl_beta=-1.0), "selection_kl_beta=-1.0: must be >= 0"),
        (dict(selection_temperature=-0.5), "selection_temperature=-0.5: must be >= 0"),
        (dict(selection="top_fraction", selection_temperature=1.0), "with selection=top_fraction"),
        (dict(update="dpo", selection_kl_beta=0.1), "with update=dpo"),
    ):
        with pytest.raises(ValueError, match=message):
            RaftConfig(**base, **bad)
    args = RaftConfig(**base, selection_kl_beta=0.1, selection_temperature=0.5)
    assert (args.selection_kl_beta, args.selection_temperature) == (0.1, 0.5)
