"""hhrm's RewardTrainer: the RM recipe's batches are length-grouped; padding-free gives the padded path's rewards,
loss, metrics and gradients, and the sequences of a packed row do not see each other."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import RandomSampler
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import ModelConfig, TrlParser
from trl.trainer.reward_trainer import DataCollatorForPreference, suppress_seqcls_warning

from hhrm import data
from hhrm.rm import stage as rm
from hhrm.rm import trainer as rm_trainer

from conftest import QUIET_CPU

ROOT = Path(__file__).resolve().parents[1]
TINY_RM = ROOT / "recipes" / "configs" / "tiny" / "rm.yaml"
FAST = QUIET_CPU


@pytest.fixture(scope="module")
def tok(tiny):
    return AutoTokenizer.from_pretrained(tiny["base"])


@pytest.fixture(scope="module")
def pairs(tiny, tok):
    """RM pairs of the tiny embedded data, made as the recipe makes them."""
    args = data.DataArguments(dataset_name=str(tiny["data"]), test_offset=100, max_test_rows=140)
    return rm.prepare_pairs(data.load_splits(args), tok, 512)


def reward_model(tiny, attn: str = "sdpa"):
    torch.manual_seed(0)
    with suppress_seqcls_warning():
        model = AutoModelForSequenceClassification.from_pretrained(
            tiny["base"], num_labels=1, attn_implementation=attn
        )
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # rewards far from 0, so a wrong token read shows
    return model


def few(pairs, n: int = 8):
    return rm.trainer_dataset(pairs.train.select(range(n)))


def recipe_trainer(tiny, tok, pairs, tmp_path, *overrides: str):
    """The trainer the RM recipe builds from the tiny YAML (CLI-style overrides appended)."""
    parser = TrlParser((data.DataArguments, rm.RewardConfig, ModelConfig))
    _, args, model_args = parser.parse_args_and_config(
        ["--config", str(TINY_RM), "--output_dir", str(tmp_path / "out"), "--report_to", "none", *overrides]
    )
    model_args.model_name_or_path = str(tiny["base"])
    model = rm.load_reward_model(model_args, args, tok)
    return rm.make_trainer(model, args, pairs, tok, model_args)


# --------------------------------------------------------------------------------------------
# Length-grouped batches


def test_recipe_trainer_groups_batches_by_pair_length(tiny, tok, pairs, tmp_path):
    trainer = recipe_trainer(tiny, tok, pairs, tmp_path)
    args = trainer.args
    assert args.train_sampling_strategy == "group_by_length" and not args.padding_free  # the defaults
    expected = np.maximum(*rm.pair_lengths(pairs.train)).tolist()
    for sampler in (trainer._get_train_sampler(), trainer.get_train_dataloader().get_sampler()):
        assert isinstance(sampler, LengthGroupedSampler)
        assert list(sampler.lengths) == expected  # max(chosen, rejected) tokens of each pair, in dataset order
        assert sampler.batch_size == args.per_device_train_batch_size * args.gradient_accumulation_steps
    # The length reaches the sampler, not the model: batches hold TRL's padded keys only.
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask"}
    assert isinstance(trainer.get_eval_dataloader().get_sampler(), LengthGroupedSampler)
    # One grouped step pads less than the dataset's random order would.
    order = list(iter(trainer._get_train_sampler()))
    first = [expected[i] for i in order[: args.per_device_train_batch_size]]
    assert max(first) - min(first) < max(expected) - min(expected)


def test_data_seed_orders_the_grouped_batches(tiny, tok, pairs, tmp_path):
    """transformers' training LengthGroupedSampler draws from torch's global RNG, so data_seed never reached it: WARM
    members trained with one seed and other data_seeds came out identical. Now data_seed (and the epoch) decides."""

    def batches(data_seed: str, seed: str = "0", epoch: int = 0) -> list[list[int]]:
        trainer = recipe_trainer(
            tiny, tok, pairs, tmp_path / f"{data_seed}_{seed}", "--data_seed", data_seed, "--seed", seed
        )
        loader = trainer.get_train_dataloader()
        loader.set_epoch(epoch)  # as the Trainer does before each epoch
        torch.manual_seed(1000 + int(seed))  # the global RNG no longer decides the order
        return [b["input_ids"][:, :4].tolist() for b, _ in zip(loader, range(6))]

    first = batches("1")
    assert first == batches("1", seed="5")  # the same data order whatever the head init
    assert first != batches("2") and first != batches("1", epoch=1)
    sampler = recipe_trainer(tiny, tok, pairs, tmp_path / "s", "--data_seed", "3")._get_train_sampler()
    assert isinstance(sampler, rm_trainer.SeededLengthGroupedSampler)
    assert sorted(sampler) == list(range(len(pairs.train)))  # each pair once per epoch


def test_random_order_on_request(tiny, tok, pairs, tmp_path):
    trainer = recipe_trainer(tiny, tok, pairs, tmp_path, "--train_sampling_strategy", "random")
    assert isinstance(trainer._get_train_sampler(), RandomSampler)
    assert set(next(iter(trainer.get_train_dataloader()))) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize("remove_unused_columns", [False, True])
def test_length_column_whatever_the_dataset(tiny, tok, pairs, tmp_path, remove_unused_columns):
    """Raw text pairs get their length column too; TRL's own trainer groups with hhrm's config and pairs."""
    args = rm.RewardConfig(output_dir=str(tmp_path), remove_unused_columns=remove_unused_columns, **FAST)
    raw = pairs.train.select_columns(["prompt", "chosen", "rejected"]).select(range(40))
    trainer = rm_trainer.RewardTrainer(model=reward_model(tiny), args=args, train_dataset=raw, processing_class=tok)
    lengths = [
        max(len(c), len(r)) for c, r in zip(trainer.train_dataset["chosen_ids"], trainer.train_dataset["rejected_ids"])
    ]
    assert list(trainer.get_train_dataloader().get_sampler().lengths) == lengths
    if not remove_unused_columns:  # hhrm's default: a plain trl.RewardTrainer keeps the column as well
        from trl import RewardTrainer

        plain = RewardTrainer(
            model=reward_model(tiny), args=args, train_dataset=rm.trainer_dataset(pairs.train), processing_class=tok
        )
        assert isinstance(plain.get_train_dataloader().get_sampler(), LengthGroupedSampler)


# --------------------------------------------------------------------------------------------
# Padding-free


def test_packed_collator_layout():
    batch = rm_trainer.PackedPreferenceCollator()(
        [
            {"chosen_ids": [5, 6, 7], "rejected_ids": [8, 9], "margin": 0.5},
            {"chosen_ids": [10], "rejected_ids": [11, 12], "margin": 0.0},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 10, 8, 9, 11, 12]]  # chosen first, then rejected
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1, 0, 1]]
    assert batch[rm_trainer.SEQUENCE_ENDS].tolist() == [2, 3, 5, 7]  # each text's last token (its EOS)
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 4, 6, 8] and batch["max_length_q"] == 3
    assert batch["margin"].tolist() == [0.5, 0.0]
    assert "attention_mask" not in batch and "labels" not in batch


def step(trainer, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
    """Loss, rewards, TRL's metrics and the trainable parameters' gradients of one compute_loss on ``batch``."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), outputs.logits.detach(), metrics, grads


