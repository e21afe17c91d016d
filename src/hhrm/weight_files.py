"""A local model folder's weight files, checked without loading a tensor.

A safetensors file is an 8-byte little-endian header length, a JSON header giving each tensor's
``data_offsets`` into the data that follows, then the data: a copy cut short (a full disk, an interrupted
transfer) is told by its size alone, where loading it would fail deep inside safetensors with a traceback.
A shard index (``*.safetensors.index.json``) must name only shards that are there.
"""

from __future__ import annotations

import json
from pathlib import Path

HEADER_LIMIT = 100_000_000  # safetensors refuses larger headers; a larger length is a damaged file
FIX = "copy it again or retrain"


def check_weight_files(folder: str | Path, where: str) -> None:
    """Raise a one-line ``ValueError`` starting with ``where`` (``setting='path'``) for the first missing shard or
    damaged ``*.safetensors`` file in ``folder`` (its own files, not its checkpoint subfolders)."""
    folder = Path(folder)
    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{where}: {index.name} is not a readable shard index ({err}); {FIX}") from None
        missing = sorted(name for name in shards if not (folder / name).is_file())
        if missing:
            raise ValueError(
                f"{where}: {index.name} names {len(missing)} of {len(shards)} weight shards not in the folder "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): copy the folder again or retrain"
            )
    for file in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem:
            raise ValueError(f"{where}: {file.name} {problem}: {FIX}")


def safetensors_problem(file: Path) -> str | None:
    """What is wrong with a safetensors file's size or header (``None`` when its size is what the header needs)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else None
        if length is None or 8 + length > size:
            need = f" of at least {_size(8 + length)}" if length is not None and length <= HEADER_LIMIT else ""
            return f"is truncated ({_size(size)}{need}: its header is incomplete)"
        if length > HEADER_LIMIT:
            return f"is not a safetensors file (a header length of {length:,} bytes)"
        try:
            header = json.loads(f.read(length))
            ends = [t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            return f"has a damaged header ({type(err).__name__}: {err})"
    need = 8 + length + max(ends, default=0)
    return f"is truncated ({_size(size)} of {_size(need)})" if need > size else None


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n:,} bytes"
