"""The upstream LLM, as the proxy reads it: one OpenAI-compatible `/chat/completions` call, whole or streamed.

Nothing read here is trusted: a whole answer must be a JSON object (`call`); a stream is read as SSE lines
of bounded length, each data event parsed into a `Chunk` that holds only the answer's text fields (in the
order they are judged), tool-call ids, finish_reason, usage counters and identifiers in their shape. The
stream ends only at its `[DONE]`; every other end (an error event or object, EOF, an over-long line) is
an error, and the upstream's own error text is never relayed (`errors.upstream_error`).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from qguard.serve.errors import APIError, upstream_error, upstream_stream_error
from qguard.serve.models import (
    answer_content,
    bad_answer,
    created_time,
    function_fields,
    identifier,
    opaque_id,
    text_field,
    usage_of,
)
from qguard.serve.settings import ServeSettings
from qguard.serve.sse import Path

BIG_LINE = 1 << 16  # upstream lines longer than this are parsed off the event loop
_EOL = re.compile(rb"\r\n|\r|\n")


def http_client(settings: ServeSettings) -> httpx.AsyncClient:
    """An HTTP client for the upstream of `settings` (its URL, key and timeout)."""
    headers = {"authorization": f"Bearer {settings.upstream_api_key}"} if settings.upstream_api_key else {}
    return httpx.AsyncClient(base_url=settings.upstream_url, headers=headers, timeout=settings.upstream_timeout_s)


class UpstreamClient:
    """The upstream's API over an `httpx.AsyncClient` (whose base URL ends in `/v1`). `max_line`: the
    longest stream line read (`limits.max_line_bytes`)."""

    def __init__(self, http: httpx.AsyncClient, max_line: int, log_content: bool = False):
        self.http, self.max_line, self.log_content = http, max_line, log_content

    async def call(self, body: dict[str, Any]) -> dict[str, Any]:
        """The answer to a non-streaming request, as a JSON object."""
        r = await self.http.post("/chat/completions", json=body)  # httpx errors: a 502 / 504 (`api_error`)
        if r.status_code != 200:
            raise upstream_error(r.status_code, r.text, self.log_content)
        try:
            data = await asyncio.to_thread(r.json) if len(r.content) > 1 << 16 else r.json()
        except ValueError:
            raise bad_answer("not JSON") from None
        if not isinstance(data, dict):
            raise bad_answer("not a JSON object")
        return data

    async def chunks(self, body: dict[str, Any]) -> AsyncIterator[Chunk]:
        """The upstream stream's data events, read, until its `[DONE]`. Anything else that ends it is an
        upstream error: an `event: error`, an error object (`"object": "error"`, an `error` key, with or
        without choices), the stream ending without `[DONE]` (cut short), a line over `max_line` bytes."""
        async with self.http.stream("POST", "/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise upstream_error(r.status_code, (await read_at_most(r, 1 << 16)).decode("utf-8", "replace"),
                                     self.log_content)
            seen, event = False, ""
            async for line in sse_lines(r, self.max_line):
                if not line:  # the end of an event: its fields are reset
                    event = ""
                    continue
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "event":
                    event = value.strip()
                    continue
                if name != "data":  # comments (": ..."), id, retry
                    continue
                seen = True
                payload = value.strip()
                if event == "error":
                    raise upstream_stream_error(parse_or_none(payload), payload, self.log_content)
                if payload == "[DONE]":
                    return
                yield await self._chunk(payload)
            if not seen:
                raise bad_answer("it answered without a single SSE event (is it an OpenAI-compatible stream?)")
            raise bad_answer("its stream ended without [DONE] (cut short)")

    async def _chunk(self, payload: str) -> Chunk:
        """One data event's chunk (an error object in its place is raised)."""
        try:
            data = json.loads(payload) if len(payload) < BIG_LINE else await asyncio.to_thread(json.loads, payload)
        except ValueError:
            raise bad_answer("a malformed stream chunk (not JSON)") from None
        if isinstance(data, dict) and (data.get("object") == "error" or data.get("error") is not None):
            raise upstream_stream_error(data, payload, self.log_content)
        return read_chunk(data)


# ------------------------------------------------------------------------------ one stream chunk

