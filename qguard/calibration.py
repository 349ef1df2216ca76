"""The old home of calibration, kept for users and scripts. The calibration file and folding it in at
load are `qguard.runtime.calibration`; fitting temperatures (offline) is `qguard.eval.calibration`.

Nothing inside qguard imports this module (tests/test_architecture.py checks it).
"""

from qguard.eval.calibration import (
           fit,
           fit_temperature,
           gold_unsafe,
           log_loss,
           log_probs,
           metrics,
           unsafe_prob,
)
from qguard.runtime.calibration import FILE_NAME, TASKS, Calibration, calibrate_loaded, resolve

__all__ = ["FILE_NAME", "TASKS", "Calibration", "calibrate_loaded", "fit", "fit_temperature", "gold_unsafe",
           "log_loss", "log_probs", "metrics", "resolve", "unsafe_prob"]
