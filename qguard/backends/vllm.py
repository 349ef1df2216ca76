"""Qwen3Guard-Gen on vLLM: greedy answers with automatic prefix caching and logprobs.

Written against vLLM's documented offline API (`vllm.LLM(model, enable_prefix_caching=True, ...)`,
`vllm.SamplingParams(temperature=0, max_tokens=..., logprobs=k, stop_token_ids=...)`,
`LLM.generate([{"prompt_token_ids": ids}, ...], params)` returning `RequestOutput`s whose
`.outputs[0]` has `.text`, `.token_ids` and `.logprobs` (one {token_id: Logprob(logprob=...)} dict per
generated token)). vLLM cannot be installed on the machines this was written on (no GPU): the tests
run this code against a fake object implementing exactly that documented interface, not a real vLLM.

Prompts are rendered and tokenized by qguard (byte-exact guard template, message content as text:
`qguard.families.gen.guard_prompt_ids`), so vLLM sees the same ids as the torch engine and never renders or
tokenizes a prompt itself; the fixed instruction header is the same for every request of a moderation
target, which is what vLLM's prefix cache reuses. Answers are parsed with the same strict parser.

Probabilities: vLLM returns only the top-k logprobs per position (k = `logprobs`, vLLM's default cap
is 20). Severity / category / refusal probabilities are the softmax over the label tokens found in
the top-k at the label position (a label token outside the top-k counts as probability 0), so they
can differ slightly from the torch engine's full-vocabulary ones; labels do not depend on them.

Calibration (`qguard.runtime.calibration`, Gen: one temperature): vLLM runs the weights as they are, so the
temperature is applied here instead, to the label logprobs before that softmax. A logprob is the logit
minus a per-position constant, so this is the same softmax(logits / T) as the torch engine's folded form.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qguard.errors import InputError, QGuardError
from qguard.families.gen import (
    CATEGORIES_PREFIX,
    COLON,
    GEN_MAX_NEW_TOKENS,
    NO,
    REFUSAL_PREFIX,
    SAFETY,
    SEVERITY_FIRST_TOKEN,
    STOP,
    YES,
    find_after,
    first_token_ids,
    guard_prompt_ids,
    moderation_target,
    read_answer,
    target_categories,
    verdict,
)
from qguard.families.registry import GEN
from qguard.messages import Message, check_turn
from qguard.policy import Mode, Policy, Verdict
from qguard.runtime.calibration import Calibration, resolve


def _import_vllm():
    try:
        import vllm
    except ImportError:
        raise QGuardError("the vLLM backend needs vLLM on a GPU machine: pip install 'qguard[vllm]'") from None
    return vllm


class VLLMGenBackend:
    """`classify_conversations` for Gen checkpoints, run by vLLM."""

    def __init__(self, llm: Any, name: str, tokenizer: Any = None, policy: Policy | None = None,
                 max_new_tokens: int = GEN_MAX_NEW_TOKENS, logprobs: int = 20, max_model_len: int | None = None,
                 calibration: Calibration | None = None, official_special_tokens: bool = False):
        if calibration is not None:
            calibration.check_kind(GEN.name)
        self.llm, self.name, self.calibration = llm, name, calibration
        # content is text, as in Guard; True (unsafe for untrusted input): the official tokenization
        self.official_special_tokens = official_special_tokens
        self.temperature = calibration.temperature["prompt"] if calibration else 1.0
        self.tokenizer = tokenizer if tokenizer is not None else llm.get_tokenizer()
        self.policy = policy or Policy()
        # the engine's own limit: a longer prompt would fail inside llm.generate, for the whole batch
        engine_len = getattr(getattr(getattr(llm, "llm_engine", None), "model_config", None), "max_model_len", None)
        self.max_new_tokens, self.logprobs = max_new_tokens, logprobs
        self.max_model_len = max_model_len or (engine_len if isinstance(engine_len, int) else 32768)
        self.cat_first = first_token_ids(self.tokenizer)

    @classmethod
    def from_pretrained(cls, name: str, *, mode: Mode | str = Mode.STRICT, max_new_tokens: int = GEN_MAX_NEW_TOKENS,
                        logprobs: int = 20, calibration: Calibration | str | os.PathLike | bool | None = None,
                        official_special_tokens: bool = False, **llm_kwargs: Any) -> VLLMGenBackend:
        """Start vLLM on `name` (hub id or directory) with prefix caching on; llm_kwargs go to vllm.LLM.

        `calibration` and `official_special_tokens` as in `Guard.from_pretrained` (default: the
        directory's qguard_calibration.json; message content tokenized as text)."""
        cal = resolve(Path(name), calibration)  # a hub id has no local file: None unless one is passed
        vllm = _import_vllm()
        llm_kwargs.setdefault("enable_prefix_caching", True)
        llm_kwargs.setdefault("max_logprobs", max(20, logprobs))  # vLLM refuses more than this per request
        llm = vllm.LLM(model=name, **llm_kwargs)
        return cls(llm, name, policy=Policy(mode=Mode(mode)), max_new_tokens=max_new_tokens, logprobs=logprobs,
                   max_model_len=llm_kwargs.get("max_model_len"), calibration=cal,
                   official_special_tokens=official_special_tokens)

    def sampling_params(self):
        vllm = _import_vllm()
        return vllm.SamplingParams(temperature=0, max_tokens=self.max_new_tokens, logprobs=self.logprobs,
                                   stop_token_ids=list(STOP))

    def prepare(self, messages: Sequence[Message]) -> tuple[list[int], str]:
        messages = check_turn(messages)  # the same conversations as Guard takes (no empty or system-last turn)
        _, ids = guard_prompt_ids(self.tokenizer, messages,
                                  official_special_tokens=self.official_special_tokens)
        if len(ids) + self.max_new_tokens > self.max_model_len:
            raise InputError(f"conversation is {len(ids)} tokens; with {self.max_new_tokens} answer tokens it "
                             f"exceeds the context of {self.max_model_len} tokens (qguard does not truncate)")
        return ids, moderation_target(messages)

    def classify_conversations(self, convs: Sequence[Sequence[Message]], *,
                               return_errors: bool = False) -> list[Verdict | InputError]:
        out: list[Verdict | InputError | None] = [None] * len(convs)
        ok, prompts, targets = [], [], []
        for i, c in enumerate(convs):
            try:
                ids, target = self.prepare(c)
            except InputError as e:
                if not return_errors:
                    raise
                out[i] = e
                continue
            ok.append(i)
            prompts.append({"prompt_token_ids": ids})
            targets.append((target, len(ids)))
        if prompts:
            results = self.llm.generate(prompts, self.sampling_params())
            for i, r, (target, n) in zip(ok, results, targets):
                out[i] = self.verdict(r.outputs[0], target, n)
        return out  # type: ignore[return-value]

    def verdict(self, completion: Any, target: str, n_tokens: int) -> Verdict:
        ids = [t for t in completion.token_ids if t not in STOP]
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        lps = completion.logprobs or []
        sev = None
        if ids[:2] == [SAFETY, COLON] and len(lps) > 2:
            sev = _softmax_over(lps[2], {s.value: t for s, t in SEVERITY_FIRST_TOKEN.items()}, self.temperature)
        cat = ref = None
        at = find_after(ids, CATEGORIES_PREFIX)
        if at is not None and at < len(lps):
            cat = _softmax_over(lps[at], target_categories(self.cat_first, target), self.temperature)
        at = find_after(ids, REFUSAL_PREFIX)
        if target == "response" and at is not None and at < len(lps):
            yn = _softmax_over(lps[at], {"Yes": YES, "No": NO}, self.temperature)
            ref = None if yn is None else yn["Yes"]
        answer, error = read_answer(text, target)
        return verdict(self.policy, answer, error, text=text, severity_probs=sev, category_probs=cat,
                       refusal_prob=ref, n_tokens=n_tokens)


def _logprob(entry: Any) -> float:
    return float(getattr(entry, "logprob", entry))  # Logprob objects (documented) or plain floats


def _softmax_over(position: dict[int, Any] | None, names: dict[str, int],
                  temperature: float = 1.0) -> dict[str, float] | None:
    """Renormalised probabilities of `names` among the top-k logprobs of one position (absent: 0), at a
    calibration temperature."""
    if not position:
        return None
    lp = {k: _logprob(position[t]) / temperature for k, t in names.items() if t in position}
    if not lp:
        return None
    m = max(lp.values())
    z = sum(math.exp(v - m) for v in lp.values())
    return {k: (math.exp(lp[k] - m) / z if k in lp else 0.0) for k in names}
