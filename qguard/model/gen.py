"""Qwen3Guard-Gen's model: a Qwen3 causal LM (backbone + lm_head). Tensors in, logits out.

The guard prompt, the answer grammar and its parser are the Gen family's format (`qguard.families.gen`).
"""

from __future__ import annotations

import torch
from torch import nn

from qguard.model.qwen3 import InferenceFusion, KVCache, Qwen3Config, Qwen3Model


class GenGuardModel(InferenceFusion):
    """Backbone + lm_head. `fuse_for_inference` fuses the backbone (the lm_head is one matmul already)."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.config = cfg
        self.model = Qwen3Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.model(input_ids, positions, cache, attn_mask))

