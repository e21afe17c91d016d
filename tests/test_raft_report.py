"""RAFT's run folder and report without any model: metrics from hand-written stage files, resume checks."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from hhrm import model_checks
from hhrm.raft import files, report
from hhrm.raft.prompts import draw_prompts
from hhrm.reporting import read_json, write_json, write_jsonl

Q1 = "###Human: Which number is larger, 12 or 40? ###Assistant:"
Q2 = "###Human: How many centimeters are in 3 meters? ###Assistant:"


def fake_iteration(folder, gold_right: bool = True):
    """The files the stages of one iteration leave behind, written by hand."""
    right1, wrong1 = " Of 12 and 40, the larger is 40.", " Of 12 and 40, the larger is 12."
    right2, wrong2 = " 3 meters is 300 centimeters.", " 3 meters is 30 centimeters."
    write_jsonl(
        [
            {
                "index": 0,
                "prompt": Q1,
                "responses": [right1, wrong1],
                "response_tokens": [9, 9],
                "rewards": [2.0, 0.0],
            },
            {
                "index": 5,
                "prompt": Q2,
                "responses": [wrong2, right2],
                "response_tokens": [7, 7],
                "rewards": [1.0, 3.0],
            },
        ],
        folder / "scored.jsonl",
    )
    write_jsonl(
        [
            {"index": 0, "sample": 0, "prompt": Q1, "completion": right1, "reward": 2.0},
            {"index": 5, "sample": 1, "prompt": Q2, "completion": right2, "reward": 3.0},
        ],
        folder / "kept.jsonl",
    )
    write_jsonl(
        [
            {
                "position": 0,
                "prompt": Q1,
                "sampled": right1 if gold_right else wrong1,
                "greedy": right1,
                "sampled_reward": 2.0,
                "greedy_reward": 2.0,
            }
        ],
        folder / "heldout_scored.jsonl",
    )
    write_json({"generated_tokens": 32, "generate_seconds": 2.0, "seconds": 2.5}, folder / "generate.stats.json")
    write_json(
        {"filter_counts": {"empty": 0, "too_short": 1, "repetitive": 0, "pattern": 0, "passed": 3}, "seconds": 0.1},
        folder / "select.stats.json",
    )
    write_json({"train_loss": 0.5, "seconds": 3.0}, folder / "train.stats.json")


def test_iteration_metrics_from_the_stage_files(tmp_path):
    fake_iteration(tmp_path)
    m = report.iteration_metrics(tmp_path, 0, "policy0", gold=True)
    assert m["reward_first_sample"] == 1.5 and m["reward_best_of_k"] == 2.5 and m["reward_mean_all"] == 1.5
    assert m["reward_kept"] == 2.5 and m["kept"] == 2 and m["response_tokens_mean"] == 8.0
    assert m["gold_accuracy_first_sample"] == 0.5  # right for Q1's first sample, wrong for Q2's
    assert m["gold_accuracy"] == 1.0 and m["gold_accuracy_sampled"] == 1.0 and m["heldout_reward"] == 2.0
    assert m["filtered_too_short"] == 1 and m["filtered_passed"] == 3
    assert m["generated_tokens_per_second"] == 16.0 and m["train_loss"] == 0.5
    assert m["seconds_train"] == 3.0 and m["seconds_score"] is None  # no score stats written: unknown, not 0


def test_run_reports_table_headline_and_curve(tmp_path):
    rows = []
    for it, right in enumerate((False, True)):
        folder = files.iter_dir(tmp_path, it)
        folder.mkdir()
        fake_iteration(folder, gold_right=right)
        rows.append(report.iteration_metrics(folder, it, f"p{it}", gold=True))
    final = {"heldout_reward": 2.5, "gold_accuracy": 1.0, "gold_accuracy_sampled": 1.0}
    report.write_run_reports(tmp_path, rows, final, "RAFT on tiny")
    assert (tmp_path / "reward_curve.png").stat().st_size > 1000
    table = (tmp_path / "metrics.md").read_text().splitlines()
    assert table[0].startswith("| iteration | reward_first_sample |") and table[-1].startswith("| final |")
    assert read_json(tmp_path / "metrics_per_iteration.json")["iterations"][1]["gold_accuracy_sampled"] == 1.0
    args = SimpleNamespace(prompts_per_iteration=2, num_samples=2, selection="best_of_k")
    head = report.run_headline(rows, final, args, prompt_set=10, gold=True)
    assert head["gold_accuracy_sampled_first"] == 0.0 and head["gold_accuracy_sampled_last"] == 1.0
    assert head["seconds_train_total"] == 6.0 and head["prompt_set"] == 10
    assert set(report.HEADLINE) <= set(head)


def fake_dpo_iteration(folder):
    """An update=dpo iteration: pairs as the kept set, skip counts from select, DPO's metrics from train."""
    fake_iteration(folder)
    right1, wrong1 = " Of 12 and 40, the larger is 40.", " Of 12 and 40, the larger is 12."
    pair = {"index": 0, "prompt": Q1, "chosen": right1, "rejected": wrong1, "chosen_sample": 0, "rejected_sample": 1}
    write_jsonl([pair | {"reward": 2.0, "rejected_reward": 0.0}], folder / "kept.jsonl")
    select = read_json(folder / "select.stats.json") | {"skipped": {"too_few_valid": 0, "within_margin": 1}}
    write_json(select | {"kept": 1}, folder / "select.stats.json")
    train = {"train_loss": 0.6, "dpo_reward_accuracy": 0.75, "dpo_reward_margin": 0.2, "seconds": 3.0}
    write_json(train, folder / "train.stats.json")


