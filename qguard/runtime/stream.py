"""Live moderation with Qwen3Guard-Stream: sessions that judge a response while it is generated.

    sg = StreamGuard.from_pretrained("Qwen/Qwen3Guard-Stream-0.6B", max_sessions=64)
    with sg.open([{"role": "user", "content": "How do I ...?"}]) as s:
        print(s.prompt.label)                    # prompt verdict, at once
        for ids in llm_token_stream():           # or s.push_text(delta) for any other LLM
            for tv in s.push(ids):               # one verdict per moderated token
                if tv.stop:                      # the policy blocks: cut the LLM off
                    break
        print(s.finish())                        # the debounced response Verdict

Each push costs one incremental step of the engine (`qguard.engine.stream`): the prefix stays in the KV
cache. Pushes of many sessions share one batched forward: `push_many` in sync code, and in asyncio code
every `await session.push(...)` issued at the same time is coalesced into one step by a background loop,
which runs it (text tokenization included) on the step thread, never on the event loop. A session that
closes or fails never disturbs another one's step (see `StreamGuard._run_each`).

The layers point one way. A `StreamSession` is state (its slot, a `TurnReader`, a `ResponseState`, a
`TextFeed`) with a thin public face that hands every push to its `StreamGuard`. The guard runs a batch
in three stages: plan (open, take text, validate, read the turn's parts), execute (one engine run), read
(the family's readout, per session). What a token's verdict is, is `qguard.families.stream`'s: reading
positions (spec section 3), the readout of the heads, debounce and policy.
"""

from __future__ import annotations

import asyncio
import copy
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from qguard.engine.stream import EngineStats, PackedProbs, StreamEngine
from qguard.errors import CapacityError, InputError, check_int
from qguard.families.stream import (
    Readout,
    ResponseState,
    StreamLabels,
    TurnReader,
    live_prompt,
    prompt_verdict,
)
from qguard.incremental import IncrementalTokenizer
from qguard.messages import Message, fix_surrogates, session_messages
from qguard.policy import DebounceRule, Mode, Part, Policy, Severity, TokenVerdict, Verdict, resolve_policy
from qguard.runtime.load import load

__all__ = ["AsyncStreamSession", "StreamGuard", "StreamSession", "TextFeed"]

# What a batch item carries: a conversation to open a session on (`_Opening`; the step thread tokenizes
# it and takes a slot), the prompt ids of a session just opened, answer token ids, a text delta, a flush.
_OPEN, _PROMPT, _IDS, _TEXT, _FLUSH = range(5)


