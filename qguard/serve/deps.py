"""What every route shares: the app's state, the guard's runner, the request gate, and their providers.

`AppState` is the app's `app.state`: the guard and its settings, the objects built from them once (the
runner that serialises guard calls, the request slots, the token bound, the live engine, the upstream
client), and their shutdown (`aclose`, from the app's lifespan). A route reads it through the `StateDep`
dependency. Per-app services of later surfaces (metrics, an audit log) belong here as fields, closed in
`aclose`; per-request work that needs the parsed request is a dependency beside `app_state`.

The checks that must come before the body is read cannot be dependencies (FastAPI reads the body first):
the API key and the body size are `Gate`, a pure ASGI middleware; a free slot is taken by the route itself
when its router is `APIRouter(route_class=GuardedRoute)`, so a surface declares it where it is defined.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import TYPE_CHECKING, Annotated, Any

import httpx
from fastapi import Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from starlette.datastructures import State
from starlette.requests import HTTPConnection

from qguard.policy import Verdict
from qguard.serve import ops
from qguard.serve.errors import APIError, api_error, reply
from qguard.serve.limits import TokenBound, max_line_bytes
from qguard.serve.settings import ServeSettings, public_name
from qguard.serve.upstream import UpstreamClient, http_client

if TYPE_CHECKING:
    from qguard.runtime.guard import Guard
    from qguard.runtime.stream import StreamGuard


class GuardRunner:
    """Serialises model calls: one forward at a time uses every core better than several fighting."""

    def __init__(self, guard: Guard):
        self.guard = guard
        self.lock = threading.Lock()
        self.on_step = None  # (seconds, batch size) of each guard call, for the metrics

    def _call(self, fn, *args):
        with self.lock:
            t0 = time.perf_counter()
            out = fn(*args)
            if self.on_step is not None:
                self.on_step(time.perf_counter() - t0, len(args[0]) if fn == self.guard.classify_conversations else 1)
            return out

    async def classify(self, messages: list[dict[str, Any]]) -> Verdict:
        return await run_in_threadpool(self._call, self.guard.classify_messages, messages)

    async def classify_all(self, convs: list[list[dict[str, Any]]]) -> list[Verdict]:
        """Several conversations in one batched guard call."""
        if len(convs) == 1:
            return [await self.classify(convs[0])]
        return await run_in_threadpool(self._call, self.guard.classify_conversations, convs)


class Slots:
    """Requests in flight: a full server answers 429 at once rather than queueing without bound."""

    def __init__(self, n: int):
        self.n, self.in_use = n, 0

    def take(self) -> bool:
        if self.in_use >= self.n:
            return False
        self.in_use += 1
        return True

    def give(self) -> None:
        self.in_use -= 1


class AppState(State):
    """The app's shared objects, as `app.state` (a Starlette `State`, so `app.state.settings` reads as it
    always has). `upstream`: an injected upstream HTTP client (tests, custom transports); it is the
    caller's to close."""

    guard: Guard
    settings: ServeSettings
    runner: GuardRunner
    slots: Slots
    name: str  # the model's public name (`settings.public_name`)
    bound: TokenBound  # a lower bound on a text's tokens, for the checks before tokenizing
    max_line: int  # the longest upstream stream line read
    live_guard: StreamGuard | None  # the shared live engine, once made (`live`)

    def __init__(self, guard: Guard, settings: ServeSettings, upstream: httpx.AsyncClient | None = None):
        super().__init__()
        self.guard, self.settings = guard, settings
        self.runner, self.slots = GuardRunner(guard), Slots(settings.max_concurrency)
        self.name, self.bound = public_name(guard.name), TokenBound(guard.tokenizer)
        self.max_line = settings.max_upstream_line_bytes or max_line_bytes(
            settings.max_context if guard.live else guard.max_len)
        self.live_guard = None
        self._live_lock = asyncio.Lock()
        self._http, self._opened_http = upstream, False
        self._upstream: UpstreamClient | None = None
        # operations (`serve.ops`): metrics (a no-op object when off), the audit log (None when off), the
        # SIGTERM drain, readiness (`/health/ready`: set once the lifespan warmed the model)
        self.metrics = ops.make_metrics(self)
        self.audit = ops.make_audit(self)
        self.drain, self.ready = ops.Drain(), False
        self.runner.on_step = self.metrics.observe_step

    def observe(self, endpoint: str, verdict: Verdict, stage: str = "prompt", **kw: Any) -> None:
        """Report one decision to the metrics and the audit log (`ops.observe`: text=, seconds=,
        blocked=, tokens=). Every surface calls it once per verdict it acts on."""
        ops.observe(self, endpoint, verdict, stage, **kw)

    def observe_failure(self, endpoint: str, error: str, stage: str | None = None, **kw: Any) -> None:
        """Report a request that ended without a decision (`ops.observe_failure`)."""
        ops.observe_failure(self, endpoint, error, stage, **kw)

    async def live(self) -> StreamGuard:
        """The live-moderation engine shared by every streaming request of a live guard (`guard.live`),
        made on first use, off the event loop (it allocates the whole KV cache)."""
        async with self._live_lock:
            if self.live_guard is None:
                self.live_guard = await run_in_threadpool(self.guard.stream_guard,
                                                          max_sessions=self.settings.max_concurrency,
                                                          max_context=self.settings.max_context)
                self.live_guard.on_step = self.metrics.observe_step
        return self.live_guard

    def upstream(self) -> UpstreamClient:
        """The upstream LLM, its HTTP client opened on first use; a 501 when none is configured. (Called
        where a route needs it, not as a dependency: a blocked prompt is refused without one.)"""
        if self.settings.upstream_url is None:
            raise APIError(501, "no upstream LLM configured (start with --upstream URL)", code="no_upstream")
        if self._upstream is None:
            if self._http is None:
                self._http, self._opened_http = http_client(self.settings), True
            self._upstream = UpstreamClient(self._http, self.max_line, self.settings.log_content)
        return self._upstream

    async def aclose(self) -> None:
        """At shutdown: the upstream client it opened itself, and the live engine."""
        if self._opened_http:
            await self._http.aclose()
        if self.live_guard is not None:
            self.live_guard.close()
        if self.audit is not None:  # flushes what it can; what it cannot is counted as dropped
            await run_in_threadpool(self.audit.close)


