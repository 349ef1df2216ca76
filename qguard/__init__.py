"""qguard: a fast, exact open runtime for the Qwen3Guard safety guardrail models."""

from qguard.errors import CapacityError, CheckpointError, InputError, LabelError, QGuardError
from qguard.policy import Action, Category, DebounceRule, Mode, Policy, Severity, Verdict

__version__ = "0.1.0"

__all__ = [
    "Action", "CapacityError", "Category", "CheckpointError", "DebounceRule", "Guard", "InputError", "LabelError",
    "Mode", "Policy", "QGuardError", "Severity", "Verdict",
]


def __getattr__(name: str):
    # Guard pulls in torch and transformers; keep `import qguard` cheap for policy-only users.
    if name == "Guard":
        from qguard.guard import Guard

        return Guard
    raise AttributeError(name)
