"""HH-RLHF loading, normalisation, the card's splits and the data report.

Two input schemas are accepted, detected from the columns (or forced with ``dataset_format``):

* ``raw``: Anthropic's release, ``{"chosen": dialogue, "rejected": dialogue}`` (whole dialogues);
* ``dahoas``: ``Dahoas/full-hh-rlhf``, ``{"prompt", "response", "chosen", "rejected"}`` where
  ``chosen``/``rejected`` hold the final answer only.

Both become one internal form, ``{"prompt", "chosen", "rejected"}`` in hhrm's text format
(:mod:`hhrm.formatting`): a prompt ending in ``" ###Assistant:"`` and two responses. Rows that
cannot be normalised are counted by reason (:class:`DropReport`), never raise mid-run.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from hhrm import formatting

logger = logging.getLogger(__name__)

FORMATS = ("auto", "raw", "dahoas")
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


@dataclass
class DataArguments:
    """Where the preference data comes from and how the card's splits are cut."""

    dataset_name: str = field(
        default="Dahoas/full-hh-rlhf",
        metadata={"help": "Hub id, or a local folder holding <split>.jsonl[.gz]/.parquet files, or one local file."},
    )
    dataset_format: str = field(default="auto", metadata={"help": "auto | raw | dahoas (auto: from the columns)."})
    train_split: str = field(default="train", metadata={"help": "Split (or file stem) with the training rows."})
    test_split: str = field(default="test", metadata={"help": "Split (or file stem) with the test rows."})
    test_offset: int = field(
        default=6275,
        metadata={"help": "The first N test rows join the training data (card: 6,275); the rest are the RM test."},
    )
    max_train_rows: int | None = field(
        default=None, metadata={"help": "Keep only the first N train rows (quick runs)."}
    )
    max_test_rows: int | None = field(default=None, metadata={"help": "Keep only the first N test rows (quick runs)."})

    def __post_init__(self) -> None:
        if self.dataset_format not in FORMATS:
            raise ValueError(f"dataset_format={self.dataset_format!r}: expected one of {FORMATS}")
        if self.test_offset < 0:
            raise ValueError(f"test_offset={self.test_offset}: must be >= 0")


# --------------------------------------------------------------------------------------------
# Reading rows


def read_rows(source: str, split: str) -> list[dict[str, Any]]:
    """Rows of ``split`` from a local folder/file or a hub dataset id.

    A local folder must contain a file named after the split (``test.jsonl.gz``, ``train.parquet``...).
    A single local file is used whatever the split. Anything else is treated as a hub id.
    """
    path = Path(source)
    if path.is_file():
        return list(_read_file(path))
    if path.is_dir():
        for suffix in DATA_SUFFIXES:
            candidate = path / f"{split}{suffix}"
            if candidate.is_file():
                return list(_read_file(candidate))
        found = sorted(p.name for p in path.iterdir())
        raise FileNotFoundError(
            f"dataset_name={source!r}: no file for split {split!r} (looked for {split}{{{','.join(DATA_SUFFIXES)}}}); "
            f"the folder holds {found}"
        )
    if not _looks_like_hub_id(source):
        raise FileNotFoundError(f"dataset_name={source!r}: no such file or folder, and not a hub id")
    from datasets import load_dataset  # hub path only: local runs never touch the network

    return list(load_dataset(source, split=split))


def _looks_like_hub_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith(("/", "."))


def _read_file(path: Path) -> Iterable[dict[str, Any]]:
    name = path.name
    if name.endswith(".parquet"):
        yield from Dataset.from_parquet(str(path))
        return
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        if name.endswith((".json", ".json.gz")) and f.read(1) == "[":
            f.seek(0)
            yield from json.load(f)
            return
        f.seek(0)
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                # Kept as a row so that it is counted with the other bad rows.
                yield {"__unparsable__": f"{path.name}:{lineno}: {e.msg}"}


def detect_format(rows: list[dict[str, Any]]) -> str:
    """``dahoas`` if rows carry a ``prompt`` column, else ``raw`` (needs ``chosen``/``rejected``)."""
    for row in rows[:100]:
        if "__unparsable__" in row:
            continue
        if "prompt" in row:
            return "dahoas"
        if "chosen" in row or "rejected" in row:
            return "raw"
    keys = sorted(rows[0]) if rows else []
    raise ValueError(f"cannot detect the dataset format from columns {keys}: expected chosen/rejected (+ prompt)")


# --------------------------------------------------------------------------------------------
# Normalisation with bad-row accounting


