"""Leak control in the guarded proxy: the hold-back window and on_unsafe cut / refuse / rollback (CARE).

The guard is the tiny Stream checkpoint edited so that a response token is Unsafe exactly when it is
" bomb" or " explosives" (and every prompt is Safe). The scripted upstream (an httpx MockTransport) streams
an answer that turns harmful mid-way, one word per chunk, and answers rollbacks' requests from a script.
Where the answer becomes unsafe is computed independently: one full forward over the upstream's whole
answer (`Guard.stream_trace`), debounced.
"""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient

from qguard.guard import Guard
from qguard.leak import CONTINUE_INSTRUCTION, INTROSPECTION_INSERT, INTROSPECTION_PROMPT, NUDGE
from qguard.policy import Debouncer
from qguard.serve import ServeSettings, create_app
from qguard.serve.leak import NUDGE_INSTRUCTION
from qguard.tokenizer import encode_text, encode_text_offsets
from tests.trigger import trigger_checkpoint

PROMPT = "Tell me a story about a lighthouse."
SAFE_START = " Sure, here is a story. The lighthouse keeper was kind and he kept the light on every night"
HARM = SAFE_START + " until one day he built a bomb bomb with explosives and sold it to the town."
SAFE_CONT = " He kept the light burning and the ships came home safely."
HARM_CONT = " Then a bomb bomb went off."
CRITIQUE = "CRITIQUE: the draft described a weapon."
REFUSAL = "[refused]"


@pytest.fixture(scope="module")
def guard(tiny_stream, tmp_path_factory):
    d = trigger_checkpoint(tiny_stream, tmp_path_factory.mktemp("trigger") / "ck", safe_prompts=True)
    g = Guard.from_pretrained(d, dtype="fp32")
    assert not g.classify_prompt(PROMPT).blocked and g.classify_response(PROMPT, HARM).blocked
    assert not g.classify_response(PROMPT, SAFE_START + SAFE_CONT).blocked
    return g


def unsafe_char(guard, answer: str) -> tuple[int, int]:
    """(first character of the first token of the deciding unsafe pair, first character of the token after
    it), from one full forward over `answer` and the debounce rule: no client may see the former."""
    ids, offsets = encode_text_offsets(guard.tokenizer, answer)
    trace = guard.stream_trace(PROMPT, answer).tokens
    assert [t.token_id for t in trace] == ids  # the trace read exactly the answer's tokens
    d = Debouncer()
    for i, t in enumerate(trace):
        label = d.push(t.label)
        if d.position is not None and guard.policy.binary(label).value == "Unsafe":
            first = i - 1  # decided at the second of two consecutive unsafe tokens
            return offsets[first][0], offsets[first + 1][0]
    raise AssertionError("the answer is not unsafe")


def words(text: str) -> list[str]:
    out, cur = [], ""
    for ch in text:
        if ch == " " and cur:
            out.append(cur)
            cur = ""
        cur += ch
    return [*out, cur] if cur else out


class Upstream:
    """A scripted OpenAI-compatible upstream: answers[i] is the i-th answer request's text (the last one
    repeats); a critique request (introspection) gets CRITIQUE. Records every request body."""

    def __init__(self, answers: list[str], honours_continuation: bool = True):
        self.answers, self.honours = answers, honours_continuation
        self.bodies: list[dict] = []
        self.answer_bodies: list[dict] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        if body["messages"][-1]["content"] == INTROSPECTION_PROMPT:
            assert not body.get("stream")
            return httpx.Response(200, json=completion(CRITIQUE))
        if body.get("continue_final_message") and not self.honours:
            return httpx.Response(400, json={"error": {"message": "unknown field"}})
        text = self.answers[min(len(self.answer_bodies), len(self.answers) - 1)]
        self.answer_bodies.append(body)
        if not body.get("stream"):
            return httpx.Response(200, json=completion(text))
        lines = [json.dumps(chunk({"content": w})) for w in words(text)]
        lines += [json.dumps(chunk({}, "stop")), "[DONE]"]
        return httpx.Response(200, content="".join(f"data: {x}\n\n" for x in lines).encode(),
                              headers={"content-type": "text/event-stream"})

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handler), base_url="http://u/v1")


