"""How far the scoring conventions disagree: one reward model scored under every preset that can apply to it.

    python scripts/conventions_matrix.py --model RM_FOLDER --data PAIRS_FILE [--limit 200] [--out matrix.md]

Reads preference pairs in any format hhrm reads (:data:`hhrm.formats.REGISTRY`), renders each as hhrm's
``###`` (prompt, response), scores chosen and rejected under each preset (:data:`hhrm.reward.conventions.PRESETS`) and
prints a Markdown report: per preset the pairwise accuracy and mean reward, or why it cannot apply (the one-line
refusal of :func:`conventions.check`); then, for every two presets, the mean |difference| of their rewards and
the Spearman correlation of their rankings. A decoder RM is not scored as a text pair, nor an encoder (a tokenizer
with CLS and SEP) as anything else.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hhrm import data_io, formats
from hhrm.reward import conventions, scoring


def load_pairs(path: str, limit: int) -> tuple[list[str], list[str], list[str]]:
    """``(prompts, chosen, rejected)`` of the first ``limit`` readable pairs, rendered by hhrm's ``###`` rule."""
    rows = data_io.read_rows(path, "test")
    fmt = formats.detect(rows)
    prompts, chosen, rejected = [], [], []
    for row in rows:
        try:
            context, good, bad = formats.pair_parts(row, fmt)
            prompt, good = formats.HH_RULE.render(context, good)
            bad = formats.HH_RULE.render(context, bad)[1]
        except formats.BadRow:
            continue
        prompts.append(prompt)
        chosen.append(good)
        rejected.append(bad)
        if len(prompts) == limit:
            break
    return prompts, chosen, rejected


def _applies(name: str, tokenizer) -> str | None:
    """Why preset ``name`` cannot score with this tokenizer, or None."""
    encoder = tokenizer.cls_token is not None and tokenizer.sep_token is not None
    convention = conventions.PRESETS[name]
    if (convention.text == "pair") != encoder:
        return "a text pair is for encoder RMs" if encoder is False else "an encoder RM takes a text pair"
    try:
        conventions.check(convention, tokenizer)
    except ValueError as e:
        return str(e)
    return None


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = a.argsort().argsort().astype(float), b.argsort().argsort().astype(float)
    return float(np.corrcoef(ra, rb)[0, 1]) if len(a) > 1 else float("nan")


def matrix(model_path: str, data_path: str, limit: int = 200, batch_size: int = 16) -> str:
    """The Markdown report for one RM folder and one pairs file."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32).eval()
    prompts, chosen, rejected = load_pairs(data_path, limit)
    rewards: dict[str, np.ndarray] = {}
    lines = [
        f"# Reward conventions on `{Path(model_path).name}`: {len(prompts)} pairs from `{Path(data_path).name}`",
        "",
        "| preset | pairwise accuracy | mean reward | note |",
        "|---|---|---|---|",
    ]
    for name in conventions.PRESETS:
        why = _applies(name, tokenizer)
        if why is not None:
            why = why.replace("|", r"\|")  # a token like <|endoftext|> must not split the Markdown cell
            lines.append(f"| {name} | - | - | not applied: {why} |")
            continue
        scorer = scoring.RewardScorer(model, tokenizer, batch_size, convention=conventions.PRESETS[name])
        r = np.array(scorer.score_pairs(prompts + prompts, chosen + rejected))
        rewards[name] = r
        accuracy = float(np.mean(r[: len(prompts)] > r[len(prompts) :])) if prompts else float("nan")
        lines.append(f"| {name} | {accuracy:.3f} | {r.mean():.4f} | |")
    names = list(rewards)
    lines += ["", "Mean |difference| of rewards (upper) and Spearman rank correlation (lower):", ""]
    lines += ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, a in enumerate(names):
        cells = []
        for j, b in enumerate(names):
            if i == j:
                cells.append("-")
            elif i < j:
                cells.append(f"{np.abs(rewards[a] - rewards[b]).mean():.4f}")
            else:
                cells.append(f"{_spearman(rewards[a], rewards[b]):.3f}")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="reward model folder")
    parser.add_argument("--data", required=True, help="preference pairs: a file or folder hhrm reads")
    parser.add_argument("--limit", type=int, default=200, help="pairs to score (the first readable ones)")
    parser.add_argument("--out", help="also write the Markdown here")
    args = parser.parse_args(argv)
    text = matrix(args.model, args.data, args.limit)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
