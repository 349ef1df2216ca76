"""Live stream moderation: the official-style loop, plain transformers with a KV cache, and qguard.

    python benchmarks/stream_bench.py --preset tiny      # quick CPU run (well under a minute)
    python benchmarks/stream_bench.py                    # Qwen3Guard-Stream-0.6B architecture

Random weights with the exact architecture (same compute as the real model). Baselines and qguard run
in the same process on the same weights, so the ratios are what counts on a shared, noisy machine.
- official: the upstream runtime re-runs the whole growing sequence for every token (batch 1, no cache,
  fp32 on CPU); its per-token cost is timed over a few tokens at the target context.
- hf_kv: transformers' Qwen3Model with its DynamicCache, batch 1: one incremental step per token; on CPU
  in fp32 and in bf16. Their steps alternate with every qguard variant's batch-1 steps, so bursts of load
  from other processes hit all of them alike.
- qguard: `StreamGuard` sessions (public API: verdicts, debounce and policy included) at each concurrency;
  sessions are forked from one prefilled prompt (a KV copy), then every step pushes one token to each.
  On CPU once per precision variant (--precisions): fp32, bf16, int8 / int8-weight / int4-weight decoder weights
  (`qguard.model.quant`) with fp32 or bf16 (`bf16+int8`) for the rest of the model and the KV cache.
Step times are medians (robust to a loaded machine); the official loop's is the mean of a few tokens.
Configurations whose KV cache would exceed --max-kv-gib are skipped and say so.
Per variant: parity (engine vs the same model's full forward) and the probability difference to the fp32
model (full forwards over the same random sequences); with --agreement (reports of `qguard
check-precision` on a trained model, e.g. the embedded starter) each variant's measured label agreement
is printed and the goal line names the fastest variant whose agreement is >= --min-agreement.
The last line printed is a JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import json
import os
import random
import statistics
import time

import torch
from _machine import cpu_name  # a sibling module: the scripts run from this folder
from transformers import Qwen3Config as HFQwen3Config
from transformers import Qwen3Model as HFQwen3Model

from qguard.checkpoint import StreamLabels
from qguard.engine.kvcache import SlotCache
from qguard.engine.scoring import score_sequences
from qguard.model.quant import kernel_of, quantize_model
from qguard.model.qwen3 import Qwen3Config
from qguard.model.stream import StreamGuardModel, StreamHeadConfig
from qguard.stream import StreamGuard
from qguard.testing import base_config, stream_config
from qguard.tokenizer import load_tokenizer


def build_model(preset: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Random weights in the preset's architecture (std 0.05, norms near 1, like qguard.testing)."""
    cfg_dict = stream_config(preset)
    torch.manual_seed(seed)
    heads = StreamHeadConfig(guard_inner_size=cfg_dict["guard_inner_size"])
    model = StreamGuardModel(Qwen3Config.from_dict(cfg_dict), heads)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.05)
    model = model.to(device=device, dtype=dtype).eval()
    model.model.rotary_emb.reset()
    model.fuse_for_inference()  # the form qguard's loaders return (fewer kernels per step)
    return model, StreamLabels.from_config(cfg_dict)


def build_hf(preset: str, model: StreamGuardModel) -> HFQwen3Model:
    """transformers' Qwen3Model sharing our backbone's weights (same names), for the baselines."""
    cfg = {k: v for k, v in base_config(preset).items() if k not in ("torch_dtype",)}
    hf = HFQwen3Model(HFQwen3Config(**cfg)).eval()
    hf.load_state_dict(model.model.state_dict(), strict=False, assign=True)
    p = next(model.parameters())
    return hf.to(device=p.device, dtype=p.dtype)


# transformers renamed `past_key_values` to `cache` in 5.2x; accept both so the baseline runs on either.
CACHE_ARG = "cache" if "cache" in inspect.signature(HFQwen3Model.forward).parameters else "past_key_values"


def kv_of(out):
    return getattr(out, "cache", None) or out.past_key_values


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def heads_probs(model: StreamGuardModel, h: torch.Tensor) -> torch.Tensor:
    o = model.heads(h)
    return o.risk_logits.float().softmax(-1)


