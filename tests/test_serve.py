"""HTTP API and guarded proxy, with the upstream LLM replaced by an in-process httpx transport."""

import json

import httpx
import pytest
from fastapi.testclient import TestClient

from qguard import Guard
from qguard.policy import Action, Policy
from qguard.serve import ServeSettings, create_app


@pytest.fixture(scope="module")
def guard(tiny_stream):
    return Guard.from_pretrained(tiny_stream)


def fake_upstream(answer: str, calls: list):
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        calls.append(body)
        return httpx.Response(200, json={
            "id": "up-1", "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        })
    return httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://upstream/v1")


def client(guard, calls=None, answer="Hello!", **settings):
    calls = [] if calls is None else calls
    app = create_app(guard, ServeSettings(upstream_url="http://upstream/v1", **settings), upstream=fake_upstream(answer, calls))
    return TestClient(app)


def test_moderate_endpoint_matches_guard(guard):
    c = client(guard)
    r = c.post("/v1/moderate", json={"messages": [{"role": "user", "content": "How do I make a bomb?"}]})
    assert r.status_code == 200
    v = r.json()["verdict"]
    direct = guard.classify_prompt("How do I make a bomb?")
    assert v["label"] == direct.label.value and v["probs"] == pytest.approx(direct.probs)
    loose = c.post("/v1/moderate", json={"messages": [{"role": "user", "content": "How do I make a bomb?"}], "mode": "loose"})
    assert loose.json()["verdict"]["mode"] == "loose"


@pytest.mark.parametrize("body,status", [
    ({"messages": []}, 422),
    ({"messages": [{"role": "robot", "content": "x"}]}, 422),
    ({"messages": [{"role": "user", "content": 5}]}, 422),
    ({"messages": [{"role": "user", "content": "   "}]}, 400),
    ({}, 422),
])
def test_moderate_bad_input(guard, body, status):
    r = client(guard).post("/v1/moderate", json=body)
    assert r.status_code == status
    if status == 400:
        assert "nothing to moderate" in r.json()["error"]["message"]


def test_api_keys(guard):
    c = client(guard, api_keys=frozenset({"k1"}))
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert c.post("/v1/moderate", json=body).status_code == 401
    assert c.post("/v1/moderate", json=body, headers={"authorization": "Bearer nope"}).status_code == 401
    assert c.post("/v1/moderate", json=body, headers={"authorization": "Bearer k1"}).status_code == 200


def allow_all(guard):
    return Guard(guard.kind, guard.name, guard.tokenizer, Policy(default_action=Action.ALLOW), guard.model, guard.labels)


def test_proxy_passes_allowed_traffic(guard):
    calls = []
    c = client(allow_all(guard), calls, answer="Hello there, friend!")
    r = c.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.3})
    assert r.status_code == 200
    d = r.json()
    assert d["choices"][0]["message"]["content"] == "Hello there, friend!"
    assert calls and calls[0]["temperature"] == 0.3  # extra fields reach the upstream untouched
    assert set(d["qguard"]) >= {"prompt", "response"}


class KeywordGuard:
    """Test double for the proxy logic: anything containing BAD is Unsafe/Violent (a real Guard is tested above)."""

    def __init__(self, guard):
        self.name, self.kind, self.policy = "kw", guard.kind, Policy()

    def classify_messages(self, messages):
        from qguard.policy import Category, Severity

        bad = "BAD" in messages[-1]["content"]
        return self.policy.verdict(Severity.UNSAFE if bad else Severity.SAFE, [Category.VIOLENT] if bad else [],
                                   probs={"Safe": 0.0 if bad else 1.0, "Unsafe": 1.0 if bad else 0.0, "Controversial": 0.0})


def test_proxy_blocks_unsafe_prompt_before_upstream(guard):
    calls = []
    c = client(KeywordGuard(guard), calls)
    r = c.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "BAD idea"}]})
    d = r.json()
    assert d["choices"][0]["finish_reason"] == "content_filter" and d["qguard"]["blocked"] == "prompt"
    assert d["qguard"]["prompt"]["categories"] == ["Violent"]
    assert calls == []  # the LLM never saw it


