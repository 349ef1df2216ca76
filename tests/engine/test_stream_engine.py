"""The streaming engine: parity with one full forward, batched and static steps, capacity, rollback."""

from __future__ import annotations

import random

import pytest
import torch

from qguard.checkpoint import build_stream_model, open_checkpoint
from qguard.engine.scoring import score_sequences
from qguard.engine.stream import HeadProbs, StreamEngine
from qguard.errors import CapacityError, InputError

TOL = 1e-4  # fp32 on CPU


def random_ids(rng: random.Random, n: int) -> list[int]:
    # ordinary text tokens only: no special ids, so every pushed token is an answer token
    return [rng.randrange(100, 150000) for _ in range(n)]


def max_diff(a: HeadProbs, ref, start: int, end: int) -> float:
    return max((getattr(a, f) - getattr(ref, f)[start:end]).abs().max().item()
               for f in ("risk", "category", "query_risk", "query_category"))


# ----------------------------------------------------------------------------------------- engine parity

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("static_decode", [False, True])
def test_engine_matches_full_forward_for_mixed_sessions_and_chunkings(loaded, seed, static_decode):
    """static_decode: one-token steps take the static-shape path that CUDA graphs capture on GPU."""
    model = loaded[0]
    rng = random.Random(seed)
    eng = StreamEngine(model, max_sessions=6, max_context=200, prefill_chunk=rng.choice([3, 8, 64]),
                       static_decode=static_decode)
    seqs: dict[int, list[int]] = {}
    outs: dict[int, list[HeadProbs]] = {}
    done: list[tuple[list[int], HeadProbs]] = []
    for _ in range(25):
        if len(seqs) < 5 and rng.random() < 0.3:  # sessions join at any time
            slot = eng.allocate()
            seqs[slot], outs[slot] = [], []
        if seqs and rng.random() < 0.1:  # ... and leave, freeing their slot for a later one
            slot = rng.choice(list(seqs))
            if outs[slot]:
                done.append((seqs[slot], HeadProbs.cat(outs[slot])))
            del seqs[slot], outs[slot]
            eng.free(slot)
        for slot in seqs:
            if rng.random() < 0.7:
                ids = random_ids(rng, rng.choice([1, 1, 1, 2, 5, 17, 40]))
                if eng.length(slot) + len(ids) <= 200:
                    eng.submit(slot, ids)
                    seqs[slot] += ids
        for slot, hp in eng.run().items():
            outs[slot].append(hp)
    done += [(seqs[s], HeadProbs.cat(outs[s])) for s in seqs if outs[s]]
    assert len(done) >= 3
    refs = score_sequences(model, [seq for seq, _ in done])
    for (seq, hp), ref in zip(done, refs):
        assert len(hp) == len(seq)
        assert max_diff(hp, ref, 0, len(seq)) < TOL
    assert eng.stats.tokens == sum(len(s) for s, _ in done)
    assert bool(eng.graphs and eng.graphs.buckets) == static_decode  # the static path really ran


def test_batched_step_is_one_forward_and_uses_gather_for_sparse_slots(loaded):
    model = loaded[0]
    eng = StreamEngine(model, max_sessions=5, max_context=64)
    slots = [eng.allocate() for _ in range(5)]
    eng.free(slots[1])
    eng.free(slots[3])  # live slots 0, 2, 4: not consecutive, so the step gathers rows
    rng = random.Random(3)
    seqs = {s: random_ids(rng, 9) for s in (0, 2, 4)}
    for s, ids in seqs.items():
        eng.submit(s, ids)
    eng.run()
    before = eng.stats.forwards
    for s in seqs:
        nxt = random_ids(rng, 1)
        seqs[s] += nxt
        eng.submit(s, nxt)
    out = eng.run()
    assert eng.stats.forwards == before + 1  # one token per session: one batched forward
    refs = score_sequences(model, [seqs[s] for s in (0, 2, 4)])
    for s, ref in zip((0, 2, 4), refs):
        assert max_diff(out[s], ref, 9, 10) < TOL