@torch.inference_mode()
def bench_official(model, hf, prompt: list[int], n_tokens: int, device) -> float:
    """Seconds per token: a full forward of the growing sequence per new token, heads at every position."""
    hf(input_ids=torch.tensor([prompt[:64]], device=device), use_cache=False)  # warm-up (kernels, allocator)
    seq = list(prompt)
    rng = random.Random(1)
    times = []
    for _ in range(n_tokens):
        seq.append(rng.randrange(100, 150000))
        sync(device)
        t0 = time.perf_counter()
        h = hf(input_ids=torch.tensor([seq], device=device), use_cache=False).last_hidden_state
        heads_probs(model, h).cpu()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


class HFKVStepper:
    """transformers DynamicCache, batch 1: prefill once, then one incremental step per token."""

    def __init__(self, model, hf, prompt: list[int], device):
        self.model, self.hf, self.device = model, hf, device
        self.rng = random.Random(2)
        with torch.inference_mode():
            self.cache = kv_of(hf(input_ids=torch.tensor([prompt], device=device), use_cache=True))

    @torch.inference_mode()
    def step(self) -> None:
        tok = torch.tensor([[self.rng.randrange(100, 150000)]], device=self.device)
        out = self.hf(input_ids=tok, **{CACHE_ARG: self.cache}, use_cache=True)
        self.cache = kv_of(out)
        heads_probs(self.model, out.last_hidden_state).cpu()


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def bench_qguard(model, labels, tok, ctx: int, concurrency: list[int], steps: int, max_kv_gib: float,
                 baselines: dict[str, HFKVStepper], device, log, static_decode: bool | None = None,
                 label: str = "qguard") -> tuple[dict[int, tuple[float, float] | str], dict[str, list[float]]]:
    """({concurrency: (seconds per step, tokens/s)} or a reason it was skipped, {baseline: s/token samples}).

    One prompt of ctx tokens is prefilled once; each concurrency forks that many sessions from it (a KV
    copy), times `steps` steps of one token per session (median), and closes them again. At batch 1 the
    baselines' steps (transformers' DynamicCache) alternate with qguard's, so load from other processes
    hits all alike.
    """
    cfg = model.config
    dtype = next(model.parameters()).dtype
    max_context = ctx + steps + 8
    results: dict[int, tuple[float, float] | str] = {}
    base_times: dict[str, list[float]] = {name: [] for name in baselines}

    def kv_bytes(c: int) -> int:  # c forked sessions plus the prefilled base
        return SlotCache.nbytes(cfg.num_hidden_layers, c + 1, cfg.num_key_value_heads, max_context, cfg.head_dim, dtype)

    fits = [c for c in concurrency if kv_bytes(c) <= max_kv_gib * 2**30]
    for c in concurrency:
        if c not in fits:
            results[c] = f"skipped: KV cache {kv_bytes(c) / 2**30:.1f} GiB > --max-kv-gib {max_kv_gib}"
            log(f"{label} ctx={ctx} c={c}: {results[c]}")
    rng = random.Random(3)
    sg = StreamGuard(model, tok, labels, max_sessions=max(fits, default=1) + 1, max_context=max_context,
                     prefill_chunk=512, static_decode=static_decode)
    base = sg.open(prompt_text(tok, ctx))
    if ctx > base.length:  # pad the conversation to exactly ctx tokens with answer tokens
        base.push([rng.randrange(100, 150000) for _ in range(ctx - base.length)])
    for c in sorted(set(fits) | {1}):
        sessions = [base.fork() for _ in range(c)]
        times = []
        for i in range(steps + 1):  # the first step warms up
            pushes = {s: [rng.randrange(100, 150000)] for s in sessions}
            if c == 1:
                for name, stepper in baselines.items():
                    t = timed(stepper.step, device)
                    if i:
                        base_times[name].append(t)
            t = timed(lambda pushes=pushes: sg.push_many(pushes), device)
            if i:
                times.append(t)
        for s in sessions:
            s.close()
        if c not in fits:
            continue
        per_step = median(times)
        results[c] = (per_step, c / per_step)
        log(f"{label} ctx={ctx} c={c}: {per_step * 1e3:.1f} ms/step, {c / per_step:.1f} tokens/s")
    base.close()
    sg.close()
    return dict(sorted(results.items())), base_times


