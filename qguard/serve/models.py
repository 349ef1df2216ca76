"""Typed request/response bodies of the HTTP API, and what the guard reads of an OpenAI message."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from qguard.messages import fix_surrogates
from qguard.serve.errors import APIError


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
    """/v1/moderate takes the guard's own roles; content as text or OpenAI's list of parts (as the proxy)."""

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]


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
    """Tool calls as the text the guard reads: one JSON object (name, arguments) a line. No <tool_call>
    tags: content is tokenized as text, so tags would be read as ordinary characters anyway, and writing
    them would make qguard's own rendering look like spoofed control tokens."""
    out = []
    for call in tool_calls or []:
        fn = call.get("function", call) if isinstance(call, dict) else {}
        args = fn.get("arguments", "")
        out.append(json.dumps({"name": fn.get("name"), "arguments": args if isinstance(args, str) else json.dumps(args)},
                              ensure_ascii=False))
    return "\n".join(out)


def guard_message(m: ChatMessage) -> dict[str, str]:
    """One OpenAI message as the guard reads it: developer instructions are a system turn, a tool result
    is a user turn (the turn the answer follows; its text as it is), tool calls join the assistant text.
    The message's other texts (its name, an assistant's reasoning or refusal) are judged on their own
    (`request_texts`)."""
    text = content_text(m.content)
    if m.role == "developer":
        return {"role": "system", "content": text}
    if m.role in ("tool", "function"):
        return {"role": "user", "content": text}
    fc = (m.model_extra or {}).get("function_call")
    calls = [*(m.tool_calls or []), *([{"function": fc}] if isinstance(fc, dict) else [])]
    if m.role == "assistant" and calls:
        text = "\n".join(t for t in (text, tool_calls_text(calls)) if t)
    return {"role": m.role, "content": text}


# ------------------------------------------------------------------ request texts outside the messages' content
#
# The LLM reads more of a request than the messages' content: tool definitions (chat templates render
# them into the system prompt), message names, an assistant turn's reasoning or refusal, a response
# format's schema. Each such text is judged as a prompt of its own, in the same batched guard call as the
# conversation; the request is blocked if any part is. A field qguard does not know that carries text is
# refused (400 naming it), never forwarded unjudged. Non-text parts (images, audio, files) are not read: a
# text guard's limit, documented.

# request fields that carry no text the LLM reads (sampling knobs, ids, output constraints: the output
# they constrain is judged); a field outside this list and `JUDGED_FIELDS` may hold numbers and booleans only
PLAIN_FIELDS = frozenset({
    "model", "messages", "stream", "stream_options", "n", "temperature", "top_p", "max_tokens",
    "max_completion_tokens", "stop", "seed", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
    "top_logprobs", "user", "metadata", "store", "service_tier", "parallel_tool_calls", "modalities",
    "reasoning_effort", "verbosity", "safety_identifier", "prompt_cache_key", "top_k", "min_p",
    "repetition_penalty", "stop_token_ids", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
    "guided_decoding_backend", "structured_outputs",
})
JUDGED_FIELDS = ("tools", "functions", "tool_choice", "function_call", "response_format")
MESSAGE_FIELDS = frozenset({"role", "content", "tool_calls", "tool_call_id", "name", "reasoning_content",
                            "reasoning", "refusal", "function_call"})
NON_TEXT_PARTS = frozenset({"image_url", "input_audio", "file", "video_url", "audio_url"})  # not read (text guard)


def has_text(value: Any) -> bool:
    """Whether `value` holds a string value anywhere (a dict's keys are names: a field of flags, such as
    chat_template_kwargs {"enable_thinking": false}, carries no text)."""
    if isinstance(value, str):
        return True
    if isinstance(value, dict):
        return any(map(has_text, value.values()))
    if isinstance(value, list):
        return any(map(has_text, value))
    return False


def refused(field: str, why: str) -> APIError:
    return APIError(400, f"{field}: {why}", param=field, code="unsupported_field")


def request_texts(req: ChatCompletionRequest) -> list[tuple[str, str]]:
    """(field, text) for every text of the request that the LLM reads besides the messages' content;
    raises (400) for a field that carries text qguard does not judge."""
    out = field_texts(req.model_extra or {})
    for i, m in enumerate(req.messages):
        out += message_texts(f"messages[{i}]", m)
    return out


def field_texts(extra: dict[str, Any]) -> list[tuple[str, str]]:
    """The texts of the request's fields outside `ChatCompletionRequest`'s own (tools, response_format, ...)."""
    out: list[tuple[str, str]] = []
    for key, value in extra.items():
        if key in JUDGED_FIELDS:
            items = enumerate(value) if isinstance(value, list) else [(None, value)] if isinstance(value, dict) else []
            for i, v in items:
                if (text := as_text(v)).strip():
                    out.append((key if i is None else f"{key}[{i}]", text))
        elif key not in PLAIN_FIELDS and has_text(value):
            raise refused(key, "this request field carries text that qguard does not judge; remove it")
    return out


