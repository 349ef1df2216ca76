"""Dataset annotation: read JSONL / CSV / Parquet rows, moderate them in batches, write rows + `guard`.

Resumable by construction: results are appended, in input order, to `OUTPUT.partial.jsonl` (one line
per input row, flushed and fsynced per batch) after a header line describing the run. Re-running the
same command after a crash or a hard kill reads the partial file, drops a torn last line, and
continues at the first row without a result; the final OUTPUT (JSONL, a JSON array for `.json`, CSV
or Parquet, by extension)
and `OUTPUT.errors.jsonl` are only written, atomically, once every row has its line. So the output
holds every input row exactly once, in input order (with `filter`, exactly the matching ones). A partial
file of another format version (an older qguard's, whose `guard` objects lack fields) is refused with a
message saying so: its rows cannot be mixed with new ones (`restart` starts over).

Each row's conversation is found by `FieldMap`: by default a `messages` or `conversation` list, else
`prompt` (+ `response`) columns. Its `guard` object is `Verdict.to_dict()` plus `model`, the same object
`qguard classify --json` prints.

Bad rows (missing fields, non-text content, unreadable lines, conversations that are too long) are
never dropped silently: they are listed with their 1-based row number and the reason in the errors
file and counted in the summary; without `filter` they also stay in the output, with `guard.error`.
Message content is never logged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from qguard.data.formats import atomic_write, count_rows, file_format, read_records, write_output
from qguard.errors import InputError, check_int
from qguard.policy import Mode, Policy, Severity, Verdict

# 2: the `guard` object is Verdict.to_dict() (+ model), and rows are read by FieldMap's default columns
PARTIAL_VERSION = 2


class Classifier(Protocol):
    """What annotation needs from a backend (`Guard`, `qguard.backends.vllm.VLLMGenBackend`)."""

    name: str

    def classify_conversations(self, convs: Sequence[Sequence[dict]], *,
                               return_errors: bool = False) -> list[Verdict | InputError]: ...


# Columns read when no field is named, in this order (see FieldMap).
MESSAGES_FIELDS = ("messages", "conversation")
PROMPT_FIELD, RESPONSE_FIELD = "prompt", "response"


@dataclass(frozen=True)
class FieldMap:
    """Where a row's conversation is.

    - `messages_field`: that field holds a list of {role, content} (the last message is judged).
    - `prompt_field`: the conversation is one user turn, plus an assistant turn from `response_field`
      when given (then the response is judged).
    - neither (the default): each row is read from the common column names, in this order: a `messages`
      or `conversation` list; else `prompt`, with `response` when the row has one that is not null. A row
      with both a message list and `prompt`/`response` is read from its list; name the fields to choose.
    A named field that a row lacks is an error for that row.
    """

    messages_field: str | None = None
    prompt_field: str | None = None
    response_field: str | None = None

    def __post_init__(self) -> None:
        for name in ("messages_field", "prompt_field", "response_field"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise InputError(f"{name} must be a column name, got {v!r}")
        if self.response_field and not self.prompt_field:
            raise InputError("--response-field needs --prompt-field")
        if self.messages_field and self.prompt_field:
            raise InputError("give --messages-field or --prompt-field (with --response-field), not both")

    def conversation(self, row: Any) -> list[dict]:
        """The row's conversation; raises InputError naming the field (never the content)."""
        if not isinstance(row, dict):
            raise InputError(f"row is a JSON {type(row).__name__}, not an object")
        if self.prompt_field:
            return _turns(row, self.prompt_field, self.response_field)
        if self.messages_field:
            return _messages(row, self.messages_field)
        for name in MESSAGES_FIELDS:
            if row.get(name) is not None:
                return _messages(row, name)
        if row.get(PROMPT_FIELD) is not None:
            return _turns(row, PROMPT_FIELD, RESPONSE_FIELD if row.get(RESPONSE_FIELD) is not None else None)
        raise InputError(
            "no conversation in the row: expected a 'messages' or 'conversation' list, or a 'prompt' field "
            "(with an optional 'response'); name other columns with --messages-field or --prompt-field"
            + (" ('response' alone is not enough: it needs its 'prompt')" if row.get(RESPONSE_FIELD) is not None else "")
        )


def _turns(row: dict, prompt_field: str, response_field: str | None) -> list[dict]:
    msgs = [{"role": "user", "content": _text(row, prompt_field)}]
    if response_field:
        msgs.append({"role": "assistant", "content": _text(row, response_field)})
    return msgs


def _messages(row: dict, name: str) -> list[dict]:
    if name not in row or row[name] is None:
        raise InputError(f"missing field {name!r}")
    msgs = row[name]
    if isinstance(msgs, str):  # CSV cells carry the list as JSON text
        try:
            msgs = json.loads(msgs)
        except ValueError:
            raise InputError(f"field {name!r} is text but not a JSON list of messages") from None
    if not isinstance(msgs, list) or not msgs:
        raise InputError(f"field {name!r} must be a non-empty list of {{role, content}}")
    return msgs


