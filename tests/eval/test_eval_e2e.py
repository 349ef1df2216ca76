"""`qguard eval` end to end on tiny random checkpoints and the hand-written fixtures in tests/fixtures/eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qguard.cli import main
from qguard.eval.data import find_files, read_benchmark
from qguard.eval.metrics import LATENCY_BINS
from qguard.eval.runner import summarize
from qguard.eval.suites import SUITES
from qguard.families.stream import stream_layout
from qguard.tokenizer import load_tokenizer
from tests.conftest import REPO, shared_path

FIXTURES = REPO / "tests" / "fixtures" / "eval"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fixture_rows() -> dict[str, list]:
    return {n: read_benchmark(p) for n, p in find_files(FIXTURES).items()}


def _run(argv: list[str]) -> tuple[list[dict], dict]:
    out = Path(argv[argv.index("--out") + 1])
    assert main(["eval", *argv, "-q"]) == 0
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text("utf-8").splitlines()]
    return preds, json.loads((out / "results.json").read_text("utf-8"))


@pytest.fixture(scope="module")
def stream_run(tiny_stream, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_stream")
    preds, results = _run(["--model", str(tiny_stream), "--data", str(FIXTURES), "--out", str(out), "--batch-size", "3"])
    return out, preds, results


def test_stream_eval_writes_every_output(stream_run):
    out, preds, results = stream_run
    for name in ("results.json", "predictions.jsonl", "report.md", "precision_recall.png", "latency.png",
                 "confusion_severity.png", "confusion_categories.png"):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC
    report = (out / "report.md").read_text("utf-8")
    assert "StreamSpliced" in report and "Ahead" in report and "collection_unsafe (R)" in report
    assert "Calibration of strict P(unsafe)" in report
    for b in results["benchmarks"].values():
        assert b["calibration"]["n"] == b["n_scored"] and 0 <= b["calibration"]["ece"] <= 1


def test_predictions_match_the_data(stream_run):
    _, preds, results = stream_run
    data = _fixture_rows()
    assert sorted((p["benchmark"], p["id"]) for p in preds) == sorted((n, s.id) for n, rows in data.items() for s in rows)
    for p in preds:
        assert p["pred"] in ("Safe", "Unsafe", "Controversial")
        assert p["strict"] == ("Safe" if p["pred"] == "Safe" else "Unsafe")
        assert p["loose"] == ("Unsafe" if p["pred"] == "Unsafe" else "Safe")
        assert set(p["probs"]) == {"Safe", "Unsafe", "Controversial"}
        assert p["refusal"] is None  # Stream checkpoints have no refusal head
    assert set(results["benchmarks"]) == set(data)
    for name, b in results["benchmarks"].items():
        assert b["n"] == b["n_scored"] == len(data[name])
        s = b["strict"]
        assert s["tp"] + s["fp"] + s["fn"] + s["tn"] == len(data[name])
        assert b["cost"]["samples"] == len(data[name]) and b["cost"]["tokens"] > 0
    assert set(results["suites"]) == {"stream", "custom"}
    assert results["benchmarks"]["collection_unsafe"]["headline"]["kind"] == "recall"


def test_results_are_recomputable_from_predictions(stream_run):
    _, preds, results = stream_run
    again = summarize(preds)
    for name, b in results["benchmarks"].items():
        for key in ("strict", "loose", "headline", "latency", "languages", "category_confusion"):
            assert again["benchmarks"][name][key] == b[key], (name, key)
    assert again["suites"] == results["suites"]


def test_latency_uses_gold_span_tokens(stream_run):
    """Gold token spans decode to the unsafe text, and bins follow the debounced positions."""
    _, preds, results = stream_run
    tok = load_tokenizer()
    samples = {s.id: s for s in _fixture_rows()["stream_spliced"]}
    lat_rows = [p for p in preds if p["latency"]]
    assert len(lat_rows) == 3 == results["benchmarks"]["stream_spliced"]["latency"]["n"]
    assert results["latency"]["n"] == 3
    for p in lat_rows:
        s = samples[p["id"]]
        lay = stream_layout(tok, s.messages)
        answer = lay.ids[lay.answer_start:lay.answer_end]
        first, last = p["latency"]["gold_tokens"]
        start, end = s.unsafe_span
        assert tok.decode(answer[first:last + 1]).strip() == s.judged_text[start:end].strip()
        pos = p["latency"]["pred_position"]
        assert pos == (p["unsafe_position"] if p["pred"] != "Safe" else None)
        assert p["latency"]["bin"] in LATENCY_BINS
    counts = results["benchmarks"]["stream_spliced"]["latency"]["counts"]
    assert sum(counts.values()) == 3


def test_gen_eval_counts_unparseable_answers_as_unsafe(tiny_gen, tmp_path):
    # a random Gen model rarely prints a parseable answer within 4 tokens: those rows are Unsafe + error
    preds, results = _run(["--model", str(tiny_gen), "--data", str(FIXTURES / "prompts_mixed.jsonl"),
                           "--out", str(tmp_path), "--limit", "3", "--max-new-tokens", "4", "--no-plots"])
    assert len(preds) == 3 and not list(tmp_path.glob("*.png"))
    errors = [p for p in preds if p["error"]]
    assert results["benchmarks"]["prompts_mixed"]["n_errors"] == len(errors)
    assert all(p["pred"] == "Unsafe" for p in errors)
    assert all(p["latency"] is None for p in preds)  # no latency without a Stream head
    assert results["kind"] == "gen" and results["limit"] == 3


def test_eval_report_merges_runs(stream_run, tmp_path, capsys):
    out, _, _ = stream_run
    target = tmp_path / "compare.md"
    assert main(["eval-report", str(out), str(out / "results.json"), "--out", str(target)]) == 0
    text = target.read_text("utf-8")
    table = text.split("### Streaming detection set")[1].split("\n\n")[1]
    assert len(table.strip().splitlines()) == 4  # header, rule, one row per run


@pytest.mark.parametrize("args,message", [
    (["--data", "/nonexistent/eval"], "no such file or directory"),
    (["--data", str(FIXTURES), "--suite", "klingon"], "unknown suite"),
    (["--data", str(FIXTURES), "--suite", "chinese"], "none of its files"),
])
def test_bad_input_is_a_clear_error(args, message, tmp_path, capsys):
    assert main(["eval", "--model", "/nonexistent/model", *args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "qguard: error:" in err and message in err and "Traceback" not in err


def test_malformed_line_names_file_and_line(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    good = (FIXTURES / "prompts_mixed.jsonl").read_text("utf-8").splitlines()
    (data / "mine.jsonl").write_text("\n".join([good[0], good[1], '{"id": "x", "task": "prompt"'] + good[2:]) + "\n")
    assert main(["eval", "--model", "/nonexistent/model", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{data / 'mine.jsonl'}:3: not valid JSON" in err


def test_shared_eval_data_with_limit(tiny_stream, tmp_path):
    eval_dir = shared_path("data", "eval")
    preds, results = _run(["--model", str(tiny_stream), "--data", str(eval_dir), "--out", str(tmp_path),
                           "--limit", "3", "--no-plots"])
    files = find_files(eval_dir)
    assert len(preds) == 3 * len(files)
    assert set(results["benchmarks"]) == set(files)
    assert [s for s in SUITES if s in results["suites"]] == list(results["suites"])
    assert results["benchmarks"]["wildguardtest_prompt_partial"]["column"] == "WildG-partial"
    assert results["benchmarks"]["xsafety"]["headline"]["kind"] == "recall"  # collection-labelled


def test_latency_of_a_response_with_reasoning_is_counted_in_answer_tokens(tiny_stream):
    from qguard.eval.data import Sample
    from qguard.eval.runner import _latency
    from qguard.guard import Guard
    from qguard.policy import Policy, Severity

    guard = Guard.from_pretrained(tiny_stream)
    content = "Let me think about this request.</think>\n\nSure, happy to help. Mix the powders and pack them."
    start = content.index("Mix")
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": content}]
    sample = Sample(id="x", benchmark="b", task="response", messages=msgs, label="Unsafe", categories=(),
                    refusal=None, lang="en", collection_label=False, unsafe_span=(start, len(content)))
    lay = stream_layout(guard.tokenizer, msgs)
    n_reasoning = lay.reasoning_end - lay.reasoning_start
    assert n_reasoning > 0 and len(lay.moderated()) == n_reasoning + lay.answer_end - lay.answer_start
    first = _latency(guard, sample, Policy().verdict(Severity.UNSAFE, (), unsafe_position=0), True)["gold_tokens"][0]
    for pos, want in ((n_reasoning + first, "Hit"), (n_reasoning - 1, "Ahead"), (n_reasoning + first - 1, "Ahead")):
        v = Policy().verdict(Severity.UNSAFE, (), unsafe_position=pos)
        assert _latency(guard, sample, v, True)["bin"] == want, pos


def test_eval_report_tells_runs_and_metrics_apart(stream_run):
    import copy

    from qguard.eval.report import load_results, render_report

    out, _, _ = stream_run
    a = load_results(out)
    b = copy.deepcopy(a)
    b["_source"] = "other-run"
    name = next(n for n, x in b["benchmarks"].items() if x["headline"] and x["headline"]["kind"] == "f1"
                and x["role"] != "refusal")
    b["benchmarks"][name]["headline"] = {**b["benchmarks"][name]["headline"], "kind": "specificity", "best": 100.0}
    text = render_report([a, b])
    column = b["benchmarks"][name]["column"]
    header = next(line for line in text.splitlines() if line.startswith("| Model") and f" {column} " in line)
    assert f"{column} (Spec)" not in header  # the runs disagree: the cells carry the mark
    assert "100.0 (Spec)" in text and " (F1) |" in text
    assert f"[{out}]" in text and "[other-run]" in text  # same model twice: rows named by run
    cal = [line for line in text.splitlines() if line.startswith("| ") and line.count("|") == 6 and "0." in line]
    assert any(len(cell.strip().split(".")[-1]) == 3 for line in cal for cell in line.split("|")[3:4])
