"""Fitting a guard's temperatures on labelled rows: the offline half of `qguard.runtime.calibration`.

A guard's probabilities are what users threshold (`Policy.block_threshold`), average into dataset
statistics and feed to RL as rewards, so "P(unsafe) = 0.8" should mean that about 80% of such texts are
unsafe. Small or fine-tuned guards are usually over-confident; temperature scaling fixes that without
changing a label.

What is fitted: the probability the policy reads in strict mode, P(Unsafe) + P(Controversial), against
gold Unsafe or Controversial (binary log-loss), one temperature for prompts (the query head) and one for
responses, or one for both where the family has one (`shared_temperature`: Gen). Probabilities are
enough to fit it: log p differs from the logits by a per-row constant, which softmax ignores, so
softmax(log p / T) is exactly the temperature-scaled distribution.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from qguard.errors import InputError
from qguard.runtime.calibration import TASKS, Calibration
from qguard.taxonomy import SEVERITIES, Severity

if TYPE_CHECKING:
    from qguard.data.schema import Row
    from qguard.runtime.guard import Guard


def log_probs(probs: Sequence[Mapping[str, float]]) -> torch.Tensor:
    """[N, 3] log-probabilities (Safe, Unsafe, Controversial) of verdict `probs` dicts."""
    p = torch.tensor([[float(d.get(s.value, 0.0)) for s in SEVERITIES] for d in probs], dtype=torch.float64)
    return p.clamp_min(1e-12).log()


def unsafe_prob(logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """Strict-mode P(unsafe) = 1 - P(Safe) after scaling by 1/temperature."""
    return 1.0 - torch.softmax(logp / temperature, dim=-1)[:, 0]


def log_loss(p: torch.Tensor, y: torch.Tensor) -> float:
    p = p.clamp(1e-12, 1 - 1e-12)
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())


def metrics(p: torch.Tensor, y: torch.Tensor, bins: int = 15) -> dict[str, float]:
    """ECE, Brier score and log-loss of P(unsafe) `p` against 0/1 `y` (qguard.eval.metrics computes them)."""
    from qguard.eval.metrics import calibration_scores

    return calibration_scores(p.tolist(), (y > 0.5).tolist(), bins)


def fit_temperature(logp: torch.Tensor, unsafe: torch.Tensor) -> float:
    """The temperature in [0.05, 20] that minimises the log-loss of strict P(unsafe) against `unsafe` (0/1).

    A 1-D problem: a log-spaced grid, then golden-section refinement around the best point.
    """
    if len(logp) == 0:
        raise InputError("calibration needs at least one labelled row")

    def loss(log_t: float) -> float:
        return log_loss(unsafe_prob(logp, math.exp(log_t)), unsafe)

    grid = [math.log(0.05) + i * (math.log(20) - math.log(0.05)) / 120 for i in range(121)]  # T = 1 is grid[60]
    best = min(grid, key=loss)
    i = grid.index(best)
    lo, hi = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
    g = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if loss(a) < loss(b):
            hi = b
        else:
            lo = a
    refined = (lo + hi) / 2
    return round(math.exp(refined if loss(refined) <= loss(best) else best), 4)


def gold_unsafe(labels: Sequence[Severity]) -> torch.Tensor:
    return torch.tensor([float(s is not Severity.SAFE) for s in labels], dtype=torch.float64)


def fit(guard: Guard, rows: Sequence[Row], holdout: float = 0.3, seed: int = 0) -> Calibration:
    """Classify labelled `rows` with an uncalibrated `guard` and fit its temperatures.

    A random `holdout` share of each task's rows is kept out of the fit; the report gives log-loss,
    Brier and ECE before and after on it (the honest figures) and on the fit rows. Rows the guard cannot
    moderate (no user turn, too long, ...) are skipped and counted.
    """
    if not 0 <= holdout < 1:
        raise InputError(f"holdout must be in [0, 1), got {holdout}")
    if guard.calibration is not None:
        raise InputError("fit a calibration on an uncalibrated guard (load it with calibration=False)")
    data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    report: dict[str, Any] = {"holdout": holdout, "seed": seed, "mode": "strict: P(Unsafe) + P(Controversial)"}
    for task in TASKS:
        mine = [r for r in rows if r.task == task]
        out = guard.classify_conversations([list(r.messages) for r in mine], return_errors=True)
        ok = [(v, r) for v, r in zip(out, mine) if not isinstance(v, Exception)]
        report[f"{task}_skipped"] = len(mine) - len(ok)
        if ok:
            data[task] = (log_probs([v.probs for v, _ in ok]), gold_unsafe([r.label for _, r in ok]))
    if not data:
        raise InputError("no labelled prompt or response rows could be classified: nothing to calibrate on")
    gen = torch.Generator().manual_seed(seed)
    split = {t: torch.randperm(len(y), generator=gen) for t, (_, y) in data.items()}
    n_fit = {t: len(idx) - int(len(idx) * holdout) for t, idx in split.items()}
    fit_part = {t: (lp[split[t][: n_fit[t]]], y[split[t][: n_fit[t]]]) for t, (lp, y) in data.items()}
    held_part = {t: (lp[split[t][n_fit[t]:]], y[split[t][n_fit[t]:]]) for t, (lp, y) in data.items()}
    report["fitted"] = sorted(data)  # the tasks with rows; the others keep temperature 1.0
    if guard.family.shared_temperature:
        t_all = fit_temperature(torch.cat([lp for lp, _ in fit_part.values()]), torch.cat([y for _, y in fit_part.values()]))
        temps = dict.fromkeys(TASKS, t_all)
    else:
        temps = {t: fit_temperature(*fit_part[t]) if t in fit_part and len(fit_part[t][1]) else 1.0 for t in TASKS}
    for t in data:
        for name, (lp, y) in (("fit", fit_part[t]), ("holdout", held_part[t])):
            if len(y):
                report[f"{t}_{name}"] = {"before": metrics(unsafe_prob(lp, 1.0), y),
                                         "after": metrics(unsafe_prob(lp, temps[t]), y)}
    return Calibration(temperature=temps, kind=guard.family.name, report=report)
