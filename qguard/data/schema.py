"""The canonical row schema (../shared/data/README.md): one `Row` and one validator for every reader.

Training (`qguard.train.data`) and evaluation (`qguard.eval.data`) read the same JSONL records. They differ
only in what they accept, which each passes to `parse_row`:
- `labels`: the gold labels allowed (training: all three risk levels; eval: Safe and Unsafe, since the
  benchmarks have no Controversial class);
- `require_id`: eval rows must carry their own `id` (results are joined on it); a training row without one
  is named by its place;
- `empty_span`: training reads only where an `unsafe_span` starts, so [s, s) is allowed; eval scores the
  span's tokens and needs at least one character.

Every error names the place ("file:line") first. Taxonomy problems (an unknown label or category, a label
outside `labels`, a prompt-only category on a response) raise LabelError; everything else InputError.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qguard.data.jsonl import read_jsonl
from qguard.errors import InputError, LabelError
from qguard.messages import check_messages
from qguard.taxonomy import SEVERITIES, Category, Severity, parse_category, parse_severity

TASKS = ("prompt", "response")
ALL_LABELS: tuple[Severity, ...] = SEVERITIES  # what training accepts
GOLD_LABELS: tuple[Severity, ...] = (Severity.SAFE, Severity.UNSAFE)  # what an eval benchmark may hold


@dataclass(frozen=True)
class Row:
    """One canonical JSONL record, validated."""

    id: str
    task: str  # "prompt" | "response"
    messages: tuple[dict, ...]
    label: Severity
    categories: tuple[Category, ...] = ()
    refusal: bool | None = None
    lang: str = ""
    source: str = ""
    unsafe_span: tuple[int, int] | None = None  # [start, end) chars in the judged assistant text
    hard_negative: bool = False  # benign text with risky-looking words (source_labels.hard_negative)
    collection_label: bool = False  # the source labels the whole collection, not each row (label_basis)

    @property
    def text(self) -> str:
        """The judged turn's text (the last message)."""
        return self.messages[-1]["content"]


def parse_row(obj: object, where: str, *, labels: Collection[Severity] = ALL_LABELS, require_id: bool = False,
              empty_span: bool = True) -> Row:
    """Validate one decoded JSON object; raise InputError/LabelError naming `where` (file:line)."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if require_id:
        if "id" not in obj:
            raise InputError(f"{where}: missing field 'id'")
        if not isinstance(obj["id"], (str, int)):
            raise InputError(f"{where}: field 'id' has the wrong type ({type(obj['id']).__name__})")
    for key in ("task", "messages", "label"):
        if key not in obj:
            raise InputError(f"{where}: missing field {key!r}")
    task = obj["task"]
    if task not in TASKS:
        raise InputError(f"{where}: task must be 'prompt' or 'response', got {task!r}")
    try:
        msgs = check_messages(obj["messages"])
    except InputError as e:
        raise InputError(f"{where}: {e}") from None
    want = "user" if task == "prompt" else "assistant"
    if msgs[-1]["role"] != want:
        raise InputError(f"{where}: a {task} row must end with a {want} message, not {msgs[-1]['role']}")
    if not isinstance(obj.get("categories") or [], list):
        raise InputError(f"{where}: categories must be a list of names, got {type(obj['categories']).__name__}")
    label = _label(obj["label"], labels, where)
    try:
        cats = tuple(dict.fromkeys(parse_category(str(c)) for c in obj.get("categories") or ()))
    except LabelError as e:
        raise LabelError(f"{where}: {e}") from None
    if task == "response" and Category.JAILBREAK in cats:
        raise LabelError(f"{where}: 'Jailbreak' is a prompt-only category, found on a response row")
    refusal = obj.get("refusal")
    if refusal is not None and not isinstance(refusal, bool):
        raise InputError(f"{where}: refusal must be true, false or null")
    source_labels = obj.get("source_labels")
    if not isinstance(source_labels, dict):
        source_labels = {}
    return Row(id=str(obj.get("id", where)), task=task, messages=tuple(msgs), label=label, categories=cats,
               refusal=refusal, lang=str(obj.get("lang") or ""), source=str(obj.get("source") or ""),
               unsafe_span=_span(obj.get("unsafe_span"), task, len(msgs[-1]["content"]), empty_span, where),
               hard_negative=bool(source_labels.get("hard_negative")),
               collection_label=source_labels.get("label_basis") == "collection")


def _label(raw: object, labels: Collection[Severity], where: str) -> Severity:
    try:
        label = parse_severity(str(raw))
    except LabelError as e:
        if set(labels) >= set(SEVERITIES):  # the taxonomy's own message lists what is known
            raise LabelError(f"{where}: {e}") from None
        label = None
    if label not in labels:
        allowed = [s.value for s in SEVERITIES if s in labels]
        raise LabelError(f"{where}: label must be {' or '.join(map(repr, allowed))}, got {raw!r}")
    return label


def _span(raw: object, task: str, n: int, empty: bool, where: str) -> tuple[int, int] | None:
    if raw is None:
        return None
    ok = isinstance(raw, (list, tuple)) and len(raw) == 2 and all(isinstance(x, int) for x in raw)
    if not ok or not (0 <= raw[0] <= raw[1] <= n if empty else 0 <= raw[0] < raw[1] <= n):
        rule = "<=" if empty else "<"
        raise InputError(f"{where}: unsafe_span must be [start, end) inside the judged text "
                         f"(0 <= start {rule} end <= {n}), got {raw!r}")
    if task != "response":
        raise InputError(f"{where}: unsafe_span is only meaningful on response rows")
    return (raw[0], raw[1])


def iter_rows(path: str | Path, **rules: Any) -> Iterator[Row]:
    """The rows of one JSONL file, one at a time (`rules`: `parse_row`'s keywords). Blank lines are
    skipped; anything else malformed is an error naming file:line."""
    for where, obj in read_jsonl(path):
        yield parse_row(obj, where, **rules)


def read_rows(path: str | Path) -> list[Row]:
    """All training rows of one JSONL file. Blank lines are skipped; anything else malformed is an error."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"training data file not found: {p}")
    return list(iter_rows(p))


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; directories expand to their *.jsonl files (sorted)."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(p.glob("*.jsonl"))
            if not found:
                raise InputError(f"{p}: no *.jsonl files in this directory")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise InputError(f"training data not found: {p}")
    return out


def guard_against_eval(paths: Sequence[Path]) -> None:
    """Refuse files under an `eval` folder: evaluation data must never be trained on."""
    for p in paths:
        if "eval" in p.resolve().parts:
            raise InputError(f"{p} is in an eval/ folder; evaluation data is never used for training")
