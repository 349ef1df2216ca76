"""Safety rewards for RL from a Qwen3Guard judge: guard-only and hybrid, plus a TRL reward function.

The Qwen3Guard tech report (arXiv:2510.14276, Safety RL) trains Qwen3-4B with Qwen3Guard-Gen-4B as the
judge, first with a guard-only reward (eq. 1), which drives the policy to refuse everything, then with
a hybrid reward (eq. 2) that jointly (a) penalises unsafe responses, (b) applies a moderate penalty to
unnecessary refusals, both judged by Qwen3Guard-Gen, and (c) otherwise rewards helpfulness as scored by
a preference model (WorldPM-HelpSteer2 in the report; pluggable here).

ASSUMPTIONS (stated because the exact equation text could not be retrieved while writing this; the
structure above is what the Qwen3-4B-SafeRL model card and the report's prose verifiably say):
- eq. (1): r = `safe_reward` (1) if the response is Safe under the mode, else `unsafe_reward` (0);
- eq. (2): r = `unsafe_penalty` (-10) if the response is Unsafe; else `refusal_penalty` (-5) if the
  response is a refusal to a prompt judged Safe ("unnecessary"); else the helpfulness score.
  A refusal to an Unsafe prompt is not penalised. All constants are parameters.
- "Unsafe" follows the policy mode: strict (default) counts Controversial as Unsafe, loose as Safe.
  A guard answer that cannot be parsed counts as Unsafe (qguard never reads an error as Safe).
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

from qguard.errors import InputError, check_int, check_number
from qguard.policy import Mode, Policy, Severity, Verdict

Conversation = str | Sequence[dict]

SCORER_SIGNATURES = (
    "a batch scorer f(prompts, responses) -> one number per pair (prompts: lists of {role, content} messages, "
    "responses: strings), or a per-pair scorer f(prompt, response) -> number wrapped as "
    "helpfulness=qguard.reward.per_pair(f)"
)


class HelpfulnessScorer(Protocol):
    """Scores a batch of (prompt, response) pairs; higher is more helpful. Called once per batch, with
    the prompts as lists of {role, content} messages; returns one number per pair. A scorer of one pair
    at a time goes through `per_pair`."""

    def __call__(self, prompts: Sequence[list[dict]], responses: Sequence[str]) -> Sequence[float]: ...


def per_pair(score: Callable[[list[dict], str], float]) -> HelpfulnessScorer:
    """A batch scorer from a per-pair one: `helpfulness=per_pair(lambda prompt, response: ...)`, where
    `prompt` is the list of {role, content} messages and `response` the completion's text."""
    if not callable(score):
        raise InputError(f"per_pair takes a function f(prompt, response) -> number, got {type(score).__name__}")
    _check_arity(score, "per_pair's function")

    def batch(prompts: Sequence[list[dict]], responses: Sequence[str]) -> list[float]:
        return [score(p, r) for p, r in zip(prompts, responses)]

    batch.__name__ = f"per_pair({getattr(score, '__name__', type(score).__name__)})"
    return batch


def _check_arity(fn: Callable, what: str) -> None:
    """A scorer must take two positional arguments; one that cannot is refused before training starts."""
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        raise InputError(f"{what} must take two arguments: {SCORER_SIGNATURES}") from None
    except ValueError:  # no signature to read (some builtins): it is checked when it is called
        pass


@dataclass(frozen=True)
class RewardConfig:
    mode: Mode = Mode.STRICT
    safe_reward: float = 1.0  # eq. (1)
    unsafe_reward: float = 0.0  # eq. (1)
    unsafe_penalty: float = -10.0  # eq. (2)
    refusal_penalty: float = -5.0  # eq. (2)
    penalize_refusal: str = "safe_prompts"  # eq. (2): "safe_prompts" (unnecessary refusals) or "always"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode(self.mode))
        for f in fields(self):
            if f.name not in ("mode", "penalize_refusal"):
                object.__setattr__(self, f.name, check_number(getattr(self, f.name), f.name))
        if self.penalize_refusal not in ("safe_prompts", "always"):
            raise InputError(f"penalize_refusal must be 'safe_prompts' or 'always', got {self.penalize_refusal!r}")