def _text(row: dict, name: str) -> str:
    if name not in row or row[name] is None:
        raise InputError(f"missing field {name!r}")
    v = row[name]
    if not isinstance(v, str):
        raise InputError(f"field {name!r} must be text, got {type(v).__name__}")
    if not v.strip():
        raise InputError(f"field {name!r} is empty")
    return v


# ------------------------------------------------------------------------------------------ results

def guard_object(v: Verdict, model: str) -> dict[str, Any]:
    """A row's `guard` object: `Verdict.to_dict()` (the serialisation of `classify --json` and HTTP) and
    the model that gave it."""
    return {**v.to_dict(), "model": model}


def matches(v: Verdict | None, want: str | None) -> bool:
    """Whether a row is kept by `filter` (an unreadable model answer counts as Unsafe, never Safe)."""
    if want is None:
        return True
    if v is None:
        return False
    return v.binary is (Severity.SAFE if want == "safe" else Severity.UNSAFE)


def run_policy(classifier: Classifier, mode: Mode) -> Policy | None:
    """The policy that verdicts are read under: the classifier's own, in `mode` (None: already so)."""
    own = getattr(classifier, "policy", None)
    if isinstance(own, Policy):
        return None if own.mode is mode else dataclasses.replace(own, mode=mode)
    return Policy(mode=mode)


# ------------------------------------------------------------------------------------------ the run

@dataclass
class RunConfig:
    """Everything that must be equal for a re-run to continue a partial one."""

    input: str
    output: str
    model: str
    mode: str
    filter: str | None
    fields: dict[str, Any]
    input_size: int
    version: int = PARTIAL_VERSION


@dataclass
class Summary:
    rows: int = 0
    written: int = 0
    errors: int = 0
    resumed_from: int = 0
    labels: dict[str, int] = field(default_factory=dict)
    error_rows: list[int] = field(default_factory=list)  # first few, for the message
    output: str = ""
    errors_file: str | None = None
    error_reasons: dict[str, int] = field(default_factory=dict)  # the most common reasons, with their counts

    @property
    def all_failed(self) -> bool:
        """Every row failed: the input (or the field names) is almost certainly not what was meant."""
        return self.rows > 0 and self.errors == self.rows

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def partial_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial.jsonl")


def errors_path(output: Path) -> Path:
    return output.with_name(output.name + ".errors.jsonl")


def _open_partial(path: Path, cfg: RunConfig, restart: bool) -> int:
    """Rows already done in a partial file of the same run (0 for a new run); repairs a torn tail."""
    if restart or not path.exists():
        path.write_text(json.dumps({"qguard_annotate": asdict(cfg)}) + "\n", "utf-8")
        return 0
    data = path.read_bytes()
    if not data.endswith(b"\n"):  # a hard kill mid-write: the last line is incomplete, drop it
        data = data[: data.rfind(b"\n") + 1]
        with path.open("r+b") as f:
            f.truncate(len(data))
    lines = data.splitlines()
    try:
        header = json.loads(lines[0])["qguard_annotate"]
        version = header.get("version")
    except (IndexError, ValueError, KeyError, TypeError, AttributeError):
        raise InputError(f"{path} is not a qguard partial file; delete it or pass --restart") from None
    if isinstance(version, int) and version != PARTIAL_VERSION:
        # its rows carry the old, smaller `guard` object (no action, category_probs, unsafe_position,
        # n_tokens): continuing would give one output two schemas, and the missing values need the model
        raise InputError(f"{path} was written by another qguard version (partial format {version}; this one "
                         f"writes {PARTIAL_VERSION}, whose `guard` objects carry more fields), so its rows cannot "
                         "be continued: finish it with the qguard that started it, or pass --restart to "
                         "annotate again from the first row")
    if header != asdict(cfg):
        diff = sorted(k for k in header.keys() | asdict(cfg).keys() if header.get(k) != asdict(cfg).get(k))
        raise InputError(f"{path} belongs to a different run (differs in: {', '.join(diff)}); "
                         "re-run the same command to continue it, or pass --restart to start over")
    return len(lines) - 1


def annotate(classifier: Classifier, input: str | Path, output: str | Path, *, fields: FieldMap = FieldMap(),
             mode: Mode | str = Mode.STRICT, filter: str | None = None, batch_size: int = 64,
             restart: bool = False, progress: bool = True) -> Summary:
    """Annotate every row of `input` into `output` (see the module docstring)."""
    inp, out = Path(input), Path(output)
    if not isinstance(fields, FieldMap):
        raise InputError(f"fields must be a qguard.annotate.FieldMap, got {type(fields).__name__}")
    mode, batch_size = Mode(mode), check_int(batch_size, "batch_size")
    if not inp.is_file():
        raise InputError(f"no such input file: {inp}")
    file_format(inp), file_format(out)
    if filter not in (None, "safe", "unsafe"):
        raise InputError("--filter must be safe or unsafe")
    if inp.resolve() == out.resolve():
        raise InputError("OUTPUT must differ from INPUT")
    cfg = RunConfig(str(inp.resolve()), str(out.resolve()), classifier.name, mode.value, filter,
                    asdict(fields), inp.stat().st_size)
    total = count_rows(inp)  # an unreadable input fails here, before a partial file exists
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the output folder {out.parent} ({e.strerror})") from None
    part = partial_path(out)
    done = _open_partial(part, cfg, restart)
    if done > total:
        raise InputError(f"{part} has more rows ({done}) than {inp} ({total}); pass --restart")
    _process(classifier, inp, part, fields, filter, run_policy(classifier, mode), done, total, batch_size, progress)
    return _finalize(part, out, filter, done, total)


