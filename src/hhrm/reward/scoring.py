"""Reward scoring: texts (or prompt/response pairs) -> one float each, batched by length.

The one rule that keeps every path in agreement: a reward is the model's score of
``prompt + response + eos_token``, tokenized by the tokenizer's ordinary ``__call__`` (so with
whatever special tokens it adds itself, e.g. LLaMA's BOS), and read at the last non-pad token,
which is that EOS. This is exactly what TRL's ``RewardTrainer`` trains on (it appends the EOS
string, then calls ``tokenizer(text=...)``) and what the text-classification pipeline computes
when the caller appends EOS. :func:`encode` is that tokenization; the RM recipe, the evaluation
and this scorer all go through it.

That rule is the default :class:`hhrm.reward.conventions.Convention` (``hhrm``). A reward model trained or served under
another tool's rule is scored by its preset (``RewardScorer(..., convention=PRESETS[name])``, via ``score_pairs``):
how the text is built and tokenized is :mod:`conventions`; where the score is read and its activation, here.
:meth:`RewardScorer.from_pretrained` takes the preset a folder records in config.json (``reward_convention``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from hhrm import model_checks, modeling, runtime
from hhrm.reward import conventions


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
    """Scores texts with a sequence-classification reward model (``num_labels == 1``, or hhrm's multi-head ensemble
    RM: ``num_labels == E`` recorded as ``reward_heads``, where a reward is the heads' mean and
    :meth:`score_ids_heads` gives all E from the same forward).

    Texts are sorted by token length and cut into batches of at most ``max_tokens_per_batch``
    padded tokens (and ``batch_size`` rows), so short texts are not padded to the longest one.
    Padding is on the right, so positions match the unpadded text and batching never changes a
    reward beyond float noise.
    """

    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int = 64,
        max_tokens_per_batch: int = 32_768,
        convention: conventions.Convention = conventions.HHRM,
        setting: str = "reward_convention",
    ):
        self.heads = getattr(model.config, "reward_heads", 1)
        if getattr(model.config, "num_labels", 1) != self.heads:
            raise ValueError(f"reward model must have num_labels=1, got {model.config.num_labels}")
        if convention == conventions.HHRM:
            check_pad(tokenizer)  # hhrm's own message, unchanged
        conventions.check(convention, tokenizer, setting)
        if batch_size < 1 or max_tokens_per_batch < 1:
            raise ValueError(f"batch_size={batch_size}, max_tokens_per_batch={max_tokens_per_batch}: must be >= 1")
        self.model, self.tokenizer, self.convention = model, tokenizer, convention
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
        convention: str | None = None,
        convention_setting: str = "reward_convention",
        **kwargs,
    ) -> RewardScorer:
        """Load a reward model folder. ``dtype``: the caller's precision (``runtime.torch_dtype(args.bf16)``);
        unset, the device decides by the same rule.

        Before any weight is loaded, the folder is checked (:func:`hhrm.model_checks.check_reward_model`: a one-label
        sequence classifier whose checkpoint holds its head; ``setting`` names the option it came from) and its
        convention resolved (:func:`conventions.resolve`: the preset ``convention`` names, else the one its config.json
        records, else hhrm's when pad != EOS; ``convention_setting`` names the option in the error).
        """
        tokenizer = model_checks.check_reward_model(path, setting)
        rule = conventions.resolve(path, convention, tokenizer, convention_setting)
        device = device or runtime.default_device()
        dtype = runtime.torch_dtype() if dtype is None else dtype
        heads = model_checks.reward_heads(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=heads, dtype=dtype)
        model = model.to(device).eval()
        return cls(model, tokenizer, convention=rule, setting=convention_setting, **kwargs)

    def with_eos(self, texts: list[str]) -> list[str]:
        return with_eos(self.tokenizer, texts)

    @torch.no_grad()
    def score(self, texts: list[str]) -> list[float]:
        """Reward of each full text (EOS by the convention: appended when missing for hhrm's), in input order."""
        # No early return for an empty list: under ZeRO-3 every rank must join score_ids' parameter gather.
        if self.convention.text != "concat":
            raise ValueError(
                f"reward convention {self.convention.name!r} (text={self.convention.text!r}) needs the prompt and "
                "the response apart: call score_pairs"
            )
        return self.score_ids(conventions.encode(self.tokenizer, texts, [""] * len(texts), self.convention))

    def score_ids(self, ids: list[list[int]], token_type_ids: list[list[int]] | None = None) -> list[float]:
        """Rewards of already-encoded texts (from :func:`encode` or :func:`conventions.encode_full`), read and
        activated by the convention, in input order (a multi-head model: the mean of its heads)."""
        return [sum(row) / len(row) for row in self.score_ids_heads(ids, token_type_ids)]

    @torch.no_grad()
    def score_ids_heads(
        self, ids: list[list[int]], token_type_ids: list[list[int]] | None = None
    ) -> list[list[float]]:
        """``[N][E]``: every head's reward of each encoded text, all from one forward per batch (E=1: one each)."""
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        rewards: list[list[float]] = [[0.0]] * len(ids)
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        with modeling.full_parameters(self.model):
            for batch in self._batches(order, ids):
                for i, value in zip(batch, self._forward([ids[i] for i in batch], token_type_ids, batch, device)):
                    rewards[i] = value
        if was_training:
            self.model.train()
        if self.convention.activation == "sigmoid":
            rewards = torch.sigmoid(torch.tensor(rewards)).tolist()
        return rewards

    def _forward(
        self, rows: list[list[int]], types: list[list[int]] | None, batch: list[int], device
    ) -> list[list[float]]:
        """One right-padded forward; each row's scores (one per head) at the convention's position."""
        config = self.model.config.get_text_config()
        pad = self.tokenizer.pad_token_id
        if self.convention.read_at == "last_token":
            # The head reads the rightmost token whose id is not config.pad_token_id. Padding with an id that no row
            # holds, and naming it the pad for this forward, makes that each row's true last token even when a row
            # ends with an EOS equal to the tokenizer's pad. Padded positions are masked, so their id changes nothing.
            used = {t for row in rows for t in row}
            pad = next(t for t in range(len(used) + 1) if t not in used)
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):  # right padding: positions match the unpadded text
            input_ids[r, : len(row)] = torch.tensor(row)
            attention[r, : len(row)] = 1
        inputs = dict(input_ids=input_ids.to(device), attention_mask=attention.to(device))
        if types is not None:
            type_ids = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(batch):
                type_ids[r, : len(types[i])] = torch.tensor(types[i])
            inputs["token_type_ids"] = type_ids.to(device)
        saved = config.pad_token_id
        config.pad_token_id = pad
        try:
            logits = self.model(**inputs, use_cache=False).logits
        finally:
            config.pad_token_id = saved
        return logits.float().tolist()

    def score_pairs(self, prompts: list[str], responses: list[str]) -> list[float]:
        """Reward of each ``(prompt, response)`` under the convention (``prompt + response`` for hhrm's)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return self.score_ids(*conventions.encode_full(self.tokenizer, prompts, responses, self.convention))

    def score_pairs_heads(self, prompts: list[str], responses: list[str]) -> list[list[float]]:
        """``[N][E]``: :meth:`score_pairs` of every head (E=1: one each), from one forward per batch."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return self.score_ids_heads(*conventions.encode_full(self.tokenizer, prompts, responses, self.convention))

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
