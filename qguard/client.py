"""A Python client for a qguard server: remote use that reads like in-process `Guard` / `StreamGuard`.

    from qguard.client import QGuardClient

    client = QGuardClient("http://127.0.0.1:8080", api_key="...")
    with client.open_stream([{"role": "user", "content": "How do I bake bread?"}]) as s:
        print(s.prompt.label)                    # the prompt Verdict
        for delta in llm_text_stream():
            for tv in s.push_text(delta):        # TokenVerdicts, as StreamSession.push_text returns
                if tv.stop:
                    break
            show(s.release)                      # the text newly safe to show (hold-back window)
        print(s.finish())                        # the debounced response Verdict
        show(s.release)                          # the rest, unless the response is blocked

`AsyncQGuardClient` is the same in asyncio (`await client.open_stream(...)`, `await s.push_text(...)`).
The stream part speaks the `/v1/stream` WebSocket protocol (docs/stream_protocol.md) over the
`websockets` package. A refused frame raises `StreamError` (its `code` is the protocol's); the session
stays usable where the protocol says so. The client shows only what the server released: `s.release`
(new after each reply) and `s.released_text` (everything so far; `released_ids` for id pushes) never hold
a token at or after the response's unsafe position (`hold_tokens`: the session's window).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from qguard.errors import CapacityError, InputError, QGuardError
from qguard.policy import TokenVerdict, Verdict

__all__ = ["AsyncQGuardClient", "AsyncStreamClientSession", "HTTPError", "QGuardClient", "StreamClientSession",
           "StreamError"]

DEFAULT_URL = "http://127.0.0.1:8080"


class StreamError(QGuardError):
    """An `error` frame of the server (`code`: docs/stream_protocol.md), or a reply that breaks the protocol."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


class StreamInputError(StreamError, InputError):
    """The server refused the frame as bad input (bad_frame, unknown_type, bad_field, not_open, ...)."""


class StreamCapacityError(StreamError, CapacityError):
    """The server has no free session (`capacity`) or the session is over its context (`too_long`)."""


_INPUT_CODES = {"bad_frame", "unknown_type", "bad_field", "not_open", "already_open", "finished", "live_required"}


def stream_error(frame: dict[str, Any]) -> StreamError:
    code, message = str(frame.get("code")), str(frame.get("message"))
    if code in ("capacity", "too_long"):
        return StreamCapacityError(code, message)
    return (StreamInputError if code in _INPUT_CODES else StreamError)(code, message)


class _Base:
    """What every client shares: the server's base URL, the API key, the timeout."""

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 60.0):
        self.url, self.api_key, self.timeout = url.rstrip("/"), api_key, timeout

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def ws_url(self, path: str) -> str:
        """`path` on the server as a ws:// (or wss://) URL."""
        parts = urlsplit(self.url)
        scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
        return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + path, "", ""))


# ------------------------------------------------------------------------------ HTTP (/v1/moderations, /v1/moderate)

class HTTPError(QGuardError):
    """The server answered an HTTP request with an error (OpenAI's error object: `status`, `code`, `message`)."""

    def __init__(self, status: int, code: str | None, message: str):
        super().__init__(f"HTTP {status}" + (f" {code}" if code else "") + f": {message}")
        self.status, self.code, self.message = status, code, message


class HTTPInputError(HTTPError, InputError):
    """The server refused the request as bad input (4xx other than 429)."""


class HTTPCapacityError(HTTPError, CapacityError):
    """The server is full (429) or the input is over the guard's context."""


def _checked(r: Any) -> dict[str, Any]:
    """The JSON body of an httpx response, or the HTTPError it stands for."""
    try:
        body = r.json()
    except ValueError:
        body = None
    if r.status_code < 400 and isinstance(body, dict):
        return body
    err = body.get("error") if isinstance(body, dict) and isinstance(body.get("error"), dict) else {}
    code, message = err.get("code"), str(err.get("message") or r.text[:200] or r.reason_phrase)
    if r.status_code == 429 or code == "context_length_exceeded":
        raise HTTPCapacityError(r.status_code, code, message)
    raise (HTTPInputError if 400 <= r.status_code < 500 else HTTPError)(r.status_code, code, message)


def _is_batch(messages: Any) -> bool:
    return isinstance(messages, Sequence) and not isinstance(messages, str) and bool(messages) and all(
        isinstance(c, Sequence) and not isinstance(c, str) for c in messages)


def _moderate_body(messages: Any, mode: str | None) -> dict[str, Any]:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    body: dict[str, Any] = ({"conversations": [list(c) for c in messages]} if _is_batch(messages)
                            else {"messages": list(messages)})
    if mode is not None:
        body["mode"] = mode
    return body


def _moderate_result(body: dict[str, Any], batch: bool) -> Verdict | list[Verdict]:
    if batch:
        return [Verdict.from_dict(v) for v in body["verdicts"]]
    return Verdict.from_dict(body["verdict"])


def _moderations_result(body: dict[str, Any]) -> list[Verdict]:
    return [Verdict.from_dict(r["qguard"]) for r in body["results"]]


