"""Check the stream engine against one full forward on a given device/dtype (eager and static decode).

    python benchmarks/engine_parity.py --device cuda --dtype float32

Prints the max |engine - full forward| of the response risk probabilities for random sessions and
chunkings, for the eager engine and the static (CUDA-graph) decode path. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile

import torch

from qguard.checkpoint import build_stream_model, open_checkpoint
from qguard.engine.scoring import score_sequences
from qguard.engine.stream import HeadProbs, StreamEngine
from qguard.testing import make_stream_checkpoint


def run(model, static: bool, seed: int, compile_step: bool = False) -> float:
    rng = random.Random(seed)
    eng = StreamEngine(model, max_sessions=8, max_context=256, prefill_chunk=16, static_decode=static,
                       compile_step=compile_step)
    slots = [eng.allocate() for _ in range(6)]
    seqs = {s: [] for s in slots}
    outs = {s: [] for s in slots}
    for _ in range(30):
        for s in slots:
            if rng.random() < 0.8:
                ids = [rng.randrange(100, 150000) for _ in range(rng.choice([1, 1, 1, 3, 20]))]
                if eng.length(s) + len(ids) <= 256:
                    eng.submit(s, ids)
                    seqs[s] += ids
        for s, hp in eng.run().items():
            outs[s].append(hp)
    refs = score_sequences(model, [seqs[s] for s in slots])
    return max((HeadProbs.cat(outs[s]).risk - ref.risk).abs().max().item() for s, ref in zip(slots, refs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "0.6B"])
    ap.add_argument("--compile", action="store_true", help="also check the torch.compile'd static step")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        model, _ = build_stream_model(open_checkpoint(make_stream_checkpoint(d, preset=args.preset, std=0.2, tokenizer=False)),
                                      torch.device(args.device), getattr(torch, args.dtype))
    res = {"device": args.device, "dtype": args.dtype, "preset": args.preset}
    for static in (False, True):
        res["static" if static else "eager"] = max(run(model, static, seed) for seed in range(3))
    if args.compile:
        res["static_compiled"] = max(run(model, True, seed, compile_step=True) for seed in range(3))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
