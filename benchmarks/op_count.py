"""Kernels per decode step: how many aten ops one static decode step of the stream engine dispatches,
for the plain model (baseline) and the fused inference form, in the same run.

    python benchmarks/op_count.py --preset 0.6B                     # bf16, ~1 min on 2 CPU cores
    python benchmarks/op_count.py --preset tiny --dtype float32     # seconds

Why count on a CPU: a batch-1 decode step on a GPU is launch-bound (the 0.6B weights need ~0.4 ms of
H100 bandwidth, the step replayed as a CUDA graph took 4.3 ms), so the number of kernels is what the
default (non-compiled) path can cut, and it can be counted without a GPU. The step counted is exactly
the body a CUDA graph captures (`DecodeGraphs._step`), run eagerly, with a random official-format
checkpoint (`qguard.testing`). Baseline = `model.unfuse()` + the bool mask (the code before the fused
form); fused = `model.fuse_for_inference()` (the default for loaded checkpoints) + the float mask.

Two counts per step (and per decoder layer = ops inside the 28 layers / 28):
- aten ops: every op a `TorchDispatchMode` sees, run under no_grad so composite ops are decomposed the
  way they run (e.g. SDPA's bool-mask conversion shows up); view ops (no kernel) included;
- kernel estimate: the same without view/metadata ops (view, transpose, slice, ...: no launch), and with
  `F.rms_norm` counted as one op, because on CUDA it is one `_fused_rms_norm` kernel while the CPU runs
  it decomposed (pow, mean, add, rsqrt, mul, mul). It is an estimate: a few aten ops launch more than one
  kernel on CUDA (cuBLAS split-K, index_put_), and the SDPA backend differs. GPU latency must be
  measured on a GPU (benchmarks/stream_bench.py).
Also printed: the max |probability difference| between the two forms over every step of the run (the
counted step is the last of `--prompt` steps, so it attends over real keys). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import Counter

import torch
import torch.nn.functional as F
from _machine import cpu_name  # a sibling module: the scripts run from this folder
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from qguard.checkpoint import build_stream_model, open_checkpoint
from qguard.engine.graphs import DecodeGraphs
from qguard.engine.kvcache import SlotCache
from qguard.model.stream import StreamGuardModel
from qguard.testing import make_stream_checkpoint

aten = torch.ops.aten
# not views by schema, but no kernel either: metadata or allocation only
NO_KERNEL = {aten._unsafe_view, aten._reshape_alias, aten.empty, aten.empty_strided, aten.new_empty, aten.lift_fresh}
RMS_NORM = "aten.rms_norm (1 kernel on CUDA)"


class OpCounter(TorchDispatchMode):
    """Records every dispatched aten op with whether it ran inside a decoder layer."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, bool, bool]] = []  # (name, in a layer, launches a kernel)
        self.in_layer = False
        self.paused = 0

    def record(self, name: str, kernel: bool) -> None:
        self.ops.append((name, self.in_layer, kernel))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.record(str(func.overloadpacket.__name__), not (func.is_view or func.overloadpacket in NO_KERNEL))
        return func(*args, **(kwargs or {}))


class CudaFusedOps(TorchFunctionMode):
    """Counts `F.rms_norm` as the single kernel it is on CUDA (the CPU decomposes it)."""

    def __init__(self, counter: OpCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in (F.rms_norm, torch.rms_norm):
            return func(*args, **kwargs)
        self.counter.record(RMS_NORM, True)
        self.counter.paused += 1
        try:
            return func(*args, **kwargs)
        finally:
            self.counter.paused -= 1


def count_step(model: StreamGuardModel, graphs: DecodeGraphs, rows: list[tuple[int, int, int]]) -> OpCounter:
    """Run one static step for `rows` under the counters; ops inside decoder layers are marked."""
    counter = OpCounter()

    def enter(*_):
        counter.in_layer = True

    def leave(*_):
        counter.in_layer = False

    hooks = [h for layer in model.model.layers
             for h in (layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave))]
    try:
        b, _ = graphs.load_inputs(rows)
        with CudaFusedOps(counter), counter:
            graphs._step(b, b.ids.shape[0])
    finally:
        for h in hooks:
            h.remove()
    return counter


