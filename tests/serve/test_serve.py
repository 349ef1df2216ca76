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
        self.name, self.kind, self.live, self.policy = "kw", guard.kind, guard.live, Policy()
        self.tokenizer, self.max_len = guard.tokenizer, guard.max_len

    def classify_conversations(self, convs):
        return [self.classify_messages(c) for c in convs]

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


def test_a_full_server_refuses_the_guarded_routes_only(guard):
    c = client(guard, max_concurrency=0)
    body = {"messages": [{"role": "user", "content": "hi"}]}
    r = c.post("/v1/moderate", json=body)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert c.post("/v1/chat/completions", json={"model": "m", **body}).status_code == 429
    assert c.get("/health").status_code == 200  # takes no slot


def test_a_new_surface_is_one_router(guard, tiny_stream):
    from fastapi import APIRouter

    from qguard.serve.deps import GuardedRoute, StateDep

    guarded, plain = APIRouter(route_class=GuardedRoute), APIRouter()

    @guarded.post("/v1/echo")
    async def echo(state: StateDep):
        return {"model": state.name, "in_use": state.slots.in_use}

    @plain.post("/v1/plain")
    async def plain_echo(state: StateDep):
        return {"in_use": state.slots.in_use}

    app = create_app(guard, ServeSettings(api_keys=frozenset({"k"})))
    app.include_router(guarded)
    app.include_router(plain)
    c, auth = TestClient(app), {"authorization": "Bearer k"}
    assert c.post("/v1/echo").status_code == 401  # behind the gate's key check like every /v1/ route
    assert c.post("/v1/echo", headers=auth).json() == {"model": tiny_stream.name, "in_use": 1}  # holds a slot
    assert c.post("/v1/plain", headers=auth).json() == {"in_use": 0}
    assert app.state.slots.in_use == 0


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
        end = {"id": "up", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        yield f"data: {json.dumps(end)}\n\n".encode()
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
    kg.live = False  # a Gen guard
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
    assert r.status_code == 429 and r.json()["error"] == {
        "type": "rate_limit_error", "message": "the upstream LLM is rate-limiting requests (HTTP 429); retry later",
        "param": None, "code": "rate_limit_exceeded"}
    r = post_chat(KeywordGuard(guard), answering(400, {"error": {
        "message": "max_tokens too large", "type": "invalid_request_error", "code": "context_length_exceeded",
        "param": "max_tokens"}}), messages=msgs)
    assert r.status_code == 400 and r.json()["error"] == {
        "type": "invalid_request_error", "param": "max_tokens", "code": "context_length_exceeded",
        "message": "the upstream LLM rejected the request (HTTP 400, type invalid_request_error, code "
                   "context_length_exceeded, param max_tokens)"}
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
        for d in [*self.deltas, None]:
            choice = {"index": 0, "delta": d or {}, "finish_reason": None if d else "stop"}
            yield f"data: {json.dumps({'id': 'chatcmpl-9a9b9c', 'created': 9, 'choices': [choice]})}\n\n".encode()
        yield b"data: [DONE]\n\n"


def test_streamed_reasoning_and_tool_arguments_are_judged(guard):
    kg = KeywordGuard(guard)
    kg.live = False  # a Gen guard: buffered path, judged as one text
    for deltas in ([{"reasoning_content": "I will write the B"}, {"reasoning_content": "AD plan"}, {"content": "ok"}],
                   [{"tool_calls": [{"index": 0, "function": {"name": "w", "arguments": "{\"t\": \"BA"}}]},
                    {"tool_calls": [{"index": 0, "function": {"arguments": "D\"}"}}]}]):
        up = httpx.AsyncClient(transport=httpx.MockTransport(lambda r, d=deltas: httpx.Response(200, stream=DeltaStream(d))),
                               base_url="http://u/v1")
        evts = events(post_chat(kg, up, stream=True, messages=[{"role": "user", "content": "hi"}]))
        assert evts[-2]["qguard"]["blocked"] == "response" and evts[-2]["id"] == "chatcmpl-9a9b9c"


def test_unauthenticated_requests_learn_nothing_from_validation(guard):
    app = create_app(guard, ServeSettings(api_keys=frozenset({"k"})))
    c = TestClient(app)
    r = c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.json()["error"]["type"] == "invalid_request_error"  # OpenAI's own answer to a bad key
    assert c.get("/health").status_code == 200


def test_a_dropped_client_frees_a_non_streaming_request():
    import asyncio

    from qguard.serve.app import until_disconnect
    from qguard.serve.errors import APIError

    class Gone:
        async def is_disconnected(self):
            return True

    async def main():
        started = asyncio.Event()

        async def slow():
            started.set()
            await asyncio.sleep(60)

        work = asyncio.ensure_future(slow())
        with pytest.raises(APIError) as e:
            await until_disconnect(Gone(), work)
        await asyncio.sleep(0)
        return e.value.status_code, work.cancelled(), started.is_set()

    assert asyncio.run(main()) == (499, True, True)


# ------------------------------------------------------------------ fail closed (issue 14, defect 2)

def chunks_of(deltas, finish="stop", **choice_extra):
    """Upstream SSE chunks: one per delta, then a finish_reason chunk."""
    out = [{"id": "chatcmpl-7e7f7a", "object": "chat.completion.chunk", "created": 7, "model": "m",
            "choices": [{"index": 0, "delta": d, "finish_reason": None, **choice_extra}]} for d in deltas]
    if finish:
        out.append({"id": "chatcmpl-7e7f7a", "object": "chat.completion.chunk", "created": 7, "model": "m",
                    "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    return out


class ChunkStream(httpx.AsyncByteStream):
    """An upstream SSE body of whole chunk objects (optionally pausing before each)."""

    def __init__(self, chunks, pause=0.0):
        self.chunks, self.pause = chunks, pause

    async def __aiter__(self):
        import asyncio

        for c in self.chunks:
            if self.pause:
                await asyncio.sleep(self.pause)
            yield f"data: {json.dumps(c)}\n\n".encode()
        yield b"data: [DONE]\n\n"


def stream_app(g, chunks, pause=0.0, **settings):
    up = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(200, stream=ChunkStream(chunks, pause))),
                           base_url="http://u/v1")
    return create_app(g, ServeSettings(upstream_url="http://u/v1", refusal_message="[removed]", **settings), upstream=up)


def stream_events(app, prompt="hi"):
    r = TestClient(app).post("/v1/chat/completions",
                             json={"model": "m", "stream": True, "messages": [{"role": "user", "content": prompt}]})
    assert r.status_code == 200
    return events(r), r


def finishes(evts):
    return [c.get("finish_reason") for e in evts if isinstance(e, dict) for c in e.get("choices") or []
            if c.get("finish_reason")]


def words_answer(n=40):
    return [f"word{i} " for i in range(n)]


def test_a_guard_fault_mid_stream_is_an_error_event_and_nothing_unjudged(guard, monkeypatch, caplog):
    from qguard.stream import AsyncStreamSession

    judged, calls = [], []
    real = AsyncStreamSession.push_text

    async def faulty(self, delta):
        calls.append(delta)
        if len(calls) == 3:
            raise RuntimeError(f"guard fault on {delta!r}")  # a message that quotes content
        out = await real(self, delta)
        judged.append(len("".join(calls)) - len(self.pending_text))
        return out

    monkeypatch.setattr(AsyncStreamSession, "push_text", faulty)
    deltas = words_answer()
    evts, _ = stream_events(stream_app(allow_all(guard), chunks_of([{"content": d} for d in deltas])))
    errors = [e for e in evts if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and errors[0]["error"]["type"] == "server_error" and evts[-1] == "[DONE]"
    assert "guard fault" not in errors[0]["error"]["message"]  # internals stay in the server log
    assert evts.index(errors[0]) == len(evts) - 2  # the error ends the stream
    assert "stop" not in finishes(evts) and not any("qguard" in e for e in evts if isinstance(e, dict))
    sent = text_of(evts)
    assert "".join(deltas).startswith(sent) and len(sent) <= judged[-1]  # only what the guard judged
    assert "internal error RuntimeError" in caplog.text and calls[2] not in caplog.text  # no content logged


def test_a_prompt_too_long_for_the_live_context_is_the_clients_400(guard):
    app = stream_app(allow_all(guard), chunks_of([{"content": "x"}]), max_context=32)
    r = TestClient(app).post("/v1/chat/completions", json={"model": "m", "stream": True, "messages": [
        {"role": "user", "content": " ".join(f"word{i}" for i in range(40))}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_a_gen_guard_fault_is_an_error_event_with_nothing_sent(guard):
    kg = KeywordGuard(guard)
    kg.live = False  # a Gen guard
    real = kg.classify_messages

    def faulty(messages):
        if messages[-1]["role"] == "assistant":
            raise RuntimeError("guard fault")
        return real(messages)

    kg.classify_messages = faulty
    evts, _ = stream_events(stream_app(kg, chunks_of([{"content": d} for d in words_answer(5)])))
    assert evts[-2]["error"]["type"] == "server_error" and evts[-1] == "[DONE]"
    assert text_of(evts[:-2]) == "" and "stop" not in finishes(evts)


@pytest.mark.parametrize("fail_on", ["user", "assistant"])
def test_a_guard_fault_without_streaming_is_a_json_error(guard, fail_on):
    kg = KeywordGuard(guard)
    real = kg.classify_messages

    def faulty(messages):
        if messages[-1]["role"] == fail_on:
            raise RuntimeError("guard fault")
        return real(messages)

    kg.classify_messages = faulty
    r = post_chat(kg, upstream_with({"role": "assistant", "content": "fine"}), messages=[{"role": "user", "content": "hi"}])
    assert r.status_code == 500 and r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["type"] == "server_error" and "fine" not in r.text


# ------------------------------------------------------------------ unjudged text (defect 4)

@pytest.mark.parametrize("message", [
    {"role": "assistant", "content": None, "function_call": {"name": "write", "arguments": "{\"text\": \"BAD plan\"}"}},
    {"role": "assistant", "content": None, "refusal": "I refuse, but here is the BAD plan"},
    {"role": "assistant", "content": [{"type": "refusal", "refusal": "BAD plan"}]},
    {"role": "assistant", "content": "ok", "reasoning": "the BAD plan"},
])
def test_legacy_function_calls_and_refusals_are_judged(guard, message):
    d = post_chat(KeywordGuard(guard), upstream_with(message), messages=[{"role": "user", "content": "hi"}]).json()
    assert d["qguard"]["blocked"] == "response" and "BAD" not in json.dumps(d["choices"])


def test_fields_qguard_does_not_judge_never_reach_the_client(guard):
    def handler(request):
        return httpx.Response(200, json={
            "id": "up-3", "object": "chat.completion", "created": 3, "model": "m", "x_vendor": "BAD top",
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": {"content": [{"token": "BAD"}]},
                         "message": {"role": "assistant", "content": "fine", "audio": {"transcript": "BAD audio"},
                                     "annotations": [{"text": "BAD note"}]}}]})
    up = httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://u/v1")
    r = post_chat(KeywordGuard(guard), up, messages=[{"role": "user", "content": "hi"}])
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "fine"
    assert "BAD" not in r.text


def gen_keyword_guard(guard):
    kg = KeywordGuard(guard)
    kg.live = False  # a Gen guard: buffered path, judged as one text
    return kg


@pytest.mark.parametrize("deltas", [
    [{"function_call": {"name": "w", "arguments": "{\"t\": \"BA"}}, {"function_call": {"arguments": "D\"}"}}],
    [{"refusal": "no: B"}, {"refusal": "AD"}],
    [{"content": [{"type": "text", "text": "B"}]}, {"content": [{"type": "text", "text": "AD"}]}],
])
def test_streamed_function_calls_and_refusals_are_judged(guard, deltas):
    evts, r = stream_events(stream_app(gen_keyword_guard(guard), chunks_of(deltas)))
    assert evts[-2]["qguard"]["blocked"] == "response" and "BA" not in r.text


def test_every_choice_of_a_chunk_is_judged(guard):
    chunk = {"id": "up", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": "fine "}}, {"index": 0, "delta": {"content": "BAD"}}]}
    chunks = [chunk, *chunks_of([])]
    evts, r = stream_events(stream_app(gen_keyword_guard(guard), chunks))
    assert evts[-2]["qguard"]["blocked"] == "response" and "BAD" not in r.text
    evts, r = stream_events(stream_app(allow_all(guard), chunks))  # live: both are pushed, then released
    assert text_of(evts) == "fine BAD"


def test_the_live_proxy_sends_its_own_chunks_with_judged_fields_only(guard):
    deltas = [{"role": "assistant", "content": "", "x_vendor": "zzz"},
              {"reasoning_content": "thinking "}, {"content": "Hello", "audio": {"transcript": "zzz"}},
              {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                               "function": {"name": "look", "arguments": "{\"q\": "}}]},
              {"tool_calls": [{"index": 0, "function": {"arguments": "\"up\"}"}}]},
              {"refusal": " no"}, {"function_call": {"name": "f", "arguments": "{}"}}]
    g = allow_all(guard)
    evts, r = stream_events(stream_app(g, chunks_of(deltas, logprobs={"content": [{"token": "zzz"}]})))
    assert "zzz" not in r.text and "logprobs" not in r.text
    assert all(e["id"] == "chatcmpl-7e7f7a" and e["created"] == 7 for e in evts if isinstance(e, dict))
    merged: dict = {}
    for e in evts[:-2]:
        for c in e["choices"]:
            for k, v in c["delta"].items():
                if k == "tool_calls":
                    for t in v:
                        m = merged.setdefault(("tool", t["index"]), {"id": t.get("id"), "args": "", "name": ""})
                        m["args"] += t["function"].get("arguments", "")
                        m["name"] += t["function"].get("name", "")
                elif k == "function_call":
                    m = merged.setdefault("function_call", {"name": "", "arguments": ""})
                    for kk, vv in v.items():
                        m[kk] += vv
                elif k != "role":
                    merged[k] = merged.get(k, "") + v
    assert merged == {"reasoning_content": "thinking ", "content": "Hello", "refusal": " no",
                      ("tool", 0): {"id": "call_1", "args": "{\"q\": \"up\"}", "name": "look"},
                      "function_call": {"name": "f", "arguments": "{}"}}
    assert finishes(evts) == ["stop"] and evts[-3]["choices"][0]["finish_reason"] == "stop"
    # everything the client got was judged: the live verdict covers every pushed field, the reasoning in
    # the official layout (`<think>` ... `</think>`, what a whole answer's `answer_text` gives)
    judged = "thinking </think>\n\nHello" + "look{\"q\": \"up\"}" + " no" + "f{}"
    offline = g.classify_response("hi", judged)
    assert evts[-2]["qguard"]["response"]["label"] == offline.label.value
    assert evts[-2]["qguard"]["response"]["n_tokens"] > evts[-2]["qguard"]["prompt"]["n_tokens"]


@pytest.fixture(scope="module")
def unsafe_answer_guard(tiny_stream, tmp_path_factory):
    """The tiny model with both heads' norms zeroed (uniform scores: argmax is index 0) and index 0 of the
    response head named Unsafe: every prompt is Safe, every answer token Unsafe."""
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("unsafe_answer") / "ck"
    shutil.copytree(tiny_stream, d)
    sd = load_file(str(d / "model.safetensors"))
    sd["query_risk_level_category_layernorm.weight"].zero_()
    sd["risk_level_category_layernorm.weight"].zero_()
    save_file(sd, str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    cfg["response_risk_level_map"] = {"0": "Unsafe", "1": "Safe", "2": "Controversial"}
    (d / "config.json").write_text(json.dumps(cfg))
    return Guard.from_pretrained(d)


# no punctuation, no spaces: one pre-tokenizer chunk, which the incremental tokenizer holds to the end
CHINESE = "我来告诉你怎样一步一步地完成这件事情首先你需要准备很多材料然后按照下面的步骤慢慢地去做" * 2


def test_the_uncommitted_tail_is_held_until_judged(unsafe_answer_guard):
    g = unsafe_answer_guard
    assert not g.classify_prompt("hi").blocked and g.classify_response("hi", CHINESE).blocked
    deltas = [{"content": CHINESE[i:i + 8]} for i in range(0, len(CHINESE), 8)]
    evts, r = stream_events(stream_app(g, chunks_of(deltas)))
    assert text_of(evts) == "[removed]" and finishes(evts) == ["content_filter"]  # no "stop", no answer text
    assert CHINESE[:2] not in r.text


def test_the_finish_reason_follows_the_judged_tail(guard):
    g = allow_all(guard)
    deltas = [{"content": CHINESE[i:i + 8]} for i in range(0, len(CHINESE), 8)]
    evts, _ = stream_events(stream_app(g, chunks_of(deltas)))
    stop = next(i for i, e in enumerate(evts) if isinstance(e, dict) and finishes([e]) == ["stop"])
    assert text_of(evts[:stop]) == CHINESE and text_of(evts[stop:]) == ""
    assert evts[-2]["qguard"]["response"]["label"] == g.classify_response("hi", CHINESE).label.value


def test_release_cursor_releases_exactly_the_judged_prefix():
    import random

    from qguard.serve.proxy import ReleaseCursor
    from qguard.serve.sse import DeltaWriter

    rnd = random.Random(0)
    for _ in range(200):
        cur, writer, pushed, got = ReleaseCursor(), DeltaWriter(), "", {}
        for _ in range(rnd.randint(1, 8)):
            pieces = [((rnd.choice(["content", "refusal"]),), "".join(rnd.choice("ab ") for _ in range(rnd.randint(1, 5))))
                      for _ in range(rnd.randint(1, 3))]
            pushed += cur.add(pieces)
            judged = rnd.randint(cur.released, len(pushed))
            for path, text in cur.release(judged):
                got[path[0]] = got.get(path[0], "") + text
            assert cur.released == judged and sum(map(len, got.values())) == judged
        cur.release(len(pushed))
        assert cur.held == 0 and writer.delta([(("content",), "x")])["role"] == "assistant"


# ------------------------------------------------------------------ smaller server defects (defect 7)

class CountingGuard(KeywordGuard):
    def __init__(self, guard):
        super().__init__(guard)
        self.calls = 0

    def classify_messages(self, messages):
        self.calls += 1
        return super().classify_messages(messages)


def test_request_bodies_over_the_limit_are_refused_before_they_are_read(guard):
    g = CountingGuard(guard)
    app = create_app(g, ServeSettings(upstream_url="http://u/v1", max_request_bytes=2000),
                     upstream=upstream_with({"role": "assistant", "content": "x"}))
    c = TestClient(app)
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]}
    r = c.post("/v1/chat/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"

    def chunked():  # no content-length: counted as it is read
        data = json.dumps(big).encode()
        for i in range(0, len(data), 500):
            yield data[i:i + 500]
    r = c.post("/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert g.calls == 0
    assert c.post("/v1/moderate", json={"messages": [{"role": "user", "content": "hi"}]}).status_code == 200


def test_an_answer_longer_than_the_guards_context_is_a_server_error(guard):
    g = allow_all(guard)
    g.max_len = 48  # the prompt fits, the answer does not
    long = " ".join(f"word{i}" for i in range(80))
    r = post_chat(g, upstream_with({"role": "assistant", "content": long}), messages=[{"role": "user", "content": "hi"}])
    assert r.status_code == 502 and r.json()["error"]["type"] == "server_error"
    assert r.json()["error"]["code"] == "guard_context_exceeded" and "word1" not in r.text


def test_a_streamed_answer_longer_than_the_live_context_is_a_server_error(guard):
    deltas = words_answer(60)
    evts, _ = stream_events(stream_app(allow_all(guard), chunks_of([{"content": d} for d in deltas]), max_context=48))
    assert evts[-2]["error"]["type"] == "server_error" and evts[-2]["error"]["code"] == "guard_context_exceeded"
    assert "stop" not in finishes(evts) and "".join(deltas).startswith(text_of(evts[:-2]))


def test_upstream_timeouts_are_504_with_openai_shape(guard):
    def slow(request):
        raise httpx.ReadTimeout("slow", request=request)
    up = httpx.AsyncClient(transport=httpx.MockTransport(slow), base_url="http://u/v1")
    r = post_chat(allow_all(guard), up, messages=[{"role": "user", "content": "hi"}])
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
    up = httpx.AsyncClient(transport=httpx.MockTransport(slow), base_url="http://u/v1")
    evts = events(post_chat(allow_all(guard), up, stream=True, messages=[{"role": "user", "content": "hi"}]))
    assert evts[0]["error"]["code"] == "upstream_timeout" and evts[-1] == "[DONE]"


def test_keep_alive_comments_while_the_upstream_is_slow(guard):
    app = stream_app(allow_all(guard), chunks_of([{"content": "Hello"}, {"content": " there"}]), pause=0.3,
                     keepalive_s=0.02)
    evts, r = stream_events(app)
    assert ": keep-alive\n\n" in r.text and text_of(evts) == "Hello there"


def test_health_names_the_model_without_its_path(guard, tiny_stream):
    c = client(guard)
    h = c.get("/health").json()
    assert h["model"] == tiny_stream.name and str(tiny_stream.parent) not in json.dumps(h)
    m = c.post("/v1/moderate", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert m["model"] == tiny_stream.name


def test_docs_pages_are_off_unless_asked_for(guard):
    c = client(guard)
    assert [c.get(p).status_code for p in ("/docs", "/redoc", "/openapi.json")] == [404, 404, 404]
    assert client(guard, docs=True).get("/openapi.json").status_code == 200


def test_qguard_replies_have_real_ids_and_times(guard):
    import re
    import time

    c = client(KeywordGuard(guard))
    t0 = int(time.time())
    a, b = (c.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "BAD"}]}).json()
            for _ in range(2))
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", a["id"]) and a["id"] != b["id"]
    assert t0 <= a["created"] <= int(time.time())
    s = events(c.post("/v1/chat/completions", json={"model": "m", "stream": True,
                                                    "messages": [{"role": "user", "content": "BAD"}]}))[0]
    assert s["id"].startswith("chatcmpl-") and s["id"] != "chatcmpl-qguard" and s["created"] >= t0