def _open_frame(messages: str | Sequence[Any], system: str | None, thinking: bool,
                moderate_thinking: bool, hold_tokens: int | None = None) -> dict[str, Any]:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    frame = {"type": "open", "messages": list(messages), "thinking": thinking,
             "moderate_thinking": moderate_thinking}
    if system is not None:
        frame["system"] = system
    if hold_tokens is not None:
        frame["hold_tokens"] = hold_tokens
    return frame


def _reply(raw: str | bytes, expected: str) -> dict[str, Any]:
    frame = json.loads(raw)
    if frame.get("type") == "error":
        raise stream_error(frame)
    if frame.get("type") != expected:
        raise StreamError("protocol", f"expected a {expected!r} frame, got {frame.get('type')!r}")
    return frame


class _SessionState:
    """What a client session knows from the server's replies."""

    prompt: Verdict
    hold_tokens: int = 0  # the session's hold-back window (the server's, or the larger one asked)
    stop: bool = False
    pending_text: str = ""
    verdict: Verdict | None = None  # after finish
    final_tokens: list[TokenVerdict] = []  # after finish: the verdicts of the tokens finish committed
    release: str | list[int] = ""  # what the last reply released (text, or ids for id pushes)
    released_text: str = ""  # every text released so far: what the client may show
    released_ids: list[int] = []  # the same for id pushes

    def _start(self, ws, frame: dict[str, Any], own: bool) -> None:
        self.ws, self.own = ws, own
        self.prompt = Verdict.from_dict(frame["verdict"])
        self.hold_tokens = int(frame.get("hold_tokens", 0))
        self.released_ids = []

    def _released(self, frame: dict[str, Any]) -> None:
        new = frame.get("release", "")
        self.release = new
        if isinstance(new, str):
            self.released_text += new
        else:
            self.released_ids = [*self.released_ids, *new]

    def tokens(self, frame: dict[str, Any]) -> list[TokenVerdict]:
        self.stop, self.pending_text = bool(frame["stop"]), frame.get("pending_text", "")
        self._released(frame)
        return [TokenVerdict.from_dict(t) for t in frame["tokens"]]

    def finished(self, frame: dict[str, Any]) -> Verdict:
        self.pending_text = frame.get("pending_text", "")
        self.final_tokens = [TokenVerdict.from_dict(t) for t in frame.get("tokens", ())]
        self._released(frame)
        self.verdict = Verdict.from_dict(frame["verdict"])
        return self.verdict


# ------------------------------------------------------------------------------ sync

class StreamClientSession(_SessionState):
    """A remote `StreamSession` (sync). Closing it closes its connection when it opened one for itself."""

    def __init__(self, ws, frame: dict[str, Any], own: bool):
        self._start(ws, frame, own)

    def _call(self, frame: dict[str, Any], expected: str) -> dict[str, Any]:
        self.ws.send(json.dumps(frame))
        return _reply(self.ws.recv(), expected)

    def push_text(self, delta: str) -> list[TokenVerdict]:
        return self.tokens(self._call({"type": "push", "text": delta}, "tokens"))

    def push(self, ids: Sequence[int]) -> list[TokenVerdict]:
        return self.tokens(self._call({"type": "push", "ids": list(ids)}, "tokens"))

    def flush(self) -> list[TokenVerdict]:
        return self.tokens(self._call({"type": "flush"}, "tokens"))

    def finish(self) -> Verdict:
        return self.finished(self._call({"type": "finish"}, "verdict"))

    def close(self) -> None:
        """End the session (idempotent); its connection too when it owns it."""
        if self.own:
            self.ws.close()
        elif self.verdict is None:
            self._call({"type": "close"}, "closed")

    def __enter__(self) -> StreamClientSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StreamConnection:
    """One `/v1/stream` WebSocket: sessions one after another (`open`)."""

    def __init__(self, ws):
        self.ws = ws

    def open(self, messages: str | Sequence[Any], *, system: str | None = None, thinking: bool = False,
             moderate_thinking: bool = True, hold_tokens: int | None = None,
             _own: bool = False) -> StreamClientSession:
        """A session on this connection; `hold_tokens`: a larger hold-back window than the server's."""
        self.ws.send(json.dumps(_open_frame(messages, system, thinking, moderate_thinking, hold_tokens)))
        return StreamClientSession(self.ws, _reply(self.ws.recv(), "prompt"), _own)

    def close(self) -> None:
        self.ws.close()

    def __enter__(self) -> StreamConnection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class QGuardClient(_Base):
    """A qguard server from sync code."""

    def moderations(self, input: str | Sequence[Any], model: str | None = None) -> list[Verdict]:
        """`POST /v1/moderations` (OpenAI's input: a string, strings, or content parts): one Verdict a result."""
        import httpx

        body = {"input": input, **({"model": model} if model is not None else {})}
        with httpx.Client(timeout=self.timeout) as http:
            return _moderations_result(_checked(http.post(self.url + "/v1/moderations", json=body,
                                                          headers=self.headers())))

    def moderate(self, messages: str | Sequence[Any], mode: str | None = None) -> Verdict | list[Verdict]:
        """`POST /v1/moderate`: the Verdict of a conversation (its last message), or a list of Verdicts
        for a list of conversations (one batched guard call on the server)."""
        import httpx

        with httpx.Client(timeout=self.timeout) as http:
            r = http.post(self.url + "/v1/moderate", json=_moderate_body(messages, mode), headers=self.headers())
        return _moderate_result(_checked(r), _is_batch(messages))

    def connect_stream(self) -> StreamConnection:
        """A `/v1/stream` connection for several sessions in turn."""
        from websockets.sync.client import connect

        ws = connect(self.ws_url("/v1/stream"), additional_headers=self.headers(), open_timeout=self.timeout,
                     close_timeout=self.timeout, max_size=None)
        return StreamConnection(ws.__enter__())  # websockets >= 17.1 expects the connection entered

    def open_stream(self, messages: str | Sequence[Any], *, system: str | None = None, thinking: bool = False,
                    moderate_thinking: bool = True, hold_tokens: int | None = None) -> StreamClientSession:
        """A live moderation session on a connection of its own (closed with the session)."""
        conn = self.connect_stream()
        try:
            return conn.open(messages, system=system, thinking=thinking, moderate_thinking=moderate_thinking,
                             hold_tokens=hold_tokens, _own=True)
        except BaseException:
            conn.close()
            raise


