"""Conversations as every entry point takes them: checked once, the same way, with the same errors.

A message is a plain `{"role": ..., "content": ...}` dict. `check_messages` validates a chat,
`check_turn` one whose last turn can be moderated; `as_prompt_messages` / `as_response_messages` turn
the `Guard` call shapes (a string, a pair, a list) into one, and `session_messages` is what a live
Stream session opens on. No tokenizer and no model here: the checks are on text only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from qguard.errors import InputError

Message = dict[str, Any]
Conversation = str | Sequence[Message]

_SURROGATE = re.compile("[\ud800-\udfff]")


def join_surrogates(text: str) -> str:
    """Join UTF-16 surrogate pairs left in a str (e.g. by a JavaScript client) into their characters."""
    if not _SURROGATE.search(text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")


def fix_surrogates(text: str) -> str:
    """`join_surrogates`, then any surrogate left alone (ill-formed text) becomes U+FFFD."""
    return _SURROGATE.sub("\ufffd", join_surrogates(text))


def check_messages(messages: Sequence[Message]) -> list[Message]:
    """Validate a chat: a non-empty list of {role, content} with text content. Returns plain dicts."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InputError(f"message {i}: expected an object with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in ("system", "user", "assistant"):
            raise InputError(f"message {i}: role must be system, user or assistant, got {role!r}")
        if not isinstance(content, str):
            raise InputError(f"message {i}: content must be text, got {type(content).__name__}")
        content = join_surrogates(content)
        if bad := _SURROGATE.search(content):
            raise InputError(f"message {i}: content is not valid Unicode (an unpaired UTF-16 surrogate "
                             f"{bad.group()!r} at character {bad.start()}); decode the text correctly")
        out.append({"role": role, "content": content})
    if all(m["role"] == "system" for m in out):
        raise InputError("nothing to moderate: the conversation has only system messages")
    if not any(m["content"].strip() for m in out if m["role"] != "system"):
        raise InputError("nothing to moderate: every message is empty")
    return out


def check_turn(messages: Sequence[Message]) -> list[Message]:
    """A valid chat whose last turn can be moderated: a non-empty user prompt, or a non-empty assistant
    response whose prompt (the last user turn before it) is not empty either."""
    msgs = check_messages(messages)
    last = msgs[-1]
    if last["role"] == "system":
        raise InputError("the last message is a system turn: moderation reads the last user or assistant turn")
    if not last["content"].strip():
        what = "response" if last["role"] == "assistant" else "prompt"
        raise InputError(f"empty {what}: the last message has no text to moderate")
    if last["role"] == "assistant":
        # a response is judged as the answer to its prompt: an empty prompt is bad input, not a Safe one
        # (a chat with no user turn at all is the engine's call: Gen's template renders it, Stream refuses)
        prompt = next((m for m in reversed(msgs) if m["role"] == "user"), None)
        if prompt is not None and not prompt["content"].strip():
            raise InputError("empty prompt: the user turn that the response answers has no text")
    return msgs


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


def session_messages(messages: Conversation, system: str | None = None) -> list[Message]:
    """The checked conversation a live Stream session opens on: it ends with the user's turn (a string is
    that turn), and `system`, when given, becomes its first message."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    msgs = check_turn(messages)  # the prompt must have text: an empty one is an InputError, never Safe
    if system is not None:
        if not isinstance(system, str):
            raise InputError(f"system must be text, got {type(system).__name__}")
        if msgs[0]["role"] == "system":
            raise InputError("give the system turn either in messages or as system=, not both")
        msgs = [{"role": "system", "content": system}, *msgs]
    if msgs[-1]["role"] != "user":
        raise InputError("a stream session starts after the user's turn: the last message must be from the user")
    return msgs
