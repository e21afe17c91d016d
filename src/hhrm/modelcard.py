"""Model cards (README.md) written next to every saved model: data, exact config, metrics."""

from __future__ import annotations

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any


def config_dict(obj: Any) -> dict[str, Any]:
    """A JSON-safe dict of a config dataclass (TrainingArguments included)."""
    if hasattr(obj, "to_dict"):
        raw = obj.to_dict()
    elif is_dataclass(obj):
        raw = asdict(obj)
    else:
        raw = dict(obj)
    return json.loads(json.dumps(raw, default=str))


def _table(metrics: dict[str, Any]) -> str:
    rows = ["| metric | value |", "| --- | --- |"]
    for k, v in metrics.items():
        if isinstance(v, float):
            v = f"{v:.4f}"
        elif isinstance(v, (dict, list)):
            continue
        rows.append(f"| {k} | {v} |")
    return "\n".join(rows)


def write_model_card(
    output_dir: str | Path,
    title: str,
    summary: str,
    metrics: dict[str, Any],
    configs: dict[str, Any],
    data: dict[str, Any] | None = None,
    usage: str | None = None,
    pipeline_tag: str = "text-generation",
) -> Path:
    """Write ``README.md`` with front matter, metrics table, usage, data summary and full configs."""
    parts = [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {pipeline_tag}",
        "tags: [hhrm, trl, hh-rlhf]",
        "---",
        f"# {title}",
        "",
        summary,
        "",
        "## Metrics",
        "",
        _table(metrics),
        "",
    ]
    if usage:
        parts += ["## Usage", "", usage.strip(), ""]
    if data:
        parts += ["## Data", "", "```json", json.dumps(data, indent=2, default=str), "```", ""]
    parts += ["## Configuration", ""]
    for name, cfg in configs.items():
        parts += [f"### {name}", "", "```json", json.dumps(config_dict(cfg), indent=2, sort_keys=True), "```", ""]
    path = Path(output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path