def test_no_tokenization_on_the_event_loop_for_a_huge_upstream_chunk(guard, monkeypatch):
    import asyncio
    import inspect

    import qguard.families.stream
    import qguard.incremental
    import qguard.runtime.stream
    import qguard.tokenizer

    on_loop, off_loop = [], []

    def watch(fn):
        def wrapped(*a, **kw):
            try:
                asyncio.get_running_loop()
                on_loop.append(fn.__name__)
            except RuntimeError:
                off_loop.append(fn.__name__)
            return fn(*a, **kw)
        return wrapped

    # every way in to the tokenizer
    for mod in (qguard.tokenizer, qguard.incremental, qguard.runtime.stream, qguard.families.stream):
        for name, fn in list(vars(mod).items()):
            if inspect.isfunction(fn) and (name.startswith("encode") or name in ("render_chat", "chat_ids",
                                                                                 "stream_layout", "prepare_chat")):
                monkeypatch.setattr(mod, name, watch(fn))
    huge = "word " * 200_000  # 1 MB in one chunk: far past the live context
    evts, _ = stream_events(stream_app(allow_all(guard), chunks_of([{"content": huge}]), max_context=256))
    assert off_loop and on_loop == []
    assert evts[-2]["error"]["code"] == "guard_context_exceeded" and text_of(evts[:-2]) == ""


