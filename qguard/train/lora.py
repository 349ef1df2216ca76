"""Low-rank adapters (LoRA) for the backbone's Linear layers, merged back before saving.

Merging keeps the saved checkpoint in the plain official format: no adapter tensors, no extra code.
"""

from __future__ import annotations

import math

import torch
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """y = base(x) + scale * B(A(x)); base frozen, B starts at zero so training starts from the base."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a) * self.scale
        self.base.weight.requires_grad_(True)
        return self.base


def add_lora(backbone: nn.Module, rank: int = 8, alpha: float = 16.0) -> int:
    """Freeze `backbone` and wrap its target Linears with adapters. Returns the number wrapped."""
    for p in backbone.parameters():
        p.requires_grad_(False)
    n = 0
    for module in list(backbone.modules()):
        for name in TARGETS:
            child = getattr(module, name, None)
            if isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha))
                n += 1
    return n


def merge_lora(backbone: nn.Module) -> int:
    """Fold every adapter into its base weight, restoring plain Linears (official tensor names)."""
    n = 0
    for module in list(backbone.modules()):
        for name in TARGETS:
            child = getattr(module, name, None)
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
                n += 1
    return n
