"""Operations around every route: request ids, request metrics, the audit hook, readiness and the drain.

`RequestContext` is a pure ASGI middleware, outermost, so it sees every answer (the gate's 401/413 and
every error included): it takes the client's `X-Request-ID` when it is identifier-like (else makes one),
returns it on every response (SSE and errors too), puts it in the log records (`RequestIdFilter`) and the
audit log, and counts the request in the metrics (`qguard_requests_total` by endpoint and status). A
WebSocket connection counts once, when it ends, with the status of its handshake (101 accepted, 403 closed
before it was accepted, as the ASGI server answers it), and its whole time as the request's.

`Drain` is the graceful shutdown. On SIGTERM (`drain_on_sigterm`) the server stops taking work (ready
is 503, new requests get an OpenAI-shaped 503), lets what is in flight finish until the deadline, then ends
what is still open: an SSE stream gets an OpenAI-shaped error event and `[DONE]`, a WebSocket session an
error frame and close code 1012 (service restart), a plain request that has not answered yet a 503; then
the process exits 0. A surface needs nothing for that; one that wants to say goodbye itself can watch
`state.drain.until_stopping()` (a future done at the deadline) or the flags `state.drain.draining` and
`state.drain.stopping`.

Routes report decisions through `AppState.observe` / `observe_failure` (metrics and audit in one call).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import re
import signal
import threading
import time
import uuid
from typing import Any

from qguard.metrics import endpoint_name
from qguard.serve.errors import APIError, reply
from qguard.serve.sse import sse

log = logging.getLogger("qguard.serve")

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("qguard_request_id", default=None)
API_KEY: contextvars.ContextVar[str | None] = contextvars.ContextVar("qguard_api_key", default=None)
REQUEST_ID_HEADER = "x-request-id"
# identifier-like and bounded: a client's id goes into logs, headers and the database as it is
_VALID_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,127}")
# answered while draining and never counted as traffic
OPS_PATHS = frozenset({"/health", "/health/live", "/health/ready", "/metrics"})


def request_id(given: str | None) -> str:
    """The client's id when it is identifier-like (at most 128 of letters, digits and `._:@/+=-`, a
    letter or digit first), else a fresh one: an invalid id is replaced, not refused."""
    if given and _VALID_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; retry the request (on another replica)",
                    code="server_shutting_down")


class Drain:
    """The requests in flight and the shutdown's two moments: `draining` (no new work) and `stopping`
    (the deadline: end what is still open; `until_stopping()` is a future that resolves then)."""

    def __init__(self) -> None:
        self.draining = self.stopping = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # one future per waiting request, each on its own loop (a test client may run each request on a
        # loop of its own; an asyncio.Event would bind to the first)
        self._waiters: set[asyncio.Future] = set()

    def until_stopping(self) -> asyncio.Future:
        """A future of the running loop, done at the drain's deadline (at once if it has passed)."""
        fut = asyncio.get_running_loop().create_future()
        if self.stopping:
            fut.set_result(None)
        else:
            self._waiters.add(fut)
            fut.add_done_callback(self._waiters.discard)
        return fut

    def stop(self) -> None:
        """The deadline: every request still open is ended (`RequestContext`)."""
        self.stopping = True
        for fut in list(self._waiters):
            fut.get_loop().call_soon_threadsafe(_resolve, fut)

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def run(self, timeout_s: float, grace_s: float = 5.0) -> None:
        """Stop taking work, wait for the requests in flight (at most `timeout_s`), then end the rest
        and give them `grace_s` to send their last event."""
        self.draining = True
        log.warning("draining: %d request(s) in flight, deadline %.1fs", self.in_flight, timeout_s)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        if self.in_flight:
            log.warning("drain deadline: ending %d open request(s)", self.in_flight)
        self.stop()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace_s)


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class RequestContext:
    """Pure ASGI middleware (outermost): request id, request metrics, the drain. See the module doc."""

    def __init__(self, app, state) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        rid = request_id(headers.get(REQUEST_ID_HEADER))
        auth = headers.get("authorization", "")
        REQUEST_ID.set(rid)  # this request's task only: contextvars are per task
        API_KEY.set(auth[len("Bearer "):] if auth.startswith("Bearer ") else None)
        path, t0 = scope.get("path", ""), time.perf_counter()
        out = _Sent(send, rid)
        drain = self.state.drain
        if path in OPS_PATHS:
            return await self.app(scope, receive, out.send)
        try:
            if drain.draining:
                await self._refuse(scope, receive, out)
            else:
                drain.enter()
                try:
                    await self._run(scope, receive, out)
                finally:
                    drain.leave()
        finally:
            self.state.metrics.observe_request(endpoint_name(path), out.status or 500, time.perf_counter() - t0)

    async def _refuse(self, scope, receive, out: _Sent) -> None:
        if scope["type"] == "http":
            return await reply(shutting_down(), scope, receive, out.send)
        await out.send({"type": "websocket.close", "code": 1012, "reason": "server shutting down"})

    async def _run(self, scope, receive, out: _Sent) -> None:
        """The app, cut off at the drain's deadline with the ending its protocol allows."""
        task = asyncio.ensure_future(self.app(scope, receive, out.send))
        stop = self.state.drain.until_stopping()
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not task.done() and not self.state.drain.stopping:  # we were cancelled ourselves
                task.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await out.end(scope, receive)


