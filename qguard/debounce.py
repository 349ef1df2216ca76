"""Debouncing: how per-token Stream labels become one response verdict.

One incremental `Debouncer` per rule is the definition; `debounce` (a finished list of labels) folds it,
so the offline readers and the live sessions cannot disagree. A new rule is a `DebounceRule` member and
its branch in `Debouncer.push`.
"""

from __future__ import annotations

from collections.abc import Iterable

from qguard.taxonomy import Option, Severity


class DebounceRule(Option):
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


class Debouncer:
    """The debounce rule, incrementally, for live streams: feed labels one at a time, O(1) per token.

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


def debounce(labels: Iterable[Severity], rule: DebounceRule = DebounceRule.EVAL) -> tuple[Severity, int | None]:
    """(response label, index i of the token where it was decided) from per-token labels: the
    `Debouncer` folded over them."""
    d = Debouncer(rule)
    for label in labels:
        d.push(label)
        if d.final:
            break
    return d.label, d.position
