"""The eval reader of the row schema: bad rows name their file, line and field."""

from __future__ import annotations

import json

import pytest

from qguard.errors import InputError
from qguard.eval.data import parse_row, read_benchmark

S, U, C = "Safe", "Unsafe", "Controversial"

# gold and three-tier predictions used by several tests
GOLD = [U, U, U, S, S, S, U, S]
PRED = [U, C, S, C, S, U, U, S]


# ------------------------------------------------------------------------------ data and suites

def _row(**kw):
    r = {"id": "x/0", "task": "prompt", "messages": [{"role": "user", "content": "hello"}], "label": "Safe"}
    return {**r, **kw}


def test_parse_row_errors_name_the_place():
    for bad, msg in [
        (_row(label="Maybe"), "label must be"),
        (_row(task="chat"), "task must be"),
        (_row(messages=[{"role": "assistant", "content": "x"}]), "must end with a user message"),
        (_row(categories=["Weather"]), "unknown category"),
        ({"task": "prompt"}, "missing field 'id'"),
        (_row(task="response", messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "abc"}],
              unsafe_span=[2, 9]), "unsafe_span"),
    ]:
        with pytest.raises(InputError, match=msg) as ei:
            parse_row(bad, "b", "f.jsonl:7")
        assert str(ei.value).startswith("f.jsonl:7:")


def test_read_benchmark_reports_file_and_line(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text(json.dumps(_row()) + "\n\n{not json\n", "utf-8")
    with pytest.raises(InputError, match=r"mine\.jsonl:3: not valid JSON"):
        read_benchmark(p)
    p.write_text(json.dumps(_row()) + "\n" + json.dumps(_row(source_labels={"label_basis": "collection"})) + "\n")
    rows = read_benchmark(p)
    assert [r.collection_label for r in rows] == [False, True] and rows[0].benchmark == "mine"
    # a raw U+2028 / U+0085 inside a JSON string is not a line break (splitlines() would say it is)
    odd = _row(messages=[{"role": "user", "content": "a\u2028b\x85c"}])
    p.write_text(json.dumps(odd, ensure_ascii=False) + "\r\n", "utf-8")
    assert read_benchmark(p)[0].messages[0]["content"] == "a\u2028b\x85c"
