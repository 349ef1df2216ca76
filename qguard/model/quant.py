"""Reduced-precision CPU inference: int8 weights for the decoder's linear layers.

On a CPU a decode step at small batch is bound by reading the weights (the 0.6B decoder is 1.8 GB in
fp32, read once per step), so storing them in int8 cuts the bytes 4x and lets the CPU's int8 dot-product
units (VNNI / AMX) do the math. What is quantized and what is not:

- quantized: the decoder's projections (q/k/v, o, gate/up, down: >99% of its matmul weights), per output
  channel, symmetric (int8 = round(w / s), s = max|w_row| / 127);
- kept in the model's dtype: token embeddings (a lookup: one row per token, no bandwidth to save), every
  norm, RoPE, attention and its KV cache, the Stream guard heads and the Gen lm_head (small, or only
  applied to a few rows, and where the probabilities are made: their precision is kept).

Three schemes (`SCHEMES`), chosen by the agreement and speed measured in docs/benchmarks.md:

- `"int8"` (dynamic activations): each row (one token) of a projection's input is quantized to int8 with
  its own scale at run time, and the product is an exact int8 x int8 -> int32 GEMM: oneDNN's `qlinear`,
  fbgemm's or `torch._int_mm`, whichever is measured fastest on this CPU for the model's workload
  (`pick_kernel`). Per ROW, not per tensor as PyTorch's `quantize_dynamic` (fbgemm) does: a token's
  result then never depends on the other tokens or sessions of the batch, so batched streaming equals
  batch-1 scoring (up to float rounding) and one client's text cannot change another's verdict.
- `"int8-weight"` (weight-only): int8 weights, activations kept in bf16, `aten._weight_int8pack_mm` for
  one-token steps (it dequantizes inside the kernel) and a bf16 GEMM on weights dequantized per call
  for larger batches. More exact than dynamic int8, slower when batched (see docs/benchmarks.md).
- `"int4-weight"` (weight-only, int4 per group of 64 input channels, `Int4WeightLinear`): half of int8's
  bytes, so the fastest one-token step, and the least exact scheme; Stream models only (on Gen it
  changed most generated answers, so the Gen family refuses it: `quantize_schemes` in the registry).

The transformation runs after a model is loaded, fused (`InferenceFusion.fuse_for_inference`) and
calibrated, and before an engine is built: `quantize_model`. It replaces each fused weight stack (qkv,
gate/up) and o_proj/down_proj with an int8 module and drops the float weights (their memory is freed);
the plain projections become `Dropped` placeholders. A quantized model is inference-only: it runs only in
the fused form, and training, unfusing, `state_dict()` (so every checkpoint save) and `load_state_dict`
raise `QuantizedModelError`, so a reduced-precision checkpoint can never be written over an original.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qguard.errors import InputError
from qguard.model.qwen3 import InferenceFusion, QuantizedModelError, Qwen3Model

log = logging.getLogger(__name__)

SCHEMES = ("int8", "int8-weight", "int4-weight")
QMAX = 127  # symmetric int8 (-127..127): zero maps to zero and the range is the same on both sides
TINY = 1e-30  # scale floor: an all-zero row or weight channel quantizes to zeros instead of NaN


def check_quantize(quantize: str | None, device: torch.device | str | None = None) -> str | None:
    """The scheme name (None: no quantization), or an InputError naming the problem."""
    if quantize is None or quantize in ("none", ""):
        return None
    if not isinstance(quantize, str) or quantize not in SCHEMES:
        raise InputError(f"unknown quantize option {quantize!r}: use one of {', '.join(SCHEMES)} (or None)")
    if device is not None and torch.device(device).type != "cpu":
        raise InputError(f"quantize={quantize!r} is a CPU option (int8 CPU kernels); on {device} use "
                         "dtype='bfloat16' instead")
    return quantize


def quantization_of(model: nn.Module) -> str | None:
    """The scheme a model was quantized with, or None for a full-precision model."""
    return getattr(model, "quantized", None)


def kernel_of(model: nn.Module) -> str | None:
    """The int8 GEMM kernel (`KERNELS` name) of a model quantized with "int8", else None."""
    return next((m.kernel.name for m in model.modules() if isinstance(m, Int8Linear)), None)


def _refuse_saving(module: nn.Module) -> None:
    """state_dict() and load_state_dict() of `module` (or of any model holding it) raise: its float
    weights are gone, so a save would write a reduced-precision or incomplete checkpoint."""
    module.register_state_dict_pre_hook(refuse_save)
    module.register_load_state_dict_pre_hook(refuse_save)


def refuse_save(module: nn.Module, *_: Any) -> None:
    """The pre-hook of `_refuse_saving`."""
    raise QuantizedModelError(
        f"this model has {quantization_of(module) or 'int8'} weights (quantize=...): a reduced-precision, "
        "inference-only copy that cannot be saved, trained or loaded into; load the original checkpoint "
        "without quantize to do that")


# -------------------------------------------------------------------------------------------- weights

def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (int8 [out, in], fp32 scale [out]), symmetric per output channel."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=TINY) / QMAX
    return torch.round(w / scale[:, None]).to(torch.int8), scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] float -> (int8 [M, K], fp32 [M, 1] max |x| per row): row m is xq[m] * amax[m] / 127."""
    # abs().amax(): ~10x faster than vector_norm(ord=inf) on CPU (19 vs 211 us at 64 x 1024); exact in bf16
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp_(min=TINY)
    return torch.round(x * (QMAX / amax)).to(torch.int8), amax


