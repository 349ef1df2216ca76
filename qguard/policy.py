"""The Qwen3Guard policy: strict/loose modes, per-category actions, Verdict and TokenVerdict.

The policy never sees a tensor: engines hand it probabilities and label indices, it hands back Verdicts.
The labels themselves are `qguard.taxonomy`'s, the debounce rules `qguard.debounce`'s (both re-exported).
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qguard.debounce import Debouncer, DebounceRule, debounce
from qguard.errors import InputError, LabelError, check_number
from qguard.taxonomy import (
    CATEGORIES,
    RESPONSE_CATEGORIES,
    SEVERITIES,
    SEVERITY_KEYS,
    STREAM_CATEGORY_ORDER,
    Category,
    Option,
    Severity,
    label_map,
    parse_category,
    parse_severity,
)

if TYPE_CHECKING:
    from qguard.policy_file import PolicyFile

# The taxonomy and the debounce rules live in qguard.taxonomy and qguard.debounce; they stay importable
# from here for good (users and tests spell `from qguard.policy import Severity, debounce`).
__all__ = [
    "CATEGORIES", "RESPONSE_CATEGORIES", "SEVERITIES", "SEVERITY_KEYS", "STREAM_CATEGORY_ORDER", "VERDICT_FIELDS",
    "Action", "Category", "DebounceRule", "Debouncer", "Mode", "Part", "Policy", "Severity", "TokenVerdict",
    "Verdict", "debounce", "label_map", "parse_category", "parse_severity", "resolve_policy",
]

class Mode(Option):
    STRICT = "strict"  # Controversial counts as Unsafe
    LOOSE = "loose"  # Controversial counts as Safe


class Action(Option):
    ALLOW = "allow"
    FLAG = "flag"
    BLOCK = "block"


@dataclass(frozen=True)
class Verdict:
    """One moderation decision, the same type for Gen and Stream, prompt and response.

    `label` is the raw three-tier severity; `binary` applies the mode (strict/loose) and is what a caller
    compares; `action` applies per-category actions. Probabilities are None only where the engine has none.
    """

    label: Severity
    categories: tuple[Category, ...] = ()
    refusal: bool | None = None
    probs: dict[str, float] | None = None  # {"Safe", "Unsafe", "Controversial"}
    category_probs: dict[str, float] | None = None
    refusal_prob: float | None = None
    mode: Mode = Mode.STRICT
    binary: Severity = Severity.SAFE  # Safe or Unsafe after the mode
    action: Action = Action.ALLOW
    unsafe_position: int | None = None  # streams: index in the response tokens where it became unsafe
    n_tokens: int | None = None
    error: str | None = None  # set when the model's answer could not be parsed: never read as Safe
    raw_output: str | None = None

    @property
    def is_unsafe(self) -> bool:
        return self.binary is Severity.UNSAFE

    @property
    def blocked(self) -> bool:
        return self.action is Action.BLOCK

    def to_dict(self) -> dict[str, Any]:
        """The verdict as plain JSON data: the one serialisation every output uses (`classify --json`,
        `stream-trace --json`, annotate's `guard` object, HTTP). Every key of `VERDICT_FIELDS` is always
        present, None where the engine has no value, so rows of a dataset share one schema."""
        return {
            "label": self.label.value,
            "binary": self.binary.value,
            "mode": self.mode.value,
            "action": self.action.value,
            "categories": [c.value for c in self.categories],
            "refusal": self.refusal,
            "probs": self.probs,
            "category_probs": self.category_probs,
            "refusal_prob": self.refusal_prob,
            "unsafe_position": self.unsafe_position,
            "n_tokens": self.n_tokens,
            "error": self.error,
            "raw_output": self.raw_output,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Verdict:
        """The verdict `to_dict` wrote (e.g. received from a qguard server); InputError if it is not one."""
        try:
            return cls(label=Severity(d["label"]), categories=tuple(Category(c) for c in d.get("categories") or ()),
                       refusal=d.get("refusal"), probs=d.get("probs"), category_probs=d.get("category_probs"),
                       refusal_prob=d.get("refusal_prob"), mode=Mode(d.get("mode", "strict")),
                       binary=Severity(d.get("binary", "Safe")), action=Action(d.get("action", "allow")),
                       unsafe_position=d.get("unsafe_position"), n_tokens=d.get("n_tokens"), error=d.get("error"),
                       raw_output=d.get("raw_output"))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"not a verdict object: {type(e).__name__} {e}") from None


# The keys of Verdict.to_dict, in order.
VERDICT_FIELDS: tuple[str, ...] = ("label", "binary", "mode", "action", "categories", "refusal", "probs",
                                   "category_probs", "refusal_prob", "unsafe_position", "n_tokens", "error",
                                   "raw_output")


class Part(str, enum.Enum):
    """Which part of the assistant turn a token belongs to."""

    THINK = "think"
    ANSWER = "answer"


@dataclass(frozen=True)
class TokenVerdict:
    """The guard's reading of one moderated token, and the running response verdict after it: what a live
    Stream session returns per token and what `Guard.stream_trace` lists (there with the token's `text`)."""

    token_id: int
    index: int  # index among the moderated tokens of the response (what debounce counts)
    position: int  # absolute position in the guard's token sequence
    part: Part
    probs: dict[str, float]  # {"Safe", "Unsafe", "Controversial"}
    category_probs: dict[str, float]
    label: Severity  # this token's own label (argmax)
    category: Category  # this token's most likely category
    response_label: Severity  # debounced label of the response so far
    unsafe_position: int | None  # index where the response label was decided, if it was
    stop: bool  # the policy blocks the response: stop the LLM
    text: str | None = None  # the token's text, where the reader decoded it (stream traces)

    @classmethod
    def _fast(cls, *values) -> TokenVerdict:
        """`TokenVerdict(*values)` for the per-token hot path: the frozen dataclass __init__ sets each
        field through object.__setattr__, which costs more than the rest of a token's record; this fills
        the instance dict at once (tests check the result equals the regular constructor's). The Stream
        reader does the same inline, from a dict literal keyed by `TOKEN_VERDICT_FIELDS`, to save the call."""
        tv = object.__new__(cls)
        tv.__dict__.update(zip(TOKEN_VERDICT_FIELDS, values))  # a field left out reads its class default
        return tv

    def to_dict(self) -> dict:
        return {"token_id": self.token_id, "index": self.index, "position": self.position, "part": self.part.value,
                "probs": self.probs, "category_probs": self.category_probs, "label": self.label.value,
                "category": self.category.value, "response_label": self.response_label.value,
                "unsafe_position": self.unsafe_position, "stop": self.stop, "text": self.text}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TokenVerdict:
        """The token verdict `to_dict` wrote; InputError if it is not one."""
        try:
            return cls(token_id=d["token_id"], index=d["index"], position=d["position"], part=Part(d["part"]),
                       probs=d["probs"], category_probs=d["category_probs"], label=Severity(d["label"]),
                       category=Category(d["category"]), response_label=Severity(d["response_label"]),
                       unsafe_position=d.get("unsafe_position"), stop=d["stop"], text=d.get("text"))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"not a token verdict object: {type(e).__name__} {e}") from None


# The fields of TokenVerdict, in order (the keys of a hot-path instance dict).
TOKEN_VERDICT_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TokenVerdict))


