"""Where a decode step's time goes: CUDA-graph replay alone vs the engine step vs the session API.

    python benchmarks/engine_profile.py --device cuda --sessions 1 256 --context 512
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time

import torch

from qguard.checkpoint import build_stream_model, open_checkpoint
from qguard.stream import StreamGuard
from qguard.testing import make_stream_checkpoint
from qguard.tokenizer import load_tokenizer


def ms(fn, n: int, device) -> float:
    fn()
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    return (time.perf_counter() - t) / n * 1e3


def profile(model, labels, tok, c: int, args, dev, rng) -> dict:
    """Time one decode step of c sessions three ways (see the module docstring)."""
    sg = StreamGuard(model, tok, labels, max_sessions=c + 1, max_context=args.context + 4 * args.n + 16,
                     compile_step=args.compile)
    base = sg.open("hello")
    base.push([rng.randrange(100, 150000) for _ in range(args.context - base.length)])
    sessions = [base.fork() for _ in range(c)]
    eng = sg.engine
    api = ms(lambda: sg.push_many({s: [rng.randrange(100, 150000)] for s in sessions}), args.n, dev)

    def engine_step():  # bypasses the sessions: engine work only
        for s in sessions:
            eng.submit(s.slot, [rng.randrange(100, 150000)])
        eng.run()

    res = {"session_api_ms": round(api, 3), "engine_step_ms": round(ms(engine_step, args.n, dev), 3)}
    if eng.graphs is not None and eng.graphs.buckets:
        b = next(iter(eng.graphs.buckets.values()))
        if b.graph is not None:
            res["graph_replay_ms"] = round(ms(b.graph.replay, args.n, dev), 3)
    for s in [*sessions, base]:
        s.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="0.6B")
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--compile", action="store_true", help="torch.compile the static decode step")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as d:
        model, labels = build_stream_model(open_checkpoint(make_stream_checkpoint(d, preset=args.preset, tokenizer=False)), dev, dt)
    tok = load_tokenizer(None)
    rng = random.Random(0)
    out = {"device": str(dev), "preset": args.preset, "context": args.context, "compile": args.compile}
    for c in args.sessions:
        out[str(c)] = res = profile(model, labels, tok, c, args, dev, rng)
        print(json.dumps({c: res}), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