# ------------------------------------------------------------------ HTTP errors and verdicts (defect 8)

def test_http_errors_use_openai_types(guard):
    c = client(guard)
    cases = [c.post("/v1/moderate", json={"messages": [{"role": "user", "content": "   "}]}),
             c.post("/v1/moderate", json={"messages": []}),
             c.post("/v1/chat/completions", json={"model": "m", "n": 3, "messages": [{"role": "user", "content": "hi"}]}),
             c.get("/nowhere"),
             TestClient(create_app(allow_all(guard), ServeSettings())).post(
                 "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})]
    openai_types = {"invalid_request_error", "rate_limit_error", "server_error", "service_unavailable_error"}
    for r in cases:
        err = r.json()["error"]
        assert err["type"] in openai_types and set(err) >= {"message", "type", "param", "code"}, err
    assert cases[0].json()["error"]["type"] == "invalid_request_error"  # an InputError, not "InputError"


def test_http_verdicts_are_verdict_to_dict(guard):
    r = client(guard).post("/v1/moderate", json={"messages": [{"role": "user", "content": "How do I make a bomb?"}]})
    direct = guard.classify_prompt("How do I make a bomb?").to_dict()
    got = r.json()["verdict"]
    assert set(got) == set(direct)
    for k, v in direct.items():
        assert got[k] == (pytest.approx(v) if isinstance(v, (dict, float)) else v), k


def test_serve_flags_reach_the_settings(monkeypatch, tiny_stream):
    import uvicorn

    from qguard.cli import main

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    assert main(["serve", "-m", str(tiny_stream), "--upstream-timeout", "7.5", "--keepalive", "3",
                 "--max-request-bytes", "1000", "--docs"]) == 0
    s = seen["app"].state.settings
    assert (s.upstream_timeout_s, s.keepalive_s, s.max_request_bytes, s.docs) == (7.5, 3.0, 1000, True)


def test_serve_max_upstream_line_bytes_flag(monkeypatch, tiny_stream):
    import uvicorn

    from qguard.cli import main

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app))
    assert main(["serve", "-m", str(tiny_stream), "--max-upstream-line-bytes", "5000"]) == 0
    assert seen["app"].state.settings.max_upstream_line_bytes == 5000 and seen["app"].state.max_line == 5000
    assert main(["serve", "-m", str(tiny_stream)]) == 0  # unset: derived from the guard's context
    assert seen["app"].state.settings.max_upstream_line_bytes is None and seen["app"].state.max_line > 5000
    with pytest.raises(SystemExit):
        main(["serve", "-m", str(tiny_stream), "--max-upstream-line-bytes", "0"])


