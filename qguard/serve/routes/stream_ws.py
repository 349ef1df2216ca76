"""`/v1/stream`: live moderation sessions over WebSocket, for an LLM that runs anywhere (docs/stream_protocol.md).

Every connection holds at most one `AsyncStreamSession` of the app's one `StreamGuard` (`AppState.live`),
so pushes from all connections share the engine's batched steps. A connection reads one frame, answers it
with exactly one frame, and reads the next: replies keep the order of the frames, and a pushed delta is
judged before its `tokens` frame is sent. A refused frame is an `error` frame that leaves the session as
it was; only a missing API key and an idle connection close it. However the connection ends, its session
is freed at once (`close_nowait`: the slot returns to the pool when no running step uses it).

The HTTP gate (`deps.Gate`) does not see WebSocket scopes, so the API key is checked here: the
`Authorization: Bearer` header, or `?api_key=` for browsers (their WebSocket API sets no headers).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, WebSocket
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError
from starlette.websockets import WebSocketDisconnect

from qguard.errors import CapacityError, InputError
from qguard.serve.models import TextPart, content_text

if TYPE_CHECKING:
    from qguard.runtime.stream import AsyncStreamSession
    from qguard.serve.deps import AppState

log = logging.getLogger("qguard.serve")

router = APIRouter()

CLOSE_IDLE, CLOSE_POLICY = 1001, 1008  # WebSocket close codes: going away, policy violation


class FrameError(Exception):
    """A refused frame: the `error` frame the client gets (`code` from docs/stream_protocol.md)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


# ------------------------------------------------------------------------------ client frames

class _Frame(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt option is refused, never silently ignored

    type: str


class StreamMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: StrictStr | list[TextPart]


class OpenFrame(_Frame):
    messages: list[StreamMessage] = Field(min_length=1)
    thinking: StrictBool = False
    moderate_thinking: StrictBool = True
    system: StrictStr | None = None


class PushFrame(_Frame):
    text: StrictStr | None = None
    ids: list[StrictInt] | None = None


def parse(model: type[_Frame], frame: dict[str, Any]) -> Any:
    try:
        return model.model_validate(frame)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))[:100] or "frame"
        # pydantic's message only: its `input` may quote message content
        raise FrameError("bad_field", f"{frame['type']}: {where}: {first.get('msg', 'invalid')}") from None


def decode(text: str, limit: int) -> dict[str, Any]:
    """A client frame's JSON object; FrameError for anything else."""
    if len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit:
        raise FrameError("too_long", f"frame over the server's limit of {limit} bytes; it was dropped")
    try:
        frame = json.loads(text)
    except ValueError:
        raise FrameError("bad_frame", "frame is not valid JSON") from None
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        raise FrameError("bad_frame", 'a frame is a JSON object with a string "type"')
    return frame


# ------------------------------------------------------------------------------ a connection

