"""Writing a scored file: the checks that can be made before any scoring (the output folder can be written, the
rows fit one Parquet schema), and writes that leave either the whole new file or the old one, never a partial
file (``<name>.tmp`` renamed into place; removed on failure, since a half-written file keeps a full disk full).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hhrm.outputs import disk_full


def check_writable(output_file: str) -> None:
    """Refuse now, not after scoring every row, an output whose folder cannot be created or written: a file is
    created (and removed) in the nearest folder that exists; no folder is created yet."""
    where = f"output_file={output_file!r}"
    folder = Path(output_file).absolute().parent
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{where}: {existing} is a file, so the folder {folder} cannot be made; choose another path")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".hhrm-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(
            f"{where}: cannot write in {existing} ({err.strerror or err}); choose a folder you can write to"
        ) from None


def parquet_table(rows: list[dict], path: str | os.PathLike):
    """The rows as one Arrow table (every row's columns); a column Parquet cannot hold is refused in one line
    naming it and the first row (counting from 0) that does not fit the rows before it."""
    import pyarrow as pa

    columns = {}
    for name in dict.fromkeys(k for r in rows for k in r):
        values = [r.get(name) for r in rows]
        err = _misfit(values)
        if err is not None:
            lo, hi = 0, len(values)  # values[:lo] fit, values[:hi] do not: bisect to the first row that does not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if _misfit(values[:mid]) is None else (lo, mid)
            bad = hi - 1
            before = f", while the rows before it are {pa.array(values[:bad]).type}" if bad else ""
            raise ValueError(
                f"output_file={str(path)!r}: the rows do not fit one Parquet schema: column {name!r}, first at row "
                f"{bad} (counting from 0), which holds {type(values[bad]).__name__} {repr(values[bad])[:60]}{before} "
                f"({err}); make the column one type in the input, or write .jsonl instead"
            )
        columns[name] = pa.array(values)
    return pa.table(columns)


def _misfit(values: list[Any]) -> str | None:
    """Why Parquet cannot hold these values as one column (``None`` if it can): Arrow's type inference, then a
    write of the empty column (Parquet refuses some Arrow types, e.g. a struct with no field)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pq.write_table(pa.table({"c": pa.array(values).slice(0, 0)}), pa.BufferOutputStream())
    except (pa.ArrowException, OverflowError) as err:
        return f"{type(err).__name__}: {err}"
    return None


@contextmanager
def whole_or_nothing(path: Path) -> Iterator[Path]:
    """Around a write to the yielded ``<path>.tmp`` that is then renamed onto ``path``: on any failure the
    ``.tmp`` is removed (a half-written file would keep a full disk full) and ``path`` is left as it was; a full
    disk is one line naming the file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, Exception) and disk_full(err):  # the one rule, serializers' messages included
            free = shutil.disk_usage(path.parent).free / 1e6
            raise ValueError(
                f"output_file: no space left on device writing {path} ({free:.1f} MB free in {path.parent}); no "
                f"partial file is left: free space, or choose an output_file on another disk, and run again"
            ) from None
        raise


def write_rows(rows: list[dict], path: str | os.PathLike) -> Path:
    """JSON lines or Parquet, written whole then renamed into place."""
    import pyarrow.parquet as pq

    path = Path(path)
    table = parquet_table(rows, path) if path.suffix == ".parquet" else None
    path.parent.mkdir(parents=True, exist_ok=True)
    with whole_or_nothing(path) as tmp:
        if table is None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        else:
            pq.write_table(table, tmp)
        os.replace(tmp, path)
    return path
