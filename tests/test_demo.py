"""`make demo` end to end: the real recipes on the embedded default (~8 minutes on 2 cores)."""

import json
import sys
from pathlib import Path

import pytest

from conftest import run_process

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_sft_rm_score_raft_and_reports(tmp_path):
    out = tmp_path / "tiny"
    proc = run_process([sys.executable, str(ROOT / "scripts" / "demo.py"), "--out", str(out)], 480, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "demo_summary.json").read_text())
    stages = summary["stages"]
    assert list(stages) == ["sft", "rm", "score", "raft"]
    for name, stage in stages.items():
        assert stage["seconds"] > 0 and stage["max_rss_mb"] > 0, name
        if name == "score":
            continue
        assert (Path(stage["output_dir"]) / "model.safetensors").is_file(), name
        assert (Path(stage["output_dir"]) / "README.md").is_file(), name
    sft, rm, raft = (stages[k]["metrics"] for k in ("sft", "rm", "raft"))
    assert sft["eval_loss"] < 0.2 * sft["eval_loss_before"]
    assert sft["gold_accuracy"] > 0.6  # greedy answers of the SFT policy on held-out prompts
    # The RM stage's target: >= 90 % exact held-out accuracy, also on wrong-but-well-formed rejections.
    assert rm["eval_accuracy_exact"] >= 0.9 and rm["eval_accuracy_rejected_wrong_answer"] >= 0.9
    assert rm["gold_auc"] > 0.7
    # make score on the demo RM, over the pairs its evaluation used: the same accuracy, every pair scored.
    score = stages["score"]["metrics"]
    assert score["accuracy"] == rm["eval_accuracy_exact"] and score["scored"] == score["rows"] == rm["eval_pairs"]
    assert len((Path(stages["score"]["output_dir"]) / "scores.jsonl").read_text().splitlines()) == score["rows"]
    assert (out / "rm" / "runs").is_dir()  # TensorBoard curves, the recipes' default
    # RAFT raises the proxy (its own reward) and the real objective (gold accuracy of its samples, on
    # held-out prompts and on each iteration's fresh training prompts).
    assert raft["reward_first_sample_last"] > raft["reward_first_sample_first"]
    assert raft["gold_accuracy_sampled_last"] > raft["gold_accuracy_sampled_first"] + 0.02
    assert raft["gold_accuracy_first_sample_last"] > raft["gold_accuracy_first_sample_first"] + 0.02
    assert (out / "raft" / "reward_curve.png").is_file()
    # The printed summary names where everything is and the headline numbers.
    assert str(out / "raft") in proc.stdout and "eval_accuracy_exact=" in proc.stdout
