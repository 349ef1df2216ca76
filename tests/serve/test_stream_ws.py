"""`/v1/stream` as deployed: uvicorn on 127.0.0.1 in a thread, the real `websockets` client (sync and
asyncio) and qguard's own client. Loopback only; every loop bounded in count and time."""

from __future__ import annotations

import asyncio
import json

import pytest

from qguard import Guard
from qguard.serve import ServeSettings, create_app
from qguard.tokenizer import encode_text
from tests import served
from tests.serve import test_leak_control as leak  # its scripted answers and independent unsafe position
from tests.served import wait_for
from tests.trigger import BOMB, EXPLOSIVES, trigger_checkpoint

websockets = pytest.importorskip("websockets")
from websockets.sync.client import connect  # noqa: E402

PROMPT = "How do I bake bread at home?"
RESPONSE = ("Mix flour, water, salt and yeast; knead for ten minutes, let it rise for an hour, shape it, "
            "and bake at 230 degrees until the crust is brown. Ünïcödé ✓ works too.")
KEY = "k-stream"


class Served(served.Served):
    """The app served on 127.0.0.1; `url` is its `/v1/stream` endpoint."""

    def __init__(self, app):
        super().__init__(app)
        self.url = f"ws://127.0.0.1:{self.port}/v1/stream"


def serve(guard, **settings) -> Served:
    return Served(create_app(guard, ServeSettings(**settings)))


@pytest.fixture(scope="module")
def guard(tiny_stream):
    return Guard.from_pretrained(tiny_stream)


@pytest.fixture(scope="module")
def server(guard):
    with serve(guard, max_request_bytes=8192) as s:
        yield s


def dial(url: str, **kw):
    """A connection to close by hand (websockets >= 17.1 expects it entered)."""
    return connect(url, **kw).__enter__()


def call(ws, frame) -> dict:
    ws.send(frame if isinstance(frame, (str, bytes)) else json.dumps(frame))
    return json.loads(ws.recv(timeout=30))


def open_frame(prompt: str = PROMPT, **kw) -> dict:
    return {"type": "open", "messages": [{"role": "user", "content": prompt}], **kw}


def deltas(text: str, n: int = 7) -> list[str]:
    return [text[i:i + n] for i in range(0, len(text), n)]


def run_session(ws, text: str = RESPONSE) -> tuple[list[dict], dict]:
    """Open, push `text` as deltas, finish: the token dicts and the verdict frame."""
    assert call(ws, open_frame())["type"] == "prompt"
    tokens = []
    for d in deltas(text):
        r = call(ws, {"type": "push", "text": d})
        assert r["type"] == "tokens", r
        tokens += r["tokens"]
    end = call(ws, {"type": "finish"})
    assert end["type"] == "verdict"
    return tokens + end["tokens"], end


