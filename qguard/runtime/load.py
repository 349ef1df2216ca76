"""The one loading sequence behind every `from_pretrained`: checkpoint -> family -> model, tokenizer,
calibration and (CPU) int8 weights, in that order.

    loaded = load("Qwen/Qwen3Guard-Stream-0.6B", device="cpu")   # Loaded(ckpt, family, model, ...)

Options are checked before anything heavy runs (a typo fails before a model loads). The calibration is
folded into the float weights, and quantization comes after fusing and calibration, since it stores the
float result. Construction options (`official_special_tokens`, the policy, ...) are the caller's: loading
reads the checkpoint the same way whatever they are.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from qguard.errors import CheckpointError, InputError
from qguard.families.registry import Family, family_for
from qguard.model.quant import DECODE_ROWS, check_quantize, quantize_model
from qguard.runtime.calibration import Calibration, calibrate_loaded
from qguard.tokenizer import load_tokenizer
from qguard.weights import Checkpoint, open_checkpoint


@dataclass
class Loaded:
    ckpt: Checkpoint
    family: Family
    model: torch.nn.Module  # on `device`, in its inference form, calibrated (and quantized if asked)
    labels: Any  # the family's label maps (Stream: StreamLabels), or None
    tokenizer: Any
    calibration: Calibration | None  # already folded into `model`
    device: torch.device


def load(name_or_path: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
         dtype: torch.dtype | str | None = None,
         calibration: Calibration | str | os.PathLike | bool | None = None,
         quantize: str | None = None, live: bool = False) -> Loaded:
    """Load a checkpoint by local path or hub id; None loads the embedded starter model.

    `live`: the caller runs live sessions (StreamGuard), so a family without them is a CheckpointError
    here, before its model is built. See `Guard.from_pretrained` for the other options.
    """
    quant = check_quantize(quantize, pick_device(device))
    ckpt = open_checkpoint(model_path(name_or_path))
    family = family_for(ckpt.config, str(ckpt.path / "config.json"))
    if live and not family.live:
        raise CheckpointError(f"{ckpt.path} is a {family.name} checkpoint, not a Stream one")
    allowed = getattr(family, "quantize_schemes", None)  # optional: every scheme when a family sets none
    if quant and allowed is not None and quant not in allowed:
        raise InputError(f"quantize={quant!r} is not offered for {family.name} checkpoints (it costs them too "
                         f"much agreement, docs/benchmarks.md 'CPU precision'); use one of {', '.join(allowed)}")
    dev = pick_device(device)
    dt = resolve_dtype(dtype, dev)
    tokenizer = load_tokenizer(ckpt.path)
    model, labels = family.load(ckpt, dev, dt)
    cal = calibrate_loaded(model, family, ckpt.path, calibration)
    if quant:
        # after fusing and calibration (both in the float weights); the int8 kernel is timed on the
        # family's workload (Gen prefills, Stream steps one token)
        quantize_model(model, quant, rows=getattr(family, "quantize_rows", DECODE_ROWS))
    return Loaded(ckpt, family, model, labels, tokenizer, cal, dev)


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls are slow and inexact there), bf16 on accelerators."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """A torch dtype, its name or short name ("bf16", "fp32", ...), or None for the device's default."""
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise InputError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)} or a torch.dtype")


def model_path(name_or_path: str | os.PathLike | None) -> str | os.PathLike:
    """The checkpoint to load: the one given, else the embedded starter model (qguard.starter)."""
    if name_or_path is not None:
        return name_or_path
    from qguard.starter import starter_model_path

    path = starter_model_path()
    if path is None:
        raise CheckpointError("no model given and this build ships no starter model: pass a path or hub id")
    return path


def pick_device(device: str | torch.device | None) -> torch.device:
    """The device asked for (InputError if this machine has none such), else cuda when available."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}: use cpu, cuda, cuda:1, ...") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r}: CUDA is not available here (torch {torch.__version__}); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev
