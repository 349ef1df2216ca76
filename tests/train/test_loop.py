"""qguard.train.loop: the one loop under the Stream and Gen trainers (steps, epochs, schedule, stops)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from qguard.errors import TrainingError
from qguard.train import loop
from qguard.train.dist import DistContext


@dataclass
class Ex:
    ids: list[int]


EXAMPLES = [Ex([1] * n) for n in (3, 9, 4, 12, 5, 7, 2, 8, 6, 10)]


def optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def run(total: int, losses=lambda n: {"loss": 1.0}, max_minutes=None, opt=None):
    seen, calls = [], []

    def step(idx):
        seen.append(list(idx))
        return losses(len(seen))

    steps = loop.train_loop(DistContext(), EXAMPLES, opt or optimizer(), step, total=total, batch_tokens=16,
                            seed=3, warmup_steps=2, max_minutes=max_minutes,
                            on_step=lambda n, lo, last: calls.append((n, last)))
    return steps, seen, calls


def test_the_loop_runs_its_steps_over_whole_epochs_and_moves_the_schedule():
    per_epoch = len(loop.make_batches(EXAMPLES, 16, random.Random(0)))
    total = loop.total_steps(EXAMPLES, 16, world=1, epochs=2.5, max_steps=None)
    assert total == math.ceil(per_epoch * 2.5) and loop.total_steps(EXAMPLES, 16, 1, 2.5, 4) == 4
    opt = optimizer(lr=2.0)
    steps, seen, calls = run(total, opt=opt)
    assert steps == total == len(seen) and calls == [(n, n == total) for n in range(1, total + 1)]
    for e in range(2):  # each epoch trains on every example exactly once, in a new order
        epoch = seen[e * per_epoch: (e + 1) * per_epoch]
        assert sorted(i for idx in epoch for i in idx) == list(range(len(EXAMPLES)))
        assert all(len(idx) * max(len(EXAMPLES[i].ids) for i in idx) <= 16 for idx in epoch)
    assert seen[:per_epoch] != seen[per_epoch: 2 * per_epoch]
    warmup = min(2, max(1, total // 10))
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * loop.Schedule(optimizer(), warmup, total, None).factor(total))
    assert run(total)[1] == seen  # the seed fixes the batches


def test_a_non_finite_loss_stops_the_loop_before_the_next_step():
    with pytest.raises(TrainingError, match=r"non-finite at step 3 \(loss=nan\)"):
        run(10, losses=lambda n: {"loss": float("nan") if n == 3 else 1.0})


def test_a_spent_budget_ends_the_run_at_a_last_step(monkeypatch):
    clock = iter(range(0, 10**6, 30))  # every reading of the clock is 30 s later than the one before
    monkeypatch.setattr(loop, "time", SimpleNamespace(monotonic=lambda: float(next(clock))))
    steps, seen, calls = run(1000, max_minutes=5.0)
    assert 1 <= steps < 1000 and len(seen) == steps
    assert calls[-1] == (steps, True) and not any(last for _, last in calls[:-1])