def examples(pairs, n: int = 6, margin: bool = False) -> list[dict]:
    rows = pairs.train.select(range(n))
    out = [{"chosen_ids": c, "rejected_ids": r} for c, r in zip(rows["chosen_ids"], rows["rejected_ids"])]
    return [ex | ({"margin": 0.1 * i} if margin else {}) for i, ex in enumerate(out)]


def assert_same_step(trainer, tok, batch_examples) -> None:
    padded = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(batch_examples)
    packed = rm_trainer.PackedPreferenceCollator()(batch_examples)
    assert padded["attention_mask"].sum() == packed["input_ids"].numel() < padded["input_ids"].numel()  # no padding
    loss_a, rewards_a, metrics_a, grads_a = step(trainer, padded)
    loss_b, rewards_b, metrics_b, grads_b = step(trainer, packed)
    assert rewards_b.shape == rewards_a.shape == (2 * len(batch_examples), 1)
    torch.testing.assert_close(rewards_b, rewards_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
    assert metrics_b.keys() == metrics_a.keys() and metrics_b["num_tokens"] == 2 * metrics_a["num_tokens"]
    for key in ("accuracy", "margin", "min_reward", "mean_reward", "max_reward"):
        assert metrics_b[key] == pytest.approx(metrics_a[key], abs=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_free_equals_padded(tiny, tok, pairs, tmp_path, attn):
    """Same rewards, Bradley-Terry loss (with margins), TRL metrics and gradients, fp32, to 1e-5."""
    args = rm.RewardConfig(output_dir=str(tmp_path), padding_free=True, **FAST)
    trainer = rm_trainer.RewardTrainer(
        model=reward_model(tiny, attn), args=args, train_dataset=few(pairs), processing_class=tok
    )
    trainer.model.train()
    assert isinstance(trainer.data_collator, rm_trainer.PackedPreferenceCollator)
    assert_same_step(trainer, tok, examples(pairs, margin=True))


def test_padding_free_equals_padded_with_lora(tiny, tok, pairs, tmp_path):
    """LoRA: the score head is PEFT's modules_to_save copy; the hook must read that one."""
    model_args = ModelConfig(use_peft=True, lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"])
    args = rm.RewardConfig(output_dir=str(tmp_path), padding_free=True, **FAST)
    trainer = rm_trainer.RewardTrainer(
        model=reward_model(tiny),
        args=args,
        train_dataset=few(pairs),
        processing_class=tok,
        peft_config=rm.reward_peft_config(model_args),
    )
    trainer.model.train()
    with torch.no_grad():  # LoRA B starts at 0 and the trained head copy equals the original: make both differ
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))
    assert_same_step(trainer, tok, examples(pairs))


def test_packed_sequences_do_not_see_each_other(tiny, tok, pairs, tmp_path):
    args = rm.RewardConfig(output_dir=str(tmp_path), padding_free=True, **FAST)
    trainer = rm_trainer.RewardTrainer(
        model=reward_model(tiny), args=args, train_dataset=few(pairs), processing_class=tok
    )
    trainer.model.eval()
    batch = examples(pairs, 3)
    changed = [dict(ex) for ex in batch]
    changed[1]["chosen_ids"] = changed[1]["chosen_ids"][:-8] + changed[2]["rejected_ids"][-8:]  # pair 1's chosen

    def rewards(exs):
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, rm_trainer.PackedPreferenceCollator()(exs), True)[1].logits

    before, after = rewards(batch), rewards(changed)
    keep = [0, 2, 3, 4, 5]  # every text but pair 1's chosen (row 1; rejected texts are rows 3-5)
    torch.testing.assert_close(after[keep], before[keep], atol=1e-6, rtol=1e-6)
    assert (after[1] - before[1]).abs().item() > 1e-3


