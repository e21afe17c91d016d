"""The policy update of one iteration: RAFT's fine-tune on the kept samples, or DPO on the kept pairs.

Both are TRL trainers built from the one :class:`~hhrm.raft.config.RaftConfig`: ``update=sft`` hands the
config to ``SFTTrainer`` as is (it is an ``SFTConfig``); ``update=dpo`` copies its ``TrainingArguments``
(learning rate, batch sizes, schedule, precision, DeepSpeed/FSDP, logging) into a ``DPOConfig`` with DPO's
``beta`` and loss type. The select stage's rows are the training set: ``{prompt, completion}`` for SFT (loss on
the completion only), ``{prompt, chosen, rejected}`` for DPO.
"""

from __future__ import annotations

import logging
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import transformers
import trl
from accelerate import PartialState
from datasets import Dataset
from transformers.integrations import is_deepspeed_zero3_enabled
from trl import get_peft_config

from hhrm import finite
from hhrm.raft.config import RaftConfig
from hhrm.reporting import read_jsonl

logger = logging.getLogger(__name__)

# Per-step DPO metrics (TRL's names) averaged over the logged steps into train.stats.json.
DPO_STATS = {"rewards/accuracies": "dpo_reward_accuracy", "rewards/margins": "dpo_reward_margin"}


def kept_rows(
    scored: list[dict[str, Any]],
    picks: list[tuple[int, int]],
    rewards: list[list[float]],
    scores: list[list[float]] | None = None,
) -> list[dict]:
    """RAFT's kept set: one ``{prompt, completion}`` row per picked ``(prompt, sample)``; ``scores``: the regularised
    score the pick ranked by (``selection_score``), when it is not the reward."""
    rows = [
        {
            "index": scored[i]["index"],
            "sample": j,
            "prompt": scored[i]["prompt"],
            "completion": scored[i]["responses"][j],
            "reward": rewards[i][j],
        }
        for i, j in picks
    ]
    if scores is not None:
        for row, (i, j) in zip(rows, picks):
            row["selection_score"] = scores[i][j]
    return rows


def pair_rows(scored: list[dict[str, Any]], pairs: list[tuple[int, int, int]], rewards: list[list[float]]) -> list:
    """DPO's kept set: one ``{prompt, chosen, rejected}`` row per prompt's ``(best, worst)`` pair."""
    return [
        {
            "index": scored[i]["index"],
            "prompt": scored[i]["prompt"],
            "chosen": scored[i]["responses"][best],
            "rejected": scored[i]["responses"][worst],
            "chosen_sample": best,
            "rejected_sample": worst,
            "reward": rewards[i][best],
            "rejected_reward": rewards[i][worst],
        }
        for i, best, worst in pairs
    ]


def dpo_config(args: RaftConfig, output_dir: Path, seed: int) -> trl.DPOConfig:
    """A ``DPOConfig`` with every ``TrainingArguments`` setting of ``args`` and DPO's own from ``args``."""
    shared = {f.name: getattr(args, f.name) for f in fields(transformers.TrainingArguments) if f.init}
    shared |= {"output_dir": str(output_dir), "seed": seed}
    # ZeRO-3: TRL's precompute pass (a no-grad forward of the engine before training) leaves DeepSpeed's parameter
    # trace out of step with training, which fails at the first step ("pop from an empty deque"): load the copy.
    precompute = args.precompute_ref_log_probs and not is_deepspeed_zero3_enabled()
    if args.precompute_ref_log_probs and not precompute:
        logger.info(
            "ZeRO-3: precompute_ref_log_probs off (DeepSpeed cannot run it); the reference is loaded as a copy"
        )
    return trl.DPOConfig(
        **shared,
        beta=args.beta,
        loss_type=list(args.dpo_loss_type),
        max_length=args.max_length,
        precompute_ref_log_probs=precompute,
        dataset_num_proc=args.dataset_num_proc,
    )


def build_trainer(
    args: RaftConfig,
    model_args: trl.ModelConfig,
    model: Any,
    policy_path: str,
    tokenizer: Any,
    kept: Path,
    output_dir: Path,
    iteration: int,
) -> transformers.Trainer:
    """The trainer of iteration ``iteration``'s update of ``model`` (the policy saved at ``policy_path``) on the
    select stage's rows in ``kept``."""
    seed = args.seed + iteration
    peft_config = get_peft_config(model_args)
    if args.update == "sft":
        rows = read_jsonl(kept)
        train = Dataset.from_dict(
            {"prompt": [r["prompt"] for r in rows], "completion": [r["completion"] for r in rows]}
        )
        targs = replace(args, output_dir=str(output_dir), seed=seed, stop_after=None)
        return trl.SFTTrainer(
            model=model, args=targs, train_dataset=train, processing_class=tokenizer, peft_config=peft_config
        )
    train = pair_dataset(kept, cache_dir(output_dir))
    # The reference is the iteration's starting policy. With precompute_ref_log_probs that is the model itself before
    # its first step; otherwise (and under FSDP) DPOTrainer loads a copy from the config's name: point it at the
    # folder this policy was saved to (a policy kept resident from the last fine-tune still names its own start).
    model.config._name_or_path = policy_path
    return trl.DPOTrainer(
        model=model,
        args=dpo_config(args, output_dir, seed),
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def cache_dir(output_dir: Path) -> Path:
    """Where an update's datasets keep their cache files: beside the policy folder being written, in the run folder."""
    return output_dir.with_name(output_dir.name + ".cache")


def pair_dataset(kept: Path, cache: Path) -> Dataset:
    """DPO's pairs as a dataset with its cache files in ``cache``, a folder every process sees: with
    precompute_ref_log_probs the main process writes the reference log-probs beside the dataset's cache files and
    the others read them there (an in-memory dataset's cache is a temporary folder of each process's own)."""
    with PartialState().main_process_first():
        pairs = Dataset.from_json(str(kept), cache_dir=str(cache))
    return pairs.select_columns(["prompt", "chosen", "rejected"])


def check_trained(trainer: transformers.Trainer, result: Any, args: RaftConfig, iteration: int) -> None:
    """Stop before iteration ``iteration``'s policy is saved or marked done if its update went non-finite (loss or
    weights), naming the likely settings: the learning rate, and for DPO beta."""
    likely = {"learning_rate": args.learning_rate} | ({"beta": args.beta} if args.update == "dpo" else {})
    where = f"iteration {iteration}: the {args.update} update"
    finite.check_trained(trainer, result, where, likely, "the iteration's policy")


def train_stats(trainer: transformers.Trainer, metrics: dict[str, Any]) -> dict[str, Any]:
    """The trainer's summary numbers, and for DPO the mean of its per-step reward accuracy and margin."""
    out = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    for name, key in DPO_STATS.items():
        values = [log[name] for log in trainer.state.log_history if name in log]
        if values:
            out[key] = sum(values) / len(values)
    return out
