"""The Qwen3 decoder, written out so that engines can own the KV cache.

We do not reuse transformers' Qwen3Model at run time: its cache classes assume one shared length per
batch, while qguard's stream engine packs many conversations of different lengths into one forward.
The math here is checked against transformers' implementation to 1e-5 in the tests.

Attention takes an optional `cache` (see `KVCache`): the layer hands it the new keys/values and gets
back everything to attend to plus the mask. Without a cache the forward is plain causal attention.

Two forms of the same math: the plain form (official modules, one op per formula step, what training
differentiates) and the fused inference form (`fuse_for_inference`: one QKV and one gate/up matmul,
`F.rms_norm`, RoPE on q and k at once). A decode step is launch-bound on a GPU, so the fused form exists
to launch fewer kernels; `benchmarks/op_count.py` counts them. See `InferenceFusion` for the design.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from qguard.errors import CheckpointError, InputError


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

    def fast(self, x: torch.Tensor) -> torch.Tensor:
        """The same norm as one op (`F.rms_norm`: a single fused kernel on CUDA, instead of ~8 launches).

        fp32: equal to `forward` within fp32 rounding (same formula; the CUDA kernel reduces in another
        order). bf16: both normalise in fp32, but `forward` rounds x_normed to bf16 BEFORE multiplying by
        the weight (the reference's double rounding), while `F.rms_norm` multiplies in fp32 and rounds
        once, so results differ by up to ~1 bf16 ulp. The plain form stays the reference (training).
        """
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.theta, self.head_dim = cfg.rope_theta, cfg.head_dim
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)
        self.register_buffer("signed_inv_freq", self.compute_signed_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        exps = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        return 1.0 / (self.theta**exps)

    def compute_signed_inv_freq(self) -> torch.Tensor:
        """[-inv_freq, inv_freq] over the full head dim: angles whose first half is negated (see `signed`)."""
        inv = self.compute_inv_freq()
        return torch.cat((-inv, inv))

    def reset(self) -> None:
        """Recompute inv_freq in fp32 (after meta-device construction or a dtype cast)."""
        self.inv_freq = self.compute_inv_freq().to(self.inv_freq.device)
        self.signed_inv_freq = self.compute_signed_inv_freq().to(self.signed_inv_freq.device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # fp32 angles even when the model runs in bf16: positions up to 32k need the precision.
        freqs = positions.float()[..., None] * self.inv_freq.float()  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def signed(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin for `apply_rope_fused`, [B, T, 1, D] (broadcast over heads).

        rotate_half(x) * sin == swap_halves(x) * [-sin, sin]. Negating the first half's angles gives that
        sign for free: cos is even and sin odd (bit-exact in fp32), so these tables equal the reference's
        cos and sin with rotate_half's sign moved into sin, and no per-layer negation is needed.
        """
        emb = positions.float()[..., None, None] * self.signed_inv_freq.float()
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    return x * cos + rotate_half(x) * sin


def apply_rope_fused(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE with the tables of `RotaryEmbedding.signed`: 3 kernels (mul, cat, addcmul) instead of 5.

    x: [B, T, heads, D]. Products are the reference's exactly; addcmul adds them in one op (in bf16 it
    rounds once instead of after each product; CUDA may contract it to an FMA).
    """
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, swapped, sin)


def add_linear_(x: torch.Tensor, y: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    """x += lin(y) in place, as one GEMM: the residual add rides in the matmul (addmm_, beta=1).

    Saves the separate add kernel. Fused inference form only: x must be a fresh activation that
    nothing else reads (the residual stream) and grad must be off. Returns x. A quantized projection
    (`qguard.model.quant`) does the same with its own kernel (`lin.addmm_`).
    """
    if type(lin) is not nn.Linear:
        return lin.addmm_(x, y)
    flat = x.view(-1, x.shape[-1])
    flat.addmm_(y.reshape(-1, y.shape[-1]), lin.weight.t())
    if lin.bias is not None:
        flat.add_(lin.bias)
    return x


def fused_linear(x: torch.Tensor, fl: FusedLinear | nn.Module) -> torch.Tensor:
    """A stacked projection (`fuse_linears`) applied to x; in a quantized model it is an int8 module."""
    return F.linear(x, *fl) if type(fl) is tuple else fl(x)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = attend) as the float mask SDPA would build from it: 0 / -inf in `dtype`.

    SDPA converts a bool mask in every call (a `where` and two scalar fills per layer on CUDA); engines
    build this once per forward and every layer reuses it. Same values, so the same results.
    """
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.full((), float("-inf"), dtype=dtype, device=allowed.device))


# ------------------------------------------------------------------------------------ inference fusion

FusedLinear = tuple[torch.Tensor, "torch.Tensor | None"]  # (weight, bias) of several Linears stacked


def fuse_linears(linears: Sequence[nn.Linear]) -> FusedLinear:
    """Stack the Linears' rows into one weight (and bias); each Linear's parameters become views into it.

    The official Parameters keep their identity and names; only their storage moves into the stacked
    tensor, so no memory is doubled and in-place updates of a parameter reach the fused matmul.
    """
    with torch.no_grad():
        weight = torch.cat([lin.weight for lin in linears])
        bias = torch.cat([lin.bias for lin in linears]) if linears[0].bias is not None else None
    start = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight.data = weight[start:start + n]
        if bias is not None:
            lin.bias.data = bias[start:start + n]
        start += n
    return weight, bias