def trace_cli(model, capsys) -> list[dict]:
    from qguard.cli import main

    capsys.readouterr()
    assert main(["stream-trace", "--model", str(model), "--prompt", PROMPT, "--response", RESPONSE, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


# ------------------------------------------------------------------------------ verdicts

def test_text_deltas_give_the_labels_of_stream_trace(server, tiny_stream, capsys):
    lines = trace_cli(tiny_stream, capsys)
    cli_tokens, cli_verdict = lines[1:-1], lines[-1]["verdict"]
    with connect(server.url) as ws:
        opened = call(ws, open_frame())
        assert opened["verdict"]["label"] == lines[0]["prompt"]["label"]
        assert opened["blocked"] == (opened["verdict"]["action"] == "block")
        tokens, pending = [], []
        for d in deltas(RESPONSE):
            r = call(ws, {"type": "push", "text": d})
            tokens += r["tokens"]
            pending.append(r["pending_text"])
        end = call(ws, {"type": "finish"})
        tokens += end["tokens"]  # what finish committed comes with the verdict
    assert any(pending)  # the incremental tokenizer held text back, and the server said so
    assert [(t["token_id"], t["text"], t["label"]) for t in tokens] == \
           [(t["token_id"], t["text"], t["label"]) for t in cli_tokens]
    for t, c in zip(tokens, cli_tokens):
        assert t["probs"] == pytest.approx(c["probs"], abs=1e-4)
    assert "".join(t["text"] for t in tokens) == RESPONSE
    assert end["verdict"]["label"] == cli_verdict["label"]
    assert end["verdict"]["unsafe_position"] == cli_verdict["unsafe_position"]
    assert end["pending_text"] == ""
    wait_for(lambda: server.active() == 0, 10, "the finished session to be freed")


def test_ids_pushes_and_a_second_session_on_one_connection(server, guard):
    ids = guard.tokenizer.encode(RESPONSE, add_special_tokens=False)
    with connect(server.url) as ws:
        text_tokens, text_end = run_session(ws)
        assert call(ws, open_frame())["type"] == "prompt"  # the next session, same connection
        id_tokens = []
        for i in range(0, len(ids), 5):
            id_tokens += call(ws, {"type": "push", "ids": ids[i:i + 5]})["tokens"]
        end = call(ws, {"type": "finish"})
    assert [t["token_id"] for t in id_tokens] == ids
    assert [t["label"] for t in id_tokens] == [t["label"] for t in text_tokens]
    assert end["verdict"]["label"] == text_end["verdict"]["label"]


# ------------------------------------------------------------------------------ many connections

def test_concurrent_connections_share_batched_steps(server):
    from websockets.asyncio.client import connect as aconnect

    n, chunks = 16, deltas(RESPONSE, 12)

    async def one() -> list[str]:
        async with aconnect(server.url) as ws:
            async def rpc(frame):
                await ws.send(json.dumps(frame))
                return json.loads(await asyncio.wait_for(ws.recv(), 30))

            assert (await rpc(open_frame()))["type"] == "prompt"
            labels = []
            for d in chunks:
                labels += [t["label"] for t in (await rpc({"type": "push", "text": d}))["tokens"]]
            labels += [t["label"] for t in (await rpc({"type": "flush"}))["tokens"]]
            assert (await rpc({"type": "finish"}))["type"] == "verdict"
            return labels

    async def all_of_them():
        return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), 120)

    with connect(server.url) as ws:  # make the engine, so its stats can be read before the run
        run_session(ws, "ok")
    sg = server.app.state.live_guard
    before = sg.stats.steps
    results = asyncio.run(all_of_them())
    steps = sg.stats.steps - before
    assert all(r == results[0] for r in results)  # the same text judged alike in every connection
    pushes = n * (len(chunks) + 2)  # open (prefill) and the pushes of every connection
    assert steps < pushes, (steps, pushes)  # pushes from many connections shared batched steps
    wait_for(lambda: server.active() == 0, 10, "every session to be freed")


def test_a_dropped_connection_frees_its_session_at_once(server):
    ws = dial(server.url)
    call(ws, open_frame())
    call(ws, {"type": "push", "text": "Mix flour"})
    assert server.active() == 1
    ws.socket.close()  # gone without a close frame
    wait_for(lambda: server.active() == 0, 10, "the dropped connection's session to be freed")
    ws2 = dial(server.url)
    call(ws2, open_frame())
    ws2.close()  # a clean close without finish frees it too
    wait_for(lambda: server.active() == 0, 10, "the closed connection's session to be freed")


# ------------------------------------------------------------------------------ refused frames

