"""Bad input is an InputError everywhere (issue 14, defect 8): empty prompts, and the public options of
Guard, StreamGuard, rewards, annotation and calibration."""

from __future__ import annotations

import asyncio
import json

import pytest

from qguard.errors import InputError
from qguard.guard import Guard
from qguard.policy import Verdict

EMPTY_PROMPTS = ["", "   ", "\n\t "]


@pytest.fixture(scope="module")
def sguard(tiny_stream):
    return Guard.from_pretrained(tiny_stream, device="cpu")


@pytest.fixture(scope="module")
def gguard(tiny_gen):
    return Guard.from_pretrained(tiny_gen, device="cpu", max_new_tokens=8)


@pytest.mark.parametrize("prompt", EMPTY_PROMPTS)
def test_an_empty_prompt_with_a_response_is_an_input_error(sguard, gguard, prompt):
    as_messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": "x"}]
    multi_turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, *as_messages]
    calls = [lambda g: g.classify_response(prompt, "x"), lambda g: g.classify_response(as_messages),
             lambda g: g.classify_responses([(prompt, "x")]), lambda g: g.classify_responses([as_messages]),
             lambda g: g.classify_messages(as_messages), lambda g: g.classify_messages(multi_turn)]
    for g in (sguard, gguard):
        for call in calls:
            with pytest.raises(InputError, match="empty prompt"):
                call(g)
    with pytest.raises(InputError, match="empty prompt"):
        sguard.stream_trace(prompt, "x")


def test_an_empty_prompt_fails_only_its_own_row(sguard, gguard):
    convs = [[{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}],
             [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}],
             [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": ""},
              {"role": "assistant", "content": "b"}]]
    for g in (sguard, gguard):
        out = g.classify_conversations(convs, return_errors=True)
        assert [type(v).__name__ for v in out] == ["InputError", "Verdict", "InputError"]
        assert "empty prompt" in str(out[0]) and "empty prompt" in str(out[2])


def test_a_stream_session_refuses_an_empty_prompt(sguard):
    sg = sguard.stream_guard(max_sessions=2, max_context=256)
    after_a_turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "  "}]
    for messages in ("   ", [{"role": "user", "content": ""}], after_a_turn):
        with pytest.raises(InputError, match="empty prompt|every message is empty"):
            sg.open(messages)
        with pytest.raises(InputError, match="empty prompt|every message is empty"):
            asyncio.run(sg.open_async(messages))
    with sg.open("hi") as s:  # every refused open released its slot
        assert isinstance(s.prompt, Verdict)
    assert len([sg.open("a"), sg.open("b")]) == 2


def test_a_reward_for_an_empty_prompt_is_invalid_not_safe(sguard):
    from qguard.reward import SafetyReward

    with pytest.raises(InputError, match="sample 0 cannot be judged: empty prompt"):
        SafetyReward(sguard).score([" "], ["an answer"])
    assert SafetyReward(sguard, invalid_reward=-2.0).score([" ", "hi"], ["an answer", "hello"])[0] == -2.0


@pytest.mark.parametrize("make,msg", [
    (lambda ck: Guard.from_pretrained(ck, debounce="fast"), "unknown debounce rule 'fast'"),
    (lambda ck: Guard.from_pretrained(ck, mode="medium"), "unknown mode 'medium'"),
    (lambda ck: Guard.from_pretrained(ck, policy={"mode": "strict"}), "policy must be a qguard.policy.Policy"),
    (lambda ck: Guard.from_pretrained(ck, max_new_tokens=0), "max_new_tokens must be at least 1"),
    (lambda ck: Guard.from_pretrained(ck, calibration=123), "calibration must be a Calibration"),
    (lambda ck: Guard.from_pretrained(ck).stream_guard(debounce="fast"), "unknown debounce rule"),
    (lambda ck: Guard.from_pretrained(ck).stream_guard(max_sessions="4"), "max_sessions must be an integer"),
    (lambda ck: Guard.from_pretrained(ck).stream_guard(max_context=2.5), "max_context must be an integer"),
    (lambda ck: Guard.from_pretrained(ck).classify_prompts(5), "takes a list of prompts, got int"),
    (lambda ck: Guard.from_pretrained(ck).classify_responses(None), "takes a list of .prompt, response. pairs"),
])
def test_bad_guard_options_are_input_errors(tiny_stream, make, msg):
    with pytest.raises(InputError, match=msg):
        make(tiny_stream)


def test_bad_calibration_files_are_input_errors(tmp_path):
    from qguard.calibration import Calibration

    with pytest.raises(InputError, match="temperature must map prompt and response to numbers"):
        Calibration(temperature=[1.0, 2.0])
    for body, msg in [({"qguard_calibration": 1, "temperature": [1, 2]}, "not a qguard calibration file"),
                      ({"qguard_calibration": 1, "temperature": {"prompt": True, "response": 1}}, "positive number"),
                      ({"qguard_calibration": 1, "temperature": {"prompt": 1, "response": 1}, "kind": "x"}, "kind"),
                      ([1, 2], "not a qguard calibration file")]:
        f = tmp_path / "cal.json"
        f.write_text(json.dumps(body))
        with pytest.raises(InputError, match=msg):
            Calibration.load(f)
    with pytest.raises(InputError, match="not readable JSON"):
        Calibration.load(tmp_path)  # a directory


@pytest.mark.parametrize("make,msg", [
    (lambda g: __import__("qguard.reward").reward.SafetyReward(g, kind="both"), "kind must be 'guard' or 'hybrid'"),
    (lambda g: __import__("qguard.reward").reward.SafetyReward(g, kind="hybrid"), "needs a helpfulness scorer"),
    (lambda g: __import__("qguard.reward").reward.SafetyReward(g, batch_size=0), "batch_size must be at least 1"),
    (lambda g: __import__("qguard.reward").reward.SafetyReward(g, invalid_reward="low"), "invalid_reward must be"),
    (lambda g: __import__("qguard.reward").reward.SafetyReward(g, config={"mode": "loose"}), "RewardConfig"),
    (lambda g: __import__("qguard.reward").reward.SafetyReward("a guard"), "the judge must be a Guard"),
    (lambda g: __import__("qguard.reward").reward.RewardConfig(mode="medium"), "unknown mode 'medium'"),
    (lambda g: __import__("qguard.reward").reward.RewardConfig(unsafe_penalty="-10"), "unsafe_penalty must be a number"),
    (lambda g: __import__("qguard.reward").reward.reward_fn(g, kindd="hybrid"), "unknown options"),
])
def test_bad_reward_options_are_input_errors(sguard, make, msg):
    with pytest.raises(InputError, match=msg):
        make(sguard)


def test_bad_annotate_options_are_input_errors(sguard, tmp_path):
    from qguard.annotate import FieldMap, annotate

    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": "hi"}) + "\n")
    for kw, msg in [({"mode": "medium"}, "unknown mode 'medium'"), ({"batch_size": 0}, "batch_size must be at least 1"),
                    ({"batch_size": "8"}, "batch_size must be an integer"), ({"fields": "prompt"}, "FieldMap"),
                    ({"filter": "bad"}, "--filter must be safe or unsafe")]:
        with pytest.raises(InputError, match=msg):
            annotate(sguard, inp, tmp_path / "out.jsonl", progress=False, **kw)
    for kw, msg in [({"messages_field": "m", "prompt_field": "p"}, "not both"),
                    ({"response_field": "r"}, "needs --prompt-field"), ({"prompt_field": 3}, "must be a column name")]:
        with pytest.raises(InputError, match=msg):
            FieldMap(**kw)
