"""hhrm's ``RewardTrainer``: TRL's, with length-grouped batches that work and an optional padding-free mode.

* **Length grouping.** Trainer's ``train_sampling_strategy="group_by_length"`` reads a length column
  (``length_column_name``); RewardTrainer rows carry ``chosen_ids``/``rejected_ids`` and no ``input_ids``, so
  without that column the sampler cannot infer lengths. :func:`add_length_column` adds it (a pair's length
  is ``max(chosen, rejected)`` tokens: the width it brings to a padded batch) and the trainer keeps it past
  ``remove_unused_columns`` to the sampler; the collators never hand it to the model.
* **Padding-free** (``args.padding_free``). :class:`PackedPreferenceCollator` flattens a micro-batch's chosen
  then rejected sequences into one row (transformers' ``DataCollatorWithFlattening``: ``position_ids``
  restarting at 0, no attention mask). With ``use_cache=False`` (RewardTrainer passes it) transformers builds
  the block-diagonal causal mask from ``position_ids`` for sdpa and eager (``find_packed_sequence_indices``);
  flash-attention runs varlen kernels from ``cu_seq_lens``. The sequence-classification model pools one token
  per row, so the per-token output of its ``score`` head is captured with a forward hook (through DDP,
  DeepSpeed and PEFT's ``modules_to_save`` wrapper) and read at each sequence's last token: the EOS that
  :func:`hhrm.reward.scoring.encode` appends, the token the padded path reads. Those ``(2B, 1)`` rewards, chosen
  first, go through TRL's own ``compute_loss``: the same Bradley-Terry loss, margin, centring and metrics.
* **data_seed.** transformers 5.23 draws the training ``LengthGroupedSampler``'s permutation from torch's global
  RNG (seeded by ``seed``; only its eval sampler reads ``data_seed``), so ``data_seed`` never changed the order of
  grouped batches. With ``data_seed`` set, :class:`SeededLengthGroupedSampler` draws each epoch's permutation from
  ``(data_seed, epoch)``: members for WARM share the head init (``seed``) and differ in data order.
* **E score heads** (``ensemble_size=E``, ``ensemble_kind=heads``; :mod:`hhrm.rm.heads`). The collator also
  hands each pair's bootstrap weights, and the ``(2B, E)`` rewards of either path go through the weighted loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
import trl
from datasets import Dataset
from torch import nn
from transformers import DataCollatorWithFlattening
from transformers.modeling_outputs import SequenceClassifierOutputWithPast
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from hhrm.rm import config as rm_config
from hhrm.rm import heads as rm_heads

# The strategies whose sampler reads ``length_column_name``.
LENGTH_STRATEGIES = ("group_by_length", "batch_rebalance")
# The collator's key for the index of each sequence's last token in the packed row (never passed to the model).
SEQUENCE_ENDS = "sequence_ends"


def add_length_column(ds: Dataset, name: str = "length") -> Dataset:
    """``ds`` with ``name`` = ``max(len(chosen_ids), len(rejected_ids))`` per pair (unchanged if it has one).

    Uses the ``chosen_len``/``rejected_len`` columns :func:`hhrm.rm.stage.tokenize_pairs` records when present,
    else Arrow's list lengths (no pass over the ids in Python).
    """
    if name in ds.column_names:
        return ds
    if {"chosen_len", "rejected_len"} <= set(ds.column_names):
        chosen, rejected = np.asarray(ds["chosen_len"]), np.asarray(ds["rejected_len"])
    else:
        table = ds.with_format("arrow")
        chosen, rejected = (pc.list_value_length(table[k]).to_numpy() for k in ("chosen_ids", "rejected_ids"))
    return ds.add_column(name, np.maximum(chosen, rejected).astype(np.int32).tolist())


# --------------------------------------------------------------------------------------------
# Padding-free: the collator and the per-sequence reward


@dataclass
class PackedPreferenceCollator:
    """A micro-batch of pairs as one unpadded row: chosen sequences first, then rejected (TRL's order).

    Returns ``input_ids`` and ``position_ids`` of shape ``(1, T)``, flash-attention's ``cu_seq_lens_q/k`` and
    ``max_length_q/k`` (as TRL's padding-free SFT collator does), :data:`SEQUENCE_ENDS` (``(2B,)``: the index of
    each sequence's last token) and ``margin`` when the pairs have one. No ``attention_mask``: with one, the
    model would not look for packed sequences and every sequence would attend to the ones before it.
    """

    def __post_init__(self) -> None:
        self.flatten = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_tensors="pt")

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        sequences = [ex["chosen_ids"] for ex in examples] + [ex["rejected_ids"] for ex in examples]
        batch = self.flatten([{"input_ids": list(ids)} for ids in sequences])
        del batch["labels"]  # a sequence-classification model would compute a regression loss from them
        batch[SEQUENCE_ENDS] = batch["cu_seq_lens_q"][1:].long() - 1
        if "margin" in examples[0]:
            batch["margin"] = torch.tensor([ex["margin"] for ex in examples], dtype=torch.float)
        return batch


def score_head(model: nn.Module) -> nn.Module:
    """The ``score`` module of a (PEFT-wrapped) sequence-classification model: PEFT's wrapper when it trains it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and peft_config.is_prompt_learning:
        raise ValueError(
            "padding_free=true cannot be used with prompt-learning PEFT methods (they add a cache, and the packed "
            "sequences would attend to each other); use LoRA or padding_free=false"
        )
    head = getattr(base, "score", None)
    if not isinstance(head, nn.Module):
        raise ValueError(
            f"padding_free=true reads per-token rewards from the model's `score` head; {type(base).__name__} has "
            "none. Use a decoder loaded with AutoModelForSequenceClassification, or padding_free=false"
        )
    return head


class PackedRewards:
    """Called as TRL's ``compute_loss`` calls the model; runs the packed row, returns per-sequence rewards.

    ``logits`` is ``(2B, num_labels)``: the score head's output at each sequence's last token, chosen first, so
    TRL's loss and metrics read it exactly as they read the padded path's pooled logits.
    """

    def __init__(self, model: Callable, head: nn.Module, ends: torch.Tensor):
        self.model, self.head, self.ends = model, head, ends

    def __call__(self, attention_mask=None, margin=None, **inputs) -> SequenceClassifierOutputWithPast:
        # attention_mask: only for TRL's token count (a packed row must reach the model without one);
        # margin: TRL reads it from its inputs, the model never needs it.
        captured: list[torch.Tensor] = []
        handle = self.head.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            self.model(**inputs)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"the score head ran {len(captured)} times in one forward; expected once")
        return SequenceClassifierOutputWithPast(logits=captured[0][0, self.ends])


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """``LengthGroupedSampler`` whose permutation in epoch ``e`` is drawn from ``(data_seed, e)``: the same on every
    rank and after a resume (the Trainer calls :meth:`set_epoch` before each epoch)."""

    def __init__(self, batch_size: int, lengths: list[int], data_seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.data_seed, self.epoch = data_seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        seed = int(np.random.SeedSequence([self.data_seed, self.epoch]).generate_state(1)[0])
        return iter(
            get_length_grouped_indices(self.lengths, self.batch_size, generator=torch.Generator().manual_seed(seed))
        )


# --------------------------------------------------------------------------------------------
# The trainer


class RewardTrainer(trl.RewardTrainer):
    """``trl.RewardTrainer`` that keeps the length column for its sampler and trains padding-free when
    ``args.padding_free`` (:class:`hhrm.rm.stage.RewardConfig`); otherwise TRL's collator and loss, unchanged."""

    def __init__(self, model, args, data_collator=None, **kwargs):
        if data_collator is None and getattr(args, "padding_free", False):
            data_collator = PackedPreferenceCollator()
        heads = rm_config.heads(args)
        if heads == 1:
            super().__init__(model=model, args=args, data_collator=data_collator, **kwargs)
            return
        labels = getattr(getattr(model, "config", None), "num_labels", None)
        if labels != heads:
            raise ValueError(
                f"ensemble_size={heads} (ensemble_kind=heads) needs a loaded model with num_labels={heads}, got "
                f"{labels or model!r}: load it with hhrm.rm.stage.load_reward_model"
            )
        with rm_heads.one_label_for_trl(model.config):
            super().__init__(model=model, args=args, data_collator=data_collator, **kwargs)
        self.data_collator = rm_heads.BootstrapCollator(self.data_collator, args.seed, heads)

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler and self.args.data_seed is not None:
            return SeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, self.args.data_seed)
        return sampler

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if args.train_sampling_strategy in LENGTH_STRATEGIES and isinstance(dataset, Dataset):
            dataset = add_length_column(dataset, args.length_column_name)
        return dataset

    def _set_signature_columns_if_needed(self):
        # remove_unused_columns runs before the sampler is built: keep the lengths it groups by.
        super()._set_signature_columns_if_needed()
        if self.args.length_column_name not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, self.args.length_column_name]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ends, weights = inputs.pop(SEQUENCE_ENDS, None), inputs.pop(rm_heads.WEIGHTS, None)
        if ends is not None:
            # TRL counts the batch's tokens with the attention mask: a packed row has no padding.
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            model = PackedRewards(model, score_head(self.accelerator.unwrap_model(model)), ends)
        if weights is not None:  # E heads: the bootstrap-weighted loss
            return rm_heads.compute_loss(self, model, inputs, weights, return_outputs)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
