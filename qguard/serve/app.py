"""The app factory: `create_app(guard)` is a FastAPI app serving `POST /v1/moderate` and a guarded
`POST /v1/chat/completions` proxy.

The proxy judges the prompt before the upstream LLM sees it, and the answer before the client does:
blocked prompts never reach the LLM; blocked answers are replaced by a refusal with finish_reason
"content_filter". Only judged text reaches the client: streams are moderated token by token when the
guard is live (a Stream model) and text is released only once its tokens are judged (`serve.proxy`);
otherwise answers are judged whole. Every failure is an OpenAI-shaped error (fail closed;
`qguard.serve.errors`). Message content is never logged unless the operator passes `log_content=True`.

The pieces: `settings` (ServeSettings), `deps` (the app's state, the request gate, the dependency
providers), `errors`, `routes/` (one module per surface), `proxy` (the answer side), `upstream` (the
LLM's API), `sse`, `models` (bodies, what the guard reads of a message), `limits` (checks before
tokenizing). A new surface is a module in `routes/` and one `include_router` line in `_routes`.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import httpx
from fastapi import FastAPI

from qguard.serve import errors, ops
from qguard.serve.deps import AppState, Gate
from qguard.serve.ops import RequestContext
from qguard.serve.proxy import until_disconnect
from qguard.serve.routes import chat, health, moderate, moderations, playground, stream_ws
from qguard.serve.routes import ops as ops_routes
from qguard.serve.settings import ServeSettings

if TYPE_CHECKING:
    from qguard.runtime.guard import Guard

__all__ = ["ServeSettings", "create_app", "until_disconnect"]


def create_app(guard: Guard, settings: ServeSettings | None = None, upstream: httpx.AsyncClient | None = None) -> FastAPI:
    """Build the app. `upstream` is injectable so tests (and custom transports) need no network."""
    state = AppState(guard, settings or ServeSettings(), upstream)
    docs = {} if state.settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="qguard", version="0.1.0", description="Qwen3Guard moderation API and guarded chat proxy",
                  lifespan=_lifespan, **docs)
    app.state = state
    errors.install(app)
    _routes(app)
    _middleware(app, state)
    return app


def _routes(app: FastAPI) -> None:
    """The surfaces, one router each (`qguard.serve.routes`)."""
    app.include_router(health.router)
    app.include_router(ops_routes.router)
    app.include_router(moderate.router)
    app.include_router(moderations.router)
    app.include_router(chat.router)
    app.include_router(stream_ws.router)
    if app.state.settings.playground:
        app.include_router(playground.router)


def _middleware(app: FastAPI, state: AppState) -> None:
    """The ASGI layers around every route. Starlette runs the last one added outermost: a middleware
    added after the gate (request ids, request metrics) sees the gate's 401 and 413 too."""
    app.add_middleware(Gate, state=state)
    app.add_middleware(RequestContext, state=state)  # request ids, request metrics, the drain


@asynccontextmanager
async def _lifespan(app: FastAPI):
    state = app.state
    if state.settings.warmup:  # one tiny judge: the first real request does not pay for lazy setup
        await state.runner.classify([{"role": "user", "content": "Hello"}])
    if state.settings.drain_on_sigterm:
        ops.drain_on_sigterm(state, state.settings.drain_timeout_s)
    state.ready = True
    try:
        yield
    finally:
        state.ready = False
        await state.aclose()
