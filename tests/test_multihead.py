"""The RM recipe's reward ensembles: E bootstrapped score heads on one backbone (``ensemble_kind=heads``) and E whole
RMs by seed (``ensemble_kind=seeds``), trained by the real trainer and scored through hhrm's reward seam."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from trl import ModelConfig

from hhrm import data, model_checks
from hhrm.reward import ensemble, scoring, sources
from hhrm.rm import heads as rm_heads
from hhrm.rm import stage as rm
from hhrm.rm.trainer import RewardTrainer

from conftest import QUIET_CPU, load_recipe

E = 3


def recipe_args(out: Path, **kw) -> rm.RewardConfig:
    return rm.RewardConfig(
        **(QUIET_CPU | dict(output_dir=str(out), per_device_train_batch_size=16, learning_rate=1e-3, seed=0))
        | dict(gold_prompts=0, eval_before_training=False, train_sampling_strategy="random")
        | kw
    )


@pytest.fixture(scope="module")
def data_args(tiny) -> data.DataArguments:
    return data.DataArguments(dataset_name=str(tiny["data"]), test_offset=100, max_train_rows=400)


@pytest.fixture(scope="module")
def heads_rm(tiny, data_args, tmp_path_factory) -> dict:
    """An E=3 multi-head RM trained by the RM recipe (30 steps), its metrics and its RM-train pairs."""
    out = tmp_path_factory.mktemp("multihead") / "rm"
    args = recipe_args(out, max_steps=30, ensemble_size=E, ensemble_kind="heads")
    metrics = load_recipe("rm").main(data_args, args, ModelConfig(model_name_or_path=str(tiny["base"])))
    tok = model_checks.check_reward_model(out)
    pairs = rm.prepare_pairs(data.load_splits(data_args), tok, args.max_length)
    return {"rm": out, "metrics": metrics, "train": pairs.train, "test": pairs.test, "base": tiny["base"]}


def test_the_folder_records_its_heads_and_each_head_learned(heads_rm):
    config = json.loads((heads_rm["rm"] / "config.json").read_text())
    assert config["reward_heads"] == E and len(config["id2label"]) == E and config["reward_convention"] == "hhrm"
    assert model_checks.reward_heads(heads_rm["rm"]) == E
    assert f"An ensemble of {E} score heads" in (heads_rm["rm"] / "README.md").read_text()  # no pipeline snippet
    metrics = heads_rm["metrics"]
    per_head = [metrics[f"eval_accuracy_exact_head_{e}"] for e in range(E)]
    assert metrics["eval_accuracy_exact"] > 0.5 and all(0 <= a <= 1 for a in per_head)
    scorer = scoring.RewardScorer.from_pretrained(heads_rm["rm"], device="cpu")
    train = heads_rm["train"].select(range(128))
    ids = list(train["chosen_ids"]) + list(train["rejected_ids"])
    table = np.array(scorer.score_ids_heads(ids))  # [2N, E], one forward per batch
    assert table.shape == (256, E)
    accuracy = (table[:128] > table[128:]).mean(axis=0)
    assert (accuracy > 0.6).all(), accuracy  # each head learned its train pairs (chance: 0.5)
    print("train-pair accuracy per head", accuracy.tolist(), "held-out", metrics["eval_accuracy_exact"], per_head)
    # The heads differ (own init, own bootstrap): their rewards are not one another's.
    assert min(np.abs(table[:, a] - table[:, b]).mean() for a in range(E) for b in range(a)) > 1e-3
    assert scorer.score_ids(ids[:4]) == pytest.approx(table[:4].mean(axis=1), abs=1e-6)  # a reward: the mean


def test_bootstrap_weights_are_a_function_of_seed_and_pair():
    pairs = [([1, 2, 3], [4, 5]), ([6, 7], [8]), ([1, 2], [3, 4, 5])]
    w = np.stack([rm_heads.bootstrap_weights(c, r, 0, 5) for c, r in pairs])
    assert w.shape == (3, 5) and (w == np.floor(w)).all() and (w >= 0).all()
    assert (w == np.stack([rm_heads.bootstrap_weights(c, r, 0, 5) for c, r in pairs])).all()
    assert not (w == np.stack([rm_heads.bootstrap_weights(c, r, 1, 5) for c, r in pairs])).all()
    # A batch's weights do not depend on the batch (another process count, another order, a resume).
    collate = rm_heads.BootstrapCollator(lambda ex: {}, seed=0, heads=5)
    examples = [{"chosen_ids": c, "rejected_ids": r} for c, r in pairs]
    assert (collate(examples[::-1])[rm_heads.WEIGHTS].numpy() == w[::-1]).all()
    assert (collate(examples[1:2])[rm_heads.WEIGHTS].numpy() == w[1:2]).all()
    many = np.stack([rm_heads.bootstrap_weights([i], [i + 1], 0, 4) for i in range(2000)])
    assert many.mean() == pytest.approx(1.0, abs=0.05) and many.var() == pytest.approx(1.0, abs=0.1)  # Poisson(1)
    assert (many[:, 0] != many[:, 1]).mean() > 0.5  # each head its own resample


def test_weighted_loss_on_numbers():
    rewards = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, -1.0]])  # chosen rows 0-1, rejected 2-3
    weights = torch.tensor([[1.0, 0.0], [2.0, 1.0]])
    nll = lambda d: -np.log(1 / (1 + np.exp(-d)))  # noqa: E731
    expected = (1 * nll(2.0) + 2 * nll(0.0) + 1 * nll(2.0)) / 4  # pair 0 head 1 weighs 0
    assert rm_heads.weighted_bt_loss(rewards, weights).item() == pytest.approx(expected, abs=1e-6)
    margin = torch.tensor([1.0, 0.5])
    expected = (nll(1.0) + 2 * nll(-0.5) + nll(1.5)) / 4
    assert rm_heads.weighted_bt_loss(rewards, weights, margin).item() == pytest.approx(expected, abs=1e-6)
    # One head, unit weights: TRL's loss.
    one = rewards[:, :1]
    trl_loss = -torch.nn.functional.logsigmoid(one[:2] - one[2:]).mean()
    assert rm_heads.weighted_bt_loss(one, torch.ones(2, 1)).item() == pytest.approx(trl_loss.item(), abs=1e-6)


def test_padding_free_equals_padded(heads_rm, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(heads_rm["rm"]).eval()
    tok = AutoTokenizer.from_pretrained(heads_rm["rm"])
    pairs = heads_rm["train"].select(range(6)).select_columns(["chosen_ids", "rejected_ids"])
    got = {}
    for padding_free in (False, True):
        args = recipe_args(tmp_path, ensemble_size=E, padding_free=padding_free, per_device_eval_batch_size=6)
        trainer = RewardTrainer(model=model, args=args, train_dataset=pairs, processing_class=tok)
        batch = next(iter(trainer.get_train_dataloader()))
        assert ("attention_mask" in batch) != padding_free and batch[rm_heads.WEIGHTS].shape == (6, E)
        model.train()  # the training loss: bootstrap weights apply
        with torch.no_grad():
            loss, out = trainer.compute_loss(trainer.model, batch, return_outputs=True)
        assert out.logits.shape == (12, E)
        got[padding_free] = (loss.item(), out.logits)
    assert got[True][0] == pytest.approx(got[False][0], abs=1e-5)
    assert torch.allclose(got[True][1], got[False][1], atol=1e-5)


@pytest.mark.parametrize("rule", ["mean", "worst", "uwo"])
def test_a_multi_head_folder_scores_as_an_ensemble_of_its_heads(heads_rm, rule):
    test = heads_rm["test"].select(range(8))
    prompts, responses = list(test["prompt"]) * 2, list(test["chosen"]) + list(test["rejected"])
    args = sources.RewardArguments(reward_model_name_or_path=str(heads_rm["rm"]), reward_aggregation=rule)
    source = sources.build(args, "cpu")
    assert isinstance(source, ensemble.Ensemble) and source.size == E and not source.resident
    got = source.score_members(prompts, responses)
    heads = np.array(scoring.RewardScorer.from_pretrained(heads_rm["rm"], device="cpu").score_pairs_heads(
        prompts, responses))  # fmt: skip
    assert np.array(got["members"]) == pytest.approx(heads, abs=1e-5)
    assert got["reward"] == pytest.approx(ensemble.aggregate(heads.T, rule, 0.5), abs=1e-5)
    assert got["std"] == pytest.approx(heads.std(axis=1), abs=1e-5) and source.score_pairs(prompts, responses) == (
        pytest.approx(got["reward"], abs=1e-9)
    )
    ids = scoring.encode(source.tokenizer, [p + r for p, r in zip(prompts, responses)])
    table = source.table_ids(ids)
    assert table.shape == (E, len(ids)) and table.T == pytest.approx(heads, abs=1e-5)
    assert source.summary(table)["reward"] == pytest.approx(got["reward"], abs=1e-5)
    assert source.identity()["ensemble"][0]["heads"] == E and source.identity()["aggregation"] == rule
    assert source.describe().endswith(f"({E} heads)") and sources.address(args).startswith(f"ensemble ({rule}")
    source.release()
    assert not source.resident


def test_heads_count_for_the_rules_and_a_plain_two_label_classifier_is_refused(heads_rm, quick_models, tmp_path):
    one = str(quick_models["rm"])
    with pytest.raises(ValueError, match="reward_aggregation=worst with no reward_ensemble"):
        sources.RewardArguments(reward_model_name_or_path=one, reward_aggregation="worst").check_reward_source()
    sources.RewardArguments(reward_ensemble=[str(heads_rm["rm"])], reward_aggregation="uwo").check_reward_source()
    # A one-head RM and a 3-head RM: 4 members.
    mixed = sources.build(sources.RewardArguments(reward_ensemble=[one, str(heads_rm["rm"])]), "cpu")
    assert mixed.size == 4 and len(mixed.score_members(["a"], [" b"])["members"][0]) == 4
    # The same weights without the record: a num_labels=3 classifier from elsewhere, refused as before.
    plain = tmp_path / "plain"
    shutil.copytree(heads_rm["rm"], plain)
    config = json.loads((plain / "config.json").read_text())
    del config["reward_heads"]
    (plain / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="num_labels=3, a reward model has num_labels=1"):
        model_checks.check_reward_model(plain)


def test_make_score_writes_the_heads_columns(heads_rm, tmp_path):
    from hhrm.reporting import read_jsonl
    from hhrm.reward import score_file

    rows = heads_rm["test"].select(range(5)).select_columns(["prompt", "chosen", "rejected"]).to_list()
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data_args = score_file.ScoreDataArguments(dataset_name=str(tmp_path / "pairs.jsonl"))
    args = score_file.ScoreConfig(output_file=str(tmp_path / "s.jsonl"), reward_aggregation="worst", progress=False)
    metrics = load_recipe("score").main(data_args, args, ModelConfig(model_name_or_path=str(heads_rm["rm"])))
    out = read_jsonl(tmp_path / "s.jsonl")
    assert metrics["scored"] == 5 and metrics["reward"]["aggregation"] == "worst"
    for r in out:
        members = np.array(r["chosen_reward_members"])
        assert len(members) == E and r["chosen_reward"] == pytest.approx(members.min(), abs=1e-6)
        assert r["chosen_reward_std"] == pytest.approx(members.std(), abs=1e-6)


def test_lora_trains_every_head(heads_rm, tmp_path):
    """LoRA: the score head (all E rows) trains through modules_to_save and the merged export keeps the record."""
    from transformers import AutoTokenizer

    model_args = ModelConfig(model_name_or_path=str(heads_rm["base"]), use_peft=True, lora_r=4)
    args = recipe_args(tmp_path / "lora", max_steps=3, ensemble_size=E)
    tok = AutoTokenizer.from_pretrained(heads_rm["rm"])
    model = rm.load_reward_model(model_args, args, tok)
    before = model.score.weight.detach().clone()
    pairs = heads_rm["train"].select(range(48)).select_columns(["chosen_ids", "rejected_ids"])
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=pairs,
        processing_class=tok,
        peft_config=rm.reward_peft_config(model_args),
    )
    trainer.train()
    out = rm.export(trainer, tmp_path / "export", tok, model_args)
    assert model_checks.reward_heads(out) == E and (out / "adapter").is_dir()
    after = scoring.RewardScorer.from_pretrained(out, device="cpu").model.score.weight
    assert ((after - before).abs().sum(dim=1) > 0).all()  # every head moved


def test_seeds_make_member_folders_that_score_as_an_ensemble(tiny, tmp_path):
    out = tmp_path / "seeds"
    data_args = data.DataArguments(dataset_name=str(tiny["data"]), max_train_rows=64, max_test_rows=24, test_offset=0)
    args = recipe_args(out, max_steps=2, ensemble_size=2, ensemble_kind="seeds", seed=5)
    record = load_recipe("rm").main(data_args, args, ModelConfig(model_name_or_path=str(tiny["base"])))
    assert record["members"] == ["member-0", "member-1"] and record["seeds"] == [5, 6]
    assert json.loads((out / ensemble.RECORD).read_text())["members"] == record["members"]
    for e in range(2):
        assert model_checks.reward_heads(out / f"member-{e}") == 1
        assert json.loads((out / f"member-{e}" / "metrics.json").read_text())["eval_pairs"] == 24
    for args in (
        sources.RewardArguments(reward_ensemble=[str(out)], reward_aggregation="worst"),
        sources.RewardArguments(reward_model_name_or_path=str(out), reward_aggregation="uwo"),
    ):
        source = sources.build(args, "cpu")
        assert [m.path for m in source.members] == [str(out / "member-0"), str(out / "member-1")]
        alone = [
            sources.LocalModel(m.path, device="cpu").score_pairs(["a", "b"], [" c", " d"]) for m in source.members
        ]
        got = np.array(source.score_members(["a", "b"], [" c", " d"])["members"])
        assert got == pytest.approx(np.array(alone).T, abs=1e-6)
    assert ensemble.size_of(sources.RewardArguments(reward_ensemble=[str(out)])) == 2


def test_refusals_name_the_setting(heads_rm, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    for kw, message in (
        (dict(ensemble_size=0), "ensemble_size=0: must be an integer >= 1"),
        (dict(ensemble_kind="bagging"), "ensemble_kind='bagging': one of heads, seeds"),
        (dict(ensemble_size=2, ensemble_kind="seeds", resume_from_checkpoint="x"), "resume_from_checkpoint with"),
    ):
        with pytest.raises(ValueError, match=message):
            recipe_args(tmp_path, **kw)
    one_label = AutoModelForSequenceClassification.from_pretrained(heads_rm["base"], num_labels=1)
    pairs = Dataset.from_dict({"chosen_ids": [[1, 2]], "rejected_ids": [[1, 3]]})
    with pytest.raises(ValueError, match="ensemble_size=3 .* needs a loaded model with num_labels=3, got 1"):
        RewardTrainer(
            model=one_label, args=recipe_args(tmp_path, ensemble_size=E), train_dataset=pairs,
            processing_class=AutoTokenizer.from_pretrained(heads_rm["rm"]),
        )  # fmt: skip
