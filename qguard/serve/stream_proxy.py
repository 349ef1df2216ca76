"""Streaming (SSE) side of the guarded proxy: judged before sent, fail closed.

The proxy never forwards the upstream's lines. It reads the text of each upstream chunk (content,
`reasoning_content`/`reasoning`, `refusal`, tool-call names and arguments, the legacy `function_call`,
list-of-parts content; every choice of the chunk), pushes it to the guard in arrival order, and sends
chunks of its own (the upstream's id, model and created time) carrying only text the guard has judged
(`ReleaseCursor`). Any other field of a choice (logprobs, vendor extensions) is dropped.

With a Stream guard the text is judged token by token as it arrives. The incremental tokenizer holds back
the last pre-tokenizer chunk until later text fixes its tokens (`AsyncStreamSession.pending_text`); that
tail is held from the client too, and judged at the end of the answer (the upstream's finish_reason, or
the end of its stream) before it is released. The upstream's finish_reason goes out only after everything
before it was judged and allowed. When the policy blocks, the upstream request is dropped (the LLM stops
generating) and the client gets a final `finish_reason: "content_filter"` chunk.

A Gen guard cannot judge partial answers cheaply, so with it nothing is released before the whole answer
is judged once (as a non-streaming answer is).

Every failure (the upstream's, the guard's, a bug) ends the stream with an OpenAI-shaped error event and
`[DONE]`: no finish_reason "stop" follows, and text that was not judged is never sent. While the upstream
is silent the client gets SSE comments (": keep-alive") every `keepalive_s`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import httpx

from qguard.errors import CapacityError
from qguard.policy import Verdict
from qguard.serve.errors import APIError, api_error, upstream_error
from qguard.serve.models import (
    answer_content,
    answer_text,
    bad_answer,
    function_fields,
    guard_info,
    identifier,
    new_id,
    text_field,
)

log = logging.getLogger("qguard.serve")

KEEPALIVE = b": keep-alive\n\n"
BIG_LINE = 1 << 16  # upstream lines longer than this are parsed off the event loop

Path = tuple  # where a piece of answer text goes in a delta: ("content",), ("tool_calls", 0, "arguments"), ...


def sse(obj: dict[str, Any] | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n".encode()


# ------------------------------------------------------------------------------ reading the upstream stream

@dataclass
class Chunk:
    """One upstream stream chunk as the proxy reads it."""

    pieces: list[tuple[Path, str]] = field(default_factory=list)  # its answer text, in the order it is judged
    call_ids: dict[int, str] = field(default_factory=dict)  # tool-call index -> id, for calls it starts
    finish: str | None = None
    usage: dict[str, Any] | None = None
    ids: dict[str, Any] = field(default_factory=dict)  # id, created, model


def read_chunk(data: Any) -> Chunk:
    if not isinstance(data, dict) or not isinstance(data.get("choices") or [], list):
        raise bad_answer("a stream chunk is not an object with a list of choices")
    c = Chunk(usage=data["usage"] if isinstance(data.get("usage"), dict) else None,
              ids={k: data[k] for k in ("id", "created", "model") if data.get(k) is not None})
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


async def upstream_chunks(http: httpx.AsyncClient, body: dict[str, Any]) -> AsyncIterator[Chunk]:
    """The upstream stream's data events, read; until `[DONE]` or the end of the stream."""
    async with http.stream("POST", "/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise upstream_error(r.status_code, (await r.aread()).decode("utf-8", "replace"))
        seen = False
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            seen = True
            payload = line[5:].strip()
            if payload == "[DONE]":
                return
            try:
                data = json.loads(payload) if len(payload) < BIG_LINE else await asyncio.to_thread(json.loads, payload)
            except ValueError:
                raise bad_answer("a malformed stream chunk (not JSON)") from None
            if isinstance(data, dict) and "error" in data and "choices" not in data:
                err = data["error"]
                message = err.get("message") if isinstance(err, dict) else err
                raise APIError(502, f"upstream LLM failed mid-stream: {str(message)[:300]}", code="upstream_error")
            yield read_chunk(data)
        if not seen:
            raise bad_answer("it answered without a single SSE event (is it an OpenAI-compatible stream?)")


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


# ------------------------------------------------------------------------------ releasing judged text

class ReleaseCursor:
    """The answer's text between the guard and the client.

    The guard is pushed the pieces' texts concatenated, in arrival order. `release(judged)` takes how many
    characters of that text the guard has judged (and allowed) and returns the pieces up to there that were
    not released yet, the last one cut where needed; the rest stays held. A hold-back window only has to
    pass a smaller `judged`.
    """

    def __init__(self) -> None:
        self._held: deque[list] = deque()  # [path, text] not released yet
        self.pushed = 0  # characters pushed to the guard
        self.released = 0  # characters released to the client

    def add(self, pieces: list[tuple[Path, str]]) -> str:
        """Hold `pieces`; returns their text, to push to the guard."""
        self._held.extend([path, text] for path, text in pieces)
        text = "".join(t for _, t in pieces)
        self.pushed += len(text)
        return text

    def release(self, judged: int) -> list[tuple[Path, str]]:
        out = []
        judged = min(judged, self.pushed)
        while self.released < judged:
            piece = self._held[0]
            take = min(len(piece[1]), judged - self.released)
            out.append((piece[0], piece[1][:take]))
            self.released += take
            if take == len(piece[1]):
                self._held.popleft()
            else:
                piece[1] = piece[1][take:]
        return out

    @property
    def held(self) -> int:
        return self.pushed - self.released


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


# ------------------------------------------------------------------------------ judges

class LiveJudge:
    """A Stream guard's session: judges text as it comes; all but its pending tail is judged."""

    def __init__(self, session):
        self.session = session

    async def push(self, pieces: list[tuple[Path, str]], text: str) -> bool:
        return any(tv.stop for tv in await self.session.push_text(text))

    async def finish(self) -> bool:
        return any(tv.stop for tv in await self.session.flush())

    def unjudged(self) -> int:
        return len(self.session.pending_text)

    def verdict(self) -> Verdict | None:
        return self.session.verdict()


class BufferedJudge:
    """A Gen guard: the whole answer is judged once, at its end (as a non-streaming answer is)."""

    def __init__(self, runner, messages: list[dict[str, str]], settings):
        self.runner, self.messages, self.settings = runner, messages, settings
        self.pieces: list[tuple[Path, str]] = []
        self.n, self.done = 0, False
        self.v: Verdict | None = None

    async def push(self, pieces: list[tuple[Path, str]], text: str) -> bool:
        self.pieces += pieces
        self.n += len(text)
        return False

    async def finish(self) -> bool:
        text = answer_text(message_of(self.pieces))
        if text.strip():  # whitespace is not judged (the guard has nothing to read in it)
            if self.settings.log_content:
                log.info("proxy answer content=%r", text)
            self.v = await self.runner.classify([*self.messages, {"role": "assistant", "content": text}])
        self.done = True
        return self.v is not None and self.v.blocked

    def unjudged(self) -> int:
        return 0 if self.done else self.n

    def verdict(self) -> Verdict | None:
        return self.v


def message_of(pieces: list[tuple[Path, str]]) -> dict[str, Any]:
    """The answer message that streamed pieces add up to (for `answer_text`)."""
    m: dict[str, Any] = {}
    calls: dict[int, dict[str, str]] = {}
    for path, text in pieces:
        if path[0] == "tool_calls":
            fn = calls.setdefault(path[1], {})
            fn[path[2]] = fn.get(path[2], "") + text
        elif path[0] == "function_call":
            fc = m.setdefault("function_call", {})
            fc[path[1]] = fc.get(path[1], "") + text
        else:
            m[path[0]] = m.get(path[0], "") + text
    if calls:
        m["tool_calls"] = [{"function": calls[i]} for i in sorted(calls)]
    return m


# ------------------------------------------------------------------------------ the proxy's stream

async def proxy_stream(http: httpx.AsyncClient, body: dict[str, Any], messages: list[dict[str, str]], runner,
                       live, prompt_v: Verdict, settings) -> AsyncIterator[bytes]:
    """SSE bytes for a guarded streaming completion (the prompt was already judged and allowed).
    `live`: an async callable giving the shared StreamGuard (None with a Gen guard)."""
    ids = {"id": new_id(), "created": int(time.time()), "model": body["model"]}
    try:
        stream_guard = await live()
        if stream_guard is None:
            async with aclosing(answer(http, body, BufferedJudge(runner, messages, settings), prompt_v, settings,
                                       ids)) as out:
                async for b in out:
                    yield b
        else:
            try:
                session = await stream_guard.open_async(messages, timeout=settings.upstream_timeout_s)
            except CapacityError as e:
                raise APIError(503, str(e), code="guard_busy") from None
            # frees the session and closes the upstream request however the stream ends (a client gone too)
            async with session, aclosing(answer(http, body, LiveJudge(session), prompt_v, settings, ids)) as out:
                async for b in out:
                    yield b
    except Exception as e:  # fail closed: an error event, never a silent end
        err = api_error(e, side="answer")
        log.warning("proxy stream failed: HTTP %s %s", err.status, err.code or err.type)
        yield sse(err.body())
    yield sse("[DONE]")


async def answer(http, body, judge, prompt_v: Verdict, settings, ids: dict[str, Any]) -> AsyncIterator[bytes]:
    cursor, writer = ReleaseCursor(), DeltaWriter()
    seen: list[str] = []  # the answer text, kept only when the operator logs content
    have_ids = finished = False

    def out(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return sse({"id": ids["id"], "object": "chat.completion.chunk", "created": ids["created"],
                    "model": ids["model"], "choices": choices, **extra})

    def released(final: bool = False) -> bytes | None:
        delta = writer.delta(cursor.release(cursor.pushed - judge.unjudged()), final)
        return out([{"index": 0, "delta": delta, "finish_reason": None}]) if delta else None

    def cut() -> bytes:
        v = judge.verdict()
        log.info("proxy cut stream at token %s categories=%s", v.unsafe_position, [c.value for c in v.categories])
        text = ("\n" if cursor.released else "") + settings.refusal_message
        return out([{"index": 0, "delta": writer.delta([(("content",), text)]), "finish_reason": "content_filter"}],
                   qguard=guard_info(prompt_v, v, "response"))

    async with aclosing(paced(upstream_chunks(http, body), settings.keepalive_s)) as items:
        async for c in items:
            if c is KEEPALIVE:
                yield KEEPALIVE
                continue
            if not have_ids and c.ids.get("id"):
                have_ids = True
                ids.update(c.ids)
            writer.call_ids.update({i: x for i, x in c.call_ids.items() if i not in writer.call_ids})
            if c.pieces:
                if finished:
                    raise bad_answer("text after its finish_reason")
                text = cursor.add(c.pieces)
                if settings.log_content:
                    seen.append(text)
                if await judge.push(c.pieces, text):
                    yield cut()
                    return  # closing `items` closes the upstream request: the LLM stops generating
            finish = c.finish if not finished else None
            if finish is not None:
                if await judge.finish():
                    yield cut()
                    return
                finished = True
            if (b := released(final=finished)) is not None:
                yield b
            if finish is not None:  # everything before it is judged, allowed and sent
                yield out([{"index": 0, "delta": {}, "finish_reason": finish}],
                          **({"usage": c.usage} if c.usage else {}))
            elif c.usage is not None:
                yield out([], usage=c.usage)
    if not finished:  # the upstream ended without a finish_reason: judge what it held back all the same
        if await judge.finish():
            yield cut()
            return
        if (b := released(final=True)) is not None:
            yield b
    if cursor.held:  # cannot happen with a correct judge; if it does, the rest is not sent
        raise RuntimeError(f"{cursor.held} characters of the answer were left unjudged")
    if settings.log_content and seen:
        log.info("proxy answer content=%r", "".join(seen))
    yield out([], qguard=guard_info(prompt_v, judge.verdict()))
