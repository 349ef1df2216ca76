"""Map a gold `unsafe_span` (characters of the assistant message) onto answer-token indices.

Latency is measured in the answer tokens of `qguard.families.stream.stream_layout` (the runner shifts the
Guard's `unsafe_position`, which counts moderated reasoning tokens first, into that frame): the tokens
after `</think>\\n\\n`. The chat template renders the answer as a suffix of the message
content (it drops leading newlines and any reasoning before `</think>`), and stream_layout encodes that
suffix on its own, so encoding the same suffix with offsets gives the same tokens with their characters.
The facade has no such mapping; it lives here.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

from qguard.errors import InputError
from qguard.families.stream import stream_layout
from qguard.messages import Message
from qguard.tokenizer import encode_text_offsets


def answer_offsets(tokenizer, messages: Sequence[Message], *,
                   official_special_tokens: bool = False) -> tuple[int, list[tuple[int, int]]]:
    """(shift, offsets): the answer starts at character `shift` of the last message; `offsets[j]` is
    the character range of answer token j inside the answer text (tokenized as the guard does: content
    as text unless `official_special_tokens`)."""
    lay = stream_layout(tokenizer, messages, official_special_tokens=official_special_tokens)
    content = messages[-1]["content"]
    ids = lay.ids[lay.answer_start:lay.answer_end]
    # The answer is the suffix of `content` that the template keeps; find how much was dropped.
    enc = None
    for shift in _candidate_shifts(content):
        if official_special_tokens:
            enc = tokenizer(content[shift:], add_special_tokens=False, return_offsets_mapping=True)
            got, offsets = enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
        else:
            got, offsets = encode_text_offsets(tokenizer, content[shift:])
        if got == ids:
            return shift, offsets
    raise InputError("cannot align the answer tokens with the message text (unusual chat template?)")


def _candidate_shifts(content: str) -> list[int]:
    """Where the rendered answer may start: after the last `</think>` and leading newlines, or at 0."""
    starts = []
    cut = content.rfind("</think>")
    base = cut + len("</think>") if cut >= 0 else 0
    stripped = len(content) - len(content[base:].lstrip("\n"))
    starts.append(stripped)
    if stripped != 0:
        starts.append(0)
    return starts


def char_to_token(offsets: Sequence[tuple[int, int]], char: int) -> int:
    """Index of the token that holds character `char` (the first token ending after it).

    Byte-level BPE can split one character over two tokens (both report its range): the first wins,
    the moment its text starts streaming. A character past the last token maps to the last token.
    """
    if not offsets:
        raise InputError("the answer has no tokens")
    ends = [e for _, e in offsets]
    j = bisect_right(ends, char)
    return min(j, len(offsets) - 1)


def span_to_tokens(tokenizer, messages: Sequence[Message], span: tuple[int, int], *,
                   official_special_tokens: bool = False) -> tuple[int, int]:
    """Inclusive (first, last) answer-token indices covering gold characters [start, end)."""
    shift, offsets = answer_offsets(tokenizer, messages, official_special_tokens=official_special_tokens)
    start = max(span[0] - shift, 0)  # a span opening in dropped text starts with the answer
    last_char = max(span[1] - 1 - shift, start)
    return char_to_token(offsets, start), char_to_token(offsets, last_char)
