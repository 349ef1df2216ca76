"""The Qwen3Guard taxonomy: three severities, nine categories, the spellings configs use for them.

Everything that needs a label (the policy, the families' readers, eval, data) imports it from here, so
nothing has to import the policy to know what "Unsafe" is. `SEVERITIES` is the one severity order.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence

from qguard.errors import InputError, LabelError


class Option(str, enum.Enum):
    """An option a user spells as text (mode, action, debounce rule): case and surrounding spaces do not
    matter, and anything else is an InputError that lists the choices (not Enum's bare ValueError)."""

    @classmethod
    def _missing_(cls, value: object) -> Option:
        if isinstance(value, str):
            for member in cls:
                if member.value == value.strip().lower():
                    return member
        names = [repr(m.value) for m in cls]
        raise InputError(f"unknown {cls._what()} {value!r}: use {', '.join(names[:-1])} or {names[-1]}")

    @classmethod
    def _what(cls) -> str:
        return cls.__name__.lower()


class Severity(str, enum.Enum):
    SAFE = "Safe"
    UNSAFE = "Unsafe"
    CONTROVERSIAL = "Controversial"


# The one severity order: Stream risk heads default to it, probability dicts list it, reports print it.
SEVERITIES: tuple[Severity, ...] = (Severity.SAFE, Severity.UNSAFE, Severity.CONTROVERSIAL)
SEVERITY_KEYS: tuple[str, ...] = tuple(s.value for s in SEVERITIES)


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
