"""Output folders: a finished model is never replaced unasked nor half-replaced, an unusable folder fails before
training, and one run at a time writes a folder."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest
from trl import ModelConfig

from hhrm import data, lifetime, outputs, sft

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


def old_model(folder):
    """A finished model folder as SFT/RM leave it, with what a new model must not touch (checkpoints, curves)."""
    files = {
        "model-00001-of-00002.safetensors": b"old shard 1",
        "model-00002-of-00002.safetensors": b"old shard 2",
        "model.safetensors.index.json": b"{}",
        "config.json": b"old config",
        "tokenizer.json": b"old tokenizer",
        "README.md": b"old card",
        "metrics.json": b"{}",
        "data_report.json": b"{}",
        "eval_rm.json": b"{}",
        "adapter/adapter_model.safetensors": b"old adapter",
        "adapter/adapter_config.json": b"old adapter config",
        "checkpoint-1/model.safetensors": b"a checkpoint",
        "runs/events.out.tfevents.1": b"curves",
        "notes.txt": b"the user's",
    }
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return files


def contents(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_staged_model_replaces_the_old_one_whole_or_not_at_all(tmp_path):
    out = tmp_path / "sft"
    old = old_model(out)
    with pytest.raises(RuntimeError, match="the evaluation failed"):
        with outputs.staged(out) as folder:
            assert folder == out / outputs.STAGING
            (folder / "model.safetensors").write_bytes(b"new weights")
            (folder / "config.json").write_bytes(b"new config")
            raise RuntimeError("the evaluation failed")
    assert contents(out) == old  # untouched, and no staging folder left
    with pytest.raises(ValueError) as full:
        with outputs.staged(out, need=7 * 10**9) as folder:
            (folder / "model.safetensors").write_bytes(b"new weights")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(full.value).startswith(f"output_dir={str(out)!r}: no space left on device while writing the model")
    assert "it needs about 7.0 GB free" in str(full.value) and contents(out) == old

    new = {"model.safetensors": b"new weights", "config.json": b"new config", "tokenizer.json": b"new tokenizer"}
    new |= {"README.md": b"new card", "metrics.json": b'{"new": 1}', "adapter/adapter_model.safetensors": b"new"}
    with outputs.staged(out) as folder:
        for name, content in new.items():
            (folder / name).parent.mkdir(exist_ok=True)
            (folder / name).write_bytes(content)
    kept = {k: v for k, v in old.items() if k.startswith(("checkpoint-1/", "runs/")) or k == "notes.txt"}
    assert contents(out) == new | kept  # the old shards, index, adapter config, data report, eval_rm.json: stale


def test_a_folder_is_locked_while_a_stage_writes_it(tmp_path):
    out = tmp_path / "rm"
    assert outputs.check_output_dir(out, "rm") == out
    assert (out / lifetime.LOCK_FILE).is_file()
    assert outputs.check_output_dir(out, "rm") == out  # the same process (an in-process re-run): no refusal
    other = subprocess.run(
        [sys.executable, "-c", f"from hhrm import outputs; outputs.check_output_dir({str(out)!r}, 'rm')"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert other.returncode != 0 and f"output_dir={str(out)!r} is being written by another run (pid " in other.stderr
    outputs.release_output_dir(out)
    assert not (out / lifetime.LOCK_FILE).exists()  # released: the file goes, a later run locks a new one
    again = subprocess.run(other.args, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert not (out / lifetime.LOCK_FILE).exists()  # and removes it when it ends


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