class _Sent:
    """The send side of one request: stamps the request id on the response, remembers what was sent."""

    def __init__(self, send, rid: str) -> None:
        self._send, self.rid = send, rid
        self.status: int | None = None
        self.started = self.ended = self.sse = self.accepted = False

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
            headers.append((b"x-request-id", self.rid.encode("latin-1")))
            message = {**message, "headers": headers}
            self.status, self.started = message["status"], True
            self.sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)
        elif kind == "http.response.body" and not message.get("more_body", False):
            self.ended = True
        elif kind == "websocket.accept":
            self.accepted, self.status = True, 101
            headers = list(message.get("headers", []))
            message = {**message, "headers": [*headers, (b"x-request-id", self.rid.encode("latin-1"))]}
        elif kind == "websocket.close":
            self.ended = True
            if not self.accepted:  # a close before the accept is the handshake's 403 (the ASGI spec)
                self.status = 403
        elif kind == "websocket.http.response.start":  # a handshake denied with a response of the app's own
            self.status = message["status"]
        await self._send(message)

    async def end(self, scope, receive) -> None:
        """End a request the drain's deadline cut off, in its protocol's way."""
        err = shutting_down()
        with contextlib.suppress(Exception):  # the client may be gone too
            if scope["type"] == "websocket":
                if self.accepted and not self.ended:
                    await self.send({"type": "websocket.send", "text": json.dumps({"type": "error", **err.body()})})
                if not self.ended:
                    await self.send({"type": "websocket.close", "code": 1012, "reason": "server shutting down"})
            elif not self.started:
                await reply(err, scope, receive, self.send)
            elif not self.ended:
                body = sse(err.body()) + sse("[DONE]") if self.sse else b""
                await self.send({"type": "http.response.body", "body": body, "more_body": False})


# ------------------------------------------------------------------------------ metrics and audit

class NoMetrics:
    """Metrics turned off (`ServeSettings.metrics=False`): every `observe_*` and `watch` does nothing."""

    def __getattr__(self, name: str):
        return _nothing


def _nothing(*_: Any, **__: Any) -> None:
    return None


def make_metrics(state) -> Any:
    """The app's `Metrics` (its gauges read from the state at each scrape), or `NoMetrics`."""
    if not state.settings.metrics:
        return NoMetrics()
    from qguard.metrics import Metrics

    m = Metrics()
    m.watch("free_slots", lambda: state.slots.n - state.slots.in_use)
    m.watch("active_sessions", lambda: _engine_sessions(state))
    m.watch("queue_depth", lambda: len(getattr(state.live_guard, "_queue", ()) or ()))
    return m


def _engine_sessions(state) -> int:
    """Live sessions open: slots held, less those closed and waiting to be freed (read without the engine's
    lock, which a running step holds: a scrape never waits for the model)."""
    engine = getattr(state.live_guard, "engine", None)
    return 0 if engine is None else max(0, len(engine.slots) - len(engine.released))


