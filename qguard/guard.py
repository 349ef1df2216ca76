"""The Guard facade: one API over Gen and Stream checkpoints.

    guard = Guard.from_pretrained("Qwen/Qwen3Guard-Stream-0.6B")   # or a local directory
    guard.classify_prompt("How can I make a bomb?")
    guard.classify_response("How can I make a bomb?", "Here is how...")
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from qguard.calibration import Calibration, calibrate_loaded
from qguard.checkpoint import (
    Kind,
    build_gen_model,
    build_stream_model,
    model_path,
    open_checkpoint,
    pick_device,
    resolve_dtype,
)
from qguard.engine.scoring import TokenScores, argmax_label, probs_dict, score_sequences, severity_probs
from qguard.errors import InputError, check_int
from qguard.model.gen import GEN_MAX_NEW_TOKENS
from qguard.model.quant import check_quantize, quantize_model
from qguard.policy import DebounceRule, Mode, Policy, Severity, Verdict, debounce, resolve_policy
from qguard.tokenizer import Message, StreamLayout, check_messages, check_turn, load_tokenizer, stream_layout

if TYPE_CHECKING:
    from qguard.stream import StreamGuard, StreamSession

Conversation = str | Sequence[Message]


def as_prompt_messages(prompt: Conversation) -> list[Message]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InputError("empty prompt: nothing to moderate")
        return [{"role": "user", "content": prompt}]
    msgs = check_messages(prompt)
    if msgs[-1]["role"] != "user":
        raise InputError("prompt moderation needs the last message to be from the user")
    return msgs


def as_response_messages(prompt: Conversation, response: str | None) -> list[Message]:
    if response is None:
        if isinstance(prompt, str):
            raise InputError("classify_response needs a response (or a message list ending with the assistant)")
        msgs = check_messages(prompt)
        if msgs[-1]["role"] != "assistant":
            raise InputError("response moderation needs the last message to be from the assistant")
        return check_turn(msgs)  # also refuses an empty prompt before the response
    if not isinstance(response, str):
        raise InputError(f"response must be text, got {type(response).__name__}")
    if not response.strip():
        raise InputError("empty response: nothing to moderate")
    msgs = as_prompt_messages(prompt) if not isinstance(prompt, str) else [{"role": "user", "content": prompt}]
    return check_turn([*msgs, {"role": "assistant", "content": response}])  # an empty prompt is an InputError


@dataclass
class TokenVerdict:
    """One answer token of a stream trace."""

    index: int  # position in the answer
    token_id: int
    text: str
    probs: dict[str, float]
    category_probs: dict[str, float]
    label: Severity
    category: str


@dataclass
class StreamTrace:
    prompt: Verdict
    tokens: list[TokenVerdict] = field(default_factory=list)
    response: Verdict | None = None


class Guard:
    """Moderate prompts and responses with a Qwen3Guard-Gen or -Stream checkpoint."""

    def __init__(self, kind: Kind, name: str, tokenizer, policy: Policy, model, labels=None,
                 debounce_rule: DebounceRule = DebounceRule.EVAL, max_new_tokens: int = GEN_MAX_NEW_TOKENS,
                 calibration: Calibration | None = None, moderate_thinking: bool = True,
                 official_special_tokens: bool = False):
        self.kind, self.name, self.tokenizer, self.policy = kind, name, tokenizer, policy
        # message content is tokenized as text (qguard.tokenizer.prepare_chat); True: the official
        # tokenization, where "<|im_end|>" written in a message is a control token (unsafe for untrusted input)
        self.official_special_tokens = official_special_tokens
        self.calibration = calibration  # already folded into `model` (qguard.calibration)
        self.model, self.labels, self.debounce_rule = model, labels, DebounceRule(debounce_rule)
        # Stream: also read a response's reasoning (`<think>...</think>` in its text), like a live
        # session's default; Gen always sees the whole assistant text (spec section 2)
        self.moderate_thinking = moderate_thinking
        self.device = next(model.parameters()).device
        self.max_len = model.config.max_position_embeddings
        if kind is Kind.GEN:
            from qguard.engine.gen import GenEngine

            self.gen = GenEngine(model, tokenizer, max_new_tokens=max_new_tokens,
                                 official_special_tokens=official_special_tokens)

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
        (qguard.calibration): None uses the checkpoint's `qguard_calibration.json` if it has one, False
        none, a path or `Calibration` that one. Labels never change, only probabilities.
        `moderate_thinking` (Stream): also read the reasoning of a response given with `</think>`.
        `official_special_tokens`: UNSAFE for untrusted input. By default a control-token string written in
        a message (`<|im_end|>`, `<|im_start|>`, `<think>`, ...) is tokenized as text, so it cannot forge the
        turns the guard reads; True reproduces the official tokenization exactly (it becomes the token).
        `quantize` (CPU): "int8" or "int8-weight" stores the decoder's projections in int8
        (`qguard.model.quant`; measured agreement with fp32 in docs/benchmarks.md, check yours with
        `qguard check-precision`); such a model is inference-only (it cannot be trained or saved).
        """
        policy = resolve_policy(mode, policy)  # options first: a typo fails before a model loads
        quant = check_quantize(quantize, pick_device(device))
        debounce, max_new_tokens = DebounceRule(debounce), check_int(max_new_tokens, "max_new_tokens")
        ckpt = open_checkpoint(model_path(name_or_path))
        dev = pick_device(device)
        dt = resolve_dtype(dtype, dev)
        tokenizer = load_tokenizer(ckpt.path)
        if ckpt.kind is Kind.STREAM:
            model, labels = build_stream_model(ckpt, dev, dt)
        else:
            model, labels = build_gen_model(ckpt, dev, dt), None
        cal = calibrate_loaded(model, ckpt.kind.value, ckpt.path, calibration)
        if quant:
            quantize_model(model, quant)  # after fusing and calibration (both in the float weights)
        return cls(ckpt.kind, ckpt.name, tokenizer, policy, model, labels, debounce, max_new_tokens, cal,
                   moderate_thinking, official_special_tokens)

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
        reqs = []  # Gen: prepared requests; Stream: (messages, layout), tokenised once
        for i, c in enumerate(convs):
            try:
                msgs = check_turn(c)
                reqs.append(self.gen.prepare(msgs) if self.kind is Kind.GEN else (msgs, self._layout(msgs)))
                ok.append(i)
            except InputError as e:
                out[i] = e
        if self.kind is Kind.GEN:
            verdicts = [self._gen_verdict(r) for r in self.gen.run(reqs)]
        else:
            verdicts = self._stream_classify([m for m, _ in reqs], [lay for _, lay in reqs])
        for i, v in zip(ok, verdicts):
            out[i] = v
        return out  # type: ignore[return-value]

    # -------------------------------------------------------------------------------------- internals

    def _classify(self, convs: list[list[Message]]) -> list[Verdict]:
        convs = [check_turn(c) for c in convs]
        if self.kind is Kind.GEN:
            return [self._gen_verdict(r) for r in self.gen.classify(convs)]
        return self._stream_classify(convs, [self._layout(c) for c in convs])

    def _stream_classify(self, convs: list[list[Message]], layouts: list[StreamLayout]) -> list[Verdict]:
        seqs = [lay.ids[: lay.user_end + 1] if c[-1]["role"] == "user" else lay.ids for lay, c in zip(layouts, convs)]
        scores = score_sequences(self.model, seqs)
        return [self._stream_verdict(c, lay, s) for c, lay, s in zip(convs, layouts, scores)]

    def _layout(self, messages: list[Message]) -> StreamLayout:
        lay = stream_layout(self.tokenizer, messages, official_special_tokens=self.official_special_tokens)
        if len(lay.ids) > self.max_len:
            raise InputError(
                f"conversation is {len(lay.ids)} tokens, longer than the model's context of {self.max_len}; "
                "shorten it (qguard does not silently truncate)"
            )
        if messages[-1]["role"] == "assistant" and not lay.moderated(self.moderate_thinking):
            raise InputError("the response has no answer tokens to moderate (only reasoning, and "
                             "moderate_thinking is off)")
        return lay

    def _gen_verdict(self, r) -> Verdict:
        if r.answer is None:
            return self.policy.error_verdict(r.error, raw_output=r.text, probs=r.severity_probs, n_tokens=r.n_tokens)
        return self.policy.verdict(
            r.answer.severity, r.answer.categories, refusal=r.answer.refusal, probs=r.severity_probs,
            category_probs=r.category_probs, refusal_prob=r.refusal_prob, n_tokens=r.n_tokens,
        )

    def _prompt_verdict(self, lay: StreamLayout, s: TokenScores) -> Verdict:
        L = self.labels
        p = s.query_risk[lay.user_end]
        label = argmax_label(p, L.query_risk)
        cp = s.query_category[lay.user_end]
        cats = (argmax_label(cp, L.query_category),) if label is not Severity.SAFE else ()
        return self.policy.verdict(label, cats, probs=severity_probs(p, L.query_risk),
                                   category_probs=probs_dict(cp, L.query_category), n_tokens=lay.user_end + 1)

    def _stream_verdict(self, messages: list[Message], lay: StreamLayout, s: TokenScores) -> Verdict:
        if messages[-1]["role"] == "user":
            return self._prompt_verdict(lay, s)
        L = self.labels
        where = torch.as_tensor(lay.moderated(self.moderate_thinking))  # as a live session reads the turn
        risk = s.risk[where]
        labels = [L.risk[i] for i in risk.argmax(-1).tolist()]
        label, pos = debounce(labels, self.debounce_rule)
        # probabilities at the deciding token; for a Safe answer, at its riskiest token
        at = int(where[pos if pos is not None else int((1 - risk[:, _safe_index(L.risk)]).argmax())])
        cats = (argmax_label(s.category[at], L.category),) if label is not Severity.SAFE else ()
        return self.policy.verdict(label, cats, probs=severity_probs(s.risk[at], L.risk),
                                   category_probs=probs_dict(s.category[at], L.category),
                                   unsafe_position=pos, n_tokens=len(lay.ids))

    def stream_guard(self, **kw) -> StreamGuard:
        """A new live-moderation engine on this Stream model (kw: max_sessions, max_context, ...)."""
        if self.kind is not Kind.STREAM:
            raise InputError("live stream moderation needs a Qwen3Guard-Stream checkpoint; this is a Gen model")
        from qguard.stream import StreamGuard

        kw.setdefault("policy", self.policy)
        kw.setdefault("debounce", self.debounce_rule)
        kw.setdefault("official_special_tokens", self.official_special_tokens)
        return StreamGuard(self.model, self.tokenizer, self.labels, **kw)

    def open_stream(self, messages: Conversation, **kw) -> StreamSession:
        """Open a live moderation session (see `qguard.stream`) on this Guard's shared stream engine."""
        if getattr(self, "_stream_guard", None) is None:
            self._stream_guard = self.stream_guard()
        return self._stream_guard.open(messages, **kw)

    def stream_trace(self, prompt: Conversation, response: str | None = None) -> StreamTrace:
        """Per-token verdicts over a finished response (Stream checkpoints only)."""
        if self.kind is not Kind.STREAM:
            raise InputError("stream-trace needs a Qwen3Guard-Stream checkpoint; this is a Gen model")
        msgs = as_response_messages(prompt, response)
        lay = self._layout(msgs)
        s = score_sequences(self.model, [lay.ids])[0]
        L = self.labels
        trace = StreamTrace(prompt=self._prompt_verdict(lay, s))
        for j, i in enumerate(lay.moderated(self.moderate_thinking)):
            label = argmax_label(s.risk[i], L.risk)
            trace.tokens.append(TokenVerdict(
                index=j, token_id=lay.ids[i], text=self.tokenizer.decode([lay.ids[i]]),
                probs=severity_probs(s.risk[i], L.risk), category_probs=probs_dict(s.category[i], L.category),
                label=label, category=argmax_label(s.category[i], L.category).value,
            ))
        trace.response = self._stream_verdict(msgs, lay, s)
        return trace


def _safe_index(names: Sequence[Severity]) -> int:
    return list(names).index(Severity.SAFE)
