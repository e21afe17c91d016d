"""The embedded default's folders: normal Hugging Face data and model folders, built once and reused."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer


def test_embedded_folder_is_a_normal_hf_model(tiny):
    assert (tiny["data"] / "train.jsonl").is_file() and (tiny["data"] / "test.jsonl").is_file()
    first = json.loads((tiny["data"] / "train.jsonl").open().readline())
    assert first["chosen"].startswith("\n\nHuman:")  # raw Anthropic format, like the real release
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    assert tok.pad_token == "<pad>" and tok.eos_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id
    text = "###Human: What is 3 plus 4? ###Assistant: 3 plus 4 is 7."
    assert tok.decode(tok(text)["input_ids"]) == text  # round trip, no special tokens added
    lm = AutoModelForCausalLM.from_pretrained(tiny["base"])
    assert lm.config.pad_token_id == tok.pad_token_id and lm.dtype == torch.float32
    rm = AutoModelForSequenceClassification.from_pretrained(tiny["base"], num_labels=1)
    assert rm(**tok([text], return_tensors="pt")).logits.shape == (1, 1)


def test_embedded_build_is_reused(tiny):
    from hhrm.embedded import EmbeddedSpec, ensure_embedded

    from conftest import TEST_SPEC

    before = (tiny["base"] / "model.safetensors").stat().st_mtime_ns
    ensure_embedded(tiny["base"].parent, EmbeddedSpec(**TEST_SPEC))
    assert (tiny["base"] / "model.safetensors").stat().st_mtime_ns == before