class Connection:
    """One WebSocket's protocol state: the open session (if any), whether it finished, and what it pushed."""

    def __init__(self, ws: WebSocket, state: AppState):
        self.ws, self.state = ws, state
        self.session: AsyncStreamSession | None = None
        self.finished = False  # the last session finished (its slot is freed; `open` starts the next)
        self.pushes: str | None = None  # "text" or "ids": what this session was pushed (never both)
        self.handlers = {"open": self.open, "push": self.push, "flush": self.flush, "finish": self.finish,
                         "close": self.close}

    async def serve(self) -> None:
        idle = self.state.settings.stream_idle_timeout_s
        while True:
            try:
                msg = await asyncio.wait_for(self.ws.receive(), idle)
            except asyncio.TimeoutError:
                self.drop()
                await self.send(error_frame("idle_timeout", f"no frame for {idle:g} seconds; connection closed"))
                await self.ws.close(CLOSE_IDLE)
                return
            if msg["type"] == "websocket.disconnect":
                return
            await self.send(await self.answer(msg))

    async def answer(self, msg: dict[str, Any]) -> dict[str, Any]:
        try:
            if msg.get("text") is None:
                raise FrameError("bad_frame", "binary frames are not part of the protocol; send JSON text")
            frame = decode(msg["text"], self.state.settings.max_request_bytes)
            handler = self.handlers.get(frame["type"])
            if handler is None:
                raise FrameError("unknown_type", f"unknown frame type {frame['type'][:40]!r}; expected one of "
                                                 f"{', '.join(self.handlers)}")
            return await handler(frame)
        except FrameError as e:
            return error_frame(e.code, e.message)

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_text(json.dumps(frame, ensure_ascii=False))

    def drop(self) -> None:
        """Free the session now (never waits for a running step)."""
        if self.session is not None:
            self.session.close()
            self.session = None

    # -------------------------------------------------------------------------- frame handlers

    async def open(self, frame: dict[str, Any]) -> dict[str, Any]:
        if self.session is not None:
            raise FrameError("already_open", "a session is open on this connection; finish or close it first")
        if not self.state.guard.live:
            raise FrameError("live_required", "/v1/stream needs a Qwen3Guard-Stream checkpoint (live sessions); "
                                              "this server's model is not one")
        f = parse(OpenFrame, frame)
        messages = [{"role": m.role, "content": content_text(m.content)} for m in f.messages]
        sg = await self.state.live()
        try:
            # timeout 0: a full server answers `capacity` at once (back-pressure is the client's to apply)
            session = await sg.open_async(messages, system=f.system, thinking=f.thinking,
                                          moderate_thinking=f.moderate_thinking, timeout=0)
        except CapacityError as e:
            if _all_in_use(e):
                raise FrameError("capacity", f"all {sg.engine.max_sessions} live sessions of the server are in "
                                             "use; retry later") from None
            raise FrameError("too_long", f"open: {e}") from None
        except InputError as e:
            raise FrameError("bad_field", f"open: {e}") from None
        self.session, self.finished, self.pushes = session, False, None
        v = session.prompt
        log.info("stream open prompt=%s action=%s", v.label.value, v.action.value)
        if self.state.settings.log_content:
            log.info("stream open content=%r", messages[-1]["content"])
        return {"type": "prompt", "verdict": v.to_dict(), "blocked": v.blocked}

    def _live(self, what: str) -> AsyncStreamSession:
        if self.session is None:
            if self.finished:
                raise FrameError("finished", f"{what} after finish; open a new session")
            raise FrameError("not_open", f"{what} before open; send an open frame first")
        return self.session

    async def push(self, frame: dict[str, Any]) -> dict[str, Any]:
        s = self._live("push")
        f = parse(PushFrame, frame)
        if (f.text is None) == (f.ids is None):
            raise FrameError("bad_field", 'push: give exactly one of "text" (a string) or "ids" (a list of ints)')
        kind = "text" if f.text is not None else "ids"
        if self.pushes not in (None, kind):
            raise FrameError("bad_field", f"push: this session was pushed {self.pushes}; it cannot take {kind} "
                                          "too (text is tokenized by qguard, ids are taken as they are)")
        if self.state.settings.log_content and f.text is not None:
            log.info("stream push content=%r", f.text)
        tokens = await self._judged(s.push_text(f.text) if kind == "text" else s.push(f.ids), "push")
        self.pushes = kind
        return self.tokens_frame(s, tokens)

    async def flush(self, frame: dict[str, Any]) -> dict[str, Any]:
        s = self._live("flush")
        parse(_Frame, frame)
        return self.tokens_frame(s, await self._judged(s.flush(), "flush"))

    async def finish(self, frame: dict[str, Any]) -> dict[str, Any]:
        s = self._live("finish")
        parse(_Frame, frame)
        tokens: list = []
        try:
            tokens = await self._judged(s.flush(), "finish")
        except FrameError as e:
            if e.code != "too_long":
                raise
            # the session is full: the verdict covers the judged tokens; `pending_text` says what was not
        last = self.tokens_frame(s, tokens)["tokens"]  # the flush's verdicts: never dropped
        v = s.session.verdict()
        pending = s.pending_text
        s.session.finished = True
        self.drop()
        self.finished = True
        log.info("stream finish label=%s action=%s tokens=%s", v.label.value, v.action.value, v.n_tokens)
        return {"type": "verdict", "verdict": v.to_dict(), "tokens": last, "pending_text": pending}

    async def close(self, frame: dict[str, Any]) -> dict[str, Any]:
        parse(_Frame, frame)
        if self.session is None and not self.finished:
            raise FrameError("not_open", "close before open; nothing to close")
        self.drop()
        self.finished = False
        return {"type": "closed"}

    # -------------------------------------------------------------------------- helpers

    async def _judged(self, push, what: str) -> list:
        """The push's token verdicts; its refusal as a FrameError. An unexpected failure closes the session."""
        try:
            return await push
        except CapacityError as e:
            raise FrameError("too_long", f"{what}: {e}; the session is unchanged (finish it)") from None
        except InputError as e:
            if self.session is not None and self.session.session.failure is not None:
                self.drop()
                raise FrameError("internal", "the session was closed after an internal error; open a new one") from None
            raise FrameError("bad_field", f"{what}: {e}") from None
        except Exception as e:  # a fault in the guard: fail closed, this session only
            log.error("stream %s failed: %s", what, type(e).__name__)
            self.drop()
            raise FrameError("internal", "internal error in the guard; the session was closed, open a new one") from None

    def tokens_frame(self, s: AsyncStreamSession, tokens: list) -> dict[str, Any]:
        decode_ids = self.state.guard.tokenizer.decode
        out = []
        for tv in tokens:
            d = tv.to_dict()
            d["text"] = decode_ids([tv.token_id])  # as `stream-trace` decodes each token
            out.append(d)
        return {"type": "tokens", "tokens": out, "stop": s.stop, "pending_text": s.pending_text}


def error_frame(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message}


def _all_in_use(e: CapacityError) -> bool:
    """Whether an open's CapacityError is the engine's "every session in use" (rather than a conversation
    too long for its max_context): `StreamEngine.allocate`'s wording."""
    return "in use" in str(e)


def authorized(ws: WebSocket, keys: frozenset[str] | None) -> bool:
    if keys is None:
        return True
    auth = ws.headers.get("authorization", "")
    key = auth[len("Bearer "):] if auth.startswith("Bearer ") else ws.query_params.get("api_key")
    return key is not None and key in keys


@router.websocket("/v1/stream")
async def stream(ws: WebSocket) -> None:
    state: AppState = ws.app.state
    await ws.accept()
    if not authorized(ws, state.settings.api_keys):
        await ws.send_text(json.dumps(error_frame("unauthorized", "missing or invalid API key")))
        await ws.close(CLOSE_POLICY)
        return
    conn = Connection(ws, state)
    try:
        await conn.serve()
    except WebSocketDisconnect:
        pass  # the client went away: its session is freed below
    except Exception as e:  # a send on a connection that dropped mid-reply, or a fault: never a leaked slot
        log.warning("stream connection ended by %s", type(e).__name__)
    finally:
        conn.drop()