class StreamSession:
    """One conversation being moderated live. Use it as a context manager, or call `close()`.

    State, read by its `StreamGuard`: `slot` (its KV cache slot), `prompt_ids`, `user_end`, `length`
    (tokens submitted so far, prompt included), `reader` (which tokens of the turn are moderated),
    `response` (debounce and readout state), `text` (pushed text on its way to verdicts), `closed`,
    `finished` (`finish` was called), `failure` (the internal error that closed it, if one did).
    """

    def __init__(self, guard: StreamGuard, slot: int, prompt_ids: list[int], user_end: int, thinking: bool,
                 moderate_thinking: bool):
        self.guard, self.slot = guard, slot
        self.prompt_ids, self.user_end = prompt_ids, user_end
        self.thinking, self.moderate_thinking = thinking, moderate_thinking
        self.prompt: Verdict | None = None
        self.length = 0
        self.closed = False
        self.finished = False
        self.reader = TurnReader(thinking, moderate_thinking)
        self.response = ResponseState(guard.policy, guard.debounce_rule)
        self.text = TextFeed(guard.tokenizer, guard.official_special_tokens)
        self.failure: BaseException | None = None

    def push(self, ids: Sequence[int]) -> list[TokenVerdict]:
        """Push assistant token ids; returns a verdict for each moderated one (scaffolding gives none)."""
        return self.guard.push(self, ids)

    def push_text(self, delta: str) -> list[TokenVerdict]:
        """Push an assistant text delta (LLMs with another tokenizer); verdicts for the ids it commits.
        The text is all content: "<|im_end|>" in it does not end the turn, `finish` does. The last
        pre-tokenizer chunk stays uncommitted until later text fixes its tokens (see `pending_text`)."""
        return self.guard.push_text(self, delta)

    def flush(self) -> list[TokenVerdict]:
        """End of the text: commit the text still held by the incremental tokenizer; its verdicts.
        Afterwards `pending_text` is "" and later `push_text` calls are refused."""
        return self.guard.flush(self)

    @property
    def pending_text(self) -> str:
        """The text given to `push_text` that is not judged yet: the tail the incremental tokenizer holds
        back (later text may still change its tokens), text of a push still running, and text of a push
        that failed (its ids are retried by the next push or `flush`).

        Always a suffix of the pushed text, in the characters given (a UTF-16 surrogate pair counts two),
        so with `pushed` the concatenation of every delta, `pushed[:len(pushed) - len(pending_text)]` is
        exactly the text whose token ids the verdicts returned so far judged: what a proxy may release.
        "" when push_text was never used and once `flush` (or `finish`) returned."""
        return self.text.pending

    @property
    def stop(self) -> bool:
        """The policy blocks the response (sticky): cut the LLM off."""
        return self.response.stop

    @property
    def in_reasoning(self) -> bool:
        """The turn is in its reasoning: opened with thinking, `<think>` pushed, `</think>` not yet."""
        return self.reader.phase == "think"

    def restart_text(self) -> None:
        """A new text stream after `flush`: later `push_text` calls are tokenized on their own (e.g. the
        answer after the reasoning, once its text was flushed and `</think>` pushed as ids). Refused while
        pushed text is still pending."""
        self.check_open()
        if self.text.pending:
            raise InputError("text is still pending in this session; flush it before starting a new text stream")
        self.text = TextFeed(self.guard.tokenizer, self.guard.official_special_tokens)

    @property
    def n_moderated(self) -> int:
        """Tokens of the response that got a verdict so far."""
        return self.response.n_moderated

    def finish(self) -> Verdict:
        """End of the response: `flush`, then the debounced response verdict (call `flush` first to also
        get the verdicts of the last tokens). Later pushes are refused."""
        self.flush()
        self.finished = True
        return self.verdict()

    def verdict(self) -> Verdict:
        """The debounced response verdict so far (official eval rule unless configured otherwise)."""
        return self.response.verdict(n_tokens=self.length)

    def fork(self) -> StreamSession:
        """A second session continuing from this one's context (e.g. several sampled continuations)."""
        return self.guard.fork(self)

    def close(self) -> None:
        """Free the session's cache slot (idempotent). Waits for a step in progress to end."""
        self.guard.release(self, wait=True)

    def close_nowait(self) -> None:
        """Close without waiting for the engine lock (an event loop must not block on a running step).
        The engine frees the slot when no run uses it: a step that already holds this session's tokens
        ends first, and the session layer then drops the session's results."""
        self.guard.release(self, wait=False)

    def fail(self, error: BaseException) -> None:
        """An unexpected error in this session's own work: close it (its state is no longer known), so
        later pushes say why; other sessions of the step are not touched."""
        if self.failure is None:
            self.failure = error
        self.close_nowait()

    def check_open(self) -> None:
        """InputError unless the session takes pushes (not closed, not finished)."""
        if self.closed:
            if self.failure is not None:
                raise InputError("this stream session was closed after an internal error "
                                 f"({type(self.failure).__name__}); open a new session")
            raise InputError("this stream session is closed")
        if self.finished:
            raise InputError("this stream session's response is finished; open a new session")

    def __enter__(self) -> StreamSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # A dropped session must not leak its slot; the engine frees it at its next call (no lock here:
        # a finalizer may run in the middle of a step on this very thread).
        if not getattr(self, "closed", True):
            self.close_nowait()


