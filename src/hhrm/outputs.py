"""A stage's output folder: checked before any work, never replaced unasked, never left with stale results.

* A folder that already holds a model is refused unless the user asks for the overwrite
  (``overwrite_output_dir``), so a finished SFT or reward model is never replaced by accident. A RAFT
  run folder is the exception: re-running the same command resumes it (RAFT checks its settings).
* The folder must be writable: a read-only folder fails before training, not at save time.
* Before new weights are written, the old card, metrics and reports are removed, so a run that
  crashes after saving never leaves the previous model's numbers beside the new weights.
"""

from __future__ import annotations

import os
from pathlib import Path

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


def holds_model(folder: Path) -> bool:
    return any((folder / name).is_file() for name in MODEL_FILES)


def check_output_dir(output_dir: str | os.PathLike, stage: str, overwrite: bool = False) -> Path:
    """Refuse an output folder that would lose a finished model or fail at save time; create it otherwise."""
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
    return out


def clear_results(output_dir: str | os.PathLike) -> None:
    """Remove the previous run's card, metrics and reports (called just before new weights are saved)."""
    for name in RESULT_FILES:
        path = Path(output_dir) / name
        if path.is_file():
            path.unlink()