def test_bad_frames_get_error_frames_and_lose_nothing(server, guard):
    with connect(server.url) as ws:
        clean, clean_end = run_session(ws)
    errors = [
        ("not json", "bad_frame"),
        ("[1, 2]", "bad_frame"),
        ('{"type": 3}', "bad_frame"),
        (b"\x00\x01", "bad_frame"),
        ({"type": "dance"}, "unknown_type"),
        ({"type": "push", "text": "x"}, "not_open"),
        ({"type": "finish"}, "not_open"),
        ({"type": "close"}, "not_open"),
        ({"type": "open", "messages": "hi"}, "bad_field"),
        ({"type": "open", "messages": []}, "bad_field"),
        (open_frame(thinking="yes"), "bad_field"),
        (open_frame(mode="loose"), "bad_field"),  # an option the protocol does not have is never ignored
        ({"type": "open", "messages": [{"role": "robot", "content": "x"}]}, "bad_field"),
        (json.dumps({"type": "push", "text": "x" * 9000}), "too_long"),
    ]
    in_session = [
        ({"type": "push", "text": 7}, "bad_field"),
        ({"type": "push"}, "bad_field"),
        ({"type": "push", "text": "a", "ids": [1]}, "bad_field"),
        ({"type": "push", "ids": [True]}, "bad_field"),
        ({"type": "push", "ids": [10 ** 9]}, "bad_field"),
        ({"type": "push", "ids": [1]}, "bad_field"),  # ids into a session pushed text
        ({"type": "push", "text": "x", "extra": 1}, "bad_field"),
        (open_frame(), "already_open"),
        (json.dumps({"type": "push", "text": "é" * 5000}), "too_long"),  # 10000 bytes in 5000 characters
        ("{", "bad_frame"),
    ]
    with connect(server.url) as ws:
        for frame, code in errors:
            r = call(ws, frame)
            assert (r["type"], r["code"]) == ("error", code), (frame, r)
        assert server.active() == 0  # refused opens took no session
        assert call(ws, open_frame())["type"] == "prompt"
        tokens, chunks = [], deltas(RESPONSE)
        for k, d in enumerate(chunks):
            if k < len(in_session):  # a refused frame between every good push
                frame, code = in_session[k]
                r = call(ws, frame)
                assert (r["type"], r["code"]) == ("error", code), (frame, r)
            tokens += call(ws, {"type": "push", "text": d})["tokens"]
        end = call(ws, {"type": "finish"})
        tokens += end["tokens"]
        for frame, code in [({"type": "push", "text": "more"}, "finished"), ({"type": "flush"}, "finished")]:
            r = call(ws, frame)
            assert (r["type"], r["code"]) == ("error", code), (frame, r)
        assert call(ws, {"type": "close"}) == {"type": "closed"}
    assert [(t["token_id"], t["label"]) for t in tokens] == [(t["token_id"], t["label"]) for t in clean]
    assert end["verdict"] == clean_end["verdict"]
    wait_for(lambda: server.active() == 0, 10, "the session to be freed")


def test_a_response_over_max_context_is_too_long_and_the_session_can_finish(guard):
    ids = guard.tokenizer.encode(RESPONSE, add_special_tokens=False)
    with serve(guard, max_context=64) as s, connect(s.url) as ws:
        assert call(ws, open_frame())["type"] == "prompt"
        r = call(ws, {"type": "push", "ids": ids * 3})
        assert (r["type"], r["code"]) == ("error", "too_long")
        assert call(ws, {"type": "push", "ids": ids[:3]})["type"] == "tokens"  # unchanged, still usable
        big = call(ws, open_frame("word " * 200))  # a conversation over max_context: refused, nothing opened
        assert (big["type"], big["code"]) == ("error", "already_open")
        end = call(ws, {"type": "finish"})
        assert end["verdict"]["n_tokens"] > 3
        big = call(ws, open_frame("word " * 200))
        assert (big["type"], big["code"]) == ("error", "too_long")
        wait_for(lambda: s.active() == 0, 10, "the session to be freed")


def test_capacity_is_an_error_frame_at_once(guard):
    with serve(guard, max_concurrency=2) as s:
        a, b, c = dial(s.url), dial(s.url), dial(s.url)
        try:
            assert call(a, open_frame())["type"] == "prompt"
            assert call(b, open_frame())["type"] == "prompt"
            r = call(c, open_frame())
            assert (r["type"], r["code"]) == ("error", "capacity")
            assert call(a, {"type": "finish"})["type"] == "verdict"  # frees a slot
            assert call(c, open_frame())["type"] == "prompt"  # the refused connection is still usable
        finally:
            for ws in (a, b, c):
                ws.close()
        wait_for(lambda: s.active() == 0, 10, "every session to be freed")


def test_an_idle_connection_times_out_and_frees_its_session(guard):
    with serve(guard, stream_idle_timeout_s=0.3) as s, connect(s.url) as ws:
        call(ws, open_frame())
        r = json.loads(ws.recv(timeout=30))  # the server speaks first: nothing was sent
        assert (r["type"], r["code"]) == ("error", "idle_timeout")
        with pytest.raises(websockets.ConnectionClosed) as e:
            ws.recv(timeout=30)
        assert e.value.rcvd.code == 1001
        wait_for(lambda: s.active() == 0, 10, "the idle session to be freed")


