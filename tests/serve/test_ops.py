"""Operations of `qguard serve` end to end (issue 18): /metrics counts exactly what happened, the audit log
has one row per decision (SQLite and a real PostgreSQL), request ids, readiness and liveness, and the
graceful drain on SIGTERM of a real `qguard serve` process.

Everything binds 127.0.0.1 and is bounded in count and time."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from qguard import Guard
from qguard.policy import Action, Category, Policy, Severity
from qguard.serve import ServeSettings, create_app
from qguard.serve.ops import request_id

REPO = Path(__file__).resolve().parents[2]
PG_ENV = "QGUARD_TEST_POSTGRES"


class KeywordGuard:
    """A guard whose verdicts the test decides: anything containing BAD is Unsafe/Violent (with 3 tokens
    judged per call, so the token counter has something exact to count)."""

    def __init__(self, guard):
        self.name, self.kind, self.live, self.policy = "kw", guard.kind, False, Policy()
        self.tokenizer, self.max_len = guard.tokenizer, guard.max_len

    def classify_conversations(self, convs):
        return [self.classify_messages(c) for c in convs]

    def classify_messages(self, messages):
        bad = "BAD" in messages[-1]["content"]
        return self.policy.verdict(Severity.UNSAFE if bad else Severity.SAFE, [Category.VIOLENT] if bad else [],
                                   probs={"Safe": 0.0 if bad else 1.0, "Unsafe": 1.0 if bad else 0.0,
                                          "Controversial": 0.0}, n_tokens=3)


@pytest.fixture(scope="module")
def guard(tiny_stream):
    return Guard.from_pretrained(tiny_stream)


def upstream(answer: str) -> httpx.AsyncClient:
    """An OpenAI-compatible upstream answering `answer`, whole or streamed in two deltas."""

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if body.get("stream"):
            half = len(answer) // 2
            events = [{"choices": [{"index": 0, "delta": {"content": part}}]} for part in (answer[:half], answer[half:])]
            events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
            return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json={"id": "u", "object": "chat.completion", "created": 1, "model": "m",
                                         "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                                      "finish_reason": "stop"}]})

    return httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://u/v1")


def samples(client: TestClient, headers: dict | None = None) -> dict[tuple, float]:
    """Every sample of a /metrics scrape, by `key(name, **labels)`."""
    from prometheus_client.parser import text_string_to_metric_families

    r = client.get("/metrics", headers=headers or {})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {key(s.name, **s.labels): s.value for f in text_string_to_metric_families(r.text) for s in f.samples}


def key(name: str, **labels: str) -> tuple:
    return (name, frozenset(labels.items()))


def moved(before: dict[tuple, float], after: dict[tuple, float]) -> dict[tuple, float]:
    """The counters that changed, and by how much (gauges and histogram buckets left out)."""
    keys = {k for k in after if k[0].endswith(("_total", "_count"))}
    return {k: after[k] - before.get(k, 0.0) for k in keys if after[k] != before.get(k, 0.0)}


def chat(messages_text: str, stream: bool = False) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": messages_text}], "stream": stream}


MOD, CHAT = "/v1/moderate", "/v1/chat/completions"


def test_metrics_move_by_exactly_what_happened(guard):
    app = create_app(KeywordGuard(guard), ServeSettings(upstream_url="http://u/v1", max_concurrency=4),
                     upstream=upstream("BAD things happen"))
    c = TestClient(app)
    before = samples(c)
    assert c.post(MOD, json={"messages": [{"role": "user", "content": "hello"}]}).status_code == 200
    r = c.post(MOD, json={"messages": [{"role": "user", "content": "BAD"}]})
    assert r.json().get("verdict", {}).get("action") == "block", r.text
    r = c.post(CHAT, json=chat("BAD prompt"))  # refused before the upstream
    assert r.json()["qguard"]["blocked"] == "prompt"
    r = c.post(CHAT, json=chat("hi"))  # the answer is BAD: refused after the upstream
    assert r.json()["qguard"]["blocked"] == "response"
    r = c.post(CHAT, json=chat("hi", stream=True))  # streamed and cut
    assert r.status_code == 200 and '"content_filter"' in r.text
    state = app.state
    state.slots.in_use = state.slots.n  # a full server: every slot held
    assert c.post(CHAT, json=chat("hi")).status_code == 429
    state.slots.in_use = 0
    assert c.post(MOD, json={"messages": []}).status_code == 422  # refused by validation: a request, no verdict
    after = samples(c)
    def req(ep, status):
        return key("qguard_requests_total", endpoint=ep, status=status)

    def verdicts(ep, stage, label, action):
        return key("qguard_verdicts_total", endpoint=ep, stage=stage, label=label, action=action)

    def violent(ep, stage):
        return key("qguard_verdict_categories_total", endpoint=ep, stage=stage, category="Violent")

    assert moved(before, after) == {
        req(MOD, "200"): 2, req(MOD, "422"): 1, req(CHAT, "200"): 3, req(CHAT, "429"): 1,
        key("qguard_request_seconds_count", endpoint=MOD): 3, key("qguard_request_seconds_count", endpoint=CHAT): 4,
        verdicts(MOD, "prompt", "Safe", "allow"): 1, verdicts(MOD, "prompt", "Unsafe", "block"): 1,
        violent(MOD, "prompt"): 1,
        verdicts(CHAT, "prompt", "Unsafe", "block"): 1, verdicts(CHAT, "prompt", "Safe", "allow"): 2,
        verdicts(CHAT, "response", "Unsafe", "block"): 2, violent(CHAT, "prompt"): 1, violent(CHAT, "response"): 2,
        key("qguard_refusals_total", endpoint=CHAT, stage="prompt"): 1,
        key("qguard_refusals_total", endpoint=CHAT, stage="response"): 2,  # on_unsafe=refuse: the stream too
        key("qguard_stream_cuts_total", endpoint=CHAT): 1, key("qguard_rate_limited_total", endpoint=CHAT): 1,
        # 3 tokens a verdict: 2 moderations, 3 prompts, 2 answers
        key("qguard_tokens_judged_total", endpoint=MOD): 6, key("qguard_tokens_judged_total", endpoint=CHAT): 15,
        # guard time of each judged turn but the streamed answer's (spread over the stream)
        key("qguard_guard_seconds_count", endpoint=MOD): 2, key("qguard_guard_seconds_count", endpoint=CHAT): 4,
        key("qguard_engine_step_seconds_count"): 7, key("qguard_engine_batch_size_count"): 7,  # one guard call each
    }
    assert after[key("qguard_free_slots")] == 4 and after[key("qguard_active_sessions")] == 0


def test_live_stream_metrics_count_engine_steps_and_sessions(guard):
    allow = Guard(guard.kind, guard.name, guard.tokenizer, Policy(default_action=Action.ALLOW), guard.model, guard.labels)
    app = create_app(allow, ServeSettings(upstream_url="http://u/v1", max_concurrency=2, max_context=512),
                     upstream=upstream("A calm and friendly answer."))
    with TestClient(app) as c:
        before = samples(c)
        r = c.post(CHAT, json=chat("hi", stream=True))
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
        after = samples(c)
    d = moved(before, after)
    assert d[key("qguard_requests_total", endpoint=CHAT, status="200")] == 1
    steps = d[key("qguard_engine_step_seconds_count")]
    assert steps >= 2 and steps == d[key("qguard_engine_batch_size_count")]  # the prompt's call, the session's
    assert sum(v for k, v in d.items() if k[0] == "qguard_verdicts_total") == 2  # prompt and answer
    assert after[key("qguard_active_sessions")] == 0 and after[key("qguard_free_slots")] == 2  # all given back


def test_metrics_need_a_key_unless_public(guard):
    c = TestClient(create_app(KeywordGuard(guard), ServeSettings(api_keys=frozenset({"k1"}))))
    assert c.get("/metrics").status_code == 401
    assert samples(c, {"authorization": "Bearer k1"})[key("qguard_free_slots")] == 16
    c = TestClient(create_app(KeywordGuard(guard), ServeSettings(api_keys=frozenset({"k1"}), metrics_public=True)))
    assert key("qguard_free_slots") in samples(c)
    assert c.post(MOD, json={"messages": [{"role": "user", "content": "x"}]}).status_code == 401  # the API still
    c = TestClient(create_app(KeywordGuard(guard), ServeSettings(metrics=False)))
    assert c.get("/metrics").status_code == 404
    assert c.post(MOD, json={"messages": [{"role": "user", "content": "x"}]}).status_code == 200


# ------------------------------------------------------------------------------ request ids

def test_request_ids_are_echoed_or_made_on_every_response(guard):
    c = TestClient(create_app(KeywordGuard(guard), ServeSettings(api_keys=frozenset({"k"}))))
    r = c.post(MOD, json={"messages": [{"role": "user", "content": "x"}]}, headers={"x-request-id": "req-42.a"})
    assert r.status_code == 401 and r.headers["x-request-id"] == "req-42.a"  # the gate's error too
    auth = {"authorization": "Bearer k"}
    r = c.post(MOD, json={"messages": []}, headers=auth)
    assert r.status_code == 422 and len(r.headers["x-request-id"]) == 32
    ids = {c.get("/health").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3  # a fresh one each time
    for bad in ("has space", "x" * 129, "-leading", "ü", ""):
        r = c.get("/health", headers={"x-request-id": bad.encode("utf-8")})
        assert r.headers["x-request-id"] != bad and len(r.headers["x-request-id"]) == 32, bad
    assert request_id("a" * 128) == "a" * 128 and request_id("trace:1/2@x=y+z") == "trace:1/2@x=y+z"


def test_streams_carry_the_request_id(guard):
    c = TestClient(create_app(KeywordGuard(guard), ServeSettings(upstream_url="http://u/v1"), upstream=upstream("fine")))
    r = c.post(CHAT, json=chat("hi", stream=True), headers={"x-request-id": "sse-1"})
    assert r.headers["content-type"].startswith("text/event-stream") and r.headers["x-request-id"] == "sse-1"


def test_json_logs_carry_the_request_id_and_no_content(guard, capsys):
    import logging

    from qguard.serve.ops import JsonFormatter, RequestIdFilter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("qguard.serve")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        c = TestClient(create_app(KeywordGuard(guard)))
        c.post(MOD, json={"messages": [{"role": "user", "content": "SECRET words"}]}, headers={"x-request-id": "log-7"})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    mine = [x for x in lines if x["request_id"] == "log-7"]
    assert mine and mine[0]["logger"] == "qguard.serve" and mine[0]["message"].startswith("moderate ")
    assert not any("SECRET" in x["message"] for x in lines)


# ------------------------------------------------------------------------------ readiness

def test_ready_once_warmed_live_always(guard):
    calls = []

    class Counting(KeywordGuard):
        def classify_messages(self, messages):
            calls.append(messages)
            return super().classify_messages(messages)

    app = create_app(Counting(guard), ServeSettings(warmup=True))
    c = TestClient(app)
    assert c.get("/health/live").json() == {"status": "live"}
    assert c.get("/health/ready").status_code == 503  # the lifespan has not run: not warmed
    with TestClient(app) as c:
        assert len(calls) == 1  # the warm-up judge
        r = c.get("/health/ready")
        assert r.status_code == 200 and r.json()["status"] == "ready"
        app.state.drain.draining = True
        assert c.get("/health/ready").json() == {"status": "draining"}
        r = c.post(MOD, json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down"
        assert c.get("/health/live").status_code == 200
    assert len(calls) == 1  # the refused request never reached the guard


# ------------------------------------------------------------------------------ the audit log

def audited(guard, db: str, **settings):
    return create_app(KeywordGuard(guard), ServeSettings(audit=db, upstream_url="http://u/v1",
                                                         api_keys=frozenset({"sk-secret-1"}), metrics_public=True,
                                                         **settings),
                      upstream=upstream("BAD answer"))


def run_mix(c: TestClient) -> None:
    """2 moderations, a blocked prompt, a refused answer (2 decisions), a cut stream (2 decisions): 7 rows."""
    auth = {"authorization": "Bearer sk-secret-1"}
    for i, text in enumerate(("hello SECRET", "BAD SECRET")):
        c.post(MOD, json={"messages": [{"role": "user", "content": text}]}, headers={**auth, "x-request-id": f"m{i}"})
    c.post(CHAT, json=chat("BAD SECRET prompt"), headers={**auth, "x-request-id": "c0"})
    c.post(CHAT, json=chat("SECRET hi"), headers={**auth, "x-request-id": "c1"})
    c.post(CHAT, json=chat("SECRET hi", stream=True), headers={**auth, "x-request-id": "c2"})


def check_rows(rows: list[dict], content: bool) -> None:
    from qguard.audit import api_key_id

    assert len(rows) == 7
    got = sorted((r["request_id"], r["endpoint"], r["stage"], r["label"], r["blocked"]) for r in rows)
    assert got == [("c0", CHAT, "prompt", "Unsafe", True),
                   ("c1", CHAT, "prompt", "Safe", False), ("c1", CHAT, "response", "Unsafe", True),
                   ("c2", CHAT, "prompt", "Safe", False), ("c2", CHAT, "response", "Unsafe", True),
                   ("m0", MOD, "prompt", "Safe", False), ("m1", MOD, "prompt", "Unsafe", True)]
    for r in rows:
        assert r["api_key_id"] == api_key_id("sk-secret-1") and r["model"] == "kw" and r["policy_version"] == "strict"
        assert "sk-secret-1" not in json.dumps(r, default=str)
        assert (r["content"] is not None) == content
        if not content:
            assert "SECRET" not in json.dumps(r, default=str)
    assert all(r["latency_ms"] is not None for r in rows if r["stage"] == "prompt")
    assert all(r["content_sha256"] for r in rows)
    # the same answer, whole (c1) or streamed (c2): the same content hash
    answers = {r["request_id"]: r for r in rows if r["stage"] == "response"}
    assert answers["c1"]["content_sha256"] == answers["c2"]["content_sha256"]
    assert {tuple(r["categories"] or ()) for r in rows if r["label"] == "Unsafe"} == {("Violent",)}


def write_and_read(guard, db: str, content: bool = False) -> list[dict]:
    from qguard.audit import query

    app = audited(guard, db, log_content=content)
    with TestClient(app) as c:
        run_mix(c)
        assert app.state.audit.flush()
        assert samples(c)[key("qguard_audit_written_total")] == 7
    assert app.state.audit.written == 7 and app.state.audit.dropped == 0  # closed at shutdown, all written
    return query(db)


def test_audit_sqlite_one_row_per_decision_no_content(guard, tmp_path):
    check_rows(write_and_read(guard, str(tmp_path / "a.db")), content=False)


def test_audit_sqlite_content_only_when_opted_in(guard, tmp_path):
    rows = write_and_read(guard, str(tmp_path / "a.db"), content=True)
    check_rows(rows, content=True)
    assert any("SECRET" in (r["content"] or "") for r in rows)


@pytest.fixture
def pg_url():
    """A fresh database on the test's PostgreSQL server (`.ci/run` starts one), dropped afterwards."""
    base = os.environ.get(PG_ENV)
    if not base:
        why = f"${PG_ENV} is not set: no PostgreSQL server (start one: eval \"$(.ci/postgres /tmp/qguard-pg start)\")"
        if os.environ.get("CI"):
            pytest.fail(why + "; CI must run it (.ci/run starts the server)")
        pytest.skip(why)
    import sqlalchemy as sa

    from qguard.audit import database_url

    url = sa.make_url(database_url(base))
    name = f"qguard_ops_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    yield url.set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def test_audit_postgres_one_row_per_decision(guard, pg_url):
    check_rows(write_and_read(guard, pg_url), content=False)


