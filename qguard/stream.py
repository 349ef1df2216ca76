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

Reading positions (spec section 3): the prompt verdict is the query heads at the user turn's
`<|im_end|>`; response verdicts are the response heads at every answer token, and at the reasoning tokens
too when thinking is moderated. Template scaffolding (`<think>`, the newline after it, `</think>`, the
`\\n\\n` after it, `<|im_end|>`) goes through the model but never produces a verdict.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import enum
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from qguard.calibration import calibrate_loaded
from qguard.checkpoint import (
    StreamLabels,
    build_stream_model,
    model_path,
    open_checkpoint,
    pick_device,
    resolve_dtype,
)
from qguard.engine.scoring import argmax_label, probs_dict, severity_probs
from qguard.engine.stream import EngineStats, HeadProbs, StreamEngine
from qguard.errors import CapacityError, InputError, check_int
from qguard.incremental import IncrementalTokenizer
from qguard.model.quant import check_quantize, quantize_model
from qguard.policy import Category, Debouncer, DebounceRule, Mode, Policy, Severity, Verdict, resolve_policy
from qguard.tokenizer import (
    DOUBLE_NEWLINE,
    END_THINK,
    ENDOFTEXT,
    IM_END,
    NEWLINE,
    THINK,
    Message,
    chat_ids,
    check_turn,
    fix_surrogates,
    load_tokenizer,
)

__all__ = [
    "AsyncStreamSession", "CapacityError", "DebounceRule", "EngineStats", "IncrementalTokenizer", "Part",
    "Policy", "StreamEngine", "StreamGuard", "StreamSession", "TokenVerdict", "Verdict",
]


class Part(str, enum.Enum):
    """Which part of the assistant turn a token belongs to."""

    THINK = "think"
    ANSWER = "answer"


@dataclass(frozen=True)
class TokenVerdict:
    """The guard's reading of one moderated token, and the running response verdict after it."""

    token_id: int
    index: int  # index among the moderated tokens of the response (what debounce counts)
    position: int  # absolute position in the guard's token sequence
    part: Part
    probs: dict[str, float]  # {"Safe", "Unsafe", "Controversial"}
    category_probs: dict[str, float]
    label: Severity  # this token's own label (argmax)
    category: Category  # this token's most likely category
    response_label: Severity  # debounced label of the response so far
    unsafe_position: int | None  # index where the response label was decided, if it was
    stop: bool  # the policy blocks the response: stop the LLM

    @classmethod
    def _fast(cls, *values) -> TokenVerdict:
        """`TokenVerdict(*values)` for the per-token hot path: the frozen dataclass __init__ sets each
        field through object.__setattr__, which costs more than the rest of a token's record; this fills
        the instance dict at once (tests check the result equals the regular constructor's).
        `StreamSession._consume` does the same inline, from a dict literal, to save the call."""
        tv = object.__new__(cls)
        tv.__dict__.update(zip(_TOKEN_VERDICT_FIELDS, values))
        return tv

    def to_dict(self) -> dict:
        return {"token_id": self.token_id, "index": self.index, "position": self.position, "part": self.part.value,
                "probs": self.probs, "category_probs": self.category_probs, "label": self.label.value,
                "category": self.category.value, "response_label": self.response_label.value,
                "unsafe_position": self.unsafe_position, "stop": self.stop}


_TOKEN_VERDICT_FIELDS = tuple(f.name for f in dataclasses.fields(TokenVerdict))


_ANSWER = (Part.ANSWER,)

# What a batch item carries: a conversation to open a session on (`_Opening`; the step thread tokenizes
# it and takes a slot), the prompt ids of a session just opened, answer token ids, a text delta, a flush.
_OPEN, _PROMPT, _IDS, _TEXT, _FLUSH = range(5)


class _Reader:
    """Walks the assistant turn token by token and says which tokens are moderated (O(1) per token).

    Thinking on: `<think>` `\\n` reasoning... `</think>` `\\n\\n` answer... `<|im_end|>` (the newline after
    `<think>` is `\\n\\n` in the empty block that Qwen3 writes when it skips thinking).
    Thinking off: the template already put the empty think block in the prompt; every token is answer.
    `ends`: the ids that end the turn. Text pushes clear it (`StreamSession.push_text`): "<|im_end|>" in
    the text of an LLM is text, and the caller ends the turn with `finish`; otherwise a response could
    switch its own moderation off by writing it.
    """

    def __init__(self, thinking: bool, moderate_thinking: bool):
        self.phase = "start" if thinking else "answer"
        self.moderate_thinking = moderate_thinking
        self.ends: tuple[int, ...] = (IM_END, ENDOFTEXT)

    def plan(self, ids: Sequence[int], phase: str | None = None) -> tuple[Sequence[Part | None], str]:
        """Part of each token (None = not moderated) and the phase after them, starting from `phase`
        (default: the current one); changes nothing."""
        phase, parts, ends = phase or self.phase, [], self.ends
        if phase == "answer" and not any(e in ids for e in ends):  # the common case, no loop
            return _ANSWER * len(ids), phase  # a one-token push gets the shared tuple itself
        for tok in ids:
            part, phase = self._next(phase, tok, ends)
            parts.append(part if part is not Part.THINK or self.moderate_thinking else None)
        return parts, phase

    @staticmethod
    def _next(phase: str, tok: int, ends: tuple[int, ...]) -> tuple[Part | None, str]:
        if phase == "ended":
            raise InputError("the assistant turn already ended (<|im_end|> was pushed); open a new session")
        if phase == "start":
            if tok == THINK:
                return None, "think_open"
            phase = "answer"  # a model that answers without thinking
        if phase == "think_open":
            if tok == NEWLINE or tok == DOUBLE_NEWLINE:  # "\n\n": the empty block "<think>\n\n</think>"
                return None, "think"
            phase = "think"
        if phase == "think":
            return (None, "think_close") if tok == END_THINK else (Part.THINK, "think")
        if phase == "think_close":
            if tok == DOUBLE_NEWLINE:
                return None, "answer"
            phase = "answer"
        if tok in ends:
            return None, "ended"
        return Part.ANSWER, "answer"