def unfuse_linears(linears: Sequence[nn.Linear]) -> None:
    """Give each Linear its own storage again (a copy of its rows); the stacked tensor can then be freed."""
    for lin in linears:
        lin.weight.data = lin.weight.data.clone()
        if lin.bias is not None:
            lin.bias.data = lin.bias.data.clone()


def _aliases(linears: Sequence[nn.Linear], fused: FusedLinear | None) -> bool:
    """Do the Linears' weights still live in `fused`? (A dtype/device cast or assign-load moves them.)"""
    if fused is None:
        return False
    ptr = fused[0].untyped_storage().data_ptr()
    return all(lin.weight.untyped_storage().data_ptr() == ptr for lin in linears)


class QuantizedModelError(InputError):
    """An operation that needs the full-precision weights was asked of a quantized model
    (`qguard.model.quant`, which re-exports it). It lives here, beside `InferenceFusion.quantized`,
    so that the decoder never imports the quantizer built on it."""


class InferenceFusion(nn.Module):
    """A module with an inference-only fused form: groups of Linears that read the same input run as one
    matmul (q/k/v, gate/up, the guard heads).

    Design (the simplest we found that keeps the official format): the fused weight is the STORAGE of
    the official parameters (`fuse_linears`). `q_proj.weight` etc. stay Parameters with official names,
    so `state_dict()`, strict loading (which copies into them, hence into the fused weight) and saving
    are unchanged, and no memory is doubled. What gives a parameter new storage breaks that aliasing, so
    it is rebuilt after `.to()`/dtype casts (`_apply`), `load_state_dict(assign=True)` and deepcopy or
    unpickling. Training never sees the fused form: `train()` unfuses (each parameter gets its own
    storage back, so LoRA can wrap q_proj etc.), and the fused path runs only with grad disabled, since
    gradients must reach the official parameters, which the stacked tensor bypasses.
    Subclasses list their groups in `_fusion_groups`: (holder module, attribute, Linears); the stacked
    (weight, bias) is stored on the holder under that attribute, None while unfused.
    A captured CUDA graph reads the fused weights at fixed addresses: unfusing or moving a model
    invalidates graphs captured on it, as moving a plain model always did.
    """

    fused = False
    # set by `qguard.model.quant.quantize_model` (the scheme's name): the stacked weights are int8 modules
    # and the float ones are gone, so the fused form is the only one; unfusing or training raises
    quantized: str | None = None

    def _fusion_groups(self) -> Iterator[tuple[nn.Module, str, list[nn.Linear]]]:
        return iter(())

    def fuse_for_inference(self) -> InferenceFusion:
        """Switch this module and every fusable submodule to the fused inference form (and eval mode).

        Results are unchanged up to floating-point rounding. Call it after any structural change (LoRA
        adapters must be merged first); `train()` and `unfuse()` go back to the plain form. Returns self.
        """
        self.eval()
        for m in self.modules():
            if isinstance(m, InferenceFusion):
                m._fuse()
        return self

    def unfuse(self) -> InferenceFusion:
        """Back to the plain form (separately stored official parameters). Returns self."""
        for m in self.modules():
            if isinstance(m, InferenceFusion):
                m._unfuse()
        return self

    def _fuse(self) -> None:
        for holder, name, linears in self._fusion_groups():
            if isinstance(getattr(holder, name), nn.Module):
                continue  # an int8 module (see `quantized`): fused for good, its float weights are gone
            bad = [type(lin).__name__ for lin in linears if type(lin) is not nn.Linear]
            if bad:
                raise TypeError(f"cannot fuse {name}: expected plain nn.Linear modules, got {bad} "
                                "(merge LoRA adapters before fusing)")
            # already fused in place: keep the tensor (a captured CUDA graph reads its address)
            if not _aliases(linears, getattr(holder, name)):
                setattr(holder, name, fuse_linears(linears))
        self.fused = True

    def _unfuse(self) -> None:
        if self.quantized:
            raise QuantizedModelError(f"this model has {self.quantized} weights (quantize=...): it is inference-only "
                                      "and cannot be unfused or trained; load the original checkpoint without quantize")
        if not self.fused:
            return
        for holder, name, linears in self._fusion_groups():
            unfuse_linears(linears)
            setattr(holder, name, None)
        self.fused = False

    def _realias(self) -> None:
        """Rebuild the fused weights if a parameter's storage was replaced (cast, move, assign, copy)."""
        if self.fused and not all(_aliases(lins, getattr(h, name)) for h, name, lins in self._fusion_groups()
                                  if not isinstance(getattr(h, name), nn.Module)):
            self._fuse()

    def train(self, mode: bool = True) -> InferenceFusion:
        if mode:
            self._unfuse()  # training differentiates (and LoRA wraps) the plain official modules
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)  # converts each parameter on its own: aliasing is lost
        self._realias()
        return out

    def __setstate__(self, state) -> None:
        super().__setstate__(state)  # deepcopy/unpickle copies each parameter on its own
        self._realias()


