"""Reading rows from a local folder or file, or a hub id, and the report of the rows dropped as bad.

Local JSON lines are read as bytes, line by line, so that one bad line becomes a marker row that
:mod:`hhrm.data` counts with the other bad rows (``unparsable_json``, ``undecodable_line``), while a
damaged file (a corrupt gzip stream, a truncated ``.json`` array) ends the run at once with the
file's name, the line where it is known, and what to do. A UTF-8 byte order mark is skipped.

``dataset_name`` is a hub id only when it looks like one (see :func:`is_hub_id`); any other name is
a local path, so a mistyped path fails at once instead of after minutes of network retries. A name shaped
like a hub id that is not in the local cache is refused at once too when the hub is offline or cannot be
reached (:func:`hhrm.hub.hub_reachable`): it is then neither a local path nor a reachable hub id.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from datasets import Dataset

from hhrm.hub import hub_reachable

DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
# A name ending like a data file is a path, never a hub id.
_FILE_ENDINGS = (*DATA_SUFFIXES, ".gz", ".csv", ".tsv", ".txt", ".arrow")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUE = {"1", "true", "yes", "on"}
# Marker rows for lines that are not JSON rows; hhrm.data counts them by reason.
UNPARSABLE = "__unparsable__"
UNDECODABLE = "__undecodable__"


def read_rows(source: str, split: str) -> list[Any]:
    """Rows of ``split`` from a local folder/file or a hub dataset id.

    A local folder must contain a file named after the split (``test.jsonl.gz``, ``train.parquet``...).
    A single local file is used whatever the split. A name that :func:`is_hub_id` accepts is read from
    the hub; any other name must exist locally.
    """
    file = split_file(source, split)
    if file is not None:
        return list(_read_file(file))
    return _read_hub(source, split)


def split_file(source: str, split: str) -> Path | None:
    """The local file holding ``split`` (``None`` for a hub id); raises if a local path has none."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for suffix in DATA_SUFFIXES:
            candidate = path / f"{split}{suffix}"
            if candidate.is_file():
                return candidate
        found = sorted(p.name for p in path.iterdir())
        raise FileNotFoundError(
            f"dataset_name={source!r}: no file for split {split!r} (looked for {split}{{{','.join(DATA_SUFFIXES)}}}); "
            f"the folder holds {found}"
        )
    if is_hub_id(source):
        return None
    owner = source.split("/")[0]
    hint = f" ({owner!r} is a local folder, so this is a path, not a hub id)" if Path(owner).is_dir() else ""
    raise FileNotFoundError(
        f"dataset_name={source!r}: no such file or folder: {path.resolve()}{hint}. Set dataset_name to a folder "
        f"holding {split}.jsonl (or .jsonl.gz/.json/.parquet), to one such file, or to a hub id owner/name"
    )


def is_hub_id(source: str) -> bool:
    """``owner/name``, not starting with ``.``/``/``/``~``, not ending like a data file, owner not a local folder."""
    if source.startswith((".", "/", "~")) or source.lower().endswith(_FILE_ENDINGS):
        return False
    return bool(_HUB_ID.fullmatch(source)) and not Path(source.split("/")[0]).is_dir()


def _offline_var() -> str | None:
    return next((v for v in _OFFLINE_VARS if os.environ.get(v, "").strip().lower() in _TRUE), None)


def _in_local_cache(source: str) -> bool:
    """Whether a hub dataset has files in the local caches (all that an offline run can load)."""
    from datasets import config
    from huggingface_hub import constants

    owner, name = source.split("/")
    candidates = [Path(constants.HF_HUB_CACHE) / f"datasets--{owner}--{name}"]
    candidates += [Path(config.HF_DATASETS_CACHE) / f"{o}___{n}" for o, n in {(owner, name), (owner.lower(), name)}]
    return any(p.is_dir() for p in candidates)


def _unreachable_message(source: str, why: str) -> str:
    return (
        f"dataset_name={source!r}: no such local file or folder ({Path(source).expanduser().absolute()}), and not a "
        f"reachable hub id: {why}, and the dataset is not in the local cache; set dataset_name to a local folder "
        f"holding <split>.jsonl (or .jsonl.gz/.json/.parquet), to one such file, or to a hub id the hub can serve"
    )


def _offline_message(source: str, offline: str) -> str:
    return _unreachable_message(source, f"the hub is offline ({offline}=1), unset it to download the dataset once")


def _read_hub(source: str, split: str) -> list[Any]:
    offline = _offline_var()
    if not _in_local_cache(source):  # at once: nothing to try without the network
        if offline:
            raise ConnectionError(_offline_message(source, offline))
        if not hub_reachable():
            from huggingface_hub import constants

            raise ConnectionError(_unreachable_message(source, f"the hub ({constants.ENDPOINT}) cannot be reached"))
    from datasets import load_dataset  # hub path only: local runs never touch the network

    try:
        return list(load_dataset(source, split=split))
    except ConnectionError as e:
        if offline:
            raise ConnectionError(f"{_offline_message(source, offline)} ({e})") from e
        raise


