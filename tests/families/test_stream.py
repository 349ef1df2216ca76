"""The Stream family's readout (`qguard.families.stream`): one reading of head outputs for every path.

A finished response read offline (`verdict_from_scores`, `trace_from_scores`) goes through the same
`Readout` + `ResponseState` as a live session, so its token records equal the session's field for field;
these tests check that against the batch reading (argmax per token, `debounce`, the policy) and against a
live `StreamGuard` on the same model, and check the state objects a session is made of.
"""

from __future__ import annotations

import copy

import pytest
import torch

from qguard.engine.scoring import TokenScores, score_sequences
from qguard.families.stream import (
    Readout,
    ResponseState,
    StreamLabels,
    StreamLayout,
    build_model,
    debounced_unsafe_score,
    label_of,
    prompt_verdict,
    stream_layout,
    trace_from_scores,
    verdict_from_scores,
)
from qguard.model.stream import StreamOutput
from qguard.policy import Category, DebounceRule, Part, Policy, Severity, debounce
from qguard.runtime.stream import StreamGuard, TextFeed
from qguard.taxonomy import SEVERITIES, STREAM_CATEGORY_ORDER
from qguard.tokenizer import load_tokenizer
from qguard.weights import open_checkpoint

TOL = 1e-4


@pytest.fixture(scope="module")
def loaded(tiny_stream):
    model, labels = build_model(open_checkpoint(tiny_stream), torch.device("cpu"), torch.float32)
    return model, labels, load_tokenizer(tiny_stream)


def flipping(model, labels):
    """A copy of the model whose risk head flips between Safe, Unsafe and Controversial from token to
    token, so debounce decisions and stops happen mid-response."""
    unsafe, contro = (list(labels.risk).index(s) for s in (Severity.UNSAFE, Severity.CONTROVERSIAL))
    m = copy.deepcopy(model)
    plain = m.heads

    def heads(h):
        o = plain(h)
        x = h.float().sum(-1)
        o.risk_logits = o.risk_logits.clone()
        o.risk_logits[..., unsafe] += 20 * torch.sin(x * 5.0)
        o.risk_logits[..., contro] += 20 * torch.sin(x * 3.0 + 1.0)
        return o

    m.heads = heads
    return m


def random_scores(rng: torch.Generator, n: int, labels: StreamLabels) -> TokenScores:
    def head(k: int, scale: float) -> torch.Tensor:
        return (scale * torch.randn(n, k, generator=rng)).softmax(-1)

    return TokenScores(head(len(labels.risk), 4.0), head(len(labels.category), 2.0),
                       head(len(labels.query_risk), 2.0), head(len(labels.query_category), 2.0))


def batch_verdict(policy: Policy, rule: DebounceRule, labels: StreamLabels, lay: StreamLayout, s: TokenScores,
                  moderate_thinking: bool):
    """The batch reading of a response (what Guard computed before the readout was shared): argmax per
    moderated token, `debounce`, probabilities at the deciding token, else at the riskiest one."""
    where = list(lay.moderated(moderate_thinking))
    token_labels = [labels.risk[int(s.risk[i].argmax())] for i in where]
    label, pos = debounce(token_labels, rule)
    safe = list(labels.risk).index(Severity.SAFE)
    at = where[pos] if pos is not None else where[max(range(len(where)),
                                                      key=lambda j: (1.0 - float(s.risk[where[j], safe]), -j))]
    cats = (labels.category[int(s.category[at].argmax())],) if label is not Severity.SAFE else ()
    return label, pos, cats, at


LABEL_MAPS = [
    StreamLabels(SEVERITIES, STREAM_CATEGORY_ORDER[:8], SEVERITIES, STREAM_CATEGORY_ORDER),
    StreamLabels((Severity.CONTROVERSIAL, Severity.SAFE, Severity.UNSAFE),
                 (Category.PII, Category.VIOLENT, Category.PII), SEVERITIES, STREAM_CATEGORY_ORDER),
]


