"""A stage's output folder: checked before any work, written by one run at a time, never replaced unasked, and
replaced whole or not at all.

* A folder that already holds a model is refused unless the user asks for the overwrite
  (``overwrite_output_dir``), so a finished SFT or reward model is never replaced by accident. A RAFT
  run folder is the exception: re-running the same command resumes it (RAFT checks its settings).
* The folder must be writable: a read-only folder fails before training, not at save time.
* One run at a time: :func:`check_output_dir` locks the folder (:func:`hhrm.lifetime.lock_folder`) until the stage
  ends (:func:`release_output_dir`) or its process dies, so a second run into it is refused in one line.
* A stage writes its model and reports into a staging folder (:func:`staged`); only once all of it is written are
  the old model's files replaced by the new ones (renames). A failure, a full disk included, leaves the old model
  whole and no staging folder behind. Trainer checkpoints (``checkpoint-*``) and ``runs/`` stay where they are.
* Free space is checked against the model's size before training (:func:`check_free_space`), and a full disk while
  saving is one line naming the folder and the space needed (:func:`space_errors`), not a serializer's traceback.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import math
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hhrm import lifetime

MODEL_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
)
# What a stage writes beside its weights (the RAFT run folder's own files are left to its resume logic).
RESULT_FILES = (
    "README.md",
    "metrics.json",
    "data_report.json",
    "eval_rm.json",
    "metrics_per_iteration.json",
    "metrics.md",
    "reward_curve.png",
)
RAFT_RUN_FILE = "run.json"
STAGING = ".hhrm_staging"  # inside output_dir: the same disk (renames, no copies) and the same path on every rank
REPLACED = ".hhrm_replaced"  # the old model's files for the instant of the swap
# An old model's files that a new model makes stale even where it writes no file of that name (an old shard
# index or shard, an adapter, another kind of tokenizer file), besides the reports that describe the old model.
MODEL_FOLDER_FILES = (
    "*.safetensors",
    "*.bin",
    "*.index.json",
    "*.pt",
    "config.json",
    "generation_config.json",
    "adapter",
    "adapter_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "chat_template.*",
    *RESULT_FILES,
)


def holds_model(folder: Path) -> bool:
    return any((folder / name).is_file() for name in MODEL_FILES)


def check_model_out(out: Path, overwrite: bool) -> None:
    """An imported model's ``--out``: a folder, and one that holds no model unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder: choose another --out")
    if holds_model(out) and not overwrite:
        found = ", ".join(n for n in MODEL_FILES if (out / n).is_file())
        raise ValueError(
            f"--out {str(out)!r} already holds a model ({found}); choose a new --out, "
            "or pass --overwrite true to replace it"
        )


def write_model_folder(model: Any, tokenizer: Any, card: str, out: Path, overwrite: bool) -> None:
    """The folder every import source ends in: weights, config, generation config, tokenizer and the card."""
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:  # stale shards from an earlier, differently sharded model would be loaded with the new one
        for stale in [*out.glob("model*.safetensors*"), *out.glob("pytorch_model*")]:
            stale.unlink()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(card, encoding="utf-8")