_NO_TEXT_IDS: tuple[list[int], int] = ([], 0)


class TextFeed:
    """A session's pushed text on its way to verdicts (`push_text`, `flush`).

    Caller side: whether text was pushed and flushed, and the pushed text not judged yet (`pending`;
    appended by the caller, trimmed by the step, hence the lock). Step side (the thread running the
    engine, in push order): the incremental tokenizer, the pushed text it holds, as pushed, and ids it
    committed that no step has judged yet (a failed push retries them) with their text length.
    """

    def __init__(self, tokenizer, official_special_tokens: bool = False):
        self.tokenizer, self.official_special_tokens = tokenizer, official_special_tokens
        self.used = self.flushed = False
        self._pending = ""
        self._lock = threading.Lock()
        self._inc: IncrementalTokenizer | None = None
        self._held_raw = ""
        self._unsent: tuple[list[int], int] = _NO_TEXT_IDS

    @property
    def pending(self) -> str:
        """The pushed text not judged yet (see `StreamSession.pending_text`)."""
        return self._pending

    def accept(self, delta: str) -> str:
        """Caller side of a text push: check it and count it as pending (tokenized later, by the step)."""
        if not isinstance(delta, str):
            raise InputError(f"text deltas must be str, got {type(delta).__name__}")
        if self.flushed:
            raise InputError("this text stream was already flushed; start a new one")
        self.used = True
        if delta:
            with self._lock:
                self._pending += delta
        return delta

    def flush_needed(self) -> bool:
        """Caller side of `flush`: False when there is nothing to commit (no text, or already flushed and
        judged), so finishing twice or a session without text costs no step."""
        if not self.used or (self.flushed and not self._pending):
            return False
        self.flushed = True
        return True

    def take(self, delta: str | None) -> tuple[list[int], int]:
        """Step side of a text push (`delta`, or None for flush): the ids to judge now (unjudged ids of a
        failed earlier push first) and how much pushed text they cover. Whoever takes them and cannot
        get them judged gives them back with `requeue`."""
        if self._inc is None:
            self._inc = IncrementalTokenizer(self.tokenizer, official_special_tokens=self.official_special_tokens)
        inc = self._inc
        raw = self._held_raw + (delta or "")
        if delta is None:
            new, held = inc.flush(), 0
        else:
            new = inc.push(delta)
            held = _held_length(raw, inc.pending_text)
        self._held_raw = raw[len(raw) - held:] if held else ""
        ids, n = self._unsent
        self._unsent = _NO_TEXT_IDS
        return ids + new, n + len(raw) - held

    def requeue(self, ids: list[int], n: int) -> None:
        """Taken ids (covering `n` characters) that were not judged: the next take returns them first."""
        unsent, m = self._unsent
        self._unsent = (ids + unsent, n + m)

    def judged(self, n: int) -> None:
        """The first `n` characters of the pending text were judged."""
        with self._lock:
            self._pending = self._pending[n:]

    def copy(self) -> TextFeed:
        """An independent continuation (`StreamSession.fork`)."""
        new = object.__new__(TextFeed)
        new.__dict__.update(self.__dict__, _lock=threading.Lock(), _inc=copy.copy(self._inc))
        return new


@dataclass
class _Opening:
    """An `open_async` call: its conversation, then (step side) its prompt ids; `full`: the CapacityError
    of the last try when every slot was in use."""

    messages: object
    system: str | None
    thinking: bool
    moderate_thinking: bool
    ids: list[int] | None = None
    user_end: int = 0
    full: CapacityError | None = None


def _close_opened(job) -> None:
    """A step finished after its event loop went away: close the sessions it opened for nobody."""
    if not job.cancelled() and job.exception() is None:
        for r in job.result():
            if isinstance(r, StreamSession):
                r.close_nowait()


_SURROGATE = re.compile("[\ud800-\udfff]")