def test_api_keys_apply(guard):
    with serve(guard, api_keys=frozenset({KEY})) as s:
        for url, headers in [(s.url, {}), (s.url, {"Authorization": "Bearer nope"}), (s.url + "?api_key=nope", {})]:
            with connect(url, additional_headers=headers) as ws:
                r = json.loads(ws.recv(timeout=30))
                assert (r["type"], r["code"]) == ("error", "unauthorized")
                with pytest.raises(websockets.ConnectionClosed) as e:
                    ws.recv(timeout=30)
                assert e.value.rcvd.code == 1008
        for url, headers in [(s.url, {"Authorization": f"Bearer {KEY}"}), (s.url + f"?api_key={KEY}", {})]:
            with connect(url, additional_headers=headers) as ws:
                assert call(ws, open_frame())["type"] == "prompt"
        assert s.active() == 0 or wait_for(lambda: s.active() == 0, 10, "sessions freed") is None


def test_a_gen_guard_refuses_with_live_required(tiny_gen):
    with serve(Guard.from_pretrained(tiny_gen)) as s, connect(s.url) as ws:
        r = call(ws, open_frame())
        assert (r["type"], r["code"]) == ("error", "live_required")
        assert "Stream" in r["message"]


# ------------------------------------------------------------------------------ the Python client

def test_python_client_sync_matches_in_process_streamguard(server, guard):
    from qguard.client import QGuardClient, StreamCapacityError, StreamInputError
    from qguard.policy import TokenVerdict, Verdict

    sg = guard.stream_guard(max_sessions=1, max_context=512)
    try:
        with sg.open(PROMPT) as local:
            want = [tv for d in deltas(RESPONSE) for tv in local.push_text(d)] + local.flush()
            want_v = local.finish()
    finally:
        sg.close()
    client = QGuardClient(f"http://127.0.0.1:{server.port}")
    with client.open_stream(PROMPT) as s:
        assert isinstance(s.prompt, Verdict)
        got = [tv for d in deltas(RESPONSE) for tv in s.push_text(d)]
        with pytest.raises(StreamInputError) as e:
            s.push([1])
        assert e.value.code == "bad_field"
        got += s.flush()
        assert s.pending_text == ""
        v = s.finish()
        with pytest.raises(StreamInputError):
            s.push_text("more")
    assert all(isinstance(t, TokenVerdict) for t in got)
    assert [(t.token_id, t.label, t.response_label, t.stop) for t in got] == \
           [(t.token_id, t.label, t.response_label, t.stop) for t in want]
    assert (v.label, v.action, v.unsafe_position, v.n_tokens) == \
           (want_v.label, want_v.action, want_v.unsafe_position, want_v.n_tokens)
    with serve(guard, max_concurrency=1) as one:
        c1 = QGuardClient(f"http://127.0.0.1:{one.port}")
        with c1.open_stream(PROMPT), pytest.raises(StreamCapacityError) as e:
            c1.open_stream(PROMPT)
        assert e.value.code == "capacity"


def test_python_client_async_with_api_key(guard):
    from qguard.client import AsyncQGuardClient

    async def go(url):
        client = AsyncQGuardClient(url, api_key=KEY)
        conn = await client.connect_stream()
        async with conn:
            results = []
            for _ in range(2):  # two sessions in turn on one connection
                s = await conn.open([{"role": "user", "content": PROMPT}])
                tokens = [tv for d in deltas(RESPONSE) for tv in await s.push_text(d)] + await s.flush()
                results.append(([t.label for t in tokens], await s.finish()))
            return results

    with serve(guard, api_keys=frozenset({KEY})) as s:
        (labels1, v1), (labels2, v2) = asyncio.run(asyncio.wait_for(go(f"http://127.0.0.1:{s.port}"), 60))
        wait_for(lambda: s.active() == 0, 10, "sessions freed")
    assert labels1 == labels2 and len(labels1) > 10
    assert v1 == v2