def test_dpo_iterations_report_pairs_skips_and_dpo_metrics(tmp_path):
    rows = []
    for it in range(2):
        folder = files.iter_dir(tmp_path, it)
        folder.mkdir()
        fake_dpo_iteration(folder)
        rows.append(report.iteration_metrics(folder, it, f"p{it}", gold=True))
    m = rows[0]
    assert m["kept"] == 1 and m["reward_kept"] == 2.0 and m["reward_rejected"] == 0.0
    assert m["skipped_within_margin"] == 1 and m["skipped_too_few_valid"] == 0
    assert m["dpo_reward_accuracy"] == 0.75 and m["dpo_reward_margin"] == 0.2
    header = report.iterations_table(rows, None).splitlines()[0]
    assert "| kept | skipped_within_margin | reward_rejected | dpo_reward_accuracy | dpo_reward_margin |" in header
    assert "skipped_too_few_valid" not in header  # a reason that never occurred gets no column
    args = SimpleNamespace(
        prompts_per_iteration=2,
        num_samples=2,
        selection="best_of_k",
        update="dpo",
        beta=0.1,
        dpo_loss_type=["sigmoid"],
        reward_model_name_or_path="rm",
        reward_model_url=None,
    )
    head = report.run_headline(rows, {}, args, prompt_set=10, gold=True)
    assert head["update"] == "dpo"
    configs = {"raft": args, "model": SimpleNamespace(model_name_or_path="sft")}
    card = report.model_card(rows, {}, head, configs, {})
    assert "TRL `DPOTrainer` on best-vs-worst-of-K pairs" in card.summary and "SFTTrainer" not in card.summary
    args.update = "sft"
    assert "TRL `SFTTrainer`" in report.model_card(rows, {}, head, configs, {}).summary


def test_sft_iterations_show_no_dpo_columns_and_headline_says_sft(tmp_path):
    fake_iteration(tmp_path)
    write_json(
        read_json(tmp_path / "select.stats.json") | {"skipped": {"no_valid_sample": 0}}, tmp_path / "select.stats.json"
    )
    m = report.iteration_metrics(tmp_path, 0, "p0", gold=True)
    assert m["skipped_no_valid_sample"] == 0 and "dpo_reward_accuracy" not in m and "reward_rejected" not in m
    header = report.iterations_table([m], None).splitlines()[0]
    assert "dpo_" not in header and "skipped" not in header and "reward_rejected" not in header
    args = SimpleNamespace(prompts_per_iteration=2, num_samples=2, selection="best_of_k")  # a config without update
    assert report.run_headline([m], {}, args, prompt_set=10, gold=True)["update"] == "sft"


def test_reward_curve_has_a_proxy_vs_gold_panel_in_iteration_order(tmp_path):
    import matplotlib.pyplot as plt

    rows = []
    for it, right in enumerate((False, True, True)):
        folder = files.iter_dir(tmp_path, it)
        folder.mkdir()
        fake_iteration(folder, gold_right=right)
        rows.append(report.iteration_metrics(folder, it, f"p{it}", gold=True) | {"heldout_reward": 1.0 + it})
    final = {"heldout_reward": 5.0, "gold_accuracy": 1.0, "gold_accuracy_sampled": 0.0}
    fig = report.reward_curve_figure(rows, final, "RAFT on tiny")
    try:
        assert len(fig.axes) == 3
        panel = fig.axes[2]
        sampled = next(line for line in panel.get_lines() if line.get_label() == "sampled answer")
        assert list(sampled.get_xdata()) == [1.0, 2.0, 3.0, 5.0]  # iterations 0, 1, 2, then the final policy
        assert list(sampled.get_ydata()) == [0.0, 1.0, 1.0, 0.0]
        assert [t.get_text() for t in panel.texts][:4] == ["0", "1", "2", "3"]
        assert "proxy" in panel.get_xlabel() and "gold" in panel.get_ylabel()
    finally:
        plt.close(fig)
    no_gold = [{k: v for k, v in r.items() if not k.startswith("gold")} for r in rows]
    fig = report.reward_curve_figure(no_gold, {"heldout_reward": 5.0}, "no gold")
    assert len(fig.axes) == 1
    plt.close(fig)
    report.plot_reward_curve(rows, final, tmp_path / "reward_curve.png", "RAFT on tiny")
    from PIL import Image

    with Image.open(tmp_path / "reward_curve.png") as png:
        assert png.size[0] > 2.5 * png.size[1]  # three panels side by side


