"""The guarded proxy's answer side: judged before sent, fail closed. (No routing here: `routes.chat`
judges the prompt and hands an allowed request to `proxy_once` or `proxy_stream`.)

The proxy never forwards the upstream's lines. It reads the text of each upstream chunk (content,
`reasoning_content`/`reasoning`, `refusal`, tool-call names and arguments, the legacy `function_call`,
list-of-parts content; every choice of the chunk; `upstream.read_chunk`), pushes it to the guard in arrival
order, and sends chunks of its own (the upstream's id, model and created time where they have their shape,
`models.top_level`) carrying only text the guard has judged (`ReleaseCursor`). Any other field (logprobs,
vendor extensions) is dropped.

With a live guard (`guard.live`: a Stream model) the text is judged token by token as it arrives
(`LiveJudge`). The incremental tokenizer holds back the last pre-tokenizer chunk until later text fixes
its tokens (`AsyncStreamSession.pending_text`); that tail is held from the client too, and judged at the
upstream's finish_reason before it is released. The finish_reason itself goes out only when the upstream's
stream has really ended (`[DONE]`): an error, text after it or a stream cut short is then an error with no
"stop" before it. When the policy blocks, the upstream request is dropped (the LLM stops generating) and
the client gets a final `finish_reason: "content_filter"` chunk.

Any other guard (Gen) cannot judge partial answers cheaply, so with it nothing is released before the
whole answer is judged once (`BufferedJudge`, as a non-streaming answer is).

Every failure (the upstream's, the guard's, a bug) ends the stream with an OpenAI-shaped error event (never
the upstream's own error text) and `[DONE]`: no finish_reason "stop" follows, and text that was not judged
is never sent. While the upstream is silent the client gets SSE comments (": keep-alive") every
`keepalive_s`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, Protocol

import httpx
from starlette.requests import Request

from qguard.errors import CapacityError, QGuardError
from qguard.leak import HoldBack, OnUnsafe
from qguard.policy import Verdict
from qguard.serve.deps import AppState, GuardRunner
from qguard.serve.errors import APIError, api_error
from qguard.serve.leak import LeakControl, LeakReport, count_tokens, intervention_text, retry_body
from qguard.serve.limits import TokenBound
from qguard.serve.models import (
    answer_body,
    answer_message,
    answer_text,
    bad_answer,
    completion_body,
    guard_info,
    model_of,
    new_id,
)
from qguard.serve.settings import ServeSettings
from qguard.serve.sse import KEEPALIVE, DeltaWriter, Path, paced, sse
from qguard.serve.upstream import Chunk, UpstreamClient
from qguard.tokenizer import DOUBLE_NEWLINE, END_THINK, NEWLINE, THINK

log = logging.getLogger("qguard.serve")


# ------------------------------------------------------------------------------ a whole answer

async def proxy_once(state: AppState, upstream: UpstreamClient, body: dict[str, Any], messages: list[dict[str, str]],
                     prompt_v: Verdict) -> dict[str, Any]:
    """The reply to a guarded non-streaming completion (the prompt was already judged and allowed).

    Nothing is released before the whole answer is judged, so on a blocked answer: cut gives an empty
    answer, refuse the refusal message, rollback asks again (the whole answer is discarded: the release
    point is its start) with the intervention, at most max_retries times, then refuses."""
    settings = state.settings
    control = LeakControl.of(settings)
    report = LeakReport(control)
    tokenizer = state.bound.tokenizer
    req = body
    while True:
        data, message, content = await upstream_answer(upstream, req)
        if not content.strip():  # nothing to read: whitespace at most
            return answer_body(data, message, {**guard_info(prompt_v), "leak_control": report.to_dict()}, body["model"])
        resp_v = await judge_answer(state, messages, content, prompt_v)
        if not resp_v.blocked:
            report_answer(state, report, cut=False)
            info = {**guard_info(prompt_v, resp_v), "leak_control": report.to_dict(resp_v)}
            return answer_body(data, message, info, body["model"])
        log.info("proxy blocked response categories=%s", [c.value for c in resp_v.categories])
        if control.on_unsafe is OnUnsafe.ROLLBACK and report.retries < control.max_retries:
            report.retries += 1
            report.rolled_back_tokens += count_tokens(tokenizer, content)
            insert, instruction, critique = await intervention_text(control, upstream, body, content)
            report.critique_tokens += count_tokens(tokenizer, critique)
            req = retry_body(control, body, "", insert, instruction)
            continue
        report.withheld_tokens += count_tokens(tokenizer, content)
        report.refused = control.on_unsafe is not OnUnsafe.CUT
        report_answer(state, report, cut=False)
        info = {**guard_info(prompt_v, resp_v, "response"), "leak_control": report.to_dict()}
        return completion_body(body["model"], settings.refusal_message if report.refused else "", "content_filter",
                               info, data)


async def upstream_answer(upstream: UpstreamClient, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The upstream's non-streaming answer: (its body, its message, the message's text the guard reads)."""
    try:
        data = await upstream.call(body)
    except (httpx.HTTPError, QGuardError) as e:
        raise api_error(e, side="answer") from None
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise bad_answer("no choices[0].message")
    if len(choices) > 1:
        raise bad_answer("several choices; qguard asked for one")
    message = answer_message(choices[0].get("message"))
    return data, message, answer_text(message)