def test_serve_warns_when_it_serves_the_starter_model(monkeypatch, caplog):
    import logging

    import uvicorn

    from qguard.cli import main

    monkeypatch.delenv("QGUARD_MODEL", raising=False)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    with caplog.at_level(logging.WARNING, logger="qguard.serve"):
        assert main(["serve"]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("starter" in m and "--model" in m and "QGUARD_MODEL" in m for m in warned), warned


# ------------------------------------------------------------------ red-team audit after issue 14

LEAK = "UNJUDGED-how-to-build-a-weapon-step-1"
LEAKY_TOP = {"id": f"id-{LEAK}", "created": f"created-{LEAK}", "model": f"model-{LEAK}",
             "system_fingerprint": f"fp-{LEAK}", "service_tier": f"tier-{LEAK}",
             "usage": {"prompt_tokens": 1, "completion_tokens": 2, "vendor_note": LEAK,
                       "completion_tokens_details": {"reasoning_tokens": 1, LEAK: 3}}}


def answering_json(top: dict, content: str):
    def handler(request):
        return httpx.Response(200, json={"object": "chat.completion", **top, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]})
    return httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://u/v1")


@pytest.mark.parametrize("answer", ["Fine answer.", "Sure, BAD stuff"])  # allowed, then blocked (refusal)
def test_upstream_top_level_fields_reach_the_client_only_in_their_shape(guard, answer):
    r = post_chat(KeywordGuard(guard), answering_json(LEAKY_TOP, answer), messages=[{"role": "user", "content": "hi"}])
    d = r.json()
    assert r.status_code == 200 and LEAK not in r.text
    assert d["model"] == "m" and isinstance(d["created"], int) and d["id"].startswith("chatcmpl-")
    assert d["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "completion_tokens_details": {"reasoning_tokens": 1}}
    assert "system_fingerprint" not in d and "service_tier" not in d
    chunks = [{**c, **LEAKY_TOP} for c in chunks_of([{"content": answer}])]
    evts, r = stream_events(stream_app(gen_keyword_guard(guard), chunks))
    assert LEAK not in r.text and evts[-1] == "[DONE]"
    assert all(e["model"] == "m" and type(e["created"]) is int for e in evts if isinstance(e, dict))
    # well-formed ones are kept: an opaque id, a time, a version of the requested model, a known tier
    good = {"id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT", "created": 1700000000, "model": "m-2024-08-06",
            "system_fingerprint": "fp_44709d6fcb", "service_tier": "default",
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
    d = post_chat(KeywordGuard(guard), answering_json(good, answer), messages=[{"role": "user", "content": "hi"}]).json()
    assert {k: d.get(k) for k in good} == good
    evts, _ = stream_events(stream_app(gen_keyword_guard(guard), [{**c, **good} for c in chunks_of([{"content": answer}])]))
    assert {(e["id"], e["created"], e["model"]) for e in evts if isinstance(e, dict)} == {
        (good["id"], good["created"], good["model"])}


def raw_stream_app(g, body: bytes, status=200, **settings):
    up = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(status, content=body)),
                           base_url="http://u/v1")
    return create_app(g, ServeSettings(upstream_url="http://u/v1", refusal_message="[removed]", **settings), upstream=up)