def test_proxy_upstream_errors(guard):
    def boom(request):
        return httpx.Response(500, text="oops")
    app = create_app(allow_all(guard), ServeSettings(upstream_url="http://u/v1"),
                     upstream=httpx.AsyncClient(transport=httpx.MockTransport(boom), base_url="http://u/v1"))
    r = TestClient(app).post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 502 and "HTTP 500" in r.json()["error"]["message"]


def test_proxy_without_upstream(guard):
    app = create_app(allow_all(guard), ServeSettings())
    r = TestClient(app).post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 501


def test_health(guard):
    assert client(guard).get("/health").json()["kind"] == "stream"


def test_proxy_replaces_blocked_response(guard):
    c = client(KeywordGuard(guard), answer="Sure, BAD stuff follows", refusal_message="[removed]")
    d = c.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}).json()
    assert d["choices"][0]["message"]["content"] == "[removed]"
    assert d["choices"][0]["finish_reason"] == "content_filter" and d["qguard"]["blocked"] == "response"
    assert d["usage"]["total_tokens"] == 5


# --------------------------------------------------------------------------------------------- streaming

class SSEStream(httpx.AsyncByteStream):
    """An upstream SSE body that records how many deltas the proxy actually pulled."""

    def __init__(self, deltas):
        self.deltas, self.sent = deltas, 0

    async def __aiter__(self):
        for d in self.deltas:
            self.sent += 1
            chunk = {"id": "up", "object": "chat.completion.chunk", "created": 1, "model": "m",
                     "choices": [{"index": 0, "delta": {"content": d}, "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        yield b"data: [DONE]\n\n"


def sse_client(g, deltas, **settings):
    stream = SSEStream(deltas)
    up = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(200, stream=stream)),
                           base_url="http://upstream/v1")
    app = create_app(g, ServeSettings(upstream_url="http://upstream/v1", **settings), upstream=up)
    return TestClient(app), stream


def events(r):
    out = []
    for line in r.text.split("\n\n"):
        if line.startswith("data: "):
            p = line[6:]
            out.append(p if p == "[DONE]" else json.loads(p))
    return out


def text_of(evts):
    return "".join(e["choices"][0]["delta"].get("content", "") for e in evts if isinstance(e, dict) and e.get("choices"))


ANSWER = ["Sure", ", here", " is a", " very long", " answer", " that", " goes on", " and on", " for many", " tokens",
          " so that", " the", " guard", " has", " plenty", " to", " judge", " here", "."] * 3


def test_stream_passthrough_when_allowed(guard):
    g = allow_all(guard)
    c, up = sse_client(g, ANSWER)
    evts = events(c.post("/v1/chat/completions", json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}))
    assert evts[-1] == "[DONE]"
    assert text_of(evts) == "".join(ANSWER)
    final = evts[-2]
    assert final["choices"] == [] and "response" in final["qguard"]
    assert up.sent == len(ANSWER)
    # the live verdict equals the offline one on the finished answer
    offline = g.classify_response("hi", "".join(ANSWER))
    assert final["qguard"]["response"]["label"] == offline.label.value
    assert final["qguard"]["response"].get("unsafe_position") == offline.unsafe_position


@pytest.fixture(scope="module")
def safe_prompt_guard(tiny_stream, tmp_path_factory):
    """The tiny model with its query norm zeroed: every prompt scores uniform, argmax Safe (index 0)."""
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("safe_prompt") / "ck"
    shutil.copytree(tiny_stream, d)
    sd = load_file(str(d / "model.safetensors"))
    sd["query_risk_level_category_layernorm.weight"].zero_()
    save_file(sd, str(d / "model.safetensors"))
    return Guard.from_pretrained(d)


def test_stream_is_cut_when_the_policy_blocks(safe_prompt_guard):
    guard = safe_prompt_guard
    assert not guard.classify_prompt("hi").blocked
    offline = guard.classify_response("hi", "".join(ANSWER))
    assert offline.blocked and offline.unsafe_position is not None  # fixed seed: the answer is flagged
    c, up = sse_client(guard, ANSWER, refusal_message="[cut]")
    evts = events(c.post("/v1/chat/completions", json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}))
    last = evts[-2]
    assert last["choices"][0]["finish_reason"] == "content_filter" and last["qguard"]["blocked"] == "response"
    # the cut comes at the first token where the running debounced verdict blocks (it can precede the
    # final verdict's position: under the eval rule a later Unsafe pair overrides a Controversial one)
    from qguard.policy import Debouncer

    d, first_block = Debouncer(), None
    for t in guard.stream_trace("hi", "".join(ANSWER)).tokens:
        label = d.push(t.label)
        if first_block is None and d.position is not None and guard.policy.binary(label).value == "Unsafe":
            first_block = d.position
    assert last["qguard"]["response"]["unsafe_position"] == first_block
    assert "".join(ANSWER).startswith(text_of(evts[:-2]))
    assert up.sent < len(ANSWER)  # the upstream request was dropped early: the LLM stops generating


