"""The demo: wall time and peak RSS of each stage of ``make demo``, read from the demo's summary.

``--demo run`` runs ``python scripts/demo.py --out <folder of --demo-summary>`` first (from the repository
root); ``--demo read`` only reads the summary; ``--demo skip`` leaves the section out.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import ROOT, Context, logger

WHAT = "make demo: wall time and peak RSS per stage"


def run_demo(out: Path) -> dict[str, Any] | None:
    """Runs the demo into ``out``; None when it succeeded, else a skipped entry saying why."""
    cmd = [sys.executable, "scripts/demo.py", "--out", str(out.resolve())]
    logger.info("running the demo: %s", " ".join(cmd))
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    return {
        "id": "demo",
        "what": "make demo stages",
        "skipped": f"demo failed (rc={proc.returncode}): {last}",
        "seconds": round(time.perf_counter() - start, 1),
    }


def read_summary(path: Path) -> dict[str, Any]:
    """The demo entry: each stage's seconds and peak RSS, and the total."""
    summary = json.loads(path.read_text())
    rows = [
        {"stage": name, "seconds": st.get("seconds"), "max_rss_mb": st.get("max_rss_mb")}
        for name, st in summary.get("stages", {}).items()
    ]
    entry = {
        "id": "demo",
        "what": WHAT,
        "source": str(path),
        "stages": rows,
        "total_seconds": round(sum(r["seconds"] or 0 for r in rows), 1),
    }
    for k in ("total_seconds", "seconds"):
        if isinstance(summary.get(k), (int, float)):
            entry["total_seconds"] = summary[k]
    return entry


def run(ctx: Context) -> list[dict[str, Any]]:
    summary_path = Path(ctx.demo_summary)
    if ctx.demo == "run":
        failed = run_demo(summary_path.parent)
        if failed is not None:
            return [failed]
    if not summary_path.is_file():
        return [
            {
                "id": "demo",
                "what": WHAT,
                "skipped": f"not measured: {summary_path} not found (run `make demo`, or pass --demo run)",
            }
        ]
    return [read_summary(summary_path)]
