"""KV caches that plug into `qguard.model.qwen3` attention (the `KVCache` protocol)."""

from __future__ import annotations

import torch

from qguard.model.qwen3 import additive_mask


class ContiguousCache:
    """One growing cache for a batch of equal-length rows (batch 1 decoding, prefix reuse).

    Appends by concatenation: simple and exact; the batched stream engine uses a slot cache instead.
    """

    def __init__(self, n_layers: int):
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        past = 0 if self.k[layer] is None else self.k[layer].shape[2]
        if self.k[layer] is None:
            # own copies: the fused model's k and v are views of its whole QKV output, which a kept
            # view would keep alive (3-4x the cache's memory)
            self.k[layer], self.v[layer] = k.contiguous(), v.contiguous()
        else:
            self.k[layer] = torch.cat([self.k[layer], k], dim=2)
            self.v[layer] = torch.cat([self.v[layer], v], dim=2)
        T, S = k.shape[2], past + k.shape[2]
        # new query t (absolute past+t) sees keys 0..past+t
        mask = torch.arange(S, device=k.device)[None, :] <= (past + torch.arange(T, device=k.device))[:, None]
        return self.k[layer], self.v[layer], mask

    def expand(self, batch: int) -> ContiguousCache:
        """A view of a batch-1 cache repeated `batch` times (shared prefix for a batch of suffixes)."""
        out = ContiguousCache(len(self.k))
        out.k = [None if t is None else t.expand(batch, -1, -1, -1) for t in self.k]
        out.v = [None if t is None else t.expand(batch, -1, -1, -1) for t in self.v]
        return out


class SlotCache:
    """A static K/V cache for many sessions: per layer [max_sessions + 1, kv_heads, max_ctx, head_dim].

    Why this design (and not transformers' caches, a growing concat, or a paged pool):
    - transformers' DynamicCache/StaticCache keep one shared length per batch; the stream engine packs
      sessions of different lengths that join and leave at any step, so each row needs its own length.
    - Preallocated, fixed-address tensors bound memory up front (max_sessions x max_ctx, checked when the
      engine is built, never mid-stream) and are what CUDA graphs need: a captured step reads the same
      buffers every time. Appending writes in place (no torch.cat copy of the whole prefix per token).
    - A paged pool (vLLM) wins when contexts vary widely and memory is scarce, but needs a paged attention
      kernel; plain SDPA over a slot tensor is exact on CPU and fast on GPU for guard-sized contexts.
    Row `max_sessions` is a scratch slot: padded query positions write there, so a step never branches on
    which rows are padding.

    The engine sets a `StepPlan` (`begin`) before each forward; `update` then writes the new keys/values
    of every row at its own positions and returns the keys to attend over with a per-row mask.
    """

    def __init__(self, n_layers: int, max_sessions: int, n_kv: int, max_ctx: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (max_sessions + 1, n_kv, max_ctx, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_sessions, self.max_ctx, self.scratch = max_sessions, max_ctx, max_sessions
        self.plan: StepPlan | None = None

    @staticmethod
    def nbytes(n_layers: int, max_sessions: int, n_kv: int, max_ctx: int, head_dim: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * n_layers * (max_sessions + 1) * n_kv * max_ctx * head_dim * elem

    def begin(self, plan: StepPlan) -> None:
        self.plan = plan

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Duplicate the first `length` positions of slot `src` into slot `dst` (forking a session)."""
        for t in (*self.k, *self.v):
            t[dst, :, :length].copy_(t[src, :, :length])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        p = self.plan
        ck, cv = self.k[layer], self.v[layer]
        if p.single is not None:  # one row, no padding: plain slice writes and views (fast batch-1 path)
            s, a, b = p.single
            ck[s, :, a:b].copy_(k[0])
            cv[s, :, a:b].copy_(v[0])
            return ck[s:s + 1, :, :b], cv[s:s + 1, :, :b], p.mask
        ck[p.write_slot, :, p.write_pos] = k.transpose(1, 2)
        cv[p.write_slot, :, p.write_pos] = v.transpose(1, 2)
        if p.read_range is not None:  # rows are consecutive slots: attend over a view, no gather copy
            lo, hi = p.read_range
            return ck[lo:hi, :, :p.span], cv[lo:hi, :, :p.span], p.mask
        return ck[p.read_slots, :, :p.span], cv[p.read_slots, :, :p.span], p.mask


class StepPlan:
    """Where one batched forward writes and reads in a `SlotCache`.

    Rows are sessions, right-padded to T query tokens. Row r holds `counts[r]` new tokens at positions
    past[r] .. past[r] + counts[r] - 1. Query t of row r sees keys 0 .. past[r] + t; padded queries write to
    the scratch slot and their outputs are dropped by the engine.
    """

    def __init__(self, cache: SlotCache, slots: torch.Tensor, past: torch.Tensor, counts: torch.Tensor, T: int,
                 device: torch.device):
        # slots, past, counts: CPU int64 [B]
        B = slots.shape[0]
        t = torch.arange(T)
        valid = t[None, :] < counts[:, None]  # [B, T]
        self.span = int((past + counts).max())
        self.single = None
        self.read_range = None
        self.read_slots = None
        if B == 1 and int(counts[0]) == T:
            a = int(past[0])
            self.single = (int(slots[0]), a, a + T)
            # T == 1: the one query sees every key, so no mask at all (lets SDPA take its fastest kernel)
            self.mask = None if T == 1 else self._mask(past, t, device, cache.k[0].dtype)
            return
        self.write_slot = torch.where(valid, slots[:, None], cache.scratch).to(device)
        self.write_pos = torch.where(valid, past[:, None] + t[None, :], t[None, :]).to(device)
        lo = int(slots[0])
        if bool((slots == torch.arange(lo, lo + B)).all()):
            self.read_range = (lo, lo + B)
        else:
            self.read_slots = slots.to(device)
        self.mask = self._mask(past, t, device, cache.k[0].dtype)

    def _mask(self, past: torch.Tensor, t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        keys = torch.arange(self.span)
        mask = keys[None, None, :] <= (past[:, None] + t[None, :])[:, :, None]  # [B, T, S]
        # float 0/-inf, built once: a bool mask would be converted by SDPA in every layer
        return additive_mask(mask[:, None].to(device), dtype)
