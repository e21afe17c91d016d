"""Smoke test of ``make bench``: it runs at tiny sizes and writes well-formed JSON (no timing assertions)."""

from __future__ import annotations

import json
import math


def test_bench_tiny_writes_wellformed_json(tmp_path, capsys):
    from hhrm import bench

    out = tmp_path / "results.json"
    summary = tmp_path / "demo_summary.json"
    summary.write_text(json.dumps({"stages": {"sft": {"seconds": 1.5, "max_rss_mb": 300.0}}}))
    bench.main(["--size", "tiny", "--data", "embedded", "--out", str(out), "--demo-summary", str(summary)])

    result = json.loads(out.read_text())
    for key in ("machine", "entries", "preset", "total_seconds", "data"):
        assert key in result
    for key in ("cpu", "logical_cpus", "torch", "transformers", "trl", "torch_threads"):
        assert key in result["machine"]
    ids = {e["id"] for e in result["entries"]}
    assert {"sft_packing_tokens_per_s", "sft_packing_efficiency", "rm_grouped_pairs_per_s", "rm_padding_share",
            "gen_batched_vs_prompt_x_k", "gen_batched_vs_one_sequence", "score_scorer_vs_pipeline",
            "mfu_sft_wrapped", "demo"} <= ids
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
    assert "sft_packing_tokens_per_s" in capsys.readouterr().out  # the table was printed


def test_generation_shared_prefill_matches_plain_generate(tiny):
    """hhrm's fast generation path (static cache, prefill once per prompt, cache repeated K times) gives
    the same tokens as plain ``generate(num_return_sequences=K)``: checked with top_k=1 sampling."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hhrm.generation import SamplingArguments, generate_responses

    tok = AutoTokenizer.from_pretrained(tiny["base"])
    model = AutoModelForCausalLM.from_pretrained(tiny["base"]).eval()
    prompts = ["###Human: What is 3 plus 4? ###Assistant:",
               "###Human: Hi! ###Assistant: Hello! ###Human: Which number is larger, 12 or 40? ###Assistant:"]
    sampling = SamplingArguments(max_new_tokens=10, top_k=1, stop_at_turn_marker=False)
    got = generate_responses(model, tok, prompts, 3, sampling, batch_size=2)
    for prompt, row in zip(prompts, got):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=sampling.generation_config(tok, 3))
        assert row == tok.batch_decode(ref[:, ids.shape[1]:], skip_special_tokens=True)