def message_texts(where: str, m: ChatMessage) -> list[tuple[str, str]]:
    """The texts of message `m` (at `where`) besides its content: its name, reasoning and refusal."""
    extra = m.model_extra or {}
    check_message_fields(where, m, extra)
    out: list[tuple[str, str]] = []
    for key in ("name", "reasoning_content", "reasoning", "refusal"):
        value = extra.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise refused(f"{where}.{key}", f"must be text, got {type(value).__name__}")
        if value.strip():
            out.append((f"{where}.{key}", value))
    fc = extra.get("function_call")
    if fc is not None and not isinstance(fc, dict):
        raise refused(f"{where}.function_call", "must be an object")
    return out


def check_message_fields(where: str, m: ChatMessage, extra: dict[str, Any]) -> None:
    """Refuse a message field, content part or tool-call field that carries text qguard does not judge,
    and ids that are not identifiers."""
    for key, value in extra.items():
        if key not in MESSAGE_FIELDS and has_text(value):
            raise refused(f"{where}.{key}", "this message field carries text that qguard does not judge; remove it")
    if isinstance(m.content, list):
        for j, part in enumerate(m.content):
            if part.type not in ("text", "refusal", *NON_TEXT_PARTS):
                raise refused(f"{where}.content[{j}]", f"content parts of type {part.type[:40]!r} are not judged")
    call_id = extra.get("tool_call_id")
    if call_id is not None and not (isinstance(call_id, str) and _IDENT.fullmatch(call_id)):
        raise refused(f"{where}.tool_call_id", "must be an identifier")
    for j, call in enumerate(m.tool_calls or []):
        if call.get("id") is not None and not (isinstance(call["id"], str) and _IDENT.fullmatch(call["id"])):
            raise refused(f"{where}.tool_calls[{j}].id", "must be an identifier")
        for key, value in call.items():
            if key not in ("id", "type", "function", "index") and has_text(value):
                raise refused(f"{where}.tool_calls[{j}].{key}", "this field carries text that qguard does not judge")


# the structure of a tool definition or JSON schema, which carries no text of the client's: skipped, so
# that the guard reads the definition's own words (a guard reads JSON syntax poorly; the LLM reads the words)
SCHEMA_KEYS = frozenset({"type", "function", "name", "description", "parameters", "properties", "items",
                         "required", "enum", "const", "title", "default", "examples", "format", "pattern",
                         "additionalProperties", "anyOf", "oneOf", "allOf", "not", "$defs", "definitions", "$ref",
                         "strict", "json_schema", "schema", "minimum", "maximum", "minItems", "maxItems",
                         "minLength", "maxLength", "nullable"})
SCHEMA_TYPES = frozenset({"function", "object", "string", "number", "integer", "boolean", "array", "null",
                          "json_schema", "json_object", "text"})


def as_text(value: Any) -> str:
    """The words of a definition (tool, function, response format) that the LLM reads, one a line: its
    string values and the names it defines (a parameter's name is text too), without the schema's own
    vocabulary."""
    lines: list[str] = []

    def walk(v: Any, key: str | None) -> None:
        if isinstance(v, str):
            if not (key == "type" and v in SCHEMA_TYPES):
                lines.append(v)
        elif isinstance(v, dict):
            for k, x in v.items():
                if k not in SCHEMA_KEYS:
                    lines.append(str(k))
                walk(x, k)
        elif isinstance(v, list):
            for x in v:
                walk(x, key)

    walk(value, None)
    return "\n".join(lines)


MAX_CONVERSATIONS = 64  # conversations per /v1/moderate request: one batched guard call holds them all


class ModerateRequest(BaseModel):
    """One conversation (`messages`) or a batch (`conversations`), exactly one of the two."""

    messages: list[ModerationMessage] | None = Field(None, min_length=1,
                                                     description="the last message is the one judged")
    conversations: list[list[ModerationMessage]] | None = Field(
        None, min_length=1, max_length=MAX_CONVERSATIONS,
        description="a batch: one verdict per conversation, judged in one batched guard call")
    mode: Literal["strict", "loose"] | None = Field(None, description="default: the server's mode")

    @model_validator(mode="after")
    def _one_of(self) -> ModerateRequest:
        if (self.messages is None) == (self.conversations is None):
            raise ValueError("give either messages (one conversation) or conversations (a batch), not both or neither")
        if any(not c for c in self.conversations or ()):
            raise ValueError("conversations: every conversation needs at least one message")
        return self

    @property
    def batch(self) -> list[list[ModerationMessage]]:
        return self.conversations if self.conversations is not None else [self.messages or []]


class ModerateResponse(BaseModel):
    model: str
    verdict: dict[str, Any] | None = Field(None, description="for `messages`: the verdict as `Verdict.to_dict()` "
                                           "writes it (label, binary, mode, action, categories, probs, ...)")
    verdicts: list[dict[str, Any]] | None = Field(None, description="for `conversations`: one verdict each, in order")


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