def sse_body(*events) -> bytes:
    return b"".join(e if isinstance(e, bytes) else f"data: {json.dumps(e)}\n\n".encode() for e in events)


FIRST = chunks_of([{"content": "The first part of the answer, "}], finish=None)
FINISH = chunks_of([])  # the finish_reason chunk alone


@pytest.mark.parametrize("body", [
    sse_body(*FIRST, {"object": "error", "message": "boom", "type": "InternalServerError", "code": 500}),  # vLLM
    sse_body(*FIRST, b"event: error\ndata: {\"message\": \"overloaded\"}\n\n"),
    sse_body(*FIRST),  # a clean end of the body, no finish_reason, no [DONE]
    sse_body(*FIRST, *FINISH),  # a finish_reason, but no [DONE]: cut short
    sse_body(*FIRST, b"data: [DONE]\n\n"),  # [DONE] without any finish_reason
    sse_body(*FIRST, {"choices": [], "error": {"message": "boom", "code": "upstream_died"}}),
    sse_body(*FIRST, {**FINISH[0], "error": {"message": "boom"}}, b"data: [DONE]\n\n"),
    sse_body(*FIRST, *FINISH, {"choices": [{"index": 0, "delta": {"content": " and more"}}]}, b"data: [DONE]\n\n"),
], ids=["vllm-error", "event-error", "eof", "eof-after-finish", "done-no-finish", "error-and-choices",
        "error-in-finish-chunk", "text-after-finish"])
