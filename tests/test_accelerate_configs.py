"""The accelerate configs on this CPU, 2 processes each: SFT through DDP over gloo and DeepSpeed ZeRO-2/ZeRO-3
(DS_ACCELERATOR=cpu: DeepSpeed's CPU accelerator talks over gloo without oneCCL). A ZeRO run leaves one optimizer
shard per rank in its checkpoint, which DDP does not: the proof that DeepSpeed, not a silent DDP fallback, trained.
Also: a recipe's startup prints no warning a user cannot act on (bitsandbytes' "No module named 'kernels'")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_process

CONFIGS = ROOT / "accelerate_configs"


def launch(config: str, script: str, *args: str) -> list[str]:
    """``accelerate launch`` of ``script`` with ``config`` as 2 CPU processes in fp32 (the yaml's bf16 overridden)."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    return [
        accelerate, "launch", "--config_file", str(CONFIGS / f"{config}.yaml"), "--num_processes", "2",
        "--mixed_precision", "no", script, *args,
    ]  # fmt: skip


def sft_args(tiny, out: Path) -> list[str]:
    values = dict(
        config=ROOT / "recipes" / "configs" / "tiny" / "sft.yaml", model_name_or_path=tiny["base"],
        dataset_name=tiny["data"], test_offset=100, max_steps=3, max_length=128, eval_rows=16, gold_eval_prompts=4,
        report_to="none", output_dir=out, save_strategy="steps", save_steps=3, ddp_find_unused_parameters="false",
    )  # fmt: skip
    return [x for k, v in values.items() for x in (f"--{k}", str(v))]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["multi_cpu", "deepspeed_zero2", "deepspeed_zero3"])
def test_sft_trains_on_two_cpu_processes_under_each_config(config, tiny, tmp_path):
    if config.startswith("deepspeed"):
        pytest.importorskip("deepspeed")  # make install installs it
    out = tmp_path / "sft"
    env = os.environ | {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = run_process(launch(config, "recipes/sft.py", *sft_args(tiny, out)), 30, cwd=ROOT, env=env)
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


def test_import_prints_no_bitsandbytes_kernels_warning():
    """bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community" when peft (through trl)
    imports it on an AVX512-BF16 CPU; importing hhrm first quiets it (hhrm/__init__.py)."""
    code = "import hhrm; from trl import SFTTrainer"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kernels" not in proc.stdout + proc.stderr
