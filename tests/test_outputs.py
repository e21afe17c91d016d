"""Output folders: a finished model is never replaced unasked, an unusable folder fails before training."""

from __future__ import annotations

import pytest
from trl import ModelConfig

from hhrm import data, outputs, sft

from conftest import load_recipe


def finished_model(folder):
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"trained weights")
    (folder / "metrics.json").write_text("{}")
    return folder


def test_a_folder_with_a_model_is_refused_unless_overwrite_is_asked(tmp_path):
    out = finished_model(tmp_path / "sft")
    with pytest.raises(ValueError, match=r"output_dir=.*already holds a model.*--overwrite_output_dir true"):
        outputs.check_output_dir(out, "sft")
    assert outputs.check_output_dir(out, "sft", overwrite=True) == out
    assert outputs.check_output_dir(tmp_path / "new" / "rm", "rm") == tmp_path / "new" / "rm"  # created


def test_raft_never_writes_into_another_stage_folder_but_resumes_its_own(tmp_path):
    out = finished_model(tmp_path / "policy_copy")
    with pytest.raises(ValueError, match="RAFT does not write into another stage's folder"):
        outputs.check_output_dir(out, "raft", overwrite=True)
    (out / "run.json").write_text("{}")  # a RAFT run folder: re-running resumes it
    assert outputs.check_output_dir(out, "raft") == out


def test_unusable_folders_fail_naming_output_dir(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="is a file"):
        outputs.check_output_dir(a_file, "sft")
    with pytest.raises(ValueError, match="not writable"):
        outputs.check_output_dir(a_file / "below", "sft")


def test_old_results_are_removed_before_new_weights(tmp_path):
    out = finished_model(tmp_path / "rm")
    (out / "README.md").write_text("old card")
    (out / "eval_rm.json").write_text("{}")
    outputs.clear_results(out)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]


def test_sft_recipe_refuses_a_finished_model_before_loading_anything(tiny, tmp_path):
    out = finished_model(tmp_path / "sft")
    args = sft.SFTConfig(output_dir=str(out), activation_checkpointing=False, report_to="none", max_steps=1)
    data_args = data.DataArguments(dataset_name=str(tiny["data"]), test_offset=100)
    with pytest.raises(ValueError, match="already holds a model"):
        load_recipe("sft").main(data_args, args, ModelConfig(model_name_or_path=str(tiny["base"])))
    assert (out / "model.safetensors").read_bytes() == b"trained weights"
    assert (out / "metrics.json").is_file()


@pytest.mark.parametrize(
    ("given", "expected"), [("true", True), ("True", True), ("false", None), ("ckpt/x", "ckpt/x")]
)
def test_resume_from_checkpoint_true_means_the_latest_checkpoint(given, expected):
    args = sft.SFTConfig(output_dir="unused", activation_checkpointing=False, resume_from_checkpoint=given)
    assert args.resume_from_checkpoint == expected


def test_resumed_train_metrics_say_what_they_cover():
    from hhrm import reporting

    assert reporting.train_metrics({"loss": 1.0}) == {"train_loss": 1.0}
    resumed = reporting.train_metrics({"train_runtime": 3.0}, resumed_from=True)
    assert resumed == {"train_runtime": 3.0, "train_resumed_from": "latest checkpoint"}
