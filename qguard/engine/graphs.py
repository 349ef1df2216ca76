"""Static-shape decode steps for the stream engine, captured as CUDA graphs on GPU.

Why: a decode step (one new token per session) of a 28-layer model launches hundreds of small kernels
(~1,700 in the plain form, ~500 in the fused inference form, counted by benchmarks/op_count.py); at
batch 1 on a GPU the launch overhead, not the math, sets the latency. A CUDA graph replays the whole step
with one launch (the kernels inside still run one after another, so their number still counts). Graphs need fixed shapes and fixed buffer addresses, so a static step:
- reads the rows of slots 0..B-1 (B a power-of-two bucket) over the FULL cache length with a mask,
  instead of the live span: same tensors every replay; rows of idle slots are padding;
- takes its inputs from preallocated buffers (ids, positions, write targets) refilled before replay;
- writes padding rows' keys into the cache's scratch slot, as the eager path does.
Sessions are given the lowest free slot, so live slots stay dense and the bucket stays small.
The mask is built once per step as float 0/-inf (SDPA would otherwise convert a bool mask in every
layer), and the model runs in its fused inference form when it has been fused (the default for loaded
checkpoints): together they cut the kernels a step launches, see benchmarks/op_count.py.

Without CUDA (tests, CPU) the same static step runs eagerly: that is how its exactness is tested here.
"""

from __future__ import annotations

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


class _Bucket:
    def __init__(self, B: int, n_out: int, device: torch.device):
        z = lambda: torch.zeros(B, 1, dtype=torch.long, device=device)  # noqa: E731
        self.ids, self.pos, self.write_slot, self.write_pos = z(), z(), z(), z()
        self.out = torch.zeros(B, n_out, dtype=torch.float32, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None


class DecodeGraphs:
    """Runs one-token-per-session steps through static buckets (CUDA graphs when `capture`)."""

    def __init__(self, model, cache: SlotCache, max_sessions: int, capture: bool, compile_step: bool = False,
                 float_mask: bool = True):
        """`compile_step`: also run the step through torch.compile (inductor fuses the ~20 small kernels
        per layer: norms, RoPE, activations). Experimental; off by default.
        `float_mask=False` passes the bool mask as before (for before/after comparisons)."""
        self.model, self.cache, self.capture = model, cache, capture
        self.step_fn = torch.compile(self._step_tensors, dynamic=True) if compile_step else self._step_tensors
        self.device = next(model.parameters()).device
        self.max_sessions = max_sessions
        hc = model.head_config
        self.n_out = hc.num_risk_level + hc.num_category + hc.num_query_risk_level + hc.num_query_category
        self.keys = torch.arange(cache.max_ctx, device=self.device)
        self.float_mask = float_mask
        # fixed 0-dim buffers for the mask's two values (a captured graph reads them at replay)
        dtype = cache.k[0].dtype
        self.zero = torch.zeros((), dtype=dtype, device=self.device)
        self.neg_inf = torch.full((), float("-inf"), dtype=dtype, device=self.device)
        self.buckets: dict[int, _Bucket] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def bucket_size(self, max_slot: int) -> int:
        return min(1 << max_slot.bit_length(), self.max_sessions)  # smallest power of two > max_slot

    def _step(self, b: _Bucket, B: int) -> None:
        """The static step: fixed shapes, reads/writes only through b's buffers and the cache."""
        b.out.copy_(self.step_fn(b.ids, b.pos, b.write_slot, b.write_pos))

    def _step_tensors(self, ids, pos, write_slot, write_pos) -> torch.Tensor:
        mask = (self.keys[None, :] <= pos)[:, None, None, :]  # [B, 1, 1, max_ctx]
        if self.float_mask:
            mask = torch.where(mask, self.zero, self.neg_inf)  # = SDPA's own conversion, done once per step
        self.cache.begin(StaticPlan(write_slot, write_pos, (0, ids.shape[0]), self.cache.max_ctx, mask))
        h = self.model.model(ids, pos, cache=self.cache)[:, 0]
        self.cache.begin(None)
        o = self.model.heads(h)
        logits = (o.risk_logits, o.category_logits, o.query_risk_logits, o.query_category_logits)
        return torch.cat([x.float().softmax(-1) for x in logits], dim=-1)

    def _get(self, B: int) -> _Bucket:
        b = self.buckets.get(B)
        if b is not None:
            return b
        b = _Bucket(B, self.n_out, self.device)
        b.write_slot.fill_(self.cache.scratch)  # warm-up and capture touch only the scratch slot
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
        self.buckets[B] = b
        return b

    @torch.inference_mode()
    def run(self, rows: list[tuple[int, int, int]]) -> torch.Tensor:
        """rows: (slot, token id, position) for each session; returns packed probs [len(rows), C] on CPU."""
        b, slots = self.load_inputs(rows)
        if b.graph is not None:
            b.graph.replay()
        else:
            self._step(b, b.ids.shape[0])
        return b.out.cpu()[slots]

    def load_inputs(self, rows: list[tuple[int, int, int]]) -> tuple[_Bucket, torch.Tensor]:
        """Fill the input buffers of the bucket that serves `rows`; returns it and the rows' slots."""
        B = self.bucket_size(max(slot for slot, _, _ in rows))
        b = self._get(B)
        # fill the host-side inputs with one indexed write each (no per-row tensor ops)
        slots = torch.tensor([r[0] for r in rows])
        ids = torch.zeros(B, 1, dtype=torch.long)
        pos = torch.zeros(B, 1, dtype=torch.long)
        wslot = torch.full((B, 1), self.cache.scratch, dtype=torch.long)
        ids[slots, 0] = torch.tensor([r[1] for r in rows])
        pos[slots, 0] = torch.tensor([r[2] for r in rows])
        wslot[slots, 0] = slots
        b.ids.copy_(ids)
        b.pos.copy_(pos)
        b.write_slot.copy_(wslot)
        b.write_pos.copy_(pos)
        return b, slots
