"""One-token (decode-step) attention: SDPA's own GQA path vs qguard's folded GQA, same run.

The stream engine's step attends one new token per session against its cached keys. With grouped-query
attention (Qwen3Guard-0.6B: 16 query heads, 8 KV heads) SDPA's `enable_gqa=True` path either expands K/V
or, with the engine's per-row mask on CUDA, cannot use the memory-efficient kernel. qguard instead folds
the query heads that share a KV head into the query axis (`Attention._attend_one_folded`). This prints the
time of both per call, their ratio, and the max abs difference, for batch sizes with and without the mask
(batch 1 runs without a mask in the engine; batched steps always carry one).

    python benchmarks/attention_bench.py                       # CPU, fp32, 0.6B head shapes
    python benchmarks/attention_bench.py --device cuda --dtype bfloat16

The last line is a JSON object: {"device", "dtype", "rows": [{batch, context, masked, sdpa_gqa_ms,
folded_ms, speedup, max_abs_diff}, ...]}.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from qguard.model.qwen3 import Attention, Qwen3Config


def sdpa_gqa(q, k, v, mask, scale):
    B, H, T, D = q.shape
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=scale)
    return y.transpose(1, 2).reshape(B, T, H * D)


def timed(fn, args, device: torch.device, seconds: float) -> float:
    """Mean milliseconds per call over about `seconds` (after warmup)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn(*args)
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            fn(*args)
        sync()
        n += 10
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=1.0, help="timing window per case")
    a = ap.parse_args()
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    cfg = Qwen3Config.from_dict(dict(hidden_size=a.heads * a.head_dim, intermediate_size=8, num_hidden_layers=1,
                                     num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                                     head_dim=a.head_dim))
    attn = Attention(cfg, 0)
    scale = 1.0 / math.sqrt(a.head_dim)

    def folded(q, k, v, mask, scale):
        return attn._attend(q, k, v, None, mask)

    rows = []
    g = torch.Generator().manual_seed(0)
    print(f"{'batch':>5} {'ctx':>5} {'mask':>5} {'sdpa gqa ms':>12} {'folded ms':>10} {'speedup':>8} {'max diff':>9}")
    for B in map(int, a.batches.split(",")):
        S = a.context
        q = torch.randn(B, a.heads, 1, a.head_dim, generator=g).to(device, dtype)
        k = torch.randn(B, a.kv_heads, S, a.head_dim, generator=g).to(device, dtype)
        v = torch.randn(B, a.kv_heads, S, a.head_dim, generator=g).to(device, dtype)
        lengths = torch.randint(1, S + 1, (B,), generator=g)
        keep = torch.arange(S)[None, :] < lengths[:, None]
        mask = torch.zeros(B, 1, 1, S).masked_fill(~keep[:, None, None], float("-inf")).to(device, dtype)
        for m in ([None, mask] if B == 1 else [mask]):
            with torch.no_grad():
                diff = (sdpa_gqa(q, k, v, m, scale).float() - folded(q, k, v, m, scale).float()).abs().max().item()
                base = timed(sdpa_gqa, (q, k, v, m, scale), device, a.seconds)
                cand = timed(folded, (q, k, v, m, scale), device, a.seconds)
            row = dict(batch=B, context=S, masked=m is not None, sdpa_gqa_ms=round(base, 4),
                       folded_ms=round(cand, 4), speedup=round(base / cand, 2), max_abs_diff=diff)
            rows.append(row)
            print(f"{B:>5} {S:>5} {str(m is not None):>5} {base:>12.4f} {cand:>10.4f} {base / cand:>7.2f}x {diff:>9.1e}")
    print(json.dumps(dict(device=str(device), dtype=a.dtype, rows=rows)))


if __name__ == "__main__":
    main()
