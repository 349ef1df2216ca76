"""Cheap size checks that run before anything is tokenized.

Tokenizing a huge text costs seconds of the one guard thread that every request and stream shares, only
to learn that it does not fit the guard's context. A lower bound on its token count is enough to refuse
it at once: no token spans more characters than the longest entry of the tokenizer's vocabulary, so a text
of n characters (after the tokenizer's normalizer) has at least n / longest tokens.
"""

from __future__ import annotations

import asyncio
from functools import cached_property
from typing import Any

BYTES_PER_TOKEN = 32  # a generous bound on an upstream stream line's bytes per answer token (JSON-escaped)
LINE_OVERHEAD = 1 << 16  # a chunk's JSON around its text
_NORMALIZE_OFF_LOOP = 1 << 16  # characters: a longer text is normalized in a worker thread


class TokenBound:
    """A lower bound on the number of tokens of a text, for one tokenizer."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    @cached_property
    def longest(self) -> int:
        """Characters of the longest vocabulary entry: an upper bound on the characters of one token (a
        byte-level entry's characters are its bytes, at least as many as the text characters it stands
        for)."""
        vocab = self.tokenizer.get_vocab() if hasattr(self.tokenizer, "get_vocab") else {}
        return max(map(len, vocab), default=0) or 1 << 20  # no vocabulary: a bound that refuses nothing

    @cached_property
    def _normalizer(self):
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        return getattr(backend, "normalizer", None)

    def at_least(self, text: str) -> int:
        n = len(self._normalizer.normalize_str(text)) if self._normalizer is not None else len(text)
        return -(-n // self.longest)

    async def exceeds(self, text: str, limit: int) -> int | None:
        """The bound on `text`'s tokens when it is over `limit`, else None. Only a text longer than
        `limit` x longest characters is normalized (off the event loop when it is long): normalization
        almost never lengthens text, and a text the bound lets through is still checked exactly when
        it is tokenized."""
        if len(text) <= max(limit, 0) * self.longest:
            return None
        n = await asyncio.to_thread(self.at_least, text) if len(text) > _NORMALIZE_OFF_LOOP else self.at_least(text)
        return n if n > limit else None


def max_line_bytes(context_tokens: int) -> int:
    """The default bound on an upstream stream line, from the guard's context: a line longer than this
    carries more answer than the guard could judge."""
    return BYTES_PER_TOKEN * context_tokens + LINE_OVERHEAD