def test_engine_capacity_errors_are_clear(loaded):
    eng = StreamEngine(loaded[0], max_sessions=2, max_context=16)
    a = eng.allocate()
    eng.allocate()
    with pytest.raises(CapacityError, match="all 2 stream sessions are in use"):
        eng.allocate()
    eng.submit(a, list(range(100, 110)))
    with pytest.raises(CapacityError, match="would reach 17 tokens, over the engine's max_context of 16"):
        eng.submit(a, list(range(100, 107)))
    with pytest.raises(InputError, match="token ids must be integers"):
        eng.submit(a, [-1])
    eng.free(a)
    assert eng.allocate() == a  # a freed slot is reused
    with pytest.raises(InputError, match="max_context must be in"):
        StreamEngine(loaded[0], max_context=10**9)


def test_slot_released_during_a_run_is_freed_after_its_collection(loaded):
    """`release_later` (an event loop closing a session while another thread runs the engine) never
    frees a slot in the middle of a run: the run still collects its rows, and the slot is free after."""
    eng = StreamEngine(loaded[0], max_sessions=3, max_context=64, prefill_chunk=4)
    a, b = eng.allocate(), eng.allocate()
    rng = random.Random(4)
    eng.submit(a, random_ids(rng, 9))  # three forwards at prefill_chunk 4
    eng.submit(b, random_ids(rng, 1))
    eng.step()
    eng.release_later(a)  # between two steps of one run
    out = eng.run_packed()
    assert set(out.rows) == {a, b} and out.rows[a][1] - out.rows[a][0] == 9
    assert a in eng.free_slots and eng.active == 1


def test_failed_run_rolls_every_slot_back(loaded):
    """A forward that raises mid-run leaves every slot as it was before the run (pending tokens and
    outputs of earlier forwards of the run dropped), so the next run is exact."""
    model = loaded[0]
    eng = StreamEngine(model, max_sessions=3, max_context=64, prefill_chunk=4)
    a, b = eng.allocate(), eng.allocate()
    rng = random.Random(6)
    seqs = {a: random_ids(rng, 3), b: random_ids(rng, 2)}
    for slot, ids in seqs.items():
        eng.submit(slot, ids)
    eng.run()
    forward, calls = eng._forward, []

    def flaky(group, T):
        calls.append(T)
        if len(calls) == 2:
            raise RuntimeError("device fault")
        return forward(group, T)

    eng._forward = flaky
    eng.submit(a, random_ids(rng, 7))  # two forwards: the first one succeeds
    eng.submit(b, random_ids(rng, 1))
    with pytest.raises(RuntimeError, match="device fault"):
        eng.run_packed()
    assert (eng.length(a), eng.length(b)) == (3, 2) and eng.chunks == []
    eng._forward = forward
    more = {a: random_ids(rng, 5), b: random_ids(rng, 2)}
    for slot, ids in more.items():
        eng.submit(slot, ids)
    out = eng.run()
    refs = score_sequences(model, [seqs[a] + more[a], seqs[b] + more[b]])
    assert max_diff(out[a], refs[0], 3, 8) < TOL and max_diff(out[b], refs[1], 2, 4) < TOL


def test_bf16_engine_stays_close_to_the_bf16_full_forward(tiny_stream):
    # bf16 (the GPU default): incremental and full forwards round differently; documented tolerance 2e-2
    model, _ = build_stream_model(open_checkpoint(tiny_stream), torch.device("cpu"), torch.bfloat16)
    eng = StreamEngine(model, max_sessions=2, max_context=128, prefill_chunk=32)
    rng = random.Random(17)
    slots = [eng.allocate() for _ in range(2)]
    seqs = {s: [] for s in slots}
    outs = {s: [] for s in slots}
    for _ in range(10):
        for s in slots:
            ids = random_ids(rng, rng.choice([1, 4, 9]))
            seqs[s] += ids
            eng.submit(s, ids)
        for s, hp in eng.run().items():
            outs[s].append(hp)
    for s, ref in zip(slots, score_sequences(model, [seqs[s] for s in slots])):
        assert max_diff(HeadProbs.cat(outs[s]), ref, 0, len(seqs[s])) < 2e-2


