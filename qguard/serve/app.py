"""FastAPI app: `POST /v1/moderate` and a guarded `POST /v1/chat/completions` proxy.

The proxy judges the prompt before the upstream LLM sees it, and the answer before the client does:
blocked prompts never reach the LLM; blocked answers are replaced by a refusal with
finish_reason "content_filter". Streams are moderated token by token when the guard is a Stream model
(see `stream_proxy`), so harm is cut off within a few tokens.

Message content is never logged unless the operator passes `log_content=True`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qguard.checkpoint import Kind
from qguard.errors import QGuardError
from qguard.guard import Guard
from qguard.policy import Mode, Policy, Verdict
from qguard.serve.models import (
    ChatCompletionRequest,
    GuardInfo,
    ModerateRequest,
    ModerateResponse,
    completion_body,
    content_text,
    guard_message,
    tool_calls_text,
    verdict_model,
)

log = logging.getLogger("qguard.serve")

DEFAULT_REFUSAL = "I can't help with that."


@dataclass
class ServeSettings:
    api_keys: frozenset[str] | None = None  # None: no auth (bind to localhost only)
    upstream_url: str | None = None  # OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1
    upstream_api_key: str | None = None
    refusal_message: str = DEFAULT_REFUSAL
    max_concurrency: int = 16  # requests in flight; more get 429 instead of queueing without bound
    max_context: int = 4096  # tokens per live-moderated stream (prompt + answer); bounds KV memory
    upstream_timeout_s: float = 120.0
    log_content: bool = False


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


def create_app(guard: Guard, settings: ServeSettings | None = None, upstream: httpx.AsyncClient | None = None) -> FastAPI:
    """Build the app. `upstream` is injectable so tests (and custom transports) need no network."""
    settings = settings or ServeSettings()
    runner = GuardRunner(guard)
    slots = asyncio.Semaphore(settings.max_concurrency)
    client = upstream

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        if client is not None and upstream is None:  # we opened it, we close it
            await client.aclose()

    app = FastAPI(title="qguard", version="0.1.0", description="Qwen3Guard moderation API and guarded chat proxy",
                  lifespan=lifespan)
    app.state.guard, app.state.settings = guard, settings

    @app.middleware("http")
    async def require_api_key(request: Request, call_next):
        # a middleware, not a dependency: the key is checked before the body is even parsed, so an
        # unauthenticated client learns nothing from validation errors
        if settings.api_keys is not None and request.url.path.startswith("/v1/"):
            auth = request.headers.get("authorization", "")
            if not auth.startswith("Bearer ") or auth[len("Bearer "):] not in settings.api_keys:
                return error_response(401, "invalid_api_key", "missing or invalid API key")
        return await call_next(request)

    async def concurrency_slot() -> AsyncIterator[None]:
        if slots.locked():
            raise HTTPException(status_code=429, detail="too many requests in flight; retry later")
        async with slots:
            yield

    guarded = [Depends(concurrency_slot)]

    # every error has OpenAI's shape, {"error": {"type", "message"}}, which OpenAI client libraries read
    @app.exception_handler(QGuardError)
    async def qguard_error(_: Request, e: QGuardError) -> JSONResponse:
        return error_response(400, type(e).__name__, str(e))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, ERROR_TYPES.get(e.status_code, "api_error"), str(e.detail),
                              headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error_response(422, "invalid_request_error", f"{where}: {first.get('msg', 'invalid request')}",
                              details=jsonable_errors(e))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": guard.name, "kind": guard.kind.value}

    def judge(v: Verdict, mode: str | None) -> Verdict:
        return Policy(mode=Mode(mode), actions=guard.policy.actions, default_action=guard.policy.default_action,
                      block_threshold=guard.policy.block_threshold).apply(v) if mode else v

    @app.post("/v1/moderate", response_model=ModerateResponse, dependencies=guarded)
    async def moderate(req: ModerateRequest) -> ModerateResponse:
        t0 = time.perf_counter()
        v = judge(await runner.classify([m.model_dump(include={"role", "content"}) for m in req.messages]), req.mode)
        log.info("moderate label=%s action=%s ms=%.1f", v.label.value, v.action.value, 1e3 * (time.perf_counter() - t0))
        if settings.log_content:
            log.info("moderate content=%r", req.messages[-1].content)
        return ModerateResponse(model=guard.name, verdict=verdict_model(v))

    live = None

    def stream_guard():
        """One live-moderation engine for all streaming requests (Stream guards only), made on first use."""
        nonlocal live
        if live is None and guard.kind is Kind.STREAM:
            live = guard.stream_guard(max_sessions=settings.max_concurrency, max_context=settings.max_context)
        return live

    def upstream_client() -> httpx.AsyncClient:
        nonlocal client
        if settings.upstream_url is None:
            raise HTTPException(status_code=501, detail="no upstream LLM configured (start with --upstream URL)")
        if client is None:
            headers = {"authorization": f"Bearer {settings.upstream_api_key}"} if settings.upstream_api_key else {}
            client = httpx.AsyncClient(base_url=settings.upstream_url, headers=headers, timeout=settings.upstream_timeout_s)
        return client

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat(req: ChatCompletionRequest, request: Request):
        if req.n not in (None, 1):
            raise HTTPException(status_code=400, detail=f"n={req.n}: qguard judges one answer per request, "
                                                        "so only n=1 is accepted (send n requests instead)")
        messages = [guard_message(m) for m in req.messages]
        if messages[-1]["role"] != "user":
            raise HTTPException(status_code=400, detail="the last message must be the user's or a tool result")
        prompt_v = await runner.classify(messages)
        if settings.log_content:
            log.info("proxy prompt content=%r", messages[-1]["content"])
        if prompt_v.blocked:
            log.info("proxy blocked prompt categories=%s", [c.value for c in prompt_v.categories])
            info = GuardInfo(prompt=verdict_model(prompt_v), blocked="prompt")
            if req.stream:
                return StreamingResponse(refusal_events(req.model, settings.refusal_message, info), media_type="text/event-stream")
            return completion_body(req.model, settings.refusal_message, "content_filter", info)
        http = upstream_client()
        body = req.model_dump(exclude_unset=True)  # what the client sent, for the upstream
        if req.stream:
            from qguard.serve.stream_proxy import proxy_stream

            return StreamingResponse(proxy_stream(http, body, messages, runner, stream_guard(), prompt_v, settings),
                                     media_type="text/event-stream")
        return await until_disconnect(request, proxy_once(http, body, messages, runner, prompt_v, settings))

    return app


ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_api_key", 404: "not_found_error", 429: "rate_limit_error",
               501: "not_implemented", 502: "upstream_error"}


def error_response(status: int, kind: str, message: str, headers: dict | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"type": kind, "message": message, **extra}},
                        headers=headers)


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
                raise HTTPException(status_code=499, detail="client closed the request")
    finally:
        if not task.done():
            task.cancel()


def upstream_error(status: int, text: str) -> HTTPException:
    """The upstream's refusal of a request, relayed so a client can tell its own mistake (4xx, with the
    upstream's message) or a rate limit (429) from an outage or a misconfigured server (502)."""
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text[:300]
    if status == 429 or status in (400, 404, 413, 422):
        return HTTPException(status_code=status, detail=f"upstream LLM: {message}")
    if status in (401, 403):
        return HTTPException(status_code=502, detail=f"upstream LLM refused qguard's credentials (HTTP {status}); "
                                                     "check the server's upstream key")
    return HTTPException(status_code=502, detail=f"upstream LLM answered HTTP {status}: {message}")


