"""Reading JSONL files the one way qguard does it (eval data, training data)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qguard.errors import InputError


def read_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
    """("file:line", object) for every non-blank line; InputError naming file:line for bad UTF-8 or JSON.

    Lines end at "\\n" only: str.splitlines() would also break at U+2028, U+0085 ..., which JSON strings
    written with ensure_ascii=False may hold verbatim.
    """
    p = Path(path)
    try:
        f = p.open("rb")
    except OSError as e:
        raise InputError(f"{p}: cannot read ({e.strerror})") from None
    with f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{p}:{n}"
            try:
                yield where, json.loads(raw.decode("utf-8-sig" if n == 1 else "utf-8"))  # a BOM may open the file
            except UnicodeDecodeError:
                raise InputError(f"{where}: not UTF-8 text") from None
            except ValueError as e:
                raise InputError(f"{where}: not valid JSON ({e})") from None