async def judge_answer(state: AppState, messages: list[dict[str, str]], content: str, prompt_v: Verdict) -> Verdict:
    room = state.guard.max_len - (prompt_v.n_tokens or 0)
    if (n := await state.bound.exceeds(content, room)) is not None:  # refused before it is tokenized
        raise APIError(502, f"the upstream LLM's answer cannot be judged: it is at least {n} tokens, over the "
                            f"{room} left in the guard's context; it was withheld", code="guard_context_exceeded")
    if state.settings.log_content:
        log.info("proxy answer content=%r", content)
    t0 = time.perf_counter()
    try:
        v = await state.runner.classify([*messages, {"role": "assistant", "content": content}])
    except QGuardError as e:  # e.g. an answer longer than the guard's context: the server's problem
        raise api_error(e, side="answer") from None
    state.observe("chat", v, "response", text=content, seconds=time.perf_counter() - t0)  # metrics, audit
    return v


async def until_disconnect(request: Request, work: Awaitable):
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
                raise APIError(499, "client closed the request", code="client_closed_request")
    finally:
        if not task.done():
            task.cancel()


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

    def discard(self) -> str:
        """Drop the held pieces (a rollback); their text."""
        text = "".join(t for _, t in self._held)
        self._held.clear()
        self.pushed = self.released
        return text

    @property
    def held(self) -> int:
        return self.pushed - self.released


# ------------------------------------------------------------------------------ judges

class Judge(Protocol):
    """What the stream loop asks of a guard: push text (True: block now), finish (True: block), how much
    of the pushed text may be released (judged, and far enough behind the newest judged token), the
    verdict so far; and, for leak control, the released text (`released`), a rollback to the release
    point (`roll_back`: False when it cannot be done), the verdict of the released text; for the audit
    log, the answer its verdict judged (`judged_text`, in `models.answer_text`'s form, as a whole answer
    is judged and hashed, so the same answer has the same content hash streamed or not)."""

    async def push(self, pieces: list[tuple[Path, str]], text: str) -> bool: ...
    async def finish(self) -> bool: ...
    def releasable(self) -> int: ...
    def verdict(self) -> Verdict | None: ...
    def released(self, text: str) -> None: ...
    async def roll_back(self, released: int) -> bool: ...
    async def released_verdict(self, text: str) -> Verdict | None: ...
    def judged_text(self) -> str: ...


