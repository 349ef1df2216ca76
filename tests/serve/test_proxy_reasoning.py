"""The live proxy reads an upstream's streamed reasoning in the official layout: `<think>\\n{reasoning}\\n
</think>\\n\\n{answer}` (spec section 3; what `models.answer_text` gives a whole answer), the session in
thinking mode, `</think>` a real control token, `moderate_thinking` respected.

The guard is test_leak_control's: the tiny Stream checkpoint edited so that a response token is Unsafe
exactly when it is " bomb" or " explosives", every prompt Safe. The reference is computed apart from the
proxy: a `StreamGuard` session opened in thinking mode and pushed the ids of the rendered turn
(`stream_layout`, the full-forward reader's ids), in one push. The upstream is an httpx MockTransport.
"""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient

from qguard.families.stream import stream_layout
from qguard.guard import Guard
from qguard.runtime.stream import AsyncStreamSession, StreamGuard
from qguard.serve import ServeSettings, create_app
from qguard.tokenizer import END_THINK
from tests.serve import test_leak_control as leak
from tests.serve.test_leak_control import guard  # noqa: F401  (the trigger guard, a module fixture)

PROMPT = leak.PROMPT
REASONING = " The user wants a story about a keeper. I will keep it calm and kind."
BAD_REASONING = " The user wants a story. I could mention a bomb bomb with explosives here."
ANSWER = leak.SAFE_START + leak.SAFE_CONT


def with_moderate_thinking(g: Guard, moderate_thinking: bool) -> Guard:
    return Guard(g.kind, g.name, g.tokenizer, g.policy, g.model, g.labels, g.debounce_rule,
                 moderate_thinking=moderate_thinking)


def upstream(parts: list[tuple[str, str]]) -> httpx.AsyncClient:
    """Streams `parts` ((delta key, text), one word per chunk); a part whose key is "mixed" is one chunk
    holding the last reasoning word and the first content word (text "reasoning|content")."""

    def handler(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content).get("stream")
        deltas = []
        for key, text in parts:
            if key == "mixed":
                r, c = text.split("|")
                deltas.append({"reasoning_content": r, "content": c})
            else:
                deltas += [{key: w} for w in leak.words(text)]
        lines = [json.dumps(leak.chunk(d)) for d in deltas] + [json.dumps(leak.chunk({}, "stop")), "[DONE]"]
        return httpx.Response(200, content="".join(f"data: {x}\n\n" for x in lines).encode(),
                              headers={"content-type": "text/event-stream"})

    return httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://u/v1")


class Spy:
    """What the proxy's guard sessions were opened in and pushed as ids (never their text)."""

    def __init__(self, monkeypatch):
        self.opened: list[bool] = []
        self.ids: list[int] = []
        open_async, push = StreamGuard.open_async, AsyncStreamSession.push

        async def spy_open(sg, messages, **kw):
            self.opened.append(kw.get("thinking", False))
            return await open_async(sg, messages, **kw)

        async def spy_push(s, ids):
            self.ids += list(ids)
            return await push(s, ids)

        monkeypatch.setattr(StreamGuard, "open_async", spy_open)
        monkeypatch.setattr(AsyncStreamSession, "push", spy_push)


def ask(g: Guard, parts: list[tuple[str, str]], **settings) -> tuple[dict[str, str], str, dict]:
    """(released text per delta key, finish_reason, the reply's qguard object)."""
    app = create_app(g, ServeSettings(upstream_url="http://u/v1", keepalive_s=None, max_context=1024,
                                      refusal_message=leak.REFUSAL, **settings), upstream=upstream(parts))
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json={"model": "m", "stream": True,
                                                 "messages": [{"role": "user", "content": PROMPT}]})
    assert r.status_code == 200, r.text
    assert r.text.rstrip().endswith("data: [DONE]")
    evts = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]
    assert not any("error" in e for e in evts), evts
    out: dict[str, str] = {}
    for e in evts:
        for ch in e["choices"]:
            for k, v in ch["delta"].items():
                if isinstance(v, str) and k != "role":
                    out[k] = out.get(k, "") + v
    finish = [ch["finish_reason"] for e in evts for ch in e["choices"] if ch["finish_reason"]]
    assert len(finish) == 1
    return out, finish[0], next(e["qguard"] for e in evts if "qguard" in e)


def reference(g: Guard, reasoning: str, answer: str, moderate_thinking: bool) -> dict:
    """The verdict of a session in thinking mode pushed the rendered turn's ids (the official layout)."""
    msgs = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": f"{reasoning}</think>\n\n{answer}"}]
    lay = stream_layout(g.tokenizer, msgs)
    sg = g.stream_guard(max_sessions=1, max_context=1024)
    try:
        with sg.open(msgs[:1], thinking=True, moderate_thinking=moderate_thinking) as s:
            start = len(s.prompt_ids)
            assert lay.ids[:start] == s.prompt_ids  # the prompt without the empty think block
            assert END_THINK in lay.ids[start:lay.answer_end]
            s.push(lay.ids[start:lay.answer_end])
            return s.finish().to_dict()
    finally:
        sg.close()


