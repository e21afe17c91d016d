"""Reward scoring: texts (or prompt/response pairs) -> one float each, batched by length.

The one rule that keeps every path in agreement: a reward is the model's score of
``prompt + response + eos_token`` (RewardTrainer appends EOS to every text it trains on), read at
the last non-pad token. This scorer appends EOS itself; so must any other caller (the model card's
pipeline snippet does).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


class RewardScorer:
    """Scores texts with a sequence-classification reward model (``num_labels == 1``).

    Texts are sorted by token length and cut into batches of at most ``max_tokens_per_batch``
    padded tokens (and ``batch_size`` rows), so short texts are not padded to the longest one.
    """

    def __init__(self, model, tokenizer, batch_size: int = 64, max_tokens_per_batch: int = 32_768):
        if getattr(model.config, "num_labels", 1) != 1:
            raise ValueError(f"reward model must have num_labels=1, got {model.config.num_labels}")
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise ValueError(
                "reward tokenizer needs a pad token distinct from EOS: the score is read at the last non-pad "
                "token, so pad == eos would skip the EOS the model was trained to score"
            )
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_tokens_per_batch = batch_size, max_tokens_per_batch
        self.model.config.pad_token_id = tokenizer.pad_token_id

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | None = None, dtype=None, **kwargs) -> "RewardScorer":
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype).to(device).eval()
        return cls(model, tokenizer, **kwargs)

    def with_eos(self, texts: list[str]) -> list[str]:
        eos = self.tokenizer.eos_token
        return [t if t.endswith(eos) else t + eos for t in texts]

    @torch.no_grad()
    def score(self, texts: list[str]) -> list[float]:
        """Reward of each full text (EOS appended when missing), in input order."""
        if not texts:
            return []
        ids = self.tokenizer(self.with_eos(texts), add_special_tokens=False)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        rewards = [0.0] * len(ids)
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        for batch in self._batches(order, ids):
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            for row, i in enumerate(batch):  # right padding: the head reads the last non-pad token
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
            logits = self.model(input_ids=input_ids.to(device), attention_mask=(input_ids != pad).long().to(device)).logits
            for i, value in zip(batch, logits[:, 0].float().tolist()):
                rewards[i] = value
        return rewards

    def score_pairs(self, prompts: list[str], responses: list[str]) -> list[float]:
        """Reward of each ``prompt + response``."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return self.score([p + r for p, r in zip(prompts, responses)])

    def _batches(self, order: list[int], ids: list[list[int]]):
        batch: list[int] = []
        for i in order:  # ascending length: the last text added sets the padded width
            if batch and (len(batch) >= self.batch_size or len(ids[i]) * (len(batch) + 1) > self.max_tokens_per_batch):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch
