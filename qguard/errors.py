"""Errors that qguard raises on bad input. Each names the problem in words a user can act on."""

from __future__ import annotations

import numbers
from typing import Any


class QGuardError(Exception):
    """Base class for every error qguard raises on purpose."""


class CheckpointError(QGuardError):
    """A checkpoint is missing, malformed or not a Qwen3Guard model."""


class InputError(QGuardError, ValueError):
    """A conversation, text, option or file given to qguard cannot be used as it is.

    The one family for bad input everywhere (Python API, CLI, HTTP). It is also a ValueError, so code
    written against Python's convention for bad arguments still catches it.
    """


class LabelError(QGuardError):
    """A label string (from a config or a model's answer) is not in the Qwen3Guard taxonomy."""


class TrainingError(QGuardError):
    """A training run cannot go on (e.g. its loss became NaN); nothing of it was saved."""


class CapacityError(QGuardError):
    """An engine is full (sessions, context or memory); retry later or raise the limit."""


def check_int(value: Any, what: str, minimum: int = 1) -> int:
    """`value` as an int of at least `minimum`, else an InputError naming `what` (bools are not ints here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{what} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise InputError(f"{what} must be at least {minimum}, got {value}")
    return int(value)


def check_number(value: Any, what: str) -> float:
    """`value` as a float (any real number but a bool), else an InputError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{what} must be a number, got {type(value).__name__} {value!r}")
    return float(value)