def make_audit(state) -> Any:
    """The app's `AuditLog` (`ServeSettings.audit`), or None. Its records count in the app's metrics."""
    if not state.settings.audit:
        return None
    from qguard.audit import AuditLog
    from qguard.metrics import Metrics

    metrics = state.metrics if isinstance(state.metrics, Metrics) else None
    return AuditLog(state.settings.audit, log_content=state.settings.log_content, metrics=metrics)


def policy_version(state) -> str:
    """What the audit log calls the policy: the settings' `policy_version` (a policy file's) if there is
    one, else the guard's mode."""
    version = getattr(state.settings, "policy_version", None)
    if version:
        return str(version)
    mode = state.guard.policy.mode
    return getattr(mode, "value", str(mode))


def observe(state, endpoint: str, verdict, stage: str = "prompt", *, text=None, seconds: float | None = None,
            blocked: bool | None = None, tokens: bool = True) -> None:
    """One decision: counted in the metrics and written to the audit log (with this request's id, the
    model, the API key's hash and the policy version); `text` (what was judged) is hashed, and stored only
    with --log-content. Never raises into the request."""
    state.metrics.observe_verdict(endpoint, verdict, stage, tokens=tokens)
    if seconds is not None:
        state.metrics.observe_guard_latency(endpoint, seconds)
    if state.audit is not None:
        state.audit.record_verdict(verdict, endpoint=endpoint, stage=stage, text=text, blocked=blocked,
                                   **_meta(state, seconds))


def observe_failure(state, endpoint: str, error: str, stage: str | None = None, *, text=None,
                    seconds: float | None = None) -> None:
    """A request that ended without a decision (the guard or the upstream failed); `error` holds no
    message text (an error code or type)."""
    if state.audit is not None:
        state.audit.record_failure(error, endpoint=endpoint, stage=stage, text=text, **_meta(state, seconds))


def _meta(state, seconds: float | None) -> dict[str, Any]:
    return {"request_id": REQUEST_ID.get(), "model": state.name, "api_key": API_KEY.get(),
            "policy_version": policy_version(state), "latency_ms": None if seconds is None else 1e3 * seconds}


# ------------------------------------------------------------------------------ logs

class RequestIdFilter(logging.Filter):
    """Gives every record a `request_id` (the current request's, "-" outside one), for formats to show."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id (and the exception, if any).
    Content is in a message only where the operator opted in (`--log-content`)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "message": record.getMessage(),
               "request_id": getattr(record, "request_id", None) or REQUEST_ID.get()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


JsonFormatter.converter = time.gmtime
TEXT_FORMAT = "%(levelname)s %(name)s [%(request_id)s] %(message)s"


def configure_logging(fmt: str = "text") -> None:
    """The server's logs: qguard's and uvicorn's (access lines included) through the root logger's
    handlers, each record with its request id; `fmt` "json" makes them JSON lines."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    formatter = JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    for h in root.handlers:
        h.setFormatter(formatter)
        if not any(isinstance(f, RequestIdFilter) for f in h.filters):
            h.addFilter(RequestIdFilter())
    for name in ("qguard.serve", "qguard.audit", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.INFO)


# ------------------------------------------------------------------------------ the server

def drain_on_sigterm(state, drain_timeout_s: float) -> bool:
    """Make the first SIGTERM drain the server (`Drain.run`) and then stop uvicorn normally, so the
    process exits 0; a second SIGTERM, or SIGINT, is uvicorn's own quick shutdown. Called from the app's
    lifespan under uvicorn (which has put its own handler in place by then: the handler is the uvicorn
    `Server`'s bound `handle_exit`, and that server is what is stopped). False where it cannot be done
    (not the main thread, or no uvicorn handler to take over)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(signal.SIGTERM)
    server = getattr(previous, "__self__", None)
    if server is None or not hasattr(server, "should_exit"):
        return False
    loop = asyncio.get_running_loop()

    async def drain() -> None:
        try:
            await state.drain.run(drain_timeout_s)
        finally:
            server.should_exit = True

    def on_sigterm(sig: int, frame) -> None:
        signal.signal(signal.SIGTERM, previous)  # the next one is uvicorn's
        # signal handlers run in the main thread, the loop's: a task in a fresh context (not the request id
        # of whatever request the signal interrupted)
        loop.create_task(drain(), context=contextvars.Context())

    signal.signal(signal.SIGTERM, on_sigterm)
    return True
