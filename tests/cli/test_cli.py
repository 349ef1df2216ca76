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
    tokens = lines[1:-1]
    assert [t["token_id"] for t in tokens] == encode(load_tokenizer(None), "Sure, here it is.")
    for t in tokens:
        assert set(t) == {"token_id", "text", "probs", "category_probs", "label"}
        assert sum(t["probs"].values()) == pytest.approx(1, abs=1e-5)


def test_stream_trace_json_ends_with_the_response_verdict(capsys, tiny_stream):
    from qguard.guard import Guard

    code, out, _ = run(capsys, "stream-trace", "-m", str(tiny_stream), "--prompt", "hi", "--response", "Sure, here it is.",
                       "--json")
    lines = [json.loads(x) for x in out.splitlines()]
    trace = Guard.from_pretrained(tiny_stream).stream_trace("hi", "Sure, here it is.")
    assert code == 0 and set(lines[-1]) == {"verdict"} and len(lines) == len(trace.tokens) + 2
    # the prompt and the final verdict are the one serialisation every output uses
    assert lines[-1]["verdict"] == json.loads(json.dumps({**trace.response.to_dict(), "model": str(tiny_stream)}))
    assert lines[0]["prompt"] == json.loads(json.dumps({**trace.prompt.to_dict(), "model": str(tiny_stream)}))
    assert lines[-1]["verdict"]["n_tokens"] > len(trace.tokens) and "unsafe_position" in lines[-1]["verdict"]


def test_classify_json_is_the_verdict_serialisation(capsys, tiny_stream):
    from qguard.policy import VERDICT_FIELDS

    code, out, _ = run(capsys, "classify", "-m", str(tiny_stream), "--json", "--prompt", "hi", "--response", "hello")
    assert code == 0 and tuple(json.loads(out)) == (*VERDICT_FIELDS, "model")


@pytest.mark.parametrize("argv", [
    ["classify", "--prompt", "", "--response", "x"],
    ["classify", "--prompt", "  \n", "--response", "x"],
    ["stream-trace", "--prompt", "   ", "--response", "x"],
    ["stream-trace", "--prompt", "", "--response", "x", "--json"],
])
def test_an_empty_prompt_is_an_error_not_safe(capsys, tiny_stream, argv):
    code, out, err = run(capsys, *argv, "-m", str(tiny_stream))
    assert code == 2 and out == "" and "qguard: error: empty prompt" in err and "Traceback" not in err


