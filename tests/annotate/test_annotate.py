"""`qguard annotate`: formats, field mapping, filters, bad rows, progress, and resuming after a hard kill."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qguard.annotate import FieldMap, annotate, errors_path, partial_path
from qguard.errors import InputError
from tests.conftest import REPO
from tests.engine.test_gen_engine import conversations, trained_gen_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return trained_gen_checkpoint(tmp_path_factory.mktemp("annotate_model"))


@pytest.fixture(scope="module")
def guard(model_dir):
    from qguard.guard import Guard

    return Guard.from_pretrained(model_dir, device="cpu", max_new_tokens=24)


def rows(n: int, seed: int = 0) -> list[dict]:
    return [{"id": f"x/{i}", "task": "response" if c[-1]["role"] == "assistant" else "prompt", "messages": c}
            for i, c in enumerate(conversations(n, seed))]


def write_jsonl(path: Path, items: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in items), "utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def test_jsonl_rows_get_guard_objects_in_order(guard, tmp_path):
    data = rows(12)
    inp = write_jsonl(tmp_path / "in.jsonl", data)
    s = annotate(guard, inp, tmp_path / "out.jsonl", progress=False, batch_size=5)
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == [r["id"] for r in data]
    verdicts = guard.classify_conversations([r["messages"] for r in data])
    for r, v in zip(out, verdicts):
        g = r["guard"]
        assert r["messages"] == data[int(r["id"][2:])]["messages"]
        assert g["label"] == v.label.value and g["categories"] == [c.value for c in v.categories]
        assert g["refusal"] == v.refusal and g["model"] == guard.name
        assert set(g["probs"]) == {"Safe", "Unsafe", "Controversial"}
    assert s.rows == 12 and s.written == 12 and s.errors == 0
    assert not partial_path(tmp_path / "out.jsonl").exists() and not errors_path(tmp_path / "out.jsonl").exists()


def test_bad_rows_are_reported_never_dropped(guard, tmp_path):
    good = rows(3)
    items = [good[0], {"id": "nomsg"}, '{"id": "torn', {"id": "int", "messages": [{"role": "user", "content": 7}]},
             good[1], {"id": "role", "messages": [{"role": "bot", "content": "hi"}]}, [1, 2], good[2]]
    inp = write_jsonl(tmp_path / "in.jsonl", items)
    s = annotate(guard, inp, tmp_path / "out.jsonl", progress=False, batch_size=3)
    out = read_jsonl(tmp_path / "out.jsonl")
    assert len(out) == len(items)
    errs = read_jsonl(errors_path(tmp_path / "out.jsonl"))
    assert [e["row"] for e in errs] == [2, 3, 4, 6, 7] == s.error_rows and s.errors == 5
    assert "no conversation in the row" in errs[0]["error"] and "not valid JSON" in errs[1]["error"]
    assert "must be text" in errs[2]["error"] and "role" in errs[3]["error"]
    assert all(out[e["row"] - 1]["guard"]["error"] == e["error"] for e in errs)
    assert [out[i]["id"] for i in (0, 4, 7)] == [g["id"] for g in good]
    assert "label" in out[0]["guard"]


@pytest.mark.parametrize("mode", ["strict", "loose"])
def test_filter_keeps_matching_rows_per_mode(guard, tmp_path, mode):
    data = rows(16, seed=3)
    inp = write_jsonl(tmp_path / "in.jsonl", data)
    full = read_jsonl(_run(guard, inp, tmp_path / "all.jsonl", mode=mode))
    unsafe = read_jsonl(_run(guard, inp, tmp_path / "u.jsonl", mode=mode, filter="unsafe"))
    safe = read_jsonl(_run(guard, inp, tmp_path / "s.jsonl", mode=mode, filter="safe"))
    assert [r["id"] for r in unsafe] == [r["id"] for r in full if r["guard"]["binary"] == "Unsafe"]
    assert [r["id"] for r in safe] == [r["id"] for r in full if r["guard"]["binary"] == "Safe"]
    assert len(safe) + len(unsafe) == len(data) and unsafe and safe
    for r in full:
        lab = r["guard"]["label"]
        want = {"Safe": "Safe", "Unsafe": "Unsafe"}.get(lab, "Unsafe" if mode == "strict" else "Safe")
        assert r["guard"]["binary"] == (want if r["guard"]["error"] is None else "Unsafe")


def _run(guard, inp, out, **kw) -> Path:
    annotate(guard, inp, out, progress=False, **kw)
    return out


def test_csv_with_prompt_and_response_fields(guard, tmp_path):
    inp = tmp_path / "in.csv"
    with inp.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["q", "a", "note"])
        w.writerow(["how to bake a cake cake cake", "sure sure sure sure", "1"])
        w.writerow(["bomb bomb bomb", "", "2"])
        w.writerow(["vote vote vote", "sorry sorry sorry", "3"])
    s = annotate(guard, inp, tmp_path / "out.csv", fields=FieldMap(prompt_field="q", response_field="a"),
                 progress=False)
    with (tmp_path / "out.csv").open(newline="", encoding="utf-8") as f:
        out = list(csv.DictReader(f))
    assert [r["note"] for r in out] == ["1", "2", "3"]
    g = json.loads(out[0]["guard"])
    assert g["label"] in ("Safe", "Unsafe", "Controversial") and g["model"] == guard.name
    assert "is empty" in json.loads(out[1]["guard"])["error"] and s.error_rows == [2]
    v = guard.classify_response("how to bake a cake cake cake", "sure sure sure sure")
    assert g["label"] == v.label.value and g["refusal"] == v.refusal


def test_parquet_in_and_out(guard, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    data = rows(6, seed=9)
    pq.write_table(pa.Table.from_pylist(data), tmp_path / "in.parquet")
    annotate(guard, tmp_path / "in.parquet", tmp_path / "out.parquet", progress=False, batch_size=4)
    out = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["id"] for r in out] == [r["id"] for r in data]
    assert all(r["guard"]["label"] in ("Safe", "Unsafe", "Controversial") for r in out)


def test_parquet_output_keeps_bad_rows_of_another_type(guard, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    items = [*rows(2), {"id": "bad", "messages": [{"role": "user", "content": 5}]}]
    s = annotate(guard, write_jsonl(tmp_path / "in.jsonl", items), tmp_path / "out.parquet", progress=False)
    out = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["id"] for r in out] == ["x/0", "x/1", "bad"] and s.error_rows == [3]
    assert json.loads(out[2]["messages"])[0]["content"] == 5  # the mixed-type column is kept as JSON text
    assert out[0]["guard"]["label"] in ("Safe", "Unsafe", "Controversial") and out[2]["guard"]["error"]


def test_progress_bar_shows_rate_and_eta(guard, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", rows(4))
    annotate(guard, inp, tmp_path / "out.jsonl", batch_size=2)
    err = capsys.readouterr().err
    assert "row/s" in err and "<" in err and "4/4" in err


def test_partial_from_another_run_is_refused(guard, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", rows(3))
    out = tmp_path / "out.jsonl"
    partial_path(out).write_text(json.dumps({"qguard_annotate": {"filter": "safe"}}) + "\n", "utf-8")
    with pytest.raises(InputError, match="different run"):
        annotate(guard, inp, out, progress=False)
    annotate(guard, inp, out, progress=False, restart=True)
    assert len(read_jsonl(out)) == 3
    with pytest.raises(InputError, match="unknown file type"):
        annotate(guard, inp, tmp_path / "out.txt", progress=False)


def test_resume_after_hard_kill(guard, model_dir, tmp_path):
    data = rows(160, seed=17)
    inp = write_jsonl(tmp_path / "in.jsonl", data)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "qguard", "annotate", str(inp), "-o", str(out), "--model", str(model_dir),
           "--batch-size", "2", "--no-progress", "--max-new-tokens", "24"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    part = partial_path(out)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if part.exists() and part.read_bytes().count(b"\n") >= 5:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = part.read_bytes().count(b"\n") - 1
    assert 0 < done < len(data)
    with part.open("ab") as f:
        f.write(b'{"row": 99999, "keep": tr')  # a torn line, as a kill mid-write leaves it
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resumed after row" in r.stderr
    got = read_jsonl(out)
    assert [g["id"] for g in got] == [d["id"] for d in data]
    reference = read_jsonl(_run(guard, inp, tmp_path / "ref.jsonl", batch_size=16))
    assert [g["guard"]["label"] for g in got] == [g["guard"]["label"] for g in reference]
    assert [g["guard"]["categories"] for g in got] == [g["guard"]["categories"] for g in reference]
    assert not part.exists()


def test_cli_reports_errors_without_traceback(tmp_path, model_dir):
    from qguard.cli import main

    assert main(["annotate", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o.jsonl"),
                 "--model", str(model_dir)]) == 2


def test_json_array_in_and_out_and_a_new_output_folder(guard, tmp_path):
    items = rows(3, seed=4)
    inp = tmp_path / "rows.json"
    inp.write_text(json.dumps(items, indent=2), "utf-8")  # a pretty-printed array, not JSON Lines
    out = tmp_path / "new" / "folder" / "out.json"
    s = annotate(guard, inp, out, progress=False)
    got = json.loads(out.read_text("utf-8"))  # a JSON array again
    assert s.rows == 3 and s.errors == 0
    assert [r["id"] for r in got] == [r["id"] for r in items] and all("guard" in r for r in got)
    lines = tmp_path / "lines.json"  # JSON Lines under a .json name still reads as lines
    write_jsonl(lines, items)
    assert annotate(guard, lines, tmp_path / "o2.jsonl", progress=False).rows == 3


def test_an_unreadable_input_leaves_no_partial_file(guard, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"messages\n\xff\xfe\n")
    out = tmp_path / "out.jsonl"
    with pytest.raises(InputError, match="not UTF-8"):
        annotate(guard, bad, out, progress=False)
    assert not partial_path(out).exists()
    broken = tmp_path / "broken.json"
    broken.write_text('[{"messages": [}', "utf-8")
    with pytest.raises(InputError, match="not a valid JSON array"):
        annotate(guard, broken, out, progress=False)
    assert not partial_path(out).exists()
    bad.write_text("prompt\nhello\n", "utf-8")  # fixed: the same command now just runs
    assert annotate(guard, bad, out, fields=FieldMap(prompt_field="prompt"), progress=False).rows == 1


def test_a_byte_order_mark_is_not_part_of_the_first_row(guard, tmp_path):
    items = rows(3, seed=6)
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in items).encode())
    assert annotate(guard, jsonl, tmp_path / "o1.jsonl", progress=False).errors == 0
    csv_in = tmp_path / "bom.csv"
    with csv_in.open("w", newline="", encoding="utf-8-sig") as f:  # what Excel's "CSV UTF-8" writes
        w = csv.writer(f)
        w.writerow(["prompt"])
        w.writerows([["hello"], ["how are you"]])
    s = annotate(guard, csv_in, tmp_path / "o2.jsonl", fields=FieldMap(prompt_field="prompt"), progress=False)
    assert (s.rows, s.errors) == (2, 0)


def test_common_column_names_are_read_by_default(guard, tmp_path):
    conv = [{"role": "user", "content": "how to bake bread"}, {"role": "assistant", "content": "knead knead bake"}]
    items = [
        {"prompt": "how to pick a lock", "response": "sure sure sure"},  # prompt/response: the response is judged
        {"prompt": "vote vote vote"},  # a prompt alone
        {"prompt": "hi there", "response": None},  # a null response: the prompt is judged
        {"conversation": conv},
        {"messages": conv[:1]},
        {"messages": conv, "prompt": "something else"},  # both: the message list wins
        {"response": "an answer with no prompt"},
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", items)
    s = annotate(guard, inp, tmp_path / "out.jsonl", progress=False)
    out = read_jsonl(tmp_path / "out.jsonl")
    want = guard.classify_conversations([
        [{"role": "user", "content": "how to pick a lock"}, {"role": "assistant", "content": "sure sure sure"}],
        [{"role": "user", "content": "vote vote vote"}], [{"role": "user", "content": "hi there"}],
        conv, conv[:1], conv])
    for r, v in zip(out, want):
        assert r["guard"] == {**v.to_dict(), "model": guard.name}
    assert s.error_rows == [7] and "'response' alone is not enough" in out[6]["guard"]["error"]
    # named fields still win: the same rows read by --prompt-field fail where they have no prompt
    s = annotate(guard, inp, tmp_path / "named.jsonl", fields=FieldMap(prompt_field="prompt"), progress=False)
    assert s.error_rows == [4, 5, 7]


def test_guard_object_is_the_verdict_serialisation(guard, tmp_path):
    from qguard.policy import VERDICT_FIELDS, Mode, Policy

    data = rows(6, seed=5)
    inp = write_jsonl(tmp_path / "in.jsonl", data)
    out = read_jsonl(_run(guard, inp, tmp_path / "out.jsonl"))
    verdicts = guard.classify_conversations([r["messages"] for r in data])
    for r, v in zip(out, verdicts):
        assert tuple(r["guard"]) == (*VERDICT_FIELDS, "model")  # classify --json's object, one schema per row
        assert r["guard"] == json.loads(json.dumps({**v.to_dict(), "model": guard.name}))
        assert r["guard"]["action"] in ("allow", "flag", "block") and r["guard"]["n_tokens"] > 0
    # annotate's mode re-reads the guard's verdicts under that mode (binary, action), its policy kept
    loose = read_jsonl(_run(guard, inp, tmp_path / "loose.jsonl", mode="loose"))
    for r, v in zip(loose, verdicts):
        assert r["guard"] == json.loads(json.dumps({**Policy(mode=Mode.LOOSE).apply(v).to_dict(), "model": guard.name}))


def test_a_partial_file_of_an_older_format_is_refused_clearly(guard, tmp_path):
    from qguard.annotate import RunConfig

    data = rows(4, seed=8)
    inp = write_jsonl(tmp_path / "in.jsonl", data)
    out = tmp_path / "out.jsonl"
    old = RunConfig(str(inp.resolve()), str(out.resolve()), guard.name, "strict", None,
                    {"messages_field": "messages", "prompt_field": None, "response_field": None},
                    inp.stat().st_size, version=1)  # what qguard wrote before guard objects were Verdict.to_dict
    old_row = {"row": 1, "keep": True, "error": None,
               "record": {**data[0], "guard": {"label": "Safe", "binary": "Safe", "mode": "strict", "categories": [],
                                               "refusal": None, "probs": {}, "model": guard.name}}}
    write_jsonl(partial_path(out), [{"qguard_annotate": old.__dict__}, old_row])
    with pytest.raises(InputError, match=r"another qguard version \(partial format 1.*pass --restart"):
        annotate(guard, inp, out, progress=False)
    assert partial_path(out).exists() and not out.exists()  # the old run's results are left untouched
    annotate(guard, inp, out, progress=False, restart=True)
    assert all("action" in r["guard"] for r in read_jsonl(out))


def test_cli_exits_non_zero_when_every_row_failed(tmp_path, model_dir, capsys):
    from qguard.cli import main

    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}, {"text": "bye"}, "{torn"])
    code = main(["annotate", str(inp), "-o", str(tmp_path / "o.jsonl"), "--model", str(model_dir), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "qguard: error: every one of the 3 rows failed, nothing was judged" in err
    assert "2 x no conversation in the row" in err and "1 x line is not valid JSON" in err
    assert "o.jsonl.errors.jsonl" in err and "Traceback" not in err
    inp = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "hello"}, {"text": "bye"}])  # one good row: a result
    code = main(["annotate", str(inp), "-o", str(tmp_path / "o2.jsonl"), "--model", str(model_dir), "--no-progress"])
    assert code == 0 and "1 bad rows" in capsys.readouterr().err
