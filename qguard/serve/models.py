"""Typed request/response bodies of the HTTP API, and what the guard reads of an OpenAI message."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class TextPart(BaseModel):
    """One part of OpenAI's list-of-parts content; only text parts carry text a text guard can read."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI messages carry name, tool_call_id, ...

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ModerationMessage(BaseModel):
    """/v1/moderate takes the guard's own roles."""

    role: Literal["system", "user", "assistant"]
    content: str


def content_text(content: Any) -> str:
    """The text of an OpenAI `content`: a string, or the text parts of a list joined (images carry none)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for p in content:
            p = p.model_dump() if isinstance(p, BaseModel) else p
            if isinstance(p, dict) and isinstance(p.get("text"), str):
                texts.append(p["text"])
        return "\n".join(texts)
    raise ValueError(f"content must be text or a list of parts, got {type(content).__name__}")


def tool_calls_text(tool_calls: Any) -> str:
    """Tool calls as the Qwen3 template writes them: their arguments are text the guard must read too."""
    out = []
    for call in tool_calls or []:
        fn = call.get("function", call) if isinstance(call, dict) else {}
        args = fn.get("arguments", "")
        out.append(json.dumps({"name": fn.get("name"), "arguments": args if isinstance(args, str) else json.dumps(args)},
                              ensure_ascii=False))
    return "\n".join(f"<tool_call>\n{c}\n</tool_call>" for c in out)


def guard_message(m: ChatMessage) -> dict[str, str]:
    """One OpenAI message as the guard reads it (the Qwen3 chat template's forms): developer instructions
    are a system turn, a tool result is a user turn inside <tool_response>, tool calls join the assistant text."""
    text = content_text(m.content)
    if m.role == "developer":
        return {"role": "system", "content": text}
    if m.role in ("tool", "function"):
        return {"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"}
    if m.role == "assistant" and m.tool_calls:
        text = "\n".join(t for t in (text, tool_calls_text(m.tool_calls)) if t)
    return {"role": m.role, "content": text}


class ModerateRequest(BaseModel):
    messages: list[ModerationMessage] = Field(min_length=1, description="the last message is the one judged")
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
    n: int | None = Field(None, description="qguard judges one answer per request: only 1 is accepted")


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
