"""Leak control's shared vocabulary: what happens on an unsafe verdict, the hold-back default, and the
intervention texts of CARE rollbacks, and the hold-back window (`HoldBack`). Used by in-process
generation (`qguard.generate`), the guarded proxy (`qguard.serve.proxy`), the WebSocket protocol
(`qguard.serve.routes.stream_ws`) and the LiteLLM guardrail, so all read the same settings the same way and
release text by one rule."""

from __future__ import annotations

import enum
from collections import deque

from qguard.errors import check_int
from qguard.taxonomy import Option

# Hold-back of cut/refuse, in guard tokens: the debounce window. Both debounce rules decide at the second
# of two consecutive unsafe tokens; holding the window back, neither token of the deciding pair has been
# shown when the cut comes (1 is the least that does it). 0 is stream-first: the first of the pair shows.
DEFAULT_HOLD_TOKENS = 2
DEFAULT_BUFFER_TOKENS = 40  # CARE's buffer (the Qwen3Guard report, section 4.5)
DEFAULT_MAX_RETRIES = 5
NUDGE = ("\n\n(Safety note to myself: the last part of my answer was going somewhere unsafe. I will not give "
         "harmful details and will continue with a safe, helpful answer.)\n\n")
INTROSPECTION_PROMPT = ("Your unfinished reply above was flagged as possibly unsafe. In one or two sentences, "
                        "say what is wrong with it and how a safe, helpful reply should continue. Do not "
                        "repeat any harmful content.")
INTROSPECTION_INSERT = "\n\n(Reflection: {critique} I will continue safely.)\n\n"
# an upstream without prefix continuation: the intervention becomes an instruction in a user turn
CONTINUE_INSTRUCTION = ("{intervention}\n\nContinue your previous answer exactly where it stops, without "
                        "repeating any of it and without mentioning this note.")


class OnUnsafe(Option):
    """What happens when the guard blocks the response being generated."""

    ROLLBACK = "rollback"
    CUT = "cut"
    REFUSE = "refuse"

    @classmethod
    def _what(cls) -> str:
        return "on_unsafe action"


class Intervention(str, enum.Enum):
    NUDGE = "nudge"
    INTROSPECT = "introspect"


class HoldBack:
    """The hold-back window over one answer's pushed text: how much of it may be shown.

    After each push the caller notes its new verdicts and how much of the pushed text is judged now
    (`judged`: characters for text, `pushed - len(pending_text)`; ids for token-id pushes); text is
    releasable up to the last note taken at least `hold` verdicts before the newest. So release goes at push
    granularity: a push that commits several tokens is released as a unit, never early. Whether the
    session stopped, and what is released at the end of the answer, is the caller's (a blocked answer
    releases nothing more; a safe one releases everything judged)."""

    def __init__(self, hold: int):
        self.hold = check_int(hold, "hold_tokens", 0)
        self.reset()

    def reset(self, tokens: int = 0, judged: int = 0) -> None:
        """Start over at a release point (a rollback): `tokens` verdicts so far, `judged` units released."""
        self.tokens, self.safe = tokens, judged
        self._marks: deque[tuple[int, int]] = deque()  # (verdicts so far, units judged) after each push

    def judged(self, new_tokens: int, judged: int) -> None:
        """A push's `new_tokens` verdicts, after which the first `judged` units of the pushed text are judged."""
        self.tokens += new_tokens
        self._marks.append((self.tokens, judged))

    def releasable(self) -> int:
        """Units of the pushed text judged at least `hold` verdicts before the newest (never decreasing)."""
        limit = self.tokens - self.hold
        while self._marks and self._marks[0][0] <= limit:
            self.safe = max(self.safe, self._marks.popleft()[1])
        return self.safe
