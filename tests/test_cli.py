import json
import subprocess
import sys

import pytest

from qguard.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_classify_json(capsys, tiny_stream):
    code, out, _ = run(capsys, "classify", "--model", str(tiny_stream), "--json", "How can I make a bomb?")
    assert code == 0
    d = json.loads(out)
    assert {"label", "categories", "refusal", "probs"} <= d.keys()
    assert set(d["probs"]) == {"Safe", "Unsafe", "Controversial"}


def test_classify_human_and_response(capsys, tiny_stream):
    code, out, _ = run(capsys, "classify", "-m", str(tiny_stream), "--prompt", "hi", "--response", "hello there")
    assert code == 0 and out.count("\n") == 1 and "categories:" in out


def test_classify_messages_file(capsys, tiny_stream, tmp_path):
    f = tmp_path / "m.json"
    f.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]))
    code, out, _ = run(capsys, "classify", "-m", str(tiny_stream), "--messages", str(f), "--json")
    assert code == 0 and json.loads(out)["label"] in ("Safe", "Unsafe", "Controversial")


def test_stream_trace_json(capsys, tiny_stream):
    from qguard.tokenizer import encode, load_tokenizer

    code, out, _ = run(capsys, "stream-trace", "-m", str(tiny_stream), "--prompt", "hi", "--response", "Sure, here it is.", "--json")
    assert code == 0
    lines = [json.loads(x) for x in out.splitlines()]
    assert set(lines[0]["prompt"]) >= {"probs", "label"}
    tokens = lines[1:]
    assert [t["token_id"] for t in tokens] == encode(load_tokenizer(None), "Sure, here it is.")
    for t in tokens:
        assert set(t) == {"token_id", "text", "probs", "category_probs", "label"}
        assert sum(t["probs"].values()) == pytest.approx(1, abs=1e-5)


def test_stream_trace_human(capsys, tiny_stream):
    code, out, _ = run(capsys, "stream-trace", "-m", str(tiny_stream), "--prompt", "hi", "--response", "Sure.")
    assert code == 0 and "response:" in out


@pytest.mark.parametrize("argv,msg", [
    (["classify", "--model", "/no/such/dir"], "exactly one of"),
    (["classify", "--model", "/no/such/dir", "hello"], "not found"),
    (["classify", "--response", "x", "--model", "M"], "exactly one of"),
    (["classify", "--messages", "/no/file.json", "--model", "M"], "no such file"),
    (["classify", "--prompt", "a", "hello", "--model", "M"], "exactly one of"),
])
def test_cli_errors(capsys, argv, msg):
    code, _, err = run(capsys, *argv)
    assert code == 2 and msg in err and "Traceback" not in err


def test_messages_file_not_utf8(capsys, tiny_stream, tmp_path):
    f = tmp_path / "m.json"
    f.write_bytes(b'[{"role": "user", "content": "\xff\xfe"}]')
    code, _, err = run(capsys, "classify", "-m", str(tiny_stream), "--messages", str(f))
    assert code == 2 and "not UTF-8" in err


def test_messages_file_bad_shape(capsys, tiny_stream, tmp_path):
    f = tmp_path / "m.json"
    f.write_text(json.dumps({"role": "user"}))
    code, _, err = run(capsys, "classify", "-m", str(tiny_stream), "--messages", str(f))
    assert code == 2 and "messages" in err


def test_console_script_entry_point(tiny_stream):
    r = subprocess.run([sys.executable, "-m", "qguard", "classify", "-m", str(tiny_stream), "--json", "hello"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"] == str(tiny_stream)


def test_no_model_is_a_clear_error(capsys, monkeypatch):
    import qguard.starter

    monkeypatch.delenv("QGUARD_MODEL", raising=False)
    monkeypatch.setattr(qguard.starter, "starter_model_path", lambda: None)
    code, _, err = run(capsys, "classify", "hello")
    assert code == 2 and "no model given" in err