class LiveJudge:
    """A live guard's session: judges text as it comes; all but its pending tail is judged.

    Hold-back (`leak.HoldBack`, the rule the WebSocket protocol and the LiteLLM guardrail use too): after
    each push the judge notes its verdicts and the characters of the pushed text they judged (`pushed -
    len(pending_text)`); text is releasable up to the last note at least `hold` verdicts behind the
    newest (so at push granularity: a push that commits several tokens is released as a unit, never early).

    Rollback (`checkpoint`, a second session opened on the same conversation): it is pushed the text
    released to the client, in the same batched step as the live session's next push; a rollback closes
    the live session and forks the checkpoint (one KV copy of the released prefix, nothing re-judged).

    Reasoning (`reasoning_content` / `reasoning`) is read in the official layout, `<think>\\n{reasoning}\\n
    </think>\\n\\n{answer}` (what `models.answer_text` gives a whole answer): the session is opened before
    the first chunk in answer mode (Qwen3's empty think block in the prompt); when the first piece is
    reasoning, it is reopened once in thinking mode (nothing was pushed yet) with `<think>\\n` pushed as
    ids, and `end_think` (the pushed text's first character after the reasoning) is set when the first
    other piece arrives; every session of the answer (the checkpoint, a released verdict's) is pushed the
    same layout (`feed`). Structure goes in as ids, never as text, and is not counted in `pushed`, so
    the release accounting is the upstream's characters only. The template's `\\n` before `</think>` is
    pushed as text with the reasoning's tail (they tokenize together, e.g. ".\\n"), and flushed at once.
    Reasoning after other text (a malformed stream) cannot switch modes: it is judged as answer text.
    """

    def __init__(self, session, bound: TokenBound, max_context: int, hold: int = 0, checkpoint=None,
                 reopen=None):
        self.session, self.bound, self.max_context = session, bound, max_context
        self.window = HoldBack(hold)
        self.checkpoint, self.reopen = checkpoint, reopen  # reopen(): a fresh session on the conversation
        self.backlog = ""  # released text the checkpoint has not been pushed yet
        self.checkpoint_blocked = False
        self.pushed = 0  # characters pushed, this branch
        self.pieces: list[tuple[Path, str]] = []  # the pieces pushed, this branch (for `judged_text`)
        self.finished = False
        self.started = False  # the first piece came (it chose the layout)
        self.thinking = False  # the sessions are in thinking mode: the answer starts with reasoning
        self.end_think: int | None = None  # the first character of the pushed text after the reasoning
        self.checkpoint_at = 0  # characters pushed to the checkpoint

    async def push(self, pieces: list[tuple[Path, str]], text: str) -> bool:
        # a delta that cannot fit the session's context is refused before the shared step thread
        # tokenizes it (one client's huge chunk would stall every stream)
        room = self.max_context - self.session.session.length
        if (n := await self.bound.exceeds(self.session.pending_text + text, room)) is not None:
            raise CapacityError(f"the answer needs at least {n} more tokens, over the {room} left in the "
                                f"guard's live context of {self.max_context}")
        if not self.started:
            self.started = True
            if pieces[0][0][0] in REASONING:
                await self.think()
        at = self.pushed
        if self.thinking and self.end_think is None:
            n = reasoning_length(pieces)
            if n < len(text):  # the first piece that is not reasoning: the answer starts here
                self.end_think = at + n
        self.pushed += len(text)
        self.pieces += pieces
        return self.record(await self.with_checkpoint(feed(self.session, text, at, self.end_think)))

    async def think(self) -> None:
        """The answer starts with reasoning: the sessions (nothing pushed yet) are opened again in
        thinking mode, `<think>\\n` pushed; a new checkpoint is forked from the new session."""
        self.session.close()  # first, so that their slots are free for the new ones
        if self.checkpoint is not None:
            self.checkpoint.close()
        self.session = await self.open(thinking=True)
        self.thinking = True
        if self.checkpoint is not None:
            s = self.session.session
            self.checkpoint = type(self.session)(s.guard.fork(s))

    async def open(self, thinking: bool):
        """A fresh session on the conversation in the answer's mode, its structure pushed."""
        s = await self.reopen(thinking)
        if thinking:
            try:
                await s.push([THINK, NEWLINE])
            except BaseException:
                s.close()
                raise
        return s

    async def finish(self) -> bool:
        stop = self.record(await self.with_checkpoint(end_text(self.session)))
        self.finished = True
        return stop

    def record(self, vs) -> bool:
        self.window.judged(len(vs), self.pushed - len(self.session.pending_text))
        return any(tv.stop for tv in vs)

    async def with_checkpoint(self, work: Awaitable):
        if self.checkpoint is None or not self.backlog:
            return await work
        vs, _ = await asyncio.gather(work, self.sync_checkpoint())  # one batched step
        return vs

    def releasable(self) -> int:
        if self.finished:
            return self.pushed
        return self.window.releasable()

    def unjudged(self) -> int:
        return len(self.session.pending_text)

    def verdict(self) -> Verdict | None:
        return self.session.verdict()

    def released(self, text: str) -> None:
        if self.checkpoint is not None:
            self.backlog += text

    async def sync_checkpoint(self) -> None:
        if self.backlog:
            backlog, self.backlog = self.backlog, ""
            at, self.checkpoint_at = self.checkpoint_at, self.checkpoint_at + len(backlog)
            cvs = await feed(self.checkpoint, backlog, at, self.end_think)
            self.checkpoint_blocked = self.checkpoint_blocked or any(v.stop for v in cvs)

    async def roll_back(self, released: int) -> bool:
        """Back to the release point (`released` characters): the checkpoint's fork goes on from there.
        False without a checkpoint, or when the checkpoint blocked the released text itself (the same
        tokens in another batch: a numeric tie may tip the other way; fail closed)."""
        if self.checkpoint is None:
            return False
        await self.sync_checkpoint()
        if self.checkpoint_blocked:
            return False
        ck = self.checkpoint.session
        fork = type(self.checkpoint)(ck.guard.fork(ck))  # never in flight here: every push was awaited
        self.session.close()
        self.session = fork
        self.pushed, self.finished = released, False  # (never in thinking mode: only content rolls back)
        self.pieces = first_chars(self.pieces, released)  # the fork goes on from the released prefix
        self.window.reset(fork.session.n_moderated, released)
        return True

    def judged_text(self) -> str:
        """This branch's answer as far as the verdicts read it (all pushed but the pending tail)."""
        return answer_text(message_of(first_chars(self.pieces, self.pushed - len(self.session.pending_text))))

    async def released_verdict(self, text: str) -> Verdict | None:
        """The guard's verdict of exactly `text`, the released answer: the checkpoint's, else one fresh
        session's (a prefill of it); None when nothing was released or no session is free."""
        if self.checkpoint is not None:
            await self.sync_checkpoint()
            await end_text(self.checkpoint)
            return await self.checkpoint.finish()
        if not text or self.reopen is None:
            return None
        try:
            s = await self.open(self.thinking)
        except CapacityError:
            return None
        async with s:
            await feed(s, text, 0, self.end_think)
            await end_text(s)
            return await s.finish()

    async def aclose(self) -> None:
        self.session.close()
        if self.checkpoint is not None:
            self.checkpoint.close()


