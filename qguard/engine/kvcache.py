"""KV caches that plug into `qguard.model.qwen3` attention (the `KVCache` protocol)."""

from __future__ import annotations

import torch


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
        # causal mask rows as windows of one table (see `mask_rows`): 0 then -inf, in the cache's dtype
        self.mask_table = torch.full((2 * max_ctx - 1,), float("-inf"), dtype=dtype, device=device)
        self.mask_table[:max_ctx] = 0

    def mask_rows(self, index: torch.Tensor, span: int) -> torch.Tensor:
        """Float attention mask rows [len(index), span]: 0 (attend) for keys 0..q, -inf after, where
        `index` = max_ctx - 1 - q for each query position q (clamped to max_ctx - 1, where every key of the
        span is visible anyway).

        Window j (length span) of the table is 0 for keys k <= max_ctx - 1 - j and -inf after, so a
        query's row is one window: ONE gather of rows instead of a compare and a select over [queries,
        span] (~8x less host time on CPU at 256 sessions x 1k). The values are exactly the float mask SDPA
        would build from the bool mask `keys <= q` (`qguard.model.qwen3.additive_mask`).
        """
        return self.mask_table.unfold(0, span, 1).index_select(0, index)

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

    Every integer input of the step (write slots and positions, query positions, mask rows and, when given,
    the token ids) is packed on the host into one [k, B, T] int64 tensor (pinned on CUDA) and moved to the
    device with ONE non_blocking copy; the plan's tensors are views of it (`positions` and `ids` are the
    model's inputs). The mask is gathered on the device from the cache's mask table, so no [B, T, span]
    mask crosses to the device.
    """

    def __init__(self, cache: SlotCache, slots: torch.Tensor, past: torch.Tensor, counts: torch.Tensor, T: int,
                 device: torch.device, ids: torch.Tensor | None = None):
        # slots, past, counts: CPU int64 [B], counts >= 1 (every row has a token); ids: CPU int64 [B, T]
        B = slots.shape[0]
        t = torch.arange(T)
        q = past[:, None] + t[None, :]  # [B, T] query positions
        self.span = int((past + counts).max())
        self.single = None
        self.read_range = None
        self.read_slots = None
        if T == 1:  # one token per row: no padding
            write_slot, write_pos = slots[:, None], q
        else:
            valid = t[None, :] < counts[:, None]  # [B, T]
            write_slot = torch.where(valid, slots[:, None], cache.scratch)
            write_pos = torch.where(valid, q, t[None, :])
        last = cache.max_ctx - 1
        parts = [write_slot, write_pos, q, last - q.clamp(max=last)]
        if ids is not None:
            parts.append(ids)
        host = torch.empty((len(parts), B, T), dtype=torch.long, pin_memory=torch.device(device).type == "cuda")
        torch.stack(parts, out=host)
        dev = host.to(device, non_blocking=True)
        self.write_slot, self.write_pos, self.positions = dev[0], dev[1], dev[2]
        self.ids = dev[4] if ids is not None else None
        if B == 1 and int(counts[0]) == T:
            a = int(past[0])
            self.single = (int(slots[0]), a, a + T)
            # T == 1: the one query sees every key, so no mask at all (lets SDPA take its fastest kernel)
            self.mask = None if T == 1 else self._mask(cache, dev[3], B, T)
            return
        lo = int(slots[0])
        if bool((slots == torch.arange(lo, lo + B)).all()):
            self.read_range = (lo, lo + B)
        else:
            self.read_slots = dev[0][:, 0]  # = slots: a row's first token is always real
        self.mask = self._mask(cache, dev[3], B, T)

    def _mask(self, cache: SlotCache, index: torch.Tensor, B: int, T: int) -> torch.Tensor:
        # float 0/-inf, built once: a bool mask would be converted by SDPA in every layer
        return cache.mask_rows(index.reshape(-1), self.span).view(B, T, self.span)[:, None]  # [B, 1, T, S]
