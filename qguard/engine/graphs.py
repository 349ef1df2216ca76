"""Static-shape decode steps for the stream engine, captured as CUDA graphs on GPU.

Why: a decode step (one new token per session) of a 28-layer model launches hundreds of small kernels
(~1,700 in the plain form, ~500 in the fused inference form, counted by benchmarks/op_count.py); at
batch 1 on a GPU the launch overhead, not the math, sets the latency. A CUDA graph replays the whole step
with one launch (the kernels inside still run one after another, so their number still counts). Graphs need fixed shapes and fixed buffer addresses, so a static step:
- reads the rows of slots 0..B-1 (B a power-of-two bucket) over the first S keys of the cache with a
  mask, S a power-of-two span bucket above the step's last position (at least MIN_SPAN, at most the
  cache length), instead of the exact live span: same tensors every replay of a (B, S) graph; rows of
  idle slots are padding. The span bucket keeps attention proportional to the conversations' length
  rather than to max_context (a 4k-token cache serving 300-token chats reads 512 keys per row, not 4k);
- takes its inputs from one preallocated buffer per bucket (token ids | positions | write slots), refilled
  before replay by ONE host->device copy (from a pinned staging buffer on CUDA, non_blocking);
- writes padding rows' keys into the cache's scratch slot, as the eager path does.
Sessions are given the lowest free slot, so live slots stay dense and the bucket stays small.
The mask is built once per step as float 0/-inf (SDPA would otherwise convert a bool mask in every
layer), as one row gather from the cache's mask table (`SlotCache.mask_rows`), and the model runs in its
fused inference form when it has been fused (the default for loaded checkpoints): together they cut the
kernels a step launches, see benchmarks/op_count.py.

Host work per step (what the GPU waits for between replays): the inputs are packed into one int64
`array` in Python (no `torch.tensor(list)`, no per-row tensor op), copied once to the device, the graph is
replayed, and the live rows of the output come back in one device->host copy.

Without CUDA (tests, CPU) the same static step runs eagerly: that is how its exactness is tested here.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

from qguard.engine.kvcache import SlotCache


@dataclass
class StaticPlan:
    """A `StepPlan` whose tensors live in fixed buffers (see `SlotCache.update`)."""

    write_slot: torch.Tensor  # [B, 1] slot per row (scratch for padding rows)
    write_pos: torch.Tensor  # [B, 1] position per row
    read_range: tuple[int, int]
    span: int
    mask: torch.Tensor | None = None
    single: None = None


MIN_SPAN = 64  # smallest span bucket: fewer graphs for the first tokens of a conversation


class _Bucket:
    def __init__(self, B: int, span: int, n_out: int, scratch: int, device: torch.device):
        # all inputs of the step in ONE buffer, so that refilling them is one copy: rows are the token ids,
        # the positions (also where each row writes its key: one token per row) and the write slots; each
        # row padded to a multiple of 8 (64 bytes), so every view stays aligned for compiled kernels
        self.width = -(-B // 8) * 8
        self.inputs = torch.zeros(3, self.width, dtype=torch.long, device=device)
        self.inputs[2].fill_(scratch)  # warm-up and capture touch only the scratch slot
        self.ids, self.pos, self.write_slot = (self.inputs[i, :B].view(B, 1) for i in range(3))
        self.write_pos = self.pos
        self.out = torch.zeros(B, n_out, dtype=torch.float32, device=device)
        self.span = span  # keys 0..span-1 are read; every row's position is below it
        self.graph: torch.cuda.CUDAGraph | None = None


class DecodeGraphs:
    """Runs one-token-per-session steps through static buckets (CUDA graphs when `capture`)."""

    def __init__(self, model, cache: SlotCache, max_sessions: int, capture: bool, compile_step: bool = False,
                 float_mask: bool = True, span_buckets: bool = True):
        """`compile_step`: also run the step through torch.compile (inductor fuses the ~20 small kernels
        per layer: norms, RoPE, activations). Experimental; off by default.
        `float_mask=False` passes the bool mask as before, `span_buckets=False` reads the whole cache
        (both for before/after comparisons)."""
        self.model, self.cache, self.capture = model, cache, capture
        self.step_fn = torch.compile(self._step_tensors, dynamic=True) if compile_step else self._step_tensors
        self.device = next(model.parameters()).device
        self.max_sessions = max_sessions
        hc = model.head_config
        self.n_out = hc.num_risk_level + hc.num_category + hc.num_query_risk_level + hc.num_query_category
        self.keys = torch.arange(cache.max_ctx, device=self.device)
        self.float_mask, self.span_buckets = float_mask, span_buckets
        self.buckets: dict[tuple[int, int], _Bucket] = {}  # (B, span) -> bucket
        self.last: _Bucket | None = None  # the bucket of the latest step (for profiling)
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        # host side of the inputs: a pinned staging buffer on CUDA (so the one copy per step can be
        # non_blocking), reused every step once the event says the previous copy has read it
        self.pinned = self.device.type == "cuda"
        width = -(-max_sessions // 8) * 8  # the widest bucket's row (see _Bucket)
        self.host = torch.zeros(3 * width, dtype=torch.long, pin_memory=self.pinned)
        self.copied = torch.cuda.Event() if self.pinned else None
        self.dense = tuple(range(max_sessions))  # rows for slots 0..n-1, in order: the common case
        self.zeros = array("q", bytes(8 * width))
        self.scratch = array("q", [cache.scratch]) * width

    def bucket_size(self, max_slot: int) -> int:
        return min(1 << max_slot.bit_length(), self.max_sessions)  # smallest power of two > max_slot

    def span_size(self, max_pos: int) -> int:
        if not self.span_buckets:
            return self.cache.max_ctx
        return min(max(1 << max_pos.bit_length(), MIN_SPAN), self.cache.max_ctx)  # a power of two > max_pos

    def _step(self, b: _Bucket, B: int) -> None:
        """The static step: fixed shapes, reads/writes only through b's buffers and the cache."""
        b.out.copy_(self.step_fn(b.ids, b.pos, b.write_slot, b.write_pos, b.span))

    def _step_tensors(self, ids, pos, write_slot, write_pos, span: int) -> torch.Tensor:
        if self.float_mask:  # = SDPA's own conversion of the bool mask, done once per step
            mask = self.cache.mask_rows((self.cache.max_ctx - 1) - pos.view(-1), span)
            mask = mask[:, None, None, :]  # [B, 1, 1, span]
        else:
            mask = (self.keys[None, :span] <= pos)[:, None, None, :]
        self.cache.begin(StaticPlan(write_slot, write_pos, (0, ids.shape[0]), span, mask))
        h = self.model.model(ids, pos, cache=self.cache)[:, 0]
        self.cache.begin(None)
        o = self.model.heads(h)
        logits = (o.risk_logits, o.category_logits, o.query_risk_logits, o.query_category_logits)
        return torch.cat([x.float().softmax(-1) for x in logits], dim=-1)

    def _get(self, B: int, span: int) -> _Bucket:
        b = self.buckets.get((B, span))
        if b is not None:
            return b
        b = _Bucket(B, span, self.n_out, self.cache.scratch, self.device)
        if self.capture:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(2):  # warm-up: lazy init (cuBLAS handles, kernels) must not be captured
                    self._step(b, B)
            torch.cuda.current_stream().wait_stream(side)
            b.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(b.graph, pool=self.pool), torch.inference_mode():
                self._step(b, B)
        self.buckets[B, span] = b
        return b

    @torch.inference_mode()
    def run(self, rows: list[tuple[int, int, int]]) -> torch.Tensor:
        """rows: (slot, token id, position) for each session; returns packed probs [len(rows), C] on CPU
        (a new tensor: the bucket's output buffer is overwritten by the next step)."""
        b, slots = self.load_inputs(rows)
        if b.graph is not None:
            b.graph.replay()
        else:
            self._step(b, b.ids.shape[0])
        n = len(slots)
        if slots == self.dense[:n]:  # the rows are the first n of the bucket: copy just those
            return b.out[:n].to("cpu", copy=True)
        return b.out.cpu().index_select(0, torch.frombuffer(array("q", slots), dtype=torch.long))

    def load_inputs(self, rows: list[tuple[int, int, int]]) -> tuple[_Bucket, tuple[int, ...]]:
        """Fill the input buffer of the bucket that serves `rows` with one host->device copy; returns the
        bucket and the rows' slots."""
        slots, ids, pos = zip(*rows)
        n = len(slots)
        B = self.bucket_size(max(slots))
        b = self.last = self._get(B, self.span_size(max(pos)))
        W = b.width
        if slots == self.dense[:n]:  # padding rows after the live ones: id 0, position 0, scratch slot
            pad = W - n
            a = array("q", ids)
            a += self.zeros[:pad]
            a.extend(pos)
            a += self.zeros[:pad]
            a.extend(slots)
            a += self.scratch[:pad]
        else:  # sparse slots (a session in the middle closed): place each row at its slot
            a = array("q", bytes(16 * W))
            a += self.scratch[:W]
            for s, i, p in rows:
                a[s], a[W + s], a[2 * W + s] = i, p, s
        src = torch.frombuffer(a, dtype=torch.long)
        dst = b.inputs.view(-1)
        if self.pinned:
            self.copied.synchronize()  # the previous step's copy has read the staging buffer
            host = self.host[:3 * W]
            host.copy_(src)
            dst.copy_(host, non_blocking=True)
            self.copied.record(torch.cuda.current_stream(self.device))
        else:
            dst.copy_(src)
        return b, slots
