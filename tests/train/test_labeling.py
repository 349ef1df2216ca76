"""Rollout token labels and the Controversial procedure.

The LLM, the Gen judge, the LLM-as-judge and the A/B trainers below are TEST DOUBLES (fakes): they
check the algorithms (85% threshold, confirmation, first-unsafe boundary, A/B cross annotation), not any
real model. The real implementations (TransformersLLM, OpenAICompatLLM, GuardJudge) need model weights
or a server this test machine does not have.
"""

from __future__ import annotations

import pytest

from qguard.errors import InputError
from qguard.policy import Severity
from qguard.tokenizer import load_tokenizer
from qguard.train import labeling
from qguard.train.data import encode_row, parse_row
from qguard.train.labeling import (
    ControversialConfig,
    RolloutConfig,
    controversial_relabel,
    first_unsafe_token,
)


class FakeLLM:
    """Fake: once the prefix holds `trigger`, `rate` of the n continuations turn unsafe ("BAD")."""

    def __init__(self, trigger: str, rate: float):
        self.trigger, self.rate, self.calls = trigger, rate, []

    def continue_response(self, messages, prefix, n, max_new_tokens):
        self.calls.append(prefix)
        k = round(self.rate * n) if self.trigger in prefix else 0
        return [" BAD" if i < k else " fine" for i in range(n)]


class FakeJudge:
    """Fake Gen judge / LLM-as-judge: unsafe iff a marker word occurs in the text."""

    def __init__(self, marker: str):
        self.marker = marker

    def is_unsafe(self, messages, response):
        return self.marker in response


MSGS = [{"role": "user", "content": "how?"}]
PIECES = ["Sure", ",", " first", " get", " the", " poison", " and", " mix"]


def test_first_unsafe_token_at_the_85_percent_threshold():
    llm = FakeLLM("poison", rate=7 / 8)  # 87.5% >= 85%
    i = first_unsafe_token(MSGS, PIECES, llm, FakeJudge("BAD"), None, RolloutConfig(n_rollouts=8))
    assert i == PIECES.index(" poison")
    below = FakeLLM("poison", rate=6 / 8)  # 75% < 85%: never qualifies
    assert first_unsafe_token(MSGS, PIECES, below, FakeJudge("BAD"), None, RolloutConfig(n_rollouts=8)) is None


def test_llm_as_judge_confirmation_moves_the_boundary_later():
    llm = FakeLLM("first", rate=1.0)  # rollouts turn unsafe already at " first"
    cfg = RolloutConfig(n_rollouts=4)
    assert first_unsafe_token(MSGS, PIECES, llm, FakeJudge("BAD"), None, cfg) == 2
    # the confirming judge only calls the prefix unsafe once "poison" is written
    assert first_unsafe_token(MSGS, PIECES, llm, FakeJudge("BAD"), FakeJudge("poison"), cfg) == 5


def test_stride_and_bad_config():
    llm = FakeLLM("poison", rate=1.0)
    assert first_unsafe_token(MSGS, PIECES, llm, FakeJudge("BAD"), None, RolloutConfig(n_rollouts=2, stride=2)) == 6
    assert llm.calls[0] == "Sure" and llm.calls[1] == "Sure, first"
    with pytest.raises(InputError):
        first_unsafe_token(MSGS, PIECES, llm, FakeJudge("BAD"), None, RolloutConfig(threshold=0))


def test_rollout_label_row_sets_the_char_span_of_the_boundary_token():
    tok = load_tokenizer()
    row = parse_row({"id": "r", "task": "response", "label": "Unsafe", "categories": ["Violent"],
                     "messages": [*MSGS, {"role": "assistant", "content": "Sure, first get the poison and mix"}]}, "r")
    new = labeling.rollout_label_row(row, tok, FakeLLM("poison", 1.0), FakeJudge("BAD"), FakeJudge("poison"),
                                     RolloutConfig(n_rollouts=2))
    assert new.unsafe_span == (row.text.index(" poison"), len(row.text))
    e = encode_row(tok, new)
    first = e.resp_labels.index(1)
    assert tok.decode(e.ids[e.resp_start + first: e.resp_start + first + 1]) == " poison"
    safe = parse_row({"id": "s", "task": "response", "label": "Safe", "categories": [],
                      "messages": [*MSGS, {"role": "assistant", "content": "poison"}]}, "s")
    assert labeling.rollout_label_row(safe, tok, FakeLLM("poison", 1.0), FakeJudge("BAD"), None) is safe


# ---------------------------------------------------------------------------------------- controversial