def completion(text: str) -> dict:
    return {"id": "up-1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


def chunk(delta: dict, finish: str | None = None) -> dict:
    return {"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def ask(guard, up: Upstream, stream: bool, **settings):
    app = create_app(guard, ServeSettings(upstream_url="http://u/v1", refusal_message=REFUSAL, keepalive_s=None,
                                          **settings), upstream=up.client())
    r = TestClient(app).post("/v1/chat/completions", json={"model": "m", "stream": stream,
                                                           "messages": [{"role": "user", "content": PROMPT}]})
    assert r.status_code == 200, r.text
    if not stream:
        d = r.json()
        return d["choices"][0]["message"]["content"], d["choices"][0]["finish_reason"], d["qguard"], [d["id"]]
    evts = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]
    assert r.text.rstrip().endswith("data: [DONE]")
    assert not any("error" in e for e in evts), evts
    text = "".join(c["delta"].get("content", "") for e in evts for c in e["choices"])
    finish = [c["finish_reason"] for e in evts for c in e["choices"] if c["finish_reason"]]
    assert len(finish) == 1
    info = next(e["qguard"] for e in evts if "qguard" in e)
    return text, finish[0], info, [e["id"] for e in evts]


def tokens(guard, text: str) -> int:
    return len(encode_text(guard.tokenizer, text))


# ------------------------------------------------------------------------------ cut and refuse

@pytest.mark.parametrize("hold", [0, 1, 2, 5])
@pytest.mark.parametrize("mode", ["cut", "refuse"])
def test_streamed_cut_and_refuse_never_show_the_unsafe_token(guard, mode, hold):
    bad, after_bad = unsafe_char(guard, HARM)
    up = Upstream([HARM])
    text, finish, info, _ = ask(guard, up, True, on_unsafe=mode, hold_tokens=hold)
    assert finish == "content_filter" and info["blocked"] == "response"
    released = text[:-len("\n" + REFUSAL)] if mode == "refuse" else text
    if mode == "refuse":
        assert text.endswith("\n" + REFUSAL)
    else:
        assert REFUSAL not in text
    assert HARM.startswith(released)
    if hold >= 1:
        assert len(released) <= bad  # nothing at or after the unsafe position
    else:
        assert len(released) <= after_bad  # stream-first: the first token of the deciding pair may show
    leak = info["leak_control"]
    assert leak["on_unsafe"] == mode and leak["hold_tokens"] == hold and leak["retries"] == 0
    assert leak["refused"] is (mode == "refuse") and leak["rolled_back_tokens"] == 0
    # the held text the client never got: up to the last word the upstream sent before the cut
    assert leak["wait_tokens"] > 0 and leak["released"]["label"] == "Safe"


def test_hold_back_releases_the_text_behind_the_window(guard):
    """A bigger window releases less before the cut (the window is what holds it), and a safe answer is
    released whole at its end whatever the window."""
    got = {}
    for hold in (1, 5):
        text, *_ = ask(guard, Upstream([HARM]), True, on_unsafe="cut", hold_tokens=hold)
        got[hold] = text
    assert len(got[5]) < len(got[1])
    # the released text is exactly the words before the window, counted in guard tokens
    bad, _ = unsafe_char(guard, HARM)
    assert tokens(guard, HARM[len(got[5]):bad]) >= 5 - 1
    for hold in (0, 5, 40):
        text, finish, info, _ = ask(guard, Upstream([SAFE_START + SAFE_CONT]), True, hold_tokens=hold)
        assert text == SAFE_START + SAFE_CONT and finish == "stop"
        assert info["leak_control"]["wait_tokens"] == 0 and info["leak_control"]["released"]["label"] == "Safe"


@pytest.mark.parametrize("hold", [0, 1, 2, 5])
@pytest.mark.parametrize("mode", ["cut", "refuse"])
def test_unstreamed_cut_and_refuse_release_nothing_of_the_answer(guard, mode, hold):
    text, finish, info, _ = ask(guard, Upstream([HARM]), False, on_unsafe=mode, hold_tokens=hold)
    assert finish == "content_filter" and text == ("" if mode == "cut" else REFUSAL)
    assert info["leak_control"]["wait_tokens"] == tokens(guard, HARM) and info["leak_control"]["retries"] == 0


# ------------------------------------------------------------------------------ rollback

@pytest.mark.parametrize("buffer", [1, 2, 5])
def test_streamed_rollback_continues_the_safe_prefix(guard, buffer):
    bad, _ = unsafe_char(guard, HARM)
    up = Upstream([HARM, SAFE_CONT])
    text, finish, info, ids = ask(guard, up, True, on_unsafe="rollback", buffer_tokens=buffer,
                                  upstream_continuation=True)
    assert finish == "stop" and len(set(ids)) == 1  # one continuous answer
    assert text.endswith(SAFE_CONT)
    prefix = text[:-len(SAFE_CONT)]
    assert HARM.startswith(prefix) and len(prefix) <= bad  # the discarded buffer never reached the client
    assert "Safety note" not in text and "bomb" not in text
    # what the upstream was asked: the safe prefix plus the nudge, continued
    retry = up.answer_bodies[1]
    assert retry["continue_final_message"] is True and retry["add_generation_prompt"] is False
    assert retry["messages"][-1] == {"role": "assistant", "content": prefix + NUDGE}
    assert retry["messages"][:-1] == up.answer_bodies[0]["messages"]
    leak = info["leak_control"]
    discarded = HARM[len(prefix):]
    assert leak["retries"] == 1 and not leak["refused"]
    assert leak["rolled_back_tokens"] == leak["wait_tokens"] > 0
    # everything the upstream sent after the prefix was discarded, up to the chunk that tipped the verdict
    assert leak["rolled_back_tokens"] <= tokens(guard, discarded)
    assert leak["released"]["label"] == "Safe"
    assert info["response"]["label"] == guard.classify_response(PROMPT, text).label.value


def test_streamed_rollback_with_introspection_and_fresh_request(guard):
    up = Upstream([HARM, SAFE_CONT], honours_continuation=False)
    text, finish, info, _ = ask(guard, up, True, on_unsafe="rollback", buffer_tokens=3, intervention="introspect")
    assert finish == "stop" and text.endswith(SAFE_CONT) and CRITIQUE not in text and "Reflection" not in text
    prefix = text[:-len(SAFE_CONT)]
    critique_req = next(b for b in up.bodies if b["messages"][-1]["content"] == INTROSPECTION_PROMPT)
    assert critique_req["messages"][-2]["role"] == "assistant"
    assert critique_req["messages"][-2]["content"].startswith(prefix)  # the discarded branch is critiqued
    assert "bomb" in critique_req["messages"][-2]["content"]
    retry = up.answer_bodies[1]
    assert "continue_final_message" not in retry  # a fresh request: the intervention as an instruction
    instruction = CONTINUE_INSTRUCTION.format(intervention=f"Reflection on your previous answer: {CRITIQUE}")
    assert retry["messages"][-2:] == [{"role": "assistant", "content": prefix},
                                      {"role": "user", "content": instruction}]
    leak = info["leak_control"]
    assert leak["wait_tokens"] == leak["rolled_back_tokens"] + tokens(guard, CRITIQUE)


def test_introspection_with_continuation_inserts_the_critique(guard):
    up = Upstream([HARM, SAFE_CONT])
    text, *_ = ask(guard, up, True, on_unsafe="rollback", buffer_tokens=2, intervention="introspect",
                   upstream_continuation=True)
    prefix = text[:-len(SAFE_CONT)]
    assert up.answer_bodies[1]["messages"][-1]["content"] == prefix + INTROSPECTION_INSERT.format(critique=CRITIQUE)


def test_rollback_retries_are_bounded_then_refused(guard):
    up = Upstream([HARM, HARM_CONT])  # every continuation is harmful again
    text, finish, info, ids = ask(guard, up, True, on_unsafe="rollback", buffer_tokens=2, max_retries=3,
                                  upstream_continuation=True)
    assert len(up.answer_bodies) == 1 + 3 and finish == "content_filter" and len(set(ids)) == 1
    assert text.endswith("\n" + REFUSAL) and "bomb" not in text
    leak = info["leak_control"]
    assert leak["retries"] == 3 and leak["refused"] and leak["released"]["label"] == "Safe"
    assert leak["wait_tokens"] >= leak["rolled_back_tokens"] > 0
    for b in up.answer_bodies[1:]:  # each retry continues from what the client has, never the discarded
        assert "bomb" not in b["messages"][-1]["content"]


def test_unstreamed_rollback_asks_again(guard):
    up = Upstream([HARM, SAFE_START + SAFE_CONT])
    text, finish, info, _ = ask(guard, up, False, on_unsafe="rollback", upstream_continuation=True)
    assert text == SAFE_START + SAFE_CONT and finish == "stop"
    assert up.answer_bodies[1]["messages"][-1] == {"role": "assistant", "content": NUDGE}
    leak = info["leak_control"]
    assert leak["retries"] == 1 and leak["rolled_back_tokens"] == leak["wait_tokens"] == tokens(guard, HARM)
    up = Upstream([HARM, SAFE_CONT])
    text, finish, info, _ = ask(guard, up, False, on_unsafe="rollback")  # fresh request: a system note
    assert text == SAFE_CONT and up.answer_bodies[1]["messages"][0] == {"role": "system", "content": NUDGE_INSTRUCTION}
    up = Upstream([HARM])
    text, finish, info, _ = ask(guard, up, False, on_unsafe="rollback", max_retries=2)
    assert text == REFUSAL and finish == "content_filter" and len(up.answer_bodies) == 3
    assert info["leak_control"]["wait_tokens"] == 3 * tokens(guard, HARM)


# ------------------------------------------------------------------------------ eval-intervention

def test_eval_intervention_reports_both_runs(guard, tmp_path, capsys):
    from qguard.cli.intervention import evaluate, read_prompts

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        first = body["messages"][0]["content"]
        retried = body["messages"][-1]["role"] == "assistant" or body["messages"][0]["role"] == "system"
        text = SAFE_CONT if retried else HARM if "lighthouse" in first else " It is sunny today."
        if not body.get("stream"):
            return httpx.Response(200, json=completion(text))
        lines = [json.dumps(chunk({"content": w})) for w in words(text)] + [json.dumps(chunk({}, "stop")), "[DONE]"]
        return httpx.Response(200, content="".join(f"data: {x}\n\n" for x in lines).encode(),
                              headers={"content-type": "text/event-stream"})

    f = tmp_path / "prompts.jsonl"
    f.write_text(json.dumps({"prompt": PROMPT}) + "\n" + json.dumps({"prompt": "How is the weather?"}) + "\n")
    prompts = read_prompts(f)
    base = httpx.Client(transport=httpx.MockTransport(handler), base_url="http://u/v1")
    up = httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://u/v1")
    summary, rows = evaluate(guard, guard, prompts, "m", base, up, buffer_tokens=3, intervention="nudge",
                             continuation=True)
    assert summary["baseline"]["safety_rate"] == 0.5 and summary["rollback"]["safety_rate"] == 1.0
    assert summary["rollback"]["mean_retries"] == 0.5 and summary["rollback"]["refusals"] == 0
    assert rows[0]["baseline"] == HARM and rows[0]["rollback"].endswith(SAFE_CONT) and "bomb" not in rows[0]["rollback"]
    assert summary["rollback"]["mean_wait_tokens"] == rows[0]["wait_tokens"] / 2 > 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n')
    from qguard.errors import InputError

    with pytest.raises(InputError, match="line 1"):
        read_prompts(bad)


def test_serve_options_map_onto_the_settings(capsys):
    from qguard.cli import build_parser
    from qguard.cli.serve import leak_settings

    p = build_parser()
    args = p.parse_args(["serve", "--hold-tokens", "0", "--on-unsafe", "rollback", "--buffer-tokens", "8",
                         "--max-retries", "2", "--intervention", "introspect", "--upstream-continuation"])
    assert leak_settings(args) == {"hold_tokens": 0, "on_unsafe": "rollback", "buffer_tokens": 8, "max_retries": 2,
                                   "intervention": "introspect", "upstream_continuation": True}
    assert leak_settings(p.parse_args(["serve"])) == {}  # the defaults: ServeSettings' (and a policy file's)
    with pytest.raises(SystemExit):
        p.parse_args(["serve", "--hold-tokens", "-1"])
    assert "non-negative integer" in capsys.readouterr().err