def test_qguard_audit_exports_what_serve_wrote(guard, tmp_path):
    db = str(tmp_path / "a.db")
    write_and_read(guard, db)
    out = tmp_path / "out.jsonl"
    r = subprocess.run([sys.executable, "-m", "qguard", "audit", "--db", db, "--format", "jsonl", "--out", str(out),
                        "--endpoint", CHAT], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(x["request_id"] for x in rows) == ["c0", "c1", "c1", "c2", "c2"]
    r = subprocess.run([sys.executable, "-m", "qguard", "audit", "--db", db, "--counts"], capture_output=True,
                       text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0 and "7" in r.stdout, r.stderr


def test_serve_refuses_a_bad_audit_target_clearly(tmp_path):
    from qguard.cli.serve import audited_app
    from qguard.errors import InputError

    class G:  # never reached: the audit log is opened first
        name, live, max_len, tokenizer = "g", False, 64, None

    with pytest.raises(InputError, match="--audit"):
        audited_app(G(), ServeSettings(audit="mysql://nope/db"))


# ------------------------------------------------------------------------------ a dropped client

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:g} s waiting for {what}")
        time.sleep(0.02)


def test_a_dropped_client_counts_as_499_and_frees_its_slot(guard):
    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        return httpx.Response(500)

    up = httpx.AsyncClient(transport=httpx.MockTransport(hang), base_url="http://u/v1")
    app = create_app(KeywordGuard(guard), ServeSettings(upstream_url="http://u/v1", max_concurrency=3), upstream=up)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        wait_for(lambda: server.started, 20, "uvicorn")
        metrics = app.state.metrics
        body = json.dumps(chat("hi")).encode()
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: %d\r\n\r\n" % len(body) + body)
        wait_for(lambda: app.state.slots.in_use == 1, 10, "the request to take its slot")
        s.close()
        labels = {"endpoint": CHAT, "status": "499"}
        wait_for(lambda: metrics.sample("qguard_requests_total", labels) == 1, 10, "the 499 to be counted")
        wait_for(lambda: metrics.sample("qguard_free_slots") == 3, 10, "the slot to be given back")
        assert metrics.sample("qguard_verdicts_total", {"endpoint": CHAT, "stage": "prompt", "label": "Safe",
                                                        "action": "allow"}) == 1
    finally:
        server.should_exit = True
        t.join(20)


# ------------------------------------------------------------------------------ SIGTERM on a real server

SLOW_UPSTREAM = r'''
import asyncio, json, sys
import uvicorn

async def app(scope, receive, send):
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
    if not req.get("stream"):  # "slow N": answers whole after N seconds
        await asyncio.sleep(float(prompt.split()[-1]))
        data = {"id": "u", "object": "chat.completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "done"}, "finish_reason": "stop"}]}
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(data).encode()})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    for i in range(600):  # a stream that would take a minute
        chunk = {"choices": [{"index": 0, "delta": {"content": f"w{i} "}}]}
        await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(), "more_body": True})
        await asyncio.sleep(0.1)
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
'''


def test_sigterm_drains_then_ends_open_streams_and_exits_0(tiny_stream, tmp_path):
    up_port, port = free_port(), free_port()
    (tmp_path / "up.py").write_text(SLOW_UPSTREAM)
    (tmp_path / "allow.yaml").write_text("default_action: allow\n")
    up = subprocess.Popen([sys.executable, str(tmp_path / "up.py"), str(up_port)])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("QGUARD_API_KEYS", None)
    serve = subprocess.Popen([sys.executable, "-m", "qguard", "serve", "--model", str(tiny_stream), "--policy",
                              str(tmp_path / "allow.yaml"), "--port", str(port), "--upstream",
                              f"http://127.0.0.1:{up_port}/v1", "--max-context", "1024", "--drain-timeout", "3",
                              "--log-format", "json", "--audit", str(tmp_path / "a.db")],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            if serve.poll() is not None:
                raise AssertionError(f"qguard serve exited {serve.returncode}: {serve.stdout.read()[-3000:]}")
            try:
                return httpx.get(base + "/health/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 240, "qguard serve to be ready")  # loading torch on a busy 2-core machine
        results: dict[str, object] = {}

        def stream(i: int) -> None:
            lines = []
            with httpx.stream("POST", base + CHAT, json=chat(f"stream {i}", stream=True), timeout=30) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line[6:])
            results[f"s{i}"] = lines

        def slow() -> None:
            r = httpx.post(base + CHAT, json=chat("slow 1.5"), timeout=30)
            results["slow"] = (r.status_code, r.json())

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)] + [threading.Thread(target=slow)]
        for t in threads:
            t.start()
        wait_for(lambda: sum(1 for line in metrics_text(base).splitlines()
                             if line.startswith("qguard_free_slots ") and float(line.split()[1]) <= 13), 30,
                 "the three requests to be in flight")
        time.sleep(0.3)  # let the streams send some judged text
        t0 = time.monotonic()
        serve.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(base + "/health/ready", timeout=2).status_code == 503, 5, "ready to say draining")
        r = httpx.post(base + MOD, json={"messages": [{"role": "user", "content": "hi"}]}, timeout=5)
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down"
        for t in threads:
            t.join(30)
        rc = serve.wait(30)
        took = time.monotonic() - t0
        out = serve.stdout.read()
    finally:
        for p in (serve, up):
            if p.poll() is None:
                p.kill()
                p.wait(10)
    assert rc == 0, out[-3000:]
    assert took < 3 + 5 + 10, took  # the deadline, the grace, uvicorn's own exit (a bound, not a timing test)
    status, body = results["slow"]
    assert status == 200 and body["choices"][0]["message"]["content"] == "done"  # finished within the deadline
    for i in range(2):
        lines = results[f"s{i}"]
        assert lines[-1] == "[DONE]", lines[-3:]
        err = json.loads(lines[-2])
        assert err["error"]["code"] == "server_shutting_down"
        assert any("delta" in line for line in lines[:-2])  # judged text came before the end
    logs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any(x["logger"] == "qguard.serve" and "draining" in x["message"] for x in logs)
    assert any(x["request_id"] not in (None, "-") for x in logs)


def metrics_text(base: str) -> str:
    try:
        return httpx.get(base + "/metrics", timeout=2).text
    except httpx.HTTPError:
        return ""