def test_compiled_static_step_matches_full_forward(loaded):
    """compile_step: the static decode step through torch.compile (inductor) stays exact."""
    model = loaded[0]
    rng = random.Random(7)
    eng = StreamEngine(model, max_sessions=3, max_context=64, static_decode=True, compile_step=True)
    slots = [eng.allocate() for _ in range(2)]
    seqs = {s: random_ids(rng, 5) for s in slots}
    for s in slots:
        eng.submit(s, seqs[s])
    outs = {s: [hp] for s, hp in eng.run().items()}
    for _ in range(6):  # one token per session per step: the compiled static path
        for s in slots:
            ids = random_ids(rng, 1)
            eng.submit(s, ids)
            seqs[s] += ids
        for s, hp in eng.run().items():
            outs[s].append(hp)
    assert eng.graphs.buckets
    refs = score_sequences(model, [seqs[s] for s in slots])
    for s, ref in zip(slots, refs):
        assert max_diff(HeadProbs.cat(outs[s]), ref, 0, len(seqs[s])) < TOL


# ------------------------------------------------------------------------------ per-step host inputs

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_rows_are_the_additive_mask_of_keys_up_to_each_query(dtype):
    """SlotCache.mask_rows (a row gather from one table) == additive_mask(keys <= q), bit for bit."""
    from qguard.engine.kvcache import SlotCache
    from qguard.model.qwen3 import additive_mask

    cache = SlotCache(1, 2, 1, 50, 4, dtype, "cpu")
    q = torch.tensor([0, 1, 7, 48, 49, 53])  # 53: a padded query past the cache (every key visible)
    for span in (1, 8, 49, 50):
        got = cache.mask_rows(49 - q.clamp(max=49), span)
        want = additive_mask(torch.arange(span)[None, :] <= q[:, None], dtype)
        assert got.dtype == dtype and torch.equal(got, want)


def test_static_inputs_are_one_buffer_filled_by_one_copy(loaded):
    """The static step's ids, positions and write targets are views of ONE per-bucket buffer; padding
    rows read id 0 at position 0 and write to the scratch slot; sparse slots land at their rows."""
    eng = StreamEngine(loaded[0], max_sessions=8, max_context=32, static_decode=True)
    g = eng.graphs
    b, slots = g.load_inputs([(0, 101, 3), (1, 102, 4), (2, 103, 5)])  # dense: bucket 4, one padding row
    assert slots == (0, 1, 2) and b.ids.shape == (4, 1) and b.inputs.shape == (3, 8)  # rows padded to 8
    for view in (b.ids, b.pos, b.write_slot, b.write_pos):
        assert view.untyped_storage().data_ptr() == b.inputs.untyped_storage().data_ptr()
        assert view.data_ptr() % 64 == 0
    sc = g.cache.scratch
    assert torch.cat([b.ids, b.pos, b.write_slot], 1).T.tolist() == [[101, 102, 103, 0], [3, 4, 5, 0], [0, 1, 2, sc]]
    b, slots = g.load_inputs([(5, 201, 7), (1, 202, 9)])  # sparse, unordered: bucket 8
    assert slots == (5, 1) and b.inputs.shape == (3, 8)
    assert b.inputs.tolist() == [[0, 202, 0, 0, 0, 201, 0, 0], [0, 9, 0, 0, 0, 7, 0, 0],
                                 [sc, 1, sc, sc, sc, 5, sc, sc]]
    out = g.run([(1, 300, 10), (0, 301, 11)])  # dense but unordered rows: each row gets its own slot's output
    b = g.last
    assert g.buckets[2, 32] is b  # bucket 2, span min(64, max_context)
    assert b.ids.flatten().tolist() == [301, 300] and torch.equal(out, b.out[[1, 0]])