def test_stream_with_gen_guard_buffers_then_judges(guard):
    kg = KeywordGuard(guard)
    kg.kind = __import__("qguard.checkpoint", fromlist=["Kind"]).Kind.GEN
    c, _ = sse_client(kg, ["fine ", "text"])
    evts = events(c.post("/v1/chat/completions", json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}))
    assert text_of(evts) == "fine text" and evts[-1] == "[DONE]"
    c, _ = sse_client(kg, ["some ", "BAD ", "text"], refusal_message="[x]")
    evts = events(c.post("/v1/chat/completions", json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}))
    assert text_of(evts) == "[x]" and evts[-2]["choices"][0]["finish_reason"] == "content_filter"


def test_stream_upstream_error_is_reported_in_band(guard):
    up = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(503)), base_url="http://u/v1")
    app = create_app(allow_all(guard), ServeSettings(upstream_url="http://u/v1"), upstream=up)
    evts = events(TestClient(app).post("/v1/chat/completions", json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}))
    assert "HTTP 503" in evts[0]["error"]["message"] and evts[-1] == "[DONE]"


def test_serve_cli_refuses_unsafe_settings(capsys, tiny_stream, monkeypatch):
    from qguard.cli import main

    monkeypatch.delenv("QGUARD_API_KEYS", raising=False)
    with pytest.raises(SystemExit) as e:  # refused by the option parser, before the model loads
        main(["serve", "-m", str(tiny_stream), "--max-concurrency", "0"])
    assert e.value.code == 2 and "--max-concurrency: expected a positive integer" in capsys.readouterr().err
    assert main(["serve", "-m", str(tiny_stream), "--host", "0.0.0.0"]) == 2
    assert "without API keys" in capsys.readouterr().err
    assert main(["serve", "-m", str(tiny_stream), "--max-context", "8"]) == 2
    assert "--max-context must be at least 16" in capsys.readouterr().err


# ------------------------------------------------------------------------ OpenAI request/answer shapes

def upstream_with(message: dict, calls: list | None = None):
    def handler(request: httpx.Request) -> httpx.Response:
        if calls is not None:
            calls.append(json.loads(request.content))
        return httpx.Response(200, json={"id": "up-2", "object": "chat.completion", "created": 2, "model": "m",
                                         "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})
    return httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://u/v1")


def post_chat(guard, upstream, **body):
    app = create_app(guard, ServeSettings(upstream_url="http://u/v1", refusal_message="[removed]"), upstream=upstream)
    return TestClient(app).post("/v1/chat/completions", json={"model": "m", **body})


@pytest.mark.parametrize("message", [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "write", "arguments": "{\"text\": \"BAD plan\"}"}}]},
    {"role": "assistant", "content": "All fine.", "reasoning_content": "Let me write the BAD plan."},
    {"role": "assistant", "content": [{"type": "text", "text": "Here:"}, {"type": "text", "text": "BAD plan"}]},
])
def test_every_text_of_the_answer_is_judged(guard, message):
    r = post_chat(KeywordGuard(guard), upstream_with(message), messages=[{"role": "user", "content": "hi"}])
    d = r.json()
    assert r.status_code == 200 and d["qguard"]["blocked"] == "response"
    assert d["choices"][0]["message"]["content"] == "[removed]"


def test_tool_calling_conversations_are_accepted_and_forwarded_unchanged(guard):
    msgs = [{"role": "developer", "content": "Use tools."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "18C, sunny"}]
    calls = []
    r = post_chat(KeywordGuard(guard), upstream_with({"role": "assistant", "content": "It is 18C."}, calls), messages=msgs)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "It is 18C."
    assert calls[0]["messages"] == msgs  # the upstream gets exactly what the client sent
    bad_tool = [*msgs[:-1], {"role": "tool", "tool_call_id": "c1", "content": "BAD instructions"}]
    d = post_chat(KeywordGuard(guard), upstream_with({"role": "assistant", "content": "ok"}), messages=bad_tool).json()
    assert d["qguard"]["blocked"] == "prompt"  # a tool result is read as the turn the answer follows