@pytest.mark.parametrize("labels", LABEL_MAPS)
@pytest.mark.parametrize("rule", list(DebounceRule))
@pytest.mark.parametrize("moderate_thinking", [True, False])
def test_offline_verdict_equals_the_batch_reading(labels, rule, moderate_thinking):
    """Random head outputs over a turn with reasoning, scaffolding and answer: label, deciding position,
    category and the probabilities reported equal the batch reading, for both rules and label maps."""
    rng = torch.Generator().manual_seed(3)
    policy = Policy()
    seen = set()
    for trial in range(60):
        # prompt 0..9 (user_end 7), <think> 10, reasoning 11..11+r, </think> \n\n, answer, <|im_end|> \n
        r, a = trial % 5, 1 + trial % 7
        r0, r1 = 11, 11 + r
        a0 = r1 + 2
        n = a0 + a + 2
        lay = StreamLayout(list(range(100, 100 + n)), 7, 11, a0, a0 + a, r0, r1)
        s = random_scores(rng, n, labels)
        label, pos, cats, at = batch_verdict(policy, rule, labels, lay, s, moderate_thinking)
        v = verdict_from_scores(policy, rule, labels, [{"role": "user", "content": "q"},
                                                       {"role": "assistant", "content": "a"}], lay, s,
                                moderate_thinking)
        assert (v.label, v.unsafe_position, v.categories, v.n_tokens) == (label, pos, cats, n)
        want = {k: 0.0 for k in ("Safe", "Unsafe", "Controversial")}
        for name, p in zip(labels.risk, s.risk[at].tolist()):
            want[name.value] += p
        assert v.probs == pytest.approx(want, abs=1e-7)
        seen.add(label)
    assert len(seen) > 1  # the trials reach more than one verdict


def test_offline_prompt_verdict_reads_the_query_heads_at_the_user_turn_end():
    labels = LABEL_MAPS[0]
    s = random_scores(torch.Generator().manual_seed(1), 12, labels)
    lay = StreamLayout(list(range(12)), 7, 12, 12, 12, 12, 12)
    v = verdict_from_scores(Policy(), DebounceRule.EVAL, labels, [{"role": "user", "content": "q"}], lay, s)
    assert v == prompt_verdict(Policy(), labels, s, 7, 8)
    assert v.label is labels.query_risk[int(s.query_risk[7].argmax())] and v.n_tokens == 8


def test_trace_tokens_are_a_live_sessions_records(loaded):
    """A response with reasoning, read offline from one full forward and live by a session pushing the
    same ids: every record field equal (probabilities to float tolerance), and the same final verdict."""
    model, labels, tok = loaded
    model = flipping(model, labels)
    policy = Policy()
    msgs = [{"role": "user", "content": "How do I do it?"},
            {"role": "assistant", "content": "<think>\nLet me think about this one.\n</think>\n\n"
                                             "Here is the full answer, step by step, with details."}]
    lay = stream_layout(tok, msgs)
    scores = score_sequences(model, [lay.ids])[0]
    trace = trace_from_scores(policy, DebounceRule.EVAL, labels, tok, lay, scores)
    assert [t.position for t in trace.tokens] == list(lay.moderated(True))
    assert {t.part for t in trace.tokens} == {Part.THINK, Part.ANSWER}
    assert [t.text for t in trace.tokens] == [tok.decode([lay.ids[i]]) for i in lay.moderated(True)]
    assert trace.response == verdict_from_scores(policy, DebounceRule.EVAL, labels, msgs, lay, scores)
    sg = StreamGuard(model, tok, labels, policy=policy, max_sessions=1, max_context=256)
    with sg.open(msgs[:1], thinking=True) as s:
        assert s.prompt_ids == lay.ids[:lay.think_start - 1]
        live = s.push(lay.ids[len(s.prompt_ids):lay.answer_end])
        final = s.finish()
    assert len(live) == len(trace.tokens) and any(t.stop for t in live)
    for v, t in zip(live, trace.tokens):
        exact = ("token_id", "index", "position", "part", "label", "category", "response_label",
                 "unsafe_position", "stop")
        assert [getattr(v, f) for f in exact] == [getattr(t, f) for f in exact]
        assert v.probs == pytest.approx(t.probs, abs=TOL) and v.text is None
    assert (final.label, final.unsafe_position, final.categories) == (
        trace.response.label, trace.response.unsafe_position, trace.response.categories)
    assert trace.prompt.label is s.prompt.label and trace.prompt.probs == pytest.approx(s.prompt.probs, abs=TOL)
    sg.close()


