"""The models against an independent implementation (transformers), the Gen head tie, checkpoint writing."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qguard.checkpoint import build_gen_model, build_stream_model, open_checkpoint
from qguard.engine.kvcache import ContiguousCache
from qguard.errors import CheckpointError
from qguard.policy import Category
from qguard.testing import make_gen_checkpoint, make_stream_checkpoint

CPU = torch.device("cpu")


def reference_stream(path, ids):
    """transformers Qwen3Model + the head formula written out by hand."""
    from transformers import Qwen3Config, Qwen3Model

    cfg = json.loads((path / "config.json").read_text())
    sd = {}
    for f in sorted(path.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    hf_cfg = Qwen3Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "auto_map")})
    hf_cfg._attn_implementation = "eager"
    model = Qwen3Model(hf_cfg).eval()
    model.load_state_dict({k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")})
    with torch.no_grad():
        h = model(torch.tensor([ids])).last_hidden_state[0]

    def head(prefix):
        z = h @ sd[prefix + "risk_level_category_pre.weight"].T
        z = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + cfg["rms_norm_eps"])
        z = z * sd[prefix + "risk_level_category_layernorm.weight"]
        cat = "query_category_head.weight" if prefix else "category_head.weight"
        return (z @ sd[prefix + "risk_level_head.weight"].T).softmax(-1), (z @ sd[cat].T).softmax(-1)

    return head(""), head("query_")


@pytest.mark.parametrize("label_style,shard", [("long", None), ("short", 3_000_000)])
def test_stream_parity_with_transformers(tmp_path, label_style, shard):
    path = make_stream_checkpoint(tmp_path / "ck", label_style=label_style, shard_bytes=shard, seed=3, std=0.2)
    if shard:
        assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 1
    ckpt = open_checkpoint(path)
    model, labels = build_stream_model(ckpt, CPU, torch.float32)
    assert labels.category[1] is Category.SEXUAL and labels.query_category[8] is Category.JAILBREAK
    ids = [151644, 872, 198, 9707, 11, 1246, 311, 1936, 264, 12764, 30, 151645, 198, 151644, 77091, 198, 8420, 525]
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    (risk, cat), (qrisk, qcat) = reference_stream(path, ids)
    for ours, ref in [(out.risk_logits, risk), (out.category_logits, cat),
                      (out.query_risk_logits, qrisk), (out.query_category_logits, qcat)]:
        torch.testing.assert_close(ours[0].softmax(-1), ref, atol=1e-5, rtol=0)


def test_incremental_equals_full_forward(tiny_stream):
    model, _ = build_stream_model(open_checkpoint(tiny_stream), CPU, torch.float32)
    ids = torch.randint(0, 151000, (1, 23))
    with torch.no_grad():
        full = model(ids).risk_logits
        cache = ContiguousCache(model.config.num_hidden_layers)
        parts, start = [], 0
        for n in (7, 1, 1, 5, 9):
            pos = torch.arange(start, start + n)[None]
            parts.append(model(ids[:, start:start + n], pos, cache).risk_logits)
            start += n
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("masked", [False, True])
def test_one_token_folded_gqa_attention(masked):
    """The decode step folds grouped query heads into the query axis; it must equal SDPA's own GQA."""
    from qguard.model.qwen3 import Attention, Qwen3Config

    cfg = Qwen3Config.from_dict(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=6, num_key_value_heads=2, head_dim=16))
    attn = Attention(cfg, 0)
    B, S = 3, 11
    q, k, v = torch.randn(B, 6, 1, 16), torch.randn(B, 2, S, 16), torch.randn(B, 2, S, 16)
    mask = None
    if masked:  # rows see different numbers of keys, as in a batched engine step
        keep = torch.arange(S)[None, :] < torch.tensor([S, 4, 1])[:, None]
        mask = torch.zeros(B, 1, 1, S).masked_fill(~keep[:, None, None], float("-inf"))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=0.25)
    got = attn._attend(q, k, v, None, mask)
    torch.testing.assert_close(got, want.transpose(1, 2).reshape(B, 1, -1), atol=1e-6, rtol=0)


