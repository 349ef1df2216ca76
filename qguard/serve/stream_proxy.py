"""Streaming (SSE) side of the guarded proxy.

With a Stream guard every upstream delta is pushed into a live session (`qguard.stream`): the answer is
judged token by token and the upstream request is dropped the moment the policy blocks, so the LLM stops
generating and the client gets a final `finish_reason: "content_filter"` chunk. Chunks are forwarded as
they arrive; what reaches the client before a cut is at most the debounce window plus the few characters
the incremental tokenizer has not committed yet. Every text the client receives is judged: content,
`reasoning_content` and tool-call arguments, in arrival order, as one text.

A Gen guard cannot judge partial answers cheaply, so with it the proxy buffers the whole answer, judges
it once, and only then streams it (or the refusal) to the client.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx

from qguard.checkpoint import Kind
from qguard.errors import CapacityError, QGuardError
from qguard.policy import Verdict
from qguard.serve.models import GuardInfo, verdict_model

log = logging.getLogger("qguard.serve")


def sse(obj: dict[str, Any] | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def chunk(model: str, content: str | None, finish: str | None, info: GuardInfo | None = None,
          ids: dict[str, Any] | None = None) -> dict[str, Any]:
    """One SSE chunk of qguard's own; `ids` carries the upstream stream's id and created time, if seen."""
    delta = {} if content is None else {"role": "assistant", "content": content}
    ids = ids or {}
    body: dict[str, Any] = {"id": ids.get("id", "chatcmpl-qguard"), "object": "chat.completion.chunk",
                            "created": ids.get("created", 0), "model": model,
                            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if info is not None:
        body["qguard"] = info.model_dump(exclude_none=True)
    return body


def error_event(message: str) -> bytes:
    return sse({"error": {"type": "upstream_error", "message": message}})


def delta_text(delta: dict[str, Any]) -> str:
    """All the text of one upstream delta that the client will see."""
    parts = []
    for key in ("reasoning_content", "reasoning", "content"):
        v = delta.get(key)
        if v is not None and not isinstance(v, str):
            raise QGuardError(f"upstream LLM sent a non-text delta.{key}")
        parts.append(v or "")
    for call in delta.get("tool_calls") or []:
        fn = (call.get("function") or {}) if isinstance(call, dict) else {}
        parts += [v for v in (fn.get("name"), fn.get("arguments")) if isinstance(v, str)]
    return "".join(parts)


async def upstream_deltas(http: httpx.AsyncClient, body: dict[str, Any],
                          ids: dict[str, Any] | None = None) -> AsyncIterator[tuple[str, str]]:
    """(raw SSE line, text of its delta) for each data line of the upstream stream; the stream's id and
    created time go into `ids`."""
    async with http.stream("POST", "/chat/completions", json=body) as r:
        if r.status_code != 200:
            from qguard.serve.app import upstream_error

            e = upstream_error(r.status_code, (await r.aread()).decode("utf-8", "replace"))
            raise QGuardError(str(e.detail))
        seen = False
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            seen = True
            payload = line[5:].strip()
            if payload == "[DONE]":
                return
            try:
                data = json.loads(payload)
                choices = data.get("choices") or [{}]
                if any(c.get("index", 0) != 0 for c in choices):
                    raise QGuardError("upstream LLM sent several choices; qguard asked for one")
                text = delta_text(choices[0].get("delta") or {})
            except (ValueError, AttributeError, TypeError):
                raise QGuardError("upstream LLM sent a malformed stream chunk") from None
            if ids is not None and "id" in data:
                ids.setdefault("id", data["id"])
                ids.setdefault("created", data.get("created", 0))
            yield line, text
        if not seen:
            raise QGuardError("upstream LLM answered without a single SSE event (is it an OpenAI-compatible stream?)")


async def proxy_stream(http, body, messages, runner, stream_guard, prompt_v: Verdict, settings) -> AsyncIterator[bytes]:
    """SSE bytes for a guarded streaming completion (the prompt was already judged and allowed)."""
    try:
        if runner.guard.kind is Kind.STREAM:
            async for b in _live(http, body, messages, stream_guard, prompt_v, settings):
                yield b
        else:
            async for b in _buffered(http, body, messages, runner, prompt_v, settings):
                yield b
    except (QGuardError, httpx.HTTPError) as e:
        log.warning("proxy stream failed: %s", type(e).__name__)
        yield error_event(str(e) if isinstance(e, QGuardError) else f"upstream LLM unreachable: {type(e).__name__}")
    yield sse("[DONE]")


async def _live(http, body, messages, stream_guard, prompt_v, settings) -> AsyncIterator[bytes]:
    try:
        session = await stream_guard.open_async(messages, timeout=settings.upstream_timeout_s)
    except CapacityError as e:
        yield error_event(str(e))
        return
    ids: dict[str, Any] = {}
    seen: list[str] = []  # the answer text, kept only when the operator logs content
    async with session:  # frees the session when the client goes away, too
        async for line, delta in upstream_deltas(http, body, ids):
            if settings.log_content:
                seen.append(delta)
            if delta and any(tv.stop for tv in await session.push_text(delta)):
                async for b in _cut(session, prompt_v, body["model"], settings, ids):
                    yield b
                return  # leaving the `async with http.stream` closes the upstream request
            yield (line + "\n\n").encode()
        if any(tv.stop for tv in await session.flush()):
            async for b in _cut(session, prompt_v, body["model"], settings, ids):
                yield b
            return
        if settings.log_content:
            log.info("proxy answer content=%r", "".join(seen))
        info = GuardInfo(prompt=verdict_model(prompt_v), response=verdict_model(session.verdict()))
        yield sse({**chunk(body["model"], None, None, info, ids), "choices": []})


async def _cut(session, prompt_v, model, settings, ids) -> AsyncIterator[bytes]:
    v = session.verdict()
    log.info("proxy cut stream at token %s categories=%s", v.unsafe_position, [c.value for c in v.categories])
    info = GuardInfo(prompt=verdict_model(prompt_v), response=verdict_model(v), blocked="response")
    yield sse(chunk(model, "\n" + settings.refusal_message, "content_filter", info, ids))


async def _buffered(http, body, messages, runner, prompt_v, settings) -> AsyncIterator[bytes]:
    lines, text, ids = [], [], {}
    async for line, delta in upstream_deltas(http, body, ids):
        lines.append(line)
        text.append(delta)
    content = "".join(text)
    info = GuardInfo(prompt=verdict_model(prompt_v))
    if content.strip():
        if settings.log_content:
            log.info("proxy answer content=%r", content)
        v = await runner.classify([*messages, {"role": "assistant", "content": content}])
        info.response = verdict_model(v)
        if v.blocked:
            info.blocked = "response"
            yield sse(chunk(body["model"], settings.refusal_message, "content_filter", info, ids))
            return
    for line in lines:
        yield (line + "\n\n").encode()
    yield sse({**chunk(body["model"], None, None, info, ids), "choices": []})
