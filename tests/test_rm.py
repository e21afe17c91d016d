"""Reward-model stage: config rules, the pair filter, honest metrics, and one text -> one reward on every path."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hhrm import data, model_checks
from hhrm.reward import conventions, scoring
from hhrm.rm import card as rm_card
from hhrm.rm import evaluation as rm_eval
from hhrm.rm import stage as rm

from conftest import QUIET_CPU

FAST = QUIET_CPU | {"output_dir": "unused"}


def config(tmp_path, **kw) -> rm.RewardConfig:
    return rm.RewardConfig(**(FAST | {"output_dir": str(tmp_path / "out")} | kw))


# --------------------------------------------------------------------------------------------
# Config


def test_gradient_accumulation_is_derived_from_the_global_batch(tmp_path):
    assert rm.gradient_accumulation(32, 4, 1) == 8
    assert rm.gradient_accumulation(32, 4, 8) == 1
    args = config(tmp_path, global_batch_size=16, per_device_train_batch_size=4)
    assert args.gradient_accumulation_steps * args.per_device_train_batch_size * args.world_size == 16
    with pytest.raises(ValueError, match="global_batch_size=30"):
        config(tmp_path, global_batch_size=30, per_device_train_batch_size=4)


def test_one_length_limit(tmp_path):
    """The pair-length limit lives in RewardConfig.max_length only (the card's 512 by default)."""
    assert config(tmp_path).max_length == 512
    assert not hasattr(data.DataArguments(), "max_pair_tokens")
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_length"):
            config(tmp_path, max_length=bad)


def test_quantized_rm_needs_bf16_and_lora(tmp_path):
    from trl import ModelConfig

    with pytest.raises(ValueError, match="bf16"):
        rm.check_precision(ModelConfig(load_in_4bit=True, use_peft=True), config(tmp_path))


def test_lora_config_trains_and_saves_the_score_head():
    from trl import ModelConfig

    cfg = rm.reward_peft_config(ModelConfig(use_peft=True, lora_r=4))
    assert str(cfg.task_type).endswith("SEQ_CLS") and "score" in cfg.modules_to_save
    assert rm.reward_peft_config(ModelConfig(use_peft=False)) is None


# --------------------------------------------------------------------------------------------
# Pairs: the 512-token filter and train/test overlap


@pytest.fixture(scope="module")
def tok(tiny):
    return AutoTokenizer.from_pretrained(tiny["base"])


PROMPT = "###Human: How many words are in this list: apple river? ###Assistant:"
SHORT = " There are 2 words in the list."


def response_of_length(tok, tokens: int) -> str:
    """A response whose prompt + response + EOS is exactly ``tokens`` long."""
    for n in range(1, 2 * tokens):
        response = SHORT + " apple" * n
        length = len(scoring.encode(tok, [PROMPT + response])[0])
        if length == tokens:
            return response
        if length > tokens:
            break
    pytest.skip(f"cannot build a {tokens}-token text with this tokenizer")


def long_fixture(tok) -> Dataset:
    at, over = response_of_length(tok, 512), response_of_length(tok, 513)
    return Dataset.from_dict(
        {
            "prompt": [PROMPT] * 5,
            "chosen": [SHORT, at, over, SHORT, over],
            "rejected": [SHORT + " No.", SHORT, SHORT, over, over],
        }
    )


def test_filter_drops_exactly_the_long_pairs(tmp_path, tok, tiny):
    fixture = long_fixture(tok)
    kept, dropped = rm.drop_long(rm.tokenize_pairs(fixture, tok), 512)
    assert dropped == 3  # 513 tokens (EOS counted) in chosen, rejected or both: dropped, never truncated
    assert list(kept["chosen"]) == [fixture["chosen"][0], fixture["chosen"][1]]
    assert max(len(x) for x in kept["chosen_ids"]) == 512
    # RewardTrainer's own filter (which counts the EOS it appends) agrees with ours on the raw pairs.
    from trl import RewardTrainer

    model = AutoModelForSequenceClassification.from_pretrained(tiny["base"], num_labels=1)
    trainer = RewardTrainer(
        model=model, args=config(tmp_path, max_length=512), train_dataset=fixture, processing_class=tok
    )
    assert list(trainer.train_dataset["chosen_ids"]) == list(kept["chosen_ids"])
    assert list(trainer.train_dataset["rejected_ids"]) == list(kept["rejected_ids"])


def test_prepare_pairs_counts_drops_and_removes_overlap(tok):
    extra = long_fixture(tok)
    train = Dataset.from_dict({k: list(extra[k]) for k in extra.column_names})
    test = Dataset.from_dict(
        {k: list(extra[k][:1]) + [" unseen"] if k != "prompt" else list(extra[k][:2]) for k in extra.column_names}
    )
    splits = data.PreferenceSplits(train=train, test=test, drops={}, source={})
    pairs = rm.prepare_pairs(splits, tok, 512)
    assert pairs.counts["pairs_dropped_long"] == 3
    assert pairs.counts["eval_pairs_overlapping_train"] == 1 and pairs.counts["eval_pairs"] == 1
    assert data.overlapping_pairs(pairs.train, pairs.test) == []


def test_a_test_split_equal_to_train_is_refused_before_training(tok):
    """One file given as both splits: every test pair is also a train pair, nothing would be left to evaluate."""
    extra = long_fixture(tok)
    same = Dataset.from_dict({k: list(extra[k][:2]) for k in extra.column_names})
    splits = data.PreferenceSplits(train=same, test=same, drops={}, source={})
    with pytest.raises(ValueError, match="no RM-test pair to evaluate: all 2 also occur in RM-train"):
        rm.prepare_pairs(splits, tok, 512)


def test_zero_epochs_is_refused(tmp_path):
    with pytest.raises(ValueError, match="num_train_epochs=0"):
        config(tmp_path, num_train_epochs=0)
    assert config(tmp_path, num_train_epochs=0, max_steps=3).max_steps == 3


# --------------------------------------------------------------------------------------------
# One text, one reward: RewardTrainer, hhrm's scorer, the evaluation and the card's pipeline snippet


@pytest.fixture(scope="module")
def saved_rm(tiny, tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("rm")
    model = AutoModelForSequenceClassification.from_pretrained(tiny["base"], num_labels=1)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def snippet_rewards(path, batch_size: int) -> tuple[list[str], list[float]]:
    scope: dict = {}
    exec(rm_card.pipeline_snippet(path, batch_size), scope)  # the very text the model card shows
    return scope["test_texts"], scope["rewards"]


@pytest.mark.parametrize("batch_size", [1, 2])
def test_card_pipeline_snippet_equals_direct_forward(saved_rm, batch_size):
    texts, rewards = snippet_rewards(saved_rm, batch_size)
    tok = AutoTokenizer.from_pretrained(saved_rm)
    model = AutoModelForSequenceClassification.from_pretrained(saved_rm).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    with torch.no_grad():
        direct = [model(input_ids=torch.tensor([ids])).logits[0, 0].item() for ids in scoring.encode(tok, texts)]
    assert len(rewards) == len(texts)
    assert rewards == pytest.approx(direct, abs=1e-5)


@pytest.mark.parametrize("padding_free", [False, True])
def test_same_reward_on_all_four_paths(saved_rm, tmp_path, padding_free):
    """Training (padded batches, or packed rows when padding_free) scores what the other three paths score."""
    from hhrm.rm.trainer import RewardTrainer

    texts, pipe = snippet_rewards(saved_rm, 2)
    prompts = [t.split(" ###Assistant:")[0] + " ###Assistant:" for t in texts]
    responses = [t[len(p) :] for t, p in zip(texts, prompts)]
    # rejected = the same texts, so both halves of the trainer's batch must give the same rewards.
    pairs = Dataset.from_dict({"prompt": prompts, "chosen": responses, "rejected": responses})

    tok = AutoTokenizer.from_pretrained(saved_rm)
    model = AutoModelForSequenceClassification.from_pretrained(saved_rm).eval()
    # 1. training: RewardTrainer's own tokenization (raw text in), collator and loss, through the model
    # (random order: the evaluation batch keeps the texts' order).
    args = config(tmp_path, per_device_eval_batch_size=8, padding_free=padding_free, train_sampling_strategy="random")
    trainer = RewardTrainer(model=model, args=args, train_dataset=pairs, eval_dataset=pairs, processing_class=tok)
    batch = next(iter(trainer.get_eval_dataloader()))
    assert ("attention_mask" in batch) != padding_free
    with torch.no_grad():
        logits = trainer.compute_loss(trainer.model, batch, return_outputs=True)[1].logits[:, 0]
    train_chosen, train_rejected = logits[: len(texts)].tolist(), logits[len(texts) :].tolist()
    # 2. hhrm's scorer; 3. the evaluation; 4. the card's pipeline snippet.
    scorer = scoring.RewardScorer.from_pretrained(saved_rm)
    scored = scorer.score_pairs(prompts, responses)
    eval_chosen, eval_rejected = rm_eval.pair_rewards(scorer, *rm_eval.pair_ids(tok, pairs))
    for other in (train_rejected, scored, eval_chosen.tolist(), eval_rejected.tolist(), pipe):
        assert other == pytest.approx(train_chosen, abs=1e-5)


def test_long_pairs_dropped_not_truncated(tiny):
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    short = {"prompt": "###Human: hi ###Assistant:", "chosen": " yes", "rejected": " no"}
    long = {"prompt": "###Human: hi ###Assistant:", "chosen": " word" * 100, "rejected": " no"}
    ds = Dataset.from_list([short, long, short])
    kept, dropped = rm.drop_long(rm.tokenize_pairs(ds, tok), 50)
    assert dropped == 1 and len(kept) == 2 and list(kept["chosen"]) == [" yes", " yes"]
    lc, _ = data.pair_lengths(ds, tok)
    # EOS counts, as RewardTrainer counts it: the limit is inclusive of the appended EOS, and the
    # data report's lengths are the very lengths the drop uses.
    assert list(lc) == [len(ids) for ids in rm.tokenize_pairs(ds, tok)["chosen_ids"]]
    kept, dropped = rm.drop_long(rm.tokenize_pairs(ds, tok), int(lc[0]) - 1)
    assert dropped == 3


# --------------------------------------------------------------------------------------------
# The export records its convention; the card's snippet follows it


@pytest.mark.parametrize("use_peft", [False, True])
def test_export_records_hhrms_convention_and_loads_without_a_setting(saved_rm, tmp_path, use_peft):
    import json

    from trl import ModelConfig, RewardTrainer

    model_args = ModelConfig(model_name_or_path=str(saved_rm), use_peft=use_peft, lora_r=4)
    tok = AutoTokenizer.from_pretrained(saved_rm)
    model = AutoModelForSequenceClassification.from_pretrained(saved_rm).eval()
    texts, _ = snippet_rewards(saved_rm, 1)
    expected = scoring.RewardScorer(model, tok).score(texts)
    pairs = Dataset.from_dict({"prompt": [PROMPT], "chosen": [SHORT], "rejected": [SHORT + " No."]})
    trainer = RewardTrainer(
        model=model,
        args=config(tmp_path),
        train_dataset=pairs,
        processing_class=tok,
        peft_config=rm.reward_peft_config(model_args),
    )
    out = rm.export(trainer, tmp_path / "export", tok, model_args)
    assert (out / "adapter").is_dir() == use_peft  # LoRA: the merged export path
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["reward_convention"] == "hhrm"
    # the start it was fine-tuned from (WARM averages only RMs of one start)
    assert recorded["reward_start"]["model"] == model_args.model_name_or_path
    assert recorded["reward_start"]["weights"] == model_checks.weights_identity(model_args.model_name_or_path)
    assert conventions.recorded(out) == "hhrm"
    scorer = scoring.RewardScorer.from_pretrained(out, device="cpu")
    assert scorer.convention is conventions.PRESETS["hhrm"]
    assert scorer.score(texts) == pytest.approx(expected, abs=1e-5)  # untrained LoRA: merged == the base
    # The record is on the config, so a later load-and-save of the folder keeps it.
    AutoModelForSequenceClassification.from_pretrained(out).save_pretrained(tmp_path / "resaved")
    assert conventions.recorded(tmp_path / "resaved") == "hhrm"


def test_card_snippet_follows_the_convention(saved_rm):
    hhrm_snippet = rm_card.pipeline_snippet(saved_rm, 1)
    card_snippet = rm_card.pipeline_snippet(saved_rm, 1, convention="card-pipeline")
    assert hhrm_snippet == rm_card.pipeline_snippet(saved_rm, 1, convention="hhrm") != card_snippet
    assert "rm_tokenizer.eos_token" in hhrm_snippet and "eos_token" not in card_snippet
    assert "Append EOS to each text, as the `hhrm` convention" in rm_card.usage(saved_rm)
    assert "no EOS appended" in rm_card.usage(saved_rm, "card-pipeline")
    # The card-pipeline snippet, run, is hhrm's scorer under that convention (texts without EOS).
    scope: dict = {}
    exec(card_snippet, scope)
    tok = AutoTokenizer.from_pretrained(saved_rm)
    model = AutoModelForSequenceClassification.from_pretrained(saved_rm).eval()
    card = scoring.RewardScorer(model, tok, convention=conventions.PRESETS["card-pipeline"]).score(scope["test_texts"])
    assert scope["rewards"] == pytest.approx(card, abs=1e-5)
    assert scope["rewards"] != pytest.approx(scoring.RewardScorer(model, tok).score(scope["test_texts"]), abs=1e-3)
    # A convention the pipeline cannot reproduce gets hhrm's scorer only, and no pipeline snippet.
    assert "pipeline(" not in rm_card.usage(saved_rm, "trl-grpo") and "reward_convention='trl-grpo'" in rm_card.usage(
        saved_rm, "trl-grpo"
    )
    with pytest.raises(ValueError, match="reward_convention='trl-grpo': the text-classification pipeline"):
        rm_card.pipeline_snippet(saved_rm, convention="trl-grpo")