def test_readme_client_example_runs(server, capsys):
    from tests.conftest import REPO

    readme = (REPO / "README.md").read_text("utf-8")
    tail = readme[readme.index("### Streaming moderation over WebSocket"):]
    code = tail[tail.index("```python\n") + len("```python\n"):tail.index("```\n", tail.index("```python"))]
    assert "http://127.0.0.1:8080" in code
    exec(compile(code.replace("http://127.0.0.1:8080", f"http://127.0.0.1:{server.port}"), "README", "exec"), {})
    prompt_line, verdict_line = capsys.readouterr().out.splitlines()
    labels = {"Safe", "Unsafe", "Controversial"}
    assert prompt_line in labels and verdict_line.split()[0] in labels


@pytest.mark.parametrize("log_content", [False, True])
def test_content_is_logged_only_on_opt_in(guard, caplog, log_content):
    secret = "zebra-quartz-17"
    with caplog.at_level("INFO", logger="qguard.serve"), serve(guard, log_content=log_content) as s, \
            connect(s.url) as ws:
        call(ws, open_frame(f"tell me about {secret}"))
        call(ws, {"type": "push", "text": f"the {secret} is"})
        call(ws, {"type": "push", "text": 5})  # an error path logs nothing of the frame either
        call(ws, {"type": "finish"})
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "stream open" in logged and "stream finish" in logged
    assert (secret in logged) is log_content


# ------------------------------------------------------------------------------ hold-back (issue #17)
# The guard of tests/serve/test_leak_control.py: a response token is Unsafe exactly when it is " bomb" or
# " explosives", every prompt Safe. Where the scripted answer becomes unsafe is computed there
# independently (`unsafe_char`: one full forward over the whole answer, debounced).

@pytest.fixture(scope="module")
def trigger(tiny_stream, tmp_path_factory):
    d = trigger_checkpoint(tiny_stream, tmp_path_factory.mktemp("ws-trigger") / "ck", safe_prompts=True)
    g = Guard.from_pretrained(d, dtype="fp32")
    assert g.classify_response(leak.PROMPT, leak.HARM).blocked
    assert not g.classify_response(leak.PROMPT, SAFE_ANSWER).blocked
    return g


SAFE_ANSWER = leak.SAFE_START + leak.SAFE_CONT


def released_session(ws, answer: str, **open_kw) -> tuple[list[str], dict, list[dict]]:
    """Open a story session, push `answer` word by word, finish: each reply's `release` (the finish's
    last), the verdict frame, and every `tokens` frame."""
    opened = call(ws, open_frame(leak.PROMPT, **open_kw))
    assert opened["type"] == "prompt" and not opened["blocked"], opened
    releases, frames = [], []
    for w in leak.words(answer):
        r = call(ws, {"type": "push", "text": w})
        assert r["type"] == "tokens", r
        frames.append(r)
        releases.append(r["release"])
        assert r["released"] == len("".join(releases))
    end = call(ws, {"type": "finish"})
    assert end["type"] == "verdict", end
    releases.append(end["release"])
    assert end["released"] == len("".join(releases))
    return releases, end, frames


@pytest.mark.parametrize("hold", [0, 2, 8])
def test_released_text_never_reaches_the_unsafe_position(trigger, hold):
    bad, after_bad = leak.unsafe_char(trigger, leak.HARM)
    with serve(trigger, hold_tokens=hold) as s, connect(s.url) as ws:
        releases, end, frames = released_session(ws, leak.HARM)
        assert call(ws, open_frame(leak.PROMPT))["hold_tokens"] == hold
    released = "".join(releases)
    assert leak.HARM.startswith(released) and released  # a prefix of what was pushed, in order
    assert end["verdict"]["action"] == "block" and end["release"] == ""  # a blocked answer: no remainder
    stopped = next(i for i, f in enumerate(frames) if f["stop"])
    assert all(f["release"] == "" for f in frames[stopped:])  # nothing once the session stopped
    # never the token at the unsafe position (the deciding one); with a window, not the pair's first either
    assert len(released) <= (bad if hold >= 1 else after_bad)
    if hold:  # the window holds `hold` judged tokens back: at least that many before the pair are unseen
        assert leak.tokens(trigger, leak.HARM[len(released):bad]) >= hold - 1