# ------------------------------------------------------------------ the upstream's identifiers and usage
#
# The top-level fields of an upstream answer are no less the upstream's text than its message: each is
# kept only when it has the shape of what it names (an opaque id, a time, token counts, a model name the
# client asked for), else replaced by qguard's own or dropped.

# an opaque id: an optional lowercase prefix (chatcmpl-, fp_), then one random-looking token (or a UUID)
# with a digit in it; words joined by dashes are not ids
_OPAQUE = re.compile(r"(?:[a-z]{1,16}[-_])?(?:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
                     r"|(?=[A-Za-z]*[0-9])[A-Za-z0-9]{6,48})")
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
_VERSION = re.compile(r"-[0-9][0-9.-]{0,31}")  # gpt-4o -> gpt-4o-2024-08-06
SERVICE_TIERS = frozenset({"auto", "default", "flex", "scale", "priority"})
USAGE_COUNTS = frozenset({"prompt_tokens", "completion_tokens", "total_tokens"})
USAGE_DETAILS = {"prompt_tokens_details": frozenset({"cached_tokens", "audio_tokens", "text_tokens", "image_tokens"}),
                 "completion_tokens_details": frozenset({"reasoning_tokens", "audio_tokens", "text_tokens",
                                                         "accepted_prediction_tokens",
                                                         "rejected_prediction_tokens"})}


def opaque_id(value: Any) -> str | None:
    return value if isinstance(value, str) and _OPAQUE.fullmatch(value) else None


def created_time(value: Any) -> int | None:
    return value if type(value) is int and 0 < value < 1 << 40 else None


def count(value: Any) -> bool:
    return type(value) is int and 0 <= value < 1 << 53


def usage_of(value: Any) -> dict[str, Any] | None:
    """The upstream's token usage: its known integer counters only."""
    if not isinstance(value, dict):
        return None
    out: dict[str, Any] = {k: v for k, v in value.items() if k in USAGE_COUNTS and count(v)}
    for key, known in USAGE_DETAILS.items():
        if isinstance(d := value.get(key), dict) and (kept := {k: v for k, v in d.items() if k in known and count(v)}):
            out[key] = kept
    return out or None


def model_of(value: Any, requested: str) -> str:
    """The reply's model: the upstream's name when it is the requested model or a version of it, else the
    requested one (the client's own text)."""
    if isinstance(value, str) and _MODEL.fullmatch(value) and (
            value == requested or value.endswith("/" + requested) or requested.endswith("/" + value)
            or (value.startswith(requested) and _VERSION.fullmatch(value[len(requested):]))):
        return value
    return requested


def top_level(data: Any, requested_model: str, kind: str = "chat.completion") -> dict[str, Any]:
    """The reply's top-level fields from the upstream's: id, object, created, model and, where the upstream
    gave them in their shape, system_fingerprint, service_tier and usage."""
    data = data if isinstance(data, dict) else {}
    body: dict[str, Any] = {"id": opaque_id(data.get("id")) or new_id(), "object": kind,
                            "created": created_time(data.get("created")) or int(time.time()),
                            "model": model_of(data.get("model"), requested_model)}
    if fp := opaque_id(data.get("system_fingerprint")):
        body["system_fingerprint"] = fp
    if (tier := data.get("service_tier")) in SERVICE_TIERS:
        body["service_tier"] = tier
    if usage := usage_of(data.get("usage")):
        body["usage"] = usage
    return body


def completion_body(model: str, content: str, finish_reason: str, guard: dict[str, Any],
                    upstream: dict[str, Any] | None = None) -> dict[str, Any]:
    """A reply of qguard's own (a refusal) to a request for `model`; `upstream`: the upstream's answer it
    replaces (its id, created and usage, where they have their shape)."""
    body = top_level(upstream, model)
    body["choices"] = [{"index": 0, "message": {"role": "assistant", "content": content},
                        "finish_reason": finish_reason}]
    body["qguard"] = guard
    return body


# ------------------------------------------------------------------ the upstream's answer, as the guard reads it
#
# Only the fields below reach the client, and every string among them is judged; any other field of a
# choice (logprobs, audio, annotations, vendor extensions ...) is dropped, so nothing passes unjudged.

ANSWER_TEXT_FIELDS = ("reasoning_content", "reasoning", "content", "refusal")
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


def answer_body(data: Any, message: dict[str, Any], guard: dict[str, Any], requested_model: str) -> dict[str, Any]:
    """The reply to the client: the upstream's identifiers and usage (`top_level`), its judged message,
    and `qguard`."""
    body = top_level(data, requested_model)
    finish = data["choices"][0].get("finish_reason")
    body["choices"] = [{"index": 0, "message": message, "finish_reason": identifier(finish, "finish_reason")}]
    body["qguard"] = guard
    return body
