"""Reading JSONL files the one way qguard does it (eval data, training data, annotate's input).

Lines end at "\\n" only: str.splitlines() would also break at U+2028, U+0085 ..., which JSON strings
written with ensure_ascii=False may hold verbatim. Blank lines are not records. A UTF-8 BOM may open the
file (Excel and some editors write one).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qguard.errors import InputError


def _lines(path: Path, start: tuple[int, int] = (0, 1)) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of every non-blank line from `start` (byte offset, its line number)."""
    try:
        f = path.open("rb")
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        f.seek(start[0])
        for n, raw in enumerate(f, start[1]):
            if raw.strip():
                yield n, raw


def line_starts(path: str | Path, every: int) -> tuple[int, list[tuple[int, int]]]:
    """(records, starts): the number of non-blank lines and, for every `every`-th of them from the first,
    (byte offset, line number), so that `iter_jsonl(path, start=...)` can begin there without reading
    what comes before (qguard.data.formats.slices)."""
    p = Path(path)
    n, pos, starts = 0, 0, []
    try:
        f = p.open("rb")
    except OSError as e:
        raise InputError(f"{p}: cannot read ({e.strerror})") from None
    with f:
        for line, raw in enumerate(f, 1):
            if raw.strip():
                if n % every == 0:
                    starts.append((pos, line))
                n += 1
            pos += len(raw)
    return n, starts


def _decode(raw: bytes, n: int) -> Any:
    return json.loads(raw.decode("utf-8-sig" if n == 1 else "utf-8"))  # a BOM may open the file


def read_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
    """("file:line", object) for every non-blank line; InputError naming file:line for bad UTF-8 or JSON."""
    p = Path(path)
    for n, raw in _lines(p):
        where = f"{p}:{n}"
        try:
            yield where, _decode(raw, n)
        except UnicodeDecodeError:
            raise InputError(f"{where}: not UTF-8 text") from None
        except ValueError as e:
            raise InputError(f"{where}: not valid JSON ({e})") from None


def iter_jsonl(path: str | Path, start: tuple[int, int] = (0, 1)) -> Iterator[tuple[str, Any, str | None]]:
    """("file:line", object, None) for every non-blank line, or ("file:line", None, reason) for a line
    that is not a JSON value: a reader that reports bad rows and goes on (annotate) instead of stopping.

    The reason names no position inside the line, so equal problems count as one in a summary. A file
    that cannot be opened still raises InputError. `start`: begin at a line found by `line_starts`.
    """
    p = Path(path)
    for n, raw in _lines(p, start):
        where = f"{p}:{n}"
        try:
            obj = _decode(raw, n)
        except UnicodeDecodeError:
            yield where, None, "line is not UTF-8"
        except ValueError as e:  # JSONDecodeError has .msg; int-size limits etc. are plain ValueErrors
            yield where, None, f"line is not valid JSON ({getattr(e, 'msg', e)})"
        else:
            yield where, obj, None
