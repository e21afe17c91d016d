"""HH-RLHF loading, normalisation, the card's splits and the data report.

Input formats (:data:`hhrm.formats.REGISTRY`, the one home of their names, detection and parsing) are detected
from the columns and values, or stated with ``dataset_format``.

All become one internal form, ``{"prompt", "chosen", "rejected"}`` strings, through one text rule
(:class:`hhrm.formats.TextRule`, built by :func:`text_rule`): the card's ``###Human:`` /
``###Assistant:`` format (:mod:`hhrm.formatting`), or with ``use_chat_template`` the tokenizer's chat
template. SFT (prompt + chosen), the RM (prompt + response + EOS), evaluation, scoring and RAFT read
these strings, so no two stages render a dialogue differently. Rows that cannot be normalised are
counted by reason (:class:`hhrm.data_io.DropReport`), never raise mid-run; a split that is empty, or has more bad
rows than ``max_bad_row_fraction`` allows, is refused before any training starts. Prompt/response
rows to score go through :func:`normalize_completions` by the same rule. Reading files is
:mod:`hhrm.data_io`.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import Dataset, Features, Value, concatenate_datasets

from hhrm import formats
from hhrm.data_io import UNDECODABLE, UNPARSABLE, DropReport, read_rows, split_file
from hhrm.finite import check_finite_settings
from hhrm.formats import BadRow, TextRule, detect, text_rule

logger = logging.getLogger(__name__)

COLUMNS = ("prompt", "chosen", "rejected")
# Rows normalised (and pairs tokenized) per step, so no stage holds a second full Python copy of a split.
CHUNK_ROWS = 8192
LENGTH_CHUNK = 2048


def format_help() -> str:
    """``dataset_format``'s help, from the registry: the choices, then what each format is."""
    what = "; ".join(f"{f.name}: {f.summary}" for f in formats.REGISTRY)
    return f"{' | '.join(formats.choices())} (auto: from the columns and values). {what}."


@dataclass
class DataArguments:
    """Where the preference data comes from and how the card's splits are cut."""

    dataset_name: str = field(
        default="Dahoas/full-hh-rlhf",
        metadata={
            "help": "Hub id (owner/name), or a local folder holding <split>.jsonl[.gz]/.json/.parquet files, or one "
            "local file. A name starting with . / ~, ending like a data file or whose first part is a local folder "
            "is a local path."
        },
    )
    dataset_format: str = field(
        default="auto",
        metadata={"help": format_help()},  # no argparse choices: __post_init__ refuses, naming them
    )
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
    max_bad_row_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Share of rows per split that may be dropped as bad before the run is refused; 1.0 accepts any."
        },
    )
    use_chat_template: bool = field(
        default=False,
        metadata={
            "help": "Render every dialogue with the tokenizer's chat template instead of the card's ###Human: / "
            "###Assistant: format (needs a tokenizer with a chat_template; keeps system messages). One rule for "
            "every stage: change it only together with retraining the SFT and reward models."
        },
    )

    def __post_init__(self) -> None:
        check_finite_settings(self)
        if self.dataset_format != "auto":
            formats.by_name(self.dataset_format, "pairs")  # refused, naming the choices
        if self.test_offset < 0:
            raise ValueError(f"test_offset={self.test_offset}: must be >= 0")
        for name in ("max_train_rows", "max_test_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value}: must be >= 1, or left unset to keep every row")
        if not 0.0 <= self.max_bad_row_fraction <= 1.0:
            raise ValueError(
                f"max_bad_row_fraction={self.max_bad_row_fraction}: must be within [0, 1] (1.0 accepts any bad rows)"
            )


# --------------------------------------------------------------------------------------------
# Normalisation with bad-row accounting


def normalize_row(row: dict[str, Any], fmt: str, rule: TextRule | None = None) -> dict[str, str]:
    """One preference row -> ``{"prompt", "chosen", "rejected"}`` by ``rule`` (default: ``###``); raises BadRow."""
    _check_readable(row)
    context, chosen, rejected = formats.pair_parts(row, fmt)
    formats.check_answers(context, chosen, rejected)
    rule = rule or formats.HH_RULE
    prompt, chosen = rule.render(context, chosen)
    return {"prompt": prompt, "chosen": chosen, "rejected": rule.render(context, rejected)[1]}


def normalize_completion(row: dict[str, Any], fmt: str, rule: TextRule | None = None) -> dict[str, str]:
    """One prompt/response (or prompt/completion) row -> ``{"prompt", "response"}``; raises :class:`BadRow`."""
    _check_readable(row)
    context, answer = formats.completion_parts(row, fmt)
    formats.check_answers(context, answer)
    prompt, response = (rule or formats.HH_RULE).render(context, answer)
    return {"prompt": prompt, "response": response}


def _check_readable(row: dict[str, Any]) -> None:
    if UNPARSABLE in row:
        raise BadRow("unparsable_json", row[UNPARSABLE])
    if UNDECODABLE in row:
        raise BadRow("undecodable_line", row.get("detail", ""), where=row[UNDECODABLE])


