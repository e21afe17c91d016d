"""``make rehearse`` (``python -m rehearse``): the card's architectures counted exactly, the fit model's arithmetic,
every stage at ``--scale tiny``, and the one-line refusals at the start."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rehearse import fit
from rehearse.__main__ import predicted
from rehearse.models import CARD_RECIPES, arch_for, count, read_recipe, recipe_key
from rehearse.stages import available_gb, plan

ROOT = Path(__file__).resolve().parents[1]
STAGES = [
    "open_llama_3b/sft:train",
    "open_llama_3b/rm:rm",
    "gpt_neo_2.7b/raft:generate",
    "gpt_neo_2.7b/raft:score",
    "gpt_neo_2.7b/raft:finetune",
    "llama_7b/sft:train",
    "llama_7b/raft:generate",
    "llama_7b/raft:score",
    "llama_7b/raft:finetune",
]


def rehearse(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rehearse", *args], cwd=cwd, capture_output=True, text=True)


def test_card_architectures_have_the_published_parameter_counts():
    """Built on the meta device from the configs alone: open_llama_3b 3.43B, GPT-Neo-2.7B 2.65B, LLaMA-7B 6.74B."""
    assert count(arch_for("openlm-research/open_llama_3b", "full"), False).params == 3_426_473_600
    assert count(arch_for("EleutherAI/gpt-neo-2.7B", "full"), False).params == 2_651_307_520
    assert count(arch_for("huggyllama/llama-7b", "full"), False).params == 6_738_415_616
    neo = arch_for("EleutherAI/gpt-neo-2.7B", "full").config()
    assert neo.attention_layers[:2] == ["global", "local"] and neo.window_size == 256 and neo.num_layers == 32
    assert arch_for("outputs/open_llama_3b/rm", "full").name == "open_llama_3b"  # the card chain's own outputs
    assert arch_for("someone/unknown-model", "full") is None


def test_fit_model_bytes_per_parameter():
    """16 bytes per parameter on one device; ZeRO-3 and FSDP divide all of it by N (plus two gathered layers)."""
    arch = arch_for("openlm-research/open_llama_3b", "full")
    c = count(arch, False)
    one = fit.training(arch, c, "single", 1, 4, 1024, 2, True, True)
    assert one.params + one.grads + one.optimizer == 16 * c.params
    zero3 = fit.training(arch, c, "zero3", 8, 4, 1024, 2, True, True)
    assert zero3.params + zero3.grads + zero3.optimizer == pytest.approx(16 * c.params / 8 + 4 * c.largest_block)
    zero2 = fit.training(arch, c, "zero2", 8, 4, 1024, 2, True, True)
    assert zero2.params == 2 * c.params and zero2.optimizer == 12 * c.params / 8
    ddp = fit.training(arch, c, "ddp", 8, 4, 1024, 2, True, True)
    assert ddp.grads == 8 * c.params  # fp32 gradients and DDP's buckets
    # checkpointing keeps one layer's values instead of all 26
    full_acts = fit.training(arch, c, "single", 1, 4, 1024, 2, False, True).activations
    assert one.activations < full_acts / 5


def test_full_size_training_steps_do_not_fit_this_cpu_and_generation_does():
    """At --scale full on a CPU the SFT/RM/fine-tune steps need fp32 weights + AdamW (16 bytes a parameter: > 40 GB),
    while bf16 generation and scoring of GPT-Neo-2.7B and open_llama_3b need < 24 GB."""
    cache = {}

    def counts_of(arch, seqcls):
        return cache.setdefault((repr(arch), seqcls), count(arch, seqcls))

    needs = {}
    for path in CARD_RECIPES:
        recipe = read_recipe(str(ROOT / path))
        policy = arch_for(recipe["model_name_or_path"], "full")
        rm = arch_for(recipe["reward_model_name_or_path"], "full") if "reward_model_name_or_path" in recipe else None
        for stage in plan(recipe_key(path), recipe, policy, rm, "full", "cpu"):
            needs[stage.id] = predicted(stage, counts_of).total / fit.GB
    for sid in ("open_llama_3b/sft:train", "open_llama_3b/rm:rm", "gpt_neo_2.7b/raft:finetune"):
        assert needs[sid] > 40, (sid, needs[sid])
    assert 5 < needs["gpt_neo_2.7b/raft:generate"] < 24 and 6 < needs["gpt_neo_2.7b/raft:score"] < 24


@pytest.mark.slow
def test_rehearse_tiny_runs_every_stage_and_writes_the_report(tmp_path):
    """`make rehearse ARGS="--scale tiny"`: every stage of the five card recipes runs, with rates, MFU, peaks,
    projections and the full-size fit table (5 recipes x 5 launch paths)."""
    start = time.perf_counter()
    proc = rehearse("--scale", "tiny", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert time.perf_counter() - start < 300
    result = json.loads((tmp_path / "cpu-tiny.json").read_text())
    assert [e["stage"]["id"] for e in result["stages"]] == STAGES
    assert result["peak_matmul_flops"]["fp32"] > 1e8
    by_id = {e["stage"]["id"]: e for e in result["stages"]}
    assert by_id["llama_7b/raft:score"]["same_as"] == "gpt_neo_2.7b/raft:score"  # the same RM at the same shapes
    for e in result["stages"]:
        assert "error" not in e and "skipped" not in e, e
        assert e["peak_gb"] > 0 and e["tokens_per_s"] > 0 and 0 < e["mfu"] < 1, e
    gen = by_id["gpt_neo_2.7b/raft:generate"]
    st = gen["stage"]
    assert gen["work"]["generated_tokens"] == st["prompts"] * st["k"] * st["new_tokens"] * st["steps"]
    assert by_id["open_llama_3b/rm:rm"]["pairs_per_s"] > 0 and by_id["gpt_neo_2.7b/raft:score"]["texts_per_s"] > 0
    assert by_id["open_llama_3b/sft:train"]["stage"]["checkpointing"] is True  # the recipe's setting
    for p in result["projections"]:
        assert p["missing"] == [] and p["hours_this_device"] > 0
        assert p["hours_8_devices"] == pytest.approx(p["hours_this_device"] / 8, abs=0.01)
    rows = {(r["recipe"], r["config"]): r for r in result["fit"]["rows"]}
    assert len(rows) == 25
    sft7 = rows[("llama_7b/sft", "single device")]
    assert sft7["fits"] == {"24": False, "40": False, "80": False, "141": True}
    assert rows[("llama_7b/sft", "deepspeed_zero3.yaml")]["fits"]["24"] is True
    md = (tmp_path / "cpu-tiny.md").read_text()
    for heading in ("## Stages", "## Projected wall time", "## Fit table"):
        assert heading in md


@pytest.mark.slow
def test_rehearse_local_model_folder(tmp_path):
    """A recipe whose model is a local folder: its config.json gives the shape (no weights are read)."""
    from transformers import LlamaConfig

    folder = tmp_path / "my_model"
    LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=300
    ).save_pretrained(folder)
    recipe = tmp_path / "configs" / "mine" / "sft.yaml"
    recipe.parent.mkdir(parents=True)
    recipe.write_text(yaml.safe_dump({"model_name_or_path": str(folder), "max_length": 32, "packing": True}))
    proc = rehearse("--scale", "tiny", "--recipes", str(recipe), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "out" / "cpu-tiny.json").read_text())
    (entry,) = result["stages"]
    assert entry["stage"]["id"] == "mine/sft:train" and entry["stage"]["arch"] == "my_model"
    assert entry["matmul_params"] == 1 * (4 * 32 * 32 + 3 * 32 * 64) + 300 * 32
    assert entry["work"]["tokens"] == 32  # one row of max_length tokens (per_device_train_batch_size unset: 1)


def _one_line_refusal(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hhrm: error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert "rehearse: " not in proc.stderr  # refused before any stage started


def test_unknown_scale_is_refused(tmp_path):
    _one_line_refusal(rehearse("--scale", "huge", "--out", str(tmp_path)), "--scale huge", "tiny", "full")


def test_unknown_model_is_refused(tmp_path):
    recipe = tmp_path / "sft.yaml"
    recipe.write_text("model_name_or_path: someone/mystery-13b\nmax_length: 64\n")
    proc = rehearse("--recipes", str(recipe), "--out", str(tmp_path))
    _one_line_refusal(proc, "model_name_or_path someone/mystery-13b", "neither a local model folder")


def test_stage_that_does_not_fit_the_device_is_refused(tmp_path):
    """LLaMA-7B's SFT step in fp32 + AdamW needs > 100 GB: named with --stages on this CPU, refused at the start."""
    if available_gb("cpu") > 120:
        pytest.skip("this machine has more than 120 GB available: the 7B training step would fit")
    proc = rehearse("--scale", "full", "--stages", "llama_7b/sft:train", "--out", str(tmp_path))
    _one_line_refusal(proc, "llama_7b/sft:train needs", "GB on one device", "GB available")
    assert not list(tmp_path.iterdir())