def test_gen_parity_with_transformers(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = make_gen_checkpoint(tmp_path / "g", seed=1, std=0.2)
    model = build_gen_model(open_checkpoint(path), CPU, torch.float32)
    cfg = json.loads((path / "config.json").read_text())
    ref = Qwen3ForCausalLM(Qwen3Config(**{k: v for k, v in cfg.items() if k != "architectures"})).eval()
    missing, unexpected = ref.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    ref.tie_weights()
    ids = torch.tensor([[151644, 872, 198, 9707, 11, 1246, 311]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_bf16_load_runs(tiny_stream):
    model, _ = build_stream_model(open_checkpoint(tiny_stream), CPU, torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype is torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype is torch.float32  # rope angles stay fp32
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).risk_logits).all()


@pytest.mark.parametrize("tie", [None, True])
def test_gen_lm_head_and_embedding_tie(tmp_path, tie):
    """A config without tie_word_embeddings (transformers' default: untied) loads the checkpoint's own
    lm_head; a tied config ignores a stray lm_head copy instead of overwriting the shared embedding."""
    d = make_gen_checkpoint(tmp_path / "g", preset="tiny", seed=3)
    weights = load_file(str(d / "model.safetensors"))
    embed = weights["model.embed_tokens.weight"]
    head = torch.randn_like(embed)
    save_file({**weights, "lm_head.weight": head}, str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("tie_word_embeddings", None)
    if tie is not None:
        cfg["tie_word_embeddings"] = tie
    (d / "config.json").write_text(json.dumps(cfg))
    model = build_gen_model(open_checkpoint(d), torch.device("cpu"), torch.float32)
    assert torch.equal(model.model.embed_tokens.weight, embed)
    assert torch.equal(model.lm_head.weight, embed if tie else head)


# --------------------------------------------------------------------------------- writing, Gen format

def test_write_checkpoint_is_all_or_nothing(tiny_stream, tmp_path):
    from qguard.weights import INDEX, write_checkpoint

    cfg = json.loads((tiny_stream / "config.json").read_text())
    tensors = load_file(str(tiny_stream / "model.safetensors"))
    out = write_checkpoint(tmp_path / "ck", cfg, tensors, chat_template="{{ messages }}", max_shard_bytes=3_000_000)
    assert json.loads((out / "config.json").read_text()) == cfg and (out / INDEX).is_file()
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == "{{ messages }}"
    model, _ = build_stream_model(open_checkpoint(out), CPU, torch.float32)  # the sharded copy loads
    ref, _ = build_stream_model(open_checkpoint(tiny_stream), CPU, torch.float32)
    ids = torch.tensor([[151644, 872, 198, 9707]])
    with torch.no_grad():
        assert torch.equal(model(ids).risk_logits, ref(ids).risk_logits)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(AttributeError):  # dies after the config is written: nothing of it reaches `out`
        write_checkpoint(out, {**cfg, "num_category": 1}, {"bad": "not a tensor"})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no staging folder left behind


def test_gen_format_round_trips_through_config_dict(tiny_gen, tmp_path):
    from qguard.families import gen
    from qguard.weights import write_checkpoint

    model = gen.build_model(open_checkpoint(tiny_gen), CPU, torch.float32)
    cfg = gen.config_dict(model.config, "float32")
    assert gen.matches(cfg) and not gen.matches({"architectures": ["Qwen3ForGuardModel"]}) and not gen.matches({})
    copy = write_checkpoint(tmp_path / "copy", cfg, load_file(str(tiny_gen / "model.safetensors")),
                            chat_template=gen.CHAT_TEMPLATE.read_text("utf-8"))
    again = gen.build_model(open_checkpoint(copy), CPU, torch.float32)
    assert again.config == model.config
    ids = torch.tensor([[151644, 872, 198, 9707, 11]])
    with torch.no_grad():
        logits = model(ids)
        assert torch.equal(again(ids), logits)
        gen.fold_temperature(again, 2.0)  # one temperature, in the final norm: logits / T
        torch.testing.assert_close(again(ids), logits / 2.0, atol=1e-5, rtol=1e-5)


def test_builders_refuse_the_other_family(tiny_stream, tiny_gen):
    from qguard.families import gen

    with pytest.raises(CheckpointError, match="is a stream checkpoint, not a Gen one"):
        build_gen_model(open_checkpoint(tiny_stream), CPU, torch.float32)
    with pytest.raises(CheckpointError, match="is a gen checkpoint, not a Stream one"):
        build_stream_model(open_checkpoint(tiny_gen), CPU, torch.float32)
    with pytest.raises(CheckpointError, match="is not a Qwen3Guard-Gen checkpoint"):
        gen.build_model(open_checkpoint(tiny_stream), CPU, torch.float32)
