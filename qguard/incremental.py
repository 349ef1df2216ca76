"""Incremental tokenization of streamed text: commit only the token ids that later text cannot change.

An LLM that does not use Qwen3's tokenizer streams text deltas; the guard needs Qwen3 token ids, and the
ids of the whole text are not the concatenation of the ids of its pieces ("hel" + "lo" is not "hello").
`IncrementalTokenizer` keeps an uncommitted tail, re-tokenizes only that tail on each delta, and commits
the ids before the latest boundary that is provably stable; `flush` commits the rest at the end.
Invariant (property-tested): committed + flushed ids == tokenizing the whole text at once.

Why a boundary at text offset p is stable, whatever text follows (Qwen3's pipeline: added tokens are cut
out first, then NFC, then the pre-tokenizer regex splits the text into chunks, then byte-level BPE runs
inside each chunk):
- p is a chunk start and the chunk before it is complete: the regex scans left to right and each of its
  matches that ends at p depends only on text up to p's character, except runs of whitespace, whose
  split (`\\s+(?!\\S)`, `\\s*[\\r\\n]+`) depends on what ends the run; so p may not sit inside whitespace.
- the last chunk is never committed (more letters, digits of a contraction or punctuation may join it);
- no added token (`<think>`, `<|im_end|>`, ...) can still start before p and end after it;
- the character at p cannot combine with the one before it under NFC (combining marks, Hangul jamo and
  the second halves of canonical pairs are excluded), so NFC(head + rest) == NFC(head) + NFC(rest);
- and, checked directly, tokenizing head and tail apart gives the ids of the whole buffer.
Text deltas are `str`, so a UTF-8 sequence is never split; emoji and ZWJ sequences are whole chunks of
the regex's symbol class and stay in the tail until a later chunk starts. A JavaScript or JSON client can
still split a character into its two UTF-16 surrogates across deltas: a trailing high surrogate waits for
the next delta and the pair is joined; a surrogate with no partner is ill-formed text and becomes U+FFFD
(what a UTF-8 decoder with errors="replace" gives), so the stream goes on.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from functools import lru_cache

from qguard.errors import InputError
from qguard.tokenizer import encode, fix_surrogates

MAX_CANDIDATES = 4  # boundaries verified per delta before giving up (commit later instead)


@lru_cache(maxsize=1)
def _nfc_seconds() -> frozenset[str]:
    """Characters with combining class 0 that NFC can still merge into the character before them."""
    out = set()
    for cp in range(sys.maxunicode + 1):
        d = unicodedata.decomposition(chr(cp))
        if d and not d.startswith("<"):
            parts = d.split()
            if len(parts) == 2:
                out.add(chr(int(parts[1], 16)))
    out.update(chr(c) for c in range(0x1161, 0x1176))  # Hangul vowel jamo (L+V -> LV)
    out.update(chr(c) for c in range(0x11A8, 0x11C3))  # Hangul trailing jamo (LV+T -> LVT)
    return frozenset(out)


def attaches_to_previous(ch: str) -> bool:
    """True if NFC could merge `ch` with the character before it (or reorder it past it)."""
    return unicodedata.combining(ch) != 0 or ch in _nfc_seconds()


class IncrementalTokenizer:
    """Text deltas in, stable Qwen3 token ids out.

        inc = IncrementalTokenizer(tokenizer)
        ids = inc.push("Hel") + inc.push("lo wor") + inc.push("ld") + inc.flush()
        assert ids == tokenizer.encode("Hello world", add_special_tokens=False)
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pre = tokenizer.backend_tokenizer.pre_tokenizer
        added = sorted({t.content for t in tokenizer.added_tokens_decoder.values()}, key=len, reverse=True)
        self.added = added
        self.added_re = re.compile("|".join(re.escape(a) for a in added)) if added else None
        # every proper prefix of an added token: a buffer ending in one may still become that token
        self.added_prefixes = {a[:i] for a in added for i in range(1, len(a))}
        self.max_added = max((len(a) for a in added), default=0)
        self.tail = ""
        self.high = ""  # a high surrogate that ended the last delta, waiting for its low half
        self.n_committed = 0
        self.closed = False

    def push(self, delta: str) -> list[int]:
        """Add a text delta; returns the ids that became final (possibly none)."""
        if self.closed:
            raise InputError("this text stream was already flushed; start a new one")
        if not isinstance(delta, str):
            raise InputError(f"text deltas must be str, got {type(delta).__name__}")
        if not delta:
            return []
        delta, self.high = self.high + delta, ""
        if "\ud800" <= delta[-1] <= "\udbff":
            delta, self.high = delta[:-1], delta[-1]
        self.tail += fix_surrogates(delta)
        return self._commit() if self.tail else []

    def flush(self) -> list[int]:
        """End of text: commit everything still held."""
        if self.closed:
            return []
        self.closed = True
        self.tail += fix_surrogates(self.high)
        ids = encode(self.tokenizer, self.tail) if self.tail else []
        self.tail = ""
        self.n_committed += len(ids)
        return ids

    @property
    def pending_text(self) -> str:
        """Text received but not yet committed as ids."""
        return self.tail + self.high

    # ------------------------------------------------------------------------------------ internals

    def _commit(self) -> list[int]:
        text = self.tail
        limit = self._added_hold(text)
        candidates = [p for p in self._boundaries(text) if 0 < p <= limit and self._stable_at(text, p)]
        if not candidates:
            return []
        full = encode(self.tokenizer, text)
        for p in sorted(candidates, reverse=True)[:MAX_CANDIDATES]:
            head = encode(self.tokenizer, text[:p])
            if full[:len(head)] == head and encode(self.tokenizer, text[p:]) == full[len(head):]:
                self.tail = text[p:]
                self.n_committed += len(head)
                return head
        return []

    def _added_hold(self, text: str) -> int:
        """Offset from which the buffer's end may still grow into an added token."""
        for i in range(max(0, len(text) - self.max_added + 1), len(text)):
            if text[i:] in self.added_prefixes:
                return i
        return len(text)

    def _boundaries(self, text: str) -> list[int]:
        """Chunk starts (what follows the latest one stays held); added tokens' edges are hard boundaries."""
        out: list[int] = []
        pos = 0
        segments = []
        if self.added_re is not None:
            for m in self.added_re.finditer(text):
                segments.append((pos, m.start()))
                out += [m.start(), m.end()]
                pos = m.end()
        segments.append((pos, len(text)))
        for a, b in segments:
            if a == b:
                continue
            # the start of the last chunk is a boundary too: the chunk before it is complete
            out += [a + s for _, (s, _) in self.pre.pre_tokenize_str(text[a:b])]
        return out

    def _stable_at(self, text: str, p: int) -> bool:
        if p == len(text):  # only reached right after a complete added token (see _boundaries)
            return True
        if text[p - 1].isspace() and text[p].isspace():
            return False
        return not attaches_to_previous(text[p])