def _offline_hub(monkeypatch, tmp_path):
    """No hub: snapshot_download fails as huggingface_hub does offline, with its long message."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*a, **kw):
        raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub, and we cannot "
                                      "find the appropriate snapshot folder. Please check your internet connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)  # where no ckpt/ folder exists


def test_a_missing_local_dir_that_looks_like_a_hub_id_says_so(capsys, monkeypatch, tmp_path):
    _offline_hub(monkeypatch, tmp_path)
    monkeypatch.delenv("QGUARD_MODEL", raising=False)
    code, _, err = run(capsys, "classify", "--model", "ckpt/gen-0.6b", "hi")
    assert code == 2 and "Traceback" not in err
    assert f"no local directory of that name (looked in {tmp_path})" in err and "as a Hugging Face hub id" in err
    assert "cannot be reached" in err and "check your internet connection" not in err and "QGUARD_MODEL" not in err
    monkeypatch.setenv("QGUARD_MODEL", "ckpt/gen-0.6b")  # the same name, now from the environment
    for argv in (["classify", "hi"], ["stream-trace", "--prompt", "a", "--response", "b"]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "no local directory" in err and "'ckpt/gen-0.6b' is the value of $QGUARD_MODEL" in err
    code, _, err = run(capsys, "classify", "--model", "ckpt/other", "hi")  # --model wins and is what is named
    assert code == 2 and "'ckpt/other'" in err and "QGUARD_MODEL" not in err


def test_hub_failures_are_told_in_one_line():
    from qguard.checkpoint import _hub_failure

    class RepositoryNotFoundError(OSError):  # matched by class name, as huggingface_hub's classes move
        pass

    assert "no such repository on the hub" in _hub_failure(RepositoryNotFoundError("404 Client Error ..."))
    assert _hub_failure(RuntimeError("odd\n  failure")) == "RuntimeError (odd failure)"


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


@pytest.mark.parametrize("argv,msg", [
    (["classify", "--device", "gpu", "hello"], "unknown device 'gpu'"),
    (["serve", "--port", "99999"], "a port is 0..65535"),
    (["serve", "--max-concurrency", "0"], "expected a positive integer, got 0"),
    (["annotate", "in.jsonl", "-o", "out.jsonl", "--max-new-tokens", "0"], "expected a positive integer, got 0"),
    (["train", "stream", "--data", "d", "--out", "o", "--max-steps", "0"], "expected a positive integer, got 0"),
    (["train", "stream", "--data", "d", "--out", "o", "--batch-tokens", "-5"], "expected a positive integer"),
    (["train", "gen", "--data", "d", "--out", "o", "--init", "i", "--epochs", "0"], "expected a positive number"),
    (["eval", "--data", "d", "--out", "o", "--mode", "loose"], "unrecognized arguments: --mode"),
    (["calibrate", "--data", "d", "--calibration", "x.json"], "unrecognized arguments: --calibration"),
])
def test_bad_options_are_refused_before_any_work(capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and "Traceback" not in err


def test_cuda_device_without_cuda_is_a_clear_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit):
        main(["classify", "--device", "cuda", "hello"])
    assert "CUDA is not available here" in capsys.readouterr().err


def test_bad_output_paths_fail_before_the_work(capsys, tiny_stream, tmp_path):
    a_file = tmp_path / "taken.json"
    a_file.write_text("{}")
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"id": "a", "task": "prompt", "label": "Safe",
                                "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    for argv, msg in [
        (["eval", "-m", str(tiny_stream), "--data", str(data), "--out", str(a_file / "sub")], "cannot create the folder"),
        (["eval-report", str(tmp_path), "--out", str(a_file / "r.md")], "cannot create the folder"),
        (["calibrate", "-m", str(tiny_stream), "--data", str(data), "--out", str(tmp_path)], "is a directory"),
        (["train", "stream", "--data", str(data), "--out", str(a_file), "--max-steps", "1"], "is not a directory"),
    ]:
        code, _, err = run(capsys, *argv)
        assert code == 2 and msg in err and "Traceback" not in err, (argv, err)


def test_calibrate_never_overwrites_the_shipped_starter_calibration(capsys, tmp_path, monkeypatch):
    from qguard.starter import starter_model_path

    if starter_model_path() is None:
        pytest.skip("this build ships no starter model")
    monkeypatch.delenv("QGUARD_MODEL", raising=False)
    before = (starter_model_path() / "qguard_calibration.json").read_bytes()
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"id": "a", "task": "prompt", "label": "Safe",
                                "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    code, _, err = run(capsys, "calibrate", "--data", str(data))
    assert code == 2 and "embedded starter" in err and "--out" in err
    assert (starter_model_path() / "qguard_calibration.json").read_bytes() == before


def test_label_rollouts_never_clobbers_its_input_or_output(capsys, tiny_gen, tmp_path):
    data = tmp_path / "responses.jsonl"
    row = {"id": "a", "task": "response", "label": "Unsafe",
           "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Step one, step two."}]}
    data.write_text(json.dumps(row) + "\n")
    before = data.read_bytes()
    llm = "openai:http://127.0.0.1:9/v1#m"  # nothing listens on port 9
    code, _, err = run(capsys, "train", "label-rollouts", "--data", str(data), "--out", str(data), "--llm", llm,
                       "--judge", str(tiny_gen))
    assert code == 2 and "must differ from --data" in err and data.read_bytes() == before
    out = tmp_path / "labelled.jsonl"
    out.write_text("earlier results\n")
    code, _, err = run(capsys, "train", "label-rollouts", "--data", str(data), "--out", str(out), "--llm", llm,
                       "--judge", str(tiny_gen))
    assert code == 2 and "http://127.0.0.1:9/v1" in err and "cannot be reached" in err and "Traceback" not in err
    assert out.read_text() == "earlier results\n"  # --out changes only once every row is labelled


def test_serve_refuses_a_max_context_over_the_models(capsys, tiny_stream):
    code, _, err = run(capsys, "serve", "-m", str(tiny_stream), "--max-context", "100000")
    assert code == 2 and "over the model's context" in err


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"qguard {version('qguard')}"


def test_classify_reads_standard_input(capsys, tiny_stream, monkeypatch):
    import io

    def stdin(data: bytes):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))

    stdin(b"How can I make a bomb?")
    code, out, _ = run(capsys, "classify", "-m", str(tiny_stream), "--json", "-")
    direct = run(capsys, "classify", "-m", str(tiny_stream), "--json", "How can I make a bomb?")[1]
    assert code == 0 and json.loads(out)["probs"] == json.loads(direct)["probs"]
    stdin(json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]).encode())
    code, out, _ = run(capsys, "classify", "-m", str(tiny_stream), "--messages", "-", "--json")
    assert code == 0 and json.loads(out)["refusal"] is None
    stdin(b"\xff\xfe")
    code, _, err = run(capsys, "classify", "-m", str(tiny_stream), "-")
    assert code == 2 and "standard input is not UTF-8" in err
