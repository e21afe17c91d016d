"""The policy side refuses what would end with exit 0 and a wrong result (issue 22, items 1 and 2).

* A policy must be a causal LM whose every weight is in its checkpoint: a reward model (or a checkpoint lacking a
  weight) loads with random weights, and RAFT, DPO, overopt, compare and SFT would work on noise. Refused in one
  line before any work.
* A NaN or infinite setting is refused when parsed; a stage that trains to a non-finite loss or weights stops in
  one line naming the likely settings, and its model is neither saved nor marked done (a re-run stops the same way).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hhrm import compare, finite, model_checks, overopt
from hhrm import data as hdata

from conftest import QUICK_TEST_OFFSET, QUIET_CPU, load_recipe, run_process

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs" / "tiny"
RM_ARCH = "LlamaForSequenceClassification"


def _env() -> dict[str, str]:
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(name, None)
    return env


def _recipe(name: str, *args: str) -> list[str]:
    return [sys.executable, f"recipes/{name}.py", *args]


def _refusal(proc, *expected: str, code: int = 2) -> str:
    """Exit ``code``; stderr's last line is the one `hhrm: error:` line, holding each of ``expected``; no traceback."""
    report = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == code, report
    assert "Traceback" not in proc.stderr, report
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("hhrm: error: ") and proc.stderr.count("hhrm: error:") == 1, report
    for text in expected:
        assert text in last, report
    return last


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _quick_raft(models: dict[str, Path], config: str, out: Path, *extra: str) -> list[str]:
    """RAFT (or DPO) as the user runs it, one small iteration on the quick models."""
    cmd = _recipe("raft", "--config", str(CONFIGS / config), "--model_name_or_path", str(models["policy"]))
    cmd += ["--reward_model_name_or_path", str(models["rm"]), "--dataset_name", str(models["data"])]
    cmd += ["--test_offset", str(QUICK_TEST_OFFSET), "--max_train_rows", "64", "--max_test_rows", "200"]
    cmd += ["--num_iterations", "1", "--prompts_per_iteration", "8", "--num_samples", "2", "--max_new_tokens", "8"]
    cmd += ["--heldout_prompts", "2", "--generation_batch_size", "8", "--per_device_train_batch_size", "4"]
    cmd += ["--max_length", "128", "--report_to", "none", "--progress", "false", "--disable_tqdm", "true"]
    return cmd + ["--output_dir", str(out), *extra]


# --------------------------------------------------------------------------------------------
# Item 1: a reward model (or a checkpoint lacking a weight) as the policy


def test_a_reward_model_as_the_raft_policy_is_refused_before_any_work(quick_models, tmp_path):
    out = tmp_path / "raft"
    cmd = _quick_raft(quick_models | {"policy": quick_models["rm"]}, "raft.yaml", out)
    proc = run_process(cmd, 15, cwd=ROOT, env=_env())
    _refusal(proc, f"model_name_or_path={str(quick_models['rm'])!r} is a {RM_ARCH}", "not a causal LM", "lm_head")
    assert not out.exists()


def test_a_reward_model_as_the_overopt_policy_is_refused_before_any_work(quick_models, tmp_path):
    out = tmp_path / "curve"
    cmd = _recipe("overopt", "--model_name_or_path", str(quick_models["rm"]), "--reward_model_name_or_path")
    cmd += [str(quick_models["rm"]), "--dataset_name", str(quick_models["data"]), "--output_dir", str(out)]
    cmd += ["--test_offset", str(QUICK_TEST_OFFSET), "--n_max", "2", "--heldout_prompts", "2", "--progress", "false"]
    proc = run_process(cmd, 15, cwd=ROOT, env=_env())
    _refusal(proc, f"model_name_or_path={str(quick_models['rm'])!r} is a {RM_ARCH}", "not a causal LM")
    assert not out.exists()


def test_a_reward_model_as_the_dpo_policy_is_refused_before_any_work(quick_models, tmp_path):
    from trl import ModelConfig, TrlParser

    from hhrm.raft import RaftConfig, RaftRunner

    out = tmp_path / "dpo"
    argv = _quick_raft(quick_models | {"policy": quick_models["rm"]}, "raft_dpo.yaml", out)[2:]
    data_args, args, model_args = TrlParser((hdata.DataArguments, RaftConfig, ModelConfig)).parse_args_and_config(argv)
    assert args.update == "dpo"
    with pytest.raises(ValueError, match=f"model_name_or_path=.* is a {RM_ARCH} \\(a reward model\\), not a causal"):
        RaftRunner(args, data_args, model_args)
    assert not out.exists()


