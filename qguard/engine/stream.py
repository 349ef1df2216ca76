"""The batched streaming engine for Qwen3Guard-Stream: slots, scheduling, one forward per step.

The engine owns the KV cache (a `SlotCache`) and the schedule; the model stays pure math. Each session
owns one cache slot. Callers `submit` token ids to a slot; `step` packs the pending tokens of every
session into one right-padded batch ([rows, T]) with per-row positions, runs the decoder once over it
(each token is one incremental step: the prefix is never recomputed) and applies the guard heads to the
new positions only. `run` steps until nothing is pending.

Scheduling: every session with pending tokens takes part in each step, with at most `prefill_chunk` of
its tokens (so a long prompt cannot stall live streams for long). Rows are grouped by the power of two
at or above their pending count, one forward per group: the common case (every session pushing one
token) is a single forward, and a 500-token prefill never pads 255 one-token rows to 500.

Output: each forward's head probabilities come back to the host as ONE packed [tokens, classes] tensor
(one device->host copy per forward); sessions then only record which rows are theirs. `run_packed`
returns every token of the run in one tensor with a row range per slot, so callers read a whole batch
with a few tensor ops and one conversion to Python instead of per-session slices; `run` cuts that into
per-slot `HeadProbs` views for callers that want tensors per session.

The verdict logic (reading positions, debounce, policy) lives in `qguard.families.stream`, the sessions
in `qguard.runtime.stream`; this module returns probabilities only.
"""

from __future__ import annotations

import threading
from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import itemgetter

import torch

from qguard.engine.graphs import DecodeGraphs
from qguard.engine.kvcache import SlotCache, StepPlan
from qguard.errors import CapacityError, InputError
from qguard.model.stream import StreamGuardModel


@dataclass
class HeadProbs:
    """Softmax outputs of the four heads for consecutive tokens of one session (float32, CPU)."""

    risk: torch.Tensor  # [n, n_risk]
    category: torch.Tensor  # [n, n_cat]
    query_risk: torch.Tensor  # [n, n_qrisk]
    query_category: torch.Tensor  # [n, n_qcat]

    def __len__(self) -> int:
        return self.risk.shape[0]

    @staticmethod
    def cat(parts: Sequence[HeadProbs]) -> HeadProbs:
        if len(parts) == 1:
            return parts[0]
        return HeadProbs(*(torch.cat([getattr(p, f) for p in parts]) for f in
                           ("risk", "category", "query_risk", "query_category")))

    def slice(self, a: int, b: int) -> HeadProbs:
        return HeadProbs(self.risk[a:b], self.category[a:b], self.query_risk[a:b], self.query_category[a:b])


@dataclass
class PackedProbs:
    """Head probabilities of every token one engine run processed, all sessions in one tensor.

    `probs` is [tokens, sum(head_sizes)] float32 on the CPU, columns risk | category | query_risk |
    query_category; slot s's tokens, in order, are the consecutive rows `rows[s]` = (start, end).
    """

    probs: torch.Tensor
    rows: dict[int, tuple[int, int]]
    head_sizes: tuple[int, ...]

    def heads(self, slot: int) -> HeadProbs:
        """Slot's rows as per-head views (per-session tensor ops: for callers outside the hot path)."""
        a, b = self.rows[slot]
        return HeadProbs(*self.probs[a:b].split(self.head_sizes, dim=-1))


@dataclass
class EngineStats:
    steps: int = 0  # calls of step() that ran at least one forward
    forwards: int = 0  # batched decoder forwards
    tokens: int = 0  # tokens processed
    padded_tokens: int = 0  # rows x T over all forwards (tokens + padding)


@dataclass
class _Slot:
    length: int = 0  # tokens already in the cache
    pending: list[int] = field(default_factory=list)
    out: list[tuple[int, int]] = field(default_factory=list)  # row ranges in the run's output not yet collected


_Row = tuple[int, int, _Slot]  # (slot, tokens this step, its state): one session's row of a forward


def _long(values: list[int]) -> torch.Tensor:
    """A CPU int64 tensor of Python ints; array's C conversion is several times faster than
    torch.tensor(list), which matters for the per-step index tensors of hundreds of sessions."""
    return torch.frombuffer(array("q", values), dtype=torch.long) if values else torch.zeros(0, dtype=torch.long)


class StreamEngine:
    """Serve many Qwen3Guard-Stream sessions from one model with a bounded, preallocated KV cache.

    Thread-safe: every public method takes the engine lock, so sync callers on several threads and the
    asyncio step loop can share one engine. `release_later` is the one exception (no lock, for event
    loops and finalizers); a slot released that way is freed only when no run can still use it: at the
    end of a run (after its outputs are collected), at `free_released`, `allocate` or `active`, never
    between a `submit` and the collection of its outputs.
    """

    def __init__(self, model: StreamGuardModel, max_sessions: int = 8, max_context: int = 2048,
                 prefill_chunk: int = 512, static_decode: bool | None = None, compile_step: bool = False):
        """`static_decode`: run one-token-per-session steps as static-shape steps, captured as CUDA graphs
        on GPU (`qguard.engine.graphs`). Default: on for CUDA devices, off elsewhere."""
        cfg = model.config
        if max_sessions < 1:
            raise InputError(f"max_sessions must be at least 1, got {max_sessions}")
        if not 1 <= max_context <= cfg.max_position_embeddings:
            raise InputError(f"max_context must be in 1..{cfg.max_position_embeddings} (the model's context), "
                             f"got {max_context}")
        if prefill_chunk < 1:
            raise InputError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_sessions, self.max_context = max_sessions, max_context
        self.prefill_chunk = min(prefill_chunk, max_context)
        try:
            self.cache = SlotCache(cfg.num_hidden_layers, max_sessions, cfg.num_key_value_heads, max_context,
                                   cfg.head_dim, self.dtype, self.device)
        except (RuntimeError, MemoryError) as e:  # torch raises RuntimeError / OutOfMemoryError
            need = SlotCache.nbytes(cfg.num_hidden_layers, max_sessions, cfg.num_key_value_heads, max_context,
                                    cfg.head_dim, self.dtype)
            raise CapacityError(f"cannot allocate the KV cache for {max_sessions} sessions x {max_context} tokens "
                                f"({need / 2**30:.1f} GiB): lower max_sessions or max_context ({e})") from None
        if static_decode is None:
            static_decode = self.device.type == "cuda"
        self.graphs = (DecodeGraphs(model, self.cache, max_sessions, capture=self.device.type == "cuda",
                                    compile_step=compile_step) if static_decode else None)
        hc = model.head_config
        self.head_sizes = (hc.num_risk_level, hc.num_category, hc.num_query_risk_level, hc.num_query_category)
        self.chunks: list[torch.Tensor] = []  # packed outputs of the forwards since the last collection
        self.n_rows = 0  # rows in `chunks`
        self.slots: dict[int, _Slot] = {}
        self.free_slots = list(range(max_sessions))
        self.released: deque[int] = deque()  # slots closed without the lock, freed when no run uses them
        self.lock = threading.RLock()
        self.stats = EngineStats()

    # ------------------------------------------------------------------------------------ slots

    @property
    def active(self) -> int:
        """Sessions holding a slot."""
        with self.lock:
            self._drain_released()
            return len(self.slots)

    def allocate(self) -> int:
        """Reserve a slot for a new session; CapacityError when all are in use."""
        with self.lock:
            self._drain_released()
            if not self.free_slots:
                raise CapacityError(f"all {self.max_sessions} stream sessions are in use; close a session "
                                    "or build the engine with a larger max_sessions")
            # lowest free slot first keeps live slots dense, so steps read a slice instead of a gather
            slot = min(self.free_slots)
            self.free_slots.remove(slot)
            self.slots[slot] = _Slot()
            return slot

    def free(self, slot: int) -> None:
        with self.lock:
            if self.slots.pop(slot, None) is not None:
                self.free_slots.append(slot)

    def release_later(self, slot: int) -> None:
        """Free `slot` once no run uses it (see the class doc). Never takes the lock: safe from an event
        loop while a run is in progress on another thread, and from finalizers."""
        self.released.append(slot)

    def free_released(self) -> None:
        """Free the slots given to `release_later` (the caller's run, if any, is over)."""
        with self.lock:
            self._drain_released()

    def _drain_released(self) -> None:
        while self.released:
            self.free(self.released.popleft())

    def length(self, slot: int) -> int:
        """Tokens of `slot` in the cache or pending."""
        s = self._slot(slot)
        return s.length + len(s.pending)

    def fork(self, slot: int) -> int:
        """A new slot holding a copy of `slot`'s processed context (for several continuations of one prefix)."""
        with self.lock:
            src = self._slot(slot)
            if src.pending:
                raise InputError("cannot fork a session with unprocessed tokens; run the engine first")
            new = self.allocate()
            self.cache.copy_slot(slot, new, src.length)
            self.slots[new].length = src.length
            return new

    def _slot(self, slot: int) -> _Slot:
        s = self.slots.get(slot)
        if s is None:
            raise InputError(f"stream session slot {slot} is closed")
        return s

    # ------------------------------------------------------------------------------------ work

    def submit(self, slot: int, ids: Sequence[int], *, checked: bool = False) -> None:
        """Queue token ids for `slot`; CapacityError if the session would outgrow max_context.

        `checked`: the caller has already validated the ids (the session layer does, for every push), so
        they are not scanned a second time."""
        with self.lock:
            s = self.slots.get(slot) or self._slot(slot)  # runs per session and push: no call when open
            total = s.length + len(s.pending) + len(ids)
            if total > self.max_context:
                raise CapacityError(f"stream session would reach {total} tokens, over the engine's max_context of "
                                    f"{self.max_context}; close it or build the engine with a larger max_context")
            if not checked:
                vocab = self.model.config.vocab_size
                bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < vocab]
                if bad:
                    raise InputError(f"token ids must be integers in 0..{vocab - 1}, got {bad[:5]}")
            s.pending.extend(ids)

    def run(self) -> dict[int, HeadProbs]:
        """Step until no session has pending tokens; the head outputs of every processed token, per slot."""
        out = self.run_packed()
        return {slot: out.heads(slot) for slot in out.rows}

    def run_packed(self) -> PackedProbs:
        """Like `run`, but every slot's outputs in one packed tensor (no per-session tensor ops).

        If a forward fails, the run is rolled back (`abort`) and the error raised: every slot is as it was
        before the tokens pending at the start of the run were submitted."""
        with self.lock:
            try:
                while self.step():
                    pass
                out = self._collect()
            except BaseException:
                self.abort()
                raise
            self._drain_released()  # after the collection: a slot released mid-run still got its rows
            return out

    def abort(self) -> None:
        """Drop every pending token and every output not collected yet; slots go back to the length they
        had at the last collection (the cache positions past it are never read, and get overwritten)."""
        with self.lock:
            for s in self.slots.values():
                s.length -= sum(b - a for a, b in s.out)
                s.out.clear()
                s.pending.clear()
            self.chunks, self.n_rows = [], 0

    def _collect(self) -> PackedProbs:
        """The outputs of the steps since the last collection, each slot's rows made consecutive."""
        chunks, self.chunks, self.n_rows = self.chunks, [], 0
        # slot -> its row range, or its list of ranges when its tokens came from several forwards; each
        # slot's `out` list is emptied in place (no new list per session and step)
        rows: dict = {}
        multi = False
        for slot, s in self.slots.items():
            out = s.out
            if out:
                if len(out) == 1:  # the common case: one forward per slot
                    rows[slot] = out[0]
                else:
                    rows[slot], multi = out.copy(), True
                out.clear()
        if len(chunks) == 1:
            probs = chunks[0]
        else:
            probs = torch.cat(chunks) if chunks else torch.zeros(0, sum(self.head_sizes))
        if not multi:
            return PackedProbs(probs, rows, self.head_sizes)
        # a slot's tokens came from several forwards (chunked prefill): one gather makes them consecutive
        order: list[int] = []
        for slot, p in rows.items():
            start = len(order)
            for a, b in ([p] if isinstance(p, tuple) else p):
                order.extend(range(a, b))
            rows[slot] = (start, len(order))
        return PackedProbs(probs.index_select(0, _long(order)), rows, self.head_sizes)

    def step(self) -> bool:
        """One scheduling step over all sessions with pending tokens; False if there was nothing to do.
        (Released slots are not freed here: a run in progress may still read their outputs.)"""
        with self.lock:
            chunk = self.prefill_chunk
            groups: dict[int, list[_Row]] = {1: []}
            decode = groups[1]
            for slot, s in self.slots.items():
                if not s.pending:
                    continue
                n = len(s.pending)
                if n == 1:  # the common case (one new token), kept cheap: it runs for every live session
                    decode.append((slot, 1, s))
                else:
                    n = min(n, chunk)
                    groups.setdefault(min(1 << (n - 1).bit_length(), chunk), []).append((slot, n, s))
            if not decode:
                del groups[1]
            if not groups:
                return False
            for T, group in groups.items():
                group.sort(key=itemgetter(0))  # ascending slots: consecutive slots read the cache as a view
                if T == 1 and self.graphs is not None:
                    self._static_forward(group)
                else:
                    self._forward(group, T)
            self.stats.steps += 1
            return True

    @torch.inference_mode()
    def _forward(self, group: list[_Row], T: int) -> None:
        B = len(group)
        slots = _long([slot for slot, _, _ in group])
        counts = _long([n for _, n, _ in group])
        past = _long([s.length for _, _, s in group])
        flat: list[int] = []  # the ids, right-padded to T: one tensor for all rows, not a write per row
        for _, n, s in group:
            flat += s.pending[:n]
            if n < T:
                flat += [0] * (T - n)
        # the plan moves ids, positions, write targets and mask rows to the device in one copy
        plan = StepPlan(self.cache, slots, past, counts, T, self.device, ids=_long(flat).view(B, T))
        self.cache.begin(plan)
        try:
            h = self.model.model(plan.ids, plan.positions, cache=self.cache)
        finally:
            self.cache.begin(None)
        h = h.reshape(B * T, -1)
        if B * T != sum(n for _, n, _ in group):
            # real tokens only, row-major so each session's tokens stay consecutive; the index is built on
            # the CPU (a boolean mask on the device would force a sync to learn the output size)
            keep = (torch.arange(T)[None, :] < counts[:, None]).flatten().nonzero().squeeze(1)
            h = h.index_select(0, keep.to(self.device))
        o = self.model.heads(h)
        logits = (o.risk_logits, o.category_logits, o.query_risk_logits, o.query_category_logits)
        # one device->host copy for the whole batch; sessions only record their row ranges
        packed = torch.cat([x.float().softmax(-1) for x in logits], dim=-1).cpu()
        self._deliver(group, packed, B * T)

    def _static_forward(self, group: list[_Row]) -> None:
        packed = self.graphs.run([(slot, s.pending[0], s.length) for slot, _, s in group])
        self._deliver(group, packed, self.graphs.bucket_size(group[-1][0]))

    def _deliver(self, group: list[_Row], packed: torch.Tensor, padded: int) -> None:
        """Keep the packed head probabilities; each session records its row range and advances its
        cache length (plain ints per session: no tensor op)."""
        self.chunks.append(packed)
        start = first = self.n_rows
        for _, n, s in group:
            s.out.append((start, start + n))
            del s.pending[:n]
            s.length += n
            start += n
        self.n_rows = start
        self.stats.forwards += 1
        self.stats.tokens += start - first
        self.stats.padded_tokens += padded
