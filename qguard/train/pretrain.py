"""Self-supervised pre-training of a Stream backbone: next-token prediction on unlabelled text.

Qwen3Guard starts from a pre-trained Qwen3; a guard trained from scratch (the starter) starts from random
token embeddings, and its labelled rows are too few to give most of the 151k embeddings any meaning. This
step first trains the backbone as a causal language model on the text of the training rows (labels unused),
then the Stream trainer fine-tunes it with the report's losses.

The output layer is the token embedding itself (tied, as in small Qwen3 models), and the softmax is
*sampled*: each step scores only the batch's target tokens plus `negatives` random tokens of the corpus,
not the whole vocabulary. Why hand-written: a full 151,936-way softmax costs ~150x the rest of a
hidden-80 backbone per token, so on a CPU the plain LM loss would leave almost no time for the backbone.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qguard.errors import InputError
from qguard.model.stream import StreamGuardModel
from qguard.tokenizer import ENDOFTEXT
from qguard.train.loop import Schedule, check_finite, make_batches
from qguard.train.optim import TrainOptimizer

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    minutes: float | None = 10.0  # wall-clock budget (None: steps only)
    max_steps: int | None = None
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    batch_tokens: int = 8192
    negatives: int = 2048  # random corpus tokens scored beside each batch's targets
    seed: int = 0
    log_every: int = 50
    sparse_embedding: bool = False  # opt-in lazy Adam on the (tied) embedding: train/optim.py


@dataclass
class PretrainResult:
    steps: int
    seconds: float
    tokens: int  # target tokens seen
    history: list[dict[str, float]]


@dataclass
class _Seq:  # what make_batches reads
    ids: list[int]


def sampled_lm_loss(hidden: torch.Tensor, targets: torch.Tensor, embedding: torch.Tensor,
                    negatives: torch.Tensor, sparse: bool = False) -> torch.Tensor:
    """Cross-entropy of next tokens over candidates = this batch's targets + `negatives` (tied output).

    hidden [N, d] (final-norm states of the positions that predict), targets [N] token ids. `sparse`:
    the embedding's gradient from this output layer is a sparse tensor (as from a sparse input lookup).
    """
    cand = torch.unique(torch.cat([targets, negatives]))  # sorted: targets map to candidates by search
    logits = hidden @ F.embedding(cand, embedding, sparse=sparse).T
    return F.cross_entropy(logits, torch.searchsorted(cand, targets))


def pretrain_backbone(model: StreamGuardModel, sequences: Sequence[Sequence[int]], cfg: PretrainConfig) -> PretrainResult:
    """Train `model.model` (the backbone, in place) as a causal LM on token-id `sequences`."""
    seqs = [_Seq(list(s)) for s in sequences if len(s) >= 2]
    if not seqs:
        raise InputError("pre-training needs at least one sequence of 2 or more tokens")
    if cfg.minutes is None and cfg.max_steps is None:
        raise InputError("pre-training needs a time budget or a step limit")
    backbone = model.model.train()
    device = backbone.embed_tokens.weight.device
    corpus_tokens = torch.unique(torch.tensor([t for s in seqs for t in s.ids], device=device))
    opt = TrainOptimizer(backbone, cfg.lr, cfg.weight_decay, cfg.sparse_embedding)
    emb = backbone.embed_tokens
    total = cfg.max_steps or 10**9  # with only a time budget the schedule follows the clock
    sched = Schedule(opt, cfg.warmup_steps, total, cfg.minutes)
    rng, gen = random.Random(cfg.seed), torch.Generator(device="cpu").manual_seed(cfg.seed)
    t0, step, seen, history = time.monotonic(), 0, 0, []
    while not _done(cfg, step, t0):
        for idx in make_batches(seqs, cfg.batch_tokens, rng):
            ids, valid = _pad([seqs[i].ids for i in idx], device)
            hidden = backbone(ids)[:, :-1][valid]
            targets = ids[:, 1:][valid]
            neg = corpus_tokens[torch.randint(len(corpus_tokens), (cfg.negatives,), generator=gen).to(device)]
            loss = sampled_lm_loss(hidden, targets, emb.weight, neg, sparse=emb.sparse)
            loss.backward()
            opt.clip_grad_norm_(1.0)
            opt.step()
            opt.zero_grad()
            step, seen = step + 1, seen + len(targets)
            sched.step(step)
            last = _done(cfg, step, t0)
            if step % cfg.log_every == 0 or last:  # the last step too: the summary reports its loss
                history.append({"step": step, "loss": round(float(loss.detach()), 4), "seconds": round(time.monotonic() - t0, 1)})
                log.info("pretrain step %d loss %.3f (%.0fs)", step, history[-1]["loss"], time.monotonic() - t0)
                check_finite({"lm": history[-1]["loss"]}, step)  # NaN weights stay NaN: a log step sees it
            if last:
                break
    opt.close()
    return PretrainResult(step, time.monotonic() - t0, seen, history)


def _pad(batch: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and the mask of positions whose next token is real."""
    T = max(map(len, batch))
    ids = torch.full((len(batch), T), ENDOFTEXT, dtype=torch.long)
    valid = torch.zeros(len(batch), T - 1, dtype=torch.bool)
    for r, s in enumerate(batch):
        ids[r, : len(s)] = torch.tensor(s)
        valid[r, : len(s) - 1] = True
    return ids.to(device), valid.to(device)


def _done(cfg: PretrainConfig, step: int, t0: float) -> bool:
    if cfg.max_steps is not None and step >= cfg.max_steps:
        return True
    return cfg.minutes is not None and time.monotonic() - t0 > cfg.minutes * 60
