"""What every stage writes and prints: JSON/JSONL files, Markdown tables, headlines and model cards.

One vocabulary for all stages. A stage declares its headline metric keys beside the code that
produces them (``sft.HEADLINE``, ``rm.HEADLINE``, ``raft.report.HEADLINE``); the recipes, the demo and
the tests import those tuples instead of spelling metric names again.

Files are written whole to a temporary name and renamed into place, so a reader (or a resumed
RAFT run) never sees half a file; a write that fails removes its temporary file, and a full disk is one line
naming the file and the space it needs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

from hhrm import outputs

# --------------------------------------------------------------------------------------------
# Files


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON, atomically (NaN stays NaN, as Python's json writes it)."""
    return write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n", path)


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` to ``path``, atomically."""
    return _write_atomic(path, lambda f: f.write(text), len(text.encode()))


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``, or ``{}`` when there is no such file."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | os.PathLike) -> Path:
    """One JSON object per line, atomically."""

    def write(f) -> None:
        for row in rows:
            f.write(json.dumps(row) + "\n")

    return _write_atomic(path, write)


def _write_atomic(path: str | os.PathLike, write: Callable[[Any], object], size: int | None = None) -> Path:
    """``write(file)`` into ``<path>.tmp``, renamed to ``path`` once whole. On failure the temporary file is removed
    (a half-written file must not keep a full disk full), and a full disk is one line naming the file and the
    space it needs (``size``, else at least what was written before the disk filled)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as exc:
        partial = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and outputs.disk_full(exc):
            need = size or partial or None
            message = outputs.space_message(path.parent, need, path.name, setting=None, at_least=size is None)
            raise ValueError(message) from exc
        raise
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _jsonable(obj: Any) -> Any:
    """numpy scalars and the like: their Python value; anything else: its string."""
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def config_dict(obj: Any) -> dict[str, Any]:
    """A JSON-safe dict of a config dataclass (TrainingArguments included)."""
    if hasattr(obj, "to_dict"):
        raw = obj.to_dict()
    elif is_dataclass(obj):
        raw = asdict(obj)
    else:
        raw = dict(obj) if isinstance(obj, dict) else vars(obj)
    return json.loads(json.dumps(raw, default=str))


# --------------------------------------------------------------------------------------------
# Text


def fmt(value: Any, digits: int = 4) -> str:
    """A metric value for a table or a log line: floats to ``digits`` significant digits."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}g}"
    return "" if value is None else str(value)


def headline(metrics: dict[str, Any], keys: Sequence[str]) -> str:
    """``key=value, ...`` for the numeric ``keys`` present in ``metrics``, in that order."""
    return ", ".join(f"{k}={fmt(metrics[k])}" for k in keys if isinstance(metrics.get(k), (int, float)))


def markdown_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], headers: Sequence[str] | None = None
) -> str:
    """A Markdown table of ``rows`` (dicts) over ``columns``; a missing cell is empty."""
    lines = ["| " + " | ".join(headers or columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def metrics_table(metrics: dict[str, Any]) -> str:
    """``| metric | value |`` for every scalar metric (nested dicts and lists are left to the JSON files)."""
    rows = [{"metric": k, "value": v} for k, v in metrics.items() if not isinstance(v, (dict, list))]
    return markdown_table(rows, ("metric", "value"))


# --------------------------------------------------------------------------------------------
# Model cards and a stage's files


@dataclass
class ModelCard:
    """The README.md written next to every saved model: what it is, its metrics, data and exact configs."""

    title: str
    summary: str
    metrics: dict[str, Any]
    configs: dict[str, Any]
    data: dict[str, Any] | None = None
    usage: str | None = None
    pipeline_tag: str = "text-generation"
    sections: tuple[str, ...] = ()  # extra Markdown sections, appended after the configs

    def render(self) -> str:
        parts = [
            "---",
            "library_name: transformers",
            f"pipeline_tag: {self.pipeline_tag}",
            "tags: [hhrm, trl, hh-rlhf]",
            "---",
            f"# {self.title}",
            "",
            self.summary,
            "",
            "## Metrics",
            "",
            metrics_table(self.metrics),
        ]
        if self.usage:
            parts += ["## Usage", "", self.usage.strip(), ""]
        if self.data:
            parts += ["## Data", "", "```json", json.dumps(self.data, indent=2, default=str), "```", ""]
        parts += ["## Configuration", ""]
        for name, cfg in self.configs.items():
            parts += [f"### {name}", "", "```json", json.dumps(config_dict(cfg), indent=2, sort_keys=True), "```", ""]
        parts += [s.rstrip("\n") + "\n" for s in self.sections]
        return "\n".join(parts)

    def write(self, output_dir: str | Path) -> Path:
        return write_text(self.render(), Path(output_dir) / "README.md")


def train_metrics(trainer_metrics: dict[str, Any], resumed_from: str | bool | None = None) -> dict[str, Any]:
    """``Trainer.train()``'s metrics with a ``train_`` prefix on every key (``train_runtime``, ``train_loss``...).

    After a resume they cover only the steps run since the checkpoint: ``train_resumed_from`` says so.
    """
    out = {k if k.startswith("train") else f"train_{k}": v for k, v in trainer_metrics.items()}
    if resumed_from:
        out["train_resumed_from"] = "latest checkpoint" if resumed_from is True else str(resumed_from)
    return out


def write_stage_outputs(
    output_dir: str | Path, metrics: dict[str, Any], card: ModelCard, data_report: dict[str, Any] | None = None
) -> None:
    """The files every stage leaves in its model folder: ``metrics.json``, ``data_report.json``, ``README.md``."""
    output_dir = Path(output_dir)
    if data_report is not None:
        write_json(data_report, output_dir / "data_report.json")
    write_json(metrics, output_dir / "metrics.json")
    card.write(output_dir)


# --------------------------------------------------------------------------------------------
# TensorBoard: every stage's trainer logs there by default (``report_to``, see hhrm.runtime)

TENSORBOARD = "tensorboard"


def log_scalars(log_dir: str | os.PathLike, scalars: dict[str, Any], step: int, prefix: str) -> int:
    """Write the numeric values of ``scalars`` as TensorBoard scalars ``prefix/key`` at ``step``; returns how many.

    For what no trainer logs (RAFT's per-iteration metrics). The writer is opened and closed per call: a
    resumed run appends a new event file to the same folder, which TensorBoard reads together.
    """
    from torch.utils.tensorboard import SummaryWriter

    values = {k: float(v) for k, v in scalars.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    with SummaryWriter(log_dir=str(log_dir)) as writer:
        for key, value in values.items():
            writer.add_scalar(f"{prefix}/{key}", value, step)
    return len(values)


def set_tensorboard_dir(trainer: Any, log_dir: str | os.PathLike | None = None) -> None:
    """Point the trainer's TensorBoard callback (``report_to``) at ``log_dir`` before anything is logged.

    Default: ``<output_dir>/runs/<date>_<host>``, transformers' own choice, which it makes only at train begin:
    a ``trainer.evaluate()`` before ``train()`` would otherwise open a writer in ``./runs`` of the working
    directory. RAFT gives each iteration's fine-tune its own folder (its steps restart at 0).
    """
    from transformers.integrations import TensorBoardCallback
    from transformers.integrations.integration_utils import default_logdir

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.tb_writer is None:
            callback.logging_dir = str(log_dir or Path(trainer.args.output_dir) / default_logdir())