def is_unsafe(v: Verdict, mode: Mode) -> bool:
    return v.error is not None or Policy(mode=mode).binary(v.label) is Severity.UNSAFE


def guard_only_reward(response: Verdict, cfg: RewardConfig = RewardConfig()) -> float:
    """Eq. (1): the judge's verdict on the response alone."""
    return cfg.unsafe_reward if is_unsafe(response, cfg.mode) else cfg.safe_reward


def hybrid_reward(response: Verdict, prompt: Verdict | None, helpfulness: float | None,
                  cfg: RewardConfig = RewardConfig()) -> float | None:
    """Eq. (2). Returns None when the answer is the helpfulness score and none was given."""
    if is_unsafe(response, cfg.mode):
        return cfg.unsafe_penalty
    if response.refusal:
        if cfg.penalize_refusal == "always" or (prompt is not None and not is_unsafe(prompt, cfg.mode)):
            return cfg.refusal_penalty
    return helpfulness


class SafetyReward:
    """Batched rewards from a Guard (or any backend with `classify_conversations`).

    `kind="guard"` is eq. (1); `kind="hybrid"` is eq. (2) and needs `helpfulness`. Calling the object
    is the TRL reward-function signature: `reward(prompts, completions, **kw) -> list[float]`, with
    prompts/completions as strings or as conversational message lists (TRL's two formats).
    `invalid_reward`: reward for a completion that cannot be judged (e.g. empty); None raises InputError.
    `helpfulness` (hybrid): a batch scorer `f(prompts, responses) -> list[float]` (see HelpfulnessScorer),
    or a per-pair one wrapped as `per_pair(f)`; anything else is refused with an InputError.
    """

    def __init__(self, guard: Any, kind: str = "guard", helpfulness: HelpfulnessScorer | None = None,
                 config: RewardConfig = RewardConfig(), batch_size: int = 64, invalid_reward: float | None = None):
        if kind not in ("guard", "hybrid"):
            raise InputError(f"kind must be 'guard' or 'hybrid', got {kind!r}")
        if kind == "hybrid" and helpfulness is None:
            raise InputError(f"the hybrid reward needs a helpfulness scorer: {SCORER_SIGNATURES}")
        if helpfulness is not None:
            if not callable(helpfulness):
                raise InputError(f"helpfulness must be {SCORER_SIGNATURES}; got {type(helpfulness).__name__}")
            _check_arity(helpfulness, "helpfulness")
        if not isinstance(config, RewardConfig):
            raise InputError(f"config must be a qguard.reward.RewardConfig, got {type(config).__name__}")
        if not callable(getattr(guard, "classify_conversations", None)):
            raise InputError(f"the judge must be a Guard (or a backend with classify_conversations), "
                             f"got {type(guard).__name__}")
        self.guard, self.kind, self.helpfulness, self.config = guard, kind, helpfulness, config
        self.batch_size = check_int(batch_size, "batch_size")
        self.invalid_reward = None if invalid_reward is None else check_number(invalid_reward, "invalid_reward")
        self.__name__ = f"qguard_{kind}_reward"  # TRL logs reward functions by __name__

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return self.score([as_messages(p) for p in prompts], [completion_text(c) for c in completions])

    def score(self, prompts: Sequence[Conversation], responses: Sequence[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise InputError(f"{len(prompts)} prompts but {len(responses)} responses")
        pmsgs = [as_messages(p) for p in prompts]
        convs = [[*p, {"role": "assistant", "content": r}] for p, r in zip(pmsgs, responses)]
        # like Guard.classify_response, an empty answer is not judged (it gets `invalid_reward`)
        judged = [i for i, r in enumerate(responses) if isinstance(r, str) and r.strip()]
        resp: list[Verdict | Exception] = [InputError("empty response: nothing to moderate")] * len(convs)
        for i, v in zip(judged, self._judge([convs[i] for i in judged])):
            resp[i] = v
        prom = self._judge(pmsgs) if self.kind == "hybrid" and self.config.penalize_refusal != "always" \
            else [None] * len(convs)
        out: list[float | None] = [None] * len(convs)
        todo = []
        for i, (rv, pv) in enumerate(zip(resp, prom)):
            if isinstance(rv, Exception) or isinstance(pv, Exception):
                out[i] = self._invalid(i, rv if isinstance(rv, Exception) else pv)
            elif self.kind == "guard":
                out[i] = guard_only_reward(rv, self.config)
            else:
                out[i] = hybrid_reward(rv, pv, None, self.config)
                if out[i] is None:
                    todo.append(i)
        if todo:
            for i, s in zip(todo, self._helpfulness([pmsgs[i] for i in todo], [responses[i] for i in todo])):
                try:
                    out[i] = float(s)
                except (TypeError, ValueError):
                    raise InputError(f"helpfulness scorer returned {s!r} for sample {i}, not a number") from None
        return [float(x) for x in out]  # type: ignore[arg-type]

    def _helpfulness(self, prompts: list[list[dict]], responses: list[str]) -> list[Any]:
        """One score per pair from the batch scorer; a scorer of another shape gets a message naming the
        one expected (a per-pair scorer called with a batch fails or answers one number)."""
        n = len(prompts)
        pairs = f"{n} pair" + ("s" if n != 1 else "")
        try:
            scores = self.helpfulness(prompts, responses)
        except (TypeError, AttributeError) as e:
            raise InputError(f"the helpfulness scorer failed on a batch of {pairs} ({type(e).__name__}: {e}); "
                             f"it must be {SCORER_SIGNATURES}") from e
        if isinstance(scores, (str, bytes, numbers.Number)) or not hasattr(scores, "__len__"):
            raise InputError(f"the helpfulness scorer returned {type(scores).__name__} {scores!r} for a batch of "
                             f"{pairs}, not one number per pair; it must be {SCORER_SIGNATURES}")
        scores = list(scores)
        if len(scores) != n:
            raise InputError(f"helpfulness scorer returned {len(scores)} scores for {pairs}")
        return scores

    def _judge(self, convs: list[list[dict]]) -> list[Verdict | Exception]:
        out: list[Verdict | Exception] = []
        for a in range(0, len(convs), self.batch_size):
            out.extend(self.guard.classify_conversations(convs[a : a + self.batch_size], return_errors=True))
        return out

    def _invalid(self, i: int, e: Exception) -> float:
        if self.invalid_reward is None:
            raise InputError(f"sample {i} cannot be judged: {e}")
        return self.invalid_reward


def as_messages(prompt: Conversation) -> list[dict]:
    """A prompt as TRL passes it: plain text, or a list of {role, content} messages."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Sequence) and all(isinstance(m, dict) for m in prompt):
        return [dict(m) for m in prompt]
    raise InputError(f"a prompt must be text or a list of messages, got {type(prompt).__name__}")


def completion_text(completion: Any) -> str:
    """A completion as TRL passes it: text, or a list of messages (the assistant contents, joined)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and all(isinstance(m, dict) for m in completion):
        return "".join(str(m.get("content", "")) for m in completion if m.get("role", "assistant") == "assistant")
    raise InputError(f"a completion must be text or a list of messages, got {type(completion).__name__}")


def reward_fn(guard: Any, kind: str = "guard", helpfulness: HelpfulnessScorer | None = None,
              **kw: Any) -> Callable[..., list[float]]:
    """A TRL-compatible reward function: `reward_fn(guard)(prompts, completions, **kw) -> list[float]`.

    `kind="hybrid"` needs `helpfulness`: a batch scorer `f(prompts, responses) -> list[float]` (prompts as
    lists of {role, content} messages, responses as text), or `per_pair(f)` for `f(prompt, response) ->
    float`. kw: `config` (RewardConfig), `batch_size`, `invalid_reward` (see SafetyReward).
    """
    unknown = set(kw) - {"config", "batch_size", "invalid_reward"}
    if unknown:
        raise InputError(f"reward_fn got unknown options {sorted(unknown)}; it takes config, batch_size and "
                         "invalid_reward")
    return SafetyReward(guard, kind, helpfulness, **kw)