REASONING = ("reasoning_content", "reasoning")  # the paths of an answer's reasoning pieces


def reasoning_length(pieces: list[tuple[Path, str]]) -> int:
    """Characters of the reasoning pieces that `pieces` start with."""
    n = 0
    for path, text in pieces:
        if path[0] not in REASONING:
            break
        n += len(text)
    return n


def in_reasoning(s) -> bool:
    """Session `s` (thinking mode) is in the turn's reasoning: its `</think>` is not pushed yet."""
    return s.session.in_reasoning


async def feed(s, text: str, at: int, end_think: int | None) -> list:
    """Push `text`, characters `at`.. of an answer's pushed text, to session `s` in the official layout:
    a session in the reasoning ends it before character `end_think` (None: not known yet). Its verdicts."""
    if end_think is None or not in_reasoning(s) or at + len(text) <= end_think:
        return await s.push_text(text) if text else []
    cut = max(end_think - at, 0)
    vs = await close_think(s, text[:cut])
    return vs + (await s.push_text(text[cut:]) if text[cut:] else [])


async def close_think(s, tail: str = "") -> list:
    """End the reasoning of `s` with its last text `tail`: the template's "\\n" before `</think>` goes with
    it (as text: they tokenize together), all is flushed, then `</think>` `\\n\\n` as ids; the answer's text
    that follows is a new text stream. Its verdicts."""
    vs = await s.push_text(tail + "\n")
    vs += await s.flush()
    vs += await s.push([END_THINK, DOUBLE_NEWLINE])
    s.session.restart_text()  # a flushed text stream takes no more text: the answer's starts afresh
    return vs


async def end_text(s) -> list:
    """The end of the answer's text for `s`: the reasoning closed if it is still open (an answer of
    reasoning alone), the tail flushed. Its verdicts."""
    if in_reasoning(s):
        return await close_think(s)
    return await s.flush()


