"""`/v1/stream`: live moderation sessions over WebSocket, for an LLM that runs anywhere (docs/stream_protocol.md).

Every connection holds at most one `AsyncStreamSession` of the app's one `StreamGuard` (`AppState.live`),
so pushes from all connections share the engine's batched steps. A connection reads one frame, answers it
with exactly one frame, and reads the next: replies keep the order of the frames, and a pushed delta is
judged before its `tokens` frame is sent. A refused frame is an `error` frame that leaves the session as
it was; only a missing API key and an idle connection close it. However the connection ends, its session
is freed at once (`close_nowait`: the slot returns to the pool when no running step uses it).

Hold-back (issue #17's leak control): the client shows the text itself, so every `tokens` and `verdict`
frame says what it may show now (`release`: the pushed text, or ids, newly released). Text is released
`hold_tokens` judged tokens behind the newest (`leak.HoldBack`, the proxy's rule; the server's setting, or
more if `open` asks), nothing more once the policy stops the session, and the rest at `finish` only when
the response verdict does not block.

The HTTP gate (`deps.Gate`) does not see WebSocket scopes, so the API key is checked here: the
`Authorization: Bearer` header, or `?api_key=` for browsers (their WebSocket API sets no headers).

Every decision goes to the metrics and the audit log (`AppState.observe`, endpoint `/v1/stream`, the
connection's request id): the prompt verdict at `open`, the response verdict once per session with the
answer it judged (hashed; stored only with --log-content), at `finish` or, for a session that ends without
one (`close`, the client gone, the idle timeout, the drain's deadline), its verdict so far if it judged any
of the answer. A session the policy stopped counts as a cut. Guard failures (`capacity`, a conversation
or answer `too_long` for the context, `internal`) are failure records; `capacity` also counts as rate
limited. Tokens judged are counted as each frame's verdicts come.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, WebSocket
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError
from starlette.websockets import WebSocketDisconnect

from qguard.errors import CapacityError, InputError, check_int
from qguard.leak import HoldBack
from qguard.serve.models import TextPart, content_text
from qguard.serve.ops import API_KEY

if TYPE_CHECKING:
    from qguard.policy import Verdict
    from qguard.runtime.stream import AsyncStreamSession
    from qguard.serve.deps import AppState

log = logging.getLogger("qguard.serve")

router = APIRouter()

CLOSE_IDLE, CLOSE_POLICY = 1001, 1008  # WebSocket close codes: going away, policy violation
ENDPOINT = "stream"  # the metrics' and audit log's name of this route


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
    hold_tokens: StrictInt | None = None  # a larger hold-back window than the server's (never smaller)


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


# ------------------------------------------------------------------------------ what the client may show

class Release:
    """One session's pushed text (or token ids) on its way to the client's screen: held until the hold-back
    window lets it go (`HoldBack`), never once the policy stopped the session. Units are characters of the
    pushed text (as `pending_text` counts them) or token ids, whichever the session is pushed."""

    def __init__(self, hold: int):
        self.window = HoldBack(hold)
        self.held: str | list[int] = ""  # pushed, not released yet
        self.pushed = self.released = 0
        self.blocked = False  # the policy stopped the session: nothing more is released

    def add(self, pushed: str | list[int]) -> None:
        if isinstance(pushed, list) and not self.pushed:
            self.held = []
        self.held += pushed  # type: ignore[operator]  # one kind per session (`Connection.pushes`)
        self.pushed += len(pushed)

    def judged(self, new_tokens: int, pending: int) -> None:
        """A push's (or flush's) verdicts came; all but `pending` units of the pushed text are judged."""
        self.window.judged(new_tokens, self.pushed - pending)

    def take(self, stop: bool, end: bool = False, pending: int = 0) -> str | list[int]:
        """What the client may show now that it may not yet: up to the window's release point, or at the
        end of the answer (`end`) everything judged (all but `pending`), nothing at all once `stop`."""
        self.blocked = self.blocked or stop
        if self.blocked:
            return self.held[:0]
        upto = self.pushed - pending if end else self.window.releasable()
        n = max(0, min(upto, self.pushed) - self.released)
        out, self.held = self.held[:n], self.held[n:]
        self.released += n
        return out


# ------------------------------------------------------------------------------ a connection

class Connection:
    """One WebSocket's protocol state: the open session (if any), whether it finished, and what it pushed."""

    def __init__(self, ws: WebSocket, state: AppState):
        self.ws, self.state = ws, state
        self.session: AsyncStreamSession | None = None
        self.finished = False  # the last session finished (its slot is freed; `open` starts the next)
        self.pushes: str | None = None  # "text" or "ids": what this session was pushed (never both)
        self.release: Release | None = None  # what the session's client may show
        # for the session's audit record: what it was pushed, the guard's time on it, whether it is reported
        self.texts: list[str] = []  # text pushes
        self.answer_ids: list[int] = []
        self.guard_s = 0.0
        self.reported = True  # no session yet
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

    def drop(self, report: bool = True) -> None:
        """Free the session now (never waits for a running step); first report its verdict so far, if it
        ends without `finish` (`report=False`: it failed, and its failure was reported)."""
        if self.session is not None:
            if report:
                self.report(self.session)
            self.reported = True
            self.session.close()
            self.session = None

    def report(self, s: AsyncStreamSession, v: Verdict | None = None) -> None:
        """The session's response decision, once: `v` (finish's verdict) or, for a session ended without
        finish, its verdict so far when it judged any of the answer (no record of an answer never read).
        Never raises into the connection."""
        if self.reported:
            return
        self.reported = True
        try:
            if v is None:
                if not s.session.n_moderated:
                    return
                v = s.session.verdict()
            text = self.judged_answer(s)
            stopped = s.stop or v.blocked
        except Exception as e:  # a session in a state it cannot report from (a fault): nothing to record
            log.warning("stream session not reported: %s", type(e).__name__)
            return
        self.state.observe(ENDPOINT, v, "response", text=text, seconds=self.guard_s, blocked=stopped, tokens=False)
        if stopped:
            self.state.metrics.observe_cut(ENDPOINT)

    def judged_answer(self, s: AsyncStreamSession) -> str:
        """The answer as far as the verdicts read it: the pushed text but its pending tail, or the text
        the pushed ids spell."""
        if self.answer_ids:  # one kind per session
            return self.state.guard.tokenizer.decode(self.answer_ids)
        text, pending = "".join(self.texts), len(s.pending_text)
        return text[:len(text) - pending] if pending else text

    def fail(self, error: str, stage: str) -> None:
        """A guard failure (an error code, never text): an audit record of its own."""
        self.state.observe_failure(ENDPOINT, error, stage)

    # -------------------------------------------------------------------------- frame handlers

    async def open(self, frame: dict[str, Any]) -> dict[str, Any]:
        if self.session is not None:
            raise FrameError("already_open", "a session is open on this connection; finish or close it first")
        if not self.state.guard.live:
            raise FrameError("live_required", "/v1/stream needs a Qwen3Guard-Stream checkpoint (live sessions); "
                                              "this server's model is not one")
        f = parse(OpenFrame, frame)
        hold = check_int(self.state.settings.hold_tokens, "hold_tokens", 0)
        if f.hold_tokens is not None:
            if f.hold_tokens < hold:
                raise FrameError("bad_field", f"open: hold_tokens {f.hold_tokens} is below the server's {hold} "
                                              "(a session may hold back more, never less)")
            hold = f.hold_tokens
        messages = [{"role": m.role, "content": content_text(m.content)} for m in f.messages]
        sg = await self.state.live()
        t0 = time.perf_counter()
        try:
            # timeout 0: a full server answers `capacity` at once (back-pressure is the client's to apply)
            session = await sg.open_async(messages, system=f.system, thinking=f.thinking,
                                          moderate_thinking=f.moderate_thinking, timeout=0)
        except CapacityError as e:
            if _all_in_use(e):
                self.state.metrics.observe_rate_limited(ENDPOINT)  # the HTTP surfaces' 429
                self.fail("capacity", "prompt")
                raise FrameError("capacity", f"all {sg.engine.max_sessions} live sessions of the server are in "
                                             "use; retry later") from None
            self.fail("too_long", "prompt")
            raise FrameError("too_long", f"open: {e}") from None
        except InputError as e:
            raise FrameError("bad_field", f"open: {e}") from None
        except Exception as e:  # a fault in the guard: fail closed, no session
            log.error("stream open failed: %s", type(e).__name__)
            self.fail("internal", "prompt")
            raise FrameError("internal", "internal error in the guard; no session was opened") from None
        self.session, self.finished, self.pushes = session, False, None
        self.release = Release(hold)
        self.texts, self.answer_ids, self.guard_s, self.reported = [], [], 0.0, False
        v = session.prompt
        judged = [{"role": "system", "content": f.system}, *messages] if f.system is not None else messages
        self.state.observe(ENDPOINT, v, "prompt", text=judged, seconds=time.perf_counter() - t0, tokens=False)
        self.state.metrics.observe_tokens(ENDPOINT, session.session.length)  # the prompt's tokens, as run
        log.info("stream open prompt=%s action=%s", v.label.value, v.action.value)
        if self.state.settings.log_content:
            log.info("stream open content=%r", messages[-1]["content"])
        return {"type": "prompt", "verdict": v.to_dict(), "blocked": v.blocked, "hold_tokens": hold}

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
        # the audit's copy of the answer counts the push from the moment it is queued, as `pending_text`
        # does (a connection dropped mid-push is reported with it)
        mine = self.texts if kind == "text" else self.answer_ids
        before = len(mine)
        mine.extend([f.text] if kind == "text" else f.ids)
        try:
            tokens = await self._judged(s.push_text(f.text) if kind == "text" else s.push(f.ids), "push")
        except FrameError as e:
            if e.code == "too_long" and kind == "text":  # the text stays pending (the next push retries it)
                self.pushes = kind
                self._release().add(f.text)
                raise
            del mine[before:]  # refused: not part of the answer
            raise
        self.pushes = kind
        self._release().add(f.text if f.text is not None else list(f.ids))
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
        last = self.token_dicts(tokens)  # the flush's verdicts: never dropped
        v = s.session.verdict()
        pending = s.pending_text
        release = self._release()
        release.judged(len(tokens), len(pending))
        # the remainder only for an answer the policy lets through; never text that was not judged
        new = release.take(s.stop or v.blocked, end=True, pending=len(pending))
        s.session.finished = True
        self.report(s, v)
        self.drop()
        self.finished = True
        log.info("stream finish label=%s action=%s tokens=%s", v.label.value, v.action.value, v.n_tokens)
        return {"type": "verdict", "verdict": v.to_dict(), "tokens": last, "pending_text": pending,
                "release": new, "released": release.released}

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
        t0 = time.perf_counter()
        try:
            tokens = await push
        except CapacityError as e:
            self.fail("too_long", "response")
            raise FrameError("too_long", f"{what}: {e}; the session is unchanged (finish it)") from None
        except InputError as e:
            if self.session is not None and self.session.session.failure is not None:
                self.fail("internal", "response")
                self.drop(report=False)
                raise FrameError("internal", "the session was closed after an internal error; open a new one") from None
            raise FrameError("bad_field", f"{what}: {e}") from None
        except Exception as e:  # a fault in the guard: fail closed, this session only
            log.error("stream %s failed: %s", what, type(e).__name__)
            self.fail("internal", "response")
            self.drop(report=False)
            raise FrameError("internal", "internal error in the guard; the session was closed, open a new one") from None
        finally:
            self.guard_s += time.perf_counter() - t0
        self.state.metrics.observe_tokens(ENDPOINT, len(tokens))
        return tokens

    def _release(self) -> Release:
        if self.release is None:  # cannot happen: `open` makes one with the session
            raise RuntimeError("a session without its release state")
        return self.release

    def token_dicts(self, tokens: list) -> list[dict[str, Any]]:
        decode_ids = self.state.guard.tokenizer.decode
        out = []
        for tv in tokens:
            d = tv.to_dict()
            d["text"] = decode_ids([tv.token_id])  # as `stream-trace` decodes each token
            out.append(d)
        return out

    def tokens_frame(self, s: AsyncStreamSession, tokens: list) -> dict[str, Any]:
        release, pending = self._release(), s.pending_text
        release.judged(len(tokens), len(pending))
        new = release.take(s.stop)  # read after the push: a push that stops the session releases nothing
        return {"type": "tokens", "tokens": self.token_dicts(tokens), "stop": s.stop, "pending_text": pending,
                "release": new, "released": release.released}


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
    if "authorization" not in ws.headers and (key := ws.query_params.get("api_key")) is not None:
        API_KEY.set(key)  # a browser's key, for the audit log's key id (the header's is set for every request)
    conn = Connection(ws, state)
    try:
        await conn.serve()
    except WebSocketDisconnect:
        pass  # the client went away: its session is freed below
    except Exception as e:  # a send on a connection that dropped mid-reply, or a fault: never a leaked slot
        log.warning("stream connection ended by %s", type(e).__name__)
    finally:
        conn.drop()
