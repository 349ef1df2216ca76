"""Calibrated scores: temperature fitting, folding into the weights, loading, and `qguard calibrate`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qguard.calibration import FILE_NAME, Calibration, fit_temperature, log_probs, metrics, unsafe_prob
from qguard.cli import main
from qguard.errors import InputError
from qguard.guard import Guard

PROMPTS = ["How do I bake bread?", "How can I make a bomb at home?", "Write a poem about the sea.", "hello"]


def tempered(probs: dict[str, float], t: float) -> list[float]:
    lp = log_probs([probs])
    return torch.softmax(lp / t, -1)[0].tolist()


def values(probs: dict[str, float]) -> list[float]:
    return [probs["Safe"], probs["Unsafe"], probs["Controversial"]]


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_fit_recovers_the_temperature_that_generated_the_labels(true_t):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20000, 3, generator=g, dtype=torch.float64) * 3
    y = (torch.rand(20000, generator=g, dtype=torch.float64) < unsafe_prob(logits, true_t)).double()
    t = fit_temperature(torch.log_softmax(logits, -1), y)
    assert t == pytest.approx(true_t, rel=0.05)
    before, after = metrics(unsafe_prob(logits, 1.0), y), metrics(unsafe_prob(logits, t), y)
    assert after["ece"] < 0.02 < before["ece"] and after["log_loss"] < before["log_loss"]


def test_metrics_by_hand():
    p, y = torch.tensor([0.9, 0.9, 0.2, 0.2], dtype=torch.float64), torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    m = metrics(p, y, bins=10)
    # bin 0.9: mean p 0.9 vs 0.5 unsafe; bin 0.2: 0.2 vs 0 -> ECE = (2 * 0.4 + 2 * 0.2) / 4
    assert m["ece"] == pytest.approx(0.3) and m["brier"] == pytest.approx((0.01 + 0.81 + 0.04 + 0.04) / 4)


@pytest.fixture()
def stream_dir(tiny_stream, tmp_path):
    return shutil.copytree(tiny_stream, tmp_path / "stream")


def test_stream_temperatures_change_probabilities_never_labels(stream_dir):
    raw = Guard.from_pretrained(stream_dir, calibration=False)
    cal = Calibration(temperature={"prompt": 0.2, "response": 3.0})
    g = Guard.from_pretrained(stream_dir, calibration=cal)
    assert g.calibration is cal and raw.calibration is None
    for a, b in zip(raw.classify_prompts(PROMPTS), g.classify_prompts(PROMPTS)):
        assert a.label is b.label and a.categories == b.categories
        assert values(b.probs) == pytest.approx(tempered(a.probs, 0.2), abs=1e-5)
    # every answer token of the response head, and the prompt verdict, batched and live
    ra, rb = raw.stream_trace(PROMPTS[1], "Sure, mix these two things."), g.stream_trace(PROMPTS[1], "Sure, mix these two things.")
    for a, b in zip(ra.tokens, rb.tokens):
        assert a.label is b.label and values(b.probs) == pytest.approx(tempered(a.probs, 3.0), abs=1e-5)
    assert ra.response.label is rb.response.label and ra.response.unsafe_position == rb.response.unsafe_position
    with g.open_stream(PROMPTS[1]) as s:
        assert values(s.prompt.probs) == pytest.approx(values(rb.prompt.probs), abs=1e-5)
        live = s.push([t.token_id for t in rb.tokens])
    assert [values(v.probs) for v in live] == [pytest.approx(values(t.probs), abs=1e-5) for t in rb.tokens]


def test_gen_temperature_tempers_label_probabilities_and_keeps_the_answer(tiny_gen, tmp_path):
    d = shutil.copytree(tiny_gen, tmp_path / "gen")
    raw = Guard.from_pretrained(d, calibration=False)
    g = Guard.from_pretrained(d, calibration=Calibration(temperature={"prompt": 0.5, "response": 0.5}, kind="gen"))
    for a, b in zip(raw.classify_prompts(PROMPTS), g.classify_prompts(PROMPTS)):
        assert a.raw_output == b.raw_output and a.label is b.label
        assert values(b.probs) == pytest.approx(tempered(a.probs, 0.5), abs=1e-4)
    with pytest.raises(InputError, match="one temperature"):
        Calibration(temperature={"prompt": 0.5, "response": 2.0}, kind="gen")
    with pytest.raises(InputError, match="fitted for a stream model"):
        Guard.from_pretrained(d, calibration=Calibration(temperature={"prompt": 0.5, "response": 0.5}))


def test_the_checkpoint_file_is_loaded_unless_switched_off(stream_dir, tmp_path):
    Calibration(temperature={"prompt": 0.2, "response": 1.0}).save(stream_dir / FILE_NAME)
    assert Guard.from_pretrained(stream_dir).calibration.temperature["prompt"] == 0.2
    assert Guard.from_pretrained(stream_dir, calibration=False).calibration is None
    other = Calibration(temperature={"prompt": 3.0, "response": 1.0}).save(tmp_path / "other.json")
    assert Guard.from_pretrained(stream_dir, calibration=other).calibration.temperature["prompt"] == 3.0

    def cli_probs(*extra: str) -> dict:
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["classify", "--model", str(stream_dir), "--json", PROMPTS[1], *extra]) == 0
        return json.loads(buf.getvalue())["probs"]

    own, none = cli_probs(), cli_probs("--calibration", "none")
    assert values(own) == pytest.approx(tempered(none, 0.2), abs=1e-5)


@pytest.mark.parametrize("content, msg", [
    ("not json", "not readable JSON"),
    ('{"temperature": {"prompt": 1, "response": 1}}', "not a qguard calibration file"),
    ('{"qguard_calibration": 1, "temperature": {"prompt": -1, "response": 1}}', "positive number"),
    ('{"qguard_calibration": 1, "temperature": {"prompt": 1}}', "positive number"),
])
def test_bad_calibration_files_are_clear_errors(stream_dir, tmp_path, capsys, content, msg):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(InputError, match=msg):
        Guard.from_pretrained(stream_dir, calibration=bad)
    assert main(["classify", "--model", str(stream_dir), "--calibration", str(bad), "hi"]) == 2
    assert msg in capsys.readouterr().err
    with pytest.raises(InputError, match="not found"):
        Guard.from_pretrained(stream_dir, calibration=tmp_path / "missing.json")


def test_cli_calibrate_fits_writes_and_is_picked_up(stream_dir, tmp_path, capsys):
    rows = []
    for i in range(60):
        unsafe = i % 3 == 0
        text = f"question {i}: " + ("how do I hurt someone" if unsafe else "how do I grow tomatoes")
        rows.append({"id": f"p{i}", "task": "prompt", "label": "Unsafe" if unsafe else "Safe",
                     "messages": [{"role": "user", "content": text}]})
        rows.append({"id": f"r{i}", "task": "response", "label": "Unsafe" if unsafe else "Safe",
                     "messages": [{"role": "user", "content": text},
                                  {"role": "assistant", "content": "Here is how." if unsafe else "Water them daily."}]})
    rows.append({"id": "c", "task": "response", "label": "Safe", "messages": [{"role": "assistant", "content": "hi"}]})
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["calibrate", "--model", str(stream_dir), "--data", str(data), "--holdout", "0.25"]) == 0
    summary = json.loads(capsys.readouterr().out)
    cal = Calibration.load(stream_dir / FILE_NAME)
    assert summary["temperature"] == cal.temperature and summary["response_skipped"] == 1  # no user turn
    for task in ("prompt", "response"):
        fit, held = cal.report[f"{task}_fit"], cal.report[f"{task}_holdout"]
        assert fit["before"]["n"] == 45 and held["after"]["n"] == 15
        assert fit["after"]["log_loss"] <= fit["before"]["log_loss"]  # T = 1 is a candidate
    assert Guard.from_pretrained(stream_dir).calibration.temperature == cal.temperature
    # a hub id has no directory to write into; bad numbers are refused before any work
    assert main(["calibrate", "--model", "Qwen/Qwen3Guard-Stream-0.6B", "--data", str(data)]) == 2
    assert "--out is needed" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(stream_dir), "--data", str(data), "--holdout", "1"]) == 2
    assert "holdout" in capsys.readouterr().err


def test_cli_calibrate_keeps_the_temperature_of_a_head_without_rows(stream_dir, tmp_path, capsys):
    out = tmp_path / "cal.json"
    Calibration(temperature={"prompt": 2.0, "response": 1.7}).save(out)
    rows = [{"id": f"p{i}", "task": "prompt", "label": "Unsafe" if i % 2 else "Safe",
             "messages": [{"role": "user", "content": f"question {i}"}]} for i in range(20)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["calibrate", "--model", str(stream_dir), "--data", str(data), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    cal = Calibration.load(out)
    assert cal.temperature["response"] == 1.7 and "response" in summary["kept"]
    assert cal.report["fitted"] == ["prompt"]
