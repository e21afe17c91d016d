import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from hhrm import data, formatting, synthetic


def test_generation_is_deterministic_and_seeded():
    assert synthetic.generate(50, seed=3) == synthetic.generate(50, seed=3)
    assert synthetic.generate(50, seed=3) != synthetic.generate(50, seed=4)


def test_gold_reward_prefers_every_chosen_answer():
    rows = synthetic.generate(500, seed=1)
    ds, report = data.normalize_rows(rows, "raw", "gen")
    assert report.dropped == 0 and len(ds) == 500
    wrong_but_well_formed = 0
    for row in ds:
        assert synthetic.gold_reward(row["prompt"], row["chosen"]) == 1.0
        assert synthetic.gold_reward(row["prompt"], row["rejected"]) == 0.0
        wrong_but_well_formed += row["rejected"].strip() not in synthetic.REFUSALS
    # Most rejections are wrong answers in the right form, so style alone cannot separate them.
    assert wrong_but_well_formed / len(ds) > 0.7
    assert {synthetic.task_name(p) for p in ds["prompt"]} == {t.name for t in synthetic.TASKS}


@pytest.mark.parametrize(
    "question, good, bad",
    [
        ("What is 7 plus 8?", " 7 plus 8 is 15.", " 7 plus 8 is 16."),
        ("Which number is larger, 12 or 71?", " The larger number is 71.", " The larger number is 12."),
        ("How many centimeters are in 3 meters?", " There are 300 centimeters in 3 meters.", " 30 centimeters."),
        ("What is the last word in this list: apple river stone?", " The last word is stone.", " The last word is apple."),
        ("What is the first word in this list: apple river stone?", " The first word is apple.", " I don't know."),
        ("How many words are in this list: apple river stone?", " There are 3 words in the list.", " There are 4 words."),
    ],
)
def test_gold_reward_grades_free_text(question, good, bad):
    prompt = formatting.make_prompt([("Human", question)])
    assert synthetic.gold_reward(prompt, good) == 1.0
    assert synthetic.gold_reward(prompt, bad) == 0.0
    # Text after the model opens a new turn does not count.
    assert synthetic.gold_reward(prompt, bad + " ###Human:" + good) == 0.0


def test_gold_reward_rejects_foreign_prompts():
    with pytest.raises(ValueError, match="not a generated prompt"):
        synthetic.gold_reward("###Human: How do I bake bread? ###Assistant:", " Flour.")


def test_gold_summary_per_task():
    p_add = formatting.make_prompt([("Human", "What is 1 plus 1?")])
    p_cmp = formatting.make_prompt([("Human", "Which number is larger, 10 or 20?")])
    out = synthetic.gold_summary([p_add, p_add, p_cmp], [" 1 plus 1 is 2.", " 3", " 20"])
    assert out["gold_accuracy"] == pytest.approx(2 / 3)
    assert out["gold_accuracy_add"] == 0.5 and out["gold_accuracy_compare"] == 1.0


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
