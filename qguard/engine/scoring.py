"""Stream scoring over whole sequences: one (padded, batched) causal forward, heads at every position.

This is the reference path for finished conversations (Guard.classify_* on Stream checkpoints, eval,
stream-trace). Live streams use `qguard.engine.stream`, whose verdicts equal these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# one position's probabilities as verdict dicts: the family's readers (tests and benchmarks import them here)
from qguard.families.stream import argmax_label, probs_dict, severity_probs  # noqa: F401
from qguard.model.qwen3 import padded_causal_mask
from qguard.model.stream import StreamGuardModel


@dataclass
class TokenScores:
    """Per-position probabilities of one sequence (float32, CPU)."""

    risk: torch.Tensor  # [T, n_risk] response risk head
    category: torch.Tensor  # [T, n_cat] response category head
    query_risk: torch.Tensor  # [T, n_qrisk]
    query_category: torch.Tensor  # [T, n_qcat]


@torch.inference_mode()
def score_sequences(model: StreamGuardModel, seqs: Sequence[Sequence[int]], batch_tokens: int = 16384) -> list[TokenScores]:
    """Full forwards over `seqs`, grouped into length-sorted padded batches of at most ~batch_tokens."""
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out: list[TokenScores | None] = [None] * len(seqs)
    start = 0
    while start < len(order):
        T = len(seqs[order[start]])
        end = start + 1
        while end < len(order) and (end - start + 1) * len(seqs[order[end]]) <= batch_tokens:
            end += 1
        group = order[start:end]
        T = max(len(seqs[i]) for i in group)
        ids = torch.zeros(len(group), T, dtype=torch.long)
        lengths = torch.tensor([len(seqs[i]) for i in group])
        for r, i in enumerate(group):
            ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
        ids, lengths = ids.to(device), lengths.to(device)
        mask = None if len(group) == 1 else padded_causal_mask(lengths, T)
        o = model(ids, attn_mask=mask)
        for r, i in enumerate(group):
            n = len(seqs[i])
            out[i] = TokenScores(
                *(x[r, :n].float().softmax(-1).cpu() for x in (o.risk_logits, o.category_logits,
                                                                 o.query_risk_logits, o.query_category_logits))
            )
        start = end
    return out  # type: ignore[return-value]

