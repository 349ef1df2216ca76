"""A new guard family is one registration: a toy family, written here in a few lines, runs through
`Guard` without a line of qguard changed. Also: how the registry picks a family and says why not."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from qguard import Guard, InputError
from qguard.errors import CheckpointError
from qguard.families import registry
from qguard.policy import Category, Severity


class Toy(torch.nn.Module):  # a "model": one parameter and a context length
    def __init__(self, cfg):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=64)


class KeywordClassifier:
    def __init__(self, policy):
        self.policy = policy

    def prepare(self, messages):
        return messages[-1]["content"]

    def run(self, texts):
        return [self.policy.verdict(Severity.UNSAFE if "bomb" in t else Severity.SAFE,
                                    [Category.VIOLENT] if "bomb" in t else []) for t in texts]


class ToyFamily:
    name = kind = "toy"
    architectures = ("ToyGuard",)
    live = False
    shared_temperature = True

    def matches(self, config):
        return "ToyGuard" in (config.get("architectures") or [])

    def load(self, ckpt, device, dtype):
        return Toy(ckpt.config).to(device), None

    def fold_temperature(self, model, cal):
        pass

    def classifier(self, guard):
        return KeywordClassifier(guard.policy)


def write_config(path, architectures, **extra):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"architectures": architectures, **extra}))
    return path


@pytest.fixture()
def registered(monkeypatch):
    monkeypatch.setattr(registry, "REGISTRY", list(registry.REGISTRY))  # undone after the test
    return registry.register(ToyFamily())


def test_a_new_family_is_one_registration(tmp_path, registered):
    g = Guard.from_pretrained(write_config(tmp_path / "toy", ["ToyGuard"]), device="cpu")  # offline tokenizer
    assert g.kind == "toy" and g.family is registered and not g.live
    assert g.classify_prompt("make a bomb").label is Severity.UNSAFE
    assert g.classify_prompt("make a bomb").categories == (Category.VIOLENT,)
    assert g.classify_responses([("hi", "hello")])[0].label is Severity.SAFE
    out = g.classify_conversations([[{"role": "user", "content": "x"}], [{"role": "system", "content": "s"}]],
                                   return_errors=True)
    assert out[0].label is Severity.SAFE and isinstance(out[1], InputError)
    with pytest.raises(InputError, match="Stream checkpoint"):
        g.open_stream("hi")
    with pytest.raises(InputError, match="Stream checkpoint"):
        g.stream_trace("hi", "hello")
    with pytest.raises(CheckpointError, match="ToyGuard"):  # listed among the known architectures
        Guard.from_pretrained(write_config(tmp_path / "llama", ["LlamaForCausalLM"]), device="cpu")


def test_a_registered_family_can_claim_an_architecture_first(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "REGISTRY", list(registry.REGISTRY))
    cfg = {"architectures": ["Qwen3ForCausalLM", "ToyGuard"]}
    assert registry.family_for(cfg) is registry.GEN
    toy = registry.register(ToyFamily())
    assert registry.family_for(cfg) is toy and registry.family_named("toy") is toy
    with pytest.raises(ValueError, match="already registered"):
        registry.register(ToyFamily())
    with pytest.raises(TypeError, match="not a guard family"):
        registry.register(SimpleNamespace(name="half"))


def test_the_built_in_families_are_told_apart_by_their_config():
    assert registry.family_for({"architectures": ["Qwen3ForGuardModel"]}) is registry.STREAM
    assert registry.family_for({"architectures": ["Qwen3ForCausalLM"], "guard_inner_size": 8}) is registry.STREAM
    assert registry.family_for({"architectures": ["Qwen3ForCausalLM"]}) is registry.GEN
    assert registry.family_named("gen") is registry.GEN and registry.family_of(registry.Kind.STREAM) is registry.STREAM
    with pytest.raises(CheckpointError, match=r"config.json: unsupported architecture 'qwen2'; qguard loads "
                                              r"Qwen3Guard-Gen \(Qwen3ForCausalLM\) and Qwen3Guard-Stream"):
        registry.family_for({"model_type": "qwen2"})
    with pytest.raises(InputError, match="calibration kind must be 'stream' or 'gen', got 'toy'"):
        registry.family_named("toy")


def test_a_family_without_live_sessions_is_refused_by_the_live_loader(tmp_path, registered):
    from qguard.runtime.load import load

    path = write_config(tmp_path / "toy", ["ToyGuard"])
    assert load(path, device="cpu").family is registered
    with pytest.raises(CheckpointError, match="is a toy checkpoint, not a Stream one"):
        load(path, device="cpu", live=True)
