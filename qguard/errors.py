"""Errors that qguard raises on bad input. Each names the problem in words a user can act on."""


class QGuardError(Exception):
    """Base class for every error qguard raises on purpose."""


class CheckpointError(QGuardError):
    """A checkpoint is missing, malformed or not a Qwen3Guard model."""


class InputError(QGuardError):
    """A conversation, text or file given to qguard cannot be moderated as it is."""


class LabelError(QGuardError):
    """A label string (from a config or a model's answer) is not in the Qwen3Guard taxonomy."""


class TrainingError(QGuardError):
    """A training run cannot go on (e.g. its loss became NaN); nothing of it was saved."""


class CapacityError(QGuardError):
    """An engine is full (sessions, context or memory); retry later or raise the limit."""
