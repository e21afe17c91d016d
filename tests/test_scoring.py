"""The reward scorer: which token is scored, pad handling, batching invariance."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hhrm import model_checks
from hhrm.reward import scoring

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


# --------------------------------------------------------------------------------------------
# Reward-model folders: a causal LM, a 2-label classifier, a missing head or pad token are refused before use; pad ==
# eos loads only under a stated or recorded convention


def save_classifier(
    tiny, path, num_labels: int = 1, pad_is_eos: bool = False, drop_head: bool = False, no_pad: bool = False
):
    model = AutoModelForSequenceClassification.from_pretrained(tiny["base"], num_labels=num_labels)
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    if pad_is_eos:
        tok.pad_token = tok.eos_token
    if no_pad:
        tok.pad_token = None
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if drop_head:  # weights without the score head: loading would initialise it randomly
        from safetensors.torch import load_file, save_file

        weights = load_file(path / "model.safetensors")
        del weights["score.weight"]
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def rm_folder(tiny, tmp_path_factory):
    return save_classifier(tiny, tmp_path_factory.mktemp("rm_folder"))


def test_a_one_label_classifier_folder_is_accepted(rm_folder):
    tok = model_checks.check_reward_model(rm_folder)
    assert tok.pad_token_id != tok.eos_token_id
    scorer = scoring.RewardScorer.from_pretrained(rm_folder, device="cpu")
    assert scorer.tokenizer.pad_token_id == tok.pad_token_id and len(scorer.score(TEXTS)) == len(TEXTS)


def test_a_causal_lm_folder_is_refused_as_reward_model(tiny):
    with pytest.raises(ValueError, match=r"reward_model_name_or_path='.*' is a LlamaForCausalLM, not a reward model"):
        model_checks.check_reward_model(tiny["base"])
    with pytest.raises(ValueError, match=r"reward_model='.*' is a LlamaForCausalLM"):
        scoring.RewardScorer.from_pretrained(tiny["base"], setting="reward_model")


@pytest.mark.parametrize(
    "kind, match",
    [
        ("two_labels", "num_labels=2, a reward model has num_labels=1"),
        ("no_pad", r"the reward tokenizer has no pad token \(eos="),
        ("no_head", r"no reward head \(score.weight missing\)"),
    ],
)
def test_bad_reward_folders_are_refused(tiny, tmp_path, kind, match):
    path = save_classifier(
        tiny,
        tmp_path / kind,
        num_labels=2 if kind == "two_labels" else 1,
        no_pad=kind == "no_pad",
        drop_head=kind == "no_head",
    )
    with pytest.raises(ValueError, match=f"reward_model_name_or_path={str(path)!r}: .*{match}"):
        model_checks.check_reward_model(path)
    with pytest.raises(ValueError, match=match):
        scoring.RewardScorer.from_pretrained(path, device="cpu")


def test_a_pad_is_eos_folder_passes_the_folder_check_and_loads_under_a_stated_convention(tiny, tmp_path):
    path = save_classifier(tiny, tmp_path / "pad_is_eos", pad_is_eos=True)
    tok = model_checks.check_reward_model(path)  # the folder is a reward model; how to score it is the convention's
    assert tok.pad_token_id == tok.eos_token_id
    with pytest.raises(ValueError, match=r"pad == EOS\) and its config.json records no reward_convention"):
        scoring.RewardScorer.from_pretrained(path, device="cpu")
    with pytest.raises(ValueError, match=r"reward_convention='hhrm': .*pad token distinct from EOS"):
        scoring.RewardScorer.from_pretrained(path, device="cpu", convention="hhrm")
    scorer = scoring.RewardScorer.from_pretrained(path, device="cpu", convention="trl-grpo")
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():  # trl-grpo: the text as given, no BOS, read at its last token (no EOS in these texts)
        direct = [model(input_ids=torch.tensor([tok(t, add_special_tokens=False)["input_ids"]])).logits[0, 0].item()
                  for t in TEXTS]  # fmt: skip
    assert scorer.convention.name == "trl-grpo" and scorer.score(TEXTS) == pytest.approx(direct, abs=1e-5)


def test_missing_folders_are_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match="reward_model_name_or_path='.*nope': no such folder"):
        model_checks.check_reward_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="reward_model_name_or_path='.*empty': no config.json"):
        model_checks.check_reward_model(tmp_path / "empty")
    with pytest.raises(ValueError, match="reward_model_name_or_path is not set"):
        model_checks.check_reward_model(None)


def test_raft_refuses_a_causal_lm_reward_model_before_any_generation(tiny, tmp_path):
    from trl import ModelConfig

    from hhrm import data
    from hhrm.raft import RaftConfig, RaftRunner

    args = RaftConfig(
        output_dir=str(tmp_path / "raft"),
        reward_model_name_or_path=str(tiny["base"]),
        prompts_per_iteration=4,
        activation_checkpointing=False,
        report_to="none",
    )
    data_args = data.DataArguments(dataset_name=str(tiny["data"]), test_offset=100)
    with pytest.raises(ValueError, match="reward_model_name_or_path=.* is a LlamaForCausalLM, not a reward model"):
        RaftRunner(args, data_args, ModelConfig(model_name_or_path=str(tiny["base"])))
    assert not list((tmp_path / "raft").rglob("*.jsonl"))  # nothing drawn or generated
