"""The Guard facade: one API over every guard family (Gen and Stream checkpoints).

    guard = Guard.from_pretrained("Qwen/Qwen3Guard-Stream-0.6B")   # or a local directory
    guard.classify_prompt("How can I make a bomb?")
    guard.classify_response("How can I make a bomb?", "Here is how...")

Guard branches on no family: it checks the conversation, and the family's classifier
(`qguard.families.registry`) prepares and runs it. Live sessions are `StreamGuard`'s (`Guard.live`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from qguard.errors import InputError, check_int
from qguard.families.gen import GEN_MAX_NEW_TOKENS
from qguard.families.registry import Family, Kind, family_of
from qguard.families.stream import StreamTrace
from qguard.messages import Conversation, Message, as_prompt_messages, as_response_messages, check_turn
from qguard.policy import DebounceRule, Mode, Policy, TokenVerdict, Verdict, resolve_policy
from qguard.runtime.calibration import Calibration
from qguard.runtime.load import load

if TYPE_CHECKING:
    from qguard.runtime.stream import StreamGuard, StreamSession

__all__ = ["Conversation", "Guard", "StreamTrace", "TokenVerdict", "as_prompt_messages", "as_response_messages"]


class Guard:
    """Moderate prompts and responses with a Qwen3Guard-Gen or -Stream checkpoint (or any registered family).

    `kind`: the family, its `Kind` or its name.
    """

    def __init__(self, kind: Family | Kind | str, name: str, tokenizer, policy: Policy, model, labels=None,
                 debounce_rule: DebounceRule = DebounceRule.EVAL, max_new_tokens: int = GEN_MAX_NEW_TOKENS,
                 calibration: Calibration | None = None, moderate_thinking: bool = True,
                 official_special_tokens: bool = False):
        self.family = family_of(kind)
        self.name, self.tokenizer, self.policy = name, tokenizer, policy
        # message content is tokenized as text (qguard.tokenizer.prepare_chat); True: the official
        # tokenization, where "<|im_end|>" written in a message is a control token (unsafe for untrusted input)
        self.official_special_tokens = official_special_tokens
        self.calibration = calibration  # already folded into `model` (qguard.runtime.calibration)
        self.model, self.labels, self.debounce_rule = model, labels, DebounceRule(debounce_rule)
        # Stream: also read a response's reasoning (`<think>...</think>` in its text), like a live
        # session's default; Gen always sees the whole assistant text (spec section 2)
        self.moderate_thinking = moderate_thinking
        self.max_new_tokens = max_new_tokens  # Gen: the answer's budget
        self.device = next(model.parameters()).device
        self.max_len = model.config.max_position_embeddings
        self.runner = self.family.classifier(self)
        self._stream_guard: StreamGuard | None = None

    @property
    def kind(self):
        """The family's kind: `Kind.GEN` or `Kind.STREAM` for the built-in families."""
        return self.family.kind

    @property
    def live(self) -> bool:
        """Whether this model runs live sessions (`stream_guard`, `open_stream`) and reports per-token
        positions; else a response is judged once it is whole."""
        return self.family.live

    @property
    def gen(self):
        """The Gen engine of a Gen guard (AttributeError for the others)."""
        try:
            return self.runner.engine
        except AttributeError:
            raise AttributeError(f"a {self.family.name} guard has no Gen engine") from None

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike | None = None, *,
                        device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                        mode: Mode | str | None = None, policy: Policy | None = None,
                        debounce: DebounceRule | str = DebounceRule.EVAL, max_new_tokens: int = GEN_MAX_NEW_TOKENS,
                        calibration: Calibration | str | os.PathLike | bool | None = None,
                        moderate_thinking: bool = True, official_special_tokens: bool = False,
                        quantize: str | None = None) -> Guard:
        """Load a checkpoint by local path or hub id; None loads the embedded starter model.

        dtype ("bf16", "float32", a torch.dtype, ...) defaults to fp32 on CPU, bf16 on GPU. `mode`
        (strict, the default, or loose) or a whole `policy`, not both. `calibration`
        (qguard.runtime.calibration): None uses the checkpoint's `qguard_calibration.json` if it has one,
        False none, a path or `Calibration` that one. Labels never change, only probabilities.
        `moderate_thinking` (Stream): also read the reasoning of a response given with `</think>`.
        `official_special_tokens`: UNSAFE for untrusted input. By default a control-token string written in
        a message (`<|im_end|>`, `<|im_start|>`, `<think>`, ...) is tokenized as text, so it cannot forge the
        turns the guard reads; True reproduces the official tokenization exactly (it becomes the token).
        `quantize` (CPU): "int8", "int8-weight" or "int4-weight" stores the decoder's projections in
        int8 or int4 (`qguard.model.quant`; measured agreement with fp32 in docs/benchmarks.md, check yours with
        `qguard check-precision`); such a model is inference-only (it cannot be trained or saved).
        """
        policy = resolve_policy(mode, policy)  # options first: a typo fails before a model loads
        debounce, max_new_tokens = DebounceRule(debounce), check_int(max_new_tokens, "max_new_tokens")
        m = load(name_or_path, device=device, dtype=dtype, calibration=calibration, quantize=quantize)
        return cls(m.family, m.ckpt.name, m.tokenizer, policy, m.model, m.labels, debounce, max_new_tokens,
                   m.calibration, moderate_thinking, official_special_tokens)

    # ------------------------------------------------------------------------------------ public API

    def classify_prompt(self, prompt: Conversation) -> Verdict:
        return self.classify_prompts([prompt])[0]

    def classify_response(self, prompt: Conversation, response: str | None = None) -> Verdict:
        return self._classify([as_response_messages(prompt, response)])[0]

    def classify_prompts(self, prompts: Sequence[Conversation]) -> list[Verdict]:
        if isinstance(prompts, str) or not isinstance(prompts, Iterable):
            raise InputError(f"classify_prompts takes a list of prompts, got {type(prompts).__name__}; "
                             "use classify_prompt for one")
        convs = [as_prompt_messages(p) for p in prompts]
        return self._classify(convs)

    def classify_responses(self, pairs: Sequence[tuple[Conversation, str | None] | Sequence[Message]]) -> list[Verdict]:
        if isinstance(pairs, str) or not isinstance(pairs, Iterable):
            raise InputError(f"classify_responses takes a list of (prompt, response) pairs, got "
                             f"{type(pairs).__name__}")
        convs = []
        for p in pairs:
            if isinstance(p, tuple) and len(p) == 2 and not isinstance(p[1], dict):
                convs.append(as_response_messages(*p))
            else:
                convs.append(as_response_messages(p, None))
        return self._classify(convs)

    def classify_messages(self, messages: Sequence[Message]) -> Verdict:
        """Moderate the last message of a chat: the prompt if it is the user's, else the response."""
        return self._classify([check_turn(messages)])[0]

    def classify_conversations(self, convs: Sequence[Sequence[Message]], *,
                               return_errors: bool = False) -> list[Verdict | InputError]:
        """Moderate the last message of each conversation, batched (Gen: prefix-cached engine).

        With `return_errors`, a conversation that cannot be moderated (bad roles, non-text content, too
        long) yields its InputError in its place instead of failing the whole batch (dataset annotation).
        """
        if not return_errors:
            return self._classify([check_turn(c) for c in convs])
        out: list[Verdict | InputError | None] = [None] * len(convs)
        ok: list[int] = []
        prepared = []  # each conversation validated and tokenised once
        for i, c in enumerate(convs):
            try:
                prepared.append(self.runner.prepare(check_turn(c)))
                ok.append(i)
            except InputError as e:
                out[i] = e
        for i, v in zip(ok, self.runner.run(prepared)):
            out[i] = v
        return out  # type: ignore[return-value]

    def stream_guard(self, **kw) -> StreamGuard:
        """A new live-moderation engine on this Stream model (kw: max_sessions, max_context, ...)."""
        if not self.live:
            raise InputError("live stream moderation needs a Qwen3Guard-Stream checkpoint; this is a "
                             f"{self._family_title()} model")
        from qguard.runtime.stream import StreamGuard  # the session layer loads only when it is used

        kw.setdefault("policy", self.policy)
        kw.setdefault("debounce", self.debounce_rule)
        kw.setdefault("official_special_tokens", self.official_special_tokens)
        return StreamGuard(self.model, self.tokenizer, self.labels, **kw)

    def open_stream(self, messages: Conversation, **kw) -> StreamSession:
        """Open a live moderation session (see `qguard.runtime.stream`) on this Guard's shared stream engine."""
        if self._stream_guard is None:
            self._stream_guard = self.stream_guard()
        return self._stream_guard.open(messages, **kw)

    def stream_trace(self, prompt: Conversation, response: str | None = None) -> StreamTrace:
        """Per-token verdicts over a finished response (Stream checkpoints only)."""
        trace = getattr(self.runner, "trace", None)
        if trace is None:
            raise InputError("stream-trace needs a Qwen3Guard-Stream checkpoint; this is a "
                             f"{self._family_title()} model")
        return trace(as_response_messages(prompt, response))

    # -------------------------------------------------------------------------------------- internals

    def _classify(self, convs: list[list[Message]]) -> list[Verdict]:
        return self.runner.run([self.runner.prepare(check_turn(c)) for c in convs])

    def _family_title(self) -> str:
        return self.family.name.capitalize()