def test_static_steps_read_a_span_bucket_not_the_whole_cache(loaded):
    """With a large cache and short sessions the static step attends over a power-of-two span bucket
    above the last position (not max_context), and stays exact while sessions cross span boundaries."""
    model = loaded[0]
    rng = random.Random(5)
    eng = StreamEngine(model, max_sessions=4, max_context=512, static_decode=True)
    slots = [eng.allocate() for _ in range(3)]
    seqs = {s: random_ids(rng, 40 + 10 * i) for i, s in enumerate(slots)}
    for s in slots:
        eng.submit(s, seqs[s])
    outs = {s: [hp] for s, hp in eng.run().items()}
    spans = set()
    for _ in range(100):  # positions 40..159: spans 64, 128 and 256
        for s in slots:
            ids = random_ids(rng, 1)
            eng.submit(s, ids)
            seqs[s] += ids
        for s, hp in eng.run().items():
            outs[s].append(hp)
        spans.add(eng.graphs.last.span)
    assert spans == {64, 128, 256} and {span for _, span in eng.graphs.buckets} == spans
    refs = score_sequences(model, [seqs[s] for s in slots])
    for s, ref in zip(slots, refs):
        assert max_diff(HeadProbs.cat(outs[s]), ref, 0, len(seqs[s])) < TOL


def test_static_steps_with_sparse_slots_and_several_steps_per_run(loaded):
    """prefill_chunk=1 sends every token through the static path, several static steps per run (the
    returned outputs must not alias the bucket's buffer); a closed middle slot makes the rows sparse."""
    model = loaded[0]
    rng = random.Random(11)
    eng = StreamEngine(model, max_sessions=6, max_context=64, prefill_chunk=1, static_decode=True)
    slots = [eng.allocate() for _ in range(5)]
    eng.free(slots[2])
    live = [s for s in slots if s != slots[2]]
    seqs = {s: [] for s in live}
    outs: dict[int, list[HeadProbs]] = {s: [] for s in live}
    for _ in range(4):
        for s in live:
            ids = random_ids(rng, rng.choice([1, 2, 4]))
            eng.submit(s, ids)
            seqs[s] += ids
        for s, hp in eng.run().items():
            outs[s].append(hp)
    assert eng.stats.padded_tokens > eng.stats.tokens  # padding rows (slot 2, and to the bucket) ran too
    for s, ref in zip(live, score_sequences(model, [seqs[s] for s in live])):
        assert max_diff(HeadProbs.cat(outs[s]), ref, 0, len(seqs[s])) < TOL


def test_step_plan_moves_all_its_inputs_in_one_tensor(loaded):
    """The eager step's plan: write targets, positions, ids and mask rows come from one packed tensor."""
    from qguard.engine.kvcache import SlotCache, StepPlan
    from qguard.model.qwen3 import additive_mask

    cache = SlotCache(1, 4, 1, 16, 4, torch.float32, "cpu")
    slots, past, counts = torch.tensor([0, 2, 3]), torch.tensor([5, 0, 14]), torch.tensor([2, 4, 1])
    ids = torch.arange(12).view(3, 4) + 100
    p = StepPlan(cache, slots, past, counts, 4, torch.device("cpu"), ids=ids)
    base = p.positions.untyped_storage().data_ptr()
    for t in (p.write_slot, p.write_pos, p.ids, p.read_slots):
        assert t.untyped_storage().data_ptr() == base
    assert p.read_range is None and p.read_slots.tolist() == [0, 2, 3]
    q = past[:, None] + torch.arange(4)
    assert torch.equal(p.positions, q) and torch.equal(p.ids, ids)
    assert p.write_slot.tolist() == [[0, 0, 4, 4], [2, 2, 2, 2], [3, 4, 4, 4]]
    assert p.write_pos.tolist() == [[5, 6, 2, 3], [0, 1, 2, 3], [14, 1, 2, 3]]
    assert p.span == 15
    want = additive_mask(torch.arange(15)[None, None, :] <= q[:, :, None], torch.float32)[:, None]
    assert torch.equal(p.mask, want)  # query 17 (padding of slot 3) is past the cache: sees every key
