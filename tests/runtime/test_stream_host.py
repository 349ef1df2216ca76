"""The streaming hot path's host side: packed engine outputs, the session layer's batch readout.

The session layer reads a whole engine run with a few tensor ops and then works on Python values; these
tests check that every verdict it builds is exactly what a per-token reading of the engine's
probabilities gives (scoring's dict helpers, argmax, batch `debounce`, the policy), for many sessions with
mixed chunk sizes, thinking scaffolding, chunked prefill, several pushes of one session in one batch,
and unusual label maps.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import random

import pytest
import torch

from qguard.checkpoint import StreamLabels
from qguard.engine.scoring import argmax_label, probs_dict, score_sequences, severity_probs
from qguard.engine.stream import PackedProbs, StreamEngine
from qguard.families.stream import Readout
from qguard.policy import Category, DebounceRule, Mode, Policy, Severity, debounce
from qguard.stream import Part, StreamGuard, TokenVerdict
from qguard.tokenizer import DOUBLE_NEWLINE, END_THINK, IM_END, NEWLINE, THINK

TOL = 1e-4


def flipping(loaded):
    """A copy of the model whose risk head flips between Safe, Unsafe and Controversial from token to
    token (logit offsets from the hidden state), so debounce decisions and stops happen mid-stream."""
    model, labels, _ = loaded
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


class Recorder:
    """Wraps the engine's `run_packed` to keep each run's packed output and its steps and forwards."""

    def __init__(self, engine: StreamEngine):
        self.runs: list[PackedProbs] = []
        self.work: list[tuple[int, int]] = []
        run = engine.run_packed

        def recorded():
            steps, forwards = engine.stats.steps, engine.stats.forwards
            out = run()
            self.runs.append(out)
            self.work.append((engine.stats.steps - steps, engine.stats.forwards - forwards))
            return out

        engine.run_packed = recorded


def check_token(v: TokenVerdict, packed: PackedProbs, slot: int, offset: int, labels: StreamLabels) -> tuple:
    """v equals the per-token reading of its packed row; returns what the response reference needs."""
    nr, nc = packed.head_sizes[:2]
    row = packed.probs[packed.rows[slot][0] + offset]
    risk, cat = row[:nr], row[nr:nr + nc]
    probs, cprobs = severity_probs(risk, labels.risk), probs_dict(cat, labels.category)
    assert list(v.probs.items()) == list(probs.items())  # same values, same key order
    assert list(v.category_probs.items()) == list(cprobs.items())
    assert v.label is argmax_label(risk, labels.risk)
    assert v.category is argmax_label(cat, labels.category)
    unsafe = 1.0 - risk.tolist()[list(labels.risk).index(Severity.SAFE)]
    return v.label, v.category, probs, cprobs, unsafe


def check_response(vs: list[TokenVerdict], reads: list[tuple], policy: Policy, rule: DebounceRule, final) -> None:
    """Running labels, stop flags and the final verdict against batch debounce + the policy."""
    token_labels = [r[0] for r in reads]
    stopped = False
    for i, v in enumerate(vs):
        label, pos = debounce(token_labels[: i + 1], rule)
        assert (v.response_label, v.unsafe_position) == (label, pos)
        if pos is not None:  # the verdict at the deciding token blocks: stop from here on
            _, cat, probs, _, _ = reads[pos]
            cats = (cat,) if label is not Severity.SAFE else ()
            stopped = stopped or policy.verdict(label, cats, probs=probs).blocked
        assert v.stop == stopped
    label, pos = debounce(token_labels, rule)
    if pos is not None:
        at = pos
    else:  # the riskiest token: the first with the highest P(not Safe)
        unsafe = [r[4] for r in reads]
        at = unsafe.index(max(unsafe))
    _, cat, probs, cprobs, _ = reads[at]
    assert (final.label, final.unsafe_position) == (label, pos)
    assert final.categories == ((cat,) if label is not Severity.SAFE else ())
    assert final.probs == probs and final.category_probs == cprobs
    assert final.blocked == policy.verdict(label, final.categories, probs=probs).blocked


def answer_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 150000) for _ in range(n)]


@pytest.mark.parametrize("static_decode", [False, True])
@pytest.mark.parametrize("rule, mode", [(DebounceRule.EVAL, Mode.STRICT), (DebounceRule.REPORT, Mode.LOOSE)])
def test_many_sessions_mixed_chunks_equal_the_per_token_reading(loaded, static_decode, rule, mode):
    _, labels, tok = loaded
    policy = Policy(mode=mode, actions={Category.PII: "allow"})
    sg = StreamGuard(flipping(loaded), tok, labels, policy=policy, debounce=rule, max_sessions=12,
                     max_context=256, prefill_chunk=8, static_decode=static_decode)
    rec = Recorder(sg.engine)
    rng = random.Random(21)
    sessions = []
    for i in range(10):
        thinking = i % 3 == 0
        sessions.append(sg.open(f"Question {i}: how do I do it?", thinking=thinking, moderate_thinking=i % 2 == 0))
    # thinking sessions first push their scaffolding, with reasoning in between; some end the turn
    streams = {s: ([THINK, NEWLINE, *answer_ids(rng, 5), END_THINK, DOUBLE_NEWLINE] if s.thinking else [])
               + answer_ids(rng, 60 if i < 8 else 1) + ([IM_END] if i % 4 == 1 else [])
               for i, s in enumerate(sessions)}  # the last two: one token, never decided (riskiest token)
    verdicts = {s: [] for s in sessions}
    reads = {s: [] for s in sessions}
    while any(streams.values()):
        batch = {}
        for s in sessions:
            if streams[s] and rng.random() < 0.85:
                n = rng.choice([1, 1, 1, 2, 3, 5, 9, 17])  # one step mixes decode rows and multi-forward chunks
                batch[s], streams[s] = streams[s][:n], streams[s][n:]
        before = {s: s.length for s in batch}
        for s, vs in sg.push_many(batch).items():
            packed = rec.runs[-1]
            for v in vs:
                reads[s].append(check_token(v, packed, s.slot, v.position - before[s], labels))
            verdicts[s] += vs
    assert any(steps > 1 for steps, _ in rec.work)  # a slot's tokens from several forwards (gathered rows)
    assert any(forwards > steps for steps, forwards in rec.work)  # decode rows and chunks in one step
    decided = undecided = 0
    for s in sessions:
        vs = verdicts[s]
        assert [v.index for v in vs] == list(range(len(vs)))
        if s.thinking:
            assert vs[0].part is (Part.THINK if s.moderate_thinking else Part.ANSWER)
        final = s.finish()
        check_response(vs, reads[s], policy, rule, final)
        decided += final.unsafe_position is not None
        undecided += final.unsafe_position is None and len(vs) > 0
        s.close()
    assert decided >= 3 and undecided >= 1  # decisions mid-stream, and verdicts at the riskiest token
    labels_seen = {r[0] for rs in reads.values() for r in rs}
    assert labels_seen == {Severity.SAFE, Severity.UNSAFE, Severity.CONTROVERSIAL}


def test_several_pushes_of_one_session_and_a_new_prompt_in_one_step(loaded):
    """The asyncio loop coalesces whatever is queued: two pushes of one session and another session's
    prompt share one engine run; each push gets its own tokens' verdicts, in order."""
    model, labels, tok = loaded
    sg = StreamGuard(model, tok, labels, max_sessions=3, max_context=128, prefill_chunk=4)
    rng = random.Random(5)
    a_ids, b_ids = answer_ids(rng, 6), answer_ids(rng, 2)

    rec = Recorder(sg.engine)

    async def main():
        s = await sg.open_async("first")
        runs = len(rec.runs)
        first, second, other = await asyncio.gather(s.push(a_ids), s.push(b_ids), sg.open_async("second"))
        return s, first, second, other, len(rec.runs) - runs

    s, first, second, other, runs = asyncio.run(main())
    assert runs == 1  # all three in one engine run (several steps at prefill_chunk 4)
    assert [v.token_id for v in first] == a_ids and [v.token_id for v in second] == b_ids
    assert [v.index for v in first + second] == list(range(8))
    n = len(s.session.prompt_ids)
    assert [v.position for v in first + second] == list(range(n, n + 8))
    ref = score_sequences(model, [s.session.prompt_ids + a_ids + b_ids, other.session.prompt_ids])
    unsafe = list(labels.risk).index(Severity.UNSAFE)
    got = torch.tensor([v.probs["Unsafe"] for v in first + second])
    assert (got - ref[0].risk[n:, unsafe]).abs().max() < TOL
    o = other.session
    safe = list(labels.query_risk).index(Severity.SAFE)
    assert abs(o.prompt.probs["Safe"] - float(ref[1].query_risk[o.user_end, safe])) < TOL
    sg.close()


