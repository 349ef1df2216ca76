"""Find, read and validate Qwen3Guard checkpoints: config.json + safetensors, local or from the hub.

No `trust_remote_code`, ever: `auto_map` in a config is ignored and the architecture is recognised from
`architectures` and the guard fields. Pickle weights (`*.bin`) are refused; they can execute code.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qguard.errors import CheckpointError, InputError

log = logging.getLogger(__name__)

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Buffers some exporters write that carry no weights.
IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)


class Kind(str, enum.Enum):
    GEN = "gen"
    STREAM = "stream"


@dataclass
class Checkpoint:
    path: Path
    config: dict[str, Any]
    kind: Kind
    name: str  # what the user asked for (hub id or path), for verdict provenance

    def tensor_files(self) -> list[Path]:
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            files = sorted({self.path / f for f in weight_map.values()})
            missing = [str(f.name) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{self.path}: shards listed in {INDEX} are missing: {missing}")
            return files
        if (self.path / SINGLE).is_file():
            return [self.path / SINGLE]
        shards = sorted(self.path.glob("*.safetensors"))
        if shards:
            return shards
        if list(self.path.glob("*.bin")) or list(self.path.glob("*.pt")):
            raise CheckpointError(
                f"{self.path}: only pickle weights (*.bin/*.pt) found; qguard loads safetensors only, because "
                "pickle files can run code. Convert them with safetensors first."
            )
        raise CheckpointError(f"{self.path}: no weights found (expected {SINGLE} or {INDEX} with shards)")

    def has_tensor(self, name: str) -> bool:
        for f in self.tensor_files():
            try:
                with safe_open(str(f), framework="pt") as st:
                    if name in st.keys():
                        return True
            except Exception as e:
                raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None
        return False


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub id, downloaded (or taken from the local HF cache)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p} is a file; pass the checkpoint directory that holds config.json")
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(f"checkpoint {name!r} not found: no such directory, and not a hub id like 'Qwen/Qwen3Guard-Stream-0.6B'")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(
            name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja", "tokenizer*"],
        ))
    except Exception as e:  # offline, unknown repo, auth: said in one line, not the hub's paragraph
        # `ckpt/gen-0.6b` is both a relative path and a hub id: say which was tried, so a typo in a
        # local path does not read as a network problem
        raise CheckpointError(
            f"checkpoint {name!r} not found: there is no local directory of that name (looked in {Path.cwd()}), "
            f"and as a Hugging Face hub id it could not be fetched: {_hub_failure(e)}. Check the path, or "
            "download the model on a connected machine and pass its directory."
        ) from None


def _hub_failure(e: Exception) -> str:
    """Why a hub download failed, in a few words (the classes are matched by name: they move between
    huggingface_hub versions)."""
    names = {c.__name__ for c in type(e).__mro__}
    if "GatedRepoError" in names:
        return "the repository is gated (accept its terms on the hub, then log in with `hf auth login`)"
    if "RepositoryNotFoundError" in names:
        return "no such repository on the hub (or it is private: log in with `hf auth login`)"
    if names & {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError", "ConnectError", "TimeoutError",
                "ConnectTimeout", "ReadTimeout"}:
        return "the hub cannot be reached from here and the model is not in the local Hugging Face cache"
    detail = " ".join(str(e).split())
    return f"{type(e).__name__}" + (f" ({detail[:200]})" if detail else "")


def detect_kind(config: dict[str, Any], where: str = "config.json") -> Kind:
    archs = config.get("architectures") or []
    if "Qwen3ForGuardModel" in archs or "guard_inner_size" in config:
        return Kind.STREAM
    if "Qwen3ForCausalLM" in archs:
        return Kind.GEN
    mt = config.get("model_type")
    raise CheckpointError(
        f"{where}: unsupported architecture {archs or mt!r}; qguard loads Qwen3Guard-Gen "
        "(Qwen3ForCausalLM) and Qwen3Guard-Stream (Qwen3ForGuardModel) checkpoints"
    )


def open_checkpoint(name_or_path: str | os.PathLike) -> Checkpoint:
    path = resolve(name_or_path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: config.json is missing; is this a model checkpoint directory?")
    try:
        config = json.loads(cfg_file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{cfg_file}: not UTF-8 text") from None
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object")
    return Checkpoint(path=path, config=config, kind=detect_kind(config, str(cfg_file)), name=str(name_or_path))


def load_weights(module: nn.Module, ckpt: Checkpoint, rename=lambda n: n, tied: dict[str, str] | None = None) -> None:
    """Copy every tensor of `ckpt` into `module`, strictly.

    `rename` maps official names to module names; `tied` maps a module parameter to the one it shares
    (tie_word_embeddings): the checkpoint may omit it, and a copy it holds anyway is not loaded, as in
    transformers (loading it would overwrite the shared tensor). Missing, unexpected or mis-shaped
    tensors raise one CheckpointError that lists all of them.
    """
    params = dict(module.state_dict())
    tied = tied or {}
    seen: set[str] = set()
    unexpected, mismatched, nonfinite = [], [], []
    for f in ckpt.tensor_files():
        try:
            with safe_open(str(f), framework="pt") as st:
                for official in st.keys():
                    if official.endswith(IGNORED_TENSOR_SUFFIXES):
                        continue
                    name = rename(official)
                    if name in tied:
                        continue
                    if name not in params:
                        unexpected.append(official)
                        continue
                    t = st.get_tensor(official)
                    if t.is_floating_point() and not torch.isfinite(t).all():
                        nonfinite.append(official)
                        continue
                    if tuple(t.shape) != tuple(params[name].shape):
                        mismatched.append(f"{official}: checkpoint {tuple(t.shape)} vs model {tuple(params[name].shape)}")
                        continue
                    with torch.no_grad():
                        params[name].copy_(t)
                    seen.add(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None
    missing = []
    for name in params:
        if name in seen:
            continue
        if name in tied and tied[name] in seen:
            continue
        missing.append(name)
    if nonfinite:  # a diverged training run: such a model answers NaN, which must never read as Safe
        raise CheckpointError(f"{ckpt.path}: tensors with NaN or infinite values: {nonfinite[:10]}"
                              f"{' ...' if len(nonfinite) > 10 else ''}")
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing tensors: {missing}")
        if unexpected:
            parts.append(f"unexpected tensors: {unexpected}")
        if mismatched:
            parts.append(f"shape mismatches: {mismatched}")
        raise CheckpointError(f"{ckpt.path}: checkpoint does not match the model config; " + "; ".join(parts))


def check_checkpoint_out(out: str | os.PathLike) -> Path:
    """`out` can receive a checkpoint: new, empty, or a checkpoint folder (replaced whole on save)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise CheckpointError(f"{out} holds files but no checkpoint (no config.json); give a new or empty folder")
    return out


