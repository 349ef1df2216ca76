"""Engine cost of a guarded-generation rollback: fork the checkpoint session vs re-judge the kept prefix.

    python benchmarks/rollback_bench.py --preset tiny             # seconds
    python benchmarks/rollback_bench.py --preset small            # hidden 512, 8 layers: under a minute
    python benchmarks/rollback_bench.py --preset 0.6B --lengths 256 512

`qguard.generate` rolls the guard back by forking a session that follows the release point (one KV copy
of the kept prefix, no forward). The alternative without it is a fresh session over the kept prefix:
the prompt and the prefix judged again (a prefill). Both end with a session at the rollback point that
has judged one new token (the ratio compares these; "fork alone" is the KV copy by itself), on the same random weights (the preset's architecture, so the same compute as
a real model), in the same process, the two methods interleaved repeat by repeat so that load from
other processes hits both alike. Times are medians.

Also timed: the checkpoint's steady cost, one engine step of the live session alone vs one step that
also carries the checkpoint's released token (what `guarded_generate` does per token when it pushes ids).
The last line printed is a JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
from _machine import cpu_name  # a sibling module: the scripts run from this folder

from qguard.checkpoint import StreamLabels
from qguard.model.qwen3 import Qwen3Config
from qguard.model.stream import StreamGuardModel, StreamHeadConfig
from qguard.stream import StreamGuard
from qguard.testing import stream_config
from qguard.tokenizer import load_tokenizer

# "small": between the tiny test preset and 0.6B, so the model's compute is visible but a run is short
SMALL = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64, guard_inner_size=256)
PROMPT = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper and the sea."}]


def build_guard(preset: str, max_context: int) -> StreamGuard:
    cfg = stream_config("tiny" if preset == "small" else preset)
    if preset == "small":
        cfg.update(SMALL)
    torch.manual_seed(0)
    model = StreamGuardModel(Qwen3Config.from_dict(cfg), StreamHeadConfig(guard_inner_size=cfg["guard_inner_size"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.05)
    model = model.eval()
    model.model.rotary_emb.reset()
    model.fuse_for_inference()  # the form qguard's loaders return
    return StreamGuard(model, load_tokenizer(), StreamLabels.from_config(cfg), max_sessions=4,
                       max_context=max_context)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000.0


def bench_length(sg: StreamGuard, n: int, repeats: int, rng: random.Random) -> dict[str, float]:
    prefix = [rng.randrange(100, 150000) for _ in range(n)]
    nxt = rng.randrange(100, 150000)
    ckpt = sg.open(PROMPT)
    ckpt.push(prefix)  # setup: the checkpoint follows the release point
    fork_ms, rejudge_ms, copy_ms = [], [], []
    for _ in range(repeats):
        def copy_only():
            ckpt.fork().close()

        def by_fork():
            s = ckpt.fork()
            s.push([nxt])
            s.close()

        def by_rejudge():
            s = sg.open(PROMPT)
            s.push(prefix)
            s.push([nxt])
            s.close()

        copy_ms.append(timed(copy_only))
        fork_ms.append(timed(by_fork))
        rejudge_ms.append(timed(by_rejudge))
    ckpt.close()
    f, r = statistics.median(fork_ms), statistics.median(rejudge_ms)
    return {"fork_only_ms": round(statistics.median(copy_ms), 3), "fork_ms": round(f, 3),
            "rejudge_ms": round(r, 3), "ratio": round(r / f, 1)}


def bench_steady(sg: StreamGuard, n: int, steps: int, rng: random.Random) -> dict[str, float]:
    """ms per engine step at context n: the live session alone vs with the checkpoint's token."""
    prefix = [rng.randrange(100, 150000) for _ in range(n)]
    lead = sg.open(PROMPT)
    lead.push(prefix)
    ckpt = lead.fork()
    alone, both = [], []
    for _ in range(steps):
        a, b = rng.randrange(100, 150000), rng.randrange(100, 150000)
        alone.append(timed(lambda a=a: lead.push([a])))
        both.append(timed(lambda a=a, b=b: sg.push_many({lead: [a], ckpt: [b]})))
    lead.close()
    ckpt.close()
    a, b = statistics.median(alone), statistics.median(both)
    return {"live_only_ms": round(a, 3), "with_checkpoint_ms": round(b, 3), "overhead": round(b / a - 1.0, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small", "0.6B"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024], help="kept prefix tokens")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=30, help="steps timed for the checkpoint's steady cost")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    sg = build_guard(args.preset, max_context=max(args.lengths) + 64)
    rng = random.Random(0)
    bench_length(sg, 16, 2, rng)  # warm-up
    machine = f"{cpu_name()}, {torch.get_num_threads()} torch threads"
    print(f"Rollback cost, preset {args.preset}, cpu ({machine}), float32")
    print(f"{'kept prefix':>12} {'fork alone':>11} {'fork+step ms':>13} {'re-judge+step ms':>17} {'ratio':>7}")
    rows = {}
    with torch.inference_mode():
        for n in args.lengths:
            rows[n] = row = bench_length(sg, n, args.repeats, rng)
            print(f"{n:>12} {row['fork_only_ms']:>11.2f} {row['fork_ms']:>13.2f} {row['rejudge_ms']:>17.2f} "
                  f"{row['ratio']:>6.1f}x")
        steady = bench_steady(sg, max(args.lengths) // 2, args.steps, rng)
    print(f"checkpoint's steady cost at context {max(args.lengths) // 2}: step {steady['live_only_ms']:.2f} ms "
          f"alone, {steady['with_checkpoint_ms']:.2f} ms with the checkpoint's token "
          f"(+{100 * steady['overhead']:.0f}%)")
    print(json.dumps({"preset": args.preset, "machine": machine, "lengths": rows, "steady": steady,
                      "wall_s": round(time.perf_counter() - t_start, 1)}))


if __name__ == "__main__":
    main()
