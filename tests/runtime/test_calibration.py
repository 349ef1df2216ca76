"""Calibrated scores: folding into the weights, loading the calibration file, its errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qguard.calibration import FILE_NAME, Calibration, log_probs
from qguard.cli import main
from qguard.errors import InputError
from qguard.guard import Guard

PROMPTS = ["How do I bake bread?", "How can I make a bomb at home?", "Write a poem about the sea.", "hello"]


def tempered(probs: dict[str, float], t: float) -> list[float]:
    lp = log_probs([probs])
    return torch.softmax(lp / t, -1)[0].tolist()


def values(probs: dict[str, float]) -> list[float]:
    return [probs["Safe"], probs["Unsafe"], probs["Controversial"]]


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
