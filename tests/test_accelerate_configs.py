"""The accelerate configs on this CPU, 2 processes each: SFT through DDP over gloo and DeepSpeed ZeRO-2/ZeRO-3
(DS_ACCELERATOR=cpu: DeepSpeed's CPU accelerator talks over gloo without oneCCL). A ZeRO run leaves one optimizer
shard per rank in its checkpoint, which DDP does not: the proof that DeepSpeed, not a silent DDP fallback, trained.
Under ZeRO-2/3 also the RM stage and one RAFT iteration with each update (sft, dpo); FSDP, which accelerate applies
to GPU processes only, is refused at the start (tests/test_fsdp_cpu.py takes its config as far as a CPU allows);
a bf16 SFT run on the CPU. And: a recipe's startup prints no warning a user cannot act on (bitsandbytes' "No module
named 'kernels'")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_process

CONFIGS = ROOT / "accelerate_configs"
ENV = os.environ | {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def as_args(**values) -> list[str]:
    return [x for k, v in values.items() for x in (f"--{k}", str(v))]


def launch(config: str, script: str, *args: str) -> list[str]:
    """``accelerate launch`` of ``script`` with ``config`` as 2 CPU processes in fp32 (the yaml's bf16 overridden)."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    return [
        accelerate, "launch", "--config_file", str(CONFIGS / f"{config}.yaml"), "--num_processes", "2",
        "--mixed_precision", "no", script, *args,
    ]  # fmt: skip


def sft_args(tiny, out: Path, steps: int = 3) -> list[str]:
    values = dict(
        config=ROOT / "recipes" / "configs" / "tiny" / "sft.yaml", model_name_or_path=tiny["base"],
        dataset_name=tiny["data"], test_offset=100, max_steps=steps, max_length=128, eval_rows=16, gold_eval_prompts=4,
        report_to="none", output_dir=out, save_strategy="steps", save_steps=steps, ddp_find_unused_parameters="false",
    )  # fmt: skip
    return as_args(**values)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["multi_cpu", "deepspeed_zero2", "deepspeed_zero3"])
