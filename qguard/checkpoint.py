"""Compatibility shim: where checkpoint loading lived before issue 15. Nothing inside qguard imports it.

Its parts now have one home each: the files (find, read, load and write safetensors) are
`qguard.weights`; which family a config is, `qguard.families.registry`; building a model, the families
(`qguard.families.stream`, `qguard.families.gen`); devices, dtypes and the starter model,
`qguard.runtime.load`. Every name that was importable from here still is, with the same behaviour and
errors (`open_checkpoint` still refuses an unknown architecture, and its checkpoints carry `kind`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from qguard import weights
from qguard.errors import CheckpointError
from qguard.families import gen, stream
from qguard.families.registry import Kind, family_for
from qguard.families.stream import StreamLabels
from qguard.runtime.load import DTYPES, default_dtype, model_path, pick_device, resolve_dtype
from qguard.weights import (
    IGNORED_TENSOR_SUFFIXES,
    INDEX,
    SINGLE,
    _hub_failure,
    check_checkpoint_out,
    load_weights,
    resolve,
    save_weights,
    staged_dir,
    write_checkpoint,
)

__all__ = [
    "DTYPES", "IGNORED_TENSOR_SUFFIXES", "INDEX", "SINGLE", "Checkpoint", "Kind", "StreamLabels", "_hub_failure",
    "build_gen_model", "build_stream_model", "check_checkpoint_out", "default_dtype", "detect_kind",
    "load_weights", "model_path", "open_checkpoint", "pick_device", "resolve", "resolve_dtype", "save_weights",
    "staged_dir", "write_checkpoint",
]


@dataclass
class Checkpoint(weights.Checkpoint):
    """`qguard.weights.Checkpoint` plus the family `kind` that `open_checkpoint` read (the old API)."""

    kind: Kind | None = None


def detect_kind(config: dict[str, Any], where: str = "config.json") -> Kind:
    return family_for(config, where).kind


def open_checkpoint(name_or_path: str | os.PathLike) -> Checkpoint:
    c = weights.open_checkpoint(name_or_path)
    return Checkpoint(path=c.path, config=c.config, name=c.name,
                      kind=detect_kind(c.config, str(c.path / "config.json")))


def _expect(ckpt: weights.Checkpoint, kind: Kind, what: str) -> None:
    got = getattr(ckpt, "kind", None) or detect_kind(ckpt.config, str(ckpt.path / "config.json"))
    if got is not kind:
        raise CheckpointError(f"{ckpt.path} is a {getattr(got, 'value', got)} checkpoint, not a {what} one")


def build_stream_model(ckpt: weights.Checkpoint, device: torch.device, dtype: torch.dtype):
    _expect(ckpt, Kind.STREAM, "Stream")
    return stream.build_model(ckpt, device, dtype)


def build_gen_model(ckpt: weights.Checkpoint, device: torch.device, dtype: torch.dtype):
    _expect(ckpt, Kind.GEN, "Gen")
    return gen.build_model(ckpt, device, dtype)