# ------------------------------------------------------------------------------ asyncio

class AsyncStreamClientSession(_SessionState):
    """A remote `AsyncStreamSession`."""

    def __init__(self, ws, frame: dict[str, Any], own: bool):
        self._start(ws, frame, own)

    async def _call(self, frame: dict[str, Any], expected: str) -> dict[str, Any]:
        await self.ws.send(json.dumps(frame))
        return _reply(await self.ws.recv(), expected)

    async def push_text(self, delta: str) -> list[TokenVerdict]:
        return self.tokens(await self._call({"type": "push", "text": delta}, "tokens"))

    async def push(self, ids: Sequence[int]) -> list[TokenVerdict]:
        return self.tokens(await self._call({"type": "push", "ids": list(ids)}, "tokens"))

    async def flush(self) -> list[TokenVerdict]:
        return self.tokens(await self._call({"type": "flush"}, "tokens"))

    async def finish(self) -> Verdict:
        return self.finished(await self._call({"type": "finish"}, "verdict"))

    async def aclose(self) -> None:
        if self.own:
            await self.ws.close()
        elif self.verdict is None:
            await self._call({"type": "close"}, "closed")

    async def __aenter__(self) -> AsyncStreamClientSession:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class AsyncStreamConnection:
    def __init__(self, ws):
        self.ws = ws

    async def open(self, messages: str | Sequence[Any], *, system: str | None = None, thinking: bool = False,
                   moderate_thinking: bool = True, hold_tokens: int | None = None,
                   _own: bool = False) -> AsyncStreamClientSession:
        await self.ws.send(json.dumps(_open_frame(messages, system, thinking, moderate_thinking, hold_tokens)))
        return AsyncStreamClientSession(self.ws, _reply(await self.ws.recv(), "prompt"), _own)

    async def aclose(self) -> None:
        await self.ws.close()

    async def __aenter__(self) -> AsyncStreamConnection:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class AsyncQGuardClient(_Base):
    """A qguard server from asyncio code."""

    async def moderations(self, input: str | Sequence[Any], model: str | None = None) -> list[Verdict]:
        """`POST /v1/moderations`: one Verdict a result (see `QGuardClient.moderations`)."""
        import httpx

        body = {"input": input, **({"model": model} if model is not None else {})}
        async with httpx.AsyncClient(timeout=self.timeout) as http:
            r = await http.post(self.url + "/v1/moderations", json=body, headers=self.headers())
        return _moderations_result(_checked(r))

    async def moderate(self, messages: str | Sequence[Any], mode: str | None = None) -> Verdict | list[Verdict]:
        """`POST /v1/moderate`: a Verdict, or one per conversation for a batch (see `QGuardClient.moderate`)."""
        import httpx

        async with httpx.AsyncClient(timeout=self.timeout) as http:
            r = await http.post(self.url + "/v1/moderate", json=_moderate_body(messages, mode), headers=self.headers())
        return _moderate_result(_checked(r), _is_batch(messages))

    async def connect_stream(self) -> AsyncStreamConnection:
        from websockets.asyncio.client import connect

        ws = await connect(self.ws_url("/v1/stream"), additional_headers=self.headers(), open_timeout=self.timeout,
                           close_timeout=self.timeout, max_size=None)
        return AsyncStreamConnection(ws)

    async def open_stream(self, messages: str | Sequence[Any], *, system: str | None = None, thinking: bool = False,
                          moderate_thinking: bool = True, hold_tokens: int | None = None
                          ) -> AsyncStreamClientSession:
        conn = await self.connect_stream()
        try:
            return await conn.open(messages, system=system, thinking=thinking,
                                   moderate_thinking=moderate_thinking, hold_tokens=hold_tokens, _own=True)
        except BaseException:
            await conn.aclose()
            raise