def test_padding_free_trains_as_padded(tiny, tok, pairs, tmp_path):
    """A few optimizer steps through Trainer (grouped order, accumulation, then evaluate): the same losses, weights
    and eval metrics. SGD, so updates follow the gradients (Adam turns 1e-7 gradients into full-size steps)."""
    runs = {}
    for padding_free in (False, True):
        args = rm.RewardConfig(
            output_dir=str(tmp_path / str(padding_free)),
            padding_free=padding_free,
            max_steps=3,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            optim="sgd",
            learning_rate=1e-2,
            logging_steps=1,
            seed=0,
            **FAST,
        )
        trainer = rm.make_trainer(reward_model(tiny), args, pairs, tok, ModelConfig())
        trainer.train()
        losses = [(h["loss"], h["accuracy"], h["num_tokens"]) for h in trainer.state.log_history if "loss" in h]
        evaluation = trainer.evaluate()  # Trainer's prediction step on the same collator
        runs[padding_free] = losses, dict(trainer.model.named_parameters()), evaluation
    (losses_a, weights_a, eval_a), (losses_b, weights_b, eval_b) = runs[False], runs[True]
    assert len(losses_a) == 3
    for (la, aa, na), (lb, ab, nb) in zip(losses_a, losses_b):
        assert lb == pytest.approx(la, abs=1e-5) and ab == aa and nb == na
    for name, weight in weights_a.items():
        torch.testing.assert_close(weights_b[name], weight, atol=1e-5, rtol=1e-5, msg=name)
    for key in ("eval_loss", "eval_accuracy", "eval_margin", "eval_min_reward", "eval_mean_reward", "eval_max_reward"):
        assert eval_b[key] == pytest.approx(eval_a[key], rel=1e-5, abs=1e-5), key
