"""Typed request/response bodies of the HTTP API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI messages carry name, tool_calls, ...

    role: Literal["system", "user", "assistant"]
    content: str


class ModerateRequest(BaseModel):
    messages: list[ChatMessage] = Field(min_length=1, description="the last message is the one judged")
    mode: Literal["strict", "loose"] | None = Field(None, description="default: the server's mode")


class VerdictModel(BaseModel):
    label: Literal["Safe", "Unsafe", "Controversial"]
    binary: Literal["Safe", "Unsafe"]
    mode: Literal["strict", "loose"]
    action: Literal["allow", "flag", "block"]
    categories: list[str]
    refusal: bool | None = None
    probs: dict[str, float] | None = None
    category_probs: dict[str, float] | None = None
    refusal_prob: float | None = None
    unsafe_position: int | None = None
    n_tokens: int | None = None
    error: str | None = None


def verdict_model(v) -> VerdictModel:
    """A qguard.policy.Verdict as its HTTP body."""
    return VerdictModel(**{k: x for k, x in v.to_dict().items() if k in VerdictModel.model_fields})


class ModerateResponse(BaseModel):
    model: str
    verdict: VerdictModel


class ChatCompletionRequest(BaseModel):
    """The fields qguard reads; everything else is passed to the upstream LLM untouched."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False


class GuardInfo(BaseModel):
    prompt: VerdictModel
    response: VerdictModel | None = None
    blocked: Literal["prompt", "response"] | None = None


def completion_body(model: str, content: str, finish_reason: str, guard: GuardInfo, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    body = {
        "id": (extra or {}).get("id", "chatcmpl-qguard"),
        "object": "chat.completion",
        "created": (extra or {}).get("created", 0),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}],
        "qguard": guard.model_dump(exclude_none=True),
    }
    if extra and "usage" in extra:
        body["usage"] = extra["usage"]
    return body
