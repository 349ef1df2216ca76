"""Server-sent events as qguard writes them: `data:` events, keep-alive comments, qguard's own chunks.

The proxy never forwards an upstream line; everything a streaming client receives is written here, from
text the guard has judged (`proxy.ReleaseCursor` decides what is released, `DeltaWriter` writes it).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from fastapi.responses import StreamingResponse

from qguard.serve.models import new_id

KEEPALIVE = b": keep-alive\n\n"

Path = tuple  # where a piece of answer text goes in a delta: ("content",), ("tool_calls", 0, "arguments"), ...


def sse(obj: dict[str, Any] | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def refusal_events(model: str, text: str, info: dict[str, Any]) -> AsyncIterator[bytes]:
    """A streamed refusal: one chunk with the refusal text and finish_reason "content_filter", then `[DONE]`."""
    chunk = {"id": new_id(), "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": "content_filter"}],
             "qguard": info}
    yield sse(chunk)
    yield sse("[DONE]")


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body generator however the response ends, a client gone away included, so that the
    stream's live session and upstream request are freed at once rather than when it is collected."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


class DeltaWriter:
    """Released pieces as the deltas of qguard's own chunks: the role once, each tool call's id with its
    first piece, consecutive pieces of one field joined."""

    def __init__(self) -> None:
        self.role_sent = False
        self.call_ids: dict[int, str] = {}
        self.announced: set[int] = set()

    def delta(self, pieces: list[tuple[Path, str]], final: bool = False) -> dict[str, Any] | None:
        delta: dict[str, Any] = {}
        calls: dict[int, dict[str, Any]] = {}
        for path, text in pieces:
            if path[0] == "tool_calls":
                fn = self._call(calls, path[1])["function"]
                fn[path[2]] = fn.get(path[2], "") + text
            elif path[0] == "function_call":
                fc = delta.setdefault("function_call", {})
                fc[path[1]] = fc.get(path[1], "") + text
            else:
                delta[path[0]] = delta.get(path[0], "") + text
        if final:  # a tool call that carried no text still reaches the client
            for i in sorted(self.call_ids.keys() - self.announced):
                self._call(calls, i)
        if calls:
            delta["tool_calls"] = [calls[i] for i in sorted(calls)]
        if not delta:
            return None
        if not self.role_sent:
            self.role_sent = True
            delta = {"role": "assistant", **delta}
        return delta

    def _call(self, calls: dict[int, dict[str, Any]], i: int) -> dict[str, Any]:
        """This delta's entry for tool call `i`; the call's first entry names its id and type."""
        if i not in calls:
            calls[i] = {"index": i}
            if i not in self.announced:
                self.announced.add(i)
                calls[i].update({"id": self.call_ids[i]} if i in self.call_ids else {}, type="function")
            calls[i]["function"] = {}
        return calls[i]


# ------------------------------------------------------------------------------ keep-alive while the source is silent

_END = object()


@dataclass
class _Failed:
    error: Exception


async def paced(source: AsyncIterator[Any], interval: float | None) -> AsyncIterator[Any]:
    """`source`'s items, and `KEEPALIVE` each time `interval` seconds pass without one. `source` runs in a
    task of its own (a timeout must not cancel a read half-way); closing this generator closes it."""
    queue: asyncio.Queue = asyncio.Queue(maxsize=1)  # back-pressure: the upstream is read one chunk ahead

    async def pump() -> None:
        async with aclosing(source):  # closes the upstream request, also when cancelled
            try:
                async for item in source:
                    await queue.put(item)
            except Exception as e:
                await queue.put(_Failed(e))
                return
        await queue.put(_END)

    task = asyncio.create_task(pump())
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), interval)
            except asyncio.TimeoutError:
                yield KEEPALIVE
                continue
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        task.cancel()  # no await: this may run in a cancelled scope (the client went away)
