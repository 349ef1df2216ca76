"""The trainers' optimiser: AdamW, with a lazy (sparse) Adam update for the token embedding.

Why not plain AdamW: in a small guard trained from scratch (the starter) the 151,936-row token embedding
is ~98% of the parameters, yet a batch of ~8k tokens touches only a few thousand rows. Dense AdamW reads
and writes all 12 M parameters and both moments every step, after a backward that fills a zeroed 48 MB
embedding gradient; on a 2-core CPU that is about a third of the step (benchmarks/train_bench.py). With
`sparse_embedding` the embedding's gradient holds only the touched rows and torch's `SparseAdam` updates
only those rows and their moments.

What changes: nothing at the first step (an untouched row has a zero gradient and zero moments, so dense
Adam does not move it either). Later, a row absent from a batch keeps its moments and does not move,
where dense Adam would keep moving it on its decaying momentum: "lazy Adam", the usual choice for large
embedding tables. The embedding had no weight decay before either. (SparseAdam also adds eps before the
bias correction, AdamW after it: a difference only for gradients near eps = 1e-8.)

It is opt-in (`sparse_embedding=True` in the trainers' configs) because it is not a free lunch: a token
seen once moves about 10x less than under dense Adam, which keeps moving it on momentum for ~10 steps.
In a held-out comparison at equal wall time (docs/starter_model.md) the faster lazy runs flagged fewer
benign prompts but scored lower F1 on 5 of 6 held-out sets (no gain shown). Single-process only: NCCL has no sparse
all-reduce, so DDP/FSDP runs always take the dense update.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from qguard.errors import InputError

BETAS = (0.9, 0.98)
EPS = 1e-8


def sparse_embeddings(model: nn.Module) -> list[nn.Embedding]:
    """Trainable embeddings whose weight no other module shares (a tied LM head would mix a dense grad in)."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return [m for m in model.modules()
            if isinstance(m, nn.Embedding) and m.weight.requires_grad and uses[id(m.weight)] == 1]


class TrainOptimizer:
    """AdamW on the dense parameters (+ SparseAdam on the embedding when `sparse_embedding`).

    Quacks like a torch optimizer where the trainers need it: `param_groups` (the LR schedule sets
    `lr` in them), `step()`, `zero_grad()`; plus `clip_grad_norm_`, which also handles sparse gradients.
    Call `close()` after training: it turns the embeddings' `sparse` flag back off.
    """

    def __init__(self, model: nn.Module, lr: float, weight_decay: float, sparse_embedding: bool = False):
        self.embeddings = sparse_embeddings(model) if sparse_embedding else []
        sparse_ids = {id(m.weight) for m in self.embeddings}
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad or id(p) in sparse_ids:
                continue
            # no decay on norms and on the embedding: rare tokens would shrink to zero between their updates
            (no_decay if p.ndim < 2 or "embed_tokens" in name else decay).append(p)
        if not (decay or no_decay or self.embeddings):
            raise InputError("nothing to train: every parameter is frozen")
        groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
                  if g["params"]]
        self.optimizers: list[torch.optim.Optimizer] = []
        if groups:
            self.optimizers.append(torch.optim.AdamW(groups, lr=lr, betas=BETAS, eps=EPS))
        if self.embeddings:
            self.optimizers.append(torch.optim.SparseAdam([m.weight for m in self.embeddings], lr=lr, betas=BETAS, eps=EPS))
            for m in self.embeddings:
                m.sparse = True  # F.embedding then returns a sparse COO gradient of the looked-up rows
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]
        self.params = [p for g in self.param_groups for p in g["params"]]

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """`nn.utils.clip_grad_norm_` (same coefficient), which rejects sparse gradients."""
        grads = []
        for p in self.params:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                p.grad = p.grad.coalesce()  # repeated rows are summed before the norm, as in the dense grad
                grads.append(p.grad.values())
            else:
                grads.append(p.grad)
        if not grads:
            return torch.tensor(0.0)
        total = nn.utils.get_total_norm(grads)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef)  # values() of a coalesced sparse tensor is a view: this scales the gradient itself
        return total

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)

    def close(self) -> None:
        for m in self.embeddings:
            m.sparse = False
