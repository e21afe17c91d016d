"""A full disk (issue 22, items 7 and 8): refused before training when the model cannot fit, and a save that fails
for lack of space leaves the old model whole, no staging folder and no temporary file, with one line naming the
folder and the space needed. Real disks: small tmpfs mounts (root only; skipped where mounting is not permitted)."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from trl import ModelConfig

from hhrm import data, lifetime, outputs, reporting, runtime, sft
from hhrm.raft import files

from conftest import QUIET_CPU, load_recipe

PAGE = 4096


class SmallDisk:
    """A tmpfs mounted at ``path``; :meth:`resize` remounts it with another size (tmpfs keeps its files)."""

    def __init__(self, path: Path):
        self.path = path

    def resize(self, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True, capture_output=True)

    def used(self) -> int:
        st = os.statvfs(self.path)
        return (st.f_blocks - st.f_bfree) * st.f_frsize


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs (resizable), always unmounted afterwards; skipped where mounting is not permitted."""
    mount = tmp_path / f"disk_{uuid.uuid4().hex[:8]}"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small disk")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield SmallDisk(mount)
    finally:
        for folder in [f for f in lifetime._held if f.is_relative_to(mount.resolve())]:
            lifetime.unlock_folder(folder)  # an open lock file would keep the mount busy
        subprocess.run(["umount", str(mount)], check=True)


def _sft(tiny, out: Path, **overrides):
    args = sft.SFTConfig(
        output_dir=str(out), max_steps=1, max_length=64, per_device_train_batch_size=4, eval_rows=8,
        gold_eval_prompts=4, gold_max_new_tokens=4, seed=0, **(QUIET_CPU | overrides),
    )  # fmt: skip
    data_args = data.DataArguments(dataset_name=str(tiny["data"]), test_offset=100)
    return load_recipe("sft").main(data_args, args, ModelConfig(model_name_or_path=str(tiny["base"])))


def _contents(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != lifetime.LOCK_FILE
    }


def _leftovers(folder: Path) -> list[str]:
    names = (outputs.STAGING, outputs.REPLACED)
    return [str(p) for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name in names]


def test_a_run_is_refused_before_training_when_the_disk_cannot_hold_the_model(tiny, small_disk):
    out = small_disk.path / "sft"
    with pytest.raises(ValueError) as refused:
        _sft(tiny, out)
    message = str(refused.value)
    assert message.startswith(f"output_dir={str(out)!r}: the model needs about 5.0 MB") and "\n" not in message
    assert "1.0 MB free" in message and "free some space there or choose another output_dir" in message
    assert runtime.raised_by_hhrm(refused.value)  # so the recipe prints it as one line, exit 2
    assert not _contents(out) and not _leftovers(out)  # refused before training: nothing trained or written


def test_a_save_that_fills_the_disk_leaves_the_old_model_whole(tiny, small_disk):
    """The old model is complete; the disk holds it and the new model's weights but not their safetensors header:
    the check before training passes, the write itself fails (safetensors' SafetensorError)."""
    small_disk.resize(64 * 2**20)
    out = small_disk.path / "sft"
    _sft(tiny, out)
    before = _contents(out)
    assert {"model.safetensors", "config.json", "README.md", "metrics.json", "data_report.json"} <= set(before)
    weights = outputs.weights_bytes(out)
    pages = -(-weights // PAGE)  # free space just over the weights alone, plus the next run's lock file
    small_disk.resize(small_disk.used() + (pages + 1) * PAGE)
    with pytest.raises(ValueError) as failed:
        _sft(tiny, out, overwrite_output_dir=True, learning_rate=1e-2)
    message = str(failed.value)
    assert message.startswith(f"output_dir={str(out)!r}: no space left on device while writing the model")
    assert f"it needs about {outputs.size_text(weights)} free" in message and "\n" not in message
    causes, exc = [], failed.value
    while exc is not None:
        causes, exc = causes + [type(exc).__name__], exc.__cause__
    assert "SafetensorError" in causes  # the raw error of issue 22, now one line
    assert runtime.raised_by_hhrm(failed.value)
    assert _contents(out) == before  # weights, config, tokenizer, card, metrics, data report: byte-identical
    assert not _leftovers(out)


def test_writes_that_fail_leave_no_temporary_file(small_disk):
    small_disk.resize(64 * 1024)
    disk = small_disk.path
    reporting.write_json({"old": 1}, disk / "metrics.json")
    free = outputs.free_bytes(disk)
    with pytest.raises(
        ValueError, match=r"no space left on device while writing metrics\.json \(it needs about 2\d\d\.\d KB"
    ):
        reporting.write_json({"rows": ["x" * 1000] * 200}, disk / "metrics.json")
    rows = ({"text": "y" * 1000} for _ in range(500))
    with pytest.raises(ValueError) as full:
        reporting.write_jsonl(rows, disk / "scored.jsonl")
    assert str(full.value).startswith(f"{disk}: no space left on device while writing scored.jsonl (it needs at least")
    assert runtime.raised_by_hhrm(full.value)

    def broken():  # a failure that is not the disk's: the same cleanup, the error itself
        yield {"a": 1}
        raise RuntimeError("a row could not be made")

    with pytest.raises(RuntimeError, match="could not be made"):
        reporting.write_jsonl(broken(), disk / "other.jsonl")
    assert sorted(p.name for p in disk.iterdir()) == ["metrics.json"]  # no *.tmp, no half file
    assert reporting.read_json(disk / "metrics.json") == {"old": 1} and outputs.free_bytes(disk) == free


def test_raft_refuses_a_fine_tune_the_disk_cannot_hold_and_removes_a_half_written_policy(tiny, small_disk):
    it_dir = small_disk.path / "raft" / "iter_000"
    it_dir.mkdir(parents=True)
    with pytest.raises(ValueError, match=r"output_dir=.*raft': the policy of iter_000 .* needs about 5\.0 MB"):
        with files.fine_tune_space(it_dir, str(tiny["base"]), None, main=True):
            pass
    with pytest.raises(ValueError, match="needs about 2.5 MB"):  # saved in bf16: half the float32 size
        with files.fine_tune_space(it_dir, str(tiny["base"]), "bfloat16", main=True):
            pass
    (it_dir / "policy").mkdir()
    (it_dir / "policy" / files.POLICY_DONE).write_text("iteration 0\n")  # done: a resume needs no space
    (it_dir / "policy.tmp").mkdir()
    with pytest.raises(RuntimeError):
        with files.fine_tune_space(it_dir, str(tiny["base"]), None, main=True):
            (it_dir / "policy.tmp" / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("the save failed")
    assert not (it_dir / "policy.tmp").exists() and (it_dir / "policy").is_dir()

    # The final policy's files are linked (here copied: another disk) whole or not at all.
    (small_disk.path / "raft" / "model.safetensors").write_bytes(b"the final policy, as linked before")
    with pytest.raises(ValueError, match=r"no space left on device while writing the final policy's model"):
        files.link_policy(tiny["base"], small_disk.path / "raft")
    assert (small_disk.path / "raft" / "model.safetensors").read_bytes() == b"the final policy, as linked before"
    assert not _leftovers(small_disk.path / "raft")
