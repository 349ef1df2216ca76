"""The proxy's leak control: which settings apply, and the upstream requests of a rollback (CARE).

A rollback discards the text the client has not received, and asks the upstream to go on from the text
it has (the safe prefix), with an intervention the client never sees:

- `upstream_continuation` (vLLM, SGLang): the safe prefix plus the intervention (the LLM's note to
  itself) as a final assistant message that the upstream continues (`continue_final_message: true`,
  `add_generation_prompt: false`); its answer is the continuation.
- otherwise a fresh request: the safe prefix as an assistant turn, then a user turn with the intervention
  as an instruction to continue (`CONTINUE_INSTRUCTION`); with nothing released yet, the instruction is
  a system message and the answer starts over.

"introspect" asks the upstream first, in a separate non-streamed request, for a short critique of the
discarded text (`INTROSPECTION_PROMPT`); the critique goes into the context, never to the client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qguard.errors import InputError, check_int
from qguard.leak import (
    CONTINUE_INSTRUCTION,
    INTROSPECTION_INSERT,
    INTROSPECTION_PROMPT,
    NUDGE,
    Intervention,
    OnUnsafe,
)
from qguard.serve.settings import ServeSettings
from qguard.serve.upstream import UpstreamClient
from qguard.tokenizer import encode_text

NUDGE_INSTRUCTION = ("Your previous answer was going somewhere unsafe. Do not give harmful details; give a "
                     "safe, helpful answer instead.")
CRITIQUE_MAX_TOKENS = 64
# request fields that shape the answer's form, not its text, and make no sense for a critique
_CRITIQUE_DROP = ("stream", "stream_options", "tools", "tool_choice", "functions", "function_call",
                  "response_format", "n", "logprobs", "top_logprobs", "max_tokens", "max_completion_tokens")


@dataclass(frozen=True)
class LeakControl:
    """The leak-control settings of one request (`ServeSettings` now; a policy file maps onto them)."""

    on_unsafe: OnUnsafe
    hold_tokens: int
    buffer_tokens: int
    max_retries: int
    intervention: Intervention | str
    continuation: bool

    @classmethod
    def of(cls, s: ServeSettings) -> LeakControl:
        if not isinstance(s.intervention, str) or not s.intervention.strip():
            raise InputError("intervention must be 'nudge', 'introspect' or the (non-empty) text to insert")
        try:
            intervention: Intervention | str = Intervention(s.intervention)
        except ValueError:
            intervention = s.intervention
        return cls(OnUnsafe(s.on_unsafe), check_int(s.hold_tokens, "hold_tokens", 0),
                   check_int(s.buffer_tokens, "buffer_tokens", 0), check_int(s.max_retries, "max_retries", 0),
                   intervention, bool(s.upstream_continuation))

    @property
    def hold(self) -> int:
        """Guard tokens the released text stays behind the newest judged one."""
        return self.buffer_tokens if self.on_unsafe is OnUnsafe.ROLLBACK else self.hold_tokens


@dataclass
class LeakReport:
    """What leak control did for one answer: the `leak_control` entry of its `qguard` object."""

    control: LeakControl
    retries: int = 0
    rolled_back_tokens: int = 0  # guard tokens of the upstream's text discarded by rollbacks
    critique_tokens: int = 0  # guard tokens of the upstream's critiques (introspect)
    withheld_tokens: int = 0  # guard tokens held back and never sent when the answer was cut or refused
    refused: bool = False

    @property
    def wait_tokens(self) -> int:
        """Tokens the upstream generated that the client waited for and never received."""
        return self.rolled_back_tokens + self.critique_tokens + self.withheld_tokens

    def to_dict(self, released=None) -> dict[str, Any]:
        c = self.control
        return {"on_unsafe": c.on_unsafe.value, "hold_tokens": c.hold, "retries": self.retries,
                "rolled_back_tokens": self.rolled_back_tokens, "wait_tokens": self.wait_tokens,
                "refused": self.refused, "released": None if released is None else released.to_dict()}


def count_tokens(tokenizer, text: str) -> int:
    return len(encode_text(tokenizer, text)) if text else 0


async def intervention_text(control: LeakControl, upstream: UpstreamClient, body: dict[str, Any],
                            branch: str) -> tuple[str, str, str]:
    """For a rollback whose discarded branch (released prefix included) is `branch`: what the LLM is
    given as its own words after the prefix, the same as an instruction, and the critique ("" but for
    introspect)."""
    if control.intervention is Intervention.NUDGE:
        return NUDGE, NUDGE_INSTRUCTION, ""
    if control.intervention is Intervention.INTROSPECT:
        critique = await critique_of(upstream, body, branch)
        return (INTROSPECTION_INSERT.format(critique=critique),
                f"Reflection on your previous answer: {critique}", critique)
    return control.intervention, control.intervention, ""


async def critique_of(upstream: UpstreamClient, body: dict[str, Any], branch: str) -> str:
    """The upstream's short critique of its flagged text (a non-streamed request of its own)."""
    req = {k: v for k, v in body.items() if k not in _CRITIQUE_DROP}
    req["messages"] = [*body["messages"], {"role": "assistant", "content": branch if branch.strip() else "..."},
                       {"role": "user", "content": INTROSPECTION_PROMPT}]
    req["max_tokens"] = CRITIQUE_MAX_TOKENS
    data = await upstream.call(req)
    try:
        text = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        text = None
    return text.strip() if isinstance(text, str) and text.strip() else "It was unsafe."


def retry_body(control: LeakControl, body: dict[str, Any], prefix: str, insert: str, instruction: str) -> dict[str, Any]:
    """The upstream request that continues after `prefix` (what the client has) with the intervention."""
    out = {k: v for k, v in body.items() if k not in ("continue_final_message", "add_generation_prompt")}
    messages = list(body["messages"])
    if control.continuation:
        out["messages"] = [*messages, {"role": "assistant", "content": prefix + insert}]
        out["continue_final_message"], out["add_generation_prompt"] = True, False
    elif prefix:
        out["messages"] = [*messages, {"role": "assistant", "content": prefix},
                           {"role": "user", "content": CONTINUE_INSTRUCTION.format(intervention=instruction)}]
    else:
        out["messages"] = [{"role": "system", "content": instruction}, *messages]
    return out