@contextmanager
def staged_dir(out: str | os.PathLike) -> Iterator[Path]:
    """A folder to write a whole checkpoint into, renamed onto `out` when the block ends without error.

    An interrupted or failed save leaves `out` as it was (no new config beside old weights, no half
    tokenizer file), and nothing of an older model in `out` (its calibration, card, summary) stays with
    the new one. An existing `out` must be a checkpoint folder or empty: other files are not ours to delete.
    """
    out = check_checkpoint_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.saving-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def save_weights(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int | None = None) -> None:
    """Write tensors (official names) as one model.safetensors, or as shards plus an index."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    if max_shard_bytes is None:
        save_file(tensors, str(out / SINGLE), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


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


# ------------------------------------------------------------------------------------- model builders

@dataclass(frozen=True)
class StreamLabels:
    """Class index -> taxonomy, read from the checkpoint's config (string-keyed maps)."""

    risk: tuple  # tuple[Severity, ...] for the response risk head
    category: tuple  # tuple[Category, ...] for the response category head
    query_risk: tuple
    query_category: tuple

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> StreamLabels:
        from qguard.policy import (
            SEVERITIES,
            STREAM_CATEGORY_ORDER,
            label_map,
            parse_category,
            parse_severity,
        )

        labels = cls(
            risk=label_map(cfg.get("response_risk_level_map"), parse_severity, SEVERITIES, "response_risk_level_map"),
            category=label_map(cfg.get("response_category_map"), parse_category, STREAM_CATEGORY_ORDER[:8], "response_category_map"),
            query_risk=label_map(cfg.get("query_risk_level_map"), parse_severity, SEVERITIES, "query_risk_level_map"),
            query_category=label_map(cfg.get("query_category_map"), parse_category, STREAM_CATEGORY_ORDER, "query_category_map"),
        )
        for name, got, key in [("response_risk_level_map", labels.risk, "num_risk_level"),
                               ("response_category_map", labels.category, "num_category"),
                               ("query_risk_level_map", labels.query_risk, "num_query_risk_level"),
                               ("query_category_map", labels.query_category, "num_query_category")]:
            want = cfg.get(key, len(got))
            if len(got) != want:
                raise CheckpointError(f"config.json: {name} has {len(got)} labels but {key} is {want}")
        return labels


def build_stream_model(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype):
    from qguard.model.qwen3 import Qwen3Config
    from qguard.model.stream import StreamGuardModel, StreamHeadConfig

    if ckpt.kind is not Kind.STREAM:
        raise CheckpointError(f"{ckpt.path} is a {ckpt.kind.value} checkpoint, not a Stream one")
    c = ckpt.config
    if "guard_inner_size" not in c:
        raise CheckpointError(f"{ckpt.path}/config.json: guard_inner_size is missing")
    cfg = Qwen3Config.from_dict(c)
    labels = StreamLabels.from_config(c)
    heads = StreamHeadConfig(
        guard_inner_size=int(c["guard_inner_size"]), num_risk_level=len(labels.risk), num_category=len(labels.category),
        num_query_risk_level=len(labels.query_risk), num_query_category=len(labels.query_category),
    )
    with torch.device("meta"):
        model = StreamGuardModel(cfg, heads)
    model = model.to_empty(device="cpu").to(dtype)
    model.model.rotary_emb.reset()  # not in the checkpoint; recompute after to_empty
    load_weights(model, ckpt, rename=StreamGuardModel.official_to_local)
    # the fused inference form by default (fewer kernels per step, same results up to rounding); names
    # and saving stay official, and `.train()` restores the plain modules for training
    return model.to(device).fuse_for_inference(), labels


def build_gen_model(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype):
    from qguard.model.gen import GenGuardModel
    from qguard.model.qwen3 import Qwen3Config

    if ckpt.kind is not Kind.GEN:
        raise CheckpointError(f"{ckpt.path} is a {ckpt.kind.value} checkpoint, not a Gen one")
    config = dict(ckpt.config)
    if config.get("tie_word_embeddings") is None:  # transformers' default is untied: read the tensors
        config["tie_word_embeddings"] = not ckpt.has_tensor("lm_head.weight")
    cfg = Qwen3Config.from_dict(config)
    with torch.device("meta"):
        model = GenGuardModel(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    if cfg.tie_word_embeddings:  # to_empty breaks the tie; restore it before loading
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.reset()
    tied = {"lm_head.weight": "model.embed_tokens.weight"} if cfg.tie_word_embeddings else None
    load_weights(model, ckpt, tied=tied)
    return model.to(device).fuse_for_inference()  # inference form; `.train()` restores the plain one
