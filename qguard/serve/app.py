"""FastAPI app: `POST /v1/moderate` and a guarded `POST /v1/chat/completions` proxy.

The proxy judges the prompt before the upstream LLM sees it, and the answer before the client does:
blocked prompts never reach the LLM; blocked answers are replaced by a refusal with
finish_reason "content_filter". Streams are moderated token by token when the guard is a Stream model
(see `stream_proxy`), so harm is cut off within a few tokens.

Message content is never logged unless the operator passes `log_content=True`.
"""

from __future__ import annotations

import asyncio
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
from fastapi.responses import JSONResponse, StreamingResponse

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

    async def require_api_key(request: Request) -> None:
        if settings.api_keys is None:
            return
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or auth[len("Bearer "):] not in settings.api_keys:
            raise HTTPException(status_code=401, detail="missing or invalid API key")

    async def concurrency_slot() -> AsyncIterator[None]:
        if slots.locked():
            raise HTTPException(status_code=429, detail="too many requests in flight; retry later")
        async with slots:
            yield

    guarded = [Depends(require_api_key), Depends(concurrency_slot)]

    @app.exception_handler(QGuardError)
    async def qguard_error(_: Request, e: QGuardError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"error": {"type": type(e).__name__, "message": str(e)}})

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
    async def chat(req: ChatCompletionRequest):
        messages = [m.model_dump(include={"role", "content"}) for m in req.messages]
        if messages[-1]["role"] != "user":
            raise HTTPException(status_code=400, detail="the last message must be the user's")
        prompt_v = await runner.classify(messages)
        if prompt_v.blocked:
            log.info("proxy blocked prompt categories=%s", [c.value for c in prompt_v.categories])
            info = GuardInfo(prompt=verdict_model(prompt_v), blocked="prompt")
            if req.stream:
                return StreamingResponse(refusal_events(req.model, settings.refusal_message, info), media_type="text/event-stream")
            return completion_body(req.model, settings.refusal_message, "content_filter", info)
        http = upstream_client()
        body = req.model_dump()
        if req.stream:
            from qguard.serve.stream_proxy import proxy_stream

            return StreamingResponse(proxy_stream(http, body, messages, runner, stream_guard(), prompt_v, settings),
                                     media_type="text/event-stream")
        return await proxy_once(http, body, messages, runner, prompt_v, settings)

    return app


async def call_upstream(http: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    try:
        r = await http.post("/chat/completions", json=body)
    except httpx.HTTPError as e:
        raise HTTPException(status_code=502, detail=f"upstream LLM unreachable: {type(e).__name__}") from None
    if r.status_code != 200:
        raise HTTPException(status_code=502, detail=f"upstream LLM answered HTTP {r.status_code}")
    try:
        return r.json()
    except ValueError:
        raise HTTPException(status_code=502, detail="upstream LLM answered non-JSON") from None


async def proxy_once(http, body, messages, runner: GuardRunner, prompt_v: Verdict, settings: ServeSettings):
    data = await call_upstream(http, body)
    try:
        content = data["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise HTTPException(status_code=502, detail="upstream LLM answer has no choices[0].message.content") from None
    info = GuardInfo(prompt=verdict_model(prompt_v))
    if not content.strip():
        return {**data, "qguard": info.model_dump(exclude_none=True)}
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
