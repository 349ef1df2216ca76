"""Records (one dict per row) of JSONL / JSON / CSV / Parquet files: read as iterators, written atomically.

The format is the file's extension (`FORMATS`). Readers yield `(record, error)` pairs, one per row in
file order, and never stop at a bad row: `error` says why a row cannot be read (then `record` is None),
so a caller can report it and go on. A file that cannot be read at all raises InputError.
Writers take any iterable of records; JSONL streams them, the other formats need them all first (a
JSON array is one value, and CSV and Parquet columns are the union of every record's keys).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import Any

from qguard.data.jsonl import iter_jsonl, line_starts
from qguard.errors import InputError

# .json: a JSON array of records, or JSON Lines under that name (read: sniffed; written: an array)
FORMATS = {".jsonl": "jsonl", ".json": "json", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}

Records = Iterator[tuple[Any, str | None]]  # (record, None) or (None, why the row cannot be read)


def file_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"{path}: unknown file type {path.suffix!r}; use .jsonl, .json, .csv or .parquet")
    return fmt


# ------------------------------------------------------------------------------------------ reading

def count_rows(path: Path) -> int:
    """Rows in the file, as `read_records` will yield them (blank JSONL lines are not rows)."""
    fmt = file_format(path)
    if fmt == "parquet":
        return _parquet(path).metadata.num_rows
    if fmt == "csv":
        return sum(1 for _ in _csv_rows(path))
    if fmt == "json" and _json_array(path) is not None:
        return len(_json_array(path))
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def read_records(path: Path, skip: int = 0) -> Records:
    """(record, error) for every row after the first `skip`; error is set when a row cannot be read."""
    fmt = file_format(path)
    it = {"jsonl": _jsonl_rows, "json": _json_rows, "csv": _csv_rows, "parquet": _parquet_rows}[fmt](path)
    for i, item in enumerate(it):
        if i >= skip:
            yield item


def _jsonl_rows(path: Path) -> Records:
    for _where, obj, err in iter_jsonl(path):
        yield obj, err


def _json_array(path: Path) -> list | None:
    """The records of a .json file holding one JSON array; None if it is JSON Lines instead."""
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"["):
        return None
    return _load_array(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=1)
def _load_array(path: str, mtime: int) -> list:  # counted, then read: parse the file once
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    except ValueError as e:
        raise InputError(f"{path}: not a valid JSON array ({e})") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON array of records")
    return data


def _json_rows(path: Path) -> Records:
    records = _json_array(path)
    if records is None:
        yield from _jsonl_rows(path)
        return
    for r in records:
        yield r, None


def _csv_rows(path: Path, at: int | None = None) -> Records:
    """Every row, or those from position `at` (from `_csv_slices`) on."""
    csv.field_size_limit(sys.maxsize)
    with path.open(newline="", encoding="utf-8-sig", errors="strict") as f:  # Excel writes a BOM
        try:
            reader = csv.DictReader(iter(f.readline, ""))
            if at is not None:
                header = reader.fieldnames
                f.seek(at)
                reader = csv.DictReader(iter(f.readline, ""), fieldnames=header)
            for row in reader:
                yield row, None
        except UnicodeDecodeError:
            raise InputError(f"{path}: not UTF-8 text") from None


def _parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("Parquet needs pyarrow: pip install 'qguard[data]'") from None
    try:
        return pq.ParquetFile(path)
    except Exception as e:
        raise InputError(f"{path}: not a readable Parquet file ({type(e).__name__})") from None


def _parquet_rows(path: Path) -> Records:
    for batch in _parquet(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield row, None


# ------------------------------------------------------------------------------------------ slices

@dataclass(frozen=True)
class Slice:
    """Rows [first, first + rows) of a file (0-based), and where `read_slice` starts reading them."""

    first: int
    rows: int
    # JSONL: [byte offset, line number]; CSV: a text-file position; Parquet: [row group, row in it];
    # a JSON array: None (the array is parsed whole, once per process)
    at: Any = None


def slices(path: Path, rows: int) -> list[Slice]:
    """The file's rows in consecutive slices of at most `rows`, found in one read of the file (Parquet:
    its metadata only; a slice never crosses a row group). `read_slice` reads each without reading the
    rows before it, and all of them in order yield exactly what `read_records` yields. Raises InputError
    for a file that cannot be read (a bad JSONL line is a row error, as in `read_records`)."""
    fmt = file_format(path)
    if fmt == "parquet":
        md, out, base = _parquet(path).metadata, [], 0
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            out += [Slice(base + off, min(rows, n - off), [g, off]) for off in range(0, n, rows)]
            base += n
        return out
    if fmt == "csv":
        return _csv_slices(path, rows)
    if fmt == "json" and _json_array(path) is not None:
        n = len(_json_array(path))
        return [Slice(first, min(rows, n - first)) for first in range(0, n, rows)]
    n, starts = line_starts(path, rows)
    return [Slice(k * rows, min(rows, n - k * rows), list(at)) for k, at in enumerate(starts)]


def read_slice(path: Path, part: Slice) -> Records:
    """(record, error) for the rows of one slice of `slices(path, ...)`."""
    fmt = file_format(path)
    if fmt == "parquet":
        g, off = part.at
        for row in _parquet(path).read_row_group(g).slice(off, part.rows).to_pylist():
            yield row, None
    elif fmt == "csv":
        yield from islice(_csv_rows(path, part.at), part.rows)
    elif fmt == "json" and _json_array(path) is not None:
        for r in _json_array(path)[part.first: part.first + part.rows]:
            yield r, None
    else:
        for _where, obj, err in islice(iter_jsonl(path, start=tuple(part.at)), part.rows):
            yield obj, err


def _csv_slices(path: Path, rows: int) -> list[Slice]:
    # f.readline, not iteration: a text file's tell() works between readline calls; the csv module reads
    # one line at a time as it needs them, so after a record the file stands at the next record's start
    csv.field_size_limit(sys.maxsize)
    out, n = [], 0
    with path.open(newline="", encoding="utf-8-sig", errors="strict") as f:
        try:
            reader = csv.DictReader(iter(f.readline, ""))
            reader.fieldnames  # noqa: B018 (reads the header)
            at = f.tell()
            for n, _ in enumerate(reader, 1):
                if n % rows == 0:
                    out.append(Slice(n - rows, rows, at))
                    at = f.tell()
        except UnicodeDecodeError:
            raise InputError(f"{path}: not UTF-8 text") from None
    if n % rows:
        out.append(Slice(n - n % rows, n % rows, at))
    return out


# ------------------------------------------------------------------------------------------ writing

def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` next to `path`, then rename over it: readers see the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_output(path: Path, rows: Iterable[dict]) -> None:
    """Write `rows` in the format of `path`'s extension, atomically."""
    fmt = file_format(path)
    atomic_write(path, lambda p: write_file(p, rows, fmt))