def test_an_upstream_stream_that_does_not_end_properly_is_an_error(guard, body):
    evts, r = stream_events(raw_stream_app(allow_all(guard), body))
    errors = [e for e in evts if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and errors[0]["error"]["type"] == "server_error" and evts[-1] == "[DONE]"
    assert evts.index(errors[0]) == len(evts) - 2
    assert finishes(evts) == [] and not any("qguard" in e for e in evts if isinstance(e, dict))  # never a "stop"
    assert "boom" not in r.text and "overloaded" not in r.text


def test_a_proper_end_after_the_finish_reason_releases_it(guard):
    # usage after the finish_reason (stream_options.include_usage): still one stop, then usage
    usage = {"id": "chatcmpl-7e7f7a", "object": "chat.completion.chunk", "created": 7, "model": "m", "choices": [],
             "usage": {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}}
    evts, _ = stream_events(raw_stream_app(allow_all(guard), sse_body(*FIRST, *FINISH, usage, b"data: [DONE]\n\n")))
    assert finishes(evts) == ["stop"] and text_of(evts) == "The first part of the answer, "
    assert evts[-3]["usage"]["total_tokens"] == 10 and "response" in evts[-2]["qguard"]


SECRET = "SECRETPAYLOAD how to build it"


@pytest.mark.parametrize("log_content", [False, True])
def test_upstream_error_text_is_never_relayed(guard, caplog, log_content):
    import logging

    msgs = [{"role": "user", "content": "hi"}]
    cases = [(500, {"error": {"message": SECRET, "type": "server_error"}}, 502),
             (400, {"error": {"message": SECRET, "code": "context_length_exceeded"}}, 400),
             (404, {"error": {"message": SECRET, "code": "model not found: " + SECRET}}, 404)]
    with caplog.at_level(logging.INFO, logger="qguard.serve"):
        for status, body, want in cases:
            for stream in (False, True):
                up = httpx.AsyncClient(transport=httpx.MockTransport(lambda r, s=status, b=body: httpx.Response(s, json=b)),
                                       base_url="http://u/v1")
                app = create_app(allow_all(guard), ServeSettings(upstream_url="http://u/v1", log_content=log_content),
                                 upstream=up)
                r = TestClient(app).post("/v1/chat/completions", json={"model": "m", "stream": stream, "messages": msgs})
                err = (events(r)[0] if stream else r.json())["error"]
                assert SECRET not in r.text and "SECRET" not in r.text
                assert stream or r.status_code == want
                assert err["code"] == ("context_length_exceeded" if status == 400 else
                                       "upstream_error" if status == 500 else None)
                assert f"HTTP {status}" in err["message"]
        evts, r = stream_events(raw_stream_app(allow_all(guard), sse_body(*FIRST, b"event: error\ndata: "
                                                                          + json.dumps({"error": {"message": SECRET}}).encode()
                                                                          + b"\n\n"), log_content=log_content))
        assert SECRET not in r.text and "mid-stream" in evts[-2]["error"]["message"]
    assert (SECRET in caplog.text) == log_content  # the upstream's text only in a log the operator opted into


HARMFUL_TOOL = {"type": "function", "function": {"name": "lookup", "description": "fine", "parameters": {
    "type": "object", "properties": {"q": {"type": "string", "description": "fine"}}}}}


def with_bad(path: list, value="BAD plan"):
    import copy

    tool = copy.deepcopy(HARMFUL_TOOL)
    node = tool
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return tool


@pytest.mark.parametrize("body", [
    {"tools": [HARMFUL_TOOL, with_bad(["function", "description"])]},
    {"tools": [with_bad(["function", "parameters", "properties", "q", "description"])]},
    {"tools": [with_bad(["function", "name"], "BAD_plan")]},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "BAD_plan": {"type": "string"}}}}}]},  # a parameter's name is text the LLM reads too
    {"functions": [{"name": "f", "description": "BAD plan"}]},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"description": "BAD"}}}},
    {"messages": [{"role": "user", "name": "BAD plan", "content": "Please follow the instructions."}]},
    {"messages": [{"role": "user", "content": "Look it up."},
                  {"role": "assistant", "content": "", "reasoning_content": "BAD plan", "tool_calls": [
                      {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "done"}]},
], ids=["tool-description", "parameter-description", "tool-name", "parameter-name", "legacy-functions",
        "response-format", "message-name", "history-reasoning"])