def test_a_reward_model_as_the_compare_policy_is_refused_before_any_run(quick_models, tmp_path):
    argv = _quick_raft(quick_models | {"policy": quick_models["rm"]}, "raft.yaml", tmp_path / "unused")[4:]
    settings = yaml.safe_load((CONFIGS / "raft.yaml").read_text())
    settings |= {k.removeprefix("--"): yaml.safe_load(v) for k, v in zip(argv[::2], argv[1::2]) if k != "--output_dir"}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(settings))
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(settings | {"update": "dpo"}))
    out = tmp_path / "cmp"
    args = compare.CompareConfig(
        sft_config=str(tmp_path / "sft.yaml"), dpo_config=str(tmp_path / "dpo.yaml"), output_dir=str(out), seeds=[0]
    )
    args.launcher = "python"
    with pytest.raises(ValueError, match=f"sft_config's model_name_or_path=.* is a {RM_ARCH}"):
        compare.run(args, ROOT / "recipes" / "raft.py")
    assert not out.exists()


def test_a_reward_model_as_the_sft_base_is_refused_before_any_work(quick_models, tmp_path):
    from trl import ModelConfig

    from hhrm import sft

    out = tmp_path / "sft"
    args = sft.SFTConfig(
        output_dir=str(out), max_steps=2, max_length=64, eval_rows=0, gold_eval_prompts=0, **QUIET_CPU
    )
    data_args = hdata.DataArguments(dataset_name=str(quick_models["data"]), test_offset=QUICK_TEST_OFFSET)
    with pytest.raises(ValueError, match=f"model_name_or_path=.* is a {RM_ARCH}"):
        load_recipe("sft").main(data_args, args, ModelConfig(model_name_or_path=str(quick_models["rm"])))
    assert not out.exists()


def _tiny_causal_lm(folder: Path, tied: bool) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, tie_word_embeddings=tied,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_a_causal_lm_lacking_a_weight_is_refused_and_complete_ones_pass(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    model_checks.check_causal_lm(tiny["base"])
    tied = _tiny_causal_lm(tmp_path / "tied", tied=True)
    model_checks.check_causal_lm(tied)  # lm_head is the embeddings' tensor, stored once
    assert "lm_head.weight" not in model_checks.checkpoint_keys(tied)
    for name in ("model.norm.weight", "lm_head.weight"):
        folder = _tiny_causal_lm(tmp_path / name, tied=False)
        weights = load_file(folder / "model.safetensors")
        del weights[name]
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ValueError, match=f"lacks 1 of the causal LM's parameters \\({name}\\).*randomly"):
            model_checks.check_causal_lm(folder, "model_name_or_path")


# --------------------------------------------------------------------------------------------
# Item 2: non-finite settings, and stages that train to NaN


def test_non_finite_settings_are_refused_when_parsed(tmp_path):
    proc = run_process(
        _recipe("raft", "--config", str(CONFIGS / "raft_dpo.yaml"), "--beta", "inf"), 10, cwd=ROOT, env=_env()
    )
    _refusal(proc, "beta=inf", "finite")
    cmd = _recipe("sft", "--config", str(CONFIGS / "sft.yaml"), "--learning_rate", "nan")
    cmd += ["--output_dir", str(tmp_path / "sft")]
    _refusal(run_process(cmd, 10, cwd=ROOT, env=_env()), "learning_rate=nan")
    assert not (tmp_path / "sft").exists()
    with pytest.raises(ValueError, match=r"temperature=nan, top_p=inf: numeric settings must be finite"):
        overopt.OverOptConfig(
            reward_model_name_or_path="rm", output_dir=str(tmp_path), temperature=float("nan"), top_p=float("inf")
        )