def _rows(n: int):
    out = []
    for i in range(n):
        kind = ("clear_safe", "clear_unsafe", "borderline")[i % 3]
        out.append(parse_row({"id": f"{kind}-{i}", "task": "prompt", "messages": [{"role": "user", "content": kind}],
                              "label": "Unsafe" if kind == "clear_unsafe" else "Safe"}, str(i)))
    return out


class FakeCrossTrainer:
    """Fake trainer: a 'strict' model (Unsafe weight > Safe) puts borderline rows at 0.7, a loose one at
    0.3; clear rows get confident probabilities. It records what it was fit on and asked to annotate."""

    def __init__(self):
        self.fits = []

    def fit(self, rows, risk_weights, seed):
        strict = risk_weights[1] > risk_weights[0]
        seen = {r.id for r in rows}
        self.fits.append((strict, seen))

        def predict(rs):
            assert not seen & {r.id for r in rs}, "a model annotated rows it was trained on"
            return [0.9 if "clear_unsafe" in r.id else 0.1 if "clear_safe" in r.id else (0.7 if strict else 0.3)
                    for r in rs]
        return predict


def test_controversial_is_where_strict_and_loose_disagree():
    rows = _rows(30)
    trainer = FakeCrossTrainer()
    out, stats = controversial_relabel(rows, trainer)
    assert [s for s, _ in trainer.fits] == [True, False, True, False]  # strict + loose on each half
    halves = [seen for _, seen in trainer.fits[::2]]
    assert not halves[0] & halves[1] and len(halves[0] | halves[1]) == 30  # A/B split, cross annotation
    for before, after in zip(rows, out):
        want = Severity.CONTROVERSIAL if "borderline" in before.id else before.label
        assert after.label is want
    assert stats == {"rows": 30, "disagreements": 10, "controversial": 10, "from_safe": 10, "from_unsafe": 0}


def test_controversial_max_fraction_caps_the_relabelling():
    out, stats = controversial_relabel(_rows(30), FakeCrossTrainer(), ControversialConfig(max_fraction=0.1))
    assert stats["controversial"] == 3
    assert sum(r.label is Severity.CONTROVERSIAL for r in out) == 3
    with pytest.raises(InputError):
        controversial_relabel(_rows(3), FakeCrossTrainer())


def test_stream_cross_trainer_returns_probabilities():
    tok = load_tokenizer()
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, guard_inner_size=16)
    from qguard.train.stream import DEFAULT_ARCH

    trainer = labeling.StreamCrossTrainer(tok, max_len=64, arch=dict(DEFAULT_ARCH, **tiny), max_steps=2,
                                          batch_tokens=1024)
    rows = _rows(6) + [parse_row({"id": "resp", "task": "response", "label": "Unsafe", "categories": [],
                                  "messages": [*MSGS, {"role": "assistant", "content": "do it like this"}]}, "r")]
    probs = trainer.fit(rows, (1.0, 3.0, 1.0), 0)(rows)
    assert len(probs) == 7 and all(0.0 <= p <= 1.0 for p in probs)


def test_openai_compatible_llm_request_and_errors():
    """Against a FAKE server (httpx.MockTransport): the request shape and the answer parsing."""
    import json

    import httpx

    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((request.url.path, request.headers.get("authorization"), body))
        if body["model"] == "broken":
            return httpx.Response(500, text="boom")
        n = body.get("n", 1)
        return httpx.Response(200, json={"choices": [{"message": {"content": f"c{i}"}} for i in range(n)]})

    llm = labeling.OpenAICompatLLM("http://x/v1/", "m", api_key="k", transport=httpx.MockTransport(handler))
    assert llm.continue_response(MSGS, "Sure,", 3, 16) == ["c0", "c1", "c2"]
    path, auth, body = seen[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer k"
    assert body["messages"][-1] == {"role": "assistant", "content": "Sure,"} and body["continue_final_message"]
    assert body["n"] == 3 and body["max_tokens"] == 16
    assert labeling.LLMAsJudge(llm).is_unsafe(MSGS, "x") is False  # "c0" is not a yes
    bad = labeling.OpenAICompatLLM("http://x/v1", "broken", transport=httpx.MockTransport(handler))
    with pytest.raises(InputError, match="HTTP 500"):
        bad.generate(MSGS)


def test_llm_spec_errors():
    from qguard.cli.train import _llm

    with pytest.raises(InputError, match="expected hf:PATH_OR_ID or openai:BASE_URL#MODEL"):
        _llm("openai:http://x/v1", None)  # no #MODEL
    assert isinstance(_llm("openai:http://x/v1#m", None), labeling.OpenAICompatLLM)