@torch.no_grad()  # not inference_mode: under no_grad composite ops decompose as they run
def measure(model: StreamGuardModel, fused: bool, args) -> dict:
    """Decode `args.prompt` tokens for each of `args.batch` sessions; count the ops of the last step."""
    model.fuse_for_inference() if fused else model.unfuse()
    cfg = model.config
    dtype = next(model.parameters()).dtype
    cache = SlotCache(cfg.num_hidden_layers, args.batch, cfg.num_key_value_heads, args.context, cfg.head_dim,
                      dtype, "cpu")
    graphs = DecodeGraphs(model, cache, args.batch, capture=False, float_mask=fused)
    ids = torch.Generator().manual_seed(0)
    tokens = torch.randint(100, 150000, (args.prompt, args.batch), generator=ids).tolist()
    probs = []
    for t, step_ids in enumerate(tokens):
        rows = [(slot, tok, t) for slot, tok in enumerate(step_ids)]
        if t == len(tokens) - 1:
            counter = count_step(model, graphs, rows)
        else:
            b, _ = graphs.load_inputs(rows)
            graphs._step(b, b.ids.shape[0])
        probs.append(graphs.last.out.clone())
    return summarize(counter, cfg.num_hidden_layers, args.top) | {"probs": torch.stack(probs)}


def summarize(counter: OpCounter, n_layers: int, top: int) -> dict:
    ops = counter.ops
    kernels = [op for op in ops if op[2]]
    return {
        "aten_ops_per_step": len(ops),
        "aten_ops_per_layer": round(sum(1 for op in ops if op[1]) / n_layers, 2),
        "kernels_per_step": len(kernels),
        "kernels_per_layer": round(sum(1 for op in kernels if op[1]) / n_layers, 2),
        "top_ops": Counter(name for name, _, _ in ops).most_common(top),
    }


def report(args, base: dict, fused: dict, diff: float, machine: str) -> dict:
    print(f"\nKernels per static decode step, preset {args.preset}, {args.dtype}, batch {args.batch}, "
          f"context {args.context} (cpu: {machine}, torch {torch.__version__})")
    print(f"{'':<28}{'baseline':>10}{'fused':>10}{'ratio':>8}")
    rows = [("aten ops / step", "aten_ops_per_step"), ("aten ops / layer", "aten_ops_per_layer"),
            ("kernel estimate / step", "kernels_per_step"), ("kernel estimate / layer", "kernels_per_layer")]
    for label, key in rows:
        print(f"{label:<28}{base[key]:>10}{fused[key]:>10}{base[key] / fused[key]:>8.2f}")
    for name, r in (("baseline", base), ("fused", fused)):
        print(f"\ntop {args.top} aten ops per step, {name}:")
        for op, n in r["top_ops"]:
            print(f"  {n:>5}  {op}")
    print(f"\nmax |prob baseline - prob fused| over {args.prompt} steps: {diff:.3g}")
    keys = [k for _, k in rows]
    return {
        "preset": args.preset, "dtype": args.dtype, "batch": args.batch, "context": args.context,
        "device": "cpu", "machine": machine, "torch": torch.__version__,
        "baseline": {k: base[k] for k in keys}, "fused": {k: fused[k] for k in keys},
        "ratio_aten_ops": round(base["aten_ops_per_step"] / fused["aten_ops_per_step"], 3),
        "ratio_kernels": round(base["kernels_per_step"] / fused["kernels_per_step"], 3),
        "max_abs_prob_diff": diff,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="0.6B", choices=["tiny", "0.6B"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="bfloat16 (the GPU default) makes the reference norm's casts real ops, as on a GPU")
    ap.add_argument("--batch", type=int, default=1, help="sessions in the step")
    ap.add_argument("--context", type=int, default=128, help="static cache length (max_context)")
    ap.add_argument("--prompt", type=int, default=4, help="decode steps run; the last one is counted")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    with tempfile.TemporaryDirectory() as d:
        ckpt = open_checkpoint(make_stream_checkpoint(d, preset=args.preset, tokenizer=False))
        model, _ = build_stream_model(ckpt, torch.device("cpu"), getattr(torch, args.dtype))
    base = measure(model, False, args)
    fused = measure(model, True, args)
    diff = float((base.pop("probs") - fused.pop("probs")).abs().max())
    out = report(args, base, fused, diff, machine)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
