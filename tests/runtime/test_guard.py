import json
import shutil

import pytest
import torch

from qguard import Guard, InputError
from qguard.families.stream import stream_layout
from qguard.policy import Mode, Policy, Severity, debounce
from qguard.tokenizer import END_THINK, NEWLINE, THINK


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
    (lambda g: g.classify_messages([{"role": "system", "content": "be nice"}]), "only system messages"),
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


def test_an_empty_response_fails_only_its_own_row(sguard, gguard):
    convs = [[{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}],
             [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}],
             [{"role": "user", "content": "y"}, {"role": "assistant", "content": "  \n"}],
             [{"role": "user", "content": "hi"}, {"role": "system", "content": "note"}]]
    for g in (sguard, gguard):
        out = g.classify_conversations(convs, return_errors=True)
        assert [type(v).__name__ for v in out] == ["InputError", "Verdict", "InputError", "InputError"]
        assert "empty response" in str(out[0]) and "empty response" in str(out[2])
        assert "system turn" in str(out[3])
        assert out[1].probs == pytest.approx(g.classify_messages(convs[1]).probs, abs=1e-5)
        with pytest.raises(InputError, match="empty response"):
            g.classify_messages(convs[2])  # the message form says what the text form says


def stream_turn_verdict(guard, prompt: str, content: str, moderate_thinking: bool):
    """What a live session in thinking mode gives when the assistant turn's ids are pushed one by one."""
    lay = stream_layout(guard.tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": content}])
    head = lay.think_start - 1  # the turn starts at <think>
    sg = guard.stream_guard(max_sessions=1, max_context=512)
    with sg.open(prompt, thinking=True, moderate_thinking=moderate_thinking) as s:
        assert s.prompt_ids == lay.ids[:head]
        for t in lay.ids[head:lay.answer_end + 1]:  # the turn and its <|im_end|>
            s.push([t])
        return s.finish()


@pytest.mark.parametrize("moderate_thinking", [True, False])
def test_reasoning_in_a_response_is_read_as_a_live_session_reads_it(tiny_stream, moderate_thinking):
    g = Guard.from_pretrained(tiny_stream, moderate_thinking=moderate_thinking)
    prompt = "How can I make a bomb at home?"
    for content in ("Mix the two powders, then pack them tightly.\n</think>\n\nI cannot help with that.",
                    "<think>\nfirst thoughts\nmore thoughts</think>an answer",
                    "no reasoning at all, just an answer"):
        v = g.classify_response(prompt, content)
        ref = stream_turn_verdict(g, prompt, content, moderate_thinking)
        assert (v.label, v.unsafe_position, v.categories) == (ref.label, ref.unsafe_position, ref.categories)
        assert v.probs == pytest.approx(ref.probs, abs=1e-4)
        n = len(g.stream_trace(prompt, content).tokens)
        lay = stream_layout(g.tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": content}])
        assert n == len(lay.moderated(moderate_thinking))
    reasoning_only = "<think>only reasoning</think>"
    if moderate_thinking:
        assert g.classify_response(prompt, reasoning_only).n_tokens > 0
    else:
        with pytest.raises(InputError, match="only reasoning"):
            g.classify_response(prompt, reasoning_only)


def test_layout_reasoning_span(sguard):
    tok = sguard.tokenizer
    lay = stream_layout(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "plain"}])
    assert lay.reasoning_start == lay.reasoning_end and list(lay.moderated()) == list(range(lay.answer_start, lay.answer_end))
    lay = stream_layout(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Let me see.</think>Hi"}])
    assert lay.ids[lay.reasoning_start - 2:lay.reasoning_start] == [THINK, NEWLINE]
    assert lay.ids[lay.reasoning_end] == END_THINK
    assert tok.decode(lay.ids[lay.reasoning_start:lay.reasoning_end]) == "Let me see.\n"
    assert lay.moderated() == [*range(lay.reasoning_start, lay.reasoning_end), *range(lay.answer_start, lay.answer_end)]


def test_input_mistakes_get_clear_errors(tiny_stream, sguard):
    with pytest.raises(InputError, match="use classify_prompt"):
        sguard.classify_prompts("hello")
    with pytest.raises(InputError, match="pairs"):
        sguard.classify_responses("hello")
    with pytest.raises(InputError, match=r"unpaired UTF-16 surrogate '\\ud83d' at character 3"):
        sguard.classify_prompt("hi \ud83d")
    paired = sguard.classify_prompt("hi \ud83d\ude00")  # a pair left split by a UTF-16 client is joined
    assert paired.probs == sguard.classify_prompt("hi \U0001F600").probs
    with pytest.raises(InputError, match="unknown dtype 'f32'"):
        Guard.from_pretrained(tiny_stream, dtype="f32")
    assert next(Guard.from_pretrained(tiny_stream, dtype="bf16").model.parameters()).dtype is torch.bfloat16
    with pytest.raises(InputError, match="conflicts with the policy's mode 'strict'"):
        Guard.from_pretrained(tiny_stream, mode="loose", policy=Policy())
    assert Guard.from_pretrained(tiny_stream, mode="loose", policy=Policy(mode="loose")).policy.mode is Mode.LOOSE
    with pytest.raises(InputError, match="unknown mode 'lax'"):
        Guard.from_pretrained(tiny_stream, mode="lax")


def test_no_model_loads_the_embedded_starter():
    from qguard.starter import starter_model_path

    if starter_model_path() is None:
        pytest.skip("this build ships no starter model")
    g = Guard.from_pretrained()
    assert g.name == str(starter_model_path())
    assert g.classify_prompt("hello").label in Severity
