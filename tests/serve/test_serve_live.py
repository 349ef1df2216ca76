"""The proxy as deployed: uvicorn on 127.0.0.1, a scripted OpenAI-compatible upstream on 127.0.0.1 (its own
uvicorn), the official `openai` SDK as the healthy clients and raw sockets for clients that drop mid-stream.
Everything is loopback only and bounded in count and time (a few seconds on two cores)."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading

import pytest

from qguard import Guard
from qguard.policy import Action, Policy
from qguard.serve import ServeSettings, create_app
from tests.served import Served, wait_for

openai = pytest.importorskip("openai")

KEY = "k-test"


@pytest.fixture(scope="module")
def guard(tiny_stream):
    g = Guard.from_pretrained(tiny_stream)
    # allow everything, so every healthy stream runs to its end (the verdicts are still computed)
    return Guard(g.kind, g.name, g.tokenizer, Policy(default_action=Action.ALLOW), g.model, g.labels)


FAULTS = {  # upstream stream endings that are errors, whatever they look like (the audit's shapes)
    "fault vllm": b'data: {"object": "error", "message": "SECRET engine died", "code": 500}\n\n',
    "fault event": b'event: error\ndata: {"message": "SECRET overloaded"}\n\n',
    "fault eof": b"",
    "fault choices": b'data: {"choices": [], "error": {"message": "SECRET"}}\n\n',
}


def answer_for(prompt: str) -> str:
    n = int(prompt.split()[-1]) if prompt.split()[-1].isdigit() else 0
    return f"Answer {n}: " + " ".join(f"w{(n * 7 + k) % 50}" for k in range(12 + n % 9)) + "."


class Upstream:
    """A scripted OpenAI-compatible LLM (raw ASGI). The answer to prompt P is `answer_for(P)`, streamed in
    small deltas with a short pause each; the prompt "hang" gets no answer: the request waits until its
    client goes away, which the upstream counts."""

    def __init__(self, pause: float = 0.01):
        self.pause = pause
        self.requests = self.active = self.disconnects = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                m = await receive()
                await send({"type": m["type"] + ".complete"})
                if m["type"] == "lifespan.shutdown":
                    return
        body, more = b"", True
        while more:
            m = await receive()
            body, more = body + m.get("body", b""), m.get("more_body", False)
        req = json.loads(body)
        prompt = req["messages"][-1]["content"]
        self.requests += 1
        self.active += 1
        try:
            if prompt == "hang":
                m = await asyncio.wait_for(receive(), 30)  # uvicorn: http.disconnect when the client goes away
                if m["type"] == "http.disconnect":
                    self.disconnects += 1
                return
            answer = answer_for(prompt)
            if not req.get("stream"):
                data = {"id": "up-1", "object": "chat.completion", "created": 1, "model": req["model"],
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                     "finish_reason": "stop"}]}
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": json.dumps(data).encode()})
                return
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
            if prompt in FAULTS:  # a stream that starts well, then ends in one of the non-standard ways
                first = {"id": "chatcmpl-5a5b5c", "object": "chat.completion.chunk", "created": 5, "model": req["model"],
                         "choices": [{"index": 0, "delta": {"content": "The first part of the answer, "}}]}
                await send({"type": "http.response.body", "body": f"data: {json.dumps(first)}\n\n".encode() + FAULTS[prompt]})
                return
            pieces = [answer[i:i + 5] for i in range(0, len(answer), 5)]
            for i, piece in enumerate([*pieces, None]):
                delta = {"role": "assistant", "content": piece} if i == 0 else {} if piece is None else {"content": piece}
                chunk = {"id": f"up-{prompt}", "object": "chat.completion.chunk", "created": 5, "model": req["model"],
                         "choices": [{"index": 0, "delta": delta, "finish_reason": None if piece else "stop"}]}
                await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(),
                            "more_body": True})
                await asyncio.sleep(self.pause)
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        finally:
            self.active -= 1


def raw_request(port: int, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
    return s


def reset(s: socket.socket) -> None:
    """Close abruptly: SO_LINGER 0 makes the kernel send a TCP RST instead of a graceful FIN."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def drop_mid_stream(port: int, n: int, rounds: int, errors: list) -> None:
    """A client that opens a stream, reads until the first data event (or only the headers), then resets."""
    try:
        for r in range(rounds):
            s = raw_request(port, {"model": "m", "stream": True,
                                   "messages": [{"role": "user", "content": f"question {100 + n}"}]})
            got, want = b"", b"data:" if (n + r) % 2 else b"\r\n\r\n"
            while want not in got:
                part = s.recv(4096)
                if not part:
                    break
                got += part
            reset(s)
    except Exception as e:  # reported by the test, not lost in a thread
        errors.append(e)


def proxy_app(guard, upstream_port: int, **settings):
    return create_app(guard, ServeSettings(api_keys=frozenset({KEY}), upstream_url=f"http://127.0.0.1:{upstream_port}/v1",
                                           **settings))