def prompt_text(tok, ctx: int) -> str:
    """A user prompt of about ctx - 16 tokens (the template adds the rest)."""
    words = ("the guard reads every token of the answer while it is generated and stops it when the "
             "policy blocks ").split()
    text, n = [], 0
    while n < ctx - 24:
        text.append(words[len(text) % len(words)])
        n += 1
    ids = tok.encode(" ".join(text), add_special_tokens=False)[: ctx - 24]
    return tok.decode(ids)


PRECISIONS = {  # variant -> (dtype of everything but the decoder projections, their quantization)
    "fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "int8": (torch.float32, "int8"),
    "int8-weight": (torch.float32, "int8-weight"), "bf16+int8": (torch.bfloat16, "int8"),
    "bf16+int8-weight": (torch.bfloat16, "int8-weight"), "int4-weight": (torch.float32, "int4-weight"),
}


def variant_model(model32: StreamGuardModel, model16: StreamGuardModel | None, name: str) -> StreamGuardModel:
    """The fp32 benchmark model in a precision variant (a copy; the same weights, rounded)."""
    dtype, scheme = PRECISIONS[name]
    if dtype == torch.float32 and scheme is None:
        return model32
    if dtype == torch.bfloat16 and scheme is None and model16 is not None:
        return model16
    m = copy.deepcopy(model32)
    if scheme:
        quantize_model(m, scheme)  # from the fp32 weights, as a loader does from the checkpoint's
    return m.to(dtype)  # the rest of the model (int8 weights stay int8)


def parity_sequences(tok) -> tuple[list[str], dict[int, list[list[int]]]]:
    """3 prompts and random answer chunks (1, 2 or 5 tokens), the same for every variant."""
    rng = random.Random(4)
    prompts = [f"Question {i}: is this fine?" for i in range(3)]
    chunks = {i: [[rng.randrange(100, 150000) for _ in range(rng.choice([1, 2, 5]))] for _ in range(8)]
              for i in range(3)}
    return prompts, chunks


def parity(model, labels, tok) -> tuple[float, list[torch.Tensor]]:
    """(max |engine - full forward| over response risk probs, the full forward's risk probs per session),
    3 sessions with random chunkings."""
    prompts, chunks = parity_sequences(tok)
    sg = StreamGuard(model, tok, labels, max_sessions=3, max_context=256, prefill_chunk=16)
    sessions = [sg.open(p) for p in prompts]
    pushed = {s: [] for s in sessions}
    got = {s: [] for s in sessions}
    for step in range(8):
        batch = {s: chunks[i][step] for i, s in enumerate(sessions)}
        for s, vs in sg.push_many(batch).items():
            pushed[s] += batch[s]
            got[s] += vs
    refs = score_sequences(model, [s.prompt_ids + pushed[s] for s in sessions])
    diff = 0.0
    full = []
    for s, ref in zip(sessions, refs):
        p = torch.tensor([[v.probs[x.value] for x in labels.risk] for v in got[s]])
        diff = max(diff, (p - ref.risk[len(s.prompt_ids):]).abs().max().item())
        full.append(ref.risk)
        s.close()
    sg.close()
    return diff, full


