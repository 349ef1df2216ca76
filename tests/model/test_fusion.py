"""The fused inference form (qguard.model.qwen3.InferenceFusion): same results as the plain modules,
official tensors in and out, no doubled memory, and training never fused."""

from __future__ import annotations

import copy
import importlib.util
import random

import pytest
import torch
from safetensors.torch import load_file

from qguard.checkpoint import build_gen_model, build_stream_model, open_checkpoint, save_weights
from qguard.engine.kvcache import ContiguousCache
from qguard.engine.stream import StreamEngine
from qguard.model.qwen3 import (
    Qwen3Config,
    RMSNorm,
    RotaryEmbedding,
    apply_rope,
    apply_rope_fused,
    padded_causal_mask,
)
from qguard.model.stream import HEAD_TENSORS
from qguard.testing import make_stream_checkpoint
from qguard.train.lora import add_lora, merge_lora
from tests.conftest import REPO

CPU = torch.device("cpu")
TOL = 1e-5  # fp32


@pytest.fixture(scope="module")
def wide_stream(tmp_path_factory):
    """std 0.2: activations far from zero, so a wrong fused weight could not hide in rounding."""
    return make_stream_checkpoint(tmp_path_factory.mktemp("wide"), preset="tiny", seed=5, std=0.2, tokenizer=False)


def stream(path, dtype=torch.float32):
    return build_stream_model(open_checkpoint(path), CPU, dtype)[0]


def outputs(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        o = model(ids, **kw)
    return torch.cat([o.risk_logits, o.category_logits, o.query_risk_logits, o.query_category_logits], -1)


def both_forms(model, fn):
    """fn() with the model fused (as loaded) and unfused; the model ends fused again."""
    assert model.fused
    fused = fn()
    model.unfuse()
    plain = fn()
    model.fuse_for_inference()
    return fused, plain


# ------------------------------------------------------------------------------------------ parity

def test_loaded_models_are_fused_and_match_the_plain_form(wide_stream):
    model = stream(wide_stream)
    assert model.fused and model.model.fused and model.model.layers[0].self_attn.qkv is not None
    ids = torch.randint(0, 151000, (3, 17))
    mask = padded_causal_mask(torch.tensor([17, 9, 4]), 17)
    fused, plain = both_forms(model, lambda: outputs(model, ids, attn_mask=mask))
    torch.testing.assert_close(fused, plain, atol=TOL, rtol=0)
    fused, plain = both_forms(model, lambda: outputs(model, ids[:1]))  # causal, no mask
    torch.testing.assert_close(fused, plain, atol=TOL, rtol=0)


def test_incremental_fused_equals_plain_full_forward(wide_stream):
    model = stream(wide_stream)
    ids = torch.randint(0, 151000, (1, 12))
    cache, parts, start = ContiguousCache(model.config.num_hidden_layers), [], 0
    for n in (5, 1, 1, 5):
        pos = torch.arange(start, start + n)[None]
        parts.append(outputs(model, ids[:, start:start + n], positions=pos, cache=cache))
        start += n
    model.unfuse()
    torch.testing.assert_close(torch.cat(parts, 1), outputs(model, ids), atol=TOL, rtol=0)


def test_static_decode_engine_fused_equals_plain(wide_stream):
    model = stream(wide_stream)
    rng = random.Random(0)
    seqs = [[rng.randrange(100, 150000) for _ in range(n)] for n in (6, 3, 9)]

    def run():
        eng = StreamEngine(model, max_sessions=4, max_context=32, static_decode=True)
        slots = [eng.allocate() for _ in seqs]
        for s, seq in zip(slots, seqs):
            eng.submit(s, seq[:2])
        eng.run()
        outs = {s: [] for s in slots}
        for t in range(2, 9):  # one token per session per step: the static (CUDA-graph) path
            for s, seq in zip(slots, seqs):
                if t < len(seq):
                    eng.submit(s, [seq[t]])
            for s, hp in eng.run().items():
                outs[s].append(hp.risk)
        return torch.cat([torch.cat(outs[s]) for s in slots])

    fused, plain = both_forms(model, run)
    torch.testing.assert_close(fused, plain, atol=TOL, rtol=0)


def test_gen_model_fused_equals_plain(tiny_gen):
    model = build_gen_model(open_checkpoint(tiny_gen), CPU, torch.float32)
    ids = torch.randint(0, 151000, (2, 9))

    def logits():
        with torch.no_grad():
            return model(ids)

    fused, plain = both_forms(model, logits)
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)


def test_rms_norm_fast_equals_the_reference_formula():
    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(64))
        x = 3 * torch.randn(4, 7, 64)
        torch.testing.assert_close(norm.fast(x), norm(x), atol=1e-6, rtol=1e-6)  # fp32 rounding
        # bf16: the reference rounds x_normed to bf16 before the weight, F.rms_norm rounds once
        nb, xb = copy.deepcopy(norm).to(torch.bfloat16), x.to(torch.bfloat16)
        torch.testing.assert_close(nb.fast(xb).float(), nb(xb).float(), atol=0.05, rtol=0.02)