class BadRow(ValueError):
    """A row that cannot be normalised; ``reason`` is the counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class DropReport:
    """Rows dropped, by reason, with the first few row ids of each for a user to look at."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    seen: int = 0

    def add(self, reason: str, row_id: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(row_id)

    @property
    def dropped(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "dropped": self.dropped, "by_reason": dict(self.counts), "examples": self.examples}

    def summary(self, name: str) -> str:
        if not self.dropped:
            return f"{name}: {self.seen} rows, none dropped"
        reasons = ", ".join(f"{k}={v} (e.g. {', '.join(self.examples[k][:3])})" for k, v in self.counts.most_common())
        return f"{name}: {self.seen} rows, dropped {self.dropped}: {reasons}"


def _require_str(row: dict[str, Any], key: str) -> str:
    if key not in row or row[key] is None:
        raise BadRow("missing_field", key)
    if not isinstance(row[key], str):
        raise BadRow("not_string", f"{key} is {type(row[key]).__name__}")
    return row[key]


def _split(text: str, which: str) -> tuple[list[formatting.Turn], str]:
    try:
        turns = formatting.parse_turns(text)
    except ValueError as e:
        raise BadRow("malformed_dialogue", f"{which}: {e}") from None
    if not turns or turns[-1][0] != "Assistant":
        raise BadRow("no_assistant_turn", which)
    return turns[:-1], turns[-1][1]


def _prompt_context(prompt: str) -> list[formatting.Turn]:
    """Turns of a Dahoas prompt, which must end with an empty Assistant turn."""
    try:
        turns = formatting.parse_turns(prompt)
    except ValueError as e:
        raise BadRow("malformed_dialogue", f"prompt: {e}") from None
    if not turns or turns[-1] != ("Assistant", ""):
        raise BadRow("no_assistant_turn", "prompt does not end with 'Assistant:'")
    return turns[:-1]


def normalize_row(row: dict[str, Any], fmt: str) -> dict[str, str]:
    """One input row → ``{"prompt", "chosen", "rejected"}``; raises :class:`BadRow`."""
    if "__unparsable__" in row:
        raise BadRow("unparsable_json", row["__unparsable__"])
    chosen_raw, rejected_raw = _require_str(row, "chosen"), _require_str(row, "rejected")
    if fmt == "dahoas":
        context = _prompt_context(_require_str(row, "prompt"))
        chosen, rejected = chosen_raw.strip(), rejected_raw.strip()
    else:
        context, chosen = _split(chosen_raw, "chosen")
        rejected_context, rejected = _split(rejected_raw, "rejected")
        if context != rejected_context:
            raise BadRow("prompt_mismatch", "chosen and rejected differ before the final answer")
    if not any(role == "Human" for role, _ in context):
        raise BadRow("no_human_turn")
    if not chosen or not rejected:
        raise BadRow("empty_response", "chosen" if not chosen else "rejected")
    if chosen == rejected:
        raise BadRow("identical_responses")
    return {
        "prompt": formatting.make_prompt(context),
        "chosen": formatting.make_response(chosen),
        "rejected": formatting.make_response(rejected),
    }


def normalize_rows(
    rows: list[dict[str, Any]], fmt: str, name: str, first_index: int = 0
) -> tuple[Dataset, DropReport]:
    """Normalise every row; bad rows are counted in the report (ids are ``name[index]``)."""
    report = DropReport(seen=len(rows))
    out: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    for i, row in enumerate(rows, start=first_index):
        try:
            clean = normalize_row(row, fmt) if isinstance(row, dict) else _raise_not_object(row)
        except BadRow as e:
            report.add(e.reason, f"{name}[{i}]")
            continue
        for k, v in clean.items():
            out[k].append(v)
    return Dataset.from_dict(out), report


def _raise_not_object(row: Any) -> dict[str, str]:
    raise BadRow("not_an_object", type(row).__name__)


# --------------------------------------------------------------------------------------------
# The card's splits


@dataclass
class PreferenceSplits:
    """RM train/test pairs (SFT uses the RM-train rows, chosen only) and what was dropped."""

    train: Dataset
    test: Dataset
    drops: dict[str, DropReport]
    source: dict[str, Any]

    def sft_texts(self) -> Dataset:
        """SFT data: the full chosen dialogues of the RM-train rows, as a ``text`` column."""
        return Dataset.from_dict({"text": [p + c for p, c in zip(self.train["prompt"], self.train["chosen"])]})


def load_splits(args: DataArguments) -> PreferenceSplits:
    """Read, split by the card's rule (on raw row positions), then normalise each part."""
    train_rows = read_rows(args.dataset_name, args.train_split)
    test_rows = read_rows(args.dataset_name, args.test_split)
    if args.max_train_rows is not None:
        train_rows = train_rows[: args.max_train_rows]
    if args.max_test_rows is not None:
        test_rows = test_rows[: args.max_test_rows]
    if args.test_offset > len(test_rows):
        raise ValueError(
            f"test_offset={args.test_offset} is larger than the {len(test_rows)} test rows of {args.dataset_name!r}"
        )
    fmt = args.dataset_format if args.dataset_format != "auto" else detect_format(train_rows or test_rows)
    moved = test_rows[: args.test_offset]
    train_a, drop_a = normalize_rows(train_rows, fmt, args.train_split)
    train_b, drop_b = normalize_rows(moved, fmt, args.test_split)
    test, drop_test = normalize_rows(test_rows[args.test_offset :], fmt, args.test_split, first_index=args.test_offset)
    from datasets import concatenate_datasets

    train = concatenate_datasets([train_a, train_b])
    drops = {"train": _merge(drop_a, drop_b), "test": drop_test}
    for name, rep in drops.items():
        (logger.warning if rep.dropped else logger.info)(rep.summary(f"bad rows in {name}"))
    source = {
        "dataset_name": args.dataset_name,
        "format": fmt,
        "train_rows": len(train_rows),
        "test_rows": len(test_rows),
        "test_offset": args.test_offset,
    }
    return PreferenceSplits(train=train, test=test, drops=drops, source=source)


def _merge(a: DropReport, b: DropReport) -> DropReport:
    merged = DropReport(counts=a.counts + b.counts, seen=a.seen + b.seen)
    for rep in (a, b):
        for k, ids in rep.examples.items():
            merged.examples.setdefault(k, [])
            merged.examples[k].extend(ids[: 5 - len(merged.examples[k])])
    return merged


def overlapping_pairs(train: Dataset, test: Dataset) -> list[int]:
    """Positions of the test pairs whose exact (prompt, chosen, rejected) also occurs in train."""
    seen = set(zip(train["prompt"], train["chosen"], train["rejected"]))
    return [i for i, key in enumerate(zip(test["prompt"], test["chosen"], test["rejected"])) if key in seen]


# --------------------------------------------------------------------------------------------
# Token lengths


def pair_lengths(ds: Dataset, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Token counts of ``prompt+chosen`` and ``prompt+rejected`` as the reward model sees them.

    Counted with :func:`hhrm.scoring.encode` (text + EOS, the tokenizer's own special tokens), the
    one tokenization the RM trains and scores with, so the report and the 512-token drop agree.
    """
    from hhrm.scoring import encode

    texts = [p + c for p, c in zip(ds["prompt"], ds["chosen"])] + [p + r for p, r in zip(ds["prompt"], ds["rejected"])]
    lens = np.array([len(x) for x in encode(tokenizer, texts)])
    return lens[: len(ds)], lens[len(ds) :]


def distinct_prompts(prompts: Iterable[str], n: int) -> list[str]:
    """The first ``n`` distinct prompts, in order (fixed across stages so their numbers compare)."""
    seen: dict[str, None] = {}
    for p in prompts:
        if len(seen) >= n:
            break
        seen.setdefault(p, None)
    return list(seen)


def heldout_prompts(splits: PreferenceSplits, n: int) -> list[str]:
    """The first ``n`` distinct RM-test prompts (fixed across stages so their numbers compare)."""
    return distinct_prompts(splits.test["prompt"], n)


def length_stats(lengths: np.ndarray) -> dict[str, float]:
    if len(lengths) == 0:
        return {"count": 0}
    q = np.percentile(lengths, [5, 25, 50, 75, 95, 99])
    return {
        "count": int(len(lengths)),
        "mean": float(lengths.mean()),
        "p5": float(q[0]),
        "p25": float(q[1]),
        "p50": float(q[2]),
        "p75": float(q[3]),
        "p95": float(q[4]),
        "p99": float(q[5]),
        "max": int(lengths.max()),
    }


def data_report(splits: PreferenceSplits, tokenizer, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Counts, drops by reason and token-length percentiles of chosen vs rejected, per split."""
    report: dict[str, Any] = {"source": splits.source, "bad_rows": {k: v.to_dict() for k, v in splits.drops.items()}}
    for name, ds in (("train", splits.train), ("test", splits.test)):
        lc, lr = pair_lengths(ds, tokenizer)
        report[name] = {"pairs": len(ds), "chosen_tokens": length_stats(lc), "rejected_tokens": length_stats(lr)}
    report["train_test_overlap"] = len(overlapping_pairs(splits.train, splits.test))
    report.update(extra or {})
    return report
