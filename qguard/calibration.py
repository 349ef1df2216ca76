"""Calibrated scores: temperature scaling of a guard's risk probabilities, fitted on labelled rows.

A guard's probabilities are what users threshold (`Policy.block_threshold`), average into dataset
statistics and feed to RL as rewards, so "P(unsafe) = 0.8" should mean that about 80% of such texts are
unsafe. Small or fine-tuned guards are usually over-confident. Temperature scaling (Guo et al. 2017,
"On Calibration of Modern Neural Networks") divides the risk logits by one fitted number per head,
T > 1 softening and T < 1 sharpening them. It keeps the argmax, so **labels, verdicts, categories and
streaming positions do not change; only the probabilities do.**

What is fitted: the probability the policy reads in strict mode, P(Unsafe) + P(Controversial), against
gold Unsafe or Controversial (binary log-loss), one temperature for prompts (the query head) and one for
responses. Probabilities are enough to fit it: log p differs from the logits by a per-row constant, which
softmax ignores, so softmax(log p / T) is exactly the temperature-scaled distribution.

How it is applied: folded into the weights at load, so every path (batched scoring, the live engine and
its CUDA graphs, the Gen engine) gets it at no cost per token. Stream: the two risk classifiers' weights
are divided by their temperature (both bias-free linear layers, so logits / T exactly). Gen: the label
distributions come from one LM head, so Gen has one temperature (fitted on prompts and responses
together), folded into the final norm's weight (lm_head(norm(h) / T) = logits / T); greedy decoding, hence
the Gen answer, is unchanged, and its category and refusal probabilities are tempered alike. The vLLM
backend, which runs the weights as they are, applies the same temperature to the label logprobs.

The fitted values live in `qguard_calibration.json` next to the weights (loaded automatically) or in any
file passed as `calibration=`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qguard.errors import InputError
from qguard.policy import Severity

if TYPE_CHECKING:
    from qguard.guard import Guard
    from qguard.train.data import Row

FILE_NAME = "qguard_calibration.json"
TASKS = ("prompt", "response")
_ORDER = (Severity.SAFE, Severity.UNSAFE, Severity.CONTROVERSIAL)


@dataclass
class Calibration:
    """Temperatures per task (1.0: unchanged) and how they were obtained."""

    temperature: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TASKS, 1.0))
    kind: str = "stream"  # "stream" (one temperature per head) or "gen" (one for both tasks)
    report: dict[str, Any] = field(default_factory=dict)  # fit/held-out metrics, data description

    def __post_init__(self) -> None:
        if self.kind not in ("stream", "gen"):
            raise InputError(f"calibration kind must be 'stream' or 'gen', got {self.kind!r}")
        if not isinstance(self.temperature, dict):
            raise InputError(f"calibration temperature must map {' and '.join(TASKS)} to numbers, got "
                             f"{type(self.temperature).__name__}")
        for task in TASKS:
            t = self.temperature.get(task)
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
                raise InputError(f"calibration temperature for {task!r} must be a positive number, got {t!r}")
        if self.kind == "gen" and self.temperature["prompt"] != self.temperature["response"]:
            raise InputError("a Gen model has one temperature for prompts and responses (one LM head)")

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(json.dumps({"qguard_calibration": 1, **asdict(self)}, indent=2) + "\n", "utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        try:
            raw = json.loads(Path(path).read_text("utf-8"))
        except FileNotFoundError:
            raise InputError(f"calibration file not found: {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"calibration file {path} is not readable JSON: {e}") from None
        if not isinstance(raw, dict) or raw.get("qguard_calibration") != 1 or not isinstance(raw.get("temperature"), dict):
            raise InputError(f"{path} is not a qguard calibration file (written by `qguard calibrate`)")
        return cls(temperature={t: raw["temperature"].get(t) for t in TASKS}, kind=raw.get("kind", "stream"),
                   report=raw.get("report", {}))


def resolve(checkpoint_dir: Path, calibration: Calibration | str | os.PathLike | bool | None) -> Calibration | None:
    """None: the checkpoint's own `qguard_calibration.json` if it has one; False: none; else that file."""
    if calibration is False:
        return None
    if isinstance(calibration, Calibration):
        return calibration
    if calibration is None or calibration is True:
        own = checkpoint_dir / FILE_NAME
        if own.is_file():
            return Calibration.load(own)
        if calibration is True:
            raise InputError(f"{checkpoint_dir} has no {FILE_NAME}")
        return None
    if not isinstance(calibration, (str, os.PathLike)):
        raise InputError(f"calibration must be a Calibration, a path to a {FILE_NAME}, True, False or None; "
                         f"got {type(calibration).__name__}")
    return Calibration.load(calibration)


def calibrate_loaded(model: torch.nn.Module, kind: str, checkpoint_dir: Path,
                     calibration: Calibration | str | os.PathLike | bool | None) -> Calibration | None:
    """What the loaders call: resolve the calibration (see `resolve`) and fold it into `model`."""
    cal = resolve(checkpoint_dir, calibration)
    if cal is not None:
        apply(model, kind, cal)
    return cal


@torch.no_grad()
def apply(model: torch.nn.Module, kind: str, cal: Calibration) -> None:
    """Fold the temperatures into `model`'s weights, in place (see the module docstring)."""
    if kind != cal.kind:
        raise InputError(f"this calibration was fitted for a {cal.kind} model, not a {kind} model")
    if kind == "stream":
        model.query_head.risk.weight.div_(cal.temperature["prompt"])  # a view of the fused weight, if fused
        model.response_head.risk.weight.div_(cal.temperature["response"])
    else:
        model.model.norm.weight.div_(cal.temperature["prompt"])


# ------------------------------------------------------------------------------------------- fitting

def log_probs(probs: Sequence[Mapping[str, float]]) -> torch.Tensor:
    """[N, 3] log-probabilities (Safe, Unsafe, Controversial) of verdict `probs` dicts."""
    p = torch.tensor([[float(d.get(s.value, 0.0)) for s in _ORDER] for d in probs], dtype=torch.float64)
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
    kind = guard.kind.value
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
    if kind == "gen":
        t_all = fit_temperature(torch.cat([lp for lp, _ in fit_part.values()]), torch.cat([y for _, y in fit_part.values()]))
        temps = dict.fromkeys(TASKS, t_all)
    else:
        temps = {t: fit_temperature(*fit_part[t]) if t in fit_part and len(fit_part[t][1]) else 1.0 for t in TASKS}
    for t in data:
        for name, (lp, y) in (("fit", fit_part[t]), ("holdout", held_part[t])):
            if len(y):
                report[f"{t}_{name}"] = {"before": metrics(unsafe_prob(lp, 1.0), y),
                                         "after": metrics(unsafe_prob(lp, temps[t]), y)}
    return Calibration(temperature=temps, kind=kind, report=report)