def test_every_request_text_the_llm_reads_is_judged(guard, body):
    calls = []
    body = {"messages": [{"role": "user", "content": "Please follow the instructions."}], **body}
    r = post_chat(KeywordGuard(guard), upstream_with({"role": "assistant", "content": "ok"}, calls), **body)
    d = r.json()
    assert r.status_code == 200 and d["qguard"]["blocked"] == "prompt" and calls == []  # the LLM never saw it
    fine = json.loads(json.dumps(body).replace("BAD", "good"))
    r = post_chat(KeywordGuard(guard), upstream_with({"role": "assistant", "content": "ok"}, calls), **fine)
    assert r.status_code == 200 and "blocked" not in r.json()["qguard"] and calls[0]["messages"] == fine["messages"]


@pytest.mark.parametrize("body,field", [
    ({"documents": [{"text": "BAD"}]}, "documents"),
    ({"chat_template": "{{ 'BAD' }}"}, "chat_template"),
    ({"messages": [{"role": "user", "content": "hi", "x_note": "BAD"}]}, "messages[0].x_note"),
    ({"messages": [{"role": "user", "content": [{"type": "x_text", "x_text": "BAD"}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
                   {"role": "tool", "tool_call_id": "a BAD id", "content": "x"}]}, "messages[2].tool_call_id"),
])
def test_request_fields_qguard_does_not_judge_are_refused(guard, body, field):
    calls = []
    body = {"messages": [{"role": "user", "content": "hi"}], **body}
    r = post_chat(KeywordGuard(guard), upstream_with({"role": "assistant", "content": "ok"}, calls), **body)
    assert r.status_code == 400 and r.json()["error"]["param"] == field and calls == []
    assert "BAD" not in r.text


def test_request_fields_without_text_and_non_text_parts_pass(guard):
    calls = []
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                      {"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}],
            "top_k": 20, "chat_template_kwargs": {"enable_thinking": False}, "stop": ["END"], "user": "u-1",
            "tool_choice": "auto"}
    r = post_chat(KeywordGuard(guard), upstream_with({"role": "assistant", "content": "A cat."}, calls), **body)
    assert r.status_code == 200 and calls[0]["top_k"] == 20 and calls[0]["chat_template_kwargs"] == {"enable_thinking": False}


def test_tool_turns_are_judged_without_being_flagged_as_spoofing(guard, caplog):
    import logging

    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "18C, sunny"}]
    answer = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c2", "type": "function", "function": {"name": "notify", "arguments": "{}"}}]}
    with caplog.at_level(logging.WARNING):
        r = post_chat(allow_all(guard), upstream_with(answer), messages=msgs)
    assert r.status_code == 200 and "response" in r.json()["qguard"]
    assert "chat-control" not in caplog.text  # qguard's own rendering of tool turns is not spoofing
    bad = [*msgs[:-1], {"role": "tool", "tool_call_id": "c1", "content": "BAD instructions"}]
    assert post_chat(KeywordGuard(guard), upstream_with({"role": "assistant", "content": "ok"}),
                     messages=bad).json()["qguard"]["blocked"] == "prompt"  # tool results are still judged


