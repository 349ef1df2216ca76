"""The Qwen3 decoder, written out so that engines can own the KV cache.

We do not reuse transformers' Qwen3Model at run time: its cache classes assume one shared length per
batch, while qguard's stream engine packs many conversations of different lengths into one forward.
The math here is checked against transformers' implementation to 1e-5 in the tests.

Attention takes an optional `cache` (see `KVCache`): the layer hands it the new keys/values and gets
back everything to attend to plus the mask. Without a cache the forward is plain causal attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from qguard.errors import CheckpointError


@dataclass
class Qwen3Config:
    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    attention_bias: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Qwen3Config:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known and v is not None}
        # transformers >= 5 moves rope_theta into rope_parameters; older configs keep rope_scaling.
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if "rope_theta" in rope and "rope_theta" not in kw:
            kw["rope_theta"] = rope["rope_theta"]
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in (None, "default"):
            raise CheckpointError(f"rope type {rope_type!r} is not supported (only the default Qwen3 RoPE)")
        if d.get("use_sliding_window"):
            raise CheckpointError("use_sliding_window=true is not supported: Qwen3Guard uses full attention")
        if "head_dim" not in kw and "hidden_size" in kw and "num_attention_heads" in kw:
            kw["head_dim"] = kw["hidden_size"] // kw["num_attention_heads"]
        cfg = cls(**kw)
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads={cfg.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={cfg.num_key_value_heads}"
            )
        return cfg


class KVCache(Protocol):
    """What an attention layer needs from a cache. Engines implement it (qguard.engine)."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store k, v ([B, KV, T, D]) for `layer`; return (keys, values, attn_mask) to attend over."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like the reference implementation, so bf16 runs match it.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.theta, self.head_dim = cfg.rope_theta, cfg.head_dim
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        exps = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        return 1.0 / (self.theta**exps)

    def reset(self) -> None:
        """Recompute inv_freq in fp32 (after meta-device construction or a dtype cast)."""
        self.inv_freq = self.compute_inv_freq().to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # fp32 angles even when the model runs in bf16: positions up to 32k need the precision.
        freqs = positions.float()[..., None] * self.inv_freq.float()  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=b)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=b)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=b)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=b)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)  # Qwen3: per-head norm before RoPE
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache: KVCache | None, attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v, attn_mask = cache.update(self.layer, k, v)
        causal = cache is None and attn_mask is None
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=causal, enable_gqa=self.n_kv != self.n_heads,
            scale=1.0 / math.sqrt(self.head_dim),
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache, attn_mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    """The decoder stack; parameter names equal the official `model.*` tensors."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> last hidden states [B, T, hidden].

        positions default to 0..T-1. With `cache`, the cache supplies the attention mask; without it,
        `attn_mask` (bool, True = attend, broadcastable to [B, 1, T, T]) or plain causal attention.
        """
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, attn_mask)
        return self.norm(x)


def padded_causal_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """Bool mask [B, 1, T, T] for right-padded rows: causal, and never attending to padding keys.

    Padding query rows attend to key 0 only, so their softmax stays finite; their outputs are ignored.
    """
    idx = torch.arange(T, device=lengths.device)
    causal = idx[None, :] <= idx[:, None]  # [T, T]
    valid_key = idx[None, :] < lengths[:, None]  # [B, T]
    mask = causal[None] & valid_key[:, None, :]
    mask[:, :, 0] = True
    return mask[:, None]
