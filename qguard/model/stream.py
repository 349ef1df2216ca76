"""Qwen3Guard-Stream: a Qwen3 backbone with a response head pair and a query (user) head pair.

Each pair is `pre` (Linear hidden -> g) -> RMSNorm(g) -> {risk_level_head, category_head}, applied to the
last hidden state at every position (official tensor names, no bias, no activation in between).

In the fused inference form (`fuse_for_inference`, see `qguard.model.qwen3.InferenceFusion`) both
pairs' `pre` run as one matmul and each pair's two classifiers as one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qguard.model.qwen3 import (
    FusedLinear,
    InferenceFusion,
    KVCache,
    Qwen3Config,
    Qwen3Model,
    RMSNorm,
    realias_after_load,
)


@dataclass
class StreamHeadConfig:
    guard_inner_size: int = 512
    num_risk_level: int = 3
    num_category: int = 8
    num_query_risk_level: int = 3
    num_query_category: int = 9


@dataclass
class StreamOutput:
    """Logits of the four heads at every position: [B, T, classes]."""

    risk_logits: torch.Tensor
    category_logits: torch.Tensor
    query_risk_logits: torch.Tensor
    query_category_logits: torch.Tensor


class GuardHead(nn.Module):
    """One head pair; `prefix` is "" for the response path and "query_" for the user path."""

    def __init__(self, hidden: int, g: int, n_risk: int, n_cat: int, eps: float):
        super().__init__()
        self.pre = nn.Linear(hidden, g, bias=False)
        self.norm = RMSNorm(g, eps)
        self.risk = nn.Linear(g, n_risk, bias=False)
        self.category = nn.Linear(g, n_cat, bias=False)
        self.logits: FusedLinear | None = None  # risk/category stacked, set by fuse_for_inference

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.norm(self.pre(h))
        return self.risk(z), self.category(z)

    def forward_fused(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From this pair's `pre` output: one-kernel norm, one matmul for both classifiers."""
        out = F.linear(self.norm.fast(z), *self.logits)
        n_risk = self.risk.out_features
        return out[..., :n_risk], out[..., n_risk:]


# official tensor name -> our module path
HEAD_TENSORS = {
    "risk_level_category_pre.weight": "response_head.pre.weight",
    "risk_level_category_layernorm.weight": "response_head.norm.weight",
    "risk_level_head.weight": "response_head.risk.weight",
    "category_head.weight": "response_head.category.weight",
    "query_risk_level_category_pre.weight": "query_head.pre.weight",
    "query_risk_level_category_layernorm.weight": "query_head.norm.weight",
    "query_risk_level_head.weight": "query_head.risk.weight",
    "query_category_head.weight": "query_head.category.weight",
}


class StreamGuardModel(InferenceFusion):
    def __init__(self, cfg: Qwen3Config, heads: StreamHeadConfig):
        super().__init__()
        self.config, self.head_config = cfg, heads
        self.model = Qwen3Model(cfg)
        g, eps = heads.guard_inner_size, cfg.rms_norm_eps
        self.response_head = GuardHead(cfg.hidden_size, g, heads.num_risk_level, heads.num_category, eps)
        self.query_head = GuardHead(cfg.hidden_size, g, heads.num_query_risk_level, heads.num_query_category, eps)
        self.head_pre: FusedLinear | None = None  # both pairs' `pre` stacked, set by fuse_for_inference
        self.register_load_state_dict_post_hook(realias_after_load)

    def _fusion_groups(self) -> Iterator[tuple[nn.Module, str, list[nn.Linear]]]:
        r, q = self.response_head, self.query_head
        yield self, "head_pre", [r.pre, q.pre]
        yield r, "logits", [r.risk, r.category]
        yield q, "logits", [q.risk, q.category]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> StreamOutput:
        return self.heads(self.model(input_ids, positions, cache, attn_mask))

    def heads(self, h: torch.Tensor) -> StreamOutput:
        """Apply both head pairs to hidden states already computed (engines select positions first)."""
        if self.fused and not torch.is_grad_enabled():
            z = F.linear(h, *self.head_pre)
            g = self.head_config.guard_inner_size
            risk, cat = self.response_head.forward_fused(z[..., :g])
            qrisk, qcat = self.query_head.forward_fused(z[..., g:])
            return StreamOutput(risk, cat, qrisk, qcat)
        risk, cat = self.response_head(h)
        qrisk, qcat = self.query_head(h)
        return StreamOutput(risk, cat, qrisk, qcat)

    @staticmethod
    def official_to_local(name: str) -> str:
        return HEAD_TENSORS.get(name, name)
