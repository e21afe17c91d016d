"""The reward scorer: which token is scored, pad handling, batching invariance."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hhrm import scoring

TEXTS = [
    "###Human: What is 2 plus 3? ###Assistant: 2 plus 3 is 5.",
    "###Human: Hi there! ###Assistant: Hello! How can I help you today? ###Human: How many words are in this list: "
    "apple river stone? ###Assistant: There are 3 words in the list.",
    "###Human: Which number is larger, 12 or 40? ###Assistant: The larger number is 40.",
]


@pytest.fixture(scope="module")
def rm(tiny):
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    model = AutoModelForSequenceClassification.from_pretrained(tiny["base"], num_labels=1).eval()
    with torch.no_grad():  # a non-trivial head, so a wrong position gives a visibly different reward
        model.score.weight.normal_(0, 1.0)
    return model, tok


def test_scored_token_is_the_appended_eos(rm):
    model, tok = rm
    scorer = scoring.RewardScorer(model, tok)
    rewards = scorer.score(TEXTS)
    for text, reward in zip(TEXTS, rewards):
        ids = scoring.encode(tok, [text])[0]
        assert ids[-1] == tok.eos_token_id  # EOS appended once, as RewardTrainer does
        assert tok.pad_token_id != tok.eos_token_id
        with torch.no_grad():
            hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state
            at_eos = model.score(hidden[0, -1]).item()
            before_eos = model.score(hidden[0, -2]).item()
        assert reward == pytest.approx(at_eos, abs=1e-5)
        assert abs(reward - before_eos) > 1e-3  # the position matters, so the test can tell them apart


def test_eos_not_appended_twice(rm):
    model, tok = rm
    scorer = scoring.RewardScorer(model, tok)
    assert scorer.score(TEXTS) == pytest.approx(scorer.score([t + tok.eos_token for t in TEXTS]), abs=1e-6)


def test_pad_equal_to_eos_is_refused_and_would_score_the_wrong_token(rm):
    model, tok = rm
    bad = AutoTokenizer.from_pretrained(tok.name_or_path)
    bad.pad_token = bad.eos_token
    with pytest.raises(ValueError, match="pad token distinct from EOS"):
        scoring.RewardScorer(model, bad)
    # Why: with pad == eos the head skips the appended EOS and reads the token before it.
    ids = torch.tensor(scoring.encode(tok, TEXTS[:1]))
    model.config.pad_token_id = tok.eos_token_id
    try:
        with torch.no_grad():
            wrong = model(input_ids=ids).logits[0, 0].item()
            before_eos = model.score(model.model(input_ids=ids).last_hidden_state[0, -2]).item()
    finally:
        model.config.pad_token_id = tok.pad_token_id
    assert wrong == pytest.approx(before_eos, abs=1e-5)


def test_batching_and_order_do_not_change_rewards(rm):
    model, tok = rm
    texts = TEXTS * 3 + [TEXTS[0][:30]]
    one = scoring.RewardScorer(model, tok, batch_size=1).score(texts)
    many = scoring.RewardScorer(model, tok, batch_size=64).score(texts)
    capped = scoring.RewardScorer(model, tok, batch_size=64, max_tokens_per_batch=60).score(texts)
    assert many == pytest.approx(one, abs=1e-5)
    assert capped == pytest.approx(one, abs=1e-5)
    pairs = scoring.RewardScorer(model, tok).score_pairs(
        [t.split(" ###Assistant:")[0] + " ###Assistant:" for t in TEXTS[:1]], [" 2 plus 3 is 5."]
    )
    assert pairs == pytest.approx(one[:1], abs=1e-5)


def test_scorer_rejects_multi_label_models(tiny):
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    model = AutoModelForSequenceClassification.from_pretrained(tiny["base"], num_labels=2)
    with pytest.raises(ValueError, match="num_labels=1"):
        scoring.RewardScorer(model, tok)