@dataclass
class Chunk:
    """One upstream stream chunk as the proxy reads it."""

    pieces: list[tuple[Path, str]] = field(default_factory=list)  # its answer text, in the order it is judged
    call_ids: dict[int, str] = field(default_factory=dict)  # tool-call index -> id, for calls it starts
    finish: str | None = None
    usage: dict[str, Any] | None = None  # its known integer counters (`usage_of`)
    ids: dict[str, Any] = field(default_factory=dict)  # id, created, model: where they have their shape


def read_chunk(data: Any) -> Chunk:
    if not isinstance(data, dict) or not isinstance(data.get("choices") or [], list):
        raise bad_answer("a stream chunk is not an object with a list of choices")
    ids = {"id": opaque_id(data.get("id")), "created": created_time(data.get("created")), "model": data.get("model")}
    c = Chunk(usage=usage_of(data.get("usage")), ids={k: v for k, v in ids.items() if v is not None})
    # several choices with index 0 in one chunk are successive pieces of the one answer: all are judged
    for choice in data.get("choices") or []:
        if not isinstance(choice, dict) or not isinstance(choice.get("delta") or {}, dict):
            raise bad_answer("a stream choice is not an object with a delta object")
        if choice.get("index", 0) != 0:
            raise bad_answer("several choices; qguard asked for one")
        read_delta(choice.get("delta") or {}, c)
        c.finish = identifier(choice.get("finish_reason"), "finish_reason") or c.finish
    return c


def read_delta(delta: dict[str, Any], c: Chunk) -> None:
    def add(path: Path, text: str | None) -> None:
        if text:
            c.pieces.append((path, text))

    for key in ("reasoning_content", "reasoning"):
        add((key,), text_field(delta.get(key), f"delta.{key}"))
    content = answer_content(delta.get("content"), "delta.content")
    for part in content if isinstance(content, list) else [{"type": "text", "text": content}]:
        add(("content",) if part["type"] == "text" else ("refusal",), part[part["type"]])
    add(("refusal",), text_field(delta.get("refusal"), "delta.refusal"))
    calls = delta.get("tool_calls") or []
    if not isinstance(calls, list):
        raise bad_answer("delta.tool_calls must be a list")
    for j, call in enumerate(calls):
        if not isinstance(call, dict):
            raise bad_answer(f"delta.tool_calls[{j}] must be an object")
        i = call.get("index", j)
        if type(i) is not int or not 0 <= i < 1024:
            raise bad_answer(f"delta.tool_calls[{j}].index must be a small integer")
        if (call_id := identifier(call.get("id"), f"delta.tool_calls[{j}].id")) is not None:
            c.call_ids.setdefault(i, call_id)
        fn = function_fields(call.get("function"), f"delta.tool_calls[{j}].function")
        for key in ("name", "arguments"):
            add(("tool_calls", i, key), fn.get(key))
    fn = function_fields(delta.get("function_call"), "delta.function_call")
    for key in ("name", "arguments"):
        add(("function_call", key), fn.get(key))


def parse_or_none(payload: str) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        return None


# ------------------------------------------------------------------------------ bounded reads

async def read_at_most(r: httpx.Response, n: int) -> bytes:
    """The start of a response body (an error body is only logged: an upstream cannot make qguard read
    gigabytes)."""
    out = bytearray()
    async for part in r.aiter_bytes():
        out += part
        if len(out) >= n:
            break
    return bytes(out[:n])


async def sse_lines(r: httpx.Response, max_line: int) -> AsyncIterator[str]:
    """The lines of an SSE body (ended by CRLF, LF or CR), each at most `max_line` bytes: a longer one is
    refused before it is buffered whole (one huge chunk must not cost the guard, or the memory, its size)."""
    buf, after_cr = bytearray(), False
    async for part in r.aiter_bytes():
        if after_cr and part[:1] == b"\n":  # the LF of a CRLF split between two reads
            part = part[1:]
        after_cr = False
        buf += part
        start = 0
        while (m := _EOL.search(buf, start)) is not None:
            if m.start() - start > max_line:
                raise line_too_long(max_line)
            yield buf[start:m.start()].decode("utf-8", "replace")
            start = m.end()
            after_cr = m.group() == b"\r" and start == len(buf)
        del buf[:start]
        if len(buf) > max_line:
            raise line_too_long(max_line)
    if buf:
        yield buf.decode("utf-8", "replace")


def line_too_long(max_line: int) -> APIError:
    return APIError(502, f"the upstream LLM's answer cannot be judged: a stream line over {max_line} bytes, more "
                         "than the guard's context holds; it was withheld", code="guard_context_exceeded")
