"""Qwen3Guard-Gen: a Qwen3 causal LM that answers `Safety: ...\\nCategories: ...[\\nRefusal: ...]`.

This module holds the LM (backbone + lm_head), the guard prompt and the answer parser. Rendering is
byte-exact with the official chat template (tests compare against spec/reference).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from qguard.errors import InputError
from qguard.model.qwen3 import InferenceFusion, KVCache, Qwen3Config, Qwen3Model
from qguard.policy import Category, Severity
from qguard.tokenizer import ASSETS, Message, check_messages, prepare_chat

# Token ids of the answer's fixed parts (spec section 2); tests pin them against the tokenizer.
SAFETY, COLON = 73037, 25
SEVERITY_FIRST_TOKEN = {Severity.SAFE: 22291, Severity.UNSAFE: 73067, Severity.CONTROVERSIAL: 2093}
CONTROVERSIAL_IDS = (2093, 12563, 530)
# Answer budget: the longest well-formed answer (a response in every category, then "Refusal: ...") is
# 48 tokens; a smaller budget would cut it and lose categories (the official eval uses 128)
GEN_MAX_NEW_TOKENS = 64
GUARD_TEMPLATE_MARKER = "<BEGIN UNSAFE CONTENT CATEGORIES>"


class GenGuardModel(InferenceFusion):
    """Backbone + lm_head. `fuse_for_inference` fuses the backbone (the lm_head is one matmul already)."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.config = cfg
        self.model = Qwen3Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.model(input_ids, positions, cache, attn_mask))


# ---------------------------------------------------------------------------------------------- prompt

@lru_cache(maxsize=4)
def _asset(name: str) -> str:
    return (ASSETS / name).read_text("utf-8")


def moderation_target(messages: Sequence[Message]) -> str:
    """'prompt' when the last message is the user's, 'response' when it is the assistant's."""
    return "response" if messages[-1]["role"] == "assistant" else "prompt"


def render_guard_prompt(messages: Sequence[Message]) -> str:
    """The full Gen input for a conversation, byte-exact with the official template.

    Quirk kept on purpose: a system message renders as `USER:` (the official template knows only two
    speakers). Content goes in verbatim, thinking text included.
    """
    messages = check_messages(messages)
    if messages[-1]["role"] == "system":
        raise InputError("the last message must be from the user or the assistant")
    target = moderation_target(messages)
    turns = [("ASSISTANT" if m["role"] == "assistant" else "USER") + ": " + m["content"] for m in messages]
    return (
        _asset(f"qwen3guard_gen_{target}_moderation_header.txt")
        + "\n\n".join(turns)
        + _asset(f"qwen3guard_gen_{target}_moderation_footer.txt")
    )


def is_guard_template(template: str | None) -> bool:
    return bool(template) and GUARD_TEMPLATE_MARKER in template


def render_with_tokenizer(tokenizer, messages: Sequence[Message]) -> str:
    """Use the checkpoint's own template when it is the guard template, else render it ourselves."""
    template = getattr(tokenizer, "chat_template", None)
    if is_guard_template(template):
        messages = check_messages(messages)
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    return render_guard_prompt(messages)


def guard_prompt_ids(tokenizer, messages: Sequence[Message], *,
                     official_special_tokens: bool = False) -> tuple[str, list[int]]:
    """The Gen input of a conversation, rendered as `render_with_tokenizer` does, and its token ids.

    Content is tokenized as text (`qguard.tokenizer.prepare_chat`): a `<|im_end|>` or `<think>` spelt in a
    message cannot close the guard's user turn or open its answer. The returned text has a private-use
    stand-in in place of each such string (the header, which holds no content, is exact). Content
    without one gives the official ids. `official_special_tokens` (unsafe): the official tokenization.
    """
    messages = check_messages(messages)
    chat = prepare_chat(tokenizer, messages, official_special_tokens=official_special_tokens,
                        split_reasoning=False)
    text = render_with_tokenizer(tokenizer, chat.messages)
    return text, chat.ids(tokenizer, text)


# ---------------------------------------------------------------------------------------------- answer

@dataclass(frozen=True)
class GenAnswer:
    severity: Severity
    categories: tuple[Category, ...]
    refusal: bool | None


class ParseError(ValueError):
    pass


_SAFETY_RE = re.compile(r"^\s*Safety\s*:\s*(Safe|Unsafe|Controversial)\s*$")
_CATEGORIES_RE = re.compile(r"^\s*Categories\s*:\s*(.*?)\s*$")
_REFUSAL_RE = re.compile(r"^\s*Refusal\s*:\s*(Yes|No)\s*$")


def parse_answer(text: str, target: str) -> GenAnswer:
    """Strictly parse a Gen answer. Raises ParseError naming what is wrong; never guesses Safe."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    want = 3 if target == "response" else 2
    if len(lines) < want:
        raise ParseError(f"expected {want} lines (Safety, Categories{', Refusal' if want == 3 else ''}), got {len(lines)}")
    m = _SAFETY_RE.match(lines[0])
    if not m:
        raise ParseError(f"first line is not 'Safety: Safe|Unsafe|Controversial': {lines[0]!r}")
    severity = Severity(m.group(1))
    m = _CATEGORIES_RE.match(lines[1])
    if not m:
        raise ParseError(f"second line is not 'Categories: ...': {lines[1]!r}")
    names = [c.strip() for c in m.group(1).split(",") if c.strip()]
    if not names:
        raise ParseError("empty category list (expected 'None' or names)")
    cats: list[Category] = []
    if names != ["None"]:
        for n in names:
            try:
                c = Category(n)  # the exact Gen strings (spec section 1), not the aliases of Stream configs
            except ValueError:
                raise ParseError(f"unknown category {n!r}") from None
            if c is Category.JAILBREAK and target == "response":
                raise ParseError("'Jailbreak' is a prompt category; a response answer cannot carry it")
            if c not in cats:
                cats.append(c)
    refusal = None
    if target == "response":
        m = _REFUSAL_RE.match(lines[2])
        if not m:
            raise ParseError(f"third line is not 'Refusal: Yes|No': {lines[2]!r}")
        refusal = m.group(1) == "Yes"
    if len(lines) > want:
        raise ParseError(f"unexpected extra output after line {want}: {lines[want]!r}")
    return GenAnswer(severity, tuple(cats), refusal)
