"""Guard families, keyed on a checkpoint's config: the one place that tells Gen from Stream.

A family knows how to recognise its checkpoints (`matches`), build the model (`load`), fold a fitted
temperature into it, and what `Guard` runs for finished conversations (`classifier`). Everything above
this module asks the family (or `Guard.live`) instead of branching on its name, so adding a checkpoint
family is one module that calls `register`:

    class ToyFamily:
        name = kind = "toy"; architectures = ("ToyGuard",); live = False; shared_temperature = True
        def matches(self, config): return "ToyGuard" in (config.get("architectures") or [])
        def load(self, ckpt, device, dtype): return ToyModel(ckpt.config).to(device), None
        def fold_temperature(self, model, cal): ...
        def classifier(self, guard): return ToyClassifier(guard.policy)

    register(ToyFamily())
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import nn

from qguard.engine.gen import GenEngine
from qguard.engine.scoring import score_sequences
from qguard.errors import CheckpointError, InputError
from qguard.families import gen, stream
from qguard.messages import Message
from qguard.policy import Verdict
from qguard.weights import Checkpoint


class Kind(str, enum.Enum):
    """The built-in families' `kind` (Guard.kind). A str, so `Kind.GEN == "gen"`."""

    GEN = "gen"
    STREAM = "stream"


class Classifier(Protocol):
    """What `Guard` runs for finished conversations: one per Guard."""

    def prepare(self, messages: list[Message]) -> object:
        """Validate and tokenise one checked conversation; raises InputError for what cannot run."""

    def run(self, prepared: list) -> list[Verdict]:
        """The verdicts of prepared conversations, batched, in order."""


class Family(Protocol):
    name: str  # "gen", "stream": calibration files and reports; unique
    kind: Any  # Kind.GEN / Kind.STREAM for the built-ins (Guard.kind)
    architectures: tuple[str, ...]  # config.json `architectures` it loads, for family_for's error
    live: bool  # has live sessions (StreamGuard) and per-token positions
    shared_temperature: bool  # one temperature for prompts and responses (Gen: one LM head)
    # optional: `quantize_schemes`, the CPU quantization schemes its checkpoints may load with (default all),
    # and `quantize_rows`, the input row counts its int8 kernel is timed on (default: one-token steps)

    def matches(self, config: dict[str, Any]) -> bool: ...

    def load(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, object]:
        """(model, labels or None), the model on `device` in its inference form."""

    def fold_temperature(self, model: nn.Module, cal) -> None: ...

    def classifier(self, guard) -> Classifier: ...


# ------------------------------------------------------------------------------------------- Stream

class StreamClassifier:
    """Stream checkpoints: one scoring forward per conversation, read the way a live session reads it
    (`families.stream.verdict_from_scores`)."""

    def __init__(self, guard):
        self.guard = guard

    def prepare(self, messages: list[Message]) -> tuple[list[Message], stream.StreamLayout]:
        g = self.guard
        return messages, stream.check_layout(g.tokenizer, messages, g.max_len, g.moderate_thinking,
                                             official_special_tokens=g.official_special_tokens)

    def run(self, prepared: list) -> list[Verdict]:
        g = self.guard
        seqs = [lay.ids[: lay.user_end + 1] if m[-1]["role"] == "user" else lay.ids for m, lay in prepared]
        return [stream.verdict_from_scores(g.policy, g.debounce_rule, g.labels, m, lay, s, g.moderate_thinking)
                for (m, lay), s in zip(prepared, score_sequences(g.model, seqs))]

    def trace(self, messages: list[Message]) -> stream.StreamTrace:
        """Per-token verdicts over a finished response (what `Guard.stream_trace` returns)."""
        g = self.guard
        _, lay = self.prepare(messages)
        s = score_sequences(g.model, [lay.ids])[0]
        return stream.trace_from_scores(g.policy, g.debounce_rule, g.labels, g.tokenizer, lay, s, g.moderate_thinking)


class StreamFamily:
    name = "stream"
    kind = Kind.STREAM
    title = "Qwen3Guard-Stream"
    architectures = (stream.ARCHITECTURE,)
    live = True
    shared_temperature = False

    def matches(self, config: dict[str, Any]) -> bool:
        return stream.matches(config)

    def load(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype):
        return stream.build_model(ckpt, device, dtype)

    def fold_temperature(self, model: nn.Module, cal) -> None:
        stream.fold_temperature(model, cal.temperature["prompt"], cal.temperature["response"])

    def classifier(self, guard) -> StreamClassifier:
        return StreamClassifier(guard)


