"""Random checkpoints in the exact official format, for tests and benchmarks.

The official weights cannot be downloaded on every machine; these files have the same config keys,
tensor names, shapes (for the real presets) and tokenizer, so every loading and serving path runs on
them. Random weights give meaningless verdicts but the same compute as the real model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qguard.model.stream import HEAD_TENSORS
from qguard.tokenizer import ASSETS, copy_tokenizer_files
from qguard.weights import write_checkpoint

# the tokenizer files of qguard's own checkpoints (benchmarks import it from here)
copy_tokenizer = copy_tokenizer_files

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, guard_inner_size=32),
    "0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, guard_inner_size=512),
}

LONG_CATEGORY_NAMES = ["Violent", "Sexual Content or Sexual Acts", "Suicide & Self-Harm",
                       "Politically Sensitive Topics", "PII", "Copyright Violation",
                       "Non-violent Illegal Acts", "Unethical Acts", "Jailbreak"]
SHORT_CATEGORY_NAMES = ["Violent", "Sexual Content", "Self-Harm", "Political", "PII", "Copyright",
                        "Non-violent Illegal Acts", "Unethical Acts", "Jailbreak"]


def base_config(preset: str) -> dict[str, Any]:
    p = dict(PRESETS[preset])
    p.pop("guard_inner_size")
    return {
        "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "max_position_embeddings": 8192,
        "tie_word_embeddings": True, "attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu",
        "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645, "model_type": "qwen3", **p,
    }


def stream_config(preset: str = "tiny", label_style: str = "long") -> dict[str, Any]:
    names = LONG_CATEGORY_NAMES if label_style == "long" else SHORT_CATEGORY_NAMES
    risk = {"0": "Safe", "1": "Unsafe", "2": "Controversial"}
    return {
        **base_config(preset),
        "architectures": ["Qwen3ForGuardModel"],
        # present upstream; qguard must ignore it and never run remote code
        "auto_map": {"AutoModel": "modeling_qwen3_guard.Qwen3ForGuardModel"},
        "guard_inner_size": PRESETS[preset]["guard_inner_size"],
        "num_risk_level": 3, "num_category": 8, "num_query_risk_level": 3, "num_query_category": 9,
        "response_risk_level_map": risk, "query_risk_level_map": risk,
        "response_category_map": {str(i): n for i, n in enumerate(names[:8])},
        "query_category_map": {str(i): n for i, n in enumerate(names)},
    }


def _random_tensors(shapes: dict[str, tuple[int, ...]], seed: int, std: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[name] = std * torch.randn(shape, generator=g)
    return out


def backbone_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, i, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    nh, kv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,)}
    for layer in range(L):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "self_attn.q_proj.weight": (nh * d, h), p + "self_attn.k_proj.weight": (kv * d, h),
            p + "self_attn.v_proj.weight": (kv * d, h), p + "self_attn.o_proj.weight": (h, nh * d),
            p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        }
    return shapes


def stream_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, g = cfg["hidden_size"], cfg["guard_inner_size"]
    counts = {"risk_level_head": cfg["num_risk_level"], "category_head": cfg["num_category"],
              "query_risk_level_head": cfg["num_query_risk_level"], "query_category_head": cfg["num_query_category"]}
    shapes = backbone_shapes(cfg)
    for name in HEAD_TENSORS:
        stem = name.removesuffix(".weight")
        if stem.endswith("_pre"):
            shapes[name] = (g, h)
        elif stem.endswith("_layernorm"):
            shapes[name] = (g,)
        else:
            shapes[name] = (counts[stem], g)
    return shapes


def make_stream_checkpoint(out: str | Path, preset: str = "tiny", label_style: str = "long",
                           shard_bytes: int | None = None, seed: int = 0, std: float = 0.05,
                           tokenizer: bool = True) -> Path:
    """Write a random Qwen3Guard-Stream checkpoint (official names and config keys) to `out`."""
    cfg = stream_config(preset, label_style)
    return write_checkpoint(out, cfg, _random_tensors(stream_shapes(cfg), seed, std), tokenizer_files=tokenizer,
                            max_shard_bytes=shard_bytes)


def gen_config(preset: str = "tiny") -> dict[str, Any]:
    return {**base_config(preset), "architectures": ["Qwen3ForCausalLM"], "max_position_embeddings": 32768}


def make_gen_checkpoint(out: str | Path, preset: str = "tiny", shard_bytes: int | None = None, seed: int = 0,
                        std: float = 0.05, guard_template: bool = True, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a Qwen3Guard-Gen style checkpoint (Qwen3ForCausalLM, tied embeddings) to `out`.

    With `guard_template`, the tokenizer carries qguard's guard chat template, like the official Gen
    checkpoints carry theirs. `tensors` overrides the random weights (e.g. a trained model).
    """
    cfg = gen_config(preset)
    template = (ASSETS / "qwen3guard_gen_template.jinja").read_text("utf-8") if guard_template else None
    return write_checkpoint(out, cfg, tensors if tensors is not None else _random_tensors(backbone_shapes(cfg), seed, std),
                            chat_template=template, max_shard_bytes=shard_bytes)