def app_state(conn: HTTPConnection) -> AppState:
    return conn.app.state


StateDep = Annotated[AppState, Depends(app_state)]


# ------------------------------------------------------------------------------ before the body is read

class GuardedRoute(APIRoute):
    """A route that holds one of the server's request slots (`AppState.slots`) for as long as its ASGI call
    runs, a streamed response included; a full server answers 429 at once, before the body is read. Its
    router: `APIRouter(route_class=GuardedRoute)`."""

    async def handle(self, scope, receive, send) -> None:
        if scope["method"] not in self.methods:  # the 405 of a wrong method takes no slot
            return await super().handle(scope, receive, send)
        slots = scope["app"].state.slots
        if not slots.take():
            scope["app"].state.metrics.observe_rate_limited(scope["path"])
            raise APIError(429, "too many requests in flight; retry later", code="rate_limit_exceeded")
        try:
            await super().handle(scope, receive, send)
        finally:
            slots.give()


class Gate:
    """Pure ASGI middleware in front of every route.

    The API key and the body size are checked before the body is read (an unauthenticated client learns
    nothing from validation errors; a 10 MB body costs nothing), and so is a free slot (`GuardedRoute`). It
    is not a Starlette BaseHTTPMiddleware because that one hides `http.disconnect` from
    `request.is_disconnected()`, so a dropped client would hold its slot and its upstream request to the
    end. An error that escapes the app becomes an OpenAI-shaped 500 (never a plain-text one)."""

    def __init__(self, app, state: AppState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.state.settings.max_request_bytes
        too_big = APIError(413, f"request body over the server's limit of {limit} bytes", code="request_too_large")
        if (refused := self._refusal(scope, too_big)) is not None:
            return await reply(refused, scope, receive, send)
        read, started = 0, False

        async def limited_receive():
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > limit:  # a body sent without (or lying about) its length
                    raise too_big
            return message

        async def watched_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except Exception as e:
            if started:
                raise
            await reply(api_error(e), scope, receive, send)

    def _refusal(self, scope, too_big: APIError) -> APIError | None:
        """The error for a request refused on its headers alone: no valid API key (a /v1/ route), or a
        declared body over the limit."""
        s = self.state.settings
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if s.api_keys is not None and scope["path"].startswith("/v1/"):
            auth = headers.get("authorization", "")
            if not auth.startswith("Bearer ") or auth[len("Bearer "):] not in s.api_keys:
                return APIError(401, "missing or invalid API key", code="invalid_api_key")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > s.max_request_bytes:
            return too_big
        return None