def _process(classifier, inp: Path, part: Path, fields: FieldMap, filter: str | None, policy: Policy | None,
             done: int, total: int, batch_size: int, progress: bool) -> None:
    from tqdm import tqdm

    bar = tqdm(total=total, initial=done, unit="row", file=sys.stderr, disable=not progress,
               dynamic_ncols=True, smoothing=0.1)
    with part.open("a", encoding="utf-8") as f:
        batch: list[tuple[int, Any, str | None]] = []
        for n, (row, err) in enumerate(read_records(inp, skip=done), start=done + 1):
            batch.append((n, row, err))
            if len(batch) >= batch_size:
                _write_batch(f, classifier, batch, fields, filter, policy)
                bar.update(len(batch))
                batch = []
        if batch:
            _write_batch(f, classifier, batch, fields, filter, policy)
            bar.update(len(batch))
    bar.close()


def _write_batch(f, classifier: Classifier, batch: list[tuple[int, Any, str | None]], fields: FieldMap,
                 filter: str | None, policy: Policy | None) -> None:
    items = judge_batch(classifier, batch, fields, filter, policy)
    f.write("".join(json.dumps(it, ensure_ascii=False, default=str) + "\n" for it in items))
    f.flush()
    os.fsync(f.fileno())


def judge_batch(classifier: Classifier, batch: list[tuple[int, Any, str | None]], fields: FieldMap,
                filter: str | None, policy: Policy | None) -> list[dict[str, Any]]:
    """One result per `(row number, record, read error)` of `batch`, in order:
    {"row", "keep" (by `filter`), "error" (None or why the row has no verdict), "record" (the row with its
    `guard` object)}. One engine call for the batch's readable rows (shared by `qguard.annotate_ray`)."""
    convs, where, errors = [], [], {}
    for j, (_n, row, err) in enumerate(batch):
        if err is None:
            try:
                convs.append(fields.conversation(row))
                where.append(j)
                continue
            except InputError as e:
                err = str(e)
        errors[j] = err
    verdicts: dict[int, Verdict] = {}
    for j, v in zip(where, classifier.classify_conversations(convs, return_errors=True) if convs else []):
        if isinstance(v, Exception):
            errors[j] = str(v)
        else:
            verdicts[j] = v if policy is None else policy.apply(v)
    items = []
    for j, (n, row, _) in enumerate(batch):
        v = verdicts.get(j)
        record = dict(row) if isinstance(row, dict) else {"_unreadable_row": n}
        record["guard"] = guard_object(v, classifier.name) if v is not None else {"error": errors[j]}
        items.append({"row": n, "keep": matches(v, filter), "error": errors.get(j), "record": record})
    return items


def _finalize(part: Path, out: Path, filter: str | None, done: int, total: int) -> Summary:
    rows, errs = [], []
    s = Summary(rows=total, resumed_from=done, output=str(out))
    n = 0
    with part.open(encoding="utf-8") as f:
        next(f)
        for n, line in enumerate(f, start=1):
            item = json.loads(line)
            if item["row"] != n:
                raise InputError(f"{part} is out of order at row {n}; pass --restart")
            if item["error"] is not None:
                errs.append({"row": n, "error": item["error"]})
            else:
                label = item["record"]["guard"]["label"]
                s.labels[label] = s.labels.get(label, 0) + 1
            if item["keep"]:
                rows.append(item["record"])
        if n != total:
            raise InputError(f"{part} holds {n} rows but {str(out)!r}'s input has {total}; pass --restart")
    try:
        write_output(out, rows)
    except Exception as e:  # the results stay safe in the partial file: say so instead of a traceback
        raise InputError(f"could not write {out} ({type(e).__name__}: {e}); every result is kept in {part}: "
                         "fix the problem and re-run the same command to write it") from None
    ep = errors_path(out)
    if errs:
        atomic_write(ep, lambda p: p.write_text("".join(json.dumps(e) + "\n" for e in errs), "utf-8"))
        s.errors_file = str(ep)
    elif ep.exists():
        ep.unlink()
    s.written, s.errors, s.error_rows = len(rows), len(errs), [e["row"] for e in errs[:20]]
    s.error_reasons = dict(Counter(e["error"] for e in errs).most_common(5))
    part.unlink()
    return s
