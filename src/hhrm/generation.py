"""Batched sampling with Hugging Face ``generate``: many prompts x K samples per call.

Prompts are sorted by length and left-padded, so a batch shares one KV cache with little padding;
``num_return_sequences=K`` expands each prompt inside ``generate``. A sequence stops at EOS or when
it starts a new ``###Human:`` turn, and the response is cut from the prompt by token position
(never by string replacement), then cut at the next turn marker.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from hhrm import formatting


@dataclass
class SamplingArguments:
    """How responses are sampled (greedy when ``do_sample`` is False)."""

    max_new_tokens: int = 64
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_at_turn_marker: bool = True

    def generation_config(self, tokenizer, num_return_sequences: int) -> GenerationConfig:
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be > 0")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}: must be > 0 when sampling")
        kwargs = dict(
            max_new_tokens=self.max_new_tokens,
            num_return_sequences=num_return_sequences,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
        )
        if self.do_sample:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.stop_at_turn_marker:
            kwargs["stop_strings"] = [formatting.HUMAN]
        return GenerationConfig(**kwargs)


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    prompts: list[str],
    k: int = 1,
    sampling: SamplingArguments | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> list[list[str]]:
    """``k`` responses for each prompt, as ``responses[prompt_index][sample_index]``.

    ``batch_size`` counts prompts per ``generate`` call (so ``batch_size * k`` sequences).
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token: set one (e.g. tokenizer.pad_token = '<pad>') before generating")
    sampling = sampling or SamplingArguments()
    config = sampling.generation_config(tokenizer, k)
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
    out: list[list[str]] = [[] for _ in prompts]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"generate ({k}/prompt)", unit="batch")
    for batch in batches:
        width = max(len(ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # left padding: every prompt ends at the same position
            input_ids[row, width - len(ids[i]) :] = torch.tensor(ids[i])
            attention[row, width - len(ids[i]) :] = 1
        seqs = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            generation_config=config,
            tokenizer=tokenizer,
        )
        texts = tokenizer.batch_decode(seqs[:, width:], skip_special_tokens=True)
        for j, text in enumerate(texts):  # generate returns prompt-major order: row j belongs to batch[j // k]
            out[batch[j // k]].append(formatting.cut_at_next_turn(text) if sampling.stop_at_turn_marker else text)
    if was_training:
        model.train()
    return out
