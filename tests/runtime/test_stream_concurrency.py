"""Many asyncio stream sessions sharing one engine while others close, get cancelled or fail.

A closing session must never disturb another session's step: the engine step that already holds its
tokens runs on a worker thread while the event loop closes it. These tests make that race deterministic
by pausing every engine run in the step thread (tokens submitted, forward not yet run) until the event
loop has closed or cancelled its victims, and check that every surviving session's verdicts equal one
full forward over its final sequence, that no error reaches the survivors, that one failing session
fails alone, that no slot leaks, that `pending_text` is exactly the pushed text not judged yet, and that
tokenizing a large text delta never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import random
import threading
from dataclasses import dataclass, field

import pytest
import torch

from qguard.checkpoint import build_stream_model, open_checkpoint
from qguard.engine.scoring import score_sequences
from qguard.errors import CapacityError, InputError
from qguard.incremental import IncrementalTokenizer
from qguard.policy import DebounceRule, Severity, debounce
from qguard.runtime.stream import _held_length
from qguard.stream import AsyncStreamSession, StreamGuard
from qguard.tokenizer import encode, fix_surrogates, load_tokenizer

TOL = 1e-4  # fp32 on CPU
ANSWER = ("Sure! Here is how it works: mix 12 parts of water, then stir. 化学很有趣, and so on. "
          "Don't worry 🙂 — it's safe; we'll see. Done?")


@pytest.fixture(scope="module")
def loaded(tiny_stream):
    model, labels = build_stream_model(open_checkpoint(tiny_stream), torch.device("cpu"), torch.float32)
    return flipping(model, labels), labels, load_tokenizer(tiny_stream)


def flipping(model, labels):
    """A copy of the model whose risk head flips between labels from token to token (logit offsets from
    the hidden state), so debounce decisions and stops happen mid-stream."""
    unsafe, contro = (list(labels.risk).index(s) for s in (Severity.UNSAFE, Severity.CONTROVERSIAL))
    m = copy.deepcopy(model)
    plain = m.heads

    def heads(h):
        o = plain(h)
        x = h.float().sum(-1)
        o.risk_logits = o.risk_logits.clone()
        # gentle slopes: batched and full forwards differ by float noise, which steep ones would amplify
        o.risk_logits[..., unsafe] += 8 * torch.sin(x)
        o.risk_logits[..., contro] += 8 * torch.sin(x * 0.7 + 1.0)
        return o

    m.heads = heads
    return m


class MidStep:
    """Pauses every engine run in the step thread, after the batch's tokens were submitted and before
    any forward, until the event loop has acted on it (`await runs.get()` -> (slots in the run, resume))."""

    def __init__(self, sg: StreamGuard, loop: asyncio.AbstractEventLoop):
        self.runs: asyncio.Queue = asyncio.Queue()
        self.paused = 0
        run, engine = sg.engine.run_packed, sg.engine

        def paused():
            slots = {slot for slot, st in engine.slots.items() if st.pending}
            resume = threading.Event()
            loop.call_soon_threadsafe(self.runs.put_nowait, (slots, resume))
            resume.wait(30)  # bounded: a broken controller cannot hang the suite
            self.paused += 1
            return run()

        engine.run_packed = paused


def check_against_full_forward(model, labels, prompt_ids: list[int], pushed: list[int], vs, final) -> None:
    """Per-token verdicts of one session equal one full forward over its final sequence; running and
    final response labels equal the batch debounce of the token labels."""
    assert [v.token_id for v in vs] == pushed
    assert [v.index for v in vs] == list(range(len(pushed)))
    assert [v.position for v in vs] == list(range(len(prompt_ids), len(prompt_ids) + len(pushed)))
    ref = score_sequences(model, [prompt_ids + pushed])[0].risk[len(prompt_ids):]
    got = torch.tensor([[v.probs[x.value] for x in labels.risk] for v in vs])
    assert (got - ref).abs().max() < TOL
    token_labels = [v.label for v in vs]
    for i, v in enumerate(vs):
        assert (v.response_label, v.unsafe_position) == debounce(token_labels[: i + 1], DebounceRule.EVAL)
    assert (final.label, final.unsafe_position) == debounce(token_labels, DebounceRule.EVAL)


@dataclass
class Worker:
    i: int
    text: bool  # pushes text deltas (else token ids)
    chunks: list
    rng: random.Random
    prompt: str
    session: AsyncStreamSession | None = None
    in_flight: bool = False
    verdicts: list = field(default_factory=list)
    final: object = None
    error: BaseException | None = None
    victim: str | None = None  # what the controller did to it


def make_workers(rng: random.Random, n: int) -> list[Worker]:
    out = []
    for i in range(n):
        wr = random.Random(rng.randrange(1 << 30))
        text = i % 2 == 0
        if text:
            cuts = sorted(wr.sample(range(1, len(ANSWER)), 12))
            chunks = [ANSWER[a:b] for a, b in zip([0, *cuts], [*cuts, len(ANSWER)])]
        else:
            chunks = [[wr.randrange(100, 150000) for _ in range(wr.choice([1, 1, 2, 3, 7]))] for _ in range(12)]
        out.append(Worker(i, text, chunks, wr, f"Question {i}: how do I do it?"))
    return out


async def run_worker(w: Worker, sg: StreamGuard, tok) -> None:
    try:
        s = w.session = await sg.open_async(w.prompt)
        async with s:
            pushed = ""
            for chunk in w.chunks:
                for _ in range(w.rng.randrange(3)):  # some pushes miss the step being formed: they queue
                    await asyncio.sleep(0)
                w.in_flight = True
                if w.text:
                    pushed += chunk
                    w.verdicts += await s.push_text(chunk)
                    released = pushed[: len(pushed) - len(s.pending_text)]
                    assert encode(tok, released) == [v.token_id for v in w.verdicts]  # judged == released
                else:
                    w.verdicts += await s.push(chunk)
                w.in_flight = False
            w.in_flight = True
            w.verdicts += await s.flush()
            w.final = await s.finish()
            w.in_flight = False
            assert s.pending_text == ""
    except InputError as e:  # what a session closed by the controller gets
        w.error = e


PLAN = ["cancel_in_flight", "close_in_flight", "close_queued", "cancel_opening", "cancel_queued"] * 2


async def controller(mid: MidStep, sg: StreamGuard, workers: list[Worker], tasks: dict, rng: random.Random,
                     counts: dict) -> None:
    """At every other paused run, the next action of PLAN that has a candidate: close or cancel a session
    whose tokens are in the run, whose push is queued for the next run, or that is being opened."""
    plan, n = list(PLAN), 0
    while (got := await mid.runs.get()) is not None:
        slots, resume = got
        n += 1
        cands: dict[str, list[Worker]] = {"in_flight": [], "queued": [], "opening": []}
        for w in workers:
            if w.victim or tasks[w.i].done():
                continue
            if w.session is None:
                cands["opening"].append(w)  # its open may be in this run (slot and prefill) or waiting
            elif not w.session.session.closed:
                if any(item[0] is w.session.session for item in sg._queue):
                    cands["queued"].append(w)
                elif w.in_flight and w.session.session.slot in slots:
                    cands["in_flight"].append(w)
        for j, action in enumerate(plan if n % 2 == 0 else []):
            how, where = action.split("_", 1)
            if cands[where]:
                w = rng.choice(cands[where])
                w.victim = plan.pop(j)
                counts[action] = counts.get(action, 0) + 1
                if how == "cancel":
                    tasks[w.i].cancel()
                    with contextlib.suppress(asyncio.CancelledError):  # it reaches the session mid-run
                        await tasks[w.i]
                else:
                    await w.session.aclose()
                break
        resume.set()


@pytest.mark.parametrize("seed", [0, 1])
def test_sessions_closed_or_cancelled_mid_step_never_disturb_the_others(loaded, seed):
    model, labels, tok = loaded
    max_sessions = 12
    sg = StreamGuard(model, tok, labels, max_sessions=max_sessions, max_context=256, prefill_chunk=16)
    rng = random.Random(seed)
    workers = make_workers(rng, 24)  # twice the slots: closed slots are reused by sessions waiting to open
    counts: dict[str, int] = {}

    async def main():
        mid = MidStep(sg, asyncio.get_running_loop())
        tasks = {w.i: asyncio.ensure_future(run_worker(w, sg, tok)) for w in workers}
        ctl = asyncio.ensure_future(controller(mid, sg, workers, tasks, rng, counts))
        outcomes = await asyncio.gather(*tasks.values(), return_exceptions=True)
        mid.runs.put_nowait(None)
        await ctl
        return mid, outcomes

    mid, outcomes = asyncio.run(main())
    survivors = 0
    for w, out in zip(workers, outcomes):
        if w.victim is None:  # no error of any kind reached a session nobody touched
            assert out is None and w.error is None, (w.i, out, w.error)
            check_against_full_forward(model, labels, w.session.session.prompt_ids,
                                       encode(tok, ANSWER) if w.text else sum(w.chunks, []), w.verdicts, w.final)
            survivors += 1
        elif w.victim.startswith("cancel"):
            assert isinstance(out, asyncio.CancelledError)
        else:  # closed by another task: its push says so (never another session's KeyError)
            assert out is None and isinstance(w.error, InputError) and "closed" in str(w.error)
    assert survivors >= len(workers) // 2 and mid.paused > 20
    for kind in ("cancel_in_flight", "close_in_flight", "cancel_opening"):
        assert counts.get(kind, 0) >= 1, counts  # the races under test did happen
    assert counts.get("cancel_queued", 0) + counts.get("close_queued", 0) >= 1, counts
    assert sg.engine.active == 0 and sorted(sg.engine.free_slots) == list(range(max_sessions))  # no leak
    sg.close()


def test_cancelled_push_and_open_mid_step(loaded):
    """A push cancelled while its step runs: the other session's result stands, the cancelled session is
    closed and its slot is freed only after the step; an open_async cancelled mid-step leaks nothing."""
    model, labels, tok = loaded
    sg = StreamGuard(model, tok, labels, max_sessions=3, max_context=128)
    rng = random.Random(3)
    a_ids, b_ids = [rng.randrange(100, 150000) for _ in range(5)], [rng.randrange(100, 150000) for _ in range(3)]

    async def main():
        a, b = await sg.open_async("first"), await sg.open_async("second")
        mid = MidStep(sg, asyncio.get_running_loop())
        pa, pb = asyncio.ensure_future(a.push(a_ids)), asyncio.ensure_future(b.push(b_ids))
        opening = asyncio.ensure_future(sg.open_async("third"))
        slots, resume = await mid.runs.get()
        assert slots == {a.session.slot, b.session.slot, 2}  # both pushes and the new prompt in flight
        pa.cancel()
        opening.cancel()
        for t in (pa, opening):
            with contextlib.suppress(asyncio.CancelledError):
                await t
        assert a.session.closed and sg.engine.slots.get(a.session.slot) is not None  # not freed mid-run
        resume.set()
        vb = await pb
        return a, b, vb

    a, b, vb = asyncio.run(main())
    check_against_full_forward(model, labels, b.session.prompt_ids, b_ids, vb, b.verdict())
    assert sg.engine.active == 1  # only b: a and the cancelled opening were freed after the step
    with pytest.raises(InputError, match="closed"):
        asyncio.run(a.push([100]))
    b.close()
    assert sg.engine.active == 0
    sg.close()


def test_one_failing_session_fails_alone(loaded):
    """In one shared step: one session's own work raises, another pushes invalid ids; each gets its own
    error and every other session its correct verdicts. The failed session is closed, and says why."""
    model, labels, tok = loaded
    sg = StreamGuard(model, tok, labels, max_sessions=6, max_context=128)
    rng = random.Random(11)
    pushes = [[rng.randrange(100, 150000) for _ in range(rng.choice([1, 4]))] for _ in range(6)]
    pushes[2] = [10**9]  # out of the vocabulary

    async def main():
        ss = [await sg.open_async(f"Question {i}") for i in range(6)]

        def boom(*a, **k):
            raise RuntimeError("boom")

        ss[4].session.response.consume = boom  # a fault in this one session's verdict records
        steps = sg.stats.steps
        out = await asyncio.gather(*(s.push(p) for s, p in zip(ss, pushes)), return_exceptions=True)
        return ss, out, sg.stats.steps - steps

    ss, out, steps = asyncio.run(main())
    assert steps == 1  # one shared step
    assert isinstance(out[4], RuntimeError) and isinstance(out[2], InputError)
    for i in (0, 1, 3, 5):
        check_against_full_forward(model, labels, ss[i].session.prompt_ids, pushes[i], out[i], ss[i].verdict())
    assert ss[4].session.closed
    with pytest.raises(InputError, match="internal error"):
        asyncio.run(ss[4].push([100]))
    assert sg.engine.active == 5  # the failed session's slot is back
    assert asyncio.run(ss[2].push([100]))  # an invalid push leaves its session usable
    for s in ss:
        s.close()
    assert sg.engine.active == 0
    sg.close()


def test_engine_failure_fails_its_step_and_rolls_back(loaded):
    """A forward that raises fails every push of that step (the step loop goes on) and leaves every
    session as it was: the next pushes give the verdicts of one full forward."""
    model, labels, tok = loaded
    sg = StreamGuard(model, tok, labels, max_sessions=4, max_context=128, prefill_chunk=4)
    rng = random.Random(2)
    first = [[rng.randrange(100, 150000) for _ in range(n)] for n in (1, 6, 3)]
    again = [[rng.randrange(100, 150000) for _ in range(n)] for n in (2, 1, 5)]
    forward = sg.engine._forward
    calls = {"n": 0}

    def flaky(group, T):
        calls["n"] += 1
        if calls["n"] == 2:  # a later forward of the run: earlier ones already advanced their slots
            raise RuntimeError("device fault")
        return forward(group, T)

    text_a, text_b = "Sure, here is the first part of it, ", "and the second one."

    async def main():
        ss = [await sg.open_async(f"Question {i}") for i in range(3)]
        t = await sg.open_async("Question text")
        sg.engine._forward = flaky
        failed = await asyncio.gather(*(s.push(p) for s, p in zip(ss, first)), t.push_text(text_a),
                                      return_exceptions=True)
        pending = t.pending_text
        sg.engine._forward = forward
        ok = await asyncio.gather(*(s.push(p) for s, p in zip(ss, again)))
        tv = await t.push_text(text_b) + await t.flush()  # the failed push's ids are retried first
        return ss, failed, ok, t, pending, tv

    ss, failed, ok, t, pending, tv = asyncio.run(main())
    assert calls["n"] >= 2 and all(isinstance(r, RuntimeError) for r in failed)
    assert pending == text_a  # nothing of the failed text push was judged
    for s, p, vs in zip(ss, again, ok):
        check_against_full_forward(model, labels, s.session.prompt_ids, p, vs, s.verdict())
        s.close()
    check_against_full_forward(model, labels, t.session.prompt_ids, encode(tok, text_a + text_b), tv, t.verdict())
    t.close()
    assert sg.engine.active == 0
    sg.close()


def test_large_text_delta_is_tokenized_off_the_event_loop(loaded, monkeypatch):
    """While a 1 MB delta (and a flush) is tokenized, another coroutine keeps running: the tokenizer
    waits, in its thread, until the ticker has advanced, which it could not if it ran on the loop."""
    model, labels, tok = loaded
    sg = StreamGuard(model, tok, labels, max_sessions=2, max_context=256)
    ticks = [0]
    seen: list[tuple[bool, bool]] = []  # (ran off the loop's thread, the loop ticked meanwhile)
    loop_thread = threading.current_thread()

    def waiting(method):
        def wrapped(self, *args):
            start = ticks[0]
            for _ in range(1000):  # the loop must make progress meanwhile (bounded, no timing asserted)
                if ticks[0] >= start + 5:
                    break
                threading.Event().wait(0.005)
            seen.append((threading.current_thread() is not loop_thread, ticks[0] >= start + 5))
            return method(self, *args)
        return wrapped

    monkeypatch.setattr(IncrementalTokenizer, "push", waiting(IncrementalTokenizer.push))
    monkeypatch.setattr(IncrementalTokenizer, "flush", waiting(IncrementalTokenizer.flush))
    big = "好" * ((1 << 20) // 3)  # ~1 MB of UTF-8, one unpunctuated pre-tokenizer chunk: held back

    async def main():
        done = asyncio.Event()

        async def ticker():
            while not done.is_set():
                ticks[0] += 1
                await asyncio.sleep(0)

        t = asyncio.ensure_future(ticker())
        s = await sg.open_async("hi")
        held = await s.push_text(big)
        t2 = await sg.open_async("hello")
        vs = await t2.push_text("Hello there, friend") + await t2.flush()
        done.set()
        await t
        await s.aclose()
        await t2.aclose()
        return s, held, vs

    s, held, vs = asyncio.run(main())
    assert seen and all(off and ticked for off, ticked in seen), seen
    assert held == [] and s.pending_text == big  # nothing committed yet: all of it is pending
    assert [v.token_id for v in vs] == encode(tok, "Hello there, friend")
    assert sg.engine.active == 0
    sg.close()


# ----------------------------------------------------------------------------------------- pending_text

def released_ids(tok, pushed: str, pending: str) -> list[int]:
    assert pushed.endswith(pending)
    return encode(tok, fix_surrogates(pushed[: len(pushed) - len(pending)]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pending_text_is_exactly_the_unjudged_suffix(loaded, seed):
    """After every push the released prefix (pushed text minus pending_text) encodes to exactly the ids
    judged so far, surrogate pairs split across deltas and lone halves included; after flush nothing is
    pending. The sync and the async session agree."""
    model, labels, tok = loaded
    sg = StreamGuard(model, tok, labels, max_sessions=2, max_context=256)
    text = ANSWER + " \ud83d\ude00 pair, lone \udc00 half, and a split pair: \ud83d\ude80 end \ud83d"
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), 20))
    if seed == 0:  # split inside each surrogate pair on purpose
        cuts = sorted({*cuts, text.index("\ude00"), text.index("\ude80")})
    deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]

    def check(s, pushed, judged):
        assert released_ids(tok, pushed, s.pending_text) == [v.token_id for v in judged]

    with sg.open("hi") as s:
        assert s.pending_text == ""
        pushed, judged = "", []
        for d in deltas:
            pushed += d
            judged += s.push_text(d)
            check(s, pushed, judged)
        assert s.pending_text  # the last chunk is held back
        judged += s.flush()
        assert s.pending_text == ""
        check(s, pushed, judged)
        assert [v.token_id for v in judged] == encode(tok, fix_surrogates(text))
        sync_ids = [v.token_id for v in judged]

    async def main():
        a = await sg.open_async("hi")
        pushed, judged = "", []
        for d in deltas:
            pushed += d
            judged += await a.push_text(d)
            check(a, pushed, judged)
        judged += await a.flush()
        assert a.pending_text == ""
        await a.aclose()
        return [v.token_id for v in judged]

    assert asyncio.run(main()) == sync_ids
    sg.close()


def test_failed_text_push_keeps_its_text_pending_and_retries_it(loaded):
    """A text push the engine refuses (the session would outgrow max_context) judges nothing: its text
    stays pending, nothing more is released, and its ids are retried by the next push."""
    model, labels, tok = loaded
    sg = StreamGuard(model, tok, labels, max_sessions=1, max_context=64)
    with sg.open("hi") as s:
        room = 64 - len(s.prompt_ids)
        first = "word " * (room - 4)
        vs = s.push_text(first)
        before = s.pending_text
        with pytest.raises(CapacityError):
            s.push_text("more and more words " * 4)
        assert s.pending_text == before + "more and more words " * 4  # nothing of it was released
        assert s.push([100]) != []  # the session goes on
        assert released_ids(tok, first + "more and more words " * 4, s.pending_text) == [v.token_id for v in vs]
        with pytest.raises(CapacityError):
            s.flush()  # the unjudged ids are retried, and still do not fit
        assert s.pending_text.endswith("more and more words " * 4)
    assert sg.engine.active == 0


def test_held_length_counts_pushed_characters():
    assert _held_length("hello world", " world") == 6
    assert _held_length("hello", "") == 0
    assert _held_length("a\ud83d\ude00b", "\U0001F600b") == 3  # a pair is two pushed characters
    assert _held_length("a\udc00b", "\ufffdb") == 2  # a lone half is one (U+FFFD in the tokenizer)
    assert _held_length("ab\ud83d", "b\ud83d") == 2  # a high half waiting for its partner
    assert _held_length("abc", "xc") == 3  # no match: everything stays pending (never over-released)
