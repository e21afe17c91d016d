"""The one generation path: batching with left padding, cutting by token position, seeds."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hhrm import formatting
from hhrm.generation import SamplingArguments, generate_responses

PROMPTS = [
    "###Human: What is 3 plus 4? ###Assistant:",
    "###Human: Hi there! ###Assistant: Hello! How can I help you today? "
    "###Human: Which number is larger, 12 or 40? ###Assistant:",
    "###Human: How many words are in this list: apple river? ###Assistant:",
]


@pytest.fixture(scope="module")
def base(tiny):
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    model = AutoModelForCausalLM.from_pretrained(tiny["base"]).eval()
    return model, tok


def test_batched_left_padded_equals_one_by_one(base):
    """Greedy answers from one padded batch equal unpadded single-prompt answers, cut after the prompt's tokens."""
    model, tok = base
    greedy = SamplingArguments(max_new_tokens=12, do_sample=False, stop_at_turn_marker=False)
    batched = generate_responses(model, tok, PROMPTS, 1, greedy, batch_size=8)
    for prompt, got in zip(PROMPTS, batched):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        assert got == [tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)]
        assert not got[0].startswith(prompt)


def test_k_samples_shape_seed_and_token_stats(base):
    model, tok = base
    sampling = SamplingArguments(max_new_tokens=8)
    stats: dict = {}
    a = generate_responses(model, tok, PROMPTS, 3, sampling, batch_size=2, seed=7, stats=stats)
    b = generate_responses(model, tok, PROMPTS, 3, sampling, batch_size=2, seed=7)
    assert [len(r) for r in a] == [3, 3, 3]
    assert a == b  # same seed, same inputs: same samples (what a resumed RAFT stage relies on)
    assert 0 < stats["generated_tokens"] <= 3 * 3 * 8 and stats["seconds"] > 0


def test_responses_are_cut_at_the_next_turn(base):
    model, tok = base
    out = generate_responses(model, tok, PROMPTS, 4, SamplingArguments(max_new_tokens=16), seed=0)
    for row in out:
        for text in row:
            assert formatting.HUMAN not in text and formatting.ASSISTANT not in text
            assert text == formatting.cut_at_next_turn(text)


def test_bad_settings_fail_early(base):
    model, tok = base
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_responses(model, tok, PROMPTS, 1, SamplingArguments(max_new_tokens=0))
    with pytest.raises(ValueError, match="temperature"):
        generate_responses(model, tok, PROMPTS, 1, SamplingArguments(temperature=0.0))
    with pytest.raises(ValueError, match="top_p"):
        SamplingArguments(top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingArguments(top_k=-1)
    with pytest.raises(ValueError, match="k="):
        generate_responses(model, tok, PROMPTS, 0)


def test_generation_shared_prefill_matches_plain_generate(tiny):
    """hhrm's fast generation path (static cache, prefill once per prompt, cache repeated K times) gives
    the same tokens as plain ``generate(num_return_sequences=K)``: checked with top_k=1 sampling."""
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    model = AutoModelForCausalLM.from_pretrained(tiny["base"]).eval()
    prompts = [
        "###Human: What is 3 plus 4? ###Assistant:",
        "###Human: Hi! ###Assistant: Hello! ###Human: Which number is larger, 12 or 40? ###Assistant:",
    ]
    sampling = SamplingArguments(max_new_tokens=10, top_k=1, stop_at_turn_marker=False)
    got = generate_responses(model, tok, prompts, 3, sampling, batch_size=2)
    for prompt, row in zip(prompts, got):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        ref = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=sampling.generation_config(tok, 3)
        )
        assert row == tok.batch_decode(ref[:, ids.shape[1] :], skip_special_tokens=True)
