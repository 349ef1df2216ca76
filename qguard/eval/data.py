"""Read evaluation files in the canonical JSONL schema (../shared/data/README.md) and check every row.

A bad row is reported by file and line: eval numbers built on silently skipped rows would be wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qguard.data import schema
from qguard.data.jsonl import read_jsonl
from qguard.errors import InputError, LabelError
from qguard.messages import Message

GOLD_LABELS = tuple(s.value for s in schema.GOLD_LABELS)  # ("Safe", "Unsafe"): benchmarks have no Controversial
TASKS = schema.TASKS


@dataclass(frozen=True)
class Sample:
    """One evaluation row, validated."""

    id: str
    benchmark: str
    task: str  # "prompt" | "response"
    messages: list[Message]
    label: str  # gold: "Safe" | "Unsafe"
    categories: tuple[str, ...]
    refusal: bool | None
    lang: str
    collection_label: bool  # the source labels the whole collection, not each row
    unsafe_span: tuple[int, int] | None  # [start, end) characters in the judged assistant text

    @property
    def judged_text(self) -> str:
        return self.messages[-1]["content"]


def parse_row(row: Any, benchmark: str, where: str) -> Sample:
    """Validate one decoded JSON object (`qguard.data.schema`, with eval's rules: an `id` on every row,
    gold Safe or Unsafe, a non-empty `unsafe_span`); `where` is "file:line" for error messages."""
    try:
        r = schema.parse_row(row, where, labels=schema.GOLD_LABELS, require_id=True, empty_span=False)
    except LabelError as e:  # a bad eval file is the user's input, whatever part of it is wrong
        raise InputError(str(e)) from None
    return Sample(
        id=r.id, benchmark=benchmark, task=r.task, messages=list(r.messages), label=r.label.value,
        categories=tuple(c.value for c in r.categories), refusal=r.refusal, lang=r.lang or "unknown",
        collection_label=r.collection_label, unsafe_span=r.unsafe_span,
    )


def read_benchmark(path: Path) -> list[Sample]:
    """All rows of one JSONL file; the benchmark name is the file stem."""
    samples = [parse_row(row, path.stem, where) for where, row in read_jsonl(path)]
    if not samples:
        raise InputError(f"{path}: no rows")
    tasks = {s.task for s in samples}
    if len(tasks) > 1:
        raise InputError(f"{path}: mixes prompt and response rows; one task per benchmark file")
    return samples


def find_files(data: Path) -> dict[str, Path]:
    """{benchmark name: file} for a directory of *.jsonl files, or a single file."""
    if not data.exists():
        raise InputError(f"--data: no such file or directory: {data}")
    if data.is_file():
        if data.suffix != ".jsonl":
            raise InputError(f"--data: {data} is not a .jsonl file")
        return {data.stem: data}
    files = {p.stem: p for p in sorted(data.glob("*.jsonl"))}
    if not files:
        raise InputError(f"--data: {data} holds no .jsonl files")
    return files


def subsample(samples: Sequence[Sample], limit: int | None) -> list[Sample]:
    """At most `limit` rows, evenly spaced over the file.

    Eval files are often sorted by label or source; the first N rows could all be one class, so a quick
    run takes every k-th row instead. Deterministic: the same limit always picks the same rows.
    """
    n = len(samples)
    if limit is None or limit >= n:
        return list(samples)
    return [samples[(i * n) // limit] for i in range(limit)]
