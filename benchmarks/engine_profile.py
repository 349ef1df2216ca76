"""Where a streaming step's time goes: the model's forward vs the engine's host work vs the session API.

    python benchmarks/engine_profile.py --preset tiny --sessions 64 256 --context 1024   # CPU, ~1 min
    python benchmarks/engine_profile.py --device cuda --sessions 1 256 --context 1024

`c` sessions are forked from one prefilled prompt of `--context` tokens; each timed step pushes one token
to every session through the public API (`StreamGuard.push_many`). Every step is split, in the same run,
by timers wrapped around the engine's entry points and the model's modules:

- forward: the decoder and the guard heads (`model.model`, `model.heads`); on CUDA with captured graphs,
  the replay of the step's graph, timed on its own (the modules are not called at replay);
- engine host: the rest of the engine's `run` (scheduling, input buffers, softmax/packing, the
  device->host copy, per-session bookkeeping, handing out results);
- session layer: the rest of `push_many` (validation, submit, verdict records, debounce, policy).

Figures are medians over the timed steps (robust to a loaded machine). `--static` takes the static-shape
decode path (what CUDA graphs capture; the default on CUDA) on CPU too. With `--preset tiny` the forward is
cheap, so host overheads show. `engine_only_ms` (engine submit + run without sessions, after the API
steps) is kept for comparison with earlier figures. The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import tempfile
import time

import torch

from qguard.checkpoint import build_stream_model, open_checkpoint
from qguard.stream import StreamGuard
from qguard.testing import make_stream_checkpoint
from qguard.tokenizer import load_tokenizer


class Timers:
    """Accumulates wall time per bucket; only the outermost call of a bucket counts (run calls step)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.total: dict[str, float] = {}
        self.depth: dict[str, int] = {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, obj, name: str, bucket: str, sync: bool = False) -> None:
        fn = getattr(obj, name)

        @functools.wraps(fn)
        def timed(*a, **kw):
            if self.depth.get(bucket, 0):
                return fn(*a, **kw)
            self.depth[bucket] = 1
            if sync:
                self.sync()
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                if sync:
                    self.sync()
                self.total[bucket] = self.total.get(bucket, 0.0) + time.perf_counter() - t
                self.depth[bucket] = 0

        setattr(obj, name, timed)

    def take(self) -> dict[str, float]:
        out, self.total = self.total, {}
        return out


def ms(fn, n: int, timers: Timers) -> float:
    fn()
    timers.sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    timers.sync()
    return (time.perf_counter() - t) / n * 1e3


def med(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1e3, 3)


def profile(model, labels, tok, c: int, args, dev, rng) -> dict:
    """Time `args.n` session-API steps of c sessions, split into forward / engine host / session layer."""
    sg = StreamGuard(model, tok, labels, max_sessions=c + 1, max_context=args.context + 2 * args.n + 16,
                     compile_step=args.compile, static_decode=True if args.static else None)
    base = sg.open("hello")
    base.push([rng.randrange(100, 150000) for _ in range(args.context - base.length)])
    sessions = [base.fork() for _ in range(c)]
    eng = sg.engine
    timers = Timers(dev)
    # the engine's collection entry points: `run` (and `run_packed` where the engine has it; the session
    # layer calls one of them), each counted once per outermost call
    for name in ("run", "run_packed"):
        if hasattr(eng, name):
            timers.wrap(eng, name, "engine", sync=True)
    # captured graphs never call the modules (and must not sync while capturing), and torch.compile
    # must not trace the timers: there the forward is timed on its own below, or not at all
    captured = eng.graphs is not None and eng.graphs.capture
    hooks = [] if args.compile or captured else [(model.model, "forward"), (model, "heads")]
    for obj, name in hooks:
        timers.wrap(obj, name, "forward", sync=True)
    api, forward, host, session = [], [], [], []
    try:
        for i in range(args.n + 2):
            pushes = {s: [rng.randrange(100, 150000)] for s in sessions}
            timers.take()
            timers.sync()
            t = time.perf_counter()
            sg.push_many(pushes)
            timers.sync()
            total = time.perf_counter() - t
            parts = timers.take()
            if i < 2:  # warm-up (first use of a bucket, allocator)
                continue
            api.append(total)
            forward.append(parts.get("forward", 0.0))
            host.append(parts.get("engine", 0.0) - parts.get("forward", 0.0))
            session.append(total - parts.get("engine", 0.0))
    finally:
        for obj, name in hooks:
            delattr(obj, name)  # back to the class's method
    res = {"session_api_ms": med(api), "forward_ms": med(forward), "engine_host_ms": med(host),
           "session_layer_ms": med(session)}

    def engine_only():  # bypasses the sessions: engine work only
        for s in sessions:
            eng.submit(s.slot, [rng.randrange(100, 150000)])
        eng.run()

    res["engine_only_ms"] = round(ms(engine_only, args.n, timers), 3)
    if eng.graphs is not None and eng.graphs.buckets:
        b = eng.graphs.last  # the steady state's bucket
        if b.graph is not None:  # captured: the forward is one replay, timed on its own
            res["graph_replay_ms"] = res["forward_ms"] = round(ms(b.graph.replay, args.n, timers), 3)
            res["engine_host_ms"] = round(res["session_api_ms"] - res["session_layer_ms"] - res["forward_ms"], 3)
    for s in [*sessions, base]:
        s.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="0.6B")
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--n", type=int, default=30, help="timed steps per configuration")
    ap.add_argument("--static", action="store_true", help="static-shape decode steps on CPU too")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the machine is shared)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the static decode step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as d:
        model, labels = build_stream_model(open_checkpoint(make_stream_checkpoint(d, preset=args.preset, tokenizer=False)), dev, dt)
    tok = load_tokenizer(None)
    rng = random.Random(0)
    out = {"device": str(dev), "preset": args.preset, "context": args.context, "static": args.static,
           "compile": args.compile, "threads": args.threads}
    print(f"{'sessions':>8} {'forward':>9} {'engine host':>12} {'session layer':>14} {'session API':>12}  (ms/step)")
    for c in args.sessions:
        out[str(c)] = r = profile(model, labels, tok, c, args, dev, rng)
        print(f"{c:>8} {r['forward_ms']:>9.2f} {r['engine_host_ms']:>12.2f} {r['session_layer_ms']:>14.2f} "
              f"{r['session_api_ms']:>12.2f}", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