def _held_length(raw: str, held: str) -> int:
    """How many characters at the end of `raw` (text as pushed) the incremental tokenizer holds as `held`
    (its pending text: the same characters, with UTF-16 surrogate pairs joined and lone halves made
    U+FFFD, except a trailing high half that waits for its partner). When they do not line up, all of
    `raw`: text is never counted as judged unless its ids were."""
    if not held:
        return 0
    if not _SURROGATE.search(raw):  # the usual text: one character each
        return len(held) if raw.endswith(held) else len(raw)
    i = len(raw)
    for _ in range(len(held)):  # walk back one held character (a pair is two pushed ones) at a time
        if i == 0:
            return len(raw)
        pair = i >= 2 and "\udc00" <= raw[i - 1] <= "\udfff" and "\ud800" <= raw[i - 2] <= "\udbff"
        i -= 2 if pair else 1
    return len(raw) - i if fix_surrogates(raw[i:]) == fix_surrogates(held) else len(raw)


def _token_ids(ids: Sequence[int]) -> list[int]:
    """A push's ids as a list (the values are checked in `StreamGuard._validate`)."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise InputError(f"push takes a sequence of token ids, got {type(ids).__name__}; use push_text for text")
    return list(ids)


class AsyncStreamSession:
    """The asyncio face of a `StreamSession`: concurrent pushes of many sessions share batched steps.

    Cancelling an awaited push (e.g. the client went away) closes the session: the push may or may not
    have been judged, so the session cannot go on. Closing never disturbs a step in progress: the slot
    is freed when the step ends and the closed session's results are dropped.
    """

    def __init__(self, session: StreamSession):
        self.session = session

    @property
    def prompt(self) -> Verdict | None:
        return self.session.prompt

    @property
    def stop(self) -> bool:
        return self.session.stop

    @property
    def pending_text(self) -> str:
        """`StreamSession.pending_text`: the pushed text not judged yet (text of a push still awaited
        included), a suffix of the pushed text."""
        return self.session.pending_text

    async def push(self, ids: Sequence[int]) -> list[TokenVerdict]:
        return await self.session.guard.push_async(self.session, _IDS, _token_ids(ids))

    async def push_text(self, delta: str) -> list[TokenVerdict]:
        """Like `StreamSession.push_text`; the text is tokenized by the step thread, in push order, so a
        large delta never blocks the event loop."""
        s = self.session
        s.check_open()
        delta = s.text.accept(delta)
        return await s.guard.push_async(s, _TEXT, delta) if delta else []

    async def flush(self) -> list[TokenVerdict]:
        s = self.session
        return await s.guard.push_async(s, _FLUSH, None) if s.text.flush_needed() else []

    async def finish(self) -> Verdict:
        await self.flush()
        self.session.finished = True
        return self.session.verdict()

    def verdict(self) -> Verdict:
        return self.session.verdict()

    async def aclose(self) -> None:
        """Close; never waits for a running step (its slot is freed when the step ends)."""
        self.session.close_nowait()

    def close(self) -> None:
        """Like `aclose`, from sync code on the event loop's thread."""
        self.session.close_nowait()

    async def __aenter__(self) -> AsyncStreamSession:
        return self

    async def __aexit__(self, *exc) -> None:
        self.session.close_nowait()