def test_run_packed_rows_equal_run(loaded):
    """Chunked prefill (several forwards per slot), decode rows and a slot freed between a step and the
    collection: `run_packed`'s rows are the same numbers as `run`'s per-slot views."""
    model = loaded[0]
    rng = random.Random(9)
    engines = [StreamEngine(model, max_sessions=4, max_context=128, prefill_chunk=4) for _ in range(2)]
    slots = [[e.allocate() for _ in range(4)] for e in engines]
    pushes = [answer_ids(rng, n) for n in (1, 3, 10, 7)]
    for e, ss in zip(engines, slots):
        for slot, ids in zip(ss, pushes):
            e.submit(slot, ids)
        e.step()
        e.free(ss[2])  # its outputs so far are dropped, like a session closed mid-run
    per_slot, packed = engines[0].run(), engines[1].run_packed()
    assert set(per_slot) == set(packed.rows) == {slots[0][i] for i in (0, 1, 3)}
    for slot, hp in per_slot.items():
        a, b = packed.rows[slot]
        assert b - a == len(hp)
        for f, part in zip(("risk", "category", "query_risk", "query_category"),
                           packed.probs[a:b].split(packed.head_sizes, dim=-1)):
            assert torch.equal(getattr(hp, f), part)
    assert engines[1].run_packed().rows == {}  # nothing pending: an empty run