def test_mean_leaves_out_missing_values():
    assert report.mean([1.0, None, float("nan"), 3.0]) == 2.0
    assert math.isnan(report.mean([]))


def test_shards_cover_every_item_once_and_draws_are_pure():
    items = list(range(11))
    shards = [files.shard(items, r, 3) for r in range(3)]
    assert sorted(x for s in shards for x in s) == items and max(map(len, shards)) - min(map(len, shards)) <= 1
    assert draw_prompts(100, 10, seed=0, iteration=1) == draw_prompts(100, 10, seed=0, iteration=1)
    assert draw_prompts(100, 10, seed=0, iteration=1) != draw_prompts(100, 10, seed=0, iteration=2)
    with pytest.raises(ValueError, match="prompts_per_iteration"):
        draw_prompts(5, 6, seed=0, iteration=0)


def test_resume_check_names_the_changed_settings(tmp_path):
    fingerprint = {"data": {"test_offset": 100}, "model": "sft", "raft": {"num_samples": 4, "seed": 0}}
    files.check_resume(tmp_path, fingerprint)  # no run.json yet: nothing to compare
    write_json({"fingerprint": fingerprint}, tmp_path / "run.json")
    files.check_resume(tmp_path, fingerprint)
    changed = {"data": {"test_offset": 100}, "model": "other", "raft": {"num_samples": 3, "seed": 0}}
    with pytest.raises(ValueError, match=r"other settings \(raft.num_samples, model_name_or_path\)"):
        files.check_resume(tmp_path, changed)


def test_a_setting_added_by_a_later_hhrm_resumes_at_its_default(tmp_path):
    """A run folder written before a setting existed resumes while that setting is at its default, not otherwise."""
    from hhrm.raft.config import RaftConfig

    defaults = files.setting_defaults(raft=RaftConfig)
    assert defaults["raft"]["selection_kl_beta"] == 0.0 and defaults["raft"]["stop_on_alarm"] is False
    old = {"data": {}, "model": "sft", "raft": {"num_samples": 4}}
    write_json({"fingerprint": old}, tmp_path / "run.json")
    now = {"data": {}, "model": "sft", "raft": {"num_samples": 4, "selection_kl_beta": 0.0, "stop_on_alarm": False}}
    files.check_resume(tmp_path, now, defaults)
    with pytest.raises(ValueError, match=r"other settings \(raft.selection_kl_beta\)"):
        files.check_resume(tmp_path, now | {"raft": now["raft"] | {"selection_kl_beta": 0.3}}, defaults)
    with pytest.raises(ValueError, match=r"raft.stop_on_alarm"):  # without the defaults: every new key has changed
        files.check_resume(tmp_path, now)


def test_a_policy_folder_is_done_only_once_published(tmp_path):
    tmp, final = tmp_path / "policy.tmp", tmp_path / "policy"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"weights")
    assert not files.is_done(final) and not files.is_done(tmp)
    files.publish_policy(tmp, final, iteration=0)
    assert files.is_done(final) and not tmp.exists()
    out = tmp_path / "out"
    out.mkdir()
    files.link_policy(final, out)
    assert (out / "model.safetensors").read_bytes() == b"weights" and not (out / files.POLICY_DONE).exists()


def test_fingerprint_changes_when_an_input_model_is_retrained(tmp_path):
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "model.safetensors").write_bytes(b"v1")
    args = SimpleNamespace(reward_model_name_or_path=str(rm), num_samples=4, generation_batch_size=8)
    model_args = SimpleNamespace(model_name_or_path="org/policy")  # a hub id stands for itself

    def identity():  # what hhrm.reward.sources.LocalModel.identity() holds for the folder
        return {"weights": model_checks.weights_identity(str(rm)), "convention": "hhrm"}

    before = files.run_fingerprint(args, {"test_offset": 1}, model_args, 1, identity())
    write_json({"fingerprint": before}, tmp_path / "run.json")
    (rm / "model.safetensors").write_bytes(b"v2, retrained")
    after = files.run_fingerprint(args, {"test_offset": 1}, model_args, 1, identity())
    with pytest.raises(ValueError, match=r"inputs.reward_model"):
        files.check_resume(tmp_path, after)
    with pytest.raises(ValueError, match=r"inputs.world_size"):
        files.check_resume(
            tmp_path,
            files.run_fingerprint(args, {"test_offset": 1}, model_args, 2, identity())
            | {"inputs": before["inputs"] | {"world_size": 2}},
        )
    args.generation_batch_size = 16  # how prompts are batched changes the samples: not resumable
    with pytest.raises(ValueError, match=r"raft.generation_batch_size"):
        files.check_resume(
            tmp_path,
            files.run_fingerprint(args, {"test_offset": 1}, model_args, 1, identity()) | {"inputs": before["inputs"]},
        )
