"""Reduced precision on CPU (bf16, int8 weights: qguard.model.quant) and `qguard check-precision`.

Tolerances (documented in docs/benchmarks.md, "CPU precision"): on the tiny random checkpoints,
probabilities of a reduced-precision model stay within PROB_TOL of fp32; a reduced-precision engine
equals the same model's full forward within ENGINE_TOL (int8: only float rounding differs, since the int8
products are exact and each token is quantized on its own; bf16 activations round like bf16).
"""

from __future__ import annotations

import copy
import json
import random
import shutil

import httpx
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient

from qguard.checkpoint import build_gen_model, build_stream_model, open_checkpoint
from qguard.cli import QUANTIZE_CHOICES, main
from qguard.engine.gen import GenEngine, reference_greedy
from qguard.engine.scoring import score_sequences
from qguard.engine.stream import HeadProbs, StreamEngine
from qguard.errors import InputError
from qguard.families.registry import GenFamily
from qguard.guard import Guard
from qguard.model import quant
from qguard.model.quant import Int8Linear, Int8WeightLinear, QuantizedModelError, quantize_model
from qguard.stream import StreamGuard
from qguard.tokenizer import load_tokenizer

PROB_TOL = 0.05
# int4 (16 levels per group of 64 weights) on a tiny random model moves probabilities further: documented in
# docs/benchmarks.md ("CPU precision") next to the measured agreement
SCHEME_PROB_TOL = {"int4-weight": 0.12}
# engine vs the same model's full forward: int8 rounds only in float (exact int8 products, each token quantized
# on its own); int8-weight computes in bf16, so its one-token and many-token kernels round like bf16
ENGINE_TOL = {"int8": 1e-3, "int8-weight": 1e-2, "int4-weight": 1e-2, None: 2e-2}
SCHEMES = quant.SCHEMES
PROMPTS = ["How do I bake bread?", "How can I make a bomb at home?", "Tell me about the weather in Paris today.",
           "Write a poem about the sea.", "What is the address of my neighbour?"]
RESPONSE = "Sure, here is a long answer that goes on for a while so that the guard has tokens to judge."


def stream_model(path, dtype=torch.float32, scheme=None, kernel=None):
    model, labels = build_stream_model(open_checkpoint(path), torch.device("cpu"), dtype)
    if scheme:
        quantize_model(model, scheme, kernel=kernel)
    return model, labels


def random_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 150000) for _ in range(n)]


def max_diff(a: HeadProbs, ref, start: int, end: int) -> float:
    return max((getattr(a, f) - getattr(ref, f)[start:end]).abs().max().item()
               for f in ("risk", "category", "query_risk", "query_category"))


# ------------------------------------------------------------------------------------------- int8 math

def test_quantized_linear_is_close_to_the_float_one_and_rows_are_independent():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 80, generator=g) * 0.05, torch.randn(96, generator=g)
    x = torch.randn(6, 80, generator=g)
    ref = F.linear(x, w, b)
    for lin in (Int8Linear(w, b), Int8WeightLinear(w, b)):
        rel = (lin(x) - ref).norm() / ref.norm()
        assert rel < 0.02, (type(lin).__name__, rel)
    lin = Int8Linear(w, b)
    # one row's quantization never depends on the others (per-row scales; a per-tensor scale, as in
    # torch's quantize_dynamic, would coarsen row 0 next to a 1000x larger row)
    big = torch.cat([x[:1], 1000 * x[1:2]])
    assert torch.allclose(lin(big)[0], lin(x[:1])[0], atol=1e-6, rtol=0)
    # the residual form adds exactly what forward returns
    out = torch.randn(6, 96, generator=g)
    assert torch.allclose(lin.addmm_(out.clone(), x), out + lin(x), atol=1e-5)
    # a zero row or weight channel quantizes to zeros, not NaN
    w0 = w.clone()
    w0[3] = 0
    assert torch.isfinite(Int8Linear(w0)(torch.zeros(2, 80))).all()


def test_int8_kernels_are_exact_and_agree():
    """Each available kernel passes the exactness probe (extreme int8 sums, where CPUs without VNNI
    saturate), and every exact one gives the same results (integer products, same scaling): which one
    the timing picks changes speed only. fbgemm and `_int_mm` are bit-identical (both accumulate in int32
    and scale the same fp32 product); oneDNN fuses the scaling and may round it differently."""
    assert quant._exact(quant.IntMMKernel())
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(64, 48, generator=g), torch.randn(9, 48, generator=g)
    ref = Int8Linear(w, kernel=quant.pick_kernel("int_mm"))
    ran = []
    for name in ("fbgemm", "onednn"):
        try:
            lin = Int8Linear(w, kernel=quant.pick_kernel(name))
        except InputError:
            continue  # not available (or not exact) on this CPU
        ran.append(name)
        assert torch.equal(ref.weight_int8()[0], lin.weight_int8()[0])
        for rows in (x[:1], x):  # a decode step's one row, and a batch
            assert torch.allclose(ref(rows), lin(rows), atol=1e-5, rtol=1e-5)
            if name == "fbgemm":
                assert torch.equal(ref(rows), lin(rows))
                assert torch.equal(ref(rows.bfloat16()), lin(rows.bfloat16()))
    if not ran:
        pytest.skip("neither fbgemm nor oneDNN int8 GEMMs are available (or exact) on this CPU")
    with pytest.raises(InputError, match="unknown int8 kernel"):
        quant.pick_kernel("nope")


def test_fbgemm_rows_are_independent_and_copies_keep_the_weights():
    """fbgemm's op quantizes its input with one scale for the whole tensor; qguard hands it rows already
    quantized on their own scales, so a row's result does not depend on the rows beside it."""
    try:
        kernel = quant.pick_kernel("fbgemm")
    except InputError:
        pytest.skip("fbgemm's int8 GEMM is not available (or not exact) on this CPU")
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(96, 80, generator=g), torch.randn(4, 80, generator=g)
    lin = Int8Linear(w, kernel=kernel)
    loud = torch.cat([x[:1], 1000 * x[1:]])  # rows 1000x larger would coarsen row 0 on a shared scale
    assert torch.equal(lin(loud)[0], lin(x[:1])[0])
    clone = copy.deepcopy(lin)  # fbgemm's packed weight is an opaque object: copies go through the int8 values
    assert clone.kernel is kernel and torch.equal(clone(x), lin(x))