@pytest.mark.parametrize("risk, category", [
    ((Severity.SAFE, Severity.UNSAFE, Severity.CONTROVERSIAL), (Category.VIOLENT, Category.PII)),
    ((Severity.UNSAFE, Severity.SAFE), (Category.PII, Category.VIOLENT, Category.PII)),  # no Controversial
    ((Severity.SAFE, Severity.UNSAFE, Severity.UNSAFE), (Category.SEXUAL, Category.SEXUAL, Category.COPYRIGHT)),
])
def test_readout_equals_scoring_for_any_label_map(risk, category):
    """Duplicate names (summed), missing severities (0.0), reordered classes, ties (first maximum)."""
    labels = StreamLabels(risk=risk, category=category, query_risk=risk, query_category=category)
    sizes = (len(risk), len(category), len(risk), len(category))
    rd = Readout(labels, sizes, list(risk).index(Severity.SAFE))
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(40, sum(sizes), generator=g).softmax(-1)
    probs[:5, :len(risk)] = 0.25  # ties
    probs[5:10, len(risk):len(risk) + len(category)] = 0.1
    table = rd.read(probs)
    for r in range(probs.shape[0]):
        p, c = probs[r, :len(risk)], probs[r, len(risk):len(risk) + len(category)]
        assert list(zip(rd.sev_keys, table.sev[r])) == list(severity_probs(p, risk).items())
        assert list(zip(rd.cat_keys, table.cat[r])) == list(probs_dict(c, category).items())
        assert rd.risk_names[table.risk_idx[r]] is argmax_label(p, risk)
        assert rd.cat_names[table.cat_idx[r]] is argmax_label(c, category)
        assert table.unsafe[r] == 1.0 - p.tolist()[list(risk).index(Severity.SAFE)]


def test_token_verdict_fast_constructor_equals_the_dataclass_one():
    values = (7, 1, 12, Part.ANSWER, {"Safe": 0.5}, {"PII": 0.2}, Severity.UNSAFE, Category.PII, Severity.SAFE,
              None, False)
    fast, plain = TokenVerdict._fast(*values), TokenVerdict(*values)
    assert fast == plain and repr(fast) == repr(plain) and fast.to_dict() == plain.to_dict()
    with pytest.raises(AttributeError):
        fast.stop = True  # still frozen


def test_pushed_verdicts_equal_the_dataclass_constructor(loaded):
    """The session layer fills TokenVerdicts from a dict literal: same fields, same order, still frozen."""
    model, labels, tok = loaded
    sg = StreamGuard(model, tok, labels, max_sessions=2, max_context=64)
    rng = random.Random(5)
    with sg.open("Question") as s:
        vs = s.push(answer_ids(rng, 4)) + sg.push_many({s: answer_ids(rng, 1)})[s]
    assert len(vs) == 5
    for v in vs:
        plain = TokenVerdict(*vars(v).values())
        assert list(vars(v)) == [f.name for f in dataclasses.fields(TokenVerdict)]
        assert v == plain and repr(v) == repr(plain) and v.to_dict() == plain.to_dict()
        with pytest.raises(AttributeError):
            v.stop = True


def test_undecided_responses_report_their_riskiest_token(loaded):
    """The plain tiny model never decides (no two flagged tokens in a row): the response verdict carries
    the probabilities of the token with the highest P(not Safe)."""
    model, labels, tok = loaded
    policy = Policy()
    sg = StreamGuard(model, tok, labels, policy=policy, max_sessions=6, max_context=128)
    rec = Recorder(sg.engine)
    rng = random.Random(3)
    sessions = [sg.open(f"Question {i}") for i in range(6)]
    verdicts = {s: [] for s in sessions}
    reads = {s: [] for s in sessions}
    for _ in range(8):
        batch = {s: answer_ids(rng, rng.choice([1, 2, 4])) for s in sessions}
        before = {s: s.length for s in batch}
        for s, vs in sg.push_many(batch).items():
            reads[s] += [check_token(v, rec.runs[-1], s.slot, v.position - before[s], labels) for v in vs]
            verdicts[s] += vs
    for s in sessions:
        final = s.finish()
        assert final.unsafe_position is None
        check_response(verdicts[s], reads[s], policy, DebounceRule.EVAL, final)