class StreamGuard:
    """Sessions over one Qwen3Guard-Stream model and one batched `StreamEngine`.

    `max_sessions` x `max_context` tokens of KV cache are allocated up front (bounded memory). When all
    sessions are in use, `open` raises CapacityError and `open_async` waits for a free slot (back-pressure)
    up to its `timeout`.
    """

    def __init__(self, model, tokenizer, labels: StreamLabels, *, policy: Policy | None = None,
                 mode: Mode | str | None = None, debounce: DebounceRule | str = DebounceRule.EVAL,
                 max_sessions: int = 8, max_context: int = 2048, prefill_chunk: int = 512,
                 static_decode: bool | None = None, compile_step: bool = False,
                 official_special_tokens: bool = False):
        self.model, self.tokenizer, self.labels = model, tokenizer, labels
        # prompt and pushed text are tokenized as text; True (unsafe for untrusted input): officially, so
        # "<|im_end|>" spelt in them becomes the control token (Guard.from_pretrained's parameter)
        self.official_special_tokens = official_special_tokens
        self.policy = resolve_policy(mode, policy)
        self.debounce_rule = DebounceRule(debounce)
        for what, n in (("max_sessions", max_sessions), ("max_context", max_context), ("prefill_chunk", prefill_chunk)):
            check_int(n, what)  # an InputError, not a TypeError from the engine's comparisons
        self.engine = StreamEngine(model, max_sessions=max_sessions, max_context=max_context,
                                   prefill_chunk=prefill_chunk, static_decode=static_decode,
                                   compile_step=compile_step)
        self.safe_index = list(labels.risk).index(Severity.SAFE)
        self._readout = Readout(labels, self.engine.head_sizes, self.safe_index)
        self._vocab = model.config.vocab_size
        self._queue: list[tuple[StreamSession, int, object, asyncio.Future]] = []  # (session, kind, payload, waiter)
        self.on_step: Callable[[float, int], None] | None = None  # (seconds, items) of each async step (metrics)
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qguard-stream")

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike | None = None, *,
                        device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                        calibration=None, quantize: str | None = None, **kw) -> StreamGuard:
        """Load a Qwen3Guard-Stream checkpoint (local path or hub id; None: the embedded starter model);
        kw go to `StreamGuard`.

        `dtype`, `calibration` and `official_special_tokens` (unsafe for untrusted input): as in
        `Guard.from_pretrained`; so is `quantize` (CPU int8 weights, inference only)."""
        loaded = load(name_or_path, device=device, dtype=dtype, calibration=calibration, quantize=quantize,
                      live=True)  # CheckpointError unless a checkpoint with live sessions
        return cls(loaded.model, loaded.tokenizer, loaded.labels, **kw)

    @property
    def stats(self) -> EngineStats:
        return self.engine.stats

    # ------------------------------------------------------------------------------------ sync API

    def open(self, messages: str | Sequence[Message], *, system: str | None = None, thinking: bool = False,
             moderate_thinking: bool = True) -> StreamSession:
        """Start moderating the assistant turn that follows `messages` (which end with the user's turn).

        `thinking`: the LLM answers in thinking mode (`<think>...</think>` then the answer); otherwise the
        prompt carries Qwen3's empty think block. `moderate_thinking`: also give verdicts on the reasoning.
        The prompt verdict is computed at once (`session.prompt`).
        """
        ids, user_end = self._prompt_ids(messages, system, thinking)
        with self.engine.lock:
            self._check_prompt_fits(ids)
            session = StreamSession(self, self.engine.allocate(), ids, user_end, thinking, moderate_thinking)
            try:
                self._run_one(session, _PROMPT, ids)
            except BaseException:
                session.close()
                raise
        return session

    def push(self, session: StreamSession, ids: Sequence[int]) -> list[TokenVerdict]:
        """`session.push(ids)`: one step for this session alone."""
        return self._run_one(session, _IDS, _token_ids(ids))

    def push_text(self, session: StreamSession, delta: str) -> list[TokenVerdict]:
        """`session.push_text(delta)`: the text is counted as pending, then tokenized and judged."""
        session.check_open()
        delta = session.text.accept(delta)
        return self._run_one(session, _TEXT, delta) if delta else []

    def flush(self, session: StreamSession) -> list[TokenVerdict]:
        """`session.flush()`: commit the text the session's incremental tokenizer holds, when it holds any."""
        return self._run_one(session, _FLUSH, None) if session.text.flush_needed() else []

    def push_many(self, pushes: Mapping[StreamSession, Sequence[int]]) -> dict[StreamSession, list[TokenVerdict]]:
        """Push tokens to several sessions in one batched step. All or nothing: if any push is invalid,
        its error is raised and no session moves (so the caller can fix it and retry the batch)."""
        results = self._run_each([(s, _IDS, _token_ids(ids)) for s, ids in pushes.items()], atomic=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return dict(zip(pushes, results))

    def fork(self, session: StreamSession) -> StreamSession:
        """`session.fork()`: a new session (its own slot, a copy of the KV cache) continuing this one."""
        session.check_open()
        with self.engine.lock:
            if self.engine.length(session.slot) != session.length:
                raise InputError("cannot fork while pushes of this session are in flight")
            new = copy.copy(session)
            new.slot = self.engine.fork(session.slot)
        new.reader = copy.copy(session.reader)
        new.response = session.response.copy()
        new.text = session.text.copy()
        return new

    def release(self, session: StreamSession, wait: bool = True) -> None:
        """Close `session` (idempotent) and free its slot: at once (waits for a running step), or with
        `wait=False` once no run uses it (never blocks; what an event loop or a finalizer calls)."""
        if not session.closed:
            session.closed = True
            if wait:
                self.engine.free(session.slot)
            else:
                self.engine.release_later(session.slot)

    def close(self) -> None:
        """Stop the background step thread (sessions stay usable from sync code)."""
        self._executor.shutdown(wait=True)

    # ------------------------------------------------------------------------------------ async API

    async def open_async(self, messages: str | Sequence[Message], *, system: str | None = None,
                         thinking: bool = False, moderate_thinking: bool = True,
                         timeout: float | None = None) -> AsyncStreamSession:
        """Like `open`, but waits (up to `timeout` seconds) for a free session instead of failing.
        The step thread tokenizes the prompt and takes the slot, so the event loop never waits on them,
        and the prompt's prefill shares the step of the pushes queued with it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        opening = _Opening(messages, system, thinking, moderate_thinking)
        while True:
            r = await self.push_async(None, _OPEN, opening)
            if isinstance(r, StreamSession):
                return AsyncStreamSession(r)
            opening = r  # no free slot yet: the same opening, its prompt already tokenized
            if deadline is not None and time.monotonic() >= deadline:
                raise r.full
            await asyncio.sleep(0.005)

    async def push_async(self, session: StreamSession | None, kind: int, payload):
        """Queue one batch item (an `AsyncStreamSession` push, or an opening with no session yet) for the
        next shared step; its result or error."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.append((session, kind, payload, fut))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._step_loop())
        try:
            return await fut
        except asyncio.CancelledError:
            # the push may already be in a running step: the caller cannot know what was judged, so the
            # session ends here (its slot is freed once no step uses it; a session being opened is closed
            # when its step delivers it)
            if session is not None:
                session.close_nowait()
            raise

    async def _step_loop(self) -> None:
        await asyncio.sleep(0)  # let every coroutine that is ready enqueue its push: they share this step
        while self._queue:
            batch, self._queue = self._queue, []
            batch = [b for b in batch if not b[3].done()]  # cancelled while queued: never stepped
            if not batch:
                continue
            items = [(s, kind, payload) for s, kind, payload, _ in batch]  # new prompts prefill beside live pushes
            try:
                job = self._executor.submit(self._run_each, items)
            except Exception as e:  # the step cannot run at all (e.g. the guard was closed)
                results = [e] * len(batch)
            else:
                t0 = time.perf_counter()
                try:
                    results = await asyncio.wrap_future(job)
                    if self.on_step is not None:
                        self.on_step(time.perf_counter() - t0, len(batch))
                except asyncio.CancelledError:  # the loop itself is going away: nobody waits forever
                    job.add_done_callback(_close_opened)
                    for *_, fut in batch:
                        fut.cancel()
                    raise
                except Exception as e:  # _run_each reports per item; this is a last resort
                    results = [e] * len(batch)
            for (*_, fut), r in zip(batch, results):
                if fut.done():  # its push was cancelled meanwhile: drop the result
                    if isinstance(r, StreamSession):
                        r.close_nowait()  # opened for a caller that is gone
                elif isinstance(r, BaseException):
                    fut.set_exception(r)
                else:
                    fut.set_result(r)

    # ------------------------------------------------------------------------------------ internals

    def _prompt_ids(self, messages: str | Sequence[Message], system: str | None, thinking: bool) -> tuple[list[int], int]:
        return live_prompt(self.tokenizer, session_messages(messages, system), thinking,
                           official_special_tokens=self.official_special_tokens)

    def _check_prompt_fits(self, ids: list[int]) -> None:
        if len(ids) >= self.engine.max_context:
            raise CapacityError(f"the conversation is {len(ids)} tokens, leaving no room for a response in the "
                                f"engine's max_context of {self.engine.max_context}; raise max_context")

    def _run_one(self, session: StreamSession, kind: int, payload) -> list[TokenVerdict] | Verdict:
        r = self._run_each([(session, kind, payload)])[0]
        if isinstance(r, BaseException):
            raise r
        return r

    def _run_each(self, items: list[tuple[StreamSession | None, int, object]], atomic: bool = False) -> list:
        """Validate, submit and run a batch of pushes in one engine run; a result or an error per item.

        Three stages, one way: `_plan` (openings, text tokenization in queue order, validation and the
        parts of the turn), `_execute` (one engine run), `_read` (verdicts per session). Every item is
        checked before any is submitted, so a bad push fails alone and leaves its session unchanged; with
        `atomic`, one bad push fails the batch before anything runs. An unexpected error in one session's
        work fails (and closes) that session alone; an engine failure fails every submitted push, and the
        engine rolls back, so those sessions stay as they were. A session closed while the run was in
        flight gets no results, and its slot is freed only after the run. Per session the work is plain
        Python; the tensor work is done once for the run.
        """
        eng = self.engine
        with eng.lock:
            try:
                results: list = [None] * len(items)
                todo = self._plan(items, results)
                if atomic and len(todo) < len(items):
                    return results
                out = self._execute(todo, results)
                if out is not None:
                    self._read(todo, out, results)
                return results
            finally:
                eng.free_released()  # sessions closed or failed during the run

    def _plan(self, items: list[tuple[StreamSession | None, int, object]], results: list) -> list[tuple]:
        """The items that will run, as (item index, session, ids, parts, reader phase after them, slot
        tokens before them, kind, pushed text they cover); the others' errors go to `results`. Changes no
        session's state, except that text is taken (and given back with `requeue` unless it gets judged)."""
        # openings first: allocating frees released slots, which must happen before any item is checked
        items = [self._open_item(k, item, results) if item[1] == _OPEN else item for k, item in enumerate(items)]
        todo = []
        batch: dict[int, tuple[int, str | None]] = {}  # slot -> (tokens this batch adds, reader phase after)
        validate = self._validate  # bound once: the loop runs per session
        for k, (s, kind, payload) in enumerate(items):
            if s is None:  # an opening that failed or waits for a slot: its result is set
                continue
            slot = s.slot
            before, phase = batch.get(slot, (0, None))
            ids, text, taken = payload, 0, False
            try:
                if kind >= _TEXT:
                    if s.closed or s.finished:
                        s.check_open()
                    try:
                        ids, text = s.text.take(payload)
                    except Exception as e:  # the text stream is broken: this session fails alone
                        s.fail(e)
                        raise
                    taken = True
                    # text is all content: "<|im_end|>" in it does not end the turn (see TurnReader)
                    s.reader.ends = ()
                parts, phase = validate(s, ids, before, phase, kind <= _PROMPT)
            except Exception as e:  # InputError / CapacityError: the push fails alone, the session is unchanged
                results[k] = e
                if taken:
                    s.text.requeue(ids, text)
                if kind == _OPEN:
                    s.close_nowait()
                continue
            batch[slot] = (before + len(ids), phase)
            todo.append((k, s, ids, parts, phase, before, kind, text))
        return todo

    def _execute(self, todo: list[tuple], results: list) -> PackedProbs | None:
        """Submit every planned push and run the engine once. On a failure the engine rolls back, so no
        session moved: text ids wait for the next push, openings are closed, every item gets the error."""
        eng = self.engine
        try:
            for _, s, ids, *_ in todo:
                if ids:
                    eng.submit(s.slot, ids, checked=True)  # validated by _plan
            return eng.run_packed()
        except Exception as e:
            eng.abort()
            for k, s, ids, *_, kind, text in reversed(todo):
                if kind >= _TEXT:
                    s.text.requeue(ids, text)
                elif kind == _OPEN:
                    s.close_nowait()
                results[k] = e
            return None

    def _read(self, todo: list[tuple], out: PackedProbs, results: list) -> None:
        """The run's head probabilities -> each item's result: a prompt verdict (or the opened session),
        or the token verdicts of a push. A failure here fails that session alone."""
        policy, labels = self.policy, self.labels
        table = None  # read once for the whole run, when a response push needs it
        rows = out.rows
        for k, s, ids, parts, phase, before, kind, text in todo:
            if s.closed:  # closed during the run: its waiter is gone, its slot is freed after the run
                results[k] = InputError("this stream session is closed")
                continue
            try:
                if kind <= _PROMPT:  # once per session: per-session tensor views are fine here
                    s.length += len(ids)
                    heads = out.heads(s.slot).slice(before, before + len(ids))
                    s.prompt = prompt_verdict(policy, labels, heads, s.user_end, s.user_end + 1)
                    results[k] = s if kind == _OPEN else s.prompt
                    continue
                s.reader.phase = phase
                if ids:
                    if table is None:
                        table = self._readout.read(out.probs)
                    start = s.length
                    s.length = start + len(ids)
                    results[k] = s.response.consume(ids, parts, table, rows[s.slot][0] + before, start)
                else:
                    results[k] = []
                if text:
                    s.text.judged(text)
            except Exception as e:  # this session alone: the others' results stand
                results[k] = e
                s.fail(e)

    def _open_item(self, k: int, item: tuple, results: list) -> tuple[StreamSession | None, int, object]:
        """Step side of `open_async`: the batch item of the new session (its prompt to prefill), or
        (None, ...) with results[k] set: the error, or the `_Opening` to retry when no slot is free."""
        _, kind, op = item
        try:
            if op.ids is None:
                ids, user_end = self._prompt_ids(op.messages, op.system, op.thinking)
                self._check_prompt_fits(ids)
                op.ids, op.user_end = ids, user_end
        except Exception as e:  # InputError, or CapacityError: the conversation itself does not fit
            results[k] = e
            return None, kind, op
        try:
            slot = self.engine.allocate()
        except CapacityError as e:
            op.full, results[k] = e, op
            return None, kind, op
        s = StreamSession(self, slot, op.ids, op.user_end, op.thinking, op.moderate_thinking)
        return s, kind, op.ids

    def _validate(self, s: StreamSession, ids: list[int], extra: int, phase: str | None,
                  prompt: bool) -> tuple[Sequence[Part | None], str]:
        """(part of each token, reader phase after them) if the push is valid; raises otherwise."""
        if s.closed or s.finished:
            s.check_open()
        vocab = self._vocab
        for i in ids:  # plain ints in range (the usual push) pass without building a list
            if type(i) is not int or not 0 <= i < vocab:
                bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab]
                if bad:
                    raise InputError(f"token ids must be integers in 0..{vocab - 1}, got {bad[:5]}")
                break
        total = s.length + extra + len(ids)
        if total > self.engine.max_context:
            raise CapacityError(f"stream session would reach {total} tokens, over the engine's max_context of "
                                f"{self.engine.max_context}; finish it or build the StreamGuard with a larger "
                                "max_context")
        if prompt:
            return ([], s.reader.phase)
        return s.reader.plan(ids, phase)