class BufferedJudge:
    """A guard without live sessions (Gen): the whole answer is judged once, at its end (as a
    non-streaming answer is). A rollback starts the answer over (nothing was released)."""

    def __init__(self, runner: GuardRunner, messages: list[dict[str, str]], settings: ServeSettings,
                 bound: TokenBound, room: int):
        self.runner, self.messages, self.settings = runner, messages, settings
        self.bound, self.room = bound, room  # room: tokens of the guard's context the answer may take
        self.pieces: list[tuple[Path, str]] = []
        self.n, self.done = 0, False
        self.v: Verdict | None = None
        self.text = ""  # the answer judged (`finish`)

    async def push(self, pieces: list[tuple[Path, str]], text: str) -> bool:
        self.pieces += pieces
        self.n += len(text)
        if self.n > self.room * self.bound.longest:  # only then can the bound refuse it
            whole = "".join(t for _, t in self.pieces)
            if (n := await self.bound.exceeds(whole, self.room)) is not None:
                raise CapacityError(f"the answer is at least {n} tokens, over the {self.room} left in the "
                                    "guard's context")
        return False

    async def finish(self) -> bool:
        text = self.text = answer_text(message_of(self.pieces))
        if text.strip():  # whitespace is not judged (the guard has nothing to read in it)
            if self.settings.log_content:
                log.info("proxy answer content=%r", text)
            self.v = await self.runner.classify([*self.messages, {"role": "assistant", "content": text}])
        self.done = True
        return self.v is not None and self.v.blocked

    def releasable(self) -> int:
        return self.n if self.done else 0

    def unjudged(self) -> int:
        return 0 if self.done else self.n

    def verdict(self) -> Verdict | None:
        return self.v

    def released(self, text: str) -> None:
        pass

    async def roll_back(self, released: int) -> bool:
        self.pieces, self.n, self.done, self.v, self.text = [], 0, False, None, ""
        return True

    def judged_text(self) -> str:
        return self.text

    async def released_verdict(self, text: str) -> Verdict | None:
        return None  # only a blocked answer is cut: nothing of it was released

    async def aclose(self) -> None:
        pass


def first_chars(pieces: list[tuple[Path, str]], n: int) -> list[tuple[Path, str]]:
    """The pieces up to the first `n` characters of their concatenated text, the last one cut there."""
    out = []
    for path, text in pieces:
        if n <= 0:
            break
        out.append((path, text[:n]))
        n -= len(text)
    return out


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

async def proxy_stream(state: AppState, upstream: UpstreamClient, body: dict[str, Any],
                       messages: list[dict[str, str]], prompt_v: Verdict) -> AsyncIterator[bytes]:
    """SSE bytes for a guarded streaming completion (the prompt was already judged and allowed)."""
    settings = state.settings
    ids = {"id": new_id(), "created": int(time.time()), "model": body["model"]}
    chunks = upstream.chunks(body)
    try:
        control = LeakControl.of(settings)
        report = LeakReport(control)

        async def retry(reply: StreamReply) -> AsyncIterator[Chunk]:
            insert, instruction, critique = await intervention_text(control, upstream, body, reply.branch)
            report.critique_tokens += count_tokens(state.bound.tokenizer, critique)
            return upstream.chunks(retry_body(control, body, reply.prefix, insert, instruction))

        if not state.guard.live:
            room = state.guard.max_len - (prompt_v.n_tokens or 0)
            judge: LiveJudge | BufferedJudge = BufferedJudge(state.runner, messages, settings, state.bound, room)
        else:
            stream_guard = await state.live()

            async def reopen(thinking: bool = False):
                return await stream_guard.open_async(messages, thinking=thinking,
                                                     moderate_thinking=state.guard.moderate_thinking,
                                                     timeout=settings.upstream_timeout_s)

            try:
                session = await reopen()
            except CapacityError as e:
                raise APIError(503, str(e), code="guard_busy") from None
            checkpoint = None
            if control.on_unsafe is OnUnsafe.ROLLBACK and control.max_retries > 0:
                try:  # the session that follows the release point (`LiveJudge`)
                    checkpoint = type(session)(stream_guard.fork(session.session))
                except CapacityError as e:
                    session.close()
                    raise APIError(503, f"on_unsafe=rollback needs two guard sessions per stream: {e}",
                                   code="guard_busy") from None
            judge = LiveJudge(session, state.bound, settings.max_context, control.hold, checkpoint, reopen)
        # frees the sessions and closes the upstream request however the stream ends (a client gone too)
        try:
            async with aclosing(answer(chunks, judge, prompt_v, settings, ids, report, state.bound.tokenizer,
                                       retry)) as out:
                async for b in out:
                    yield b
        finally:
            report_stream(state, judge, report)
            await judge.aclose()
    except Exception as e:  # fail closed: an error event, never a silent end
        err = api_error(e, side="answer")
        log.warning("proxy stream failed: HTTP %s %s", err.status, err.code or err.type)
        state.observe_failure("chat", err.code or err.type, "response")
        yield sse(err.body())
    yield sse("[DONE]")


