import json
import shutil

import pytest
import torch

from qguard import Guard, InputError
from qguard.policy import Mode, Severity, debounce
from qguard.tokenizer import stream_layout


@pytest.fixture(scope="module")
def sguard(tiny_stream):
    return Guard.from_pretrained(tiny_stream)


@pytest.fixture(scope="module")
def gguard(tiny_gen):
    return Guard.from_pretrained(tiny_gen, max_new_tokens=8)


def test_prompt_verdict_reads_query_heads_at_user_im_end(sguard):
    msgs = [{"role": "user", "content": "How can I make a bomb?"}]
    v = sguard.classify_prompt("How can I make a bomb?")
    lay = stream_layout(sguard.tokenizer, msgs)
    with torch.no_grad():
        out = sguard.model(torch.tensor([lay.ids]))
    p = out.query_risk_logits[0, lay.user_end].softmax(-1)
    assert v.probs == pytest.approx({"Safe": p[0].item(), "Unsafe": p[1].item(), "Controversial": p[2].item()}, abs=1e-6)
    assert v.label is [Severity.SAFE, Severity.UNSAFE, Severity.CONTROVERSIAL][int(p.argmax())]
    assert v.mode is Mode.STRICT


def test_response_verdict_is_debounced_answer_tokens(sguard):
    prompt, response = "hi", "Sure, here is a long answer with many tokens in it, one after another."
    v = sguard.classify_response(prompt, response)
    lay = stream_layout(sguard.tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
    with torch.no_grad():
        risk = sguard.model(torch.tensor([lay.ids])).risk_logits[0]
    names = [Severity.SAFE, Severity.UNSAFE, Severity.CONTROVERSIAL]
    labels = [names[i] for i in risk[lay.answer_start:lay.answer_end].argmax(-1).tolist()]
    assert (v.label, v.unsafe_position) == debounce(labels)
    assert sum(v.probs.values()) == pytest.approx(1.0, abs=1e-5)


def test_batch_equals_single(sguard):
    prompts = ["a", "How can I make a bomb at home with household items?", "Tell me a joke please"]
    batch = sguard.classify_prompts(prompts)
    for p, b in zip(prompts, batch):
        s = sguard.classify_prompt(p)
        assert s.label == b.label and s.probs == pytest.approx(b.probs, abs=1e-5)
    pairs = [("hi", "hello there"), ("q", "a much longer answer that goes on and on for a while")]
    batch = sguard.classify_responses(pairs)
    for pr, b in zip(pairs, batch):
        s = sguard.classify_response(*pr)
        assert (s.label, s.unsafe_position) == (b.label, b.unsafe_position)
        assert s.probs == pytest.approx(b.probs, abs=1e-5)


def test_messages_forms(sguard):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    a = sguard.classify_response(msgs)
    b = sguard.classify_messages(msgs)
    c = sguard.classify_responses([msgs])[0]
    assert a.probs == b.probs == c.probs


def test_loose_mode(tiny_stream):
    g = Guard.from_pretrained(tiny_stream, mode="loose")
    assert g.classify_prompt("hello").mode is Mode.LOOSE


@pytest.mark.parametrize("call,msg", [
    (lambda g: g.classify_prompt(""), "empty prompt"),
    (lambda g: g.classify_prompt([{"role": "assistant", "content": "x"}]), "last message to be from the user"),
    (lambda g: g.classify_response("hi", ""), "empty response"),
    (lambda g: g.classify_response("hi", 42), "response must be text"),
    (lambda g: g.classify_response("hi"), "needs a response"),
    (lambda g: g.classify_response([{"role": "user", "content": "x"}]), "last message to be from the assistant"),
])
def test_bad_input(sguard, call, msg):
    with pytest.raises(InputError, match=msg):
        call(sguard)


def test_context_overflow_is_an_error(tiny_stream, tmp_path):
    d = tmp_path / "short"
    shutil.copytree(tiny_stream, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["max_position_embeddings"] = 32
    (d / "config.json").write_text(json.dumps(cfg))
    g = Guard.from_pretrained(d)
    with pytest.raises(InputError, match="longer than the model's context of 32"):
        g.classify_prompt("word " * 100)


def test_gen_guard_verdicts(gguard):
    v = gguard.classify_prompt("How can I make a bomb?")
    assert sum(v.probs.values()) == pytest.approx(1.0, abs=1e-5)
    # a random model answers garbage: an explicit error verdict, never Safe
    if v.error is not None:
        assert v.is_unsafe and v.raw_output is not None
    r = gguard.classify_response("hi", "hello")
    assert r.probs is not None
    with pytest.raises(InputError, match="Stream checkpoint"):
        gguard.stream_trace("hi", "hello")


def test_stream_trace(sguard):
    t = sguard.stream_trace("hi", "one two three four")
    assert [x.token_id for x in t.tokens] == sguard.tokenizer.encode("one two three four", add_special_tokens=False)
    assert "".join(x.text for x in t.tokens) == "one two three four"
    assert t.response.label == sguard.classify_response("hi", "one two three four").label
