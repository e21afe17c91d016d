"""accelerate_configs/fsdp.yaml on this CPU, as far as accelerate 1.16 lets it go.

accelerate applies FSDP to GPU-like processes only: ``AcceleratorState.__init__`` (accelerate/state.py, the
``elif self.distributed_type in [DistributedType.MULTI_GPU, ...]`` branch, which lists no MULTI_CPU) is the only place
that sets ``DistributedType.FSDP`` and attaches the plugin; a CPU process is MULTI_CPU (``cpu=True``) or NO (without
it), so the launch trains plain DDP or each rank alone, and hhrm refuses it (:func:`hhrm.runtime.check_fsdp_device`).

This test launches the config for real (``accelerate launch --config_file accelerate_configs/fsdp.yaml``, 2 processes
over gloo) and, on each rank: builds accelerate's ``FullyShardedDataParallelPlugin`` from what the launcher set, sees
``Accelerator`` drop it on the CPU (the gate), attaches it by hand (the one step the gate skips) and shards hhrm's tiny
Llama with accelerate's own FSDP2 code (``fsdp2_prepare_model``: ``fully_shard`` per decoder layer, as the config's
TRANSFORMER_BASED_WRAP says, then the root, on a CPU device mesh); runs one optimizer step on half a batch per rank;
gathers the full state dict as accelerate's ``get_state_dict`` does under FSDP2 and saves it. The parent then checks
that the step equals a one-process step on the whole batch, and that hhrm loads the saved folder.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from conftest import run_process

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "accelerate_configs" / "fsdp.yaml"
LR = 0.5  # plain SGD: the step is p - lr * grad, so equal parameters mean equal gradients (Adam's sign-like first
# step would turn float noise in a near-zero gradient into a full-size difference)
BATCH, LENGTH = 4, 24  # equal lengths, no padding: the mean of the two ranks' mean losses is the whole batch's


@pytest.mark.slow
def test_fsdp_config_shards_tiny_llama_and_steps_like_one_process(tiny, pad_is_eos_rm, tmp_path):
    """The SFT policy (tiny Llama) and a reward model (tiny Llama with a score head), both in one launch."""
    import torch
    import yaml
    from transformers import AutoConfig

    from hhrm.model_checks import check_causal_lm, check_reward_model

    if torch.cuda.is_available():  # fully_shard's default mesh would be CUDA's; there FSDP is not refused at all
        pytest.skip("a GPU is present: accelerate applies FSDP there, and hhrm does not refuse it")
    torch.manual_seed(0)
    vocab = AutoConfig.from_pretrained(tiny["base"]).vocab_size
    torch.save(torch.randint(3, vocab, (BATCH, LENGTH)), batch := tmp_path / "batch.pt")  # ids 0-2: eos, pad, bos
    out = tmp_path / "out"
    out.mkdir()
    accelerate = str(Path(sys.executable).parent / "accelerate")
    cmd = [accelerate, "launch", "--config_file", str(CONFIG), "--num_processes", "2", "--mixed_precision", "no"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = run_process([*cmd, __file__, str(batch), str(out), str(tiny["base"]), str(pad_is_eos_rm)], 25, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]

    # (a) the config is accepted: accelerate's plugin holds the yaml's settings
    yaml_settings = yaml.safe_load(CONFIG.read_text())["fsdp_config"]
    assert ranks[0]["settings"] == {
        "fsdp_version": yaml_settings["fsdp_version"],
        "auto_wrap_policy": "transformer_auto_wrap_policy",  # TRANSFORMER_BASED_WRAP
        "reshard_after_forward": yaml_settings["fsdp_reshard_after_forward"],
        "state_dict_type": yaml_settings["fsdp_state_dict_type"],
        "cpu_ram_efficient_loading": yaml_settings["fsdp_cpu_ram_efficient_loading"],
        "offload_params": yaml_settings["fsdp_offload_params"],
    }
    # The gate: on a CPU accelerate trains DDP and drops the plugin. When this fails, accelerate applies FSDP on a
    # CPU: train the config through the recipes and drop hhrm.runtime.check_fsdp_device.
    assert [(r["distributed_type"], r["plugin_kept"], r["world_size"]) for r in ranks] == [("MULTI_CPU", False, 2)] * 2

    for i, (source, check) in enumerate([(tiny["base"], check_causal_lm), (pad_is_eos_rm, check_reward_model)]):
        check_sharded_step(source, out / str(i), [r["models"][i] for r in ranks], batch, check)


def check_sharded_step(source: Path, saved: Path, ranks: list[dict], batch: Path, check) -> None:
    """(b) sharded per decoder layer and at the root, each rank holding half of every weight; (c) the loss and the
    stepped weights equal one process's SGD step on the whole batch; (d) hhrm's folder check passes on the saved
    folder, which loads with every weight from the checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    layers = [f"model.layers.{i}" for i in range(4)]
    reward = check.__name__ == "check_reward_model"
    head = [] if reward else ["lm_head"]  # accelerate groups the final norm with the output embeddings; a score
    # head is no output embedding, so it stays in the root's group
    assert sorted(ranks[0]["sharded"]) == sorted(["<root>", "model.embed_tokens", *layers, "model.norm", *head])
    auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    reference = auto.from_pretrained(source, dtype=torch.float32)
    for name, p in reference.named_parameters():  # every weight split along dim 0, rank 0 holding the odd row
        n, rest = p.shape[0], list(p.shape[1:])
        assert [r["local"][name] for r in ranks] == [[n - n // 2, *rest], [n // 2, *rest]], name

    before = {k: v.clone() for k, v in reference.state_dict().items()}
    loss = pair_or_lm_loss(reference, torch.load(batch))
    loss.backward()
    torch.optim.SGD(reference.parameters(), lr=LR).step()
    assert ranks[0]["loss"] == ranks[1]["loss"] == pytest.approx(loss.item(), rel=1e-5)

    check(saved)  # hhrm's check of a policy / reward model folder: architecture, every weight, tokenizer
    loaded, info = auto.from_pretrained(saved, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    after, stepped = loaded.state_dict(), reference.state_dict()
    assert after.keys() == stepped.keys()
    for name in after:
        torch.testing.assert_close(after[name], stepped[name], rtol=1e-5, atol=1e-6, msg=name)
    moved = max((stepped[k] - before[k]).abs().max().item() for k in stepped)
    assert moved > 1e-3  # the step changed the weights, so their equality says the sharded gradients were right


def pair_or_lm_loss(model, ids):
    """The SFT loss (next-token mean) of a causal LM, the RM loss (-log sigmoid of chosen minus rejected, rows 0::2
    chosen, 1::2 rejected) of a reward model: as each rank's share of the batch and as the whole batch."""
    import torch.nn.functional as F

    if hasattr(model, "score"):
        rewards = model(input_ids=ids).logits[:, 0]
        return -F.logsigmoid(rewards[0::2] - rewards[1::2]).mean()
    return model(input_ids=ids, labels=ids).loss


def plugin_settings(plugin) -> dict:
    return {
        "fsdp_version": plugin.fsdp_version,
        "auto_wrap_policy": getattr(plugin.auto_wrap_policy, "__name__", str(plugin.auto_wrap_policy)),
        "reshard_after_forward": plugin.reshard_after_forward,
        "state_dict_type": plugin.state_dict_type.name,
        "cpu_ram_efficient_loading": plugin.cpu_ram_efficient_loading,
        "offload_params": type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy",
    }


def worker(batch_file: str, out: str, *model_dirs: str) -> None:
    """Each rank of the FSDP launch (``accelerate launch`` set RANK, WORLD_SIZE and the FSDP_* variables)."""
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables the launcher set from the yaml
    report = {"settings": plugin_settings(plugin)}
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)  # hhrm's setting on a CPU (use_cpu): 2 ranks over gloo
    report["distributed_type"] = accelerator.distributed_type.name
    report["plugin_kept"] = getattr(accelerator.state, "fsdp_plugin", None) is plugin
    accelerator.state.fsdp_plugin = plugin  # what AcceleratorState does on a GPU, and the one step it skips here
    report["world_size"] = accelerator.num_processes
    report["models"] = [
        train_one_step(accelerator, Path(d), batch_file, Path(out) / str(i)) for i, d in enumerate(model_dirs)
    ]
    Path(out, f"rank{accelerator.process_index}.json").write_text(json.dumps(report))
    dist.barrier()


def train_one_step(accelerator, model_dir: Path, batch_file: str, out: Path) -> dict:
    """Shard ``model_dir`` as accelerate does under FSDP2, one SGD step on this rank's half of the batch, then the
    gathered weights saved (rank 0) as a model folder."""
    import torch
    import torch.distributed as dist
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    rank = accelerator.process_index
    reward = AutoConfig.from_pretrained(model_dir).architectures[0].endswith("ForSequenceClassification")
    auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    model = auto.from_pretrained(model_dir, dtype=torch.float32)
    if rank != 0:  # cpu_ram_efficient_loading: rank 0's weights are broadcast, whatever the others loaded
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
    model = fsdp2_prepare_model(accelerator, model)
    sharded = [name or "<root>" for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    local = {name: list(p.to_local().shape) for name, p in model.named_parameters()}

    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loss = pair_or_lm_loss(model, torch.load(batch_file).chunk(accelerator.num_processes)[rank])
    loss.backward()
    optimizer.step()
    dist.all_reduce(mean := loss.detach().clone())

    # As accelerate's get_state_dict under FSDP2 (FULL_STATE_DICT): gathered on the CPU, whole on rank 0.
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
    state_dict = get_model_state_dict(model, options=options)
    if accelerator.is_main_process:
        model.save_pretrained(out, state_dict=state_dict)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            if (model_dir / name).is_file():
                shutil.copy(model_dir / name, out / name)
    return {"sharded": sharded, "local": local, "loss": mean.item() / accelerator.num_processes}


if __name__ == "__main__":
    worker(*sys.argv[1:])