async def call_upstream(http: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    try:
        r = await http.post("/chat/completions", json=body)
    except httpx.HTTPError as e:
        raise HTTPException(status_code=502, detail=f"upstream LLM unreachable: {type(e).__name__}") from None
    if r.status_code != 200:
        raise upstream_error(r.status_code, r.text)
    try:
        return r.json()
    except ValueError:
        raise HTTPException(status_code=502, detail="upstream LLM answered non-JSON") from None


def answer_text(message: dict[str, Any]) -> str:
    """Everything of an upstream answer that reaches the client: reasoning (in the `</think>` form the
    guard reads as reasoning), content and tool-call arguments."""
    try:
        content = content_text(message.get("content"))
    except ValueError as e:
        raise HTTPException(status_code=502, detail=f"upstream LLM answer: {e}") from None
    content = "\n".join(t for t in (content, tool_calls_text(message.get("tool_calls"))) if t)
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning.strip():
        return f"{reasoning}</think>\n\n{content}"
    return content


async def proxy_once(http, body, messages, runner: GuardRunner, prompt_v: Verdict, settings: ServeSettings):
    data = await call_upstream(http, body)
    try:
        message = data["choices"][0]["message"]
        if not isinstance(message, dict):
            raise TypeError
    except (KeyError, IndexError, TypeError):
        raise HTTPException(status_code=502, detail="upstream LLM answer has no choices[0].message") from None
    if len(data["choices"]) > 1:
        raise HTTPException(status_code=502, detail="upstream LLM sent several choices; qguard asked for one")
    content = answer_text(message)
    info = GuardInfo(prompt=verdict_model(prompt_v))
    if not content.strip():
        return {**data, "qguard": info.model_dump(exclude_none=True)}
    if settings.log_content:
        log.info("proxy answer content=%r", content)
    resp_v = await runner.classify([*messages, {"role": "assistant", "content": content}])
    info.response = verdict_model(resp_v)
    if resp_v.blocked:
        info.blocked = "response"
        log.info("proxy blocked response categories=%s", [c.value for c in resp_v.categories])
        return completion_body(body["model"], settings.refusal_message, "content_filter", info, data)
    return {**data, "qguard": info.model_dump(exclude_none=True)}



async def refusal_events(model: str, text: str, info: GuardInfo) -> AsyncIterator[bytes]:
    chunk = {"id": "chatcmpl-qguard", "object": "chat.completion.chunk", "created": 0, "model": model,
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": "content_filter"}],
             "qguard": info.model_dump(exclude_none=True)}
    from qguard.serve.stream_proxy import sse

    yield sse(chunk)
    yield sse("[DONE]")