def load_agreement(files: list[str]) -> dict[str, dict]:
    """{variant: overall stats} from `qguard check-precision --json` reports."""
    out = {}
    for f in files:
        rep = json.loads(open(f, encoding="utf-8").read())
        red = rep["reduced"]
        dt = {"float32": "fp32", "bfloat16": "bf16"}.get(red["dtype"], red["dtype"])
        name = red["quantize"] if dt == "fp32" and red["quantize"] else (f"{dt}+{red['quantize']}" if red["quantize"] else dt)
        out[name] = {"model": rep["model"], **rep["overall"]}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="0.6B", choices=["tiny", "0.6B"])
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--steps", type=int, default=None, help="timed qguard steps per configuration")
    ap.add_argument("--official-tokens", type=int, default=None, help="timed tokens of the official loop")
    ap.add_argument("--max-kv-gib", type=float, default=None, help="skip qguard configs needing more KV cache")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="GPU runs (CPU: --precisions)")
    ap.add_argument("--precisions", nargs="+", default=None, choices=list(PRECISIONS),
                    help="CPU: the qguard variants to time (default: all of them; fp32 first, the reference)")
    ap.add_argument("--agreement", nargs="*", default=[], metavar="REPORT.json",
                    help="`qguard check-precision --json` reports (e.g. on the embedded starter) of the variants")
    ap.add_argument("--min-agreement", type=float, default=0.995,
                    help="goal line: the fastest variant whose overall label agreement is at least this")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (CPU default 1: on a shared machine, spinning worker threads of every "
                         "method lose far more to contention than they gain)")
    ap.add_argument("--static-decode", default="auto", choices=["auto", "on", "off", "both"],
                    help="one-token steps as static-shape steps (CUDA graphs on GPU); auto = on for CUDA; "
                         "both = time the eager and the static engine in the same run")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cpu = device.type == "cpu"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if cpu else torch.bfloat16)
    if args.threads or cpu:
        torch.set_num_threads(args.threads or 1)
    precisions = (args.precisions or list(PRECISIONS)) if cpu else ["gpu"]
    if cpu and "fp32" not in precisions:
        precisions = ["fp32", *precisions]  # the reference every ratio and difference is taken against
    small = args.preset == "tiny"
    steps = args.steps or (50 if small else 6)
    n_official = args.official_tokens or (10 if small else 2)
    max_kv = args.max_kv_gib or (8.0 if cpu else 60.0)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    agreement = load_agreement(args.agreement)

    def log(msg: str) -> None:
        print(f"# {msg}", flush=True)

    log(f"preset={args.preset} device={device} precisions={precisions if cpu else str(dtype)} machine={machine}")
    model, labels = build_model(args.preset, device, torch.float32 if cpu else dtype)
    hf = build_hf(args.preset, model)
    # CPU: transformers in bf16 too (its own reduced-precision baseline), on a bf16 copy of the same weights
    model16 = copy.deepcopy(model).to(torch.bfloat16) if cpu else None
    hf16 = build_hf(args.preset, model16) if cpu else None
    tok = load_tokenizer(None)
    t_start = time.perf_counter()

    static_flag = {"auto": None, "on": True, "off": False}.get(args.static_decode)
    engines = ([("(eager)", False), ("(static/CUDA graphs)", True)] if args.static_decode == "both"
               else [("", static_flag)])
    variants = [(p, e, st) for p in precisions for e, st in engines]  # (precision, engine label, static)

    def vname(prec: str, eng: str) -> str:
        return " ".join(x for x in ("qguard StreamGuard", prec if cpu else "", eng) if x)

    rows, official, hf_kv, hf_kv16 = [], {}, {}, {}
    res: dict[str, dict[int, dict]] = {}  # variant name -> ctx -> {concurrency: (s/step, tok/s) | reason}
    parity_diff, prob_diff, kernels = {}, {}, {}
    full32 = None
    for prec in precisions:  # exactness first (cheap): parity and the distance to the fp32 model
        m = variant_model(model, model16, prec) if cpu else model
        kernels[prec] = kernel_of(m)  # picked once per weight shape and process: the same for every int8 variant
        parity_diff[prec], full = parity(m, labels, tok)
        if full32 is None:
            full32 = full
        d = torch.cat([(a - b).abs().max(-1).values for a, b in zip(full, full32)])
        prob_diff[prec] = {"max": round(d.max().item(), 6), "mean": round(d.mean().item(), 6)}
        del m
    for ctx in args.contexts:
        prompt = [random.Random(ctx).randrange(100, 150000) for _ in range(ctx)]
        official[ctx] = bench_official(model, hf, prompt, n_official, device)
        log(f"official ctx={ctx}: {official[ctx] * 1e3:.1f} ms/token")
        baselines = {"hf": HFKVStepper(model, hf, prompt, device)}
        if cpu:
            baselines["hf16"] = HFKVStepper(model16, hf16, prompt, device)
        samples: dict[str, list[float]] = {k: [] for k in baselines}
        block = []
        for prec, eng, static in variants:
            name = vname(prec, eng)
            m = variant_model(model, model16, prec) if cpu else model
            try:
                r, times = bench_qguard(m, labels, tok, ctx, args.concurrency, steps, max_kv, baselines,
                                        device, log, static, label=name)
            except Exception as e:  # one failing variant must not lose the others' figures
                log(f"{name} ctx={ctx} FAILED: {type(e).__name__}: {e}")
                if len(variants) == 1:
                    raise
                continue
            finally:
                del m
                gc.collect()
            for k, v in times.items():
                samples[k] += v
            res.setdefault(name, {})[ctx] = r
            for c, x in r.items():
                block.append((name, ctx, c, *((x[0] * 1e3, x[1]) if isinstance(x, tuple) else (None, None))))
        hf_kv[ctx] = median(samples["hf"])
        log(f"hf_kv ctx={ctx}: {hf_kv[ctx] * 1e3:.1f} ms/token")
        rows.append(("official loop (full forward/token)", ctx, 1, official[ctx] * 1e3, 1 / official[ctx]))
        rows.append((f"transformers DynamicCache{' fp32' if cpu else ''}", ctx, 1, hf_kv[ctx] * 1e3, 1 / hf_kv[ctx]))
        if cpu:
            hf_kv16[ctx] = median(samples["hf16"])
            log(f"hf_kv bf16 ctx={ctx}: {hf_kv16[ctx] * 1e3:.1f} ms/token")
            rows.append(("transformers DynamicCache bf16", ctx, 1, hf_kv16[ctx] * 1e3, 1 / hf_kv16[ctx]))
        rows += block
        del baselines
        gc.collect()

    run_dtype = "float32 (reference; variants per row)" if cpu else str(dtype).removeprefix("torch.")
    print(f"\nStream moderation, preset {args.preset}, {device} ({machine}), {run_dtype}")
    print(f"{'method':<46}{'context':>8}{'sessions':>10}{'ms/step':>12}{'tokens/s':>12}{'x hf fp32':>11}")
    for name, ctx, c, ms, tps in rows:
        if ms is None:
            print(f"{name:<46}{ctx:>8}{c:>10}   skipped (KV cache > --max-kv-gib)")
            continue
        ratio = f"{hf_kv[ctx] * 1e3 / ms:>11.2f}" if c == 1 else ""
        print(f"{name:<46}{ctx:>8}{c:>10}{ms:>12.2f}{tps:>12.1f}{ratio}")

    head = 512 if 512 in args.contexts else args.contexts[0]
    headline = vname(precisions[0], "") if len(engines) == 1 else next(
        (vname(precisions[0], e) for e, st in engines if st == (device.type == "cuda")), vname(precisions[0], engines[0][0]))
    qg = res.get(headline, {})
    b1 = qg.get(head, {}).get(1)

    def tps(r: dict[int, dict], c: int) -> dict[str, float]:
        return {str(ctx): round(x[c][1], 1) for ctx, x in r.items() if isinstance(x.get(c), tuple)}

    per_variant = {}
    for prec, eng, _ in variants:
        name = vname(prec, eng)
        r = res.get(name, {})
        v: dict = {"b1_ms": {str(ctx): round(x[1][0] * 1e3, 3) for ctx, x in r.items() if isinstance(x.get(1), tuple)},
                   "tokens_per_s": {str(c): tps(r, c) for c in args.concurrency},
                   "speedup_vs_hf_kv_b1": {str(ctx): round(hf_kv[ctx] / x[1][0], 2) for ctx, x in r.items()
                                           if isinstance(x.get(1), tuple)}}
        if cpu:
            v["speedup_vs_hf_kv_bf16_b1"] = {str(ctx): round(hf_kv16[ctx] / x[1][0], 2) for ctx, x in r.items()
                                             if isinstance(x.get(1), tuple)}
            ref = res.get(vname("fp32", eng), {})
            v["speedup_vs_qguard_fp32"] = {
                str(c): {str(ctx): round(ref[ctx][c][0] / x[c][0], 2) for ctx, x in r.items()
                         if isinstance(x.get(c), tuple) and isinstance(ref.get(ctx, {}).get(c), tuple)}
                for c in args.concurrency}
            v["parity_max_abs_diff"] = parity_diff[prec]
            if kernels.get(prec):
                v["int8_kernel"] = kernels[prec]
            v["prob_diff_vs_fp32"] = prob_diff[prec]
            if prec in agreement:
                v["measured_agreement"] = {k: agreement[prec].get(k) for k in (
                    "model", "compared", "label_agreement", "binary_agreement", "unsafe_position_agreement",
                    "token_label_agreement", "prob_max_diff", "prob_mean_diff")}
        per_variant[name] = v
    goal = None
    if cpu:
        print(f"\nper variant (vs the fp32 model: full-forward risk probabilities; parity: engine vs the same model's "
              f"full forward){'; label agreement from --agreement' if agreement else ''}")
        for prec in precisions:
            name = vname(prec, "")
            a = agreement.get(prec)
            ag = (f", measured label agreement {100 * a['label_agreement']:.2f}% over {a['compared']} rows"
                  + (f" (unsafe position {100 * a['unsafe_position_agreement']:.2f}%)"
                     if a.get("unsafe_position_agreement") is not None else "")) if a else ""
            pv = per_variant.get(name, {})
            sp = pv.get("speedup_vs_hf_kv_b1", {}).get(str(head))
            kern = f", int8 kernel {kernels[prec]}" if kernels.get(prec) else ""
            print(f"  {prec:<18} |dp| max {prob_diff[prec]['max']:.4f} mean {prob_diff[prec]['mean']:.5f}, parity "
                  f"{parity_diff[prec]:.1e}, b1 at {head}: {sp if sp is not None else '-'}x hf fp32{kern}{ag}")
        ok = [p for p in precisions if p == "fp32" or (p in agreement and agreement[p]["label_agreement"] is not None
                                                       and agreement[p]["label_agreement"] >= args.min_agreement)]
        timed_ok = [(per_variant[vname(p, '')]["speedup_vs_hf_kv_b1"].get(str(head)), p) for p in ok
                    if per_variant.get(vname(p, ""), {}).get("speedup_vs_hf_kv_b1", {}).get(str(head))]
        if timed_ok:
            best_x, best = max(timed_ok)
            goal = {"context": head, "min_agreement": args.min_agreement, "fastest_qualifying_variant": best,
                    "speedup_vs_hf_kv_fp32_b1": best_x, "met": best_x >= 3.0,
                    "variants_without_agreement": [p for p in precisions if p != "fp32" and p not in agreement]}
            print(f"goal (batch 1, {head} context): fastest variant with measured agreement >= "
                  f"{100 * args.min_agreement:.1f}%: {best}, {best_x}x transformers' fp32 KV cache: "
                  f"{'met' if best_x >= 3.0 else 'not met'} (goal 3x)")
    summary = {
        "preset": args.preset, "device": str(device), "machine": machine,
        "dtype": "float32" if cpu else str(dtype).removeprefix("torch."), "precisions": precisions if cpu else None,
        "head_context": head,
        "official_ms_per_token": {str(c): round(v * 1e3, 3) for c, v in official.items()},
        "hf_kv_ms_per_token": {str(c): round(v * 1e3, 3) for c, v in hf_kv.items()},
        **({"hf_kv_bf16_ms_per_token": {str(c): round(v * 1e3, 3) for c, v in hf_kv16.items()}} if cpu else {}),
        "qguard_b1_ms_per_token": {str(c): round(r[1][0] * 1e3, 3) for c, r in qg.items() if isinstance(r.get(1), tuple)},
        "speedup_vs_official_b1": round(official[head] / b1[0], 2) if isinstance(b1, tuple) else None,
        "speedup_vs_hf_kv_b1": round(hf_kv[head] / b1[0], 2) if isinstance(b1, tuple) else None,
        "tokens_per_s": {str(c): tps(qg, c) for c in args.concurrency},
        "parity_max_abs_diff": parity_diff[precisions[0]],
        "variants": per_variant, "goal": goal,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
