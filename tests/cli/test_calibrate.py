"""`qguard calibrate`: fits, writes the file the guard then loads, keeps what it cannot fit."""

from __future__ import annotations

import json
import shutil

import pytest

from qguard.calibration import FILE_NAME, Calibration
from qguard.cli import main
from qguard.guard import Guard

PROMPTS = ["How do I bake bread?", "How can I make a bomb at home?", "Write a poem about the sea.", "hello"]


@pytest.fixture()
def stream_dir(tiny_stream, tmp_path):
    return shutil.copytree(tiny_stream, tmp_path / "stream")


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
