"""The RM stage's config: TRL's ``RewardConfig`` with hhrm's batch, evaluation and ensemble settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trl

from hhrm.reward import sources
from hhrm.runtime import StageConfigMixin

logger = logging.getLogger(__name__)

ENSEMBLE_KINDS = ("heads", "seeds")


@dataclass
class RewardConfig(StageConfigMixin, trl.RewardConfig):
    """TRL's RewardConfig with device-chosen precision, a global batch size and hhrm's evaluation settings."""

    bf16: bool | None = field(default=None, metadata={"help": "None: bf16 on a bf16-capable GPU, fp32 elsewhere."})
    max_length: int = field(
        default=512,
        metadata={
            "help": "Pairs whose chosen or rejected text (tokens incl. EOS) is longer are dropped, never "
            "truncated, and counted (card: 512). The one length limit of the RM stage: filter, trainer, eval."
        },
    )
    global_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Pairs per optimizer step over all processes. When set, gradient_accumulation_steps is derived: "
            "global_batch_size / (per_device_train_batch_size * number of processes)."
        },
    )
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={
            "help": "Training batch order. hhrm's default, group_by_length: pairs of similar length share a batch "
            "(transformers' LengthGroupedSampler over a `length` column = max(chosen, rejected) tokens), about 1.7x "
            "the pairs/s of random order on HH-RLHF lengths (bench rm_grouped_pairs_per_s). random, sequential, "
            "batch_rebalance: Trainer's.",
            "choices": ["random", "sequential", "group_by_length", "batch_rebalance"],
        },
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={
            "help": "False (hhrm): the length column reaches the sampler even under a plain trl.RewardTrainer (its "
            "collator reads only chosen_ids/rejected_ids/margin, so nothing else reaches the model)."
        },
    )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "Pack each micro-batch's chosen and rejected texts into one row without padding (position_ids "
            "restart per text, block-diagonal attention, each reward read at its text's EOS): the same loss and "
            "rewards as padded batches. Off by default: under sdpa (and eager) a packed row attends through a dense "
            "T x T mask, and on the CPU bench that cost more than the padding it saves (~0.75x the pairs/s of "
            "length-grouped padded batches, bench rm_padding_free_vs_grouped). On a GPU use it with "
            "attn_implementation=flash_attention_2 (varlen kernels; TRL's recommendation) and "
            "train_sampling_strategy=random: without padding, grouping saves nothing and under sdpa costs more."
        },
    )
    ensemble_size: int = field(
        default=1,
        metadata={
            "help": "E reward models trained as one ensemble (scored by reward_aggregation: mean | worst | uwo). 1: "
            "one RM. How: ensemble_kind."
        },
    )
    ensemble_kind: str = field(
        default="heads",
        metadata={
            "help": "ensemble_size > 1: heads (one backbone with E score heads, each trained by the Bradley-Terry "
            "loss on its own Poisson(1) bootstrap of the pairs, in one run: about one RM's cost; the folder records "
            "reward_heads=E) | seeds (E whole RMs by this recipe, seeds seed..seed+E-1, into output_dir/member-<e>, "
            "listed in output_dir/ensemble.json; reward_ensemble: [output_dir] scores them).",
            "choices": list(ENSEMBLE_KINDS),
        },
    )
    dedup_test: bool = field(
        default=True,
        metadata={"help": "Remove RM-test pairs that also occur (exactly) in RM-train before evaluating."},
    )
    eval_before_training: bool = field(
        default=True, metadata={"help": "Also report the held-out accuracy of the untrained reward head."}
    )
    length_buckets: int = field(default=4, metadata={"help": "Accuracy by pair length: number of quantile buckets."})
    reward_batch_size: int = sources.setting("reward_batch_size")  # the evaluation's scorer
    gold_prompts: int = field(
        default=200,
        metadata={"help": "Embedded data: held-out prompts answered by the SFT policy for gold agreement."},
    )
    gold_samples_per_prompt: int = field(default=4, metadata={"help": "Sampled responses per gold prompt."})
    gold_max_new_tokens: int = field(default=32, metadata={"help": "Max new tokens of those sampled responses."})
    gold_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of those responses."})

    def __post_init__(self) -> None:
        check_ensemble(self)
        if self.max_length is None or self.max_length <= 0:
            raise ValueError(f"max_length={self.max_length}: must be > 0 (card: 512)")
        if self.length_buckets < 1:
            raise ValueError(f"length_buckets={self.length_buckets}: must be >= 1")
        if self.gold_prompts < 0 or self.gold_samples_per_prompt < 1:
            raise ValueError(
                f"gold_prompts={self.gold_prompts}, gold_samples_per_prompt={self.gold_samples_per_prompt}: "
                "need gold_prompts >= 0 and gold_samples_per_prompt >= 1"
            )
        super().__post_init__()
        if self.global_batch_size is not None:
            self.gradient_accumulation_steps = gradient_accumulation(
                self.global_batch_size, self.per_device_train_batch_size, self.world_size
            )
            logger.info(
                "global_batch_size=%d = %d per device x %d processes x %d accumulation steps",
                self.global_batch_size,
                self.per_device_train_batch_size,
                self.world_size,
                self.gradient_accumulation_steps,
            )


def check_ensemble(args) -> None:
    """Refuse, in one line naming the setting, an ensemble the recipe cannot train."""
    size, kind = args.ensemble_size, args.ensemble_kind
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"ensemble_size={size}: must be an integer >= 1 (1: one reward model)")
    if kind not in ENSEMBLE_KINDS:
        raise ValueError(f"ensemble_kind={kind!r}: one of {', '.join(ENSEMBLE_KINDS)}")
    if size > 1 and kind == "seeds" and args.resume_from_checkpoint:
        raise ValueError(
            "resume_from_checkpoint with ensemble_kind=seeds: each member has its own checkpoints; resume one "
            "member's run (output_dir=<output_dir>/member-<e>, seed=seed+e, ensemble_size=1)"
        )


def heads(args) -> int:
    """The score heads the recipe trains: ensemble_size with ensemble_kind=heads, else 1 (any config)."""
    size = getattr(args, "ensemble_size", 1)
    return size if getattr(args, "ensemble_kind", "heads") == "heads" else 1


def gradient_accumulation(global_batch_size: int, per_device: int, world_size: int) -> int:
    """Accumulation steps that make ``per_device * world_size * steps == global_batch_size`` exactly."""
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size={global_batch_size}: must be > 0")
    per_step = per_device * world_size
    if global_batch_size % per_step:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not a multiple of per_device_train_batch_size={per_device} "
            f"x {world_size} process(es) = {per_step}; change per_device_train_batch_size or the number of processes"
        )
    return global_batch_size // per_step
