"""qguard.data: one row schema for training and eval, the JSONL readers, the record formats (annotate)."""

from __future__ import annotations

import json

import pytest

from qguard.data.formats import count_rows, read_records, write_output
from qguard.data.jsonl import iter_jsonl, read_jsonl
from qguard.data.schema import GOLD_LABELS, Row, iter_rows, parse_row
from qguard.errors import InputError, LabelError
from qguard.policy import Category, Severity

EVAL = dict(labels=GOLD_LABELS, require_id=True, empty_span=False)  # what qguard.eval.data asks for


def response(**kw) -> dict:
    row = {"id": "x/1", "task": "response", "label": "Unsafe", "categories": ["Violent"],
           "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "here is how"}]}
    return {**row, **kw}


def test_one_row_type_for_training_and_eval_rules():
    obj = response(categories=["Violent", "violence", "PII"], refusal=False, lang="en", source="s",
                   unsafe_span=[5, 11], source_labels={"label_basis": "collection", "hard_negative": True})
    row = parse_row(obj, "f.jsonl:3")
    assert row == parse_row(obj, "f.jsonl:3", **EVAL)  # the two readers see the same row
    assert isinstance(row, Row) and row.label is Severity.UNSAFE and row.text == "here is how"
    assert row.categories == (Category.VIOLENT, Category.PII)  # aliases fold, duplicates go
    assert row.unsafe_span == (5, 11) and row.collection_label and row.hard_negative and row.refusal is False
    assert parse_row({k: v for k, v in obj.items() if k != "id"}, "f.jsonl:3").id == "f.jsonl:3"


def test_what_training_accepts_and_eval_refuses():
    assert parse_row(response(label="Controversial"), "t:1").label is Severity.CONTROVERSIAL
    with pytest.raises(LabelError, match=r"^e:1: label must be 'Safe' or 'Unsafe', got 'Controversial'$"):
        parse_row(response(label="Controversial"), "e:1", **EVAL)
    with pytest.raises(LabelError, match=r"^e:1: label must be 'Safe' or 'Unsafe', got 'Maybe'$"):
        parse_row(response(label="Maybe"), "e:1", **EVAL)
    with pytest.raises(LabelError, match=r"^t:1: unknown risk level 'Maybe'"):  # the taxonomy's own words
        parse_row(response(label="Maybe"), "t:1")
    no_id = {k: v for k, v in response().items() if k != "id"}
    with pytest.raises(InputError, match=r"^e:1: missing field 'id'$"):
        parse_row(no_id, "e:1", **EVAL)
    with pytest.raises(InputError, match=r"^e:1: field 'id' has the wrong type \(list\)$"):
        parse_row(response(id=[1]), "e:1", **EVAL)
    # training reads where a span starts, so an empty one marks a boundary; eval scores its tokens
    assert parse_row(response(unsafe_span=[4, 4]), "t:1").unsafe_span == (4, 4)
    with pytest.raises(InputError, match=r"^e:1: unsafe_span must be \[start, end\) inside the judged text "
                                         r"\(0 <= start < end <= 11\), got \[4, 4\]$"):
        parse_row(response(unsafe_span=[4, 4]), "e:1", **EVAL)


@pytest.mark.parametrize("rules", [{}, EVAL], ids=["train", "eval"])
def test_bad_rows_name_their_place_under_both_rules(rules):
    prompt = {"id": "p", "task": "prompt", "label": "Safe", "messages": [{"role": "user", "content": "hi"}]}
    for bad, error, msg in [
        ([1, 2], InputError, "expected a JSON object, got list"),
        ({"id": "p", "task": "prompt", "label": "Safe"}, InputError, "missing field 'messages'"),
        (dict(prompt, task="chat"), InputError, "task must be 'prompt' or 'response', got 'chat'"),
        (dict(prompt, messages="hi"), InputError, "messages must be a non-empty list"),
        (response(messages=[{"role": "user", "content": "q"}]), InputError,
         "a response row must end with a assistant message, not user"),
        (dict(prompt, categories="Violent"), InputError, "categories must be a list of names, got str"),
        (response(categories=["Weather"]), LabelError, "unknown category 'Weather'"),
        (response(categories=[7]), LabelError, "unknown category '7'"),  # a number, not a traceback
        (response(categories=["Jailbreak"]), LabelError, "'Jailbreak' is a prompt-only category"),
        (response(refusal="yes"), InputError, "refusal must be true, false or null"),
        (response(unsafe_span=[3, 99]), InputError, r"unsafe_span must be \[start, end\) inside the judged text"),
        (dict(prompt, unsafe_span=[0, 1]), InputError, "unsafe_span is only meaningful on response rows"),
    ]:
        with pytest.raises(error, match=msg) as e:
            parse_row(bad, "f.jsonl:7", **rules)
        assert str(e.value).startswith("f.jsonl:7: "), str(e.value)
    # source_labels that are not an object carry nothing, and do not break the row
    assert not parse_row(dict(prompt, source_labels=["x"]), "f.jsonl:7", **rules).collection_label


def test_iter_jsonl_reports_bad_lines_and_goes_on(tmp_path):
    p = tmp_path / "rows.jsonl"
    lines = [b'\xef\xbb\xbf{"a": 1}', b"", b"{oops", b'"\xff"', b"1" * 5000, '{"t": "a\u2028b"}'.encode()]
    p.write_bytes(b"\n".join(lines) + b"\n")
    got = list(iter_jsonl(p))
    assert [w for w, _, _ in got] == [f"{p}:{n}" for n in (1, 3, 4, 5, 6)]  # blank lines are not rows
    assert [o for _, o, _ in got] == [{"a": 1}, None, None, None, {"t": "a\u2028b"}]
    reasons = [e for _, _, e in got]
    assert reasons[0] is None and reasons[4] is None
    assert reasons[1] == "line is not valid JSON (Expecting property name enclosed in double quotes)"
    assert reasons[2] == "line is not UTF-8"
    assert reasons[3].startswith("line is not valid JSON (Exceeds the limit")  # a ValueError without .msg
    with pytest.raises(InputError, match=rf"^{p}:3: not valid JSON \(Expecting property name"):
        list(read_jsonl(p))  # the strict reader stops at the first bad line, naming file:line
    with pytest.raises(InputError, match="cannot read"):
        list(iter_jsonl(tmp_path / "missing.jsonl"))


def test_iter_rows_validates_one_row_at_a_time(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text(json.dumps(response()) + "\n" + json.dumps(response(label="Controversial")) + "\n", "utf-8")
    rows = iter_rows(p, **EVAL)
    assert next(rows).label is Severity.UNSAFE  # the first row is ready before the second is read
    with pytest.raises(LabelError, match=rf"^{p}:2: label must be"):
        next(rows)


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv", ".parquet"])
def test_records_round_trip_through_every_format(tmp_path, ext):
    records = [{"id": i, "prompt": f"p{i} \u2028 ü", "guard": {"label": "Safe", "n": i}} for i in range(5)]
    path = tmp_path / f"out{ext}"
    write_output(path, (r for r in records))  # any iterable, not only a list
    assert sorted(q.name for q in tmp_path.iterdir()) == [path.name]  # no temporary file left
    assert count_rows(path) == 5
    got = [r for r, err in read_records(path, skip=2) if err is None]
    if ext == ".csv":  # CSV cells are text: nested values are JSON text
        got = [{"id": int(r["id"]), "prompt": r["prompt"], "guard": json.loads(r["guard"])} for r in got]
    assert got == records[2:]