@dataclass
class Policy:
    """Strict/loose mode plus per-category actions.

    `actions` maps a category to allow/flag/block for content the mode calls Unsafe; categories not listed
    use `default_action`. `block_threshold` (optional) additionally requires P(unsafe under the mode) to
    reach it before anything is blocked, so an operator can trade recall for fewer false blocks.
    """

    mode: Mode = Mode.STRICT
    default_action: Action = Action.BLOCK
    actions: dict[Category, Action] = field(default_factory=dict)
    block_threshold: float | None = None

    def __post_init__(self) -> None:
        self.mode = Mode(self.mode)
        self.default_action = Action(self.default_action)
        if not isinstance(self.actions, Mapping):
            raise InputError(f"actions must map categories to 'allow', 'flag' or 'block', got "
                             f"{type(self.actions).__name__}")
        self.actions = {_action_category(c): Action(a) for c, a in self.actions.items()}
        if self.block_threshold is not None:
            t = check_number(self.block_threshold, "block_threshold")
            if not 0.0 <= t <= 1.0:
                raise InputError(f"block_threshold must be in [0, 1], got {self.block_threshold}")
            self.block_threshold = t

    def binary(self, label: Severity) -> Severity:
        if label is Severity.CONTROVERSIAL:
            return Severity.UNSAFE if self.mode is Mode.STRICT else Severity.SAFE
        return label

    def unsafe_prob(self, probs: Mapping[str, float]) -> float:
        p = probs.get("Unsafe", 0.0)
        return p + probs.get("Controversial", 0.0) if self.mode is Mode.STRICT else p

    def action_for(self, label: Severity, categories: Sequence[Category], probs: Mapping[str, float] | None) -> Action:
        if self.binary(label) is not Severity.UNSAFE:
            return Action.ALLOW
        acts = [self.actions.get(c, self.default_action) for c in categories] or [self.default_action]
        act = Action.BLOCK if Action.BLOCK in acts else Action.FLAG if Action.FLAG in acts else Action.ALLOW
        if act is Action.BLOCK and self.block_threshold is not None and probs is not None:
            if self.unsafe_prob(probs) < self.block_threshold:
                act = Action.FLAG
        return act

    def verdict(self, label: Severity, categories: Sequence[Category] = (), **kw: Any) -> Verdict:
        """Build a Verdict with this policy's mode and action applied."""
        probs = kw.get("probs")
        return Verdict(
            label=label,
            categories=tuple(categories),
            mode=self.mode,
            binary=self.binary(label),
            action=self.action_for(label, categories, probs),
            **kw,
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Policy:
        """The policy of a policy file (YAML or TOML: mode, default_action, actions, block_threshold); its
        other keys (debounce, limits, ...) are `qguard.policy_file.load_policy_file`'s. InputError naming
        the key, the value and the choices when the file is wrong."""
        from qguard.policy_file import load_policy_file  # pydantic and yaml load only for files

        return cls.from_policy_file(load_policy_file(path))

    @classmethod
    def from_policy_file(cls, pf: PolicyFile) -> Policy:
        """The policy of an already loaded `PolicyFile`."""
        return cls(mode=pf.mode, default_action=pf.default_action, actions=dict(pf.actions),
                   block_threshold=pf.block_threshold)

    def with_mode(self, mode: Mode | str | None) -> Policy:
        """This policy with another mode (same actions and threshold); None or the same mode: itself."""
        if mode is None or Mode(mode) is self.mode:
            return self
        return dataclasses.replace(self, mode=Mode(mode))

    def apply(self, v: Verdict) -> Verdict:
        """The same model output judged under this policy (e.g. one forward, both modes)."""
        if v.error is not None:
            return dataclasses.replace(v, mode=self.mode)
        return dataclasses.replace(v, mode=self.mode, binary=self.binary(v.label),
                                   action=self.action_for(v.label, v.categories, v.probs))

    def error_verdict(self, message: str, raw_output: str | None = None, **kw: Any) -> Verdict:
        """An answer we could not read. It is never Safe: it counts as Unsafe and is flagged for review."""
        return Verdict(
            label=Severity.UNSAFE, mode=self.mode, binary=Severity.UNSAFE, action=Action.FLAG,
            error=message, raw_output=raw_output, **kw,
        )


def _action_category(name: Category | str) -> Category:
    if isinstance(name, Category):
        return name
    if not isinstance(name, str):
        raise InputError(f"actions: a category is a name such as 'Violent', got {type(name).__name__} {name!r}")
    try:
        return parse_category(name)
    except LabelError as e:
        raise InputError(f"actions: {e}") from None


def resolve_policy(mode: Mode | str | None, policy: Policy | None) -> Policy:
    """The policy of `mode` (default strict), or `policy` itself; both, with different modes, is an error."""
    m = None if mode is None else Mode(mode)
    if policy is not None and not isinstance(policy, Policy):
        raise InputError(f"policy must be a qguard.policy.Policy, got {type(policy).__name__}")
    if policy is not None:
        if m is not None and m is not policy.mode:
            raise InputError(f"mode={m.value!r} conflicts with the policy's mode {policy.mode.value!r}; "
                             "give one of them (a Policy carries its own mode)")
        return policy
    return Policy(mode=m or Mode.STRICT)
