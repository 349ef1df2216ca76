"""The Qwen3Guard policy: severities, categories, strict/loose modes, per-category actions, Verdict.

The policy never sees a tensor: engines hand it probabilities and label indices, it hands back Verdicts.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qguard.errors import InputError, LabelError, check_number


class Severity(str, enum.Enum):
    SAFE = "Safe"
    UNSAFE = "Unsafe"
    CONTROVERSIAL = "Controversial"


SEVERITIES: tuple[Severity, ...] = (Severity.SAFE, Severity.UNSAFE, Severity.CONTROVERSIAL)


class Category(str, enum.Enum):
    """The nine categories, with the exact strings Qwen3Guard-Gen prints."""

    VIOLENT = "Violent"
    NON_VIOLENT_ILLEGAL = "Non-violent Illegal Acts"
    SEXUAL = "Sexual Content or Sexual Acts"
    PII = "PII"
    SELF_HARM = "Suicide & Self-Harm"
    UNETHICAL = "Unethical Acts"
    POLITICAL = "Politically Sensitive Topics"
    COPYRIGHT = "Copyright Violation"
    JAILBREAK = "Jailbreak"  # prompts only


# Gen prints categories in this order in its instruction; Stream heads index them differently
# (see STREAM_CATEGORY_ORDER) and the checkpoint's config names them.
CATEGORIES: tuple[Category, ...] = tuple(Category)
RESPONSE_CATEGORIES: tuple[Category, ...] = tuple(c for c in Category if c is not Category.JAILBREAK)
# Index order of the Stream heads when a config does not say (spec section 3).
STREAM_CATEGORY_ORDER: tuple[Category, ...] = (
    Category.VIOLENT,
    Category.SEXUAL,
    Category.SELF_HARM,
    Category.POLITICAL,
    Category.PII,
    Category.COPYRIGHT,
    Category.NON_VIOLENT_ILLEGAL,
    Category.UNETHICAL,
    Category.JAILBREAK,
)


def _key(name: str) -> str:
    return re.sub(r"[^a-z]", "", name.lower())


# Every spelling we accept for a category: the Gen strings, the short names third-party configs use,
# and snake/kebab variants (normalised by _key). Anything else fails loudly.
_CATEGORY_ALIASES: dict[str, Category] = {}
for _cat, _names in {
    Category.VIOLENT: ["Violent", "Violence", "Violent Crimes"],
    Category.NON_VIOLENT_ILLEGAL: ["Non-violent Illegal Acts", "Non-violent Illegal", "Illegal Acts", "Illegal",
                                   "Non-violent Crimes", "Nonviolent Illegal Acts"],
    Category.SEXUAL: ["Sexual Content or Sexual Acts", "Sexual Content", "Sexual", "Sexual Acts"],
    Category.PII: ["PII", "Personally Identifiable Information", "Privacy"],
    Category.SELF_HARM: ["Suicide & Self-Harm", "Suicide and Self-Harm", "Self-Harm", "Self Harm", "Suicide"],
    Category.UNETHICAL: ["Unethical Acts", "Unethical"],
    Category.POLITICAL: ["Politically Sensitive Topics", "Political", "Politically Sensitive", "Politics"],
    Category.COPYRIGHT: ["Copyright Violation", "Copyright"],
    Category.JAILBREAK: ["Jailbreak", "Jailbreaking"],
}.items():
    for _n in _names:
        _CATEGORY_ALIASES[_key(_n)] = _cat

_SEVERITY_ALIASES = {_key(s.value): s for s in Severity} | {"controversy": Severity.CONTROVERSIAL}


def parse_category(name: str) -> Category:
    """Map any accepted spelling of a category name onto the taxonomy; raise LabelError otherwise."""
    cat = _CATEGORY_ALIASES.get(_key(name))
    if cat is None:
        raise LabelError(f"unknown category {name!r}; known: {', '.join(c.value for c in Category)}")
    return cat


def parse_severity(name: str) -> Severity:
    sev = _SEVERITY_ALIASES.get(_key(name))
    if sev is None:
        raise LabelError(f"unknown risk level {name!r}; known: Safe, Unsafe, Controversial")
    return sev


def label_map(raw: Mapping[str, str] | Sequence[str] | None, parse, default: Sequence, what: str) -> tuple:
    """Turn a config label map ({"0": "Safe", ...} or a list) into a tuple indexed by class id."""
    if raw is None:
        return tuple(default)
    if isinstance(raw, Mapping):
        try:
            items = sorted((int(k), v) for k, v in raw.items())
        except ValueError as e:
            raise LabelError(f"{what}: keys must be class indices, got {list(raw)}") from e
        if [i for i, _ in items] != list(range(len(items))):
            raise LabelError(f"{what}: class indices must be 0..{len(items) - 1}, got {[i for i, _ in items]}")
        names = [v for _, v in items]
    else:
        names = list(raw)
    out = []
    for n in names:
        try:
            out.append(parse(n))
        except LabelError as e:
            raise LabelError(f"{what}: {e}") from None
    return tuple(out)


class _Option(str, enum.Enum):
    """An option a user spells as text (mode, action, debounce rule): case and surrounding spaces do not
    matter, and anything else is an InputError that lists the choices (not Enum's bare ValueError)."""

    @classmethod
    def _missing_(cls, value: object) -> _Option:
        if isinstance(value, str):
            for member in cls:
                if member.value == value.strip().lower():
                    return member
        names = [repr(m.value) for m in cls]
        raise InputError(f"unknown {cls._what()} {value!r}: use {', '.join(names[:-1])} or {names[-1]}")

    @classmethod
    def _what(cls) -> str:
        return cls.__name__.lower()


class Mode(_Option):
    STRICT = "strict"  # Controversial counts as Unsafe
    LOOSE = "loose"  # Controversial counts as Safe


class Action(_Option):
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


# The keys of Verdict.to_dict, in order.
VERDICT_FIELDS: tuple[str, ...] = ("label", "binary", "mode", "action", "categories", "refusal", "probs",
                                   "category_probs", "refusal_prob", "unsafe_position", "n_tokens", "error",
                                   "raw_output")


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


class DebounceRule(_Option):
    """How per-token Stream labels become one response verdict.

    EVAL (default, the official eval code): Unsafe at the first i where tokens i-1 and i are both Unsafe;
    failing that, Controversial at the first Controversial-Controversial pair; else Safe.
    REPORT (the tech report's wording): the first i where tokens i-1 and i are both Unsafe-or-Controversial;
    the verdict takes token i's label (and category).
    """

    EVAL = "eval"
    REPORT = "report"

    @classmethod
    def _what(cls) -> str:
        return "debounce rule"


def debounce(labels: Sequence[Severity], rule: DebounceRule = DebounceRule.EVAL) -> tuple[Severity, int | None]:
    """(response label, index i of the token where it was decided) from per-token labels."""
    rule = DebounceRule(rule)
    if rule is DebounceRule.REPORT:
        for i in range(1, len(labels)):
            if labels[i - 1] is not Severity.SAFE and labels[i] is not Severity.SAFE:
                return labels[i], i
        return Severity.SAFE, None
    for target in (Severity.UNSAFE, Severity.CONTROVERSIAL):
        for i in range(1, len(labels)):
            if labels[i - 1] is target and labels[i] is target:
                return target, i
    return Severity.SAFE, None


class Debouncer:
    """Incremental `debounce` for live streams: feed labels one at a time, O(1) per token.

    For the EVAL rule a Controversial pair is only provisional: a later Unsafe pair overrides it, so
    `label` may move from Controversial to Unsafe; once Unsafe it is final.
    """

    def __init__(self, rule: DebounceRule = DebounceRule.EVAL):
        self.rule = DebounceRule(rule)
        self.prev: Severity | None = None
        self.n = 0
        self.label = Severity.SAFE
        self.position: int | None = None

    def push(self, label: Severity) -> Severity:
        i, prev = self.n, self.prev
        self.prev, self.n = label, self.n + 1
        if prev is None or self.label is Severity.UNSAFE:
            return self.label
        if self.rule is DebounceRule.REPORT:
            if self.position is None and prev is not Severity.SAFE and label is not Severity.SAFE:
                self.label, self.position = label, i
        elif prev is label is Severity.UNSAFE:
            self.label, self.position = Severity.UNSAFE, i
        elif prev is label is Severity.CONTROVERSIAL and self.position is None:
            self.label, self.position = Severity.CONTROVERSIAL, i
        return self.label

    @property
    def final(self) -> bool:
        """True once no later token can change the verdict."""
        return self.label is Severity.UNSAFE or (self.rule is DebounceRule.REPORT and self.position is not None)


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