def test_sft_trains_on_two_cpu_processes_under_each_config(config, tiny, tmp_path):
    if config.startswith("deepspeed"):
        pytest.importorskip("deepspeed")  # make install installs it
    out = tmp_path / "sft"
    proc = run_process(launch(config, "recipes/sft.py", *sft_args(tiny, out)), 30, cwd=ROOT, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["gold_prompts"] == 4  # gold eval ran (ZeRO-3: gathered weights)
    assert metrics["train_loss"] > 0 and metrics["eval_loss"] > 0
    assert (out / "model.safetensors").is_file()
    shards = sorted(p.name for p in (out / "checkpoint-3").rglob("*optim_states.pt"))
    if config.startswith("deepspeed"):
        assert [s.split("_mp_")[0][-len("zero_pp_rank_0") :] for s in shards] == ["zero_pp_rank_0", "zero_pp_rank_1"]
        assert "eval_loss_before" not in metrics  # not measured under DeepSpeed (hhrm.sft.evaluate_before)
    else:
        assert shards == [] and (out / "checkpoint-3" / "optimizer.pt").is_file()
        assert metrics["eval_loss_before"] > 0


def rm_args(tiny, out: Path) -> list[str]:
    return as_args(
        config=ROOT / "recipes" / "configs" / "tiny" / "rm.yaml", model_name_or_path=tiny["base"],
        dataset_name=tiny["data"], test_offset=100, max_steps=3, max_length=128, global_batch_size=16,
        per_device_train_batch_size=8, gold_prompts=4, report_to="none", output_dir=out, save_strategy="steps",
        save_steps=3,
    )  # fmt: skip


def raft_args(tiny, rm: Path, out: Path, update: str) -> list[str]:
    """One RAFT iteration at tests/test_raft.py's tiny sizes: 8 prompts x 2 samples, 8 new tokens."""
    return as_args(
        model_name_or_path=tiny["base"], reward_model_name_or_path=rm, dataset_name=tiny["data"], test_offset=100,
        output_dir=out, update=update, num_iterations=1, prompts_per_iteration=8, num_samples=2, max_new_tokens=8,
        heldout_prompts=4, generation_batch_size=32, reward_batch_size=64, max_length=128,
        per_device_train_batch_size=4, num_train_epochs=1, seed=0, progress="false", disable_tqdm="true",
        offload_models="false", report_to="none", activation_checkpointing="false", filter_min_tokens=0,
    )  # fmt: skip


def run_ok(cmd: list[str], usual_seconds: float) -> None:
    proc = run_process(cmd, usual_seconds, cwd=ROOT, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # hhrm's folder checks build models on the meta device: under ZeRO-3 that must not go through zero.Init
    assert "cannot build" not in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("config", ["deepspeed_zero2", "deepspeed_zero3"])
def test_rm_and_raft_run_on_two_cpu_processes_under_zero(config, tiny, tmp_path):
    """RM (3 steps, then the evaluation of the export on the main process: under ZeRO-3 it hung while that rank
    alone loaded the folder partitioned), then one RAFT iteration with each update. The rewards RAFT recorded equal a
    single-process scoring of the same texts by the same RM (under ZeRO-3 each rank scores with gathered weights)."""
    pytest.importorskip("deepspeed")  # make install installs it
    from hhrm.reporting import read_jsonl
    from hhrm.reward import conventions
    from hhrm.reward.scoring import RewardScorer

    rm = tmp_path / "rm"
    run_ok(launch(config, "recipes/rm.py", *rm_args(tiny, rm)), 30)
    metrics = json.loads((rm / "metrics.json").read_text())
    assert metrics["train_loss"] > 0 and 0 < metrics["eval_accuracy_exact"] <= 1
    assert (rm / "eval_rm.json").is_file() and (rm / "model.safetensors").is_file()
    shards = sorted(p.name for p in (rm / "checkpoint-3").rglob("*optim_states.pt"))  # DeepSpeed trained
    assert [s.split("_mp_")[0][-len("zero_pp_rank_0") :] for s in shards] == ["zero_pp_rank_0", "zero_pp_rank_1"]
    scorer = RewardScorer.from_pretrained(rm, "cpu", convention=conventions.recorded(rm))
    for update in ("sft", "dpo"):
        out = tmp_path / f"raft_{update}"
        run_ok(launch(config, "recipes/raft.py", *raft_args(tiny, rm, out, update)), 30)
        final = json.loads((out / "metrics.json").read_text())
        assert final["iterations"] == 1 and final["update"] == update
        train = json.loads((out / "iter_000" / "train.stats.json").read_text())
        assert train["train_loss"] > 0 and (out / "model.safetensors").is_file()
        scored = read_jsonl(out / "iter_000" / "scored.jsonl")
        assert len(scored) == 8 and {r["rank"] for r in scored} == {0, 1}  # both ranks generated
        prompts = [r["prompt"] for r in scored for _ in r["responses"]]
        responses = [x for r in scored for x in r["responses"]]
        assert scorer.score_pairs(prompts, responses) == pytest.approx(
            [x for r in scored for x in r["rewards"]], abs=1e-5
        )


@pytest.mark.slow
def test_fsdp_without_a_gpu_is_refused_at_the_start(tiny, tmp_path):
    """accelerate 1.16 applies FSDP only to GPU processes: on a CPU the launch would train plain DDP (or, without
    use_cpu, each process alone). The config is accepted by accelerate; hhrm refuses in one line before loading.
    tests/test_fsdp_cpu.py shows the gate and runs the rest of the way (sharding, one step, the gathered export)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: FSDP is not refused there")
    out = tmp_path / "sft"
    proc = run_process(launch("fsdp", "recipes/sft.py", *sft_args(tiny, out)), 20, cwd=ROOT, env=ENV)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hhrm: error:")]
    assert len(errors) == 1 and "FSDP needs a GPU" in errors[0] and "deepspeed_zero3.yaml" in errors[0], proc.stderr
    # A rank exits 2 without a traceback (the launcher may stop the other first); the one traceback is the launcher's.
    assert proc.stderr.startswith("hhrm: error:") and "exitcode  : 2" in proc.stderr
    assert 'recipes/sft.py", line' not in proc.stderr and not (out / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("gold_prompts", [0, 4])
def test_sft_trains_in_bf16_on_the_cpu(gold_prompts, tiny, tmp_path):
    """The card recipes are bf16: 2 SFT steps under bf16 autocast on this CPU, one process; then the gold
    evaluation's greedy generation from the trained model, in bf16 too."""
    out = tmp_path / "sft"
    args = [*sft_args(tiny, out, steps=2), "--bf16", "true", "--gold_eval_prompts", str(gold_prompts)]
    run_ok([sys.executable, "recipes/sft.py", *args], 20)
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        metrics["train_loss"] > 0 and metrics["eval_loss"] > 0 and metrics["eval_loss"] < metrics["eval_loss_before"]
    )
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    assert (out / "model.safetensors").is_file() and metrics.get("gold_prompts", 0) == gold_prompts


@pytest.mark.slow
def test_recipe_prints_no_bitsandbytes_kernels_warning():
    """bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community" when peft (through trl)
    imports it on an AVX512-BF16 CPU; each recipe imports hhrm first, which quiets it (hhrm/__init__.py)."""
    proc = subprocess.run(
        [sys.executable, "recipes/raft.py", "--help"], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--update" in proc.stdout  # the recipe really parsed (trl, peft and so bitsandbytes imported)
    assert "kernels" not in proc.stderr and "No module named" not in proc.stdout  # (the help text names Liger's)