def test_fused_rope_equals_rotate_half_rope():
    rope = RotaryEmbedding(Qwen3Config(head_dim=16))
    pos = torch.tensor([[0, 1, 7, 4095, 30000]])
    x = torch.randn(1, 5, 3, 16)  # [B, T, heads, D]
    cos, sin = rope(pos, torch.float32)
    ref = apply_rope(x.transpose(1, 2), cos, sin).transpose(1, 2)
    torch.testing.assert_close(apply_rope_fused(x, *rope.signed(pos, torch.float32)), ref, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- official tensors, memory

def test_fused_model_keeps_official_names_and_saves_them(wide_stream, tmp_path):
    model = stream(wide_stream)
    official = load_file(str(wide_stream / "model.safetensors"))
    local_to_official = {v: k for k, v in HEAD_TENSORS.items()}
    sd = {local_to_official.get(k, k): v for k, v in model.state_dict().items()}
    assert set(sd) == set(official)  # no fused or extra tensors, nothing missing
    for k, v in sd.items():
        assert torch.equal(v, official[k]), k
    save_weights(sd, tmp_path / "out")  # q/k/v are views of one storage: safetensors must accept them
    (tmp_path / "out" / "config.json").write_text((wide_stream / "config.json").read_text())
    again = stream(tmp_path / "out")
    ids = torch.randint(0, 151000, (1, 8))
    torch.testing.assert_close(outputs(again, ids), outputs(model, ids), atol=0, rtol=0)


def test_fused_weights_are_the_parameters_storage(wide_stream):
    model = stream(wide_stream)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert lin.weight.untyped_storage().data_ptr() == attn.qkv[0].untyped_storage().data_ptr()
    for lin in (mlp.gate_proj, mlp.up_proj):
        assert lin.weight.untyped_storage().data_ptr() == mlp.gate_up[0].untyped_storage().data_ptr()

    def storage_bytes(m):
        return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in m.parameters()}.values())

    fused_bytes = storage_bytes(model)
    model.unfuse()
    assert storage_bytes(model) == fused_bytes  # no memory doubled


def test_in_place_updates_and_strict_loading_reach_the_fused_path(wide_stream, tmp_path):
    model = stream(wide_stream)
    ids = torch.randint(0, 151000, (1, 6))
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(1.5)  # e.g. a LoRA merge, in place
        model.response_head.risk.weight.add_(0.1)
    fused, plain = both_forms(model, lambda: outputs(model, ids))
    torch.testing.assert_close(fused, plain, atol=TOL, rtol=0)
    # load_state_dict copies into the parameters (views), assign=True replaces them: both stay exact
    other = stream(make_stream_checkpoint(tmp_path / "o", preset="tiny", seed=9, std=0.2, tokenizer=False))
    for assign in (False, True):
        model.load_state_dict({k: v.clone() for k, v in other.state_dict().items()}, assign=assign)
        torch.testing.assert_close(outputs(model, ids), outputs(other, ids), atol=TOL, rtol=0)


def test_dtype_cast_and_deepcopy_rebuild_the_aliasing(wide_stream):
    model = stream(wide_stream)
    ids = torch.randint(0, 151000, (1, 6))
    ref = outputs(model, ids)
    model.to(torch.float64)
    attn = model.model.layers[0].self_attn
    assert attn.qkv[0].dtype is torch.float64
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.qkv[0].untyped_storage().data_ptr()
    model.model.rotary_emb.reset()
    torch.testing.assert_close(outputs(model, ids).float(), ref, atol=TOL, rtol=0)
    twin = copy.deepcopy(model)
    a2 = twin.model.layers[0].self_attn
    assert a2.q_proj.weight.untyped_storage().data_ptr() == a2.qkv[0].untyped_storage().data_ptr()
    with torch.no_grad():
        a2.v_proj.weight.zero_()
    fused, plain = both_forms(twin, lambda: outputs(twin, ids))
    torch.testing.assert_close(fused, plain, atol=TOL, rtol=0)  # the plain norm computes in fp32


# ------------------------------------------------------------------------------------------ training

def test_train_mode_restores_plain_differentiable_modules(wide_stream):
    model = stream(wide_stream).train()
    assert not model.fused and not model.model.fused
    attn = model.model.layers[0].self_attn
    assert attn.qkv is None and model.model.layers[0].mlp.gate_up is None and model.head_pre is None
    storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(storages)) == len(storages)  # every parameter owns its storage again
    out = model(torch.randint(0, 151000, (2, 5)))
    sum(x.sum() for x in (out.risk_logits, out.category_logits, out.query_risk_logits, out.query_category_logits)).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    add_lora(model.model, rank=2)  # wraps q_proj etc., as qguard.train does
    assert type(attn.q_proj).__name__ == "LoRALinear"
    with pytest.raises(TypeError, match="merge LoRA"):
        model.fuse_for_inference()
    merge_lora(model.model)
    model.fuse_for_inference()
    assert model.fused


def test_grad_mode_uses_the_plain_path_even_when_fused(wide_stream):
    """Gradients must reach the official parameters, which the stacked weights bypass."""
    model = stream(wide_stream)
    assert model.fused and not model.training
    model(torch.randint(0, 151000, (1, 4))).risk_logits.sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    assert model.response_head.pre.weight.grad is not None


# ------------------------------------------------------------------------------------------ kernels

def test_op_count_benchmark_shows_fewer_kernels(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # as `python benchmarks/op_count.py` has it (_machine)
    path = REPO / "benchmarks" / "op_count.py"
    spec = importlib.util.spec_from_file_location("op_count", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--preset", "tiny", "--dtype", "float32", "--prompt", "2"])
    assert out["fused"]["kernels_per_layer"] <= 17
    assert out["ratio_kernels"] > 2.0 and out["ratio_aten_ops"] > 1.5
    assert out["max_abs_prob_diff"] < 1e-5
