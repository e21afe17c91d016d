"""Reward-model stage: the config beside ``RewardTrainer``, its pairs, export, and what is written after training.

Every text the RM sees (training, hhrm's scorer, evaluation, the pipeline snippet in the model card) is ``prompt +
response + eos`` tokenized by :func:`hhrm.reward.scoring.encode` (the ``hhrm`` convention, recorded in the export).
Pairs are tokenized here, once, and handed to ``RewardTrainer`` pre-tokenized, so the 512-token filter counts exactly
the tokens the model trains on (BOS included for LLaMA) and the trainer's own ``max_length`` filter has nothing left
to drop. :func:`make_trainer` builds :class:`hhrm.rm.trainer.RewardTrainer`: length-grouped or padding-free batches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trl
from datasets import Dataset, Sequence, Value
from trl import ModelConfig, get_peft_config

import hhrm.rm.card as rm_card
import hhrm.rm.evaluation as rm_eval
import hhrm.rm.trainer as rm_trainer
from hhrm import data as hdata
from hhrm import model_checks, modeling, reporting, runtime
from hhrm.reward import conventions, scoring
from hhrm.rm.config import RewardConfig, gradient_accumulation, heads  # noqa: F401  (kept importable here)

logger = logging.getLogger(__name__)

# The stage's headline in metrics.json (printed by the recipe and the demo).
HEADLINE = (
    "eval_accuracy_exact_before",
    "eval_accuracy_exact",
    "eval_accuracy_rejected_wrong_answer",
    "eval_bt_loss",
    "pairs_dropped_long",
    "gold_auc",
    "gold_pairwise_agreement",
    "gold_best_of_k_accuracy",
    "train_runtime",
)


# --------------------------------------------------------------------------------------------
# Pairs


@dataclass
class RewardPairs:
    """RM-train and RM-test pairs, tokenized (``chosen_ids``/``rejected_ids``), with what was removed."""

    train: Dataset
    test: Dataset
    counts: dict[str, int]
    splits: hdata.PreferenceSplits  # what they were made from (its bad rows go to the data report)
    lengths: dict[str, tuple[np.ndarray, np.ndarray]]  # per split, before the drop: reused by the data report


def tokenize_pairs(ds: Dataset, tokenizer) -> Dataset:
    """Add ``chosen_ids``/``rejected_ids`` (:func:`hhrm.reward.scoring.encode` of prompt+chosen / prompt+rejected) and
    their lengths, a batch at a time into Arrow columns: as Python lists, the ids of 161K pairs took 6 GB."""

    def encode_batch(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {}
        for side in ("chosen", "rejected"):
            ids = scoring.encode(tokenizer, [p + r for p, r in zip(batch["prompt"], batch[side])])
            out[f"{side}_ids"], out[f"{side}_len"] = ids, [len(x) for x in ids]
        return out

    features = ds.features.copy()
    for side in ("chosen", "rejected"):
        features[f"{side}_ids"] = Sequence(Value("int32"))
        features[f"{side}_len"] = Value("int32")
    if len(ds) == 0:  # map adds no column to an empty dataset
        return Dataset.from_dict({name: [] for name in features}, features=features)
    return ds.map(encode_batch, batched=True, batch_size=2048, features=features, desc="tokenizing pairs")


def pair_lengths(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """The token counts :func:`tokenize_pairs` recorded (what the length drop and the data report use)."""
    return np.asarray(ds["chosen_len"], dtype=np.int32), np.asarray(ds["rejected_len"], dtype=np.int32)


def drop_long(ds: Dataset, max_tokens: int) -> tuple[Dataset, int]:
    """Drop (never truncate) tokenized pairs whose chosen or rejected text is longer than ``max_tokens``."""
    chosen, rejected = pair_lengths(ds)
    keep = np.flatnonzero(np.maximum(chosen, rejected) <= max_tokens)
    return ds.select(keep), len(ds) - len(keep)


def prepare_pairs(splits: hdata.PreferenceSplits, tokenizer, max_tokens: int, dedup_test: bool = True) -> RewardPairs:
    """Tokenize, drop pairs over ``max_tokens`` (counted per split), and make RM-test disjoint from RM-train."""
    train, test = tokenize_pairs(splits.train, tokenizer), tokenize_pairs(splits.test, tokenizer)
    lengths = {"train": pair_lengths(train), "test": pair_lengths(test)}
    train, dropped_train = drop_long(train, max_tokens)
    test, dropped_test = drop_long(test, max_tokens)
    overlap = hdata.overlapping_pairs(train, test)
    if dedup_test and overlap:
        test = test.select(sorted(set(range(len(test))) - set(overlap)))
    counts = {
        "train_pairs": len(train),
        "eval_pairs": len(test),
        "pairs_dropped_long": dropped_train,
        "eval_pairs_dropped_long": dropped_test,
        "eval_pairs_overlapping_train": len(overlap),
        "max_pair_tokens": max_tokens,
    }
    logger.info(
        "RM pairs: train %d (dropped %d over %d tokens), test %d (dropped %d over %d tokens, %d overlapping train%s)",
        len(train),
        dropped_train,
        max_tokens,
        len(test),
        dropped_test,
        max_tokens,
        len(overlap),
        " removed" if dedup_test else " KEPT",
    )
    if len(train) == 0:
        raise ValueError(f"no RM-train pair is <= max_length={max_tokens} tokens; raise max_length")
    if len(test) == 0:  # refused now: evaluating nothing would fail after the whole training
        why = (
            f"all {len(overlap)} also occur in RM-train (one file serving as both splits?)"
            if overlap and dedup_test
            else "test_offset leaves none, or none is short enough"
        )
        raise ValueError(f"no RM-test pair to evaluate: {why}; give a separate test split or lower test_offset")
    return RewardPairs(train=train, test=test, counts=counts, splits=splits, lengths=lengths)


def trainer_dataset(ds: Dataset, length_column: str = "length") -> Dataset:
    """The pre-tokenized columns (RewardTrainer then skips its own EOS/tokenize step) and the pair length that
    ``train_sampling_strategy="group_by_length"`` groups by (``max(chosen_len, rejected_len)``)."""
    return rm_trainer.add_length_column(ds, length_column).select_columns(
        ["chosen_ids", "rejected_ids", length_column]
    )


def make_trainer(model, args: RewardConfig, pairs: RewardPairs, tokenizer, model_args: ModelConfig):
    """The RM recipe's trainer: :class:`hhrm.rm.trainer.RewardTrainer` (length-grouped batches by default,
    padding-free when ``args.padding_free``) on the RM-train pairs, RM-test for its periodic evaluation."""
    return rm_trainer.RewardTrainer(
        model=model,
        args=args,
        train_dataset=trainer_dataset(pairs.train, args.length_column_name),
        eval_dataset=trainer_dataset(pairs.test, args.length_column_name) if len(pairs.test) else None,
        processing_class=tokenizer,
        peft_config=reward_peft_config(model_args),
    )


# --------------------------------------------------------------------------------------------
# Model


def reward_peft_config(model_args: ModelConfig):
    """LoRA for a reward model: the score head must train and be saved.

    Without ``task_type=SEQ_CLS`` or ``modules_to_save=["score"]`` the randomly initialised head
    stays frozen (library facts §2). Both are set, whatever the config says.
    """
    if not model_args.use_peft:
        return None
    if model_args.lora_task_type != "SEQ_CLS":
        logger.info("lora_task_type=%s -> SEQ_CLS for a reward model", model_args.lora_task_type)
        model_args.lora_task_type = "SEQ_CLS"
    modules = list(model_args.lora_modules_to_save or [])
    if "score" not in modules:
        modules.append("score")
    model_args.lora_modules_to_save = modules
    return get_peft_config(model_args)


def check_precision(model_args: ModelConfig, args: RewardConfig) -> None:
    """Fail early on the one combination known to break: 4/8-bit RM without bf16 (TRL casts the head to bf16)."""
    if (model_args.load_in_4bit or model_args.load_in_8bit) and not args.bf16:
        raise ValueError(
            "load_in_4bit/load_in_8bit reward models need bf16=true: RewardTrainer casts the trainable "
            "parameters (score head included) to bf16 for quantized models, so fp32 inputs fail"
        )
    if (model_args.load_in_4bit or model_args.load_in_8bit) and not model_args.use_peft:
        raise ValueError("load_in_4bit/load_in_8bit needs use_peft=true (quantized weights cannot be fine-tuned)")


def check_model_path(model_args: ModelConfig) -> None:
    """A missing local starting point is a missing stage, not a hub id: say which stage to run."""
    model_checks.check_model_path(
        model_args.model_name_or_path,
        hint="the RM starts from the SFT output: run `make sft` (or the SFT recipe with the matching config) "
        "first, or point model_name_or_path at a model folder",
        revision=model_args.model_revision,
    )


def load_reward_model(model_args: ModelConfig, args: RewardConfig, tokenizer):
    """``AutoModelForSequenceClassification`` with one label (E with ``ensemble_kind=heads``: recorded as
    ``reward_heads``, so the scorer takes them for an ensemble), its pad id set from ``tokenizer``."""
    from transformers import AutoModelForSequenceClassification, set_seed
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    check_precision(model_args, args)
    set_seed(args.seed)  # the score head is initialised randomly at load time
    with suppress_seqcls_warning():  # "score.weight MISSING / lm_head UNEXPECTED" is expected from a causal LM
        model = AutoModelForSequenceClassification.from_pretrained(
            model_args.model_name_or_path, num_labels=heads(args), **modeling.model_init_kwargs(model_args, args)
        )
    modeling.match_vocab(model, tokenizer)
    if heads(args) > 1:
        model.config.reward_heads = heads(args)
    return model


def export(trainer: trl.RewardTrainer, output_dir: str | Path, tokenizer, model_args: ModelConfig) -> Path:
    """A plain, merged model folder (safetensors, config with pad_token_id and the ``reward_convention`` it is
    scored by, tokenizer). LoRA: the adapter (score head included) is also kept in ``output_dir/adapter``. A
    quantized base cannot be merged into full-precision weights in place: QLoRA reloads the base unquantized,
    applies the saved adapter and merges that."""
    output_dir = Path(output_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    record(model.config, tokenizer, model_args.model_name_or_path, heads(trainer.args))
    is_peft = hasattr(model, "peft_config")
    if is_peft:
        trainer.save_model(str(output_dir / "adapter"))
    if is_peft and (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        if trainer.accelerator.is_main_process:
            _merge_from_adapter(output_dir, model_args, tokenizer, trainer.args)
        trainer.accelerator.wait_for_everyone()
    else:
        modeling.save_merged(trainer, output_dir, tokenizer)
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(output_dir)
        modeling.finish_export(output_dir)  # every path (QLoRA included): readable by other uids, no pickle
    trainer.accelerator.wait_for_everyone()
    return output_dir


def record(config, tokenizer, start: str, reward_heads: int = 1) -> None:
    """The pad id the head reads past, hhrm's convention, the start it was fine-tuned from (WARM averages only
    RMs of one start) and, for E > 1 score heads, ``reward_heads`` = E (what makes the folder an ensemble: a
    plain ``num_labels=2`` classifier is still refused), on the config (so a later save keeps them)."""
    config.pad_token_id = tokenizer.pad_token_id
    if reward_heads > 1:
        config.reward_heads = reward_heads
    setattr(config, conventions.CONFIG_KEY, conventions.HHRM.name)
    config.reward_start = {"model": str(start), "weights": model_checks.weights_identity(start)}


def _merge_from_adapter(output_dir: Path, model_args: ModelConfig, tokenizer, args: RewardConfig) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    dtype = runtime.torch_dtype(args.bf16)
    with suppress_seqcls_warning():
        base = AutoModelForSequenceClassification.from_pretrained(
            model_args.model_name_or_path, num_labels=heads(args), dtype=dtype
        )
    modeling.match_vocab(base, tokenizer)
    merged = PeftModel.from_pretrained(base, output_dir / "adapter").merge_and_unload()
    record(merged.config, tokenizer, model_args.model_name_or_path, heads(args))
    merged.save_pretrained(output_dir, safe_serialization=True)


# --------------------------------------------------------------------------------------------
# After training


def finish(
    trainer: trl.RewardTrainer,
    pairs: RewardPairs,
    configs: dict[str, Any],
    metrics: dict[str, Any],
    folder: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate the exported folder; write metrics.json, eval_rm.json, data_report.json and the model card.

    ``metrics``: what the recipe measured so far (train metrics, the untrained head's accuracy). ``folder``: the
    exported folder, where the files go (the recipe's staging folder, :func:`hhrm.outputs.staged`); default
    output_dir, the path the card names either way.
    """
    args: RewardConfig = trainer.args
    output_dir = Path(args.output_dir)
    folder = Path(folder or output_dir)
    metrics = metrics | pairs.counts
    if trainer.accelerator.is_main_process:
        # Evaluate what was exported (reloaded from disk), not the in-memory training copy: whole on this rank.
        with runtime.whole_models():
            scorer = scoring.RewardScorer.from_pretrained(
                folder, dtype=runtime.torch_dtype(args.bf16), batch_size=args.reward_batch_size
            )
            policy, train_prompts = configs["model"].model_name_or_path, set(pairs.train["prompt"])
            result = rm_eval.evaluate(scorer, pairs.test, args, policy_path=policy, train_prompts=train_prompts)
        metrics.update(result["metrics"])
        rm_eval.write_results(result | {"counts": pairs.counts}, folder / "eval_rm.json")
        report = hdata.data_report(pairs.splits, trainer.processing_class, pairs.counts, lengths=pairs.lengths)
        card = rm_card.model_card(output_dir, configs, metrics, report, scorer.convention.name, scorer.heads)
        card.sections = (rm_eval.card_section(result["metrics"], result["held_out"], str(output_dir)),)
        reporting.write_stage_outputs(folder, metrics, card, report)
    trainer.accelerator.wait_for_everyone()
    return metrics
