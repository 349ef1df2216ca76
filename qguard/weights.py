"""Checkpoint files: find a checkpoint folder (local or on the hub), read its config, load and write its
safetensors weights. Nothing here knows a guard family: the families build their models on top of it.

No `trust_remote_code`, ever: `auto_map` in a config is never read. Pickle weights (`*.bin`) are refused;
they can execute code. Every checkpoint qguard writes goes through `write_checkpoint` (staged: all or
nothing).
"""

from __future__ import annotations

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

from qguard.errors import CheckpointError
from qguard.tokenizer import copy_tokenizer_files

log = logging.getLogger(__name__)

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Buffers some exporters write that carry no weights.
IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class Checkpoint:
    """A checkpoint folder and its config.json. Which family it is, is the registry's call
    (`qguard.families.registry.family_for(config)`), not this file's."""

    path: Path
    config: dict[str, Any]
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


def open_checkpoint(name_or_path: str | os.PathLike) -> Checkpoint:
    """Resolve `name_or_path` (see `resolve`) and read its config.json (a JSON object, UTF-8)."""
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
    return Checkpoint(path=path, config=config, name=str(name_or_path))


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


def write_checkpoint(out: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor], *,
                     tokenizer_files: bool = True, chat_template: str | None = None,
                     max_shard_bytes: int | None = None) -> Path:
    """Write a whole checkpoint into `out`, all or nothing (`staged_dir`): config.json, the tensors
    (official names; sharded over `max_shard_bytes`), and with `tokenizer_files` the offline Qwen3
    tokenizer, carrying `chat_template` when one is given. The one writer of a config.json. Returns `out`."""
    with staged_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", "utf-8")
        save_weights(tensors, tmp, max_shard_bytes)
        if tokenizer_files:
            copy_tokenizer_files(tmp, chat_template)
    return Path(out)