def normalize_rows(
    rows: Sequence[Any],
    fmt: str,
    name: str,
    first_index: int = 0,
    rule: TextRule | None = None,
    keep_index: bool = True,
) -> tuple[Dataset, DropReport]:
    """Normalise every preference row by ``rule``; bad rows are counted in the report (ids ``name[index]`` or
    ``file:line``). Columns ``prompt``, ``chosen``, ``rejected`` (strings) and, with ``keep_index``, ``row``: the
    input index (``first_index`` + position) of each kept row, in input order. ``fmt="auto"`` detects it.
    """
    fmt = detect(rows) if fmt == "auto" else formats.by_name(fmt, "pairs").name
    return _normalize(rows, lambda r: normalize_row(r, fmt, rule), COLUMNS, name, first_index, keep_index)


def normalize_completions(
    rows: Sequence[Any], fmt: str, name: str, rule: TextRule | None = None, first_index: int = 0
) -> tuple[Dataset, DropReport]:
    """Prompt/response rows (``{"prompt", "response"}`` or TRL's ``{"prompt", "completion"}``; ``fmt``: a format of
    ``responses`` rows in :data:`hhrm.formats.REGISTRY`, or ``auto``: :func:`hhrm.formats.detect`) -> string columns
    ``prompt``, ``response`` (``prompt + response`` is the full text ``rule`` renders) and int ``row`` (input index
    of each kept row, in order); the rest are counted.
    """
    fmt = detect(rows, "responses") if fmt == "auto" else formats.by_name(fmt, "responses").name
    return _normalize(rows, lambda r: normalize_completion(r, fmt, rule), ("prompt", "response"), name, first_index)


def _normalize(
    rows: Sequence[Any], convert, columns: Sequence[str], name: str, first_index: int, keep_index: bool = True
) -> tuple[Dataset, DropReport]:
    """``convert`` every row; clean rows go to Arrow every :data:`CHUNK_ROWS` rows (a split is never held twice)."""
    features = Features({k: Value("string") for k in columns} | ({"row": Value("int64")} if keep_index else {}))
    report = DropReport(seen=len(rows))
    parts: list[Dataset] = []
    out: dict[str, list] = {k: [] for k in features}
    for i, row in enumerate(rows, start=first_index):
        try:
            clean = convert(row) if isinstance(row, dict) else _raise_not_object(row)
        except BadRow as e:
            report.add(e.reason, e.where or f"{name}[{i}]", e.detail)
            continue
        for k in columns:
            out[k].append(clean[k])
        if keep_index:
            out["row"].append(i)
        if len(out[columns[0]]) >= CHUNK_ROWS:
            parts.append(Dataset.from_dict(out, features=features))
            out = {k: [] for k in features}
    parts.append(Dataset.from_dict(out, features=features))
    return (parts[0] if len(parts) == 1 else concatenate_datasets(parts)), report


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


def load_splits(args: DataArguments, tokenizer=None) -> PreferenceSplits:
    """Read, split by the card's rule (on raw row positions), then normalise each part by the one text rule.

    ``tokenizer``: the one whose chat template renders the text when ``use_chat_template`` (required then).
    Refused (``ValueError``) before any training: ``use_chat_template`` without a tokenizer that has a chat
    template, an empty train input, an RM-train split with no usable pair, and a split with a larger share of
    bad rows than ``max_bad_row_fraction``.
    """
    rule = text_rule(args, tokenizer)  # a config error, before minutes of reading
    train_rows, test_rows = _read_inputs(args)
    fmt = args.dataset_format
    if fmt == "auto":
        fmt = detect(itertools.chain(train_rows, test_rows))
    source = {
        "dataset_name": args.dataset_name,
        "format": fmt,
        "text_rule": rule.name,
        "train_rows": len(train_rows),
        "test_rows": len(test_rows),
        "test_offset": args.test_offset,
    }
    part = dict(rule=rule, keep_index=False)  # the splits keep today's three columns
    train_a, drop_a = normalize_rows(train_rows, fmt, args.train_split, **part)
    del train_rows  # the raw rows are not needed past their own normalisation
    train_b, drop_b = normalize_rows(test_rows[: args.test_offset], fmt, args.test_split, **part)
    test, drop_test = normalize_rows(test_rows[args.test_offset :], fmt, args.test_split, args.test_offset, **part)
    del test_rows
    train = concatenate_datasets([train_a, train_b])
    drops = {"train": drop_a.merge(drop_b), "test": drop_test}
    for name, rep in drops.items():
        (logger.warning if rep.dropped else logger.info)(rep.summary(f"bad rows in {name}"))
    _refuse_bad_splits(args, drops, len(train))
    return PreferenceSplits(train=train, test=test, drops=drops, source=source)


