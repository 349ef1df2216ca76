"""qguard: a fast, exact open runtime for the Qwen3Guard safety guardrail models."""

from qguard.debounce import DebounceRule
from qguard.errors import CapacityError, CheckpointError, InputError, LabelError, QGuardError
from qguard.policy import Action, Mode, Policy, Verdict
from qguard.taxonomy import Category, Severity

__version__ = "0.1.0"

__all__ = [
    "Action", "CapacityError", "Category", "CheckpointError", "DebounceRule", "Guard", "InputError", "LabelError",
    "Mode", "Policy", "QGuardError", "Severity", "Verdict",
]


def __getattr__(name: str):
    # Guard pulls in torch and transformers; keep `import qguard` cheap for policy-only users.
    if name == "Guard":
        from qguard.runtime.guard import Guard

        return Guard
    raise AttributeError(name)