def same_verdict(got: dict, want: dict) -> None:
    for k in ("label", "categories", "unsafe_position", "n_tokens"):
        assert got[k] == want[k], (k, got, want)
    for name, p in want["probs"].items():
        assert got["probs"][name] == pytest.approx(p, abs=1e-3)


@pytest.mark.parametrize("moderate_thinking", [True, False])
@pytest.mark.parametrize("mixed", [False, True])
def test_streamed_reasoning_is_judged_in_the_official_layout(guard, monkeypatch, moderate_thinking, mixed):  # noqa: F811
    g = with_moderate_thinking(guard, moderate_thinking)
    spy = Spy(monkeypatch)
    head, last = REASONING.rsplit(" ", 1)
    first, rest = ANSWER[:len(" Sure,")], ANSWER[len(" Sure,"):]
    parts = ([("reasoning_content", head), ("mixed", f" {last}|{first}"), ("content", rest)] if mixed
             else [("reasoning_content", REASONING), ("content", ANSWER)])
    out, finish, info = ask(g, parts)
    # released whole, each text under its own key, exactly as the upstream sent it
    assert finish == "stop" and out == {"reasoning_content": REASONING, "content": ANSWER}
    assert spy.opened[-1] is True and END_THINK in spy.ids  # thinking mode; `</think>` the control token
    same_verdict(info["response"], reference(g, REASONING, ANSWER, moderate_thinking))


@pytest.mark.parametrize("moderate_thinking", [True, False])
def test_harmful_reasoning_is_blocked_only_when_thinking_is_moderated(guard, moderate_thinking):  # noqa: F811
    g = with_moderate_thinking(guard, moderate_thinking)
    out, finish, info = ask(g, [("reasoning_content", BAD_REASONING), ("content", ANSWER)], on_unsafe="cut")
    want = reference(g, BAD_REASONING, ANSWER, moderate_thinking)
    if moderate_thinking:
        # cut in the reasoning: no answer text, the reasoning only up to before the unsafe pair
        assert finish == "content_filter" and info["blocked"] == "response" and "content" not in out
        released = out.get("reasoning_content", "")
        assert BAD_REASONING.startswith(released) and " bomb bomb" not in released  # (stream-first at hold 0)
        assert info["response"]["label"] == "Unsafe" and want["label"] == "Unsafe"
        assert info["response"]["unsafe_position"] == want["unsafe_position"]
    else:
        # the reasoning gets no verdicts (the answer still reads it in its context): released whole
        assert finish == "stop" and out == {"reasoning_content": BAD_REASONING, "content": ANSWER}
        same_verdict(info["response"], want)
        assert want["label"] == "Safe"


@pytest.mark.parametrize("buffer", [0, 5])
def test_a_cut_in_the_reasoning_reports_the_released_prefix_in_the_same_layout(guard, buffer):  # noqa: F811
    """on_unsafe=rollback keeps a checkpoint session (pushed the released text); only content rolls back,
    so a cut in the reasoning refuses, and the released text's verdict is the checkpoint's: it must read
    the released reasoning in the same layout."""
    bad = REASONING * 3 + BAD_REASONING
    out, finish, info = ask(guard, [("reasoning_content", bad), ("content", ANSWER)],
                            on_unsafe="rollback", max_retries=1, buffer_tokens=buffer)
    assert finish == "content_filter" and info["blocked"] == "response"
    leak_info = info["leak_control"]
    assert leak_info["retries"] == 0 and leak_info["refused"] is True and leak_info["hold_tokens"] == buffer
    released = out["reasoning_content"]
    assert released and bad.startswith(released) and " bomb bomb" not in released
    if buffer:
        assert " bomb" not in released
    assert out["content"] == "\n" + leak.REFUSAL  # the refusal, after no answer text
    same_verdict(leak_info["released"], reference(guard, released, "", True))


def test_reasoning_after_the_answer_began_is_answer_text(guard, monkeypatch):  # noqa: F811
    """A malformed stream (reasoning after content) cannot switch the layout: all of it is answer text,
    read by a session in answer mode as it always was."""
    spy = Spy(monkeypatch)
    out, finish, info = ask(guard, [("content", ANSWER), ("reasoning_content", REASONING)])
    assert finish == "stop" and out == {"content": ANSWER, "reasoning_content": REASONING}
    assert spy.opened == [False] and spy.ids == []
    sg = guard.stream_guard(max_sessions=1, max_context=1024)
    try:
        with sg.open([{"role": "user", "content": PROMPT}]) as s:
            s.push_text(ANSWER + REASONING)
            want = s.finish().to_dict()
    finally:
        sg.close()
    same_verdict(info["response"], want)


def test_an_answer_without_reasoning_keeps_one_session_in_answer_mode(guard, monkeypatch):  # noqa: F811
    spy = Spy(monkeypatch)
    out, finish, _ = ask(guard, [("content", ANSWER)])
    assert finish == "stop" and out == {"content": ANSWER}
    assert spy.opened == [False] and spy.ids == []
