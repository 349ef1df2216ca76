"""FastAPI app: `POST /v1/moderate` and a guarded `POST /v1/chat/completions` proxy.

The proxy judges the prompt before the upstream LLM sees it, and the answer before the client does:
blocked prompts never reach the LLM; blocked answers are replaced by a refusal with
finish_reason "content_filter". Only judged text reaches the client: streams are moderated token by token
when the guard is a Stream model and text is released only once its tokens are judged (see
`stream_proxy`); non-streaming answers are judged whole. Every failure is an OpenAI-shaped error (fail
closed; `qguard.serve.errors`).

Message content is never logged unless the operator passes `log_content=True`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qguard.checkpoint import Kind
from qguard.errors import QGuardError
from qguard.guard import Guard
from qguard.policy import Mode, Policy, Verdict
from qguard.serve.errors import APIError, api_error, upstream_error
from qguard.serve.models import (
    ChatCompletionRequest,
    ModerateRequest,
    ModerateResponse,
    answer_body,
    answer_message,
    answer_text,
    bad_answer,
    completion_body,
    guard_info,
    guard_message,
    new_id,
)
from qguard.serve.stream_proxy import proxy_stream, sse

log = logging.getLogger("qguard.serve")

DEFAULT_REFUSAL = "I can't help with that."
GUARDED_PATHS = frozenset({"/v1/moderate", "/v1/chat/completions"})  # the routes that take a slot


@dataclass
class ServeSettings:
    api_keys: frozenset[str] | None = None  # None: no auth (bind to localhost only)
    upstream_url: str | None = None  # OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1
    upstream_api_key: str | None = None
    refusal_message: str = DEFAULT_REFUSAL
    max_concurrency: int = 16  # requests in flight; more get 429 instead of queueing without bound
    max_context: int = 4096  # tokens per live-moderated stream (prompt + answer); bounds KV memory
    upstream_timeout_s: float = 120.0  # connect / read / write timeout of each upstream request
    max_request_bytes: int = 4 << 20  # larger request bodies get 413 before any of them is read
    keepalive_s: float | None = 15.0  # SSE comment while the upstream is silent this long (None: never)
    docs: bool = False  # /docs, /redoc and /openapi.json (the pages load their scripts from a CDN)
    log_content: bool = False


def public_name(name: str) -> str:
    """What /health and replies call the model: a hub id as given, a local checkpoint by its folder name
    only (its filesystem path is nobody's business), the embedded starter as such."""
    from qguard.starter import starter_model_path

    p = Path(name).expanduser()
    try:
        if not p.exists():
            return name
        starter = starter_model_path()
        return "qguard-starter (embedded)" if starter is not None and p.resolve() == starter.resolve() else p.name
    except OSError:
        return Path(name).name


class GuardRunner:
    """Serialises model calls: one forward at a time uses every core better than several fighting."""

    def __init__(self, guard: Guard):
        self.guard = guard
        self.lock = threading.Lock()

    def _call(self, fn, *args):
        with self.lock:
            return fn(*args)

    async def classify(self, messages: list[dict[str, Any]]) -> Verdict:
        return await run_in_threadpool(self._call, self.guard.classify_messages, messages)


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


class Gate:
    """Pure ASGI middleware in front of every route.

    The API key, the body size and a free slot are checked before the body is read (an unauthenticated
    client learns nothing from validation errors; a 10 MB body costs nothing). It is not a Starlette
    BaseHTTPMiddleware because that one hides `http.disconnect` from `request.is_disconnected()`, so a
    dropped client would hold its slot and its upstream request to the end. An error that escapes the app
    becomes an OpenAI-shaped 500 (never a plain-text one)."""

    def __init__(self, app, settings: ServeSettings, slots: Slots):
        self.app, self.settings, self.slots = app, settings, slots

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        s, path = self.settings, scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if s.api_keys is not None and path.startswith("/v1/"):
            auth = headers.get("authorization", "")
            if not auth.startswith("Bearer ") or auth[len("Bearer "):] not in s.api_keys:
                return await reply(APIError(401, "missing or invalid API key", code="invalid_api_key"), scope, receive, send)
        too_big = APIError(413, f"request body over the server's limit of {s.max_request_bytes} bytes",
                           code="request_too_large")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > s.max_request_bytes:
            return await reply(too_big, scope, receive, send)
        slot = path in GUARDED_PATHS and scope.get("method") == "POST"
        if slot and not self.slots.take():
            return await reply(APIError(429, "too many requests in flight; retry later", code="rate_limit_exceeded"),
                               scope, receive, send)
        read, started = 0, False

        async def limited_receive():
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > s.max_request_bytes:  # a body sent without (or lying about) its length
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
        finally:
            if slot:
                self.slots.give()


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body generator however the response ends, a client gone away included, so that the
    stream's live session and upstream request are freed at once rather than when it is collected."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


async def reply(e: APIError, scope, receive, send) -> None:
    await error_response(e)(scope, receive, send)


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(status_code=e.status, content=e.body(), headers=e.headers)


def create_app(guard: Guard, settings: ServeSettings | None = None, upstream: httpx.AsyncClient | None = None) -> FastAPI:
    """Build the app. `upstream` is injectable so tests (and custom transports) need no network."""
    settings = settings or ServeSettings()
    runner = GuardRunner(guard)
    slots = Slots(settings.max_concurrency)
    client = upstream
    name = public_name(guard.name)
    live_guard, live_lock = None, asyncio.Lock()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        if client is not None and upstream is None:  # we opened it, we close it
            await client.aclose()
        if live_guard is not None:
            live_guard.close()

    docs = {} if settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="qguard", version="0.1.0", description="Qwen3Guard moderation API and guarded chat proxy",
                  lifespan=lifespan, **docs)
    app.add_middleware(Gate, settings=settings, slots=slots)
    app.state.guard, app.state.settings, app.state.slots = guard, settings, slots

    # every error has OpenAI's shape, {"error": {"message", "type", "param", "code"}}
    @app.exception_handler(APIError)
    async def openai_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(QGuardError)
    async def qguard_error(_: Request, e: QGuardError) -> JSONResponse:
        return error_response(api_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(api_error(e))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error_response(APIError(422, f"{where}: {first.get('msg', 'invalid request')}", param=where or None,
                                       details=jsonable_errors(e)))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": name, "kind": guard.kind.value}

    def judge(v: Verdict, mode: str | None) -> Verdict:
        return Policy(mode=Mode(mode), actions=guard.policy.actions, default_action=guard.policy.default_action,
                      block_threshold=guard.policy.block_threshold).apply(v) if mode else v

    @app.post("/v1/moderate", response_model=ModerateResponse)
    async def moderate(req: ModerateRequest) -> ModerateResponse:
        t0 = time.perf_counter()
        v = judge(await runner.classify([m.model_dump(include={"role", "content"}) for m in req.messages]), req.mode)
        log.info("moderate label=%s action=%s ms=%.1f", v.label.value, v.action.value, 1e3 * (time.perf_counter() - t0))
        if settings.log_content:
            log.info("moderate content=%r", req.messages[-1].content)
        return ModerateResponse(model=name, verdict=v.to_dict())

    async def live():
        """The live-moderation engine shared by every streaming request (Stream guards only; None with a
        Gen guard), made on first use, off the event loop (it allocates the whole KV cache)."""
        nonlocal live_guard
        if guard.kind is not Kind.STREAM:
            return None
        async with live_lock:
            if live_guard is None:
                live_guard = await run_in_threadpool(guard.stream_guard, max_sessions=settings.max_concurrency,
                                                     max_context=settings.max_context)
                app.state.live_guard = live_guard
        return live_guard

    def upstream_client() -> httpx.AsyncClient:
        nonlocal client
        if settings.upstream_url is None:
            raise APIError(501, "no upstream LLM configured (start with --upstream URL)", code="no_upstream")
        if client is None:
            headers = {"authorization": f"Bearer {settings.upstream_api_key}"} if settings.upstream_api_key else {}
            client = httpx.AsyncClient(base_url=settings.upstream_url, headers=headers, timeout=settings.upstream_timeout_s)
        return client

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        if req.n not in (None, 1):
            raise APIError(400, f"n={req.n}: qguard judges one answer per request, so only n=1 is accepted "
                                "(send n requests instead)", param="n")
        messages = [guard_message(m) for m in req.messages]
        if messages[-1]["role"] != "user":
            raise APIError(400, "the last message must be the user's or a tool result", param="messages")
        prompt_v = await runner.classify(messages)
        if settings.log_content:
            log.info("proxy prompt content=%r", messages[-1]["content"])
        if prompt_v.blocked:
            log.info("proxy blocked prompt categories=%s", [c.value for c in prompt_v.categories])
            info = guard_info(prompt_v, blocked="prompt")
            if req.stream:
                return StreamingResponse(refusal_events(req.model, settings.refusal_message, info),
                                         media_type="text/event-stream")
            return completion_body(req.model, settings.refusal_message, "content_filter", info)
        http = upstream_client()
        body = req.model_dump(exclude_unset=True)  # what the client sent, for the upstream
        if req.stream:
            # the assistant turn's opening (<|im_start|>assistant\n<think>\n\n</think>\n\n) takes 7 tokens more
            if guard.kind is Kind.STREAM and prompt_v.n_tokens is not None and prompt_v.n_tokens + 7 >= settings.max_context:
                raise APIError(400, f"the conversation is {prompt_v.n_tokens} tokens, leaving no room for an answer in "
                                    f"the server's live-moderation context of {settings.max_context} tokens",
                               param="messages", code="context_length_exceeded")
            return ClosingStreamingResponse(proxy_stream(http, body, messages, runner, live, prompt_v, settings),
                                            media_type="text/event-stream")
        return await until_disconnect(request, proxy_once(http, body, messages, runner, prompt_v, settings))

    return app


def jsonable_errors(e: RequestValidationError) -> list[dict[str, Any]]:
    return [{"loc": list(x.get("loc", ())), "msg": x.get("msg"), "type": x.get("type")} for x in e.errors()]


async def until_disconnect(request: Request, work):
    """Run `work`, but give up (and free the request's slot) when the client goes away: a non-streaming
    answer can take the upstream minutes, and a dropped client must not hold a slot that long."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()  # cancels the upstream request too
                raise APIError(499, "client closed the request", code="client_closed_request")
    finally:
        if not task.done():
            task.cancel()


async def call_upstream(http: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    r = await http.post("/chat/completions", json=body)  # httpx errors: a 502 / 504 (`api_error`)
    if r.status_code != 200:
        raise upstream_error(r.status_code, r.text)
    try:
        data = await asyncio.to_thread(r.json) if len(r.content) > 1 << 16 else r.json()
    except ValueError:
        raise bad_answer("not JSON") from None
    if not isinstance(data, dict):
        raise bad_answer("not a JSON object")
    return data


async def proxy_once(http, body, messages, runner: GuardRunner, prompt_v: Verdict, settings: ServeSettings):
    try:
        data = await call_upstream(http, body)
    except (httpx.HTTPError, QGuardError) as e:
        raise api_error(e, side="answer") from None
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise bad_answer("no choices[0].message")
    if len(choices) > 1:
        raise bad_answer("several choices; qguard asked for one")
    message = answer_message(choices[0].get("message"))
    content = answer_text(message)
    if not content.strip():  # nothing to read: whitespace at most
        return answer_body(data, message, guard_info(prompt_v))
    if settings.log_content:
        log.info("proxy answer content=%r", content)
    try:
        resp_v = await runner.classify([*messages, {"role": "assistant", "content": content}])
    except QGuardError as e:  # e.g. an answer longer than the guard's context: the server's problem
        raise api_error(e, side="answer") from None
    if resp_v.blocked:
        log.info("proxy blocked response categories=%s", [c.value for c in resp_v.categories])
        return completion_body(data.get("model") or body["model"], settings.refusal_message, "content_filter",
                               guard_info(prompt_v, resp_v, "response"), data)
    return answer_body(data, message, guard_info(prompt_v, resp_v))


async def refusal_events(model: str, text: str, info: dict[str, Any]):
    chunk = {"id": new_id(), "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": "content_filter"}],
             "qguard": info}
    yield sse(chunk)
    yield sse("[DONE]")

