"""Annotation throughput on Ray vs single-process annotate, on the same rows in one run.

    python benchmarks/ray_annotate_bench.py                       # tiny Stream checkpoint, 2000 rows, 1 and 2 actors
    python benchmarks/ray_annotate_bench.py --model DIR --rows 20000 --actors 1 2 4

Methods, all on the same JSONL file of synthetic conversations (half prompt rows, half prompt + response;
no content is printed) and the same checkpoint (default: a tiny random Stream checkpoint in the official
format, made here):
- single: `qguard.annotate.annotate` with a Guard loaded once in this process (load time listed apart);
- ray-N: `qguard.annotate_ray.annotate_ray` with N CPU actors on a local Ray cluster started once here
  (`ray.init` time listed apart). Its wall time includes the actors' start (each imports torch and loads
  the checkpoint) and the commit of every shard (fsynced part + manifest line).
`steady rows/s` counts the rows committed after the first shard, over the time from the first commit to
the last (the manifest's commit times): the rate once the actors run. In that window, per row: `judge`
is the actors' time in the engine (`qguard.annotate.judge_batch`), `io` reading the shard and writing its
part (fsynced); Ray's dispatch, the result's trip and the manifest's fsynced line overlap the next
shard's work (2 shards in flight per actor). Overhead per row = (ray-1 wall - single wall) / rows,
the actor's start (torch import, model load) included; steady overhead per row = 1 / ray-1 steady rate -
1 / single rate. Each method runs --repeats times, interleaved; the best run counts. Every Ray run's
labels are checked against single's, row for row. The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

WORDS = ("how", "to", "make", "a", "cake", "bomb", "vote", "lock", "pick", "sure", "sorry", "here", "is",
         "the", "recipe", "steps", "i", "cannot", "help", "with", "that", "mix", "bake", "knead", "dough")


def conversations(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24)))
        msgs = [{"role": "user", "content": prompt}]
        if i % 2:
            msgs.append({"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40)))})
        rows.append({"id": i, "messages": msgs})
    return rows


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: a tiny random Stream one)")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--shard-rows", type=int, default=250)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray cluster")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each method, interleaved; the best counts")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)  # what each 1-CPU Ray actor gets (Ray sets OMP_NUM_THREADS=1 there)
    from qguard.annotate import annotate
    from qguard.annotate_ray import MANIFEST, annotate_ray
    from qguard.runtime.guard import Guard
    from qguard.testing import make_stream_checkpoint

    work = Path(tempfile.mkdtemp(prefix="qguard-ray-bench-"))
    model = args.model or str(make_stream_checkpoint(work / "ckpt", preset="tiny", seed=0))
    inp = work / "rows.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in conversations(args.rows, args.seed)), "utf-8")
    loads = [load_average()]

    t = time.perf_counter()
    guard = Guard.from_pretrained(model, device="cpu")
    single_load = time.perf_counter() - t

    def run_single(k: int) -> float:
        t = time.perf_counter()
        annotate(guard, inp, work / f"single-{k}.jsonl", batch_size=args.batch_size, progress=False)
        return time.perf_counter() - t

    import pyarrow.parquet as pq
    import ray

    t = time.perf_counter()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING")
    ray_init = time.perf_counter() - t

    def run_ray(n: int, k: int) -> dict:
        out = work / f"ray-{n}-{k}.parquet"
        t, started = time.perf_counter(), time.time()
        annotate_ray(model, inp, out, shard_rows=args.shard_rows, batch_size=args.batch_size, actors=n,
                     gpus_per_actor=0, progress=False)
        wall = time.perf_counter() - t
        commits = sorted((json.loads(line) for line in (out / MANIFEST).read_text("utf-8").splitlines()[1:-1]),
                         key=lambda c: c["at"])
        window = commits[-1]["at"] - commits[0]["at"]  # from the first commit to the last
        steady = commits[1:]
        steady_rows = sum(c["rows"] for c in steady)
        labels = [g["label"] for g in pq.read_table(out, columns=["guard"]).column("guard").to_pylist()]
        return {"wall_s": wall, "first_commit_s": commits[0]["at"] - started,
                "steady_rows_per_s": steady_rows / window if window > 0 else None,
                # per row, in the actors: judging (the engine), reading + writing the part
                "judge_ms": 1000 * sum(c["judge_s"] for c in steady) / steady_rows,
                "io_ms": 1000 * sum(c["io_s"] for c in steady) / steady_rows,
                "label_agreement": sum(a == b for a, b in zip(labels, ref)) / len(ref)}

    singles, runs = [], {n: [] for n in args.actors}
    for k in range(args.repeats):  # interleaved, so that load from other processes hits every method alike
        singles.append(run_single(k))
        if k == 0:
            ref = [json.loads(line)["guard"]["label"] for line in
                   (work / "single-0.jsonl").read_text("utf-8").splitlines()]
        for n in args.actors:
            runs[n].append(run_ray(n, k))
        loads.append(load_average())
    ray.shutdown()

    single = min(singles)  # best of the repeats: the least disturbed run of each method
    best = {n: min(rs, key=lambda r: r["wall_s"]) for n, rs in runs.items()}
    single_rate = args.rows / single
    one = best.get(1)
    overhead = (one["wall_s"] - single) / args.rows * 1000 if one else None
    steady_over = (1 / one["steady_rows_per_s"] - 1 / single_rate) * 1000 if one and one["steady_rows_per_s"] else None
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"Annotate on Ray vs single process, {args.rows} rows, shard {args.shard_rows}, batch {args.batch_size}, "
          f"cpu ({machine}), best of {args.repeats}, load average {loads[0]} -> {loads[-1]}")
    print(f"model load (single, not in its time) {single_load:.2f} s, ray.init (not in Ray's times) {ray_init:.2f} s")
    print(f"{'method':<8}{'wall s':>8}{'rows/s':>8}{'1st shard s':>12}{'steady rows/s':>14}"
          f"{'judge ms/row':>13}{'io ms/row':>10}{'labels = single':>16}")
    print(f"{'single':<8}{single:>8.2f}{single_rate:>8.1f}{'':>12}{single_rate:>14.1f}")
    for n, r in best.items():
        print(f"{'ray-' + str(n):<8}{r['wall_s']:>8.2f}{args.rows / r['wall_s']:>8.1f}{r['first_commit_s']:>12.2f}"
              f"{r['steady_rows_per_s'] or float('nan'):>14.1f}{r['judge_ms']:>13.3f}{r['io_ms']:>10.3f}"
              f"{r['label_agreement']:>16.3f}")
    print(f"overhead per row at 1 actor vs single: {overhead:.3f} ms with the actor's start, {steady_over:.3f} ms "
          "steady" if one else "")
    rnd = {n: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for n, r in best.items()}
    print(json.dumps({"rows": args.rows, "shard_rows": args.shard_rows, "batch_size": args.batch_size,
                      "repeats": args.repeats, "machine": machine, "load_average": loads,
                      "single_s": round(single, 3), "single_all_s": [round(x, 3) for x in singles],
                      "single_rows_per_s": round(single_rate, 1), "single_load_s": round(single_load, 2),
                      "ray_init_s": round(ray_init, 2), "ray": rnd,
                      "ray_all_wall_s": {n: [round(r["wall_s"], 2) for r in rs] for n, rs in runs.items()},
                      "overhead_ms_per_row": None if overhead is None else round(overhead, 3),
                      "steady_overhead_ms_per_row": None if steady_over is None else round(steady_over, 3)}))


if __name__ == "__main__":
    main()
