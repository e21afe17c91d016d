"""RAFT's prompts: the prompt set drawn from, and each iteration's draw (a pure function of seed and iteration)."""

from __future__ import annotations

import numpy as np

from hhrm.data import PreferenceSplits


def prompt_set(splits: PreferenceSplits, tokenizer, max_prompt_tokens: int) -> tuple[list[str], dict[str, int]]:
    """Distinct RM-train prompts (first occurrence order) that fit ``max_prompt_tokens``."""
    distinct = list(dict.fromkeys(splits.train["prompt"]))
    lengths = [len(x) for x in tokenizer(distinct, add_special_tokens=False)["input_ids"]]
    kept = [p for p, n in zip(distinct, lengths) if n <= max_prompt_tokens]
    report = {
        "prompt_rows": len(splits.train),
        "distinct": len(distinct),
        "too_long": len(distinct) - len(kept),
        "prompt_set": len(kept),
    }
    if not kept:
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens}: no prompt of the training data is that short")
    return kept, report


def draw_prompts(num_prompts: int, k: int, seed: int, iteration: int) -> list[int]:
    """``k`` distinct prompt indices for ``iteration``; a pure function of (seed, iteration)."""
    if k > num_prompts:
        raise ValueError(f"prompts_per_iteration={k} is larger than the prompt set ({num_prompts} prompts)")
    rng = np.random.default_rng([seed, iteration])
    return sorted(int(i) for i in rng.choice(num_prompts, size=k, replace=False))
