"""Live moderation with Qwen3Guard-Stream (the old import path, kept for users, tests and benchmarks).

    from qguard.stream import StreamGuard

The sessions live in `qguard.runtime.stream`, the Stream format knowledge (turn reader, readout, verdicts)
in `qguard.families.stream`; see their docstrings. Nothing inside qguard imports this module.
"""

from qguard.engine.stream import EngineStats, StreamEngine
from qguard.errors import CapacityError
from qguard.families.stream import Readout, Table, TurnReader
from qguard.incremental import IncrementalTokenizer
from qguard.policy import DebounceRule, Part, Policy, TokenVerdict, Verdict
from qguard.runtime.stream import (
    AsyncStreamSession,
    StreamGuard,
    StreamSession,
    TextFeed,
)
from qguard.taxonomy import SEVERITY_KEYS

__all__ = [
    "AsyncStreamSession", "CapacityError", "DebounceRule", "EngineStats", "IncrementalTokenizer", "Part",
    "Policy", "SEVERITY_KEYS", "StreamEngine", "StreamGuard", "StreamSession", "TextFeed", "TokenVerdict",
    "Verdict", "Readout", "Table", "TurnReader",
]