# ---------------------------------------------------------------------------------------------- Gen

class GenClassifier:
    """Gen checkpoints: the batched, prefix-cached greedy engine; its answer read into a Verdict."""

    def __init__(self, guard):
        self.policy = guard.policy
        self.engine = GenEngine(guard.model, guard.tokenizer, max_new_tokens=guard.max_new_tokens,
                                official_special_tokens=guard.official_special_tokens)

    def prepare(self, messages: list[Message]):
        return self.engine.prepare(messages)

    def run(self, prepared: list) -> list[Verdict]:
        return [gen.verdict(self.policy, r.answer, r.error, text=r.text, severity_probs=r.severity_probs,
                            category_probs=r.category_probs, refusal_prob=r.refusal_prob, n_tokens=r.n_tokens)
                for r in self.engine.run(prepared)]


class GenFamily:
    name = "gen"
    kind = Kind.GEN
    title = "Qwen3Guard-Gen"
    architectures = (gen.ARCHITECTURE,)
    live = False
    shared_temperature = True
    # `quantize` schemes a checkpoint of this family may load with (optional attribute; default: every
    # scheme). Not int4-weight: on the Gen-0.6B architecture it changed 14 of 16 generated answers (int8:
    # none; docs/benchmarks.md, "CPU precision"), and a wrong answer is a wrong verdict
    quantize_schemes = ("int8", "int8-weight")
    # a classification is mostly the prefill of a ~450-token prompt (a few answer tokens follow), so its int8
    # kernel is chosen on prefill-sized inputs (fbgemm is 2x `_int_mm` at one row on this project's CPU, 0.9x at 512)
    quantize_rows = (16, 512)

    def matches(self, config: dict[str, Any]) -> bool:
        return gen.matches(config)

    def load(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype):
        return gen.build_model(ckpt, device, dtype), None

    def fold_temperature(self, model: nn.Module, cal) -> None:
        gen.fold_temperature(model, cal.temperature["prompt"])  # == "response": one LM head

    def classifier(self, guard) -> GenClassifier:
        return GenClassifier(guard)


# ----------------------------------------------------------------------------------------- registry

STREAM = StreamFamily()
GEN = GenFamily()
REGISTRY: list[Family] = [STREAM, GEN]  # first match wins: a Stream config (guard_inner_size) beats Gen's


def register(family: Family, *, first: bool = True) -> Family:
    """Add a family; `first` (the default) lets it claim an architecture before the built-ins."""
    for attr in ("name", "kind", "architectures", "live", "shared_temperature", "matches", "load",
                 "fold_temperature", "classifier"):
        if not hasattr(family, attr):
            raise TypeError(f"{type(family).__name__} is not a guard family: it has no {attr!r}")
    if any(f.name == family.name for f in REGISTRY):
        raise ValueError(f"a guard family named {family.name!r} is already registered")
    REGISTRY.insert(0 if first else len(REGISTRY), family)
    return family


def family_for(config: dict[str, Any], where: str = "config.json") -> Family:
    """The registered family that loads a checkpoint with this config.json, or a CheckpointError."""
    for family in REGISTRY:
        if family.matches(config):
            return family
    archs = config.get("architectures") or []
    known = _names(sorted(f"{_title(f)} ({', '.join(f.architectures)})" for f in REGISTRY), quote=False)
    raise CheckpointError(f"{where}: unsupported architecture {archs or config.get('model_type')!r}; "
                          f"qguard loads {known} checkpoints")


def family_named(name: str) -> Family:
    """The family whose `name` (a calibration file's `kind`) this is, or an InputError naming them all."""
    for family in REGISTRY:
        if family.name == name:
            return family
    raise InputError(f"calibration kind must be {_names(f.name for f in REGISTRY)}, got {name!r}")


def family_of(kind: Any) -> Family:
    """A family given as itself, its `kind` (Kind.STREAM) or its name ("stream")."""
    if not isinstance(kind, str) and hasattr(kind, "classifier"):
        return kind
    for family in REGISTRY:
        if family.kind == kind or family.name == kind:
            return family
    raise InputError(f"unknown guard family {kind!r}: registered are {_names(f.name for f in REGISTRY)}")


def _title(family: Family) -> str:
    return getattr(family, "title", family.name)


def _names(names: Iterable[str], quote: bool = True) -> str:
    """'a', 'b' or 'c' (quote), or: a, b and c"""
    items = [repr(n) if quote else n for n in names]
    last = " or " if quote else " and "
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])}{last}{items[-1]}"