def write_file(path: Path, rows: Iterable[dict], fmt: str, types: dict | None = None) -> None:
    """Write `rows` to `path` in `fmt` (a value of FORMATS), in place. `types` (Parquet): an Arrow type
    for some columns (the caller checks that struct values have only the type's keys: Arrow drops the
    others); a column whose values do not convert to it is inferred as usual."""
    if fmt == "jsonl":
        _write_jsonl(path, rows)
    elif fmt == "json":
        path.write_text(json.dumps(list(rows), ensure_ascii=False, indent=1) + "\n", "utf-8")
    elif fmt == "csv":
        _write_csv(path, list(rows))
    else:
        _write_parquet(path, list(rows), types or {})


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")  # default: Parquet dates, ...


def _write_csv(path: Path, rows: list[dict]) -> None:
    cols: dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(r))
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(cols))
        w.writeheader()
        for r in rows:
            w.writerow({k: v if isinstance(v, str) or v is None else json.dumps(v, ensure_ascii=False)
                        for k, v in r.items()})


def _write_parquet(path: Path, rows: list[dict], types: dict) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("Parquet needs pyarrow: pip install 'qguard[data]'") from None
    cols: dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(r))
    arrays = {}
    for c in cols:
        values = [r.get(c) for r in rows]
        if c in types:
            try:
                arrays[c] = pa.array(values, types[c])
                continue
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                pass
        try:  # each column inferred from all its values (from_pylist would use the first row only)
            arrays[c] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # mixed types (e.g. a bad row's number where others have text): keep every value, as JSON text
            arrays[c] = pa.array([None if v is None else json.dumps(v, ensure_ascii=False, default=str)
                                  for v in values], pa.string())
    pq.write_table(pa.Table.from_pydict(arrays), path)