@pytest.mark.parametrize("k", [80, 128])  # 80: not a multiple of the group, so zero-padded
def test_int4_weights_round_to_their_group_grid_and_the_kernel_multiplies_by_them(k):
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(96, k, generator=g), torch.randn(7, k, generator=g)
    m = quant.Int4WeightLinear(w)
    d = quant.dequantize_int4(m)  # what the kernel computes with
    groups = torch.nn.functional.pad(w, (0, m.pad)).view(96, -1, m.GROUP)
    step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(m.GROUP, dim=1)[:, :k]
    assert ((d - w).abs() <= step / 2 + 0.02 * step + 1e-2).all()  # half a step, plus bf16 rounding
    assert len(torch.unique(d[0, :min(k, 64)])) <= 16  # 16 levels per group
    want = x.bfloat16().float() @ d.t()
    assert torch.allclose(m(x), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    assert m(x).dtype == torch.float32


def test_int8_kernel_is_chosen_by_measurement():
    """Of the exact kernels, the one measured fastest on the weight's shape is used, whatever its name
    (oneDNN ran a 100x slower reference path on one CPU with VNNI), and a slow one is dropped after the
    one-row probe."""
    import time

    class Slow(quant.IntMMKernel):
        name = "slow"
        calls = 0

        def mm(self, xq, packed, scale, dtype):
            Slow.calls += 1
            time.sleep(0.01)
            return super().mm(xq, packed, scale, dtype)

    fast, slow = quant.IntMMKernel(), Slow()
    assert quant._fastest([slow, fast], 96, 64) is fast
    assert quant._fastest([fast, slow], 96, 64) is fast
    assert Slow.calls == 2 * 6  # warm-up + 5 timed runs at one row, never the 16-row probe
    k = quant.pick_kernel(shape=(96, 64))
    assert quant._exact(k) and quant.pick_kernel(shape=(96, 64)) is k  # measured once per shape


def test_int8_kernel_is_chosen_for_the_workload():
    """Kernels rank differently by row count (fbgemm leads at one row, `_int_mm` at prefill sizes on this
    project's CPU): the one fastest over the rows a family asks for wins (Gen prefills, Stream decodes)."""
    import time

    class SlowAt(quant.IntMMKernel):
        def __init__(self, name, slow):
            self.name, self.slow = name, slow

        def mm(self, xq, packed, scale, dtype):
            if self.slow(xq.shape[0]):
                time.sleep(0.004)
            return super().mm(xq, packed, scale, dtype)

    decoder = SlowAt("decoder", lambda m: m >= 256)  # fast for one-token steps, slow for prefill
    prefiller = SlowAt("prefiller", lambda m: m == 1)
    for kernels in ([decoder, prefiller], [prefiller, decoder]):
        assert quant._fastest(kernels, 96, 64) is decoder  # DECODE_ROWS: (1, 16)
        assert quant._fastest(kernels, 96, 64, rows=(16, 512)) is prefiller


def test_weight_only_small_and_large_batches_agree():
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(64, 48, generator=g), torch.randn(2 * Int8WeightLinear.SMALL_M, 48, generator=g)
    lin = Int8WeightLinear(w)
    wq, scale = lin.weight_int8()
    exact = F.linear(x, wq.float() * scale[:, None])  # the int8 weights in fp32: what both paths approximate
    small = torch.cat([lin(r) for r in x.split(1)])  # the int8pack kernel, one row at a time
    for y in (small, lin(x)):  # lin(x): the dequantize + bf16 GEMM path; both round like bf16
        assert (y - exact).norm() / exact.norm() < 1e-2


# ------------------------------------------------------------------------------------------- Stream

@pytest.mark.parametrize("scheme,dtype", [(None, torch.bfloat16), *((s, torch.float32) for s in SCHEMES),
                                          ("int8", torch.bfloat16)])
def test_reduced_stream_models_stay_close_to_fp32(tiny_stream, scheme, dtype):
    ref, _ = stream_model(tiny_stream)
    red, _ = stream_model(tiny_stream, dtype, scheme)
    rng = random.Random(3)
    seqs = [random_ids(rng, n) for n in (3, 40, 130)]
    for a, b in zip(score_sequences(ref, seqs), score_sequences(red, seqs)):
        for f in ("risk", "category", "query_risk", "query_category"):
            d = (getattr(a, f) - getattr(b, f)).abs().max().item()
            assert d < SCHEME_PROB_TOL.get(scheme, PROB_TOL), (scheme, dtype, f, d)
    if scheme:  # the decoder's float weights are gone: int8 is ~1/4 of their fp32 bytes
        assert quant.decoder_weight_bytes(red) < 0.3 * quant.decoder_weight_bytes(ref)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_engine_matches_its_full_forward_for_any_chunking(tiny_stream, scheme):
    model, _ = stream_model(tiny_stream, scheme=scheme)
    eng = StreamEngine(model, max_sessions=3, max_context=256, prefill_chunk=16)
    rng = random.Random(5)
    slots = [eng.allocate() for _ in range(3)]
    seqs = {s: [] for s in slots}
    outs = {s: [] for s in slots}
    for _ in range(8):
        for s in slots:
            ids = random_ids(rng, rng.choice([1, 1, 3, 20]))
            seqs[s] += ids
            eng.submit(s, ids)
        for s, hp in eng.run().items():
            outs[s].append(hp)
    for s, ref in zip(slots, score_sequences(model, [seqs[s] for s in slots])):
        assert max_diff(HeadProbs.cat(outs[s]), ref, 0, len(seqs[s])) < ENGINE_TOL[scheme]


@pytest.mark.parametrize("scheme,dtype", [("int8", "float32"), ("int8-weight", "float32"), (None, "bfloat16")])
def test_reduced_sessions_end_to_end(tiny_stream, scheme, dtype):
    """Guard and live sessions load reduced models through from_pretrained; verdicts stay close to fp32."""
    full = Guard.from_pretrained(tiny_stream, device="cpu")
    red = Guard.from_pretrained(tiny_stream, device="cpu", dtype=dtype, quantize=scheme)
    for p in PROMPTS:
        a, b = full.classify_prompt(p), red.classify_prompt(p)
        assert max(abs(a.probs[k] - b.probs[k]) for k in a.probs) < PROB_TOL
    sg = StreamGuard.from_pretrained(tiny_stream, device="cpu", dtype=dtype, quantize=scheme, max_sessions=2,
                                     max_context=256)
    assert quant.quantization_of(sg.model) == scheme
    with sg.open(PROMPTS[0]) as s:
        live = s.push_text(RESPONSE) + s.flush()
        final = s.finish()
    trace = red.stream_trace(PROMPTS[0], RESPONSE)  # the reduced model's own full forward
    assert [t.token_id for t in trace.tokens] == [v.token_id for v in live]
    assert max(abs(t.probs[k] - v.probs[k]) for t, v in zip(trace.tokens, live) for k in t.probs) < ENGINE_TOL[scheme]
    assert final.label == trace.response.label
    sg.close()


def test_quantized_guard_through_the_streaming_proxy(tiny_stream):
    from qguard.policy import Action, Policy
    from qguard.serve import ServeSettings, create_app

    # allow everything: the test is about the int8 model serving the live path, not about the policy
    guard = Guard.from_pretrained(tiny_stream, device="cpu", quantize="int8", policy=Policy(default_action=Action.ALLOW))
    deltas = ["Sure", ", here", " is", " an", " answer", " that", " goes", " on", "."]

    async def body():
        for i, d in enumerate(deltas):
            last = i == len(deltas) - 1  # since #14 a stream that never says how it ended is an upstream error
            chunk = {"id": "up", "object": "chat.completion.chunk", "created": 1, "model": "m",
                     "choices": [{"index": 0, "delta": {"content": d}, "finish_reason": "stop" if last else None}]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    class Body(httpx.AsyncByteStream):
        def __aiter__(self):
            return body()

    up = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(200, stream=Body())),
                           base_url="http://upstream/v1")
    app = create_app(guard, ServeSettings(upstream_url="http://upstream/v1"), upstream=up)
    r = TestClient(app).post("/v1/chat/completions", json={"model": "m", "stream": True,
                                                          "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    events = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e.get("choices"))
    assert text == "".join(deltas)
    final = [e for e in events if "response" in e.get("qguard", {})]
    offline = guard.classify_response("hi", "".join(deltas))  # the same int8 model over the finished answer
    assert final[-1]["qguard"]["response"]["label"] == offline.label.value
    assert final[-1]["qguard"]["response"]["unsafe_position"] == offline.unsafe_position


# ------------------------------------------------------------------------------------------- Gen

def trained_gen(tmp_path):
    from tests.engine.test_gen_engine import (
        trained_gen_checkpoint,  # a tiny Gen model that answers in the official format
    )

    return trained_gen_checkpoint(tmp_path / "trained_gen")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_gen_engine_equals_greedy_decoding_of_the_same_model(tmp_path, scheme):
    from tests.engine.test_gen_engine import conversations

    path = trained_gen(tmp_path)
    ref = build_gen_model(open_checkpoint(path), torch.device("cpu"), torch.float32)
    if scheme == "int4-weight":  # Stream only: on Gen-0.6B it changed most answers (docs/benchmarks.md)
        with pytest.raises(InputError, match="not offered for gen checkpoints"):
            Guard.from_pretrained(path, device="cpu", quantize=scheme)
        return
    model = quantize_model(build_gen_model(open_checkpoint(path), torch.device("cpu"), torch.float32), scheme)
    tok = load_tokenizer(path)
    eng, ref_eng = GenEngine(model, tok, max_new_tokens=24), GenEngine(ref, tok, max_new_tokens=24)
    convs = conversations(16, seed=7)
    got, want = eng.classify(convs), ref_eng.classify(convs)
    for conv, r in zip(convs, got):  # batching and the shared prefix change nothing in the quantized model
        assert r.token_ids == reference_greedy(model, eng.prepare(conv).ids, 24)
    same = sum(a.answer == b.answer and a.error == b.error for a, b in zip(got, want))
    assert same >= len(convs) - 1, [(a.text, b.text) for a, b in zip(got, want)]
    assert max(abs(a.severity_probs[k] - b.severity_probs[k]) for a, b in zip(got, want)
               for k in a.severity_probs) < SCHEME_PROB_TOL.get(scheme, PROB_TOL)


def test_bf16_and_quantized_gen_through_guard(tiny_gen):
    full = Guard.from_pretrained(tiny_gen, device="cpu")
    for kw in ({"dtype": "bfloat16"}, {"quantize": "int8"}, {"dtype": "bfloat16", "quantize": "int8"}):
        red = Guard.from_pretrained(tiny_gen, device="cpu", **kw)
        for a, b in zip(full.classify_prompts(PROMPTS[:3]), red.classify_prompts(PROMPTS[:3])):
            assert max(abs(a.probs[k] - b.probs[k]) for k in a.probs) < PROB_TOL, kw


def test_loaders_time_the_int8_kernel_on_the_familys_workload(tiny_gen, tiny_stream, monkeypatch):
    """Gen checkpoints pick their int8 GEMM on prefill-sized inputs, Stream ones on one-token steps; the
    model says which kernel runs."""
    asked = []
    pick = quant.pick_kernel

    def spy(name=None, shape=None, rows=quant.DECODE_ROWS):
        asked.append(rows)
        return pick(name, shape, rows)

    monkeypatch.setattr(quant, "pick_kernel", spy)
    gen = Guard.from_pretrained(tiny_gen, device="cpu", quantize="int8")
    stream = Guard.from_pretrained(tiny_stream, device="cpu", quantize="int8")
    assert asked == [GenFamily.quantize_rows, quant.DECODE_ROWS]
    assert max(GenFamily.quantize_rows) >= 256
    for g in (gen, stream):
        assert quant.kernel_of(g.model) in quant.KERNELS
    assert quant.kernel_of(Guard.from_pretrained(tiny_stream, device="cpu", quantize="int8-weight").model) is None


# ------------------------------------------------------------------------------ inference-only models

def test_quantized_models_refuse_saving_training_and_loading(tiny_stream, tiny_gen, tmp_path):
    from qguard.train.gen import save_gen
    from qguard.train.stream import save_stream

    model, _ = stream_model(tiny_stream, scheme="int8")
    # saving over the original checkpoint: refused before anything is written, the original is intact
    original = tmp_path / "orig"
    shutil.copytree(tiny_stream, original)
    before = {p.name: p.read_bytes() for p in original.iterdir() if p.is_file()}
    with pytest.raises(QuantizedModelError, match="cannot be saved"):
        save_stream(model, original)
    assert {p.name: p.read_bytes() for p in original.iterdir() if p.is_file()} == before
    with pytest.raises(QuantizedModelError):
        model.model.state_dict()
    with pytest.raises(QuantizedModelError):
        model.load_state_dict({})
    with pytest.raises(QuantizedModelError, match="cannot be unfused or trained"):
        model.train()
    with pytest.raises(QuantizedModelError, match="fused inference form"), torch.enable_grad():
        model(torch.tensor([[1, 2, 3]]))
    with pytest.raises(QuantizedModelError, match="already quantized"):
        quantize_model(model, "int8")
    gen = quantize_model(build_gen_model(open_checkpoint(tiny_gen), torch.device("cpu"), torch.float32), "int8")
    with pytest.raises(QuantizedModelError):
        save_gen(gen, tmp_path / "gen_out")
    assert not (tmp_path / "gen_out").exists()


def test_quantized_model_copies_and_casts(tiny_stream):
    model, _ = stream_model(tiny_stream, scheme="int8")
    ids = torch.tensor([[100, 200, 300, 400]])
    with torch.inference_mode():
        want = model(ids).risk_logits
        assert torch.equal(copy.deepcopy(model)(ids).risk_logits, want)  # oneDNN's packed weight is re-packed
        b = model.to(torch.bfloat16)(ids).risk_logits  # the rest of the model casts; int8 stays int8
    assert b.dtype == torch.bfloat16 and (b.float().softmax(-1) - want.softmax(-1)).abs().max() < PROB_TOL


def test_bad_quantize_options_are_clear(tiny_stream):
    with pytest.raises(InputError, match="unknown quantize option"):
        Guard.from_pretrained(tiny_stream, device="cpu", quantize="int4")
    with pytest.raises(InputError, match="CPU option"):
        quant.check_quantize("int8", "cuda")
    assert QUANTIZE_CHOICES == SCHEMES  # the CLI's choices are the library's schemes


# ------------------------------------------------------------------------------------- check-precision

def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    return path


def eval_rows(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    prompts = [{"id": f"p{i}", "task": "prompt", "label": "Unsafe" if i % 2 else "Safe",
                "messages": [{"role": "user", "content": p}]} for i, p in enumerate(PROMPTS)]
    responses = [{"id": f"r{i}", "task": "response", "label": "Safe",
                  "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": RESPONSE}]}
                 for i, p in enumerate(PROMPTS[:3])]
    write_rows(d / "prompts.jsonl", prompts)
    write_rows(d / "responses.jsonl", responses)
    return d


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_check_precision_stream_json_and_table(capsys, tiny_stream, tmp_path):
    d = eval_rows(tmp_path)
    out_file = tmp_path / "report.json"
    code, out, _ = run(capsys, "check-precision", "--model", str(tiny_stream), "--data", str(d), "--device", "cpu",
                       "--quantize", "int8", "--json", "--out", str(out_file))
    assert code == 0
    rep = json.loads(out)
    assert rep == json.loads(out_file.read_text("utf-8"))
    assert rep["reduced"] == {"dtype": "float32", "quantize": "int8"} and rep["kind"] == "stream"
    assert set(rep["benchmarks"]) == {"prompts", "responses"}
    p, r = rep["benchmarks"]["prompts"], rep["benchmarks"]["responses"]
    assert p["rows"] == p["compared"] == 5 and r["rows"] == 3
    assert 0 <= p["prob_max_diff"] < PROB_TOL and r["tokens"] > 3 * 10
    assert 0.5 <= r["token_label_agreement"] <= 1 and r["unsafe_position_agreement"] is not None
    assert rep["overall"]["compared"] == 8
    code, out, _ = run(capsys, "check-precision", "--model", str(tiny_stream), "--data", str(d / "prompts.jsonl"),
                       "--dtype", "bfloat16")
    assert code == 0 and "float32 vs bfloat16" in out and "prompts" in out and "overall" in out


def test_check_precision_gen(capsys, tiny_gen, tmp_path):
    d = eval_rows(tmp_path)
    code, out, _ = run(capsys, "check-precision", "--model", str(tiny_gen), "--data", str(d / "responses.jsonl"),
                       "--quantize", "int8-weight", "--json")
    assert code == 0
    rep = json.loads(out)
    assert rep["kind"] == "gen" and "refusal_agreement" in rep["benchmarks"]["responses"]
    assert rep["overall"]["compared"] == 3


def test_agreement_counts_flips_and_errors():
    from qguard.cli.precision import RowResult, agreement

    a = [RowResult(label="Safe", binary="Safe", probs=(0.9, 0.05, 0.05)),
         RowResult(label="Unsafe", binary="Unsafe", probs=(0.1, 0.8, 0.1), unsafe_position=3),
         RowResult(error="too long")]
    b = [RowResult(label="Safe", binary="Safe", probs=(0.8, 0.1, 0.1)),
         RowResult(label="Controversial", binary="Unsafe", probs=(0.1, 0.4, 0.5), unsafe_position=4),
         RowResult(error="too long")]
    s = agreement(a, b, "response", stream=True)
    assert s["compared"] == 2 and s["errors"] == 1 and s["error_mismatch"] == 0
    assert s["label_agreement"] == 0.5 and s["binary_agreement"] == 1.0
    assert s["unsafe_position_agreement"] == 0.5 and s["label_flips"] == {"Unsafe->Controversial": 1}
    assert s["prob_max_diff"] == pytest.approx(0.4) and s["prob_mean_diff"] == pytest.approx(0.25)


@pytest.mark.parametrize("extra,msg", [
    ([], "nothing to compare"),
    (["--dtype", "float32"], "nothing to compare"),
])
def test_check_precision_needs_a_reduced_precision(capsys, tiny_stream, tmp_path, extra, msg):
    d = eval_rows(tmp_path)
    code, _, err = run(capsys, "check-precision", "--model", str(tiny_stream), "--data", str(d), *extra)
    assert code == 2 and msg in err and "Traceback" not in err


def test_check_precision_rejects_bad_data(capsys, tiny_stream, tmp_path):
    base = ["check-precision", "--model", str(tiny_stream), "--quantize", "int8", "--data"]
    code, _, err = run(capsys, *base, str(tmp_path / "missing.jsonl"))
    assert code == 2 and "no such file" in err
    bad = write_rows(tmp_path / "bad.jsonl", [{"id": 1, "task": "prompt", "label": "Maybe",
                                               "messages": [{"role": "user", "content": "x"}]}])
    code, _, err = run(capsys, *base, str(bad))
    assert code == 2 and "bad.jsonl:1" in err and "label" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, *base, str(tmp_path / "empty"))
    assert code == 2 and "no .jsonl files" in err
    d = eval_rows(tmp_path)
    code, _, err = run(capsys, *base, str(d), "--out", str(tmp_path))
    assert code == 2 and "is a directory" in err
    with pytest.raises(SystemExit) as e:  # argparse: unknown scheme
        main(["check-precision", "--data", str(d), "--quantize", "int4"])
    assert e.value.code == 2


def test_several_variants_share_one_reference_pass(tiny_stream, tmp_path, monkeypatch):
    from qguard.cli import precision

    benchmarks = precision.read_data([str(eval_rows(tmp_path))], limit=2)
    loads = []
    real = Guard.from_pretrained
    monkeypatch.setattr(Guard, "from_pretrained", lambda *a, **kw: loads.append(kw) or real(*a, **kw))
    reps = precision.compare_precisions(str(tiny_stream), benchmarks, [("bfloat16", None), (None, "int8")],
                                        device="cpu")
    assert [r["reduced"] for r in reps] == [{"dtype": "bfloat16", "quantize": None},
                                            {"dtype": "float32", "quantize": "int8"}]
    assert len(loads) == 3 and loads[0]["quantize"] is None  # one fp32 reference, then each variant
    assert all(r["overall"]["compared"] == 4 for r in reps)
    with pytest.raises(InputError, match="nothing to compare"):  # checked before any model loads
        precision.compare_precisions(str(tiny_stream), benchmarks, [(None, "int8"), ("float32", None)], device="cpu")
    assert len(loads) == 3
