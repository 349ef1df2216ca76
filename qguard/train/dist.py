"""torch.distributed glue: DDP (or FSDP) under torchrun/accelerate, a no-op in a single process.

`torchrun --nproc-per-node N -m qguard train stream ...` (or `accelerate launch -m qguard ...`) sets WORLD_SIZE, RANK
and LOCAL_RANK; the same command line then trains data-parallel. Batches are sharded with
DistributedSampler; only rank 0 logs and writes the checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

T = TypeVar("T")


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "ddp"  # "ddp" | "fsdp"

    @property
    def enabled(self) -> bool:
        return self.world > 1 or dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP/FSDP around `model` when distributed, else the model itself."""
        if not self.enabled:
            return model
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in getattr(getattr(model, "model", model), "layers", []):
                fully_shard(layer)
            fully_shard(model)
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        # The losses touch every trainable parameter on every step (see stream_losses), so no
        # unused-parameter search is needed; frozen parameters are ignored by DDP.
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def shard(self, items: Sequence[T], epoch: int, seed: int) -> list[T]:
        """This rank's share of `items` (each rank gets the same count), shuffled per epoch."""
        sampler = DistributedSampler(items, num_replicas=self.world, rank=self.rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return [items[i] for i in sampler]

    def mean(self, x: float) -> float:
        """Average a scalar over ranks (for logging)."""
        if not self.enabled:
            return x
        t = torch.tensor([x], device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup(device: str | None = None, strategy: str = "ddp") -> DistContext:
    """Join the process group that torchrun/accelerate describe in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    return DistContext(rank=rank, world=world, local_rank=local, device=dev, strategy=strategy)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A full (unsharded) CPU state dict, also for FSDP-sharded models."""
    m = unwrap(model)
    if any(type(p).__name__ == "DTensor" for p in m.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(m, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in m.state_dict().items()}
