"""RAFT's over-optimisation alarm (hhrm.raft.alarm): ensemble disagreement and proxy gap per iteration, the stop at the
alarm with policy i as the final policy, resume with an ensemble, and the refusals."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from hhrm import data as hdata
from hhrm.raft import RaftConfig, StopRequested, alarm
from hhrm.reporting import read_json, read_jsonl, write_jsonl

from conftest import QUICK_TEST_OFFSET, load_recipe

# ----- the signals' arithmetic, on hand-written stage files (no model)


def write_iteration(folder: Path, stds: list[list[float]], kept: list[tuple[int, int, float]], held: list[float]):
    folder.mkdir(parents=True, exist_ok=True)
    scored = [{"index": i, "rewards": [0.0] * len(s), "reward_std": s} for i, s in enumerate(stds)]
    write_jsonl(scored, folder / "scored.jsonl")
    write_jsonl([{"index": i, "sample": j, "reward": r} for i, j, r in kept], folder / "kept.jsonl")
    write_jsonl([{"sampled_reward": r, "sampled_reward_std": 0.5} for r in held], folder / "heldout_scored.jsonl")


def args_for(**kw) -> SimpleNamespace:
    return SimpleNamespace(**({"overopt_alarm_disagreement": None, "overopt_alarm_gap": None, "stop_on_alarm": False}
                              | kw))  # fmt: skip


def test_signals_and_the_alarm_rule(tmp_path):
    first, now = tmp_path / "iter_000", tmp_path / "iter_001"
    write_iteration(first, [[0.1, 0.3], [0.2, 0.2]], [(0, 1, 1.0), (1, 0, 2.0)], [1.0, 0.0])
    write_iteration(now, [[0.1, 0.5], [0.7, 0.1]], [(0, 1, 3.0), (1, 0, 3.0)], [1.0, 2.0])
    s = alarm.signals(now)
    assert s["disagreement_kept"] == pytest.approx(0.6)  # kept: (0, 1) -> 0.5, (1, 0) -> 0.7
    assert s["disagreement_all"] == pytest.approx(0.35)
    assert s["proxy_gap"] == pytest.approx(3.0 - 1.5)
    # iteration 0: kept 0.25, gap 1.5 - 0.5 = 1.0; now: +140% disagreement, gap +0.5
    got = alarm.evaluate(now, first, 1, args_for(overopt_alarm_disagreement=1.0, stop_on_alarm=True))
    assert got["disagreement_kept_rise"] == pytest.approx(1.4) and got["proxy_gap_rise"] == pytest.approx(0.5)
    assert got["alarm"] == "disagreement" and got["alarm_stop"] and "140.0%" in got["alarm_reason"]
    assert alarm.evaluate(now, first, 1, args_for(overopt_alarm_disagreement=1.5))["alarm"] is None
    both = alarm.evaluate(now, first, 1, args_for(overopt_alarm_disagreement=1.0, overopt_alarm_gap=0.4))
    assert both["alarm"] == "disagreement+gap" and not both["alarm_stop"]
    assert alarm.evaluate(first, first, 0, args_for(overopt_alarm_disagreement=0.0))["alarm"] is None  # the baseline


# ----- end to end: the tiny base as the policy, an ensemble of two tiny reward models


@pytest.fixture(scope="module")
def ensemble(quick_models, tmp_path_factory) -> list[Path]:
    """quick_models' RM and a second member: the same RM with its score head tripled (members r and 3r: their std is
    |r|, so kept disagreement rises where the kept proxy reward does)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    second = tmp_path_factory.mktemp("alarm_rms") / "rm_x3"
    shutil.copytree(quick_models["rm"], second)
    model = AutoModelForSequenceClassification.from_pretrained(second)
    with torch.no_grad():
        model.score.weight.mul_(3.0)
    model.save_pretrained(second)
    return [quick_models["rm"], second]


def settings(models: dict, members: list[Path] | None, output_dir: Path, **overrides) -> list[str]:
    values = dict(
        model_name_or_path=str(models["policy"]), dataset_name=str(models["data"]), test_offset=QUICK_TEST_OFFSET,
        output_dir=str(output_dir), num_iterations=3, prompts_per_iteration=12, num_samples=4, max_new_tokens=10,
        heldout_prompts=8, generation_batch_size=16, max_length=96, per_device_train_batch_size=4,
        learning_rate=3e-3, logging_steps=50, seed=0, progress=False, disable_tqdm=True, offload_models="false",
        filter_min_tokens=1, filter_max_repeat_fraction=1.0, report_to="none",
    ) | overrides  # fmt: skip
    argv = [x for k, v in values.items() for x in (f"--{k}", str(v))]
    if members:
        argv += ["--reward_ensemble", *map(str, members)]
    return argv


def run(argv: list[str]) -> dict:
    from trl import ModelConfig, TrlParser

    configs = TrlParser((hdata.DataArguments, RaftConfig, ModelConfig)).parse_args_and_config(argv)
    return load_recipe("raft").main(*configs)


def rows(out: Path) -> list[dict]:
    return json.loads((out / "metrics_per_iteration.json").read_text())["iterations"]


@pytest.fixture(scope="module")
def watched(quick_models, ensemble, tmp_path_factory) -> Path:
    """3 iterations with the alarm at threshold 0 (fires on any rise), not stopping: where it fires is recorded."""
    out = tmp_path_factory.mktemp("alarm_watch")
    run(settings(quick_models, ensemble, out, overopt_alarm_disagreement=0.0))
    return out


@pytest.mark.slow
def test_the_score_stage_keeps_the_members_spread_and_metrics_report_it(watched):
    scored = read_jsonl(watched / "iter_000" / "scored.jsonl")
    for r in scored:  # members r and 3r: mean 2r, std |r|; the rule (mean) is the reward
        assert r["reward_mean"] == pytest.approx(r["rewards"], abs=1e-6)
        assert r["reward_std"] == pytest.approx([abs(x) / 2 for x in r["rewards"]], abs=1e-5)
    held = read_jsonl(watched / "iter_000" / "heldout_scored.jsonl")
    assert all(x["sampled_reward_std"] == pytest.approx(abs(x["sampled_reward"]) / 2, abs=1e-5) for x in held)
    its = rows(watched)
    assert [r["iteration"] for r in its] == [0, 1, 2]
    for r in its:
        assert r["proxy_gap"] == pytest.approx(r["reward_kept"] - r["heldout_reward"])
        assert r["disagreement_kept"] >= 0 and r["disagreement_all"] >= 0 and "disagreement_heldout" in r
    fired = [r["iteration"] for r in its if r["alarm"]]
    assert fired and fired[0] >= 1, its  # threshold 0: any rise of the kept disagreement over iteration 0's
    assert all(r["disagreement_kept_rise"] > 0 for r in its if r["alarm"])
    head = read_json(watched / "metrics.json")
    assert head["alarm_first_iteration"] == fired[0] and not head["stopped_by_alarm"]
    assert head["final_policy_iteration"] == 3 and (watched / "iter_002" / "policy").is_dir()
    assert "disagreement_kept" in (watched / "metrics.md").read_text()


@pytest.mark.slow
def test_the_alarm_stops_the_run_and_policy_i_is_final(quick_models, ensemble, watched, tmp_path):
    """stop_on_alarm: the run ends at the first alarmed iteration i, before its update; policy i is the final one;
    a rerun does not continue past it."""
    at = next(r["iteration"] for r in rows(watched) if r["alarm"])
    out = tmp_path / "stopped"
    argv = settings(quick_models, ensemble, out, overopt_alarm_disagreement=0.0, stop_on_alarm="true")
    head = run(argv)
    assert head["stopped_by_alarm"] and head["final_policy_iteration"] == at and head["iterations"] == at + 1
    assert not (out / f"iter_{at:03d}" / "policy").exists() and not (out / f"iter_{at + 1:03d}").exists()
    assert read_json(out / f"iter_{at:03d}" / "metrics.json")["alarm_stop"]
    # Policy `at`: iteration at-1's fine-tune, the same weights as the unstopped run's; the output folder holds it.
    policy = out / f"iter_{at - 1:03d}" / "policy" / "model.safetensors"
    assert (out / "model.safetensors").read_bytes() == policy.read_bytes()
    # Its final evaluation is policy `at`'s: the held-out answers equal iteration `at`'s (same policy, same seed).
    assert read_jsonl(out / "final" / "heldout_samples.jsonl") == read_jsonl(
        watched / f"iter_{at:03d}" / "heldout_samples.jsonl"
    )
    assert "stopped the run" in (out / "README.md").read_text()
    again = run(argv)  # a rerun: nothing more
    assert again == head and not (out / f"iter_{at + 1:03d}").exists()


@pytest.mark.slow
def test_resume_with_an_ensemble_matches_the_uninterrupted_run(quick_models, ensemble, watched, tmp_path):
    out = tmp_path / "resumed"
    for stop in ("0:score", "1:select"):
        with pytest.raises(StopRequested):
            run(settings(quick_models, ensemble, out, overopt_alarm_disagreement=0.0, stop_after=stop))
    run(settings(quick_models, ensemble, out, overopt_alarm_disagreement=0.0))
    for it in (0, 1, 2):
        for name in ("scored.jsonl", "kept.jsonl", "heldout_scored.jsonl"):
            assert read_jsonl(out / f"iter_{it:03d}" / name) == read_jsonl(watched / f"iter_{it:03d}" / name), name
    for mine, theirs in zip(rows(out), rows(watched)):
        for key in ("disagreement_kept", "disagreement_all", "proxy_gap", "alarm", "heldout_reward"):
            assert (
                mine[key] == pytest.approx(theirs[key]) if isinstance(mine[key], float) else mine[key] == theirs[key]
            )


def test_refusals_name_the_setting(quick_models, ensemble, tmp_path):
    bad = [
        (dict(overopt_alarm_disagreement=-0.1), "overopt_alarm_disagreement=-0.1: must be >= 0"),
        (dict(overopt_alarm_gap=-1.0), "overopt_alarm_gap=-1.0: must be >= 0"),
        (dict(stop_on_alarm="true"), "stop_on_alarm=true with no alarm"),
    ]
    for overrides, message in bad:
        with pytest.raises(ValueError, match=message):
            run(settings(quick_models, ensemble, tmp_path / "a", **overrides))
    with pytest.raises(ValueError, match="reward_ensemble of one folder"):
        run(settings(quick_models, ensemble[:1], tmp_path / "b", overopt_alarm_disagreement=0.5))
    single = settings(quick_models, None, tmp_path / "c", overopt_alarm_disagreement=0.5)
    with pytest.raises(ValueError, match="no members to disagree"):
        run(single + ["--reward_model_name_or_path", str(quick_models["rm"])])
    assert not (tmp_path / "c" / "iter_000").exists()  # refused before any stage
    assert math.isinf(alarm.rise(0.1, 0.0)) and alarm.rise(None, 0.1) is None