def no_leaks(app, upstream: Upstream) -> bool:
    live = getattr(app.state, "live_guard", None)
    return app.state.slots.in_use == 0 and upstream.active == 0 and (live is None or live.engine.active == 0)


def test_many_streams_survive_clients_that_drop(guard):
    """32 SDK streams at once while 16 raw clients drop mid-stream 3 times each: every healthy stream ends
    with its whole answer and a verdict equal to judging that text directly; nothing leaks afterwards."""
    upstream = Upstream()
    with Served(upstream) as up:
        app = proxy_app(guard, up.port, max_concurrency=64, max_context=256)
        with Served(app) as px:
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{px.port}/v1", api_key=KEY, max_retries=0,
                                        timeout=60)

            async def healthy(i: int):
                prompt = f"question {i}"
                stream = await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": prompt}], stream=True)
                text, finish, info = "", None, None
                async for chunk in stream:
                    if chunk.choices:
                        text += chunk.choices[0].delta.content or ""
                        finish = chunk.choices[0].finish_reason or finish
                    info = (chunk.model_extra or {}).get("qguard", info)
                return prompt, text, finish, info

            async def run():
                try:
                    return await asyncio.wait_for(asyncio.gather(*(healthy(i) for i in range(32))), 120)
                finally:
                    await client.close()

            errors: list = []
            droppers = [threading.Thread(target=drop_mid_stream, args=(px.port, n, 3, errors)) for n in range(16)]
            for t in droppers:
                t.start()
            results = asyncio.run(run())
            for t in droppers:
                t.join(60)
            assert not errors and not any(t.is_alive() for t in droppers)
            for prompt, text, finish, info in results:
                assert (text, finish) == (answer_for(prompt), "stop"), prompt
                direct = guard.classify_response(prompt, text)
                got = info["response"]
                assert (got["label"], got.get("unsafe_position")) == (direct.label.value, direct.unsafe_position), prompt
                assert got["probs"] == pytest.approx(direct.probs, abs=1e-4), prompt
            assert upstream.requests >= 32 + 16  # the droppers' requests reached the upstream too
            wait_for(lambda: no_leaks(app, upstream), 15, "every slot, session and upstream request to be freed")


def test_a_dropped_non_streaming_client_frees_its_slot_and_its_upstream_request(guard):
    upstream = Upstream()
    with Served(upstream) as up:
        app = proxy_app(guard, up.port)
        with Served(app) as px:
            s = raw_request(px.port, {"model": "m", "messages": [{"role": "user", "content": "hang"}]})
            wait_for(lambda: upstream.requests == 1, 20, "the request to reach the upstream")
            reset(s)
            # the proxy notices within its 0.25 s poll and cancels the upstream request: a bounded, generous wait
            wait_for(lambda: upstream.disconnects == 1, 5, "the upstream to see its request closed")
            wait_for(lambda: no_leaks(app, upstream), 5, "the slot to be freed")


def test_the_sdk_sees_a_guard_fault_as_an_error_not_a_short_answer(guard, monkeypatch):
    from qguard.stream import AsyncStreamSession

    real, calls = AsyncStreamSession.push_text, []

    async def faulty(self, delta):
        calls.append(delta)
        if len(calls) == 3:
            raise RuntimeError("guard fault")
        return await real(self, delta)

    monkeypatch.setattr(AsyncStreamSession, "push_text", faulty)
    upstream = Upstream(pause=0)
    with Served(upstream) as up:
        app = proxy_app(guard, up.port)
        with Served(app) as px:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{px.port}/v1", api_key=KEY, max_retries=0, timeout=30)
            got = []
            with pytest.raises(openai.APIError) as e:
                for chunk in client.chat.completions.create(
                        model="m", messages=[{"role": "user", "content": "question 3"}], stream=True):
                    got += [c.finish_reason for c in chunk.choices]
            assert "stop" not in got and "internal error" in str(e.value)
            wait_for(lambda: no_leaks(app, upstream), 5, "the failed stream's slot and session to be freed")


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_the_sdk_sees_a_broken_upstream_stream_as_an_error(guard, fault):
    upstream = Upstream(pause=0)
    with Served(upstream) as up:
        app = proxy_app(guard, up.port)
        with Served(app) as px:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{px.port}/v1", api_key=KEY, max_retries=0, timeout=30)
            got = []
            with pytest.raises(openai.APIError) as e:
                for chunk in client.chat.completions.create(model="m", messages=[{"role": "user", "content": fault}],
                                                            stream=True):
                    got += [c.finish_reason for c in chunk.choices if c.finish_reason]
            assert got == [] and "SECRET" not in str(e.value) and "upstream" in str(e.value)
            wait_for(lambda: no_leaks(app, upstream), 5, "the stream's slot and session to be freed")
