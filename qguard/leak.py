"""Leak control's shared vocabulary: what happens on an unsafe verdict, the hold-back default, and the
intervention texts of CARE rollbacks. Used by in-process generation (`qguard.generate`) and the guarded
proxy (`qguard.serve.proxy`), so both read the same settings the same way."""

from __future__ import annotations

import enum

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
