"""Reward scoring: texts (or prompt/response pairs) -> one float each, batched by length.

The one rule that keeps every path in agreement: a reward is the model's score of
``prompt + response + eos_token``, tokenized by the tokenizer's ordinary ``__call__`` (so with
whatever special tokens it adds itself, e.g. LLaMA's BOS), and read at the last non-pad token,
which is that EOS. This is exactly what TRL's ``RewardTrainer`` trains on (it appends the EOS
string, then calls ``tokenizer(text=...)``) and what the text-classification pipeline computes
when the caller appends EOS. :func:`encode` is that tokenization; the RM recipe, the evaluation
and this scorer all go through it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from hhrm import model_checks, modeling, runtime


def with_eos(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[str]:
    """Append the EOS string to each text that does not end with it (RewardTrainer's rule)."""
    eos = tokenizer.eos_token
    if eos is None:
        raise ValueError("the reward tokenizer has no eos_token: RewardTrainer scores the EOS it appends")
    return [t if t.endswith(eos) else t + eos for t in texts]


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of ``text + eos`` exactly as ``RewardTrainer`` and the pipeline tokenize them.

    Default ``add_special_tokens`` on purpose: RewardTrainer calls ``tokenizer(text=...)``, so a
    tokenizer that prepends BOS (LLaMA) is trained with BOS and must be scored with it.
    """
    return tokenizer(with_eos(tokenizer, texts))["input_ids"]


def check_pad(tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse pad == EOS: the head reads the last non-pad token, which would then skip the EOS."""
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(
            "reward tokenizer needs a pad token distinct from EOS: the score is read at the last non-pad "
            "token, so pad == eos would skip the EOS the model was trained to score"
        )


class RewardScorer:
    """Scores texts with a sequence-classification reward model (``num_labels == 1``).

    Texts are sorted by token length and cut into batches of at most ``max_tokens_per_batch``
    padded tokens (and ``batch_size`` rows), so short texts are not padded to the longest one.
    Padding is on the right, so positions match the unpadded text and batching never changes a
    reward beyond float noise.
    """

    def __init__(self, model, tokenizer, batch_size: int = 64, max_tokens_per_batch: int = 32_768):
        if getattr(model.config, "num_labels", 1) != 1:
            raise ValueError(f"reward model must have num_labels=1, got {model.config.num_labels}")
        check_pad(tokenizer)
        if batch_size < 1 or max_tokens_per_batch < 1:
            raise ValueError(f"batch_size={batch_size}, max_tokens_per_batch={max_tokens_per_batch}: must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_tokens_per_batch = batch_size, max_tokens_per_batch
        # The head locates the scored token through config.pad_token_id, not the attention mask.
        self.model.config.pad_token_id = tokenizer.pad_token_id

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        setting: str = "reward_model_name_or_path",
        **kwargs,
    ) -> RewardScorer:
        """Load a reward model folder. ``dtype``: the caller's precision (``runtime.torch_dtype(args.bf16)``);
        unset, the device decides by the same rule.

        The folder is checked first (:func:`hhrm.model_checks.check_reward_model`: a one-label sequence classifier
        whose checkpoint holds its head, pad != EOS); ``setting`` names the option it came from in the error.
        """
        tokenizer = model_checks.check_reward_model(path, setting)
        device = device or runtime.default_device()
        dtype = runtime.torch_dtype() if dtype is None else dtype
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype).to(device).eval()
        return cls(model, tokenizer, **kwargs)

    def with_eos(self, texts: list[str]) -> list[str]:
        return with_eos(self.tokenizer, texts)

    @torch.no_grad()
    def score(self, texts: list[str]) -> list[float]:
        """Reward of each full text (EOS appended when missing), in input order."""
        # No early return for an empty list: under ZeRO-3 every rank must join score_ids' parameter gather.
        return self.score_ids(encode(self.tokenizer, texts) if texts else [])

    @torch.no_grad()
    def score_ids(self, ids: list[list[int]]) -> list[float]:
        """Rewards of already-encoded texts (from :func:`encode`), in input order."""
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        rewards = [0.0] * len(ids)
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        was_training = self.model.training
        self.model.eval()
        with modeling.full_parameters(self.model):
            for batch in self._batches(order, ids):
                width = max(len(ids[i]) for i in batch)
                input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):  # right padding: the head reads the last non-pad token
                    input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                    attention[row, : len(ids[i])] = 1
                logits = self.model(
                    input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False
                ).logits
                for i, value in zip(batch, logits[:, 0].float().tolist()):
                    rewards[i] = value
        if was_training:
            self.model.train()
        return rewards

    def score_pairs(self, prompts: list[str], responses: list[str]) -> list[float]:
        """Reward of each ``prompt + response``."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return self.score([p + r for p, r in zip(prompts, responses)])

    def _batches(self, order: list[int], ids: list[list[int]]) -> Iterator[list[int]]:
        batch: list[int] = []
        for i in order:  # ascending length: the last text added sets the padded width
            # A new batch also starts where a text is >10% (+16 tokens) longer than the batch's shortest: a
            # batch padded to its longest text cost 2.3x the time of batch_size=1 on CPU (make bench).
            if batch and (
                len(batch) >= self.batch_size
                or len(ids[i]) * (len(batch) + 1) > self.max_tokens_per_batch
                or len(ids[i]) > 1.1 * len(ids[batch[0]]) + 16
            ):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch
