"""A guard's calibration file: the fitted temperatures of its risk probabilities, and folding them in.

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks") divides the risk
logits by one fitted number per head, T > 1 softening and T < 1 sharpening them. It keeps the argmax,
so **labels, verdicts, categories and streaming positions do not change; only the probabilities do.**
Fitting them is an offline job (`qguard.eval.calibration`, `qguard calibrate`); this module is what load
time needs.

How it is applied: folded into the weights at load (the family's `fold_temperature`), so every path
(batched scoring, the live engine and its CUDA graphs, the Gen engine) gets it at no cost per token.
Stream: the two risk classifiers' weights are divided by their temperature (both bias-free linear
layers, so logits / T exactly). Gen: the label distributions come from one LM head, so Gen has one
temperature (fitted on prompts and responses together), folded into the final norm's weight
(lm_head(norm(h) / T) = logits / T); greedy decoding, hence the Gen answer, is unchanged, and its
category and refusal probabilities are tempered alike. The vLLM backend, which runs the weights as they
are, applies the same temperature to the label logprobs.

The fitted values live in `qguard_calibration.json` next to the weights (loaded automatically) or in any
file passed as `calibration=`. Its `kind` is the family's name ("stream", "gen").
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from qguard.errors import InputError
from qguard.families.registry import Family, family_named

FILE_NAME = "qguard_calibration.json"
TASKS = ("prompt", "response")


@dataclass
class Calibration:
    """Temperatures per task (1.0: unchanged) and how they were obtained."""

    temperature: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TASKS, 1.0))
    kind: str = "stream"  # the family's name: "stream" (one temperature per head) or "gen" (one for both)
    report: dict[str, Any] = field(default_factory=dict)  # fit/held-out metrics, data description

    def __post_init__(self) -> None:
        family = family_named(self.kind)
        if not isinstance(self.temperature, dict):
            raise InputError(f"calibration temperature must map {' and '.join(TASKS)} to numbers, got "
                             f"{type(self.temperature).__name__}")
        for task in TASKS:
            t = self.temperature.get(task)
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
                raise InputError(f"calibration temperature for {task!r} must be a positive number, got {t!r}")
        if family.shared_temperature and self.temperature["prompt"] != self.temperature["response"]:
            raise InputError(f"a {family.name.capitalize()} model has one temperature for prompts and responses "
                             "(one LM head)")

    def check_kind(self, name: str) -> None:
        """An InputError unless this calibration was fitted for the family called `name`."""
        if self.kind != name:
            raise InputError(f"this calibration was fitted for a {self.kind} model, not a {name} model")

    def keep_unfitted_from(self, old: Calibration, where: str) -> list[str]:
        """Take `old`'s temperature for each task this fit had no rows for (when this family has one
        temperature per task); returns those tasks, and notes them in the report."""
        if old.kind != self.kind or family_named(self.kind).shared_temperature:
            return []
        kept = [t for t in TASKS if t not in self.report.get("fitted", TASKS)]
        for t in kept:
            self.temperature[t] = old.temperature[t]
        if kept:
            self.report["kept"] = {t: f"no {t} rows: temperature kept from the previous {where}" for t in kept}
        return kept

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


def calibrate_loaded(model: torch.nn.Module, family: Family | str, checkpoint_dir: Path,
                     calibration: Calibration | str | os.PathLike | bool | None) -> Calibration | None:
    """What loading calls: resolve the calibration (see `resolve`) and fold it into `model`, in place.

    `family`: the model's family, or its name."""
    family = family_named(family) if isinstance(family, str) else family
    cal = resolve(checkpoint_dir, calibration)
    if cal is not None:
        cal.check_kind(family.name)
        family.fold_temperature(model, cal)
    return cal