class _Kernel:
    """int8 x int8 -> float GEMM: `pack` the weight once, `mm`(xq int8 [M, K], packed, per-channel scale
    [N], out dtype) = (xq @ wq^T) * scale in `dtype`."""

    name = ""

    def pack(self, wq: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mm(self, xq: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError


class OneDNNKernel(_Kernel):
    """oneDNN's int8 linear (`torch.ops.onednn.qlinear_pointwise`): VNNI / AMX int8 units; the weight is
    reordered once into oneDNN's layout (an opaque tensor; `unpack` recovers the int8 values).

    oneDNN runs a few rows of some shapes (small outputs, e.g. 64 or 80 columns) on a slow reference path:
    0.3-2 ms where 8 rows take 30 us on this project's CPU. So the first weight of each shape measures
    which row count is fast (`_min_rows`), and inputs with fewer rows are padded with zero rows to it. The
    padded rows' results are dropped; the real rows' are unchanged (rows are independent), so this only
    ever changes speed.
    """

    name = "onednn"
    PROBE_ROWS = (1, 2, 4, 8, 16)

    def __init__(self):
        self.min_rows: dict[tuple[int, int], int] = {}

    def pack(self, wq):
        packed = torch.ops.onednn.qlinear_prepack(wq, None)
        if wq.shape not in self.min_rows:
            self.min_rows[tuple(wq.shape)] = self._min_rows(packed, *wq.shape)
        return packed

    def unpack(self, packed):
        return packed.to_dense().t().contiguous()

    def _qlinear(self, xq, packed, scale, dtype):
        return torch.ops.onednn.qlinear_pointwise(xq, 1.0, 0, packed, scale, _zeros(scale.shape[0]), None, 1.0, 0,
                                                  dtype, "none", [], "")

    def _min_rows(self, packed, n: int, k: int) -> int:
        """The fewest rows (of PROBE_ROWS) that run no slower than 1.1x the largest probe."""
        import time

        scale = torch.ones(n)

        def t(m: int) -> float:
            xq = torch.zeros(m, k, dtype=torch.int8)
            self._qlinear(xq, packed, scale, torch.float32)  # warm-up: primitive creation
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                self._qlinear(xq, packed, scale, torch.float32)
                times.append(time.perf_counter() - t0)
            return min(times)

        times = {m: t(m) for m in self.PROBE_ROWS}
        top = times[self.PROBE_ROWS[-1]]
        return next(m for m in self.PROBE_ROWS if times[m] <= 1.1 * top)

    def mm(self, xq, packed, scale, dtype):
        m = xq.shape[0]
        need = self.min_rows.get((scale.shape[0], xq.shape[1]), 1)
        if m >= need:
            return self._qlinear(xq, packed, scale, dtype)
        xq = torch.cat((xq, xq.new_zeros(need - m, xq.shape[1])))
        return self._qlinear(xq, packed, scale, dtype)[:m]


class IntMMKernel(_Kernel):
    """`torch._int_mm` (exact int32 accumulation, any CPU): the portable fallback, slower than oneDNN."""

    name = "int_mm"

    def pack(self, wq):
        return wq.t().contiguous()  # [K, N]

    def unpack(self, packed):
        return packed.t().contiguous()

    def mm(self, xq, packed, scale, dtype):
        return (torch._int_mm(xq, packed).float() * scale).to(dtype)


class FbgemmKernel(_Kernel):
    """fbgemm's int8 GEMM (`quantized::linear_with_input_q_dq_qweight_dq_output_fp32`): the fastest at one
    row on this project's AMD CPU (0.6B layer weights at ~21 GB/s, where `_int_mm` reads ~11 and the
    weight-only int8pack ~16; docs/benchmarks.md).

    The op quantizes a float input itself with ONE scale and zero point for the whole tensor, which would
    tie a row's rounding to the other rows of the batch. So it is handed the rows already quantized
    (`quantize_rows`: each row its own scale), as floats holding those integers, with scale 1 and zero
    point 128: its rounding of an integer is the integer, and u8 = xq + 128 is what it multiplies, with the
    zero point's term subtracted exactly. Weight scales are applied afterwards, so the result is the same
    (xq @ wq^T) * scale as `_int_mm`'s, and every row stays independent of the others.
    """

    name = "fbgemm"

    def pack(self, wq):
        n = wq.shape[0]
        with warnings.catch_warnings():
            # torch deprecates its quantized tensor types; while they exist, fbgemm's packing takes one. If
            # a release removes them, `_exact` finds this kernel broken and the others are used.
            warnings.simplefilter("ignore", UserWarning)
            qw = torch._make_per_channel_quantized_tensor(wq, torch.ones(n, dtype=torch.double),
                                                          torch.zeros(n, dtype=torch.long), 0)
            return torch.ops.quantized.linear_prepack(qw, None)

    def unpack(self, packed):
        return torch.ops.quantized.linear_unpack(packed)[0].int_repr()

    def mm(self, xq, packed, scale, dtype):
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(xq.float(), 1.0, 128, packed)
        return y.mul_(scale).to(dtype)


_ZEROS: dict[int, torch.Tensor] = {}


def _zeros(n: int) -> torch.Tensor:
    z = _ZEROS.get(n)
    if z is None:
        z = _ZEROS[n] = torch.zeros(n, dtype=torch.long)
    return z


KERNELS: dict[str, Callable[[], _Kernel]] = {"onednn": OneDNNKernel, "fbgemm": FbgemmKernel, "int_mm": IntMMKernel}
_READY: dict[str, _Kernel | None] = {}  # kernel name -> its one instance, None where it is not exact here


def _exact(kernel: _Kernel) -> bool:
    """Does `kernel` compute int8 products exactly on this CPU? Extreme values on both sides: CPUs without
    VNNI add u8 x s8 pairs in saturating int16, which would silently clip these sums."""
    g = torch.Generator().manual_seed(0)
    wq = torch.randint(-QMAX, QMAX + 1, (48, 80), generator=g, dtype=torch.int8)
    wq[:8] = QMAX
    wq[8:16] = -QMAX
    xq = torch.randint(-QMAX, QMAX + 1, (5, 80), generator=g, dtype=torch.int8)
    xq[0], xq[1] = QMAX, -QMAX
    scale = torch.ones(48)
    want = (xq.double() @ wq.double().t()).float()
    try:
        got = kernel.mm(xq, kernel.pack(wq), scale, torch.float32)
    except (RuntimeError, NotImplementedError, AttributeError) as e:  # op missing in this torch build
        log.info("int8 kernel %s unavailable: %s", kernel.name, e)
        return False
    return bool(torch.equal(got, want))


DECODE_ROWS = (1, 16)  # the row counts `pick_kernel` times by default: a decode step alone and batched


def pick_kernel(name: str | None = None, shape: tuple[int, int] | None = None,
                rows: tuple[int, ...] = DECODE_ROWS) -> _Kernel:
    """The int8 GEMM to use: `name` if given; else, of the kernels that are exact here (checked once per
    process), the fastest on a weight of `shape` ([out, in]) for inputs of `rows` rows (measured once per
    shape, rows and process), or the first one (oneDNN, then fbgemm, then `_int_mm`) without a shape.

    `rows` is the workload: kernels rank differently by row count (on this project's CPU fbgemm is 2x
    `_int_mm`'s speed at one row and ~0.9x at 512), so a family that mostly prefills (Gen) asks for more.
    Every exact kernel computes the same integers, so the choice only ever changes speed."""
    if name is not None and name not in KERNELS:
        raise InputError(f"unknown int8 kernel {name!r}: use one of {', '.join(KERNELS)}")
    for n in [name] if name else KERNELS:
        if n not in _READY:
            kernel = KERNELS[n]()
            _READY[n] = kernel if _exact(kernel) else None
    if name:
        if _READY[name] is None:
            raise InputError(f"the {name} int8 kernel does not run exactly on this machine")
        return _READY[name]
    exact = [k for k in _READY.values() if k is not None]
    if not exact:
        raise InputError("no exact int8 GEMM kernel on this machine (torch build without oneDNN, fbgemm and "
                         "_int_mm)")
    if shape is None or len(exact) == 1:
        return exact[0]
    key = (tuple(shape), tuple(rows))
    if key not in _FASTEST:
        _FASTEST[key] = _fastest(exact, *shape, rows=rows)
        log.info("int8 kernel for %s weights at %s rows: %s", shape, rows, _FASTEST[key].name)
    return _FASTEST[key]


_FASTEST: dict[tuple[tuple[int, int], tuple[int, ...]], _Kernel] = {}  # (shape, rows) -> the fastest kernel


def _best_times(jobs: list[tuple[_Kernel, list[torch.Tensor], torch.Tensor, torch.Tensor]]) -> list[float]:
    """jobs: (kernel, packed copies of a weight, scale, int8 input); the best of ROUNDS runs of each, the
    jobs' runs interleaved (one run of each in turn), every run of a kernel on its next copy."""
    import time

    for kern, packed, scale, xq in jobs:
        kern.mm(xq, packed[0], scale, torch.float32)  # warm-up: primitive creation (packing touched the pages)
    best = [float("inf")] * len(jobs)
    turn: dict[int, int] = {}  # per list of copies: runs so far (the warm-up used copy 0)
    for _ in range(ROUNDS):
        for i, (kern, packed, scale, xq) in enumerate(jobs):
            n_run = turn[id(packed)] = turn.get(id(packed), 0) + 1
            t0 = time.perf_counter()
            kern.mm(xq, packed[n_run % len(packed)], scale, torch.float32)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def _int8(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.randint(-QMAX, QMAX + 1, shape, generator=g, dtype=torch.int8)


def slice_times(kernels: list[_Kernel], n: int, k: int, m: int = 1) -> list[float]:
    """Each kernel's best time for m rows on a slice of PROBE_ROWS output channels of an [n, k] weight:
    cheap to pack for every kernel, and enough to expose a reference path (oneDNN's: 171x the fastest at
    one row on this project's CPU; packing its full 6144 x 1024 weight took 17 s)."""
    g = torch.Generator().manual_seed(0)
    small = _int8((min(n, PROBE_ROWS), k), g)
    ones, xq = torch.ones(small.shape[0]), _int8((m, k), g)
    return _best_times([(kern, [kern.pack(small)], ones, xq) for kern in kernels])


def _fastest(kernels: list[_Kernel], n: int, k: int, rows: tuple[int, ...] = DECODE_ROWS) -> _Kernel:
    """The kernel with the least total time over inputs of `rows` rows on an [n, k] weight. Measured,
    never assumed from the name: the same oneDNN build that runs 1 x 1024 x 6144 in ~30 us on an Intel
    CPU with VNNI took 130 ms (a reference path) on this project's AMD EPYC CPU, where fbgemm took 0.1 ms.
    So every kernel is first timed at rows[0] on a slice (`slice_times`), and one DROP times slower than
    the best there is dropped before the full shape is packed; a slow path then costs well under a
    second, once per shape and process. The kernels' runs interleave, so a burst of load from another
    process slows all of them alike instead of deciding the choice."""
    cost = slice_times(kernels, n, k, rows[0])
    alive = [kern for kern, c in zip(kernels, cost) if c <= DROP * min(cost)]
    if len(alive) == 1:
        return alive[0]
    # In a model every projection's weight comes from memory, not from a cache that held it a moment ago:
    # timed on one hot weight, fbgemm looked faster than `_int_mm` at 512 rows here, and was 1.15x slower
    # on cold ones, as in a real prefill. So the runs cycle through copies that together outgrow the caches.
    g = torch.Generator().manual_seed(1)
    copies = min(16, -(-COLD_BYTES // (n * k)))
    wqs = [_int8((n, k), g) for _ in range(copies)]
    scale = torch.ones(n)
    packed = [[kern.pack(w) for w in wqs] for kern in alive]
    del wqs
    inputs = [_int8((m, k), g) for m in rows]
    times = _best_times([(kern, p, scale, x) for kern, p in zip(alive, packed) for x in inputs])
    total = [sum(times[i * len(rows):(i + 1) * len(rows)]) for i in range(len(alive))]
    return alive[total.index(min(total))]


PROBE_ROWS = 128  # output channels of the first, cheap round of `_fastest`
DROP = 10  # a kernel this many times slower than the best on that slice is not timed further (oneDNN's
# reference path: 171x; a wider margin than real kernels differ by, so noise on a busy machine cannot drop one)
ROUNDS = 5  # timed runs of each kernel and row count in `_fastest`
COLD_BYTES = 64 << 20  # int8 weight copies `_fastest` cycles through: more than a server CPU's last-level cache


# --------------------------------------------------------------------------------------------- modules

class _QuantModule(nn.Module):
    """Shared by the int8 modules: CPU only, and they keep their own tensors (not parameters or buffers,
    so `.to(dtype)` casts around them: int8 values and fp32 scales stay as they are, the output follows
    the input's dtype)."""

    quantized = "int8"

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias_f32 = None if bias is None else bias.detach().float().clone()
        _refuse_saving(self)

    def _apply(self, fn, recurse=True):
        # where would a CPU float tensor go? a move off the CPU is refused; a dtype cast is ignored
        if fn(torch.empty(0)).device.type != "cpu":
            raise QuantizedModelError("int8 weights run on the CPU only; load the checkpoint on the GPU without "
                                      "quantize (dtype='bfloat16')")
        return self

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias_f32 is None else y.add_(self.bias_f32)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias_f32 is not None}"


class Int8Linear(_QuantModule):
    """y = x W^T + b with W in int8 (per output channel) and x quantized per row at run time ("int8").

    y[m] = (xq[m] . wq^T) * w_scale * amax[m] / 127: the per-row activation scale is applied after the
    GEMM, so the kernel needs no per-row support and one row's scale never touches another row.
    """

    quantized = "int8"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, kernel: _Kernel | None = None):
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.kernel = kernel or pick_kernel(shape=tuple(weight.shape))
        wq, scale = quantize_weight(weight)
        self.scale = scale / QMAX  # folds the activations' 1/127 into the weight scale
        self.packed = self.kernel.pack(wq)

    def _mm(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
        shape = x.shape
        xq, amax = quantize_rows(x.reshape(-1, self.in_features))
        return self.kernel.mm(xq, self.packed, self.scale, x.dtype), amax, shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, amax, shape = self._mm(x)
        return self._finish(y.mul_(amax)).view(*shape[:-1], self.out_features)

    def addmm_(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out += self(x) in place (the residual add of `qguard.model.qwen3.add_linear_`); returns out."""
        y, amax, _ = self._mm(x)
        flat = out.view(-1, self.out_features)
        flat.addcmul_(y, amax)
        if self.bias_f32 is not None:
            flat.add_(self.bias_f32)
        return out

    def weight_int8(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 [out, in], fp32 scale [out]) as quantized (for tests and inspection)."""
        return self.kernel.unpack(self.packed), self.scale * QMAX

    def __getstate__(self):  # copy/pickle: oneDNN's packed tensor has no storage; keep the int8 values
        state = self.__dict__.copy()
        state["packed"] = self.kernel.unpack(self.packed)
        state["kernel"] = self.kernel.name
        return state

    def __setstate__(self, state):
        kernel = pick_kernel(state["kernel"])
        state = {**state, "kernel": kernel, "packed": kernel.pack(state["packed"])}
        super().__setstate__(state)


class _WeightOnly(_QuantModule):
    """The weight-only schemes: x in bf16 times a dequantizing kernel's weight; a subclass gives
    `_product(xb)`: bf16 [M, in_features] -> [M, out_features]."""

    def _product(self, xb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _mm(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
        return self._product(x.reshape(-1, self.in_features).to(torch.bfloat16)), x.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, shape = self._mm(x)
        return self._finish(y.to(x.dtype)).view(*shape[:-1], self.out_features)

    def addmm_(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y, _ = self._mm(x)
        flat = out.view(-1, self.out_features)
        flat.add_(y)
        if self.bias_f32 is not None:
            flat.add_(self.bias_f32)
        return out


class Int8WeightLinear(_WeightOnly):
    """y = x W^T + b with W in int8 (per output channel) and x in bf16 ("int8-weight", weight-only).

    Up to SMALL_M rows (decode steps of up to 32 sessions) use `aten._weight_int8pack_mm`, which dequantizes
    inside the kernel; larger inputs (prefill) dequantize the weight to bf16 for one GEMM (a temporary copy
    per call).
    """

    quantized = "int8-weight"
    # measured on this project's CPU, per 0.6B layer: int8pack 2.4 / 9.2 / 29.6 ms at 1 / 16 / 64 rows,
    # dequantize + bf16 GEMM 13.8 / 13.7 / 17.5 ms
    SMALL_M = 32

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.wq, scale = quantize_weight(weight)
        self.scale = scale.to(torch.bfloat16)

    def _product(self, xb: torch.Tensor) -> torch.Tensor:
        if xb.shape[0] <= self.SMALL_M:
            return torch.ops.aten._weight_int8pack_mm(xb, self.wq, self.scale)
        return F.linear(xb, self.wq.to(torch.bfloat16) * self.scale[:, None])

    def weight_int8(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.wq, self.scale.float()


class Int4WeightLinear(_WeightOnly):
    """y = x W^T + b with W in int4, asymmetric per group of GROUP input channels, x in bf16 ("int4-weight").

    Half the bytes of int8: on a CPU a one-token step is bound by reading the weights, so this is the
    fastest scheme per token (docs/benchmarks.md), and the least exact one: check its agreement first.
    Group g of row n holds q in 0..15 with w = min + q * s (s = (max - min) / 15), which is PyTorch's int4
    layout, w = (q - 8) * s + zero with zero = min + 8 s, stored as bf16 (s, zero) pairs. The product is
    `aten._weight_int4pack_mm_for_cpu` (it dequantizes inside the kernel) at every batch size: no second
    copy of the weight is kept for a dequantized GEMM, so prefill is slower than int8-weight's (measured in
    docs/benchmarks.md). Input channels are zero-padded to a multiple of GROUP where a model's are not
    (the kernel's groups must tile the rows); padded weights and inputs are zeros, so results are unchanged.
    """

    quantized = "int4-weight"
    GROUP = 64  # one (scale, zero) pair per 64 weights: 6% extra bytes; 32 is more exact, 128 leaner

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.pad = -self.in_features % self.GROUP
        q, self.scale_zero = quantize_weight_int4(F.pad(weight.detach().float(), (0, self.pad)), self.GROUP)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # uint8 [N, K / 2]

    def _product(self, xb: torch.Tensor) -> torch.Tensor:
        if self.pad:
            xb = F.pad(xb, (0, self.pad))
        return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, self.GROUP, self.scale_zero)


def quantize_weight_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float (K a multiple of `group`) -> (int32 q in 0..15 [N, K], bf16 (scale, zero) [K / group, N, 2]):
    w ~ (q - 8) * scale + zero per group. q is computed from the bf16-rounded scale and zero the kernel
    reads, so rounding them moves no weight by more than half a step."""
    n, k = weight.shape
    w = weight.view(n, k // group, group)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=TINY).to(torch.bfloat16)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)
    base = zero.float() - 8 * scale.float()  # the value q = 0 stands for
    q = torch.round((w - base[..., None]) / scale.float()[..., None]).clamp_(0, 15).to(torch.int32).view(n, k)
    return q, torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous()


def dequantize_int4(module: Int4WeightLinear) -> torch.Tensor:
    """The float weight [out, in] an int4 module computes with (for tests and inspection): its product
    with the identity, which is exact (one nonzero term per output)."""
    eye = torch.eye(module.in_features, dtype=torch.bfloat16)
    return module._product(eye).float().t().contiguous()


class Dropped(nn.Module):
    """Where an official projection was: its weights now live, quantized, in the fused int8 module."""

    def __init__(self, fused_as: str, in_features: int, out_features: int, scheme: str):
        super().__init__()
        self.fused_as, self.in_features, self.out_features, self.quantized = fused_as, in_features, out_features, scheme
        _refuse_saving(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise QuantizedModelError(f"this projection's weights were quantized into {self.fused_as}: a quantized model "
                                  "runs only in its fused inference form (under torch.no_grad / inference_mode)")

    def extra_repr(self) -> str:
        return f"fused_as={self.fused_as!r}"


# ------------------------------------------------------------------------------------------ transform

def _make(scheme: str, weight: torch.Tensor, bias: torch.Tensor | None, kernel: _Kernel | None) -> _QuantModule:
    if scheme == "int8":
        return Int8Linear(weight, bias, kernel)
    return Int8WeightLinear(weight, bias) if scheme == "int8-weight" else Int4WeightLinear(weight, bias)


@torch.no_grad()
def quantize_model(model: InferenceFusion, scheme: str = "int8", kernel: str | None = None,
                   rows: tuple[int, ...] = DECODE_ROWS) -> InferenceFusion:
    """Quantize the decoder projections of a Stream or Gen model in place (see the module docstring).

    The model must be on the CPU; it is fused first if it is not. Everything else (embeddings, norms,
    attention, heads, lm_head) stays in the model's dtype. `kernel` forces an int8 GEMM for "int8"
    ("onednn", "fbgemm" or "int_mm"; default: the exact one measured fastest on this CPU for inputs of
    `rows` rows, the model's workload: `DECODE_ROWS` for one-token steps, larger for prefill). Returns the
    model.
    """
    scheme = check_quantize(scheme)
    if scheme is None:
        return model
    if quantization_of(model):
        raise QuantizedModelError(f"this model is already quantized ({quantization_of(model)})")
    if next(model.parameters()).device.type != "cpu":
        raise InputError("quantize_model takes a CPU model (int8 CPU kernels); move it to the CPU first")
    model.fuse_for_inference()
    backbones = [m for m in model.modules() if isinstance(m, Qwen3Model)]
    if not backbones:
        raise InputError(f"{type(model).__name__} has no Qwen3 decoder to quantize")
    kern = None
    if scheme == "int8":  # one kernel for the whole model, measured on its largest projection (gate/up)
        kern = pick_kernel(kernel, shape=tuple(backbones[0].layers[0].mlp.gate_up[0].shape), rows=rows)
    if scheme == "int4-weight" and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        raise InputError("quantize='int4-weight' needs torch's CPU int4 kernel (torch >= 2.6); use 'int8-weight'")
    for backbone in backbones:
        for i, layer in enumerate(backbone.layers):
            a, m = layer.self_attn, layer.mlp
            where = f"layers.{i}"
            a.qkv = _make(scheme, *a.qkv, kern)
            m.gate_up = _make(scheme, *m.gate_up, kern)
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(a, name, _drop(getattr(a, name), f"{where}.self_attn.qkv", scheme))
            for name in ("gate_proj", "up_proj"):
                setattr(m, name, _drop(getattr(m, name), f"{where}.mlp.gate_up", scheme))
            a.o_proj = _make(scheme, a.o_proj.weight, a.o_proj.bias, kern)
            m.down_proj = _make(scheme, m.down_proj.weight, m.down_proj.bias, kern)
    for mod in model.modules():
        if isinstance(mod, InferenceFusion):
            mod.quantized = scheme  # the fused form is now the only one (see InferenceFusion)
            _refuse_saving(mod)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _drop(lin: nn.Linear, fused_as: str, scheme: str) -> Dropped:
    return Dropped(fused_as, lin.in_features, lin.out_features, scheme)


def decoder_weight_bytes(model: nn.Module) -> int:
    """Bytes of the decoder projections' weights as stored now (int8 or float), for reports."""
    total = 0
    for backbone in (m for m in model.modules() if isinstance(m, Qwen3Model)):
        for layer in backbone.layers:
            a, m = layer.self_attn, layer.mlp
            for lin in (a.qkv, m.gate_up, a.o_proj, m.down_proj):
                if isinstance(lin, _QuantModule):
                    total += lin.in_features * lin.out_features + 4 * lin.out_features
                elif isinstance(lin, tuple):
                    total += lin[0].numel() * lin[0].element_size()
                else:
                    total += lin.weight.numel() * lin.weight.element_size()
    return total