def test_projection_counts_a_stage_that_did_not_fit_at_the_peak():
    """SFT skipped here: 2 epochs x 118K dialogues x 230 tokens x 6 N FLOPs at the measured peak, a lower bound;
    RAFT from its measured rates (generated tokens/s, texts/s, tokens/s)."""
    from rehearse import report

    sft = {"num_train_epochs": 2}
    raft = {"reward_model_name_or_path": "x", "num_iterations": 10, "prompts_per_iteration": 2048, "num_samples": 8}
    by_id = {
        "a/sft:train": {"skipped": "does not fit"},
        "b/raft:generate": {"generated_tokens_per_s": 100.0},
        "b/raft:score": {"texts_per_s": 10.0},
        "b/raft:finetune": {"tokens_per_s": 1000.0},
    }
    at_peak = {"a/sft:train": (1_000_000_000, 1e12)}
    p_sft, p_raft = report.projections({"a/sft": sft, "b/raft": raft}, by_id, 8, at_peak)
    tokens = 2 * report.DIALOGUES * report.TOKENS_PER_DIALOGUE
    assert p_sft["at_peak_lower_bound"] == ["train"]
    assert p_sft["hours_this_device"] == pytest.approx(tokens * 6 * 1e9 / 1e12 / 3600, abs=0.01)
    seconds = 10 * 2048 * 8 * 128 / 100 + 10 * 2048 * 8 / 10 + 10 * 2048 * report.TOKENS_PER_RAFT_ROW / 1000
    assert p_raft["at_peak_lower_bound"] == [] and p_raft["hours_this_device"] == pytest.approx(seconds / 3600, 0.01)
    assert p_raft["hours_8_devices"] == pytest.approx(seconds / 3600 / 8, abs=0.01)
