"""Model loading: which paths are local or hub ids, the pad id in the embeddings, exported folders, remote code."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from huggingface_hub import constants
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
from trl import ModelConfig, SFTTrainer

from hhrm import model_checks, modeling, sft
from hhrm.embedded import llama_config
from hhrm.rm import stage as rm

# --------------------------------------------------------------------------------------------
# Model paths: local if it exists, a hub id only if it looks like one, refused at once offline


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """cwd = a fresh folder holding ``models/`` and ``a_file``, so relative paths mean the same on every machine."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "a_file").write_text("")
    return tmp_path


def online(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


NOT_HUB_IDS = ["models/nope", "./nope", "/nope/model", "~/nope", "outputs/tiny/sft", "a/b/c", "nope", "own er/name"]


@pytest.mark.parametrize("path", NOT_HUB_IDS)
def test_missing_paths_that_are_no_hub_id_are_refused_at_once(in_tmp, monkeypatch, path):
    online(monkeypatch)  # refused without any hub request, even when the hub may be contacted
    with pytest.raises(model_checks.ModelPathError, match=f"model_name_or_path={path!r}: no such folder"):
        model_checks.check_model_path(path)


def test_the_rm_stage_names_the_missing_sft_stage(in_tmp, monkeypatch):
    online(monkeypatch)
    with pytest.raises(FileNotFoundError, match=r"model_name_or_path='outputs/tiny/sft'.*run `make sft`"):
        rm.check_model_path(ModelConfig(model_name_or_path="outputs/tiny/sft"))


def test_local_folders_hub_ids_and_offline(in_tmp, tiny, monkeypatch):
    assert model_checks.check_model_path(str(tiny["base"])) == "local"
    assert model_checks.check_model_path("models") == "local"
    with pytest.raises(ValueError, match="model_name_or_path='a_file' is a file"):
        model_checks.check_model_path("a_file")
    with pytest.raises(ValueError, match="model_name_or_path is not set"):
        model_checks.check_model_path("")
    online(monkeypatch)
    with listening() as port:  # a hub id is taken as one where the hub can be reached...
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        assert model_checks.check_model_path("EleutherAI/gpt-neo-2.7B") == "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"reward_model_name_or_path='EleutherAI/gpt-neo-2\.7B'.*HF_HUB_OFFLINE=1"):
        model_checks.check_model_path("EleutherAI/gpt-neo-2.7B", "reward_model_name_or_path")


def test_a_hub_id_is_refused_at_once_where_the_hub_cannot_be_reached(in_tmp, monkeypatch):
    online(monkeypatch)  # no offline setting: only the unreachable hub says that nothing can be fetched
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(in_tmp / "hub_cache"))
    for path in ("models_x/nope", "EleutherAI/gpt-neo-2.7B"):
        with pytest.raises(model_checks.ModelPathError) as err:
            model_checks.check_model_path(path)
        assert f"model_name_or_path={path!r}: no such local folder ({Path.cwd() / path})" in str(err.value)
        assert f"not a reachable hub id: the hub ({endpoint}) cannot be reached" in str(err.value)
    # ...or where it is in the local hub cache, which loads offline.
    snapshot = in_tmp / "hub_cache" / "models--EleutherAI--gpt-neo-2.7B" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    assert model_checks.check_model_path("EleutherAI/gpt-neo-2.7B") == "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert model_checks.check_model_path("EleutherAI/gpt-neo-2.7B") == "hub"


