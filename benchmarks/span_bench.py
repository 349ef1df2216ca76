"""Static decode step: attention over the whole cache (before) vs over a span bucket (now), same run.

The static step (CUDA graphs on GPU; eager here on the CPU) used to attend every row over the full
`max_context` keys with a mask. It now reads the first S keys, S the power-of-two span bucket above the
step's last position (`qguard.engine.graphs.DecodeGraphs.span_size`). This times one static decode step
of `--batch` sessions at position `--position` in a `--max-context` cache, both ways, with the same
random model, and checks that both give the same probabilities.

    python benchmarks/span_bench.py                                   # tiny, CPU, seconds
    python benchmarks/span_bench.py --preset 0.6B --batch 16          # ~1 min on 2 CPU cores
    python benchmarks/span_bench.py --preset 0.6B --device cuda --dtype bfloat16 --batch 1,64,256

The last line is a JSON object with the ms per step and the ratio per batch size.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from qguard.checkpoint import build_stream_model, open_checkpoint
from qguard.engine.graphs import DecodeGraphs
from qguard.engine.kvcache import SlotCache
from qguard.testing import make_stream_checkpoint


def step_ms(graphs: DecodeGraphs, rows: list[tuple[int, int, int]], device: torch.device, seconds: float):
    """Mean ms of `graphs.run(rows)` (inputs, replay or eager step, outputs back) and its last output."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = graphs.run(rows)  # first use: builds (and on CUDA captures) the bucket
    graphs.run(rows)
    sync()
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        out = graphs.run(rows)  # the same position each time: the cache row is rewritten, not grown
        n += 1
    sync()
    return (time.perf_counter() - t0) / n * 1e3, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "0.6B"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", default="1,16", help="comma-separated session counts")
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--position", type=int, default=300, help="position of the step's token (span bucket 512)")
    ap.add_argument("--seconds", type=float, default=2.0)
    a = ap.parse_args()
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    with tempfile.TemporaryDirectory() as d:
        ckpt = open_checkpoint(make_stream_checkpoint(d, preset=a.preset, std=0.05, tokenizer=False))
        model, _ = build_stream_model(ckpt, device, dtype)
    cfg = model.config
    rows_out = []
    print(f"preset {a.preset}, {device}, {a.dtype}, max_context {a.max_context}, position {a.position}")
    print(f"{'sessions':>8} {'whole cache ms':>15} {'span bucket ms':>15} {'span':>5} {'speedup':>8} {'max diff':>9}")
    for B in map(int, a.batch.split(",")):
        cache = SlotCache(cfg.num_hidden_layers, B, cfg.num_key_value_heads, a.max_context, cfg.head_dim, dtype,
                          device)
        torch.manual_seed(B)
        for t in (*cache.k, *cache.v):  # a filled prefix: random keys/values at every position
            t.normal_()
        rows = [(s, 1000 + s, a.position) for s in range(B)]
        res = {}
        for name, span_buckets in (("whole", False), ("span", True)):
            graphs = DecodeGraphs(model, cache, B, capture=device.type == "cuda", span_buckets=span_buckets)
            res[name] = step_ms(graphs, rows, device, a.seconds)
            span = graphs.last.span
            del graphs
        diff = float((res["whole"][1] - res["span"][1]).abs().max())
        whole, spanned = res["whole"][0], res["span"][0]
        rows_out.append(dict(sessions=B, whole_cache_ms=round(whole, 3), span_bucket_ms=round(spanned, 3), span=span,
                             speedup=round(whole / spanned, 2), max_abs_diff=diff))
        print(f"{B:>8} {whole:>15.3f} {spanned:>15.3f} {span:>5} {whole / spanned:>7.2f}x {diff:>9.1e}")
    print(json.dumps(dict(preset=a.preset, device=str(device), dtype=a.dtype, max_context=a.max_context,
                          position=a.position, rows=rows_out)))


if __name__ == "__main__":
    main()
