"""Read evaluation files in the canonical JSONL schema (../shared/data/README.md) and check every row.

A bad row is reported by file and line: eval numbers built on silently skipped rows would be wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qguard.errors import InputError, LabelError
from qguard.jsonl import read_jsonl
from qguard.policy import parse_category
from qguard.tokenizer import Message, check_messages

GOLD_LABELS = ("Safe", "Unsafe")
TASKS = ("prompt", "response")


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


def _field(row: dict[str, Any], key: str, types: type | tuple[type, ...], where: str) -> Any:
    if key not in row:
        raise InputError(f"{where}: missing field {key!r}")
    if not isinstance(row[key], types):
        raise InputError(f"{where}: field {key!r} has the wrong type ({type(row[key]).__name__})")
    return row[key]


def _span(row: dict[str, Any], text: str, where: str) -> tuple[int, int] | None:
    span = row.get("unsafe_span")
    if span is None:
        return None
    ok = (isinstance(span, list) and len(span) == 2 and all(isinstance(x, int) for x in span)
          and 0 <= span[0] < span[1] <= len(text))
    if not ok:
        raise InputError(f"{where}: unsafe_span must be [start, end) with 0 <= start < end <= {len(text)}")
    if row["task"] != "response":
        raise InputError(f"{where}: unsafe_span is only meaningful on response rows")
    return span[0], span[1]


def parse_row(row: Any, benchmark: str, where: str) -> Sample:
    """Validate one decoded JSON object; `where` is "file:line" for error messages."""
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object")
    sid = _field(row, "id", (str, int), where)
    task = _field(row, "task", str, where)
    if task not in TASKS:
        raise InputError(f"{where}: task must be 'prompt' or 'response', got {task!r}")
    label = _field(row, "label", str, where)
    if label not in GOLD_LABELS:
        raise InputError(f"{where}: label must be 'Safe' or 'Unsafe', got {label!r}")
    try:
        messages = check_messages(_field(row, "messages", list, where))
    except InputError as e:
        raise InputError(f"{where}: {e}") from None
    want = "user" if task == "prompt" else "assistant"
    if messages[-1]["role"] != want:
        raise InputError(f"{where}: a {task} row must end with a {want} message")
    if not isinstance(row.get("categories") or [], list):
        raise InputError(f"{where}: categories must be a list of names, got {type(row['categories']).__name__}")
    try:
        cats = tuple(parse_category(c).value for c in row.get("categories") or [])
    except LabelError as e:
        raise InputError(f"{where}: {e}") from None
    refusal = row.get("refusal")
    if refusal is not None and not isinstance(refusal, bool):
        raise InputError(f"{where}: refusal must be true, false or null")
    basis = (row.get("source_labels") or {}).get("label_basis") if isinstance(row.get("source_labels"), dict) else None
    return Sample(
        id=str(sid), benchmark=benchmark, task=task, messages=messages, label=label, categories=cats,
        refusal=refusal, lang=str(row.get("lang") or "unknown"), collection_label=basis == "collection",
        unsafe_span=_span(row, messages[-1]["content"], where),
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