@pytest.mark.parametrize("hold", [0, 2, 8])
def test_a_safe_answer_is_released_whole_at_finish(trigger, hold):
    with serve(trigger, hold_tokens=hold) as s, connect(s.url) as ws:
        releases, end, frames = released_session(ws, SAFE_ANSWER)
    assert "".join(releases) == SAFE_ANSWER and end["verdict"]["action"] == "allow"
    before_finish = "".join(releases[:-1])
    assert SAFE_ANSWER.startswith(before_finish)
    if hold:  # the window held the last `hold` judged tokens until the end
        assert leak.tokens(trigger, SAFE_ANSWER[len(before_finish):]) >= hold
    else:  # stream-first: only the incremental tokenizer's uncommitted tail waited
        assert SAFE_ANSWER[len(before_finish):] == frames[-1]["pending_text"]


def test_open_may_ask_a_larger_window_never_a_smaller_one(trigger):
    bad, _ = leak.unsafe_char(trigger, leak.HARM)
    with serve(trigger, hold_tokens=2) as s, connect(s.url) as ws:
        r = call(ws, open_frame(leak.PROMPT, hold_tokens=1))
        assert (r["type"], r["code"]) == ("error", "bad_field") and "hold_tokens" in r["message"]
        assert call(ws, open_frame(leak.PROMPT, hold_tokens=True))["code"] == "bad_field"
        small, _, _ = released_session(ws, leak.HARM)
        large, _, _ = released_session(ws, leak.HARM, hold_tokens=8)
    assert len("".join(large)) < len("".join(small)) <= bad
    assert leak.tokens(trigger, leak.HARM[len("".join(large)):bad]) >= 8 - 1


def test_ids_pushes_release_ids_behind_the_window(trigger):
    ids = encode_text(trigger.tokenizer, leak.HARM)
    unsafe_at = trigger.stream_trace(leak.PROMPT, leak.HARM).response.unsafe_position  # a full forward
    assert unsafe_at is not None and ids[unsafe_at - 1] in (BOMB, EXPLOSIVES)
    with serve(trigger, hold_tokens=2) as s, connect(s.url) as ws:
        assert call(ws, open_frame(leak.PROMPT))["type"] == "prompt"
        got: list[int] = []
        for i in range(0, len(ids), 3):
            r = call(ws, {"type": "push", "ids": ids[i:i + 3]})
            got += r["release"]
            assert r["released"] == len(got)
        end = call(ws, {"type": "finish"})
        assert end["release"] == [] and end["verdict"]["unsafe_position"] == unsafe_at
    assert got == ids[:len(got)] and got
    assert len(got) <= unsafe_at - 1  # neither token of the deciding pair
    safe_ids = encode_text(trigger.tokenizer, SAFE_ANSWER)
    with serve(trigger, hold_tokens=8) as s, connect(s.url) as ws:
        call(ws, open_frame(leak.PROMPT))
        got = [x for i in range(0, len(safe_ids), 3) for x in call(ws, {"type": "push", "ids": safe_ids[i:i + 3]})["release"]]
        assert len(got) <= len(safe_ids) - 8
        got += call(ws, {"type": "finish"})["release"]
    assert got == safe_ids


def test_python_client_exposes_the_released_text(trigger):
    from qguard.client import AsyncQGuardClient, QGuardClient

    bad, _ = leak.unsafe_char(trigger, leak.HARM)
    with serve(trigger, hold_tokens=2) as s:
        client = QGuardClient(f"http://127.0.0.1:{s.port}")
        with client.open_stream(leak.PROMPT, hold_tokens=4) as cs:
            assert cs.hold_tokens == 4
            news = []
            for w in leak.words(leak.HARM):
                cs.push_text(w)
                news.append(cs.release)
            assert cs.finish().blocked and cs.release == ""
        assert cs.released_text == "".join(news) and leak.HARM.startswith(cs.released_text)
        assert 0 < len(cs.released_text) <= bad

        async def safe(url):
            async with await AsyncQGuardClient(url).open_stream(leak.PROMPT) as a:
                for w in leak.words(SAFE_ANSWER):
                    await a.push_text(w)
                before = a.released_text
                await a.finish()
                return a.hold_tokens, before, a.released_text

        hold, before, after = asyncio.run(asyncio.wait_for(safe(f"http://127.0.0.1:{s.port}"), 60))
    assert hold == 2 and SAFE_ANSWER.startswith(before) and len(before) < len(SAFE_ANSWER)
    assert after == SAFE_ANSWER