class StreamSession:
    """One conversation being moderated live. Use it as a context manager, or call `close()`."""

    def __init__(self, guard: StreamGuard, slot: int, prompt_ids: list[int], user_end: int, thinking: bool,
                 moderate_thinking: bool):
        self.guard, self.slot = guard, slot
        self.prompt_ids, self.user_end = prompt_ids, user_end
        self.thinking, self.moderate_thinking = thinking, moderate_thinking
        self.prompt: Verdict | None = None
        self.length = 0  # tokens submitted so far (prompt included)
        self.closed = False
        self.finished = False  # `finish` was called: the response is complete
        self.stop = False
        self._reader = _Reader(thinking, moderate_thinking)
        self._debouncer = Debouncer(guard.debounce_rule)
        # (probs, category probs, category) at the deciding token, and (P(not safe), ...) at the riskiest one:
        # what the response Verdict reports, kept in O(1) per token
        self._decided: tuple[dict, dict, Category] | None = None
        self._riskiest: tuple[float, dict, dict, Category] | None = None
        self._text: IncrementalTokenizer | None = None
        self.n_moderated = 0
        # Text pushes. Caller side: whether push_text / flush were called, and the pushed text that is not
        # judged yet (`pending_text`; appended by the caller, trimmed by the step, hence the lock). Step side
        # (the thread running the engine): the pushed text the incremental tokenizer holds, as pushed, and
        # ids it committed that no step has judged yet (a failed push retries them) with their text length.
        self._text_used = self._text_flushed = False
        self._pending = ""
        self._pending_lock = threading.Lock()
        self._held_raw = ""
        self._unsent: tuple[list[int], int] = _NO_TEXT_IDS
        self._failure: BaseException | None = None

    # ------------------------------------------------------------------------------------ public

    def push(self, ids: Sequence[int]) -> list[TokenVerdict]:
        """Push assistant token ids; returns a verdict for each moderated one (scaffolding gives none)."""
        return self.guard._run_one(self, ids)

    def push_text(self, delta: str) -> list[TokenVerdict]:
        """Push an assistant text delta (LLMs with another tokenizer); verdicts for the ids it commits.
        The text is all content: "<|im_end|>" in it does not end the turn, `finish` does. The last
        pre-tokenizer chunk stays uncommitted until later text fixes its tokens (see `pending_text`)."""
        delta = self._accept_text(delta)
        return self.guard._run_one(self, delta, _TEXT) if delta else []

    def flush(self) -> list[TokenVerdict]:
        """End of the text: commit the text still held by the incremental tokenizer; its verdicts.
        Afterwards `pending_text` is "" and later `push_text` calls are refused."""
        return self.guard._run_one(self, None, _FLUSH) if self._flush_needed() else []

    @property
    def pending_text(self) -> str:
        """The text given to `push_text` that is not judged yet: the tail the incremental tokenizer holds
        back (later text may still change its tokens), text of a push still running, and text of a push
        that failed (its ids are retried by the next push or `flush`).

        Always a suffix of the pushed text, in the characters given (a UTF-16 surrogate pair counts two),
        so with `pushed` the concatenation of every delta, `pushed[:len(pushed) - len(pending_text)]` is
        exactly the text whose token ids the verdicts returned so far judged: what a proxy may release.
        "" when push_text was never used and once `flush` (or `finish`) returned."""
        return self._pending

    def finish(self) -> Verdict:
        """End of the response: `flush`, then the debounced response verdict (call `flush` first to also
        get the verdicts of the last tokens). Later pushes are refused."""
        self.flush()
        self.finished = True
        return self.verdict()

    def verdict(self) -> Verdict:
        """The debounced response verdict so far (official eval rule unless configured otherwise)."""
        return self.guard._response_verdict(self)

    def fork(self) -> StreamSession:
        """A second session continuing from this one's context (e.g. several sampled continuations)."""
        self._check_open()
        with self.guard.engine.lock:
            if self.guard.engine.length(self.slot) != self.length:
                raise InputError("cannot fork while pushes of this session are in flight")
            new = copy.copy(self)
            new.slot = self.guard.engine.fork(self.slot)
        new._pending_lock = threading.Lock()
        new._reader = copy.copy(self._reader)
        new._debouncer = copy.copy(self._debouncer)
        new._text = copy.copy(self._text)
        return new

    def close(self) -> None:
        """Free the session's cache slot (idempotent). Waits for a step in progress to end."""
        if not self.closed:
            self.closed = True
            self.guard.engine.free(self.slot)

    def _close_nowait(self) -> None:
        """Close without waiting for the engine lock (an event loop must not block on a running step).
        The engine frees the slot when no run uses it: a step that already holds this session's tokens
        ends first, and the session layer then drops the session's results."""
        if not self.closed:
            self.closed = True
            self.guard.engine.release_later(self.slot)

    def _fail(self, error: BaseException) -> None:
        """An unexpected error in this session's own work: close it (its state is no longer known), so
        later pushes say why; other sessions of the step are not touched."""
        if self._failure is None:
            self._failure = error
        self._close_nowait()

    def __enter__(self) -> StreamSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # A dropped session must not leak its slot; the engine frees it at its next call (no lock here:
        # a finalizer may run in the middle of a step on this very thread).
        if not getattr(self, "closed", True):
            self._close_nowait()

    # ------------------------------------------------------------------------------------ internals

    def _accept_text(self, delta: str) -> str:
        """Caller side of a text push: check it and count it as pending (tokenized later, by the step)."""
        self._check_open()
        if not isinstance(delta, str):
            raise InputError(f"text deltas must be str, got {type(delta).__name__}")
        if self._text_flushed:
            raise InputError("this text stream was already flushed; start a new one")
        self._text_used = True
        if delta:
            with self._pending_lock:
                self._pending += delta
        return delta

    def _flush_needed(self) -> bool:
        """Caller side of `flush`: False when there is nothing to commit (no text, or already flushed and
        judged), so finishing twice or a session without text costs no step."""
        if not self._text_used or (self._text_flushed and not self._pending):
            return False
        self._text_flushed = True
        return True

    def _text_stream(self) -> IncrementalTokenizer:
        if self._text is None:
            self._text = IncrementalTokenizer(self.guard.tokenizer,
                                              official_special_tokens=self.guard.official_special_tokens)
            self._reader.ends = ()
        return self._text

    def _take_text(self, delta: str | None) -> tuple[list[int], int]:
        """Step side of a text push (`delta`, or None for flush), run in push order off the event loop:
        the ids to judge now (unjudged ids of a failed earlier push first) and how much pushed text they
        cover. Stays in `_unsent` until the step that judges them succeeds."""
        inc = self._text_stream()
        raw = self._held_raw + (delta or "")
        if delta is None:
            new, held = inc.flush(), 0
        else:
            new = inc.push(delta)
            held = _held_length(raw, inc.pending_text)
        self._held_raw = raw[len(raw) - held:] if held else ""
        ids, n = self._unsent
        self._unsent = (ids + new, n + len(raw) - held)
        return self._unsent

    def _judged(self, n: int) -> None:
        """The first `n` characters of the pending text were judged."""
        with self._pending_lock:
            self._pending = self._pending[n:]

    def _check_open(self) -> None:
        if self.closed:
            if self._failure is not None:
                raise InputError("this stream session was closed after an internal error "
                                 f"({type(self._failure).__name__}); open a new session")
            raise InputError("this stream session is closed")
        if self.finished:
            raise InputError("this stream session's response is finished; open a new session")

    def _consume(self, ids: Sequence[int], parts: Sequence[Part | None], table: _Table, a: int) -> list[TokenVerdict]:
        """Turn the engine's probabilities for pushed tokens (rows a.. of the run's `table`) into verdicts
        (debounce + policy). Plain Python values only: the tensor work was done once for the whole run.

        Runs for every session of every step, so it keeps to locals: the debounce and riskiest-token
        bookkeeping is inline, and each TokenVerdict's instance dict is filled from one literal (keys =
        `_TOKEN_VERDICT_FIELDS`, like `TokenVerdict._fast`), not through the frozen per-field setattr."""
        rd, out = self.guard._readout, []
        sev_keys, cat_keys, risk_names, cat_names = rd.sev_keys, rd.cat_keys, rd.risk_names, rd.cat_names
        sev, cat, unsafe, risk_idx, cat_idx = table.sev, table.cat, table.unsafe, table.risk_idx, table.cat_idx
        start = self.length
        self.length += len(ids)
        d, new = self._debouncer, object.__new__
        r = a - 1
        for tok, part in zip(ids, parts):
            r += 1
            if part is None:
                continue
            probs, cprobs = dict(zip(sev_keys, sev[r])), dict(zip(cat_keys, cat[r]))
            label, category = risk_names[risk_idx[r]], cat_names[cat_idx[r]]
            index = self.n_moderated
            self.n_moderated = index + 1
            u = unsafe[r]
            label0, pos0 = d.label, d.position
            d.push(label)
            dlabel, dpos = d.label, d.position
            if dlabel is not label0 or dpos != pos0:
                self._decided = (probs, cprobs, category)
                if not self.stop and self.guard._response_verdict(self).blocked:
                    self.stop = True  # sticky: once blocked, the response stays cut off
            riskiest = self._riskiest
            if riskiest is None or u > riskiest[0]:
                self._riskiest = (u, probs, cprobs, category)
            tv = new(TokenVerdict)
            tv.__dict__.update({"token_id": tok, "index": index, "position": start + r - a, "part": part,
                                "probs": probs, "category_probs": cprobs, "label": label, "category": category,
                                "response_label": dlabel, "unsafe_position": dpos, "stop": self.stop})
            out.append(tv)
        return out


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
                r._close_nowait()


_NO_TEXT_IDS: tuple[list[int], int] = ([], 0)
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


SEVERITY_KEYS = tuple(s.value for s in (Severity.SAFE, Severity.UNSAFE, Severity.CONTROVERSIAL))


@dataclass
class _Table:
    """One run's response readings as plain Python values, indexed by the run's packed row: severity
    probabilities (in `_Readout.sev_keys` order), category probabilities (`cat_keys` order), P(not Safe)
    = 1 - P(Safe), and the argmax index of the risk and category heads."""

    sev: list[list[float]]
    cat: list[list[float]]
    unsafe: list[float]
    risk_idx: list[int]
    cat_idx: list[int]


class _Readout:
    """Reads a run's packed head probabilities into plain Python values for the verdict records: a few
    tensor ops and conversions per run, instead of tensor slices and conversions per session.

    The values equal what `scoring.severity_probs` / `probs_dict` and the Python reading of a row give:
    every severity key is present (0.0 where the head lacks it), a label listed twice in the config sums
    its columns in index order (in float64, like Python floats), argmax takes the first maximum.
    """

    def __init__(self, labels: StreamLabels, head_sizes: Sequence[int], safe_index: int):
        self.n_risk, self.n_cat, self.safe_index = head_sizes[0], head_sizes[1], safe_index
        self.risk_names, self.cat_names = tuple(labels.risk), tuple(labels.category)
        self.sev_keys, self.sev_cols = _key_columns(labels.risk, SEVERITY_KEYS, 0)
        self.cat_keys, self.cat_cols = _key_columns(labels.category, (), self.n_risk)

    def read(self, probs: torch.Tensor) -> _Table:
        risk, cat = probs[:, :self.n_risk], probs[:, self.n_risk:self.n_risk + self.n_cat]
        unsafe = 1.0 - probs[:, self.safe_index].double()  # float64, as 1.0 - a Python float would be
        return _Table(self.sev_cols(probs).tolist(), self.cat_cols(probs).tolist(), unsafe.tolist(),
                      risk.argmax(-1).tolist(), cat.argmax(-1).tolist())


def _key_columns(names: Sequence, keys: Sequence[str], offset: int) -> tuple[tuple[str, ...], _Columns]:
    """The dict keys for a head's labels (`keys` first, then names in first-seen order) and the packed
    columns that add up to each."""
    cols: dict[str, list[int]] = {k: [] for k in keys}
    for i, name in enumerate(names):
        cols.setdefault(name.value, []).append(offset + i)
    return tuple(cols), _Columns(list(cols.values()))


class _Columns:
    """x -> [rows, len(groups)] where column k is the sum of x's columns groups[k] (0.0 for none)."""

    def __init__(self, groups: list[list[int]]):
        self.groups = groups
        # the usual config, each key one column: a plain gather (float32 -> Python float is exact)
        simple = all(len(g) == 1 for g in groups)
        self.index = torch.tensor([g[0] for g in groups]) if simple else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.index is not None:
            return x.index_select(1, self.index)
        x = x.double()  # sums in float64, in index order: what Python computes from the row's floats
        out = x.new_zeros(x.shape[0], len(self.groups))
        for k, g in enumerate(self.groups):
            for i in g:
                out[:, k] += x[:, i]
        return out


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
        return await self.session.guard._submit_async(self.session, _IDS, _token_ids(ids))

    async def push_text(self, delta: str) -> list[TokenVerdict]:
        """Like `StreamSession.push_text`; the text is tokenized by the step thread, in push order, so a
        large delta never blocks the event loop."""
        s = self.session
        delta = s._accept_text(delta)
        return await s.guard._submit_async(s, _TEXT, delta) if delta else []

    async def flush(self) -> list[TokenVerdict]:
        s = self.session
        return await s.guard._submit_async(s, _FLUSH, None) if s._flush_needed() else []

    async def finish(self) -> Verdict:
        await self.flush()
        self.session.finished = True
        return self.session.verdict()

    def verdict(self) -> Verdict:
        return self.session.verdict()

    async def aclose(self) -> None:
        """Close; never waits for a running step (its slot is freed when the step ends)."""
        self.session._close_nowait()

    def close(self) -> None:
        """Like `aclose`, from sync code on the event loop's thread."""
        self.session._close_nowait()

    async def __aenter__(self) -> AsyncStreamSession:
        return self

    async def __aexit__(self, *exc) -> None:
        self.session._close_nowait()


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
        self._readout = _Readout(labels, self.engine.head_sizes, self.safe_index)
        self._vocab = model.config.vocab_size
        self._queue: list[tuple[StreamSession, int, object, asyncio.Future]] = []  # (session, kind, payload, waiter)
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
        quant = check_quantize(quantize, pick_device(device))
        ckpt = open_checkpoint(model_path(name_or_path))
        dev = pick_device(device)
        dt = resolve_dtype(dtype, dev)
        model, labels = build_stream_model(ckpt, dev, dt)  # CheckpointError unless a Stream checkpoint
        calibrate_loaded(model, "stream", ckpt.path, calibration)
        if quant:
            quantize_model(model, quant)
        return cls(model, load_tokenizer(ckpt.path), labels, **kw)

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
                self._run_one(session, ids, kind=_PROMPT)
            except BaseException:
                session.close()
                raise
        return session

    def push_many(self, pushes: Mapping[StreamSession, Sequence[int]]) -> dict[StreamSession, list[TokenVerdict]]:
        """Push tokens to several sessions in one batched step. All or nothing: if any push is invalid,
        its error is raised and no session moves (so the caller can fix it and retry the batch)."""
        results = self._run_each([(s, _IDS, _token_ids(ids)) for s, ids in pushes.items()], atomic=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return dict(zip(pushes, results))

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
            r = await self._submit_async(None, _OPEN, opening)
            if isinstance(r, StreamSession):
                return AsyncStreamSession(r)
            opening = r  # no free slot yet: the same opening, its prompt already tokenized
            if deadline is not None and time.monotonic() >= deadline:
                raise r.full
            await asyncio.sleep(0.005)

    async def _submit_async(self, session: StreamSession | None, kind: int, payload):
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
                session._close_nowait()
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
                try:
                    results = await asyncio.wrap_future(job)
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
                        r._close_nowait()  # opened for a caller that is gone
                elif isinstance(r, BaseException):
                    fut.set_exception(r)
                else:
                    fut.set_result(r)

    # ------------------------------------------------------------------------------------ internals

    def _prompt_ids(self, messages: str | Sequence[Message], system: str | None, thinking: bool) -> tuple[list[int], int]:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        msgs = check_turn(messages)  # the prompt must have text: an empty one is an InputError, never Safe
        if system is not None:
            if not isinstance(system, str):
                raise InputError(f"system must be text, got {type(system).__name__}")
            if msgs[0]["role"] == "system":
                raise InputError("give the system turn either in messages or as system=, not both")
            msgs = [{"role": "system", "content": system}, *msgs]
        if msgs[-1]["role"] != "user":
            raise InputError("a stream session starts after the user's turn: the last message must be from the user")
        ids = chat_ids(self.tokenizer, msgs, add_generation_prompt=True, enable_thinking=thinking,
                       official_special_tokens=self.official_special_tokens)
        user_end = max(i for i, t in enumerate(ids) if t == IM_END)
        return ids, user_end

    def _check_prompt_fits(self, ids: list[int]) -> None:
        if len(ids) >= self.engine.max_context:
            raise CapacityError(f"the conversation is {len(ids)} tokens, leaving no room for a response in the "
                                f"engine's max_context of {self.engine.max_context}; raise max_context")

    def _run_one(self, session: StreamSession, payload, kind: int = _IDS) -> list[TokenVerdict] | Verdict:
        r = self._run_each([(session, kind, _token_ids(payload) if kind == _IDS else payload)])[0]
        if isinstance(r, BaseException):
            raise r
        return r

    def _run_each(self, items: list[tuple[StreamSession, int, object]], atomic: bool = False) -> list:
        """Validate, submit and run a batch of pushes in one engine run; a result or an error per item.

        Text deltas are tokenized here, in queue order. Every item is checked before any is submitted, so
        a bad push fails alone and leaves its session unchanged; with `atomic`, one bad push fails the
        batch before anything runs. An unexpected error in one session's work fails (and closes) that
        session alone; an engine failure fails every submitted push, and the engine rolls back, so those
        sessions stay as they were. A session closed while the run was in flight gets no results, and its
        slot is freed only after the run. Per session the work is plain Python; the tensor work is done
        once for the run.
        """
        eng = self.engine
        with eng.lock:
            try:
                return self._run_locked(items, atomic)
            finally:
                eng.free_released()  # sessions closed or failed during the run

    def _run_locked(self, items: list[tuple[StreamSession | None, int, object]], atomic: bool) -> list:
        eng = self.engine
        results: list = [None] * len(items)
        # openings first: allocating frees released slots, which must happen before any item is checked
        items = [self._open_item(k, item, results) if item[1] == _OPEN else item for k, item in enumerate(items)]
        todo = []  # (item, session, ids, parts, reader phase after them, slot tokens before them, kind, text)
        batch: dict[int, tuple[int, str | None]] = {}  # slot -> (tokens this batch adds, reader phase after)
        validate = self._validate  # bound once: the loop runs per session
        for k, (s, kind, payload) in enumerate(items):
            if s is None:  # an opening that failed or waits for a slot: its result is set
                continue
            slot = s.slot
            before, phase = batch.get(slot, (0, None))
            ids, text = payload, 0
            try:
                if kind >= _TEXT:
                    if s.closed or s.finished:
                        s._check_open()
                    try:
                        ids, text = s._take_text(payload)
                    except Exception as e:  # the text stream is broken: this session fails alone
                        s._fail(e)
                        raise
                parts, phase = validate(s, ids, before, phase, kind <= _PROMPT)
            except Exception as e:  # InputError / CapacityError: the push fails alone, the session is unchanged
                results[k] = e
                if kind == _OPEN:
                    s._close_nowait()
                continue
            if kind >= _TEXT:
                s._unsent = _NO_TEXT_IDS  # to be judged by this run; back to unsent if the run fails
            batch[slot] = (before + len(ids), phase)
            todo.append((k, s, ids, parts, phase, before, kind, text))
        if atomic and len(todo) < len(items):
            return results
        try:
            for _, s, ids, *_ in todo:
                if ids:
                    eng.submit(s.slot, ids, checked=True)  # validated above
            out = eng.run_packed()
        except Exception as e:  # rolled back: no session moved; text ids wait for the next push
            eng.abort()
            for k, s, ids, *_, kind, text in reversed(todo):
                if kind >= _TEXT:
                    unsent, n = s._unsent
                    s._unsent = (ids + unsent, text + n)
                elif kind == _OPEN:
                    s._close_nowait()
                results[k] = e
            return results
        table: _Table | None = None  # read once for the whole run, when a response push needs it
        rows = out.rows
        for k, s, ids, parts, phase, before, kind, text in todo:
            if s.closed:  # closed during the run: its waiter is gone, its slot is freed after the run
                results[k] = InputError("this stream session is closed")
                continue
            try:
                if kind <= _PROMPT:  # once per session: per-session tensor views are fine here
                    s.length += len(ids)
                    s.prompt = self._prompt_verdict(s, out.heads(s.slot).slice(before, before + len(ids)))
                    results[k] = s if kind == _OPEN else s.prompt
                    continue
                s._reader.phase = phase
                if ids:
                    if table is None:
                        table = self._readout.read(out.probs)
                    results[k] = s._consume(ids, parts, table, rows[s.slot][0] + before)
                else:
                    results[k] = []
                if text:
                    s._judged(text)
            except Exception as e:  # this session alone: the others' results stand
                results[k] = e
                s._fail(e)
        return results

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
            s._check_open()
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
            return ([], s._reader.phase)
        return s._reader.plan(ids, phase)

    def _prompt_verdict(self, s: StreamSession, hp: HeadProbs) -> Verdict:
        L, j = self.labels, s.user_end
        p, cp = hp.query_risk[j], hp.query_category[j]
        label = argmax_label(p, L.query_risk)
        cats = (argmax_label(cp, L.query_category),) if label is not Severity.SAFE else ()
        return self.policy.verdict(label, cats, probs=severity_probs(p, L.query_risk),
                                   category_probs=probs_dict(cp, L.query_category), n_tokens=j + 1)

    def _response_verdict(self, s: StreamSession) -> Verdict:
        """Mirrors `Guard` on finished responses: probabilities at the deciding token, else the riskiest."""
        d = s._debouncer
        label, pos = d.label, d.position
        if pos is not None and s._decided is not None:
            probs, cprobs, category = s._decided
        elif s._riskiest is not None:
            _, probs, cprobs, category = s._riskiest
        else:
            return self.policy.verdict(Severity.SAFE, (), unsafe_position=None, n_tokens=s.length)
        cats = (category,) if label is not Severity.SAFE else ()
        return self.policy.verdict(label, cats, probs=probs, category_probs=cprobs, unsafe_position=pos,
                                   n_tokens=s.length)