def report_stream(state: AppState, judge, report: LeakReport) -> None:
    """The metrics and audit record of a streamed answer, however it ended (its client gone too): the
    verdict its judge came to (the last, after any rollback) with the answer text it judged (hashed as a
    non-streamed answer's is; stored only with --log-content), and what leak control did."""
    try:
        v, text = judge.verdict(), judge.judged_text()
    except Exception:  # a session closed under it: nothing to report
        v, text = None, None
    if v is not None:
        state.observe("chat", v, "response", text=text, blocked=v.blocked)
    report_answer(state, report, cut=v is not None and v.blocked)


def report_answer(state: AppState, report: LeakReport, cut: bool) -> None:
    """What leak control did to one answer, in the metrics: rollbacks, a cut stream, a refusal."""
    for _ in range(report.retries):
        state.metrics.observe_rollback("chat")
    if cut:
        state.metrics.observe_cut("chat")
    if report.refused:
        state.metrics.observe_refusal("chat", "response")


async def answer(chunks: AsyncIterator[Chunk], judge: Judge, prompt_v: Verdict, settings: ServeSettings,
                 ids: dict[str, Any], report: LeakReport | None = None, tokenizer=None,
                 retry: Callable[[StreamReply], Awaitable[AsyncIterator[Chunk]]] | None = None
                 ) -> AsyncIterator[bytes]:
    """The client's chunks for the upstream's `chunks`. The upstream's finish_reason is held until its
    stream has really ended (`[DONE]`): text after it, an error or a cut-short stream is then an error
    with no "stop" before it. After a rollback, `retry(reply)` gives the upstream's continuation, which
    goes on in the same reply (one answer, one id, for the client)."""
    reply = StreamReply(judge, prompt_v, settings, ids, report, tokenizer)
    while True:
        async with aclosing(paced(chunks, settings.keepalive_s)) as items:
            async for c in items:
                if c is KEEPALIVE:
                    yield KEEPALIVE
                    continue
                if (b := await reply.take(c)) is not None:
                    yield b
                if reply.cut_off:
                    return  # closing `items` closes the upstream request: the LLM stops generating
                if reply.rolled_back:
                    break  # the same: the discarded branch is not generated further
        if not reply.rolled_back:
            break
        if retry is None:  # cannot happen: a reply rolls back only in rollback mode
            raise RuntimeError("a rollback without a retry")
        reply.rolled_back = False
        chunks = await retry(reply)
    # the upstream's stream ended with its [DONE] (`UpstreamClient.chunks` raises for any other end)
    for b in await reply.end():
        yield b