def test_token_bound_is_a_lower_bound():
    import random

    from qguard.serve.limits import TokenBound
    from qguard.tokenizer import encode_text, load_tokenizer

    tok = load_tokenizer(None)
    bound = TokenBound(tok)
    rnd = random.Random(0)
    alphabet = ["a", " ", "  ", "\n", "e\u0301", "\u1100\u1161\u11a8", "\u03b1\u0314\u0342\u0345", "我", "😀", "=", "<|im_end|>"]
    for _ in range(300):
        text = "".join(rnd.choice(alphabet) * rnd.randint(1, 200) for _ in range(rnd.randint(1, 6)))
        assert bound.at_least(text) <= len(encode_text(tok, text)), text[:40]


def watch_pushes(monkeypatch) -> list[int]:
    from qguard.stream import AsyncStreamSession

    sizes, real = [], AsyncStreamSession.push_text

    async def push(self, delta):
        sizes.append(len(delta))
        return await real(self, delta)

    monkeypatch.setattr(AsyncStreamSession, "push_text", push)
    return sizes


def test_a_huge_upstream_line_is_refused_before_it_is_read_whole(guard, monkeypatch):
    sizes = watch_pushes(monkeypatch)
    huge = chunks_of([{"content": "word " * 400_000}])  # one 2 MB line
    app = stream_app(allow_all(guard), chunks_of([{"content": "Hello "}], finish=None) + huge, max_context=256)
    evts, r = stream_events(app)
    assert evts[-2]["error"]["code"] == "guard_context_exceeded" and "stop" not in finishes(evts)
    assert max(sizes) < 100 and "word" not in r.text
    assert app.state.settings.max_upstream_line_bytes is None  # the default, derived from the context


def test_a_delta_that_cannot_fit_the_context_is_refused_before_it_is_tokenized(guard, monkeypatch):
    sizes = watch_pushes(monkeypatch)
    big = "word " * 60_000  # 300 kB: under the line limit set here, far over the 256-token context
    app = stream_app(allow_all(guard), chunks_of([{"content": "Hello "}, {"content": big}]), max_context=256,
                     max_upstream_line_bytes=1 << 20)
    evts, _ = stream_events(app)
    assert evts[-2]["error"]["code"] == "guard_context_exceeded" and "stop" not in finishes(evts)
    assert max(sizes) < 100  # the big delta never reached the shared step thread
    kg = gen_keyword_guard(guard)  # a Gen guard's buffered answer is bounded the same way
    evts, _ = stream_events(stream_app(kg, chunks_of([{"content": "x" * (kg.max_len * 200)}]),
                                       max_upstream_line_bytes=8 << 20))
    assert evts[-2]["error"]["code"] == "guard_context_exceeded"


def test_a_huge_prompt_is_refused_before_it_is_tokenized(guard, monkeypatch):
    import qguard.serve.deps

    tokenized = []
    real = qguard.serve.deps.GuardRunner._call
    monkeypatch.setattr(qguard.serve.deps.GuardRunner, "_call", lambda self, fn, *a: tokenized.append(1) or real(self, fn, *a))
    g = allow_all(guard)
    big = "word " * (g.max_len * 30)
    for stream in (False, True):
        r = post_chat(g, upstream_with({"role": "assistant", "content": "x"}), stream=stream,
                      messages=[{"role": "user", "content": big}])
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = post_chat(g, upstream_with({"role": "assistant", "content": "x"}), messages=[{"role": "user", "content": "hi"}],
                  tools=[{"type": "function", "function": {"name": "f", "description": big}}])
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools[0]"
    assert tokenized == []
    # an answer too long for the guard is refused untokenized too (a server-side condition)
    r = post_chat(g, upstream_with({"role": "assistant", "content": big}), messages=[{"role": "user", "content": "hi"}])
    assert r.status_code == 502 and r.json()["error"]["code"] == "guard_context_exceeded" and len(tokenized) == 1