@contextmanager
def listening():
    """A port on 127.0.0.1 that takes connections (a reachable endpoint; nothing is ever answered)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens: a connection to it is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_load_tokenizer_checks_the_path_first(in_tmp, monkeypatch):
    with pytest.raises(ValueError, match="model_name_or_path='models/nope': no such folder"):
        modeling.load_tokenizer(ModelConfig(model_name_or_path="models/nope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        modeling.load_tokenizer(ModelConfig(model_name_or_path="nobody-hhrm/no-such-model"))


# --------------------------------------------------------------------------------------------
# Weight files: a truncated safetensors file or a missing shard is refused by its size, before any load


def test_truncated_weight_files_and_missing_shards_are_refused_by_size(tiny, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny["base"], folder)
    model_checks.check_model_path(str(folder))  # whole: accepted
    weights = folder / "model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])
    size, need = f"{len(blob) // 2 / 1e6:.1f} MB", f"{len(blob) / 1e6:.1f} MB"
    with pytest.raises(ValueError) as err:
        model_checks.check_model_path(str(folder), "reward_model_name_or_path")
    assert str(err.value) == (
        f"reward_model_name_or_path={str(folder)!r}: model.safetensors is truncated ({size} of {need}): "
        "copy it again or retrain"
    )
    header = int.from_bytes(blob[:8], "little")
    weights.write_bytes(blob[: 8 + header // 2])  # cut inside the header
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated \([\d,]+ bytes of at least [\d,]+ bytes"):
        model_checks.check_model_path(str(folder))
    weights.write_bytes(blob[:5])  # not even the header's length
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated \(5 bytes: its header is incomplete\)"):
        model_checks.check_model_path(str(folder))
    weights.write_bytes(blob)
    keys = json.loads(blob[8 : 8 + header])
    index = {"weight_map": {k: "model-00001-of-00002.safetensors" for k in keys if k != "__metadata__"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"index\.json names 1 of 1 weight shards not in the folder \(model-00001"):
        model_checks.check_model_path(str(folder))


# --------------------------------------------------------------------------------------------
# pad == EOS in a checkpoint's config must not freeze the EOS embedding


def test_match_vocab_moves_padding_idx_off_eos(tiny, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    tok.pad_token = tok.eos_token  # a checkpoint shipped with pad == eos (GPT-Neo, many LLaMA exports)
    config = llama_config(
        tok,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    assert config.pad_token_id == config.eos_token_id
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")

    tokenizer = modeling.load_tokenizer(ModelConfig(model_name_or_path=str(tmp_path / "m")))
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    eos = tokenizer.eos_token_id
    text = tokenizer("###Human: hi ###Assistant: hello")["input_ids"]
    ids = torch.tensor([text + [eos] + text])  # EOS inside the sequence (packed SFT), so its output is in the loss

    def eos_gradient() -> float:
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return model.get_input_embeddings().weight.grad[eos].abs().sum().item()

    assert model.get_input_embeddings().padding_idx == eos
    assert eos_gradient() == 0.0  # the bug: EOS, the token the reward is read at, never learns
    modeling.match_vocab(model, tokenizer)
    assert model.get_input_embeddings().padding_idx == tokenizer.pad_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert eos_gradient() > 0.0


# --------------------------------------------------------------------------------------------
# Exported folders: readable by all, no training_args.bin; checkpoints keep theirs


def test_save_merged_folder_is_readable_and_has_no_pickle(tiny, tmp_path):
    out = tmp_path / "out"
    args = sft.SFTConfig(
        output_dir=str(out),
        max_steps=1,
        max_length=64,
        per_device_train_batch_size=2,
        save_strategy="steps",
        save_steps=1,
        activation_checkpointing=False,
        report_to="none",
    )
    tok = modeling.load_tokenizer(ModelConfig(model_name_or_path=str(tiny["base"])), args=args)
    texts = Dataset.from_dict({"text": ["###Human: hi ###Assistant: hello"] * 4})
    trainer = SFTTrainer(model=str(tiny["base"]), args=args, train_dataset=texts, processing_class=tok)
    trainer.train()
    assert (out / "checkpoint-1" / "training_args.bin").is_file()
    modeling.save_merged(trainer, out, tok)
    files = [p for p in out.rglob("*") if p.is_file() and "checkpoint-1" not in p.parts]
    assert "model.safetensors" in {p.name for p in files}
    assert not (out / "training_args.bin").exists()
    assert (out / "checkpoint-1" / "training_args.bin").is_file()  # resume_from_checkpoint still reads it
    unreadable = [f"{p.name}: {oct(p.stat().st_mode & 0o777)}" for p in files if p.stat().st_mode & 0o444 != 0o444]
    assert not unreadable, unreadable
    assert AutoModelForCausalLM.from_pretrained(out).config.pad_token_id == tok.pad_token_id


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o644)])
def test_finish_export_gives_at_least_0644_and_follows_the_umask(tmp_path, umask, expected):
    folder = tmp_path / "model"
    (folder / "adapter").mkdir(parents=True)
    (folder / "checkpoint-3").mkdir()
    for path in (folder / "model.safetensors", folder / "adapter" / "adapter_model.safetensors"):
        path.write_bytes(b"weights")
        path.chmod(0o600)  # as safetensors writes them
    for path in (folder / "training_args.bin", folder / "adapter" / "training_args.bin"):
        path.write_bytes(b"pickle")
    (folder / "checkpoint-3" / "training_args.bin").write_bytes(b"pickle")
    old = os.umask(umask)
    try:
        modeling.finish_export(folder)
    finally:
        os.umask(old)
    for path in (folder / "model.safetensors", folder / "adapter" / "adapter_model.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == expected
    assert stat.S_IMODE((folder / "adapter").stat().st_mode) & 0o755 == 0o755
    assert not (folder / "training_args.bin").exists() and not (folder / "adapter" / "training_args.bin").exists()
    assert (folder / "checkpoint-3" / "training_args.bin").is_file()


# --------------------------------------------------------------------------------------------
# --trust_remote_code: one home (the training config, where TRL 1.16 parses it), model and tokenizer alike


@pytest.fixture
def custom_code_tokenizer(tiny, tmp_path, monkeypatch):
    """A copy of the tiny model whose tokenizer class is custom code shipped in the folder."""
    import transformers.dynamic_module_utils as dynamic

    folder = tmp_path / "custom_code_model"
    shutil.copytree(tiny["base"], folder)
    (folder / "hhrm_custom_tok.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\nclass HhrmCustomTokenizer(PreTrainedTokenizerFast):\n"
        "    pass\n"
    )
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "hhrm_custom_tok.HhrmCustomTokenizer"]}
    config["tokenizer_class"] = "HhrmCustomTokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # not the user's ~/.cache
    monkeypatch.setattr(sys, "path", list(sys.path))
    return folder


def test_trust_remote_code_reaches_the_tokenizer_and_the_model(custom_code_tokenizer, tmp_path):
    model_args = ModelConfig(model_name_or_path=str(custom_code_tokenizer))
    trusted = sft.SFTConfig(output_dir=str(tmp_path / "o"), trust_remote_code=True, activation_checkpointing=False)
    untrusted = sft.SFTConfig(output_dir=str(tmp_path / "o"), activation_checkpointing=False)
    assert modeling.model_init_kwargs(model_args, trusted)["trust_remote_code"] is True
    assert modeling.model_init_kwargs(model_args, untrusted)["trust_remote_code"] is False
    with pytest.raises(ValueError, match="trust_remote_code"):
        modeling.load_tokenizer(model_args, args=untrusted)
    tok = modeling.load_tokenizer(model_args, args=trusted)
    assert type(tok).__name__ == "HhrmCustomTokenizer" and tok.pad_token_id != tok.eos_token_id
