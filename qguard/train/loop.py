"""The training loop the Stream and Gen trainers share: batches, schedule, budget, divergence stop.

A trainer brings its model, optimizer and one optimizer step (`step(indices) -> losses`); the loop runs
epochs of shuffled, length-bucketed batches (sharded over ranks), moves the learning rate along the
warmup + cosine schedule, stops a diverged run before it can save, and ends at the step count or when the
wall-clock budget is spent. History and logging stay with the trainer (`on_step`): the Gen trainer keeps
every step's loss, the Stream trainer one row every `log_every` steps.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from qguard.errors import TrainingError
from qguard.train import dist as D
from qguard.train.optim import TrainOptimizer

log = logging.getLogger(__name__)

Losses = dict[str, float]


class Sized(Protocol):  # what make_batches reads of an example
    ids: Sequence[int]


def make_batches(examples: Sequence[Sized], batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Index lists of similar-length examples with at most `batch_tokens` padded tokens each, shuffled."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    pool = 64 * max(1, batch_tokens // 128)  # sort within pools: little padding, still random
    for s in range(0, len(order), pool):
        chunk = sorted(order[s: s + pool], key=lambda i: len(examples[i].ids))
        cur: list[int] = []
        for i in chunk:
            if cur and (len(cur) + 1) * len(examples[i].ids) > batch_tokens:
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
    rng.shuffle(batches)
    return batches


def total_steps(examples: Sequence[Sized], batch_tokens: int, world: int, epochs: float,
                max_steps: int | None) -> int:
    """Optimizer steps of a run: `max_steps`, else `epochs` times the batches one rank sees per epoch."""
    per_epoch = math.ceil(len(make_batches(examples, batch_tokens, random.Random(0))) / world)
    return max_steps or max(1, math.ceil(per_epoch * epochs))


class Schedule:
    """Linear warmup, then cosine to 10% of the peak. Progress is the larger of steps done / total and
    time spent / budget, so a run cut by its wall-clock budget still ends at a low learning rate."""

    def __init__(self, opt: torch.optim.Optimizer | TrainOptimizer, warmup: int, total: int, minutes: float | None):
        self.opt, self.warmup, self.total, self.minutes = opt, warmup, total, minutes
        self.base = [g["lr"] for g in opt.param_groups]
        self.t0 = time.monotonic()
        self.step(0)

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.total - self.warmup)
        if self.minutes:
            t = max(t, (time.monotonic() - self.t0) / (self.minutes * 60))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    def step(self, step: int) -> None:
        f = self.factor(step)
        for g, lr in zip(self.opt.param_groups, self.base):
            g["lr"] = lr * f


def check_finite(losses: Losses, step: int) -> None:
    """Stop a diverged run before it can save: a NaN model answers NaN, which reads as Safe."""
    bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
    if bad:
        raise TrainingError(f"the loss became non-finite at step {step} ({', '.join(f'{k}={v}' for k, v in bad.items())}); "
                            "nothing was saved. Lower --lr (or check the data) and run again")


def out_of_time(max_minutes: float | None, t0: float) -> bool:
    """Whether a wall-clock budget of `max_minutes` (None: none) counted from `t0` is spent."""
    return max_minutes is not None and time.monotonic() - t0 > max_minutes * 60


def train_loop(ctx: D.DistContext, examples: Sequence[Sized], opt: torch.optim.Optimizer | TrainOptimizer,
               step: Callable[[list[int]], Losses], *, total: int, batch_tokens: int, seed: int,
               warmup_steps: int, max_minutes: float | None,
               on_step: Callable[[int, Losses, bool], None] | None = None) -> int:
    """Run `total` optimizer steps (fewer when `max_minutes` is spent first; always at least one).

    `step(indices)` trains on `examples[i] for i in indices` and returns its losses (the values checked
    for divergence: a trainer that averages over ranks returns the mean, so every rank stops together).
    `on_step(step, losses, last)` follows each step, `last` on the final one. Returns the steps done.
    """
    rng = random.Random(seed)
    sched = Schedule(opt, min(warmup_steps, max(1, total // 10)), total, max_minutes)
    t0, done, epoch = time.monotonic(), 0, 0
    while done < total:
        for idx in ctx.shard(make_batches(examples, batch_tokens, rng), epoch, seed):
            losses = step(idx)
            done += 1
            check_finite(losses, done)
            sched.step(done)
            last = done >= total or out_of_time(max_minutes, t0)
            if on_step is not None:
                on_step(done, losses, last)
            if last:
                break
        if out_of_time(max_minutes, t0):
            log.info("stopping at step %d: the %.1f-minute budget is spent", done, max_minutes)
            break
        epoch += 1
    return done
