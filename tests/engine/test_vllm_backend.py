"""The vLLM backend, tested against vLLM's DOCUMENTED interface with a fake `vllm` module, not a real vLLM.

vLLM cannot be installed here (no GPU). The fake implements exactly what the backend uses from the
documented offline API: `LLM(model=..., enable_prefix_caching=...)`, `LLM.get_tokenizer()`,
`LLM.generate([{"prompt_token_ids": ids}], SamplingParams)` returning objects whose `.outputs[0]` has
`.text`, `.token_ids` (the stop token included) and `.logprobs` (a {token_id: Logprob} dict of the
top-k per generated token), and `SamplingParams(temperature, max_tokens, logprobs, stop_token_ids)`.
Its "generation" is plain greedy decoding of a trained tiny checkpoint, so the backend's verdicts
can be compared with the torch engine's.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import pytest
import torch

from qguard.errors import InputError, QGuardError
from qguard.tokenizer import ENDOFTEXT, IM_END
from tests.engine.test_gen_engine import conversations, load, trained_gen_checkpoint


@dataclass
class Logprob:  # vllm.sequence.Logprob's documented fields
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class FakeSamplingParams:
    def __init__(self, temperature=1.0, max_tokens=16, logprobs=None, stop_token_ids=None, **kw):
        self.temperature, self.max_tokens, self.logprobs = temperature, max_tokens, logprobs
        self.stop_token_ids = stop_token_ids or []


class FakeLLM:
    instances: list[FakeLLM] = []

    def __init__(self, model: str, **kw):
        self.model_path, self.kw = model, kw
        self.model, self.tokenizer = load(model)
        FakeLLM.instances.append(self)

    def get_tokenizer(self):
        return self.tokenizer

    @torch.inference_mode()
    def generate(self, prompts, params: FakeSamplingParams):
        assert params.temperature == 0
        outs = []
        for p in prompts:
            ids = list(p["prompt_token_ids"])
            gen, lps = [], []
            for _ in range(params.max_tokens):
                logits = self.model(torch.tensor([ids + gen]))[0, -1].float().log_softmax(-1)
                top = logits.topk(params.logprobs)
                tok = int(logits.argmax())
                entry = {int(t): Logprob(float(v), r + 1) for r, (v, t) in enumerate(zip(top.values, top.indices))}
                entry.setdefault(tok, Logprob(float(logits[tok])))
                gen.append(tok)
                lps.append(entry)
                if tok in params.stop_token_ids:
                    break
            text = self.tokenizer.decode([t for t in gen if t not in (IM_END, ENDOFTEXT)])
            completion = types.SimpleNamespace(text=text, token_ids=gen, logprobs=lps)
            outs.append(types.SimpleNamespace(prompt_token_ids=ids, outputs=[completion]))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", mod)
    return mod


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    return trained_gen_checkpoint(tmp_path_factory.mktemp("vllm_trained"))


def test_vllm_backend_matches_torch_engine(fake_vllm, trained_dir):
    from qguard.backends.vllm import VLLMGenBackend
    from qguard.guard import Guard

    backend = VLLMGenBackend.from_pretrained(str(trained_dir), mode="strict", max_new_tokens=24)
    assert FakeLLM.instances[-1].kw["enable_prefix_caching"] is True
    guard = Guard.from_pretrained(trained_dir, device="cpu", max_new_tokens=24)
    convs = conversations(10, seed=13)
    got = backend.classify_conversations(convs)
    want = guard.classify_conversations(convs)
    for g, w in zip(got, want):
        assert (g.label, g.categories, g.refusal, g.error is None) == (w.label, w.categories, w.refusal, w.error is None)
        if g.probs is not None and w.error is None:
            assert sum(g.probs.values()) == pytest.approx(1.0)
            assert max(g.probs, key=g.probs.get) == max(w.probs, key=w.probs.get)


def test_vllm_backend_reports_bad_rows(fake_vllm, trained_dir):
    from qguard.backends.vllm import VLLMGenBackend

    backend = VLLMGenBackend.from_pretrained(str(trained_dir), max_new_tokens=8, max_model_len=400)
    out = backend.classify_conversations([[{"role": "user", "content": 3}],
                                          [{"role": "user", "content": "word " * 500}],
                                          [{"role": "user", "content": "cake"}]], return_errors=True)
    assert isinstance(out[0], InputError) and isinstance(out[1], InputError)
    assert not isinstance(out[2], Exception)
    with pytest.raises(InputError):
        backend.classify_conversations([[{"role": "user", "content": 3}]])


def test_missing_vllm_is_a_clear_error(monkeypatch):
    from qguard.backends.vllm import VLLMGenBackend

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(QGuardError, match="pip install 'qguard\\[vllm\\]'"):
        VLLMGenBackend.from_pretrained("Qwen/Qwen3Guard-Gen-0.6B")


def test_vllm_backend_applies_the_gen_calibration_like_the_torch_engine(fake_vllm, trained_dir, tmp_path):
    import shutil

    from qguard.backends.vllm import VLLMGenBackend
    from qguard.calibration import FILE_NAME, Calibration
    from qguard.guard import Guard

    d = shutil.copytree(trained_dir, tmp_path / "gen")
    Calibration(temperature={"prompt": 2.0, "response": 2.0}, kind="gen").save(d / FILE_NAME)
    convs = conversations(6, seed=5)
    raw = VLLMGenBackend.from_pretrained(str(d), max_new_tokens=24, calibration=False).classify_conversations(convs)
    cal = VLLMGenBackend.from_pretrained(str(d), max_new_tokens=24).classify_conversations(convs)  # the dir's file
    torch_cal = Guard.from_pretrained(d, device="cpu", max_new_tokens=24).classify_conversations(convs)
    checked = 0
    for r, c, t in zip(raw, cal, torch_cal):
        assert (r.label, r.categories) == (c.label, c.categories) == (t.label, t.categories)
        if r.probs is None or r.error:
            continue
        lp = torch.tensor([max(r.probs[k], 1e-30) for k in ("Safe", "Unsafe", "Controversial")]).log()
        want = torch.softmax(lp / 2.0, -1).tolist()
        assert [c.probs[k] for k in ("Safe", "Unsafe", "Controversial")] == pytest.approx(want, abs=1e-6)
        checked += 1
    assert checked
    with pytest.raises(InputError, match="fitted for a stream model"):
        VLLMGenBackend.from_pretrained(str(d), calibration=Calibration())


def test_vllm_backend_takes_what_guard_takes_and_knows_the_engine_limits(fake_vllm, trained_dir):
    from qguard.backends.vllm import VLLMGenBackend

    backend = VLLMGenBackend.from_pretrained(str(trained_dir), max_new_tokens=8, logprobs=30)
    assert FakeLLM.instances[-1].kw["max_logprobs"] == 30  # vLLM's default cap (20) would refuse every call
    out = backend.classify_conversations([[{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}],
                                          [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]],
                                         return_errors=True)
    assert "system turn" in str(out[0]) and "empty response" in str(out[1])
    llm = FakeLLM(str(trained_dir))
    llm.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=300))
    short = VLLMGenBackend(llm, "m", max_new_tokens=8)
    assert short.max_model_len == 300  # the engine's own limit, not a guess
    with pytest.raises(InputError, match="exceeds the context of 300"):
        short.prepare([{"role": "user", "content": "word " * 400}])
