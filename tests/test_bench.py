"""Smoke test of ``make bench`` (``python -m bench``): it runs at tiny sizes and writes well-formed JSON (no timing
assertions)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_tiny_writes_wellformed_json(tmp_path):
    out = tmp_path / "results.json"
    summary = tmp_path / "demo_summary.json"
    summary.write_text(json.dumps({"stages": {"sft": {"seconds": 1.5, "max_rss_mb": 300.0}}}))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--size",
            "tiny",
            "--data",
            "embedded",
            "--out",
            str(out),
            "--demo-summary",
            str(summary),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    result = json.loads(out.read_text())
    for key in ("machine", "entries", "preset", "total_seconds", "data"):
        assert key in result
    for key in ("cpu", "logical_cpus", "torch", "transformers", "trl", "torch_threads"):
        assert key in result["machine"]
    ids = {e["id"] for e in result["entries"]}
    assert {
        "sft_packing_tokens_per_s",
        "sft_packing_efficiency",
        "rm_grouped_pairs_per_s",
        "rm_padding_share",
        "gen_batched_vs_prompt_x_k",
        "gen_batched_vs_one_sequence",
        "score_scorer_vs_pipeline",
        "mfu_sft_wrapped",
        "demo",
    } <= ids
    for e in result["entries"]:
        if "ratio" not in e:
            continue
        for side in ("a", "b"):
            assert e[side]["label"] and e[side]["unit"]
            assert e[side]["value"] is not None and e[side]["value"] > 0 and math.isfinite(e[side]["value"])
        assert math.isclose(e["ratio"], e["a"]["value"] / e["b"]["value"], rel_tol=1e-2)
    by_id = {e["id"]: e for e in result["entries"]}
    assert by_id["sft_packing_efficiency"]["a"]["value"] > by_id["sft_packing_efficiency"]["b"]["value"]
    # the batched scorer and the card's pipeline compute the same rewards
    assert by_id["score_scorer_vs_pipeline"]["details"]["max_abs_reward_diff"] < 1e-3
    assert by_id["demo"]["stages"][0] == {"stage": "sft", "seconds": 1.5, "max_rss_mb": 300.0}
    assert "sft_packing_tokens_per_s" in proc.stdout  # the table was printed
    assert f"wrote {out}" in proc.stdout


def test_bench_missing_data_file_is_an_error(tmp_path):
    """A --data path that does not exist stops the bench (no silent fallback to the embedded data)."""
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--size", "tiny", "--data", "/no/such/file.jsonl", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "--data" in proc.stderr and "/no/such/file.jsonl" in proc.stderr
    assert not out.exists()
