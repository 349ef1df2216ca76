"""Live stream moderation: the official-style loop, plain transformers with a KV cache, and qguard.

    python benchmarks/stream_bench.py --preset tiny      # quick CPU run (well under a minute)
    python benchmarks/stream_bench.py                    # Qwen3Guard-Stream-0.6B architecture

Random weights with the exact architecture (same compute as the real model). Baselines and qguard run
in the same process on the same weights, so the ratios are what counts on a shared, noisy machine.
- official: the upstream runtime re-runs the whole growing sequence for every token (batch 1, no cache);
  its per-token cost is timed over a few tokens at the target context.
- hf_kv: transformers' Qwen3Model with its DynamicCache, batch 1: one incremental step per token; its
  steps alternate with qguard's batch-1 steps, so bursts of load from other processes hit both alike.
- qguard: `StreamGuard` sessions (public API: verdicts, debounce and policy included) at each concurrency;
  sessions are forked from one prefilled prompt (a KV copy), then every step pushes one token to each.
Step times are medians (robust to a loaded machine); the official loop's is the mean of a few tokens.
Configurations whose KV cache would exceed --max-kv-gib are skipped and say so.
The last line printed is a JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import random
import statistics
import time

import torch
from transformers import Qwen3Config as HFQwen3Config
from transformers import Qwen3Model as HFQwen3Model

from qguard.checkpoint import StreamLabels
from qguard.engine.kvcache import SlotCache
from qguard.engine.scoring import score_sequences
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


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
                 hf_kv: HFKVStepper, device, log, static_decode: bool | None = None,
                 ) -> tuple[dict[int, tuple[float, float] | str], float]:
    """({concurrency: (seconds per step, tokens/s)} or a reason it was skipped, DynamicCache s/token).

    One prompt of ctx tokens is prefilled once; each concurrency forks that many sessions from it (a KV
    copy), times `steps` steps of one token per session (median), and closes them again. At batch 1 the
    DynamicCache baseline steps alternate with qguard's, so load from other processes hits both alike.
    """
    cfg = model.config
    dtype = next(model.parameters()).dtype
    max_context = ctx + steps + 8
    results: dict[int, tuple[float, float] | str] = {}
    hf_times: list[float] = []

    def kv_bytes(c: int) -> int:  # c forked sessions plus the prefilled base
        return SlotCache.nbytes(cfg.num_hidden_layers, c + 1, cfg.num_key_value_heads, max_context, cfg.head_dim, dtype)

    fits = [c for c in concurrency if kv_bytes(c) <= max_kv_gib * 2**30]
    for c in concurrency:
        if c not in fits:
            results[c] = f"skipped: KV cache {kv_bytes(c) / 2**30:.1f} GiB > --max-kv-gib {max_kv_gib}"
            log(f"qguard ctx={ctx} c={c}: {results[c]}")
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
                t = timed(hf_kv.step, device)
                if i:
                    hf_times.append(t)
            t = timed(lambda pushes=pushes: sg.push_many(pushes), device)
            if i:
                times.append(t)
        for s in sessions:
            s.close()
        if c not in fits:
            continue
        per_step = median(times)
        results[c] = (per_step, c / per_step)
        log(f"qguard ctx={ctx} c={c}: {per_step * 1e3:.1f} ms/step, {c / per_step:.1f} tokens/s")
    base.close()
    return dict(sorted(results.items())), median(hf_times)


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


def parity(model, labels, tok) -> float:
    """Max |engine - full forward| over response risk probs, 3 sessions with random chunkings."""
    rng = random.Random(4)
    sg = StreamGuard(model, tok, labels, max_sessions=3, max_context=256, prefill_chunk=16)
    sessions = [sg.open(f"Question {i}: is this fine?") for i in range(3)]
    pushed = {s: [] for s in sessions}
    got = {s: [] for s in sessions}
    for _ in range(8):
        batch = {s: [rng.randrange(100, 150000) for _ in range(rng.choice([1, 2, 5]))] for s in sessions}
        for s, vs in sg.push_many(batch).items():
            pushed[s] += batch[s]
            got[s] += vs
    refs = score_sequences(model, [s.prompt_ids + pushed[s] for s in sessions])
    diff = 0.0
    for s, ref in zip(sessions, refs):
        p = torch.tensor([[v.probs[x.value] for x in labels.risk] for v in got[s]])
        diff = max(diff, (p - ref.risk[len(s.prompt_ids):]).abs().max().item())
        s.close()
    return diff


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="0.6B", choices=["tiny", "0.6B"])
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--steps", type=int, default=None, help="timed qguard steps per configuration")
    ap.add_argument("--official-tokens", type=int, default=None, help="timed tokens of the official loop")
    ap.add_argument("--max-kv-gib", type=float, default=None, help="skip qguard configs needing more KV cache")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (CPU default 1: on a shared machine, spinning worker threads of every "
                         "method lose far more to contention than they gain)")
    ap.add_argument("--static-decode", default="auto", choices=["auto", "on", "off", "both"],
                    help="one-token steps as static-shape steps (CUDA graphs on GPU); auto = on for CUDA; "
                         "both = time the eager and the static engine in the same run")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    small = args.preset == "tiny"
    steps = args.steps or (50 if small else 6)
    n_official = args.official_tokens or (10 if small else 2)
    max_kv = args.max_kv_gib or (8.0 if device.type == "cpu" else 60.0)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")

    def log(msg: str) -> None:
        print(f"# {msg}", flush=True)

    log(f"preset={args.preset} device={device} dtype={str(dtype).removeprefix('torch.')} machine={machine}")
    model, labels = build_model(args.preset, device, dtype)
    hf = build_hf(args.preset, model)
    tok = load_tokenizer(None)
    t_start = time.perf_counter()

    rows, official, hf_kv, qg = [], {}, {}, {}
    extra: dict[str, dict[int, dict]] = {}
    static_flag = {"auto": None, "on": True, "off": False}.get(args.static_decode)
    variants = ([("qguard StreamGuard (eager)", False), ("qguard StreamGuard (static/CUDA graphs)", True)]
                if args.static_decode == "both" else [("qguard StreamGuard", static_flag)])
    for ctx in args.contexts:
        prompt = [random.Random(ctx).randrange(100, 150000) for _ in range(ctx)]
        official[ctx] = bench_official(model, hf, prompt, n_official, device)
        log(f"official ctx={ctx}: {official[ctx] * 1e3:.1f} ms/token")
        stepper = HFKVStepper(model, hf, prompt, device)
        rows.append(("official loop (full forward/token)", ctx, 1, official[ctx] * 1e3, 1 / official[ctx]))
        for name, static in variants:
            try:
                res, hf_t = bench_qguard(model, labels, tok, ctx, args.concurrency, steps, max_kv, stepper,
                                         device, log, static)
            except Exception as e:  # one failing variant must not lose the others' figures
                log(f"{name} ctx={ctx} FAILED: {type(e).__name__}: {e}")
                if static is None or len(variants) == 1:
                    raise
                continue
            if static is None or static == (device.type == "cuda") or ctx not in qg:  # headline: the default engine
                qg[ctx], hf_kv[ctx] = res, hf_t
            extra.setdefault(name, {})[ctx] = res
            for c, r in res.items():
                rows.append((name, ctx, c, *((r[0] * 1e3, r[1]) if isinstance(r, tuple) else (None, None))))
        log(f"hf_kv ctx={ctx}: {hf_kv[ctx] * 1e3:.1f} ms/token")
        rows.insert(len(rows) - sum(len(extra.get(n, {}).get(ctx, {})) for n, _ in variants), ("transformers DynamicCache", ctx, 1, hf_kv[ctx] * 1e3, 1 / hf_kv[ctx]))
        del stepper
    diff = parity(model, labels, tok)

    print(f"\nStream moderation, preset {args.preset}, {device} ({machine}), {str(dtype).removeprefix('torch.')}")
    print(f"{'method':<38}{'context':>8}{'sessions':>10}{'ms/step':>12}{'tokens/s':>12}")
    for name, ctx, c, ms, tps in rows:
        cell = f"{ms:>12.2f}{tps:>12.1f}" if ms is not None else "   skipped (KV cache > --max-kv-gib)"
        print(f"{name:<38}{ctx:>8}{c:>10}{cell}")
    head = 512 if 512 in args.contexts else args.contexts[0]
    b1 = qg[head].get(1)
    summary = {
        "preset": args.preset, "device": str(device), "machine": machine, "dtype": str(dtype).removeprefix("torch."),
        "head_context": head,
        "official_ms_per_token": {str(c): round(v * 1e3, 3) for c, v in official.items()},
        "hf_kv_ms_per_token": {str(c): round(v * 1e3, 3) for c, v in hf_kv.items()},
        "qguard_b1_ms_per_token": {str(c): round(r[0] * 1e3, 3) for c, r in ((c, qg[c].get(1)) for c in qg)
                                   if isinstance(r, tuple)},
        "speedup_vs_official_b1": round(official[head] / b1[0], 2) if isinstance(b1, tuple) else None,
        "speedup_vs_hf_kv_b1": round(hf_kv[head] / b1[0], 2) if isinstance(b1, tuple) else None,
        "tokens_per_s": {str(c): {str(ctx): round(qg[ctx][c][1], 1) for ctx in qg if isinstance(qg[ctx].get(c), tuple)}
                         for c in args.concurrency},
        "parity_max_abs_diff": diff,
        **({"tokens_per_s_by_variant": {
            name: {str(c): {str(ctx): round(r[c][1], 1) for ctx, r in per_ctx.items() if isinstance(r.get(c), tuple)}
                   for c in args.concurrency} for name, per_ctx in extra.items()},
            "b1_ms_by_variant": {name: {str(ctx): round(r[1][0] * 1e3, 3) for ctx, r in per_ctx.items()
                                        if isinstance(r.get(1), tuple)} for name, per_ctx in extra.items()}}
           if len(variants) > 1 else {}),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