def test_response_state_copy_continues_independently():
    labels = LABEL_MAPS[0]
    rd = Readout(labels)
    g = torch.Generator().manual_seed(2)
    probs = torch.zeros(6, len(labels.risk) + len(labels.category))
    probs[:, 1] = 1.0  # every token Unsafe
    probs[:, len(labels.risk):] = torch.rand(6, len(labels.category), generator=g).softmax(-1)
    table = rd.read(probs)
    a = ResponseState(Policy(), DebounceRule.EVAL)
    a.consume([1], [Part.ANSWER], table, 0, 10)
    b = a.copy()
    out = b.consume([2, 3], [Part.ANSWER, None], table, 1, 11)
    assert [(t.index, t.position, t.response_label, t.unsafe_position) for t in out] == [(1, 11, Severity.UNSAFE, 1)]
    assert b.stop and b.verdict(13).label is Severity.UNSAFE
    assert (a.n_moderated, a.stop, a.debouncer.label, a.debouncer.n) == (1, False, Severity.SAFE, 1)
    assert a.verdict(11).label is Severity.SAFE


def test_label_of_reads_training_outputs_like_the_guard():
    # risk logits of one row: tokens 0..5, Unsafe at 2 and 3 (a debounced Unsafe); query head at 1
    risk = torch.zeros(1, 6, 3)
    risk[0, :, 0] = 1.0
    risk[0, 2:4, 1] = 5.0
    query = torch.zeros(1, 6, 3)
    query[0, 1, 2] = 5.0
    out = StreamOutput(risk, torch.zeros(1, 6, 8), query, torch.zeros(1, 6, 9))

    class Ex:
        def __init__(self, query_pos, resp_start=0, n=0):
            self.query_pos, self.resp_start, self.resp_labels = query_pos, resp_start, [0] * n

    assert label_of(out, 0, Ex(1)) is Severity.CONTROVERSIAL
    assert label_of(out, 0, Ex(-1, 1, 5)) is Severity.UNSAFE
    assert label_of(out, 0, Ex(-1, 3, 3)) is Severity.SAFE  # one Unsafe token alone is not a verdict


def test_debounced_unsafe_score_is_the_riskiest_consecutive_pair():
    assert debounced_unsafe_score(torch.tensor([0.1, 0.9, 0.2, 0.7, 0.8])) == pytest.approx(0.7)
    assert debounced_unsafe_score(torch.tensor([0.9])) == 0.0


def test_text_feed_requeued_ids_come_first_and_copies_are_independent(loaded):
    tok = loaded[2]
    feed = TextFeed(tok)
    assert feed.accept("Hello there, general") == "Hello there, general" and feed.pending == "Hello there, general"
    ids, n = feed.take("Hello there, general")
    assert ids and 0 < n < len("Hello there, general")  # the last word is held back
    feed.requeue(ids, n)  # the run failed: nothing judged
    twin = feed.copy()
    more, m = feed.take(None)
    assert more[:len(ids)] == ids and m == len("Hello there, general")
    feed.judged(m)
    assert feed.pending == "" and twin.pending == "Hello there, general"
    again, k = twin.take(None)  # the copy has its own tokenizer state and unsent ids
    assert (again, k) == (more, m)
    assert feed.flush_needed() and not TextFeed(tok).flush_needed()
