"""SFT stage: the config beside ``SFTTrainer``, its data, and what is written after training."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trl
from datasets import Dataset

from hhrm import data as hdata
from hhrm import generation, reporting, synthetic
from hhrm.runtime import StageConfigMixin

logger = logging.getLogger(__name__)

# The stage's headline in metrics.json (printed by the recipe and the demo).
HEADLINE = ("eval_loss_before", "eval_loss", "gold_accuracy", "train_runtime")


@dataclass
class SFTConfig(StageConfigMixin, trl.SFTConfig):
    """TRL's SFTConfig with the card's packing by default and device-chosen precision.

    The card concatenates texts and cuts 1,024-token chunks: TRL's ``packing_strategy="wrapped"``
    (documents attend to each other inside a chunk, as in LMFlow/run_clm).
    """

    bf16: bool | None = field(default=None, metadata={"help": "None: bf16 on a bf16-capable GPU, fp32 elsewhere."})
    packing: bool = field(default=True, metadata={"help": "Pack texts into max_length-token chunks."})
    packing_strategy: str = field(default="wrapped", metadata={"help": "wrapped (card) | bfd | bfd_split."})
    max_length: int | None = field(default=1024, metadata={"help": "Chunk length when packing (card: 1,024)."})
    eval_rows: int = field(default=500, metadata={"help": "Held-out RM-test dialogues used for SFT eval loss."})
    max_document_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Drop (and count) training dialogues longer than this many tokens; unset keeps all. "
            "Dialogues longer than max_length are counted and reported either way (packing cuts them)."
        },
    )
    gold_eval_prompts: int = field(
        default=200, metadata={"help": "Held-out prompts answered greedily for the gold accuracy (embedded data)."}
    )
    gold_max_new_tokens: int = field(default=32, metadata={"help": "Max new tokens of those greedy answers."})

    def __post_init__(self) -> None:
        if self.max_document_tokens is not None and self.max_document_tokens < 1:
            raise ValueError(f"max_document_tokens={self.max_document_tokens}: must be >= 1 (or unset)")
        super().__post_init__()


def sft_datasets(splits: hdata.PreferenceSplits, eval_rows: int) -> tuple[Dataset, Dataset | None]:
    """Train: chosen dialogues of the RM-train rows. Eval: chosen dialogues of RM-test rows (never trained on)."""
    train = splits.sft_texts()
    test = Dataset.from_dict({"text": [p + c for p, c in zip(splits.test["prompt"], splits.test["chosen"])]})
    eval_ds = test.select(range(min(eval_rows, len(test)))) if eval_rows > 0 and len(test) else None
    return train, eval_ds


def long_documents(train: Dataset, tokenizer, max_length: int | None, cap: int | None) -> tuple[Dataset, dict]:
    """Count training dialogues longer than ``max_length`` (packing cuts them into many chunks: one 2 MB dialogue
    turned a 4-step run into 544 steps) and drop those over ``cap`` when one is set; both numbers are reported."""
    lengths = np.zeros(len(train), dtype=np.int64)
    for start in range(0, len(train), 2048):  # chunks: only the lengths are kept
        batch = train["text"][start : start + 2048]
        lengths[start : start + len(batch)] = [len(x) for x in tokenizer(batch, add_special_tokens=False)["input_ids"]]
    report = {
        "sft_documents_over_max_length": int((lengths > (max_length or np.inf)).sum()),
        "sft_longest_document_tokens": int(lengths.max()) if len(lengths) else 0,
        "sft_documents_dropped_over_cap": 0,
    }
    if max_length and report["sft_documents_over_max_length"]:
        logger.warning(
            "%d training dialogues are longer than max_length=%d (longest %d tokens); set "
            "max_document_tokens to drop them",
            report["sft_documents_over_max_length"],
            max_length,
            report["sft_longest_document_tokens"],
        )
    if cap is not None:
        keep = np.flatnonzero(lengths <= cap)
        report["sft_documents_dropped_over_cap"] = len(train) - len(keep)
        if not len(keep):
            raise ValueError(f"max_document_tokens={cap}: every training dialogue is longer; raise it or unset it")
        train = train.select(keep)
    return train, report


def gold_eval(model, tokenizer, prompts: list[str], max_new_tokens: int, accelerator=None) -> dict[str, Any]:
    """Greedy answers to held-out prompts, graded by the gold reward (overall and per task). ``accelerator``: the
    trainer's, with its wrapped ``model`` (DDP/ZeRO-3), as in :func:`hhrm.generation.generate_responses`."""
    start = time.perf_counter()
    greedy = generation.SamplingArguments(max_new_tokens=max_new_tokens, do_sample=False)
    responses = generation.generate_responses(model, tokenizer, prompts, 1, greedy, 64, accelerator=accelerator)
    if not prompts:
        return {}
    answers = [r[0] for r in responses]
    return synthetic.gold_summary(prompts, answers) | {"gold_eval_seconds": time.perf_counter() - start}


def evaluate_before(trainer: trl.SFTTrainer) -> dict[str, float]:
    """The starting model's held-out metrics (``{}`` without held-out rows). Not under DeepSpeed: before ``train()``
    transformers refuses under ZeRO-1/2 ("ZeRO inference only makes sense with ZeRO Stage 3"), and under ZeRO-3 the
    inference engine it builds leaves ``train()`` without a training engine (``backward`` on None)."""
    if trainer.eval_dataset is None:
        return {}
    if trainer.is_deepspeed_enabled:
        logger.info("DeepSpeed: no evaluation before training (eval_loss_before not measured)")
        return {}
    return trainer.evaluate()


def finish(
    trainer: trl.SFTTrainer,
    splits: hdata.PreferenceSplits,
    configs: dict[str, Any],
    metrics: dict[str, Any],
    folder: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate the trained model (held-out loss, gold accuracy); write metrics, data report and model card.

    ``metrics``: what the recipe measured so far (train metrics, ``eval_loss_before``); returned completed.
    ``folder``: where the files go (the recipe's staging folder, :func:`hhrm.outputs.staged`); default output_dir.
    """
    args: SFTConfig = trainer.args
    metrics = dict(metrics, world_size=trainer.accelerator.num_processes)
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    prompts = hdata.heldout_prompts(splits, args.gold_eval_prompts)
    if synthetic.is_gold_checkable(prompts):
        # Every rank enters: under ZeRO-3 generation gathers the sharded weights collectively (rank 0 alone would
        # hang). The main process answers all the prompts, the others none.
        acc = trainer.accelerator
        mine = prompts if acc.is_main_process else []
        gold = gold_eval(trainer.model_wrapped, trainer.processing_class, mine, args.gold_max_new_tokens, acc)
        if acc.is_main_process:
            metrics.update(gold)
    if trainer.accelerator.is_main_process:
        report = hdata.data_report(splits, trainer.processing_class, {"sft_train_texts": len(splits.train)})
        card = reporting.ModelCard(
            title=f"SFT of {configs['model'].model_name_or_path} on HH-RLHF chosen responses (hhrm)",
            summary=(
                "Supervised fine-tuning with TRL `SFTTrainer` on the chosen dialogues, in the `###Human:` / "
                f"`###Assistant:` format, packed into {args.max_length}-token chunks (`{args.packing_strategy}`)."
            ),
            metrics=metrics,
            configs=configs,
            data={"source": report["source"], "bad_rows": report["bad_rows"], "train_pairs": len(splits.train)},
        )
        reporting.write_stage_outputs(folder or args.output_dir, metrics, card, report)
    trainer.accelerator.wait_for_everyone()
    return metrics
