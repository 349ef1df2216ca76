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
            self.k[layer], self.v[layer] = k, v
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
