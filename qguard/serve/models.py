"""Typed request/response bodies of the HTTP API, and what the guard reads of an OpenAI message."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qguard.serve.errors import APIError
from qguard.tokenizer import fix_surrogates


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
    """The text of an OpenAI `content`: a string, or the text (and refusal) parts of a list joined (images
    carry none)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for p in content:
            p = p.model_dump() if isinstance(p, BaseModel) else p
            if not isinstance(p, dict):
                continue
            text = p.get("refusal") if p.get("type") == "refusal" else p.get("text")
            if isinstance(text, str):
                texts.append(text)
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


class ModerateResponse(BaseModel):
    model: str
    verdict: dict[str, Any] = Field(description="the verdict as `Verdict.to_dict()` writes it (label, binary, mode, "
                                                "action, categories, refusal, probs, category_probs, ...)")


class ChatCompletionRequest(BaseModel):
    """The fields qguard reads; everything else is passed to the upstream LLM untouched."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    n: int | None = Field(None, description="qguard judges one answer per request: only 1 is accepted")


def guard_info(prompt, response=None, blocked: Literal["prompt", "response"] | None = None) -> dict[str, Any]:
    """The `qguard` object of a reply: the verdicts (qguard.policy.Verdict) in their one serialisation."""
    info: dict[str, Any] = {"prompt": prompt.to_dict()}
    if response is not None:
        info["response"] = response.to_dict()
    if blocked is not None:
        info["blocked"] = blocked
    return info


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion_body(model: str, content: str, finish_reason: str, guard: dict[str, Any],
                    extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A reply of qguard's own (a refusal); `extra`: the upstream's answer it replaces (id, created, usage)."""
    extra = extra or {}
    body = {
        "id": extra.get("id") or new_id(),
        "object": "chat.completion",
        "created": extra.get("created") or int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}],
        "qguard": guard,
    }
    if isinstance(extra.get("usage"), dict):
        body["usage"] = extra["usage"]
    return body


# ------------------------------------------------------------------ the upstream's answer, as the guard reads it
#
# Only the fields below reach the client, and every string among them is judged; any other field of a
# choice (logprobs, audio, annotations, vendor extensions ...) is dropped, so nothing passes unjudged.

ANSWER_TEXT_FIELDS = ("reasoning_content", "reasoning", "content", "refusal")
TOP_LEVEL_FIELDS = ("id", "object", "created", "model", "system_fingerprint", "service_tier", "usage")
_IDENT = re.compile(r"[A-Za-z0-9_.:-]{1,128}")  # tool-call ids and finish reasons: identifiers, not prose


def bad_answer(what: str) -> APIError:
    return APIError(502, f"upstream LLM answer: {what}", code="upstream_error")


def text_field(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_answer(f"{where} must be text, got {type(value).__name__}")
    return fix_surrogates(value)  # a lone surrogate cannot be encoded for the client (nor tokenized)


def answer_content(content: Any, where: str = "content") -> str | list[dict[str, str]] | None:
    """`content` of an answer: text, or its text and refusal parts (other parts carry no text and are dropped)."""
    if content is None or isinstance(content, str):
        return text_field(content, where)
    if not isinstance(content, list):
        raise bad_answer(f"{where} must be text or a list of parts, got {type(content).__name__}")
    parts = []
    for i, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind in ("text", "refusal"):
            parts.append({"type": kind, kind: text_field(p.get(kind), f"{where}[{i}].{kind}") or ""})
    return parts


def identifier(value: Any, where: str) -> str | None:
    if value is None or value == "":  # some servers write "" for "none yet"
        return None
    if not isinstance(value, str) or not _IDENT.fullmatch(value):
        raise bad_answer(f"{where} must be an identifier, got {str(value)[:40]!r}")
    return value


def function_fields(fn: Any, where: str) -> dict[str, str]:
    """`name` and `arguments` of a function call (arguments given as JSON objects become their text)."""
    if fn is None:
        return {}
    if not isinstance(fn, dict):
        raise bad_answer(f"{where} must be an object")
    out = {}
    args = fn.get("arguments")
    if args is not None and not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    for key, value in (("name", fn.get("name")), ("arguments", args)):
        if (value := text_field(value, f"{where}.{key}")) is not None:
            out[key] = value
    return out


def answer_message(message: Any) -> dict[str, Any]:
    """The upstream's answer message reduced to what qguard judges: its text fields, tool calls and the
    legacy `function_call`."""
    if not isinstance(message, dict):
        raise bad_answer("choices[0].message is not an object")
    out: dict[str, Any] = {"role": "assistant", "content": answer_content(message.get("content"))}
    for key in ("reasoning_content", "reasoning", "refusal"):
        if (value := text_field(message.get(key), key)) is not None:
            out[key] = value
    calls = message.get("tool_calls")
    if calls:
        if not isinstance(calls, list):
            raise bad_answer("tool_calls must be a list")
        out["tool_calls"] = []
        for i, c in enumerate(calls):
            if not isinstance(c, dict):
                raise bad_answer(f"tool_calls[{i}] must be an object")
            out["tool_calls"].append({"id": identifier(c.get("id"), f"tool_calls[{i}].id"), "type": "function",
                                      "function": function_fields(c.get("function"), f"tool_calls[{i}].function")})
    if message.get("function_call") is not None:
        out["function_call"] = function_fields(message["function_call"], "function_call")
    return out


def answer_text(message: dict[str, Any]) -> str:
    """Everything of an `answer_message` that reaches the client, as one text in the Qwen3 template's
    forms: reasoning (then `</think>`), content, refusal, tool calls (legacy function_call included)."""
    calls = [*(message.get("tool_calls") or []), *([{"function": message["function_call"]}]
                                                   if message.get("function_call") else [])]
    content = "\n".join(t for t in (content_text(message.get("content")), message.get("refusal") or "",
                                     tool_calls_text(calls)) if t)
    reasoning = "\n".join(t for t in (message.get("reasoning_content"), message.get("reasoning")) if t)
    if reasoning.strip():
        return f"{reasoning}</think>\n\n{content}"
    return content


def answer_body(data: Any, message: dict[str, Any], guard: dict[str, Any]) -> dict[str, Any]:
    """The reply to the client: the upstream's identifiers and usage, its judged message, and `qguard`."""
    body = {k: data[k] for k in TOP_LEVEL_FIELDS if k in data}
    body.setdefault("id", new_id())
    body.setdefault("object", "chat.completion")
    body.setdefault("created", int(time.time()))
    finish = data["choices"][0].get("finish_reason")
    body["choices"] = [{"index": 0, "message": message, "finish_reason": identifier(finish, "finish_reason")}]
    body["qguard"] = guard
    return body
