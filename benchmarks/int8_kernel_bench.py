"""The int8 GEMM kernels of `quantize="int8"`, one against another, inside the Stream-0.6B decoder.

    python benchmarks/int8_kernel_bench.py                  # 0.6B architecture, ~2 min on 2 CPU cores
    python benchmarks/int8_kernel_bench.py --preset tiny    # seconds

Every exact kernel on this machine (`qguard.model.quant.KERNELS`; oneDNN only where it is not the reference
path, see below) quantizes a copy of the same random fp32 weights; the decoder then runs, per kernel:
- decode: one-token steps over 512 tokens of context, batch 1 and 16 rows (one row per session);
- prefill: one 512-token prompt (what opening a session costs).
Rounds alternate the kernels, so load from other processes hits all of them alike; figures are medians. The
last column is each kernel's time over the baseline's (`_int_mm`, the portable kernel): < 1 is faster. Also
printed: which kernel `pick_kernel` chooses for the Stream workload (one-token steps) and for Gen's
(prefill), and whether the kernels' outputs are identical (they compute the same integers). The last line
is a JSON object with the figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
from _machine import cpu_name  # a sibling module: the scripts run from this folder
from stream_bench import build_model

from qguard.engine.kvcache import SlotCache, StepPlan
from qguard.families.registry import GenFamily
from qguard.model import quant

BASELINE = "int_mm"


def exact_kernels(shape: tuple[int, int]) -> list[str]:
    """The kernels that run exactly here, minus any that `pick_kernel` would drop on `shape` (DROP times
    slower than the best at one row: oneDNN's reference path on some CPUs, seconds per step, which would
    only make this benchmark long)."""
    names = []
    for name in quant.KERNELS:
        try:
            quant.pick_kernel(name)
            names.append(name)
        except quant.InputError:
            print(f"# {name}: not available or not exact on this machine", file=sys.stderr)
    cost = dict(zip(names, quant.slice_times([quant.pick_kernel(n) for n in names], *shape)))
    best = min(cost.values())
    for n in [n for n in names if cost[n] > quant.DROP * best]:
        print(f"# {n}: {cost[n] / best:.0f}x the fastest kernel at one row here: left out", file=sys.stderr)
    return [n for n in names if cost[n] <= quant.DROP * best]


class Runner:
    """One quantized decoder and its slot cache: timed decode steps and prefills."""

    def __init__(self, model, sessions: int, ctx: int):
        self.bb = model.model
        cfg = self.bb.config
        self.cache = SlotCache(cfg.num_hidden_layers, sessions, cfg.num_key_value_heads, ctx + 8, cfg.head_dim,
                               torch.float32, "cpu")
        self.ctx = ctx

    def _run(self, slots: list[int], past: int, T: int) -> float:
        B = len(slots)
        plan = StepPlan(self.cache, torch.tensor(slots), torch.full((B,), past), torch.full((B,), T), T,
                        torch.device("cpu"))
        self.cache.begin(plan)
        ids = torch.randint(0, 1000, (B, T))
        t0 = time.perf_counter()
        self.bb(ids, plan.positions, self.cache)
        return time.perf_counter() - t0

    def prefill(self) -> float:
        return self._run([0], 0, self.ctx)

    def decode(self, rows: int) -> float:  # one new token per row after `ctx` tokens of context
        return self._run(list(range(rows)), self.ctx, 1)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="0.6B", choices=["tiny", "0.6B"])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16], help="decode batch sizes")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    base, _ = build_model(args.preset, torch.device("cpu"), torch.float32)
    shape = tuple(base.model.layers[0].mlp.gate_up[0].shape)
    names = exact_kernels(shape)
    picked = {"stream": quant.pick_kernel(shape=shape).name,
              "gen": quant.pick_kernel(shape=shape, rows=GenFamily.quantize_rows).name}
    models = {n: quant.quantize_model(copy.deepcopy(base), "int8", kernel=n) for n in names}
    del base
    runners = {n: Runner(m, max(args.rows), args.context) for n, m in models.items()}
    times: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    with torch.inference_mode():
        for r in runners.values():  # fill the context of every row once (and warm up)
            for s in range(max(args.rows)):
                r._run([s], 0, args.context)
        probe = torch.randint(0, 1000, (3, 24))
        outs = {n: m.model(probe) for n, m in models.items()}
        identical = all(torch.equal(outs[names[0]], o) for o in outs.values())
        for _ in range(args.rounds):
            for n, r in runners.items():
                times[n].setdefault("prefill", []).append(r.prefill())
                for rows in args.rows:
                    r.decode(rows)  # warm (the prefill above rewrote row 0's cache)
                    times[n].setdefault(f"decode x{rows}", []).append(
                        statistics.median(r.decode(rows) for _ in range(3)))

    ms = {n: {w: round(1e3 * statistics.median(v), 2) for w, v in t.items()} for n, t in times.items()}
    print(f"\nint8 kernels in the {args.preset} Stream decoder, cpu ({cpu_name()}, {args.threads} torch threads), "
          f"{args.context} tokens of context, {args.rounds} rounds")
    workloads = list(next(iter(ms.values())))
    print(f"{'kernel':<10}" + "".join(f"{w + ' ms':>16}{'x ' + BASELINE:>10}" for w in workloads))
    for n in names:
        row = f"{n:<10}"
        for w in workloads:
            ratio = ms[n][w] / ms[BASELINE][w] if BASELINE in ms else float("nan")
            row += f"{ms[n][w]:>16.2f}{ratio:>10.2f}"
        print(row)
    print(f"pick_kernel chooses: {picked['stream']} for one-token steps (Stream), {picked['gen']} for prefill (Gen); "
          f"outputs identical across kernels: {identical}")
    out = {"preset": args.preset, "machine": f"{cpu_name()}, {args.threads} torch threads", "context": args.context,
           "ms": ms, "picked": picked, "identical_outputs": identical,
           "wall_s": round(time.perf_counter() - t_start, 1)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
