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
        "rm_heads_train_pairs_per_s",
        "rm_heads_score_pairs_per_s",
        "gen_batched_vs_prompt_x_k",
        "gen_batched_vs_one_sequence",
        "score_scorer_vs_pipeline",
        "serve_openrlhf_clients",
        "mfu_sft_wrapped",
        "demo",
        "data_prep_full_size",
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
    check_data_entry(by_id["data_prep_full_size"], result["preset"])
    assert "sft_packing_tokens_per_s" in proc.stdout  # the table was printed
    assert "data 8,500 rows" in proc.stdout
    assert f"wrote {out}" in proc.stdout


def check_data_entry(entry, preset):
    """The full-size data entry: one row per preset size, every phase timed, RSS measured, rows as built."""
    assert entry["sample"] == "embedded" and "embedded" in entry["source"]
    sizes = entry["sizes"]
    assert [s["train_rows"] for s in sizes] == preset["data_train_rows"] == [2000, 4000, 8000]
    for s in sizes:
        assert "error" not in s, s.get("error")
        assert s["test_rows"] == preset["data_test_rows"] and s["rows"] == s["train_rows"] + s["test_rows"]
        assert s["loaded"]["source_rows"] == {"train_rows": s["train_rows"], "test_rows": s["test_rows"]}
        assert s["loaded"]["rm_train_rows"] + s["loaded"]["rm_test_rows"] == s["rows"]  # no bad row, no duplicate
        assert s["loaded"]["bad_rows"] == {"train": 0, "test": 0}
        assert set(s["seconds"]) == {"load_splits", "data_report", "prepare_pairs"}
        # the data report reuses prepare_pairs' lengths: it may round to 0.0 s
        assert all(v >= 0 for v in s["seconds"].values()) and s["seconds"]["prepare_pairs"] > 0
        assert s["total_seconds"] > 0 and s["rows_per_s"] > 0
        assert s["peak_rss_mb"] >= s["rss_after_imports_mb"] > 0
        assert s["rm_pairs"]["eval_pairs_overlapping_train"] == 0
    assert entry["targets"] == {"seconds": 120, "peak_rss_mb": 4096}
    assert set(entry["meets"]) == {"seconds", "peak_rss_mb"}
    assert entry["growth"]["peak_rss_mb_per_10k_rows"] is not None


def test_bench_openrlhf_clients_batched_and_equal(tmp_path):
    """``--sections openrlhf``: 64 concurrent one-text /get_reward requests (OpenRLHF's client) are batched by the
    server (several requests per model call, none over max_batch_size) and get the in-process rewards."""
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "bench", "--size", "tiny", "--data", "embedded", "--sections", "openrlhf"]
    proc = subprocess.run([*cmd, "--threads", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]

    (entry,) = json.loads(out.read_text())["entries"]
    assert entry["id"] == "serve_openrlhf_clients"
    assert entry["expect"] == 0.8 and entry["meets"] == (entry["ratio"] >= 0.8)
    assert math.isclose(entry["ratio"], entry["a"]["value"] / entry["b"]["value"], rel_tol=1e-2)
    d = entry["details"]
    assert d["clients"] == 64 and d["requests_per_round"] == d["texts_per_round"] == 128  # one text per request
    assert d["latency_ms"]["requests"] == 128 and 0 < d["latency_ms"]["p50"] <= d["latency_ms"]["p99"]
    assert d["texts_per_model_call"] == d["requests_per_model_call"] > 1
    assert 1 < d["max_requests_per_model_call"] <= d["server"]["limits"]["max_batch_size"] == 16
    assert d["max_abs_reward_diff"] < 1e-5
    assert "serve_openrlhf_clients" in proc.stdout and ">=0.8" in proc.stdout


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