class StreamReply:
    """One streamed answer on its way to the client: what was pushed to the judge, released, and is still
    to come (the upstream's finish_reason and usage), as qguard's own chunks."""

    def __init__(self, judge: Judge, prompt_v: Verdict, settings: ServeSettings, ids: dict[str, Any],
                 report: LeakReport | None = None, tokenizer=None):
        self.judge, self.prompt_v, self.settings, self.ids = judge, prompt_v, settings, ids
        self.report = report if report is not None else LeakReport(LeakControl.of(settings))
        self.tokenizer = tokenizer
        self.cursor, self.writer = ReleaseCursor(), DeltaWriter()
        self.seen: list[str] = []  # the answer text, kept only when the operator logs content
        self.requested = ids["model"]
        self.have_ids = False
        self.finish: str | None = None  # the upstream's finish_reason, once it came
        self.usage: dict[str, Any] | None = None  # the upstream's latest usage
        self.cut_off = False  # the policy blocked: the refusal chunk was the last
        self.rolled_back = False  # the policy blocked and the held text was discarded: a retry follows
        self.out: list[str] = []  # the released text
        self.plain = True  # every piece so far is content (a rollback continues content only)
        self.branch = ""  # a rollback's discarded branch, released prefix included (for introspect)

    @property
    def prefix(self) -> str:
        return "".join(self.out)

    async def take(self, c: Chunk) -> bytes | None:
        """The client's chunk for upstream chunk `c`, if any: the text judged so far, or the refusal."""
        if not self.have_ids:  # the first chunk's, where they have their shape (else qguard's own)
            self.have_ids = True
            self.ids.update({k: v for k, v in c.ids.items() if k != "model"})
            self.ids["model"] = model_of(c.ids.get("model"), self.requested)
        self.writer.call_ids.update({i: x for i, x in c.call_ids.items() if i not in self.writer.call_ids})
        self.usage = c.usage or self.usage
        if c.pieces:
            if self.finish is not None:
                raise bad_answer("text after its finish_reason")
            self.plain = self.plain and all(path == ("content",) for path, _ in c.pieces)
            text = self.cursor.add(c.pieces)
            if self.settings.log_content:
                self.seen.append(text)
            if await self.judge.push(c.pieces, text):
                return await self.unsafe()
        if c.finish is not None and self.finish is None:
            if await self.judge.finish():
                return await self.unsafe()
            self.finish = c.finish
        return self.released(final=self.finish is not None)

    async def end(self) -> list[bytes]:
        """The last chunks, once the upstream's stream has ended: its finish_reason (everything before it
        judged and sent), its usage, the verdicts."""
        if self.finish is None:
            raise bad_answer("its stream ended without a finish_reason (cut short)")
        if self.cursor.held:  # cannot happen with a correct judge; if it does, the rest is not sent
            raise RuntimeError(f"{self.cursor.held} characters of the answer were left unjudged")
        if self.settings.log_content and self.seen:
            log.info("proxy answer content=%r", "".join(self.seen))
        out = [self.chunk([{"index": 0, "delta": {}, "finish_reason": self.finish}])]
        if self.usage is not None:
            out.append(self.chunk([], usage=self.usage))
        v = self.judge.verdict()  # the judge's session read exactly the released answer
        out.append(self.chunk([], qguard={**guard_info(self.prompt_v, v), "leak_control": self.report.to_dict(v)}))
        return out

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return sse({"id": self.ids["id"], "object": "chat.completion.chunk", "created": self.ids["created"],
                    "model": self.ids["model"], "choices": choices, **extra})

    def released(self, final: bool = False) -> bytes | None:
        pieces = self.cursor.release(self.judge.releasable())
        if pieces:
            text = "".join(t for _, t in pieces)
            self.out.append(text)
            self.judge.released(text)
        delta = self.writer.delta(pieces, final)
        return self.chunk([{"index": 0, "delta": delta, "finish_reason": None}]) if delta else None

    def tokens(self, text: str) -> int:
        return count_tokens(self.tokenizer, text) if self.tokenizer is not None else 0

    async def unsafe(self) -> bytes | None:
        """The policy blocked: roll back (None: a retry follows), else cut or refuse."""
        control, report = self.report.control, self.report
        if (control.on_unsafe is OnUnsafe.ROLLBACK and report.retries < control.max_retries and self.plain
                and await self.judge.roll_back(self.cursor.released)):
            discarded = self.cursor.discard()
            self.branch = self.prefix + discarded
            report.retries += 1
            report.rolled_back_tokens += self.tokens(discarded)
            self.rolled_back, self.usage = True, None
            log.info("proxy rolled back %d characters (retry %d)", len(discarded), report.retries)
            return None
        return await self.cut()

    async def cut(self) -> bytes:
        self.cut_off = True
        v = self.judge.verdict()
        log.info("proxy cut stream at token %s categories=%s", v.unsafe_position, [c.value for c in v.categories])
        report = self.report
        report.withheld_tokens += self.tokens(self.cursor.discard())
        report.refused = report.control.on_unsafe is not OnUnsafe.CUT  # refuse, or rollback out of retries
        released_v = await self.judge.released_verdict(self.prefix)
        info = {**guard_info(self.prompt_v, v, "response"), "leak_control": report.to_dict(released_v)}
        pieces = [(("content",), ("\n" if self.cursor.released else "") + self.settings.refusal_message)]
        delta = self.writer.delta(pieces if report.refused else []) or {}
        return self.chunk([{"index": 0, "delta": delta, "finish_reason": "content_filter"}], qguard=info)