# --------------------------------------------------------------------------------------------
# Local files


def _read_file(path: Path) -> Iterator[Any]:
    if path.name.endswith(".parquet"):
        yield from Dataset.from_parquet(str(path))
        return
    progress = {"line": 0}
    try:
        with (gzip.open if path.name.endswith(".gz") else open)(path, "rb") as f:
            if path.name.endswith((".json", ".json.gz")) and _starts_array(f):
                yield from _json_array(path, f.read())
            else:
                yield from _json_lines(path, f, progress)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        where = f" after line {progress['line']}" if progress["line"] else ""
        raise ValueError(
            f"{path}: the gzip data is damaged{where} ({type(e).__name__}: {e}): the file is truncated or corrupt; "
            f"download or compress it again (`gzip -t` checks a file)"
        ) from e


def _starts_array(f: IO[bytes]) -> bool:
    head = f.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()
    f.seek(0)
    return head[:1] == b"["


def _json_array(path: Path, raw: bytes) -> list[Any]:
    """A ``.json`` file holding one array: it parses whole or the run stops, naming the place."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 ({e.reason} at byte {e.start}); a JSON array cannot skip a bad line: "
            f"re-encode the file as UTF-8, or write it as JSON lines (.jsonl), where a bad line is counted and skipped"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}:{e.lineno}:{e.colno}: invalid JSON array ({e.msg}): the file is truncated or damaged; write or "
            f"download it again, or write it as JSON lines (.jsonl), where a bad line is counted and skipped"
        ) from None


def _json_lines(path: Path, f: Iterable[bytes], progress: dict[str, int]) -> Iterator[Any]:
    """One row per line; line ends and numbering as text mode counts them (``\\n``, ``\\r\\n``, ``\\r``)."""
    lineno = 0
    for chunk in f:
        for raw in chunk.splitlines():
            lineno += 1
            progress["line"] = lineno
            if lineno == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                # Kept as rows so that they are counted with the other bad rows.
                yield {UNDECODABLE: f"{path.name}:{lineno}", "detail": f"{e.reason} at byte {e.start}"}
                continue
            try:
                yield json.loads(text)
            except json.JSONDecodeError as e:
                yield {UNPARSABLE: f"{path.name}:{lineno}: {e.msg}"}


# --------------------------------------------------------------------------------------------
# Bad rows (what a row's format is, and how it parses: :mod:`hhrm.formats`)


def is_marker(row: Any) -> bool:
    """True for the marker rows standing for lines that could not be read."""
    return isinstance(row, dict) and (UNPARSABLE in row or UNDECODABLE in row)


# What a user can do about a reason, shown beside its count (the counts alone do not say).
HINTS = {
    "system_message": "set use_chat_template=true to keep system messages",
    "unsupported_role": "only system/user/assistant messages can be rendered",
    "template_failed": "the tokenizer's chat_template raised on these rows",
    "template_prefix_mismatch": "the chat_template renders the prompt differently inside the full conversation",
}


@dataclass
class DropReport:
    """Rows dropped, by reason, with the first few row ids (and the first detail) of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    seen: int = 0
    details: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, row_id: str, detail: str = "") -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(row_id)
        if detail:
            self.details.setdefault(reason, detail[:200])

    @property
    def dropped(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "dropped": self.dropped,
            "by_reason": dict(self.counts),
            "examples": self.examples,
            "first_detail": self.details,
        }

    def reasons(self, top: int | None = None) -> str:
        """``reason=count (e.g. ids)``, most frequent first, with what to do where hhrm knows."""
        return ", ".join(
            f"{k}={v} (e.g. {', '.join(self.examples[k][:3])}{f'; {HINTS[k]}' if k in HINTS else ''})"
            for k, v in self.counts.most_common(top)
        )

    def summary(self, name: str) -> str:
        if not self.dropped:
            return f"{name}: {self.seen} rows, none dropped"
        return f"{name}: {self.seen} rows, dropped {self.dropped}: {self.reasons()}"

    def merge(self, other: DropReport) -> DropReport:
        """Both reports' counts, and the first example ids up to five per reason."""
        merged = DropReport(counts=self.counts + other.counts, seen=self.seen + other.seen)
        for rep in (self, other):
            for k, ids in rep.examples.items():
                merged.examples.setdefault(k, [])
                merged.examples[k].extend(ids[: 5 - len(merged.examples[k])])
            for k, detail in rep.details.items():
                merged.details.setdefault(k, detail)
        return merged