def test_a_zero3_shard_is_checked_where_it_lives():
    """Under ZeRO-3 a parameter is empty on every rank and its shard is ``ds_tensor``: the NaN is found there."""
    model = torch.nn.Linear(2, 2)
    assert finite.non_finite_flags(model).tolist() == [0, 0]
    model.weight.ds_tensor = torch.tensor([1.0, float("nan")])
    model.weight.data = torch.empty(0)
    assert finite.non_finite_flags(model).tolist() == [1, 0]


@pytest.mark.slow
def test_a_dpo_iteration_that_trains_to_nan_is_never_saved_nor_resumed_past(quick_models, tmp_path):
    out = tmp_path / "dpo"
    cmd = _quick_raft(quick_models, "raft_dpo.yaml", out, "--learning_rate", "1e39")  # finite, overflows fp32 Adam
    for attempt in range(2):  # the re-run trains the iteration again and stops the same way
        proc = run_process(cmd, 60, cwd=ROOT, env=_env())
        last = _refusal(proc, "iteration 0: the dpo update trained to non-finite values", "learning_rate=1e+39")
        assert "beta=0.1" in last and "the iteration's policy was not saved" in last
        assert not (out / "iter_000" / "policy").exists() and not (out / "metrics.json").exists()
        assert (out / "iter_000" / "kept.jsonl").is_file()  # the stages before the update stay done
    assert not [f for f in _files(out) if f.endswith((".safetensors", "raft_done"))]


@pytest.mark.slow
def test_sft_and_rm_that_train_to_nan_write_no_model(tiny, tmp_path):
    out = tmp_path / "sft"
    cmd = _recipe("sft", "--config", str(CONFIGS / "sft.yaml"), "--model_name_or_path", str(tiny["base"]))
    cmd += ["--dataset_name", str(tiny["data"]), "--test_offset", "100", "--max_train_rows", "32", "--max_steps", "2"]
    cmd += ["--max_length", "64", "--eval_rows", "0", "--gold_eval_prompts", "0", "--learning_rate", "1e39"]
    cmd += ["--report_to", "none", "--output_dir", str(out)]
    last = _refusal(run_process(cmd, 30, cwd=ROOT, env=_env()), "SFT trained to non-finite values")
    assert "the model was not saved; lower learning_rate=1e+39" in last
    assert not [f for f in _files(out) if f.endswith((".safetensors", ".json", ".bin"))]

    from trl import ModelConfig

    from hhrm.rm import stage as rm

    out = tmp_path / "rm"
    args = rm.RewardConfig(
        output_dir=str(out), max_steps=2, per_device_train_batch_size=8, learning_rate=1e39, max_length=128,
        eval_before_training=False, gold_prompts=0, logging_steps=50, **QUIET_CPU,
    )  # fmt: skip
    data_args = hdata.DataArguments(dataset_name=str(tiny["data"]), test_offset=100, max_train_rows=32)
    with pytest.raises(finite.NonFiniteTraining, match="reward-model training trained to non-finite .* learning_rate"):
        load_recipe("rm").main(data_args, args, ModelConfig(model_name_or_path=str(tiny["base"])))
    assert not [f for f in _files(out) if f.endswith((".safetensors", ".json", ".bin"))]


@pytest.mark.slow
def test_every_rank_stops_on_a_nan_update_under_two_processes(quick_models, tmp_path):
    """Both ranks agree on the check (a max over their flags) and exit: none waits at the next barrier."""
    out = tmp_path / "raft_ddp"
    argv = _quick_raft(quick_models, "raft.yaml", out, "--learning_rate", "1e39", "--ddp_timeout", "120")[2:]
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--quiet", "--multi_gpu", "--num_processes"]
    cmd += ["2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "recipes/raft.py", *argv]
    proc = run_process(cmd, 60, cwd=ROOT, env=_env())
    report = f"exit {proc.returncode}\nstderr:\n{proc.stderr[-4000:]}"
    # torch's elastic agent ends with its own failure summary after the ranks' exits, so no "last line" here
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and proc.stderr.count("hhrm: error:") == 1, report
    line = next(x for x in proc.stderr.splitlines() if x.startswith("hhrm: error: "))
    assert "iteration 0: the sft update trained to non-finite values" in line and "learning_rate=1e+39" in line
    assert "exitcode  : 2" in proc.stderr and not (out / "iter_000" / "policy").exists()