def check_output_dir(output_dir: str | os.PathLike, stage: str, overwrite: bool = False) -> Path:
    """Refuse an output folder that would lose a finished model, fail at save time, or that another run is
    writing; create and lock it otherwise (until :func:`release_output_dir` or the end of the process)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir={str(out)!r} is a file, not a folder: choose another output_dir")
    resumable = stage == "raft" and (out / RAFT_RUN_FILE).is_file()
    if holds_model(out) and not resumable and (stage == "raft" or not overwrite):
        found = ", ".join(n for n in MODEL_FILES if (out / n).is_file())
        fix = (
            "RAFT does not write into another stage's folder: choose a new output_dir"
            if stage == "raft"
            else "choose a new output_dir, or pass --overwrite_output_dir true to replace it"
        )
        raise ValueError(f"output_dir={str(out)!r} already holds a model ({found}); {fix}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".hhrm_write_check_{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(
            f"output_dir={str(out)!r} is not writable ({e.strerror}): choose another output_dir"
        ) from None
    lifetime.lock_folder(out, "output_dir")
    return out


def release_output_dir(output_dir: str | os.PathLike) -> None:
    """The stage is over: let the next run into ``output_dir`` (a process that dies releases it anyway)."""
    lifetime.unlock_folder(output_dir)


# --------------------------------------------------------------------------------------------
# Writing a model folder whole


@contextlib.contextmanager
def staged(output_dir: str | os.PathLike, accelerator: Any = None, need: int | None = None) -> Iterator[Path]:
    """A staging folder inside ``output_dir`` for the stage's weights, tokenizer, configs, card, metrics and reports;
    on success its files replace the old model's (:func:`swap_in`), on failure it is removed and the old folder is
    as it was. A full disk becomes one line naming the folder and ``need`` (the bytes to write).

    ``accelerator``: every rank enters (they all take part in ``save_model`` under DDP, ZeRO and FSDP); the main
    process prepares and swaps, the others wait at its barriers. None: one process.
    """
    out = Path(output_dir)
    folder = out / STAGING
    main = accelerator is None or accelerator.is_main_process
    barrier = accelerator.wait_for_everyone if accelerator is not None else (lambda: None)
    if main:
        shutil.rmtree(folder, ignore_errors=True)  # what a killed run left
        folder.mkdir(parents=True)
    barrier()
    try:
        yield folder
        barrier()
        if main:
            swap_in(folder, out)
    except BaseException as exc:
        if main:
            shutil.rmtree(folder, ignore_errors=True)
        if isinstance(exc, Exception) and disk_full(exc):
            raise ValueError(space_message(out, need, "the model")) from exc
        raise
    barrier()


def swap_in(folder: Path, out: Path) -> None:
    """Replace ``out``'s model by the complete one in ``folder``: the old files the new set replaces or makes stale
    (:data:`MODEL_FOLDER_FILES`) move aside, the new ones move in, then the old ones are deleted. All renames on
    one disk: if one fails, what moved moves back."""
    new = sorted(p.name for p in folder.iterdir())
    old = sorted(p.name for p in out.iterdir() if p.name in new or _model_file(p.name))
    aside = out / REPLACED
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir()
    moved_old, moved_new = [], []
    try:
        for name in old:
            os.replace(out / name, aside / name)
            moved_old.append(name)
        for name in new:
            os.replace(folder / name, out / name)
            moved_new.append(name)
    except OSError:
        for name in moved_new:
            os.replace(out / name, folder / name)
        for name in moved_old:
            os.replace(aside / name, out / name)
        aside.rmdir()
        raise
    shutil.rmtree(aside)
    folder.rmdir()


def _model_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in MODEL_FOLDER_FILES)


# --------------------------------------------------------------------------------------------
# Free space

_SAFETENSORS_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2}
_DTYPE_ITEMSIZE = {"float32": 4, "float": 4, "float64": 8, "double": 8, "float16": 2, "half": 2, "bfloat16": 2}


def model_bytes(model: Any) -> int:
    """The bytes ``save_pretrained`` writes for ``model``'s weights: LoRA matrices merged away, a ZeRO-3 shard
    counted whole (``ds_numel``), tied weights once."""
    return sum(
        getattr(p, "ds_numel", p.numel()) * p.element_size()
        for name, p in model.named_parameters()
        if "lora_" not in name
    )


def weights_bytes(folder: str | os.PathLike, dtype: str | None = None) -> int | None:
    """The bytes of a local model folder's weights once saved in ``dtype`` (None or ``auto``: as stored), from its
    safetensors headers (``.bin`` weights: their file sizes); None for a hub id or a folder without weights."""
    folder = Path(folder)
    files = sorted(folder.glob("model*.safetensors")) if folder.is_dir() else []
    if not files:
        bins = sorted(folder.glob("pytorch_model*.bin")) if folder.is_dir() else []
        return sum(f.stat().st_size for f in bins) or None
    itemsize = _DTYPE_ITEMSIZE.get(str(dtype).removeprefix("torch.")) if dtype not in (None, "auto") else None
    total = 0
    for path in files:
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for name, tensor in header.items():
            if name != "__metadata__":
                stored = _SAFETENSORS_ITEMSIZE.get(tensor["dtype"], 1)
                floating = tensor["dtype"].startswith(("F", "BF"))
                total += math.prod(tensor["shape"]) * (itemsize if itemsize and floating else stored)
    return total


def free_bytes(folder: str | os.PathLike) -> int:
    """Free bytes on the disk that holds ``folder`` (or would hold it: its nearest existing parent)."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def size_text(n: int | float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return ""  # not reached


def check_free_space(
    folder: str | os.PathLike, need: int | None, what: str = "the model", setting: str = "output_dir"
) -> None:
    """Refuse before training when the disk of ``folder`` has less free than ``need`` bytes (unknown: no check).

    The old model stays until the new one is complete (:func:`staged`), so the new one needs all of it free."""
    if not need:
        return
    free = free_bytes(folder)
    if free < need:
        raise ValueError(
            f"{setting}={str(folder)!r}: {what} needs about {size_text(need)} and its disk has {size_text(free)} "
            f"free; free some space there or choose another {setting}"
        )


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) says the disk is full: OSError ENOSPC/EDQUOT, or a serializer's
    error whose message says so (safetensors' ``SafetensorError``, torch's stream writer)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def space_message(
    folder: str | os.PathLike, need: int | None, what: str, setting: str | None = "output_dir", at_least: bool = False
) -> str:
    """One line: the disk of ``folder`` filled up while writing ``what``, which needs ``need`` bytes, and the fix."""
    where = f"{setting}={str(folder)!r}" if setting else str(folder)
    needed = f"it needs {'at least' if at_least else 'about'} {size_text(need)} free" if need else "it needs more"
    fix = "free some space there" + (f" or choose another {setting}" if setting else "")
    return (
        f"{where}: no space left on device while writing {what} ({needed}, {size_text(free_bytes(folder))} free "
        f"now); {fix}"
    )


@contextlib.contextmanager
def space_errors(
    folder: str | os.PathLike, need: int | None = None, what: str = "the model", setting: str = "output_dir"
) -> Iterator[None]:
    """Around a write into ``folder``: a full disk becomes one line (a ValueError) naming it and ``need``."""
    try:
        yield
    except Exception as exc:
        if not disk_full(exc):
            raise
        raise ValueError(space_message(folder, need, what, setting)) from exc
