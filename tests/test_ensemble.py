"""Reward ensembles as one reward source (hhrm.reward.ensemble): the rules on numbers, the members scored as the
folders score alone, the refusals, `make score`'s uncertainty columns and a `make overopt` curve picked by a rule."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hhrm.reward import ensemble, sources

from conftest import QUICK_TEST_OFFSET, load_recipe

ROOT = Path(__file__).resolve().parents[1]


def _member(rm: Path, out: Path, seed: int) -> Path:
    """A copy of ``rm`` whose score head is moved by seeded noise: another member that disagrees a little."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(rm)
    with torch.no_grad():
        model.score.weight.add_(torch.randn_like(model.score.weight) * model.score.weight.std())
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(rm).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def members(quick_models, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("ensemble")
    return [quick_models["rm"]] + [_member(quick_models["rm"], root / f"m{s}", s) for s in (1, 2)]


@pytest.fixture(scope="module")
def texts(quick_models) -> tuple[list[str], list[str]]:
    rows = _pairs(quick_models, 6)
    return [r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows]


def _pairs(quick_models, n: int) -> list[dict]:
    """The first ``n`` held-out pairs as hhrm renders them (prompt, chosen, rejected)."""
    from hhrm import data as hdata

    args = hdata.DataArguments(dataset_name=str(quick_models["data"]), test_offset=QUICK_TEST_OFFSET)
    return hdata.load_splits(args).test.select(range(n)).select_columns(["prompt", "chosen", "rejected"]).to_list()


def test_rules_on_numbers():
    # Text 0: members agree (mean 1, var 0); text 1: higher mean (1.5), members disagree (var 2.25).
    table = np.array([[1.0, 0.0], [1.0, 3.0]])
    assert ensemble.aggregate(table, "mean").tolist() == [1.0, 1.5]
    assert ensemble.aggregate(table, "worst").tolist() == [1.0, 0.0]
    assert ensemble.aggregate(table, "uwo", 0.5).tolist() == [1.0, 1.5 - 0.5 * 2.25]  # var over members, 1/E
    assert ensemble.aggregate(table, "uwo", 0.0).tolist() == ensemble.aggregate(table, "mean").tolist()
    # The rule changes the pick: mean picks the disagreed-on text, worst and uwo the agreed one.
    assert [int(np.argmax(ensemble.aggregate(table, r))) for r in ("mean", "worst", "uwo")] == [1, 0, 0]


@pytest.mark.parametrize("rule", ["mean", "worst", "uwo"])
def test_members_score_as_each_folder_alone_and_the_rule_aggregates(members, texts, rule):
    args = sources.RewardArguments(reward_ensemble=[str(m) for m in members], reward_aggregation=rule)
    source = sources.build(args, "cpu")
    got = source.score_members(*texts)
    alone = np.array([sources.LocalModel(str(m), device="cpu").score_pairs(*texts) for m in members])
    assert np.array(got["members"]) == pytest.approx(alone.T, abs=1e-5)
    assert got["mean"] == pytest.approx(alone.mean(0), abs=1e-5) and got["std"] == pytest.approx(
        alone.std(0), abs=1e-5
    )
    assert min(got["std"]) > 0  # the members do disagree
    expected = {"mean": alone.mean(0), "worst": alone.min(0), "uwo": alone.mean(0) - 0.5 * alone.var(0)}[rule]
    assert source.score_pairs(*texts) == pytest.approx(expected, abs=1e-5)
    identity = source.identity()
    assert identity["aggregation"] == rule and len(identity["ensemble"]) == 3 and identity["convention"] == "hhrm"
    assert sources.address(args).startswith(f"ensemble ({rule}") and source.describe().startswith(f"ensemble ({rule}")
    assert source.resident and not (source.release() or source.resident)


def test_one_member_is_the_single_model(members, texts):
    one = sources.build(sources.RewardArguments(reward_ensemble=[str(members[0])]), "cpu")
    single = sources.build(sources.RewardArguments(reward_model_name_or_path=str(members[0])), "cpu")
    assert one.score_pairs(*texts) == pytest.approx(single.score_pairs(*texts), abs=1e-6)
    assert one.score_members(*texts)["std"] == [0.0] * len(texts[0])


def _copy(src: Path, dst: Path, config=None, pad=None) -> str:
    """A member folder that differs from ``src`` in its recorded convention or its tokenizer's pad token."""
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    if config:
        (dst / "config.json").write_text(json.dumps(json.loads((dst / "config.json").read_text()) | config))
    if pad:
        tok = AutoTokenizer.from_pretrained(src)
        tok.pad_token = pad
        tok.save_pretrained(dst)
    return str(dst)


def test_refusals_name_the_setting(members, tmp_path):
    m = [str(x) for x in members]
    settings = [
        (dict(reward_ensemble=[]), "reward_ensemble is empty"),
        (dict(reward_ensemble=m, reward_aggregation="uwo", reward_uwo_lambda=-0.1), "reward_uwo_lambda=-0.1"),
        (dict(reward_ensemble=m[:1], reward_aggregation="uwo"), "reward_aggregation=uwo with one reward model"),
        (dict(reward_ensemble=m[:1], reward_aggregation="worst"), "reward_aggregation=worst with one reward model"),
        (dict(reward_model_name_or_path=m[0], reward_aggregation="worst"), "worst with no reward_ensemble"),
        (dict(reward_ensemble=m, reward_model_name_or_path=m[0]), "reward_ensemble and reward_model_name_or_path"),
        (dict(reward_ensemble=[m[0], m[0]]), "names a folder twice"),
        (dict(reward_ensemble=m, reward_aggregation="median"), "reward_aggregation='median'"),
    ]
    for kwargs, message in settings:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            sources.RewardArguments(**kwargs).check_reward_source()
    other_convention = _copy(members[1], tmp_path / "conv", config={"reward_convention": "openrlhf"})
    other_tokenizer = _copy(members[1], tmp_path / "tok", pad="<unk>")
    for member, message in ((other_convention, "reward_convention openrlhf"), (other_tokenizer, "special token")):
        with pytest.raises(ValueError, match=f"reward_ensemble: member 2 .*{message}"):
            sources.build(sources.RewardArguments(reward_ensemble=[m[0], member]), "cpu")


@pytest.mark.slow
def test_a_refusal_is_one_line_from_the_command(members, tmp_path):
    cmd = [sys.executable, "recipes/overopt.py", "--model_name_or_path", str(members[0]), "--output_dir",
           str(tmp_path / "c"), "--reward_ensemble", *map(str, members), "--reward_aggregation", "uwo",
           "--reward_uwo_lambda", "-1"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("hhrm: error: reward_uwo_lambda")


def test_make_score_writes_members_std_and_the_rule(members, quick_models, tmp_path):
    from trl import ModelConfig

    from hhrm.reporting import read_jsonl
    from hhrm.reward import score_file

    rows = _pairs(quick_models, 8)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = [str(x) for x in members]
    alone = [sources.LocalModel(x, device="cpu") for x in m]
    for name in ("scores.jsonl", "scores.parquet"):
        data_args = score_file.ScoreDataArguments(dataset_name=str(tmp_path / "pairs.jsonl"))
        args = score_file.ScoreConfig(
            output_file=str(tmp_path / name), reward_ensemble=m, reward_aggregation="worst", progress=False
        )
        metrics = load_recipe("score").main(data_args, args, ModelConfig(model_name_or_path=None))
        out = read_jsonl(tmp_path / name) if name.endswith(".jsonl") else _parquet(tmp_path / name)
        assert metrics["scored"] == 8 and metrics["reward"]["aggregation"] == "worst"
        assert metrics["reward_model"].startswith("ensemble (worst) of ")
        for side in ("chosen", "rejected"):
            each = np.array([a.score_pairs([r["prompt"] for r in rows], [r[side] for r in rows]) for a in alone]).T
            got = np.array([list(r[f"{side}_reward_members"]) for r in out])
            assert got == pytest.approx(each, abs=1e-5)
            assert [r[f"{side}_reward"] for r in out] == pytest.approx(each.min(1), abs=1e-5)
            assert [r[f"{side}_reward_std"] for r in out] == pytest.approx(each.std(1), abs=1e-5)
            assert [r[f"{side}_reward_mean"] for r in out] == pytest.approx(each.mean(1), abs=1e-5)


def _parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


@pytest.mark.slow
def test_overopt_curve_picks_by_the_rule(members, quick_models, tmp_path):
    from trl import ModelConfig

    from hhrm import data as hdata
    from hhrm import overopt, reporting

    out = tmp_path / "curve"
    args = overopt.OverOptConfig(
        reward_ensemble=[str(m) for m in members], reward_aggregation="uwo", reward_uwo_lambda=2.0,
        output_dir=str(out), n_max=4, heldout_prompts=8, max_new_tokens=10, progress=False,
    )  # fmt: skip
    data_args = hdata.DataArguments(dataset_name=str(quick_models["data"]), test_offset=QUICK_TEST_OFFSET)
    result = load_recipe("overopt").main(data_args, args, ModelConfig(model_name_or_path=str(quick_models["policy"])))
    assert result["reward_aggregation"] == "uwo" and result["reward"]["uwo_lambda"] == 2.0
    assert "ensemble (uwo, lambda 2.0) of " in (out / overopt.TABLE_FILE).read_text()
    samples = reporting.read_jsonl(out / overopt.SAMPLES_FILE)
    table = np.array([s["proxy_members"] for s in samples])  # [prompts, n_max, E]
    assert table.shape == (8, 4, 3)
    proxy = np.array([s["proxy"] for s in samples])
    assert proxy == pytest.approx(table.mean(-1) - 2.0 * table.var(-1), abs=1e-9)
    assert overopt.curve_from_samples(out / overopt.SAMPLES_FILE) == result["curve"]