def _read_inputs(args: DataArguments) -> tuple[list[Any], list[Any]]:
    """The raw train and test rows, cut to the row limits, with the checks that need no parsing."""
    train_rows = read_rows(args.dataset_name, args.train_split)
    if not train_rows:
        file = split_file(args.dataset_name, args.train_split)
        raise ValueError(
            f"dataset_name={args.dataset_name!r}: the {args.train_split!r} split"
            f"{f' ({file})' if file else ''} has no rows, and the test rows that test_offset moves in are no training "
            f"set: point dataset_name (or train_split) at the training data"
        )
    test_rows = read_rows(args.dataset_name, args.test_split)
    if args.max_train_rows is not None:
        train_rows = train_rows[: args.max_train_rows]
    if args.max_test_rows is not None:
        test_rows = test_rows[: args.max_test_rows]
    if args.test_offset > len(test_rows):
        raise ValueError(
            f"test_offset={args.test_offset} is larger than the {len(test_rows)} test rows of {args.dataset_name!r}"
        )
    return train_rows, test_rows


def _refuse_bad_splits(args: DataArguments, drops: dict[str, DropReport], train_pairs: int) -> None:
    """No usable training pair, or too many bad rows in a split: stop now, saying why and what to change."""
    if train_pairs == 0:
        raise ValueError(
            f"dataset_name={args.dataset_name!r}: no usable training pair after normalisation "
            f"({drops['train'].summary('RM-train')}); fix the rows or the schema (dataset_format)"
        )
    for name, rep in drops.items():
        share = rep.dropped / rep.seen if rep.seen else 0.0
        if share > args.max_bad_row_fraction:
            raise ValueError(
                f"dataset_name={args.dataset_name!r}: {share:.1%} of the RM-{name} split's rows are bad "
                f"({rep.dropped} of {rep.seen}; {rep.reasons(top=3)}), over max_bad_row_fraction="
                f"{args.max_bad_row_fraction}: fix the file or the schema (dataset_format), or raise "
                f"max_bad_row_fraction (1.0 accepts any)"
            )


def overlapping_pairs(train: Dataset, test: Dataset) -> list[int]:
    """Positions of the test pairs whose exact (prompt, chosen, rejected) also occurs in train."""
    keys = list(_pair_keys(test))
    wanted, found = set(keys), set()
    for start in range(0, len(train), CHUNK_ROWS):
        found.update(k for k in _pair_keys(train, start, start + CHUNK_ROWS) if k in wanted)
    return [i for i, key in enumerate(keys) if key in found]


def _pair_keys(ds: Dataset, start: int = 0, stop: int | None = None) -> Iterable[tuple[str, str, str]]:
    if not len(ds):
        return []
    batch = ds[start:stop]
    return zip(batch["prompt"], batch["chosen"], batch["rejected"])


# --------------------------------------------------------------------------------------------
# Token lengths


def pair_lengths(ds: Dataset, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Token counts of ``prompt+chosen`` and ``prompt+rejected`` as the reward model sees them.

    Counted with :func:`hhrm.reward.scoring.encode` (text + EOS, the tokenizer's own special tokens), the
    one tokenization the RM trains and scores with, so the report and the 512-token drop agree.
    Tokenized :data:`LENGTH_CHUNK` texts at a time, keeping only the counts (``int32``).
    """
    from hhrm.reward.scoring import encode

    lengths = {k: np.zeros(len(ds), dtype=np.int32) for k in ("chosen", "rejected")}
    for start in range(0, len(ds), LENGTH_CHUNK):
        batch = ds[start : start + LENGTH_CHUNK]
        for k, out in lengths.items():
            ids = encode(tokenizer, [p + r for p, r in zip(batch["prompt"], batch[k])])
            out[start : start + len(ids)] = [len(x) for x in ids]
    return lengths["chosen"], lengths["rejected"]


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
    stats = {"count": int(len(lengths)), "mean": float(lengths.mean())}
    stats |= {f"p{p}": float(v) for p, v in zip((5, 25, 50, 75, 95, 99), q)}
    return stats | {"max": int(lengths.max())}


def data_report(
    splits: PreferenceSplits,
    tokenizer,
    extra: dict[str, Any] | None = None,
    lengths: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Counts, drops by reason and token-length percentiles of chosen vs rejected, per split.

    ``lengths``: the splits' pair lengths when the caller has them already (the RM stage tokenized every pair).
    """
    report: dict[str, Any] = {"source": splits.source, "bad_rows": {k: v.to_dict() for k, v in splits.drops.items()}}
    for name, ds in (("train", splits.train), ("test", splits.test)):
        lc, lr = lengths[name] if lengths else pair_lengths(ds, tokenizer)
        report[name] = {"pairs": len(ds), "chosen_tokens": length_stats(lc), "rejected_tokens": length_stats(lr)}
    report["train_test_overlap"] = len(overlapping_pairs(splits.train, splits.test))
    report.update(extra or {})
    return report
