"""Training step time: dense AdamW (before) vs lazy Adam on a sparse token embedding (now), same run.

`qguard.train.optim.TrainOptimizer(sparse_embedding=True)` gives the token embedding a sparse gradient
(only the rows a batch looks up) and updates it with torch's SparseAdam; the rest stays on AdamW. This
runs the real trainers both ways, alternating, from the same random model and the same synthetic data:
`train_stream` (the Stream losses; prompt and response rows) and `pretrain_backbone` (sampled-softmax
causal LM), each for `--steps` steps, and prints ms per step and the ratio.

    python benchmarks/train_bench.py                    # the starter's architecture, CPU, ~1-2 min
    python benchmarks/train_bench.py --threads 1 --steps 20

The last line is a JSON object with the ms per step of each variant and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics

import torch

from qguard.train.data import Example
from qguard.train.pretrain import PretrainConfig, pretrain_backbone
from qguard.train.stream import DEFAULT_ARCH, StreamTrainConfig, fresh_model, train_stream

VOCAB = DEFAULT_ARCH["vocab_size"]


def examples(n: int, length: int, rng: random.Random) -> list[Example]:
    """Half prompt rows (label at the last token), half response rows (a label per answer token)."""
    out = []
    for i in range(n):
        ids = [rng.randrange(VOCAB) for _ in range(rng.randint(length // 2, length))]
        if i % 2:
            out.append(Example(ids, query_pos=len(ids) - 1, query_label=i % 3 // 2, query_cat=[1.0] + [0.0] * 8))
        else:
            start = len(ids) // 3
            out.append(Example(ids, resp_start=start, resp_labels=[i % 4 // 3] * (len(ids) - start),
                               resp_cat=[0.0] * 7 + [1.0]))
    return out


def stream_ms(sparse: bool, data: list[Example], steps: int) -> float:
    cfg = StreamTrainConfig(max_steps=steps + 2, warmup_steps=1, sparse_embedding=sparse, log_every=10**9)
    return train_stream(cfg, data).seconds / (steps + 2) * 1e3


def pretrain_ms(sparse: bool, seqs: list[list[int]], steps: int) -> float:
    cfg = PretrainConfig(minutes=None, max_steps=steps + 2, warmup_steps=1, sparse_embedding=sparse, log_every=10**9)
    return pretrain_backbone(fresh_model(DEFAULT_ARCH, 0), seqs, cfg).seconds / (steps + 2) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per run (each run adds 2 more)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating dense/sparse runs of each trainer")
    ap.add_argument("--length", type=int, default=256, help="longest synthetic sequence (tokens)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rng = random.Random(0)
    data = examples(64 * a.steps, a.length, rng)  # ~8k-token batches: enough rows for every step
    seqs = [e.ids for e in data]
    res: dict[str, dict[str, list[float]]] = {"stream": {"dense": [], "sparse": []}, "pretrain": {"dense": [], "sparse": []}}
    for _ in range(a.rounds):
        for sparse in (False, True):
            key = "sparse" if sparse else "dense"
            res["stream"][key].append(stream_ms(sparse, data, a.steps))
            res["pretrain"][key].append(pretrain_ms(sparse, seqs, a.steps))
    summary = {}
    print(f"{'trainer':<10} {'dense AdamW ms/step':>20} {'sparse embedding ms/step':>25} {'speed-up':>9}")
    for trainer, r in res.items():
        dense, sparse = statistics.median(r["dense"]), statistics.median(r["sparse"])
        summary[trainer] = {"dense_ms": round(dense, 1), "sparse_ms": round(sparse, 1), "speedup": round(dense / sparse, 2)}
        print(f"{trainer:<10} {dense:>20.1f} {sparse:>25.1f} {dense / sparse:>8.2f}x")
    print(json.dumps({"threads": a.threads, "steps": a.steps, "rounds": a.rounds, **summary}))


if __name__ == "__main__":
    main()