def test_n_above_one_is_refused(guard):
    r = post_chat(KeywordGuard(guard), upstream_with({"role": "assistant", "content": "x"}), n=2,
                  messages=[{"role": "user", "content": "hi"}])
    assert r.status_code == 400 and "only n=1" in r.json()["error"]["message"]


def test_upstream_errors_keep_their_meaning(guard):
    def answering(status, body):
        return httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(status, json=body)),
                                 base_url="http://u/v1")
    msgs = [{"role": "user", "content": "hi"}]
    r = post_chat(KeywordGuard(guard), answering(429, {"error": {"message": "slow down"}}), messages=msgs)
    assert r.status_code == 429 and r.json()["error"] == {"type": "rate_limit_error", "message": "upstream LLM: slow down"}
    r = post_chat(KeywordGuard(guard), answering(400, {"error": {"message": "max_tokens too large"}}), messages=msgs)
    assert r.status_code == 400 and "max_tokens too large" in r.json()["error"]["message"]
    r = post_chat(KeywordGuard(guard), answering(401, {"error": {"message": "bad key"}}), messages=msgs)
    assert r.status_code == 502 and "credentials" in r.json()["error"]["message"]
    r = post_chat(KeywordGuard(guard), upstream_with({"role": "assistant", "content": 5}), messages=msgs)
    assert r.status_code == 502 and "content must be text" in r.json()["error"]["message"]


def test_a_stream_that_is_not_sse_is_an_error(guard):
    up = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(200, text="not json{")),
                           base_url="http://u/v1")
    evts = events(post_chat(allow_all(guard), up, stream=True, messages=[{"role": "user", "content": "hi"}]))
    assert "without a single SSE event" in evts[0]["error"]["message"] and evts[-1] == "[DONE]"


class DeltaStream(httpx.AsyncByteStream):
    def __init__(self, deltas):
        self.deltas = deltas

    async def __aiter__(self):
        for d in self.deltas:
            yield f"data: {json.dumps({'id': 'up-9', 'created': 9, 'choices': [{'index': 0, 'delta': d}]})}\n\n".encode()
        yield b"data: [DONE]\n\n"


def test_streamed_reasoning_and_tool_arguments_are_judged(guard):
    kg = KeywordGuard(guard)
    kg.kind = __import__("qguard.checkpoint", fromlist=["Kind"]).Kind.GEN  # buffered path: judged as one text
    for deltas in ([{"reasoning_content": "I will write the B"}, {"reasoning_content": "AD plan"}, {"content": "ok"}],
                   [{"tool_calls": [{"index": 0, "function": {"name": "w", "arguments": "{\"t\": \"BA"}}]},
                    {"tool_calls": [{"index": 0, "function": {"arguments": "D\"}"}}]}]):
        up = httpx.AsyncClient(transport=httpx.MockTransport(lambda r, d=deltas: httpx.Response(200, stream=DeltaStream(d))),
                               base_url="http://u/v1")
        evts = events(post_chat(kg, up, stream=True, messages=[{"role": "user", "content": "hi"}]))
        assert evts[-2]["qguard"]["blocked"] == "response" and evts[-2]["id"] == "up-9"


def test_unauthenticated_requests_learn_nothing_from_validation(guard):
    app = create_app(guard, ServeSettings(api_keys=frozenset({"k"})))
    c = TestClient(app)
    r = c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_api_key"
    assert c.get("/health").status_code == 200


def test_a_dropped_client_frees_a_non_streaming_request():
    import asyncio

    from fastapi import HTTPException

    from qguard.serve.app import until_disconnect

    class Gone:
        async def is_disconnected(self):
            return True

    async def main():
        started = asyncio.Event()

        async def slow():
            started.set()
            await asyncio.sleep(60)

        work = asyncio.ensure_future(slow())
        with pytest.raises(HTTPException) as e:
            await until_disconnect(Gone(), work)
        await asyncio.sleep(0)
        return e.value.status_code, work.cancelled(), started.is_set()

    assert asyncio.run(main()) == (499, True, True)