def realias_after_load(module: InferenceFusion, incompatible_keys) -> None:
    """load_state_dict post-hook: `assign=True` replaces parameters, so the fused weights are rebuilt."""
    module._realias()


# ------------------------------------------------------------------------------------------- decoder

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
        self.qkv: FusedLinear | None = None  # q/k/v stacked, set by Qwen3Model.fuse_for_inference

    def forward(self, x, cos, sin, cache: KVCache | None, attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.o_proj(self._attend(q, k, v, cache, attn_mask))

    def forward_fused(self, x, cos, sin, cache: KVCache | None, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """The inference form: one QKV matmul, one-kernel norms, RoPE on q and k heads together.

        cos/sin come from `RotaryEmbedding.signed`. q, k, v stay views of the QKV output (no copies).
        Returns the attention output BEFORE o_proj: the layer adds o_proj(y) to its residual in one GEMM.
        """
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        qkv = fused_linear(x, self.qkv).view(B, T, H + 2 * KV, D)
        # two norms (their weights differ), then one RoPE over the q and k heads side by side
        qk = torch.cat((self.q_norm.fast(qkv[:, :, :H]), self.k_norm.fast(qkv[:, :, H:H + KV])), dim=2)
        qk = apply_rope_fused(qk, cos, sin)
        q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)
        v = qkv[:, :, H + KV:].transpose(1, 2)
        return self._attend(q, k, v, cache, attn_mask)

    def _attend(self, q, k, v, cache: KVCache | None, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """SDPA over the cache (or causal); [B, T, heads * D], before o_proj."""
        B, _, T, _ = q.shape
        if cache is not None:
            k, v, attn_mask = cache.update(self.layer, k, v)
        scale = 1.0 / math.sqrt(self.head_dim)
        if T == 1 and self.n_kv != self.n_heads:
            return self._attend_one_folded(q, k, v, attn_mask, scale)
        causal = cache is None and attn_mask is None
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=causal, enable_gqa=self.n_kv != self.n_heads, scale=scale,
        )
        return y.transpose(1, 2).reshape(B, T, -1)

    def _attend_one_folded(self, q, k, v, attn_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        """One query token per row (the streaming decode step), GQA folded into the query axis.

        The G = heads / kv_heads query heads that share a KV head become G "positions" of one KV head:
        q [B, H, 1, D] -> [B, KV, G, D], attended against k/v [B, KV, S, D] as plain multi-head attention.
        Exact (same dot products), and it avoids SDPA's GQA path, which expands K/V G-fold or, with a
        mask on CUDA, rules out the memory-efficient kernel. The [B, 1, 1, S] mask row broadcasts over
        the G rows, since they are the same query position. CPU, 0.6B shapes: ~1.3-1.45x faster attention.
        """
        B, H, _, D = q.shape
        q = q.reshape(B, self.n_kv, H // self.n_kv, D)  # head h = kv * G + g, as SDPA's enable_gqa pairs them
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
        return y.reshape(B, 1, H * D)


class MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up: FusedLinear | None = None  # gate/up stacked, set by Qwen3Model.fuse_for_inference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """One gate/up matmul; returns the activation BEFORE down_proj (the layer adds it in one GEMM)."""
        gate, up = fused_linear(x, self.gate_up).chunk(2, dim=-1)
        return F.silu(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache, attn_mask, fused: bool = False):
        if fused:  # x is this forward's own residual stream: updated in place (see add_linear_)
            y = self.self_attn.forward_fused(self.input_layernorm.fast(x), cos, sin, cache, attn_mask)
            x = add_linear_(x, y, self.self_attn.o_proj)
            y = self.mlp.forward_fused(self.post_attention_layernorm.fast(x))
            return add_linear_(x, y, self.mlp.down_proj)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(InferenceFusion):
    """The decoder stack; parameter names equal the official `model.*` tensors."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)
        self.register_load_state_dict_post_hook(realias_after_load)

    def _fusion_groups(self) -> Iterator[tuple[nn.Module, str, list[nn.Linear]]]:
        for layer in self.layers:
            a, m = layer.self_attn, layer.mlp
            yield a, "qkv", [a.q_proj, a.k_proj, a.v_proj]
            yield m, "gate_up", [m.gate_proj, m.up_proj]

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
        if self.fused and not torch.is_grad_enabled():
            return self._forward_fused(x, positions, cache, attn_mask)
        cos, sin = self.rotary_emb(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, attn_mask)
        return self.norm(x)

    def _forward_fused(self, x, positions, cache: KVCache | None, attn_mask: torch.Tensor | None) -> torch.Tensor:
        cos, sin = self.rotary_emb.signed(positions, x.dtype)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = additive_mask(attn_mask, x.dtype)  # converted once, not by SDPA in every layer
        for layer in self.layers:
            x = layer(x, cos, sin, cache, attn_mask, fused=True)
        return self.norm.fast(x)


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
