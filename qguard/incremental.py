"""Incremental tokenization of streamed text: commit only the token ids that later text cannot change.

An LLM that does not use Qwen3's tokenizer streams text deltas; the guard needs Qwen3 token ids, and the
ids of the whole text are not the concatenation of the ids of its pieces ("hel" + "lo" is not "hello").
`IncrementalTokenizer` keeps an uncommitted tail, re-tokenizes only that tail on each delta, and commits
the ids before the latest boundary that is provably stable; `flush` commits the rest at the end.
Invariant (property-tested, decomposed Unicode included): committed + flushed ids == tokenizing the
whole text at once, and the committed ids are exactly the ids of `text[:len(text) - len(pending_text)]`.

The text is content (`qguard.tokenizer.encode_text`): "<|im_end|>" or "<think>" in it are ordinary
tokens. With `official_special_tokens=True` (unsafe for untrusted text) added-token strings become their
control tokens, as the official tokenizer does.

Why a boundary at text offset p is stable, whatever text follows (Qwen3's pipeline: added tokens are cut
out first when they are matched at all, then NFC, then the pre-tokenizer regex splits the normalised text
into chunks, then byte-level BPE runs inside each chunk):
- the character at p cannot combine with the one before it under NFC (combining marks, characters whose
  decomposition starts with one, Hangul jamo and the second halves of canonical pairs are excluded), so
  NFC(head + rest) == NFC(head) + NFC(rest): the committed ids are those of the raw prefix text[:p], and
  no committed token spans a character that is still pending;
- the boundary is read on the NORMALISED text, where the pre-tokenizer runs ("a\\u0308#include" is
  "ä" + "#include" once NFC has joined the "a" and its diaeresis, but "a", "\\u0308#", "include" before):
  NFC(head) ends where a chunk of the normalised buffer starts, and the chunk before it is complete: the
  regex scans left to right and each of its matches that ends there depends only on text up to the
  character that follows, except runs of whitespace, whose split (`\\s+(?!\\S)`, `\\s*[\\r\\n]+`) depends
  on what ends the run; so p may not sit inside whitespace;
- that following character is final: a later character of the buffer starts a new NFC piece, so no
  delta can still compose into it;
- the last chunk is never committed (more letters, digits of a contraction or punctuation may join it);
- no added token (`<think>`, `<|im_end|>`, ...; official mode only) can still start before p and end
  after it;
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
from collections.abc import Iterator
from functools import lru_cache

from qguard.errors import InputError
from qguard.messages import fix_surrogates
from qguard.tokenizer import encode, text_tokenizer

MAX_CANDIDATES = 4  # boundaries verified per delta before giving up (commit later instead)


@lru_cache(maxsize=1)
def _nfc_seconds() -> frozenset[str]:
    """Characters with combining class 0 that NFC can still merge into (or reorder past) the character
    before them: second halves of canonical pairs, Hangul jamo that join a syllable, and characters whose
    decomposition starts with a non-starter or such a second half (U+0F73 is U+0F71 U+0F72)."""
    seconds, decomposed = set(), []
    for cp in range(sys.maxunicode + 1):
        d = unicodedata.decomposition(chr(cp))
        if d and not d.startswith("<"):
            decomposed.append(chr(cp))
            parts = d.split()
            if len(parts) == 2:
                seconds.add(chr(int(parts[1], 16)))
    seconds.update(chr(c) for c in range(0x1161, 0x1176))  # Hangul vowel jamo (L+V -> LV)
    seconds.update(chr(c) for c in range(0x11A8, 0x11C3))  # Hangul trailing jamo (LV+T -> LVT)
    for ch in decomposed:
        first = unicodedata.normalize("NFD", ch)[0]
        if unicodedata.combining(first) or first in seconds:
            seconds.add(ch)
    return frozenset(seconds)


def attaches_to_previous(ch: str) -> bool:
    """True if NFC could merge `ch` with the character before it (or reorder it past it)."""
    return unicodedata.combining(ch) != 0 or ch in _nfc_seconds()


class IncrementalTokenizer:
    """Text deltas in, stable Qwen3 token ids out.

        inc = IncrementalTokenizer(tokenizer)
        ids = inc.push("Hel") + inc.push("lo wor") + inc.push("ld") + inc.flush()
        assert ids == encode_text(tokenizer, "Hello world")
    """

    def __init__(self, tokenizer, *, official_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.official_special_tokens = official_special_tokens
        backend = tokenizer.backend_tokenizer
        self.pre, self.norm = backend.pre_tokenizer, backend.normalizer
        self._text = None if official_special_tokens else text_tokenizer(tokenizer)
        added = []
        if official_special_tokens:  # only then are added-token strings cut out of the text
            added = sorted({t.content for t in tokenizer.added_tokens_decoder.values()}, key=len,
                           reverse=True)
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
        ids = self.encode(self.tail) if self.tail else []
        self.tail = ""
        self.n_committed += len(ids)
        return ids

    @property
    def pending_text(self) -> str:
        """Text received but not yet committed as ids (the committed ids are those of all text before it)."""
        return self.tail + self.high

    def encode(self, text: str) -> list[int]:
        """Whole-text ids in this stream's mode (what committed + flushed ids add up to)."""
        if self._text is None:
            return encode(self.tokenizer, text)
        return self._text.encode(text, add_special_tokens=False).ids

    # ------------------------------------------------------------------------------------ internals

    def _commit(self) -> list[int]:
        text = self.tail
        candidates = self._boundaries(text, self._added_hold(text))
        if not candidates:
            return []
        full = self.encode(text)
        for p in candidates:
            head = self.encode(text[:p])
            if full[:len(head)] == head and self.encode(text[p:]) == full[len(head):]:
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

    def _boundaries(self, text: str, limit: int) -> list[int]:
        """The latest MAX_CANDIDATES stable commit points in (0, limit], latest first: chunk starts (what
        follows the latest one stays held); a complete added token's edges are hard boundaries (the
        tokenizer cuts it out before normalising). Work stays near the end of the buffer, so one huge
        delta costs the tokenizer's passes over it and little Python."""
        out: set[int] = set()
        pos = 0
        segments = []
        if self.added_re is not None:
            for m in self.added_re.finditer(text):
                segments.append((pos, m.start()))
                out.update((m.start(), m.end()))
                pos = m.end()
        segments.append((pos, len(text)))
        for a, b in segments:
            if a < b and a < limit:
                out.update(a + p for p in self._chunk_starts(text[a:b], b == len(text), limit - a))
        return sorted((p for p in out if 0 < p <= limit), reverse=True)[:MAX_CANDIDATES]

    def _chunk_starts(self, seg: str, open_end: bool, cap: int) -> list[int]:
        """Up to MAX_CANDIDATES offsets p <= cap of raw `seg` (no added token in it), latest first, where a
        pre-tokenizer chunk of NFC(seg) starts at NFC(seg[:p]) and stays a chunk start whatever follows
        (see the module docstring). `open_end`: more text may still follow `seg`."""
        norm = self._normalize(seg)
        if open_end:
            # the last NFC piece may still grow: the boundary before it must wait (its first character
            # may compose with a later delta and change how the chunk before it ends)
            last = len(seg) - 1
            while last > 0 and attaches_to_previous(seg[last]):
                last -= 1
            cap = min(cap, last - 1)
        splits = None if norm == seg else self._nfc_splits(seg, norm)
        at = (len(norm), len(seg))  # the current (normalised, raw) split of `splits`
        out: list[int] = []
        for _, (q, _) in reversed(self.pre.pre_tokenize_str(norm)):
            if q == 0 or len(out) == MAX_CANDIDATES:
                break
            if norm[q - 1].isspace() and norm[q].isspace():
                continue
            if splits is None:
                p = q
                if attaches_to_previous(seg[p]):
                    continue
            else:
                while at[0] > q:
                    at = next(splits, (-1, -1))
                if at[0] != q:  # q falls inside one NFC piece (or past what the tables can map)
                    continue
                p = at[1]
            if p <= cap:
                out.append(p)
        return out

    def _normalize(self, text: str) -> str:
        return self.norm.normalize_str(text) if self.norm is not None else text

    def _nfc_splits(self, seg: str, norm: str) -> Iterator[tuple[int, int]]:
        """(offset in NFC(seg), offset in seg) before each character of `seg` that does not attach to the
        one before it, from the end. Stops where normalising the pieces apart no longer rebuilds `norm`
        (a character this Python's Unicode tables do not know): nothing before it is committed then."""
        i, q = len(seg), len(norm)
        for j in range(len(seg) - 1, -1, -1):
            if j and attaches_to_previous(seg[j]):
                continue
            piece = self._normalize(seg[j:i])
            if not norm.endswith(piece, 0, q):
                return
            q, i = q - len(piece), j
            yield q, i
