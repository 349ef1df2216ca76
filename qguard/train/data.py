"""Training data for the Stream heads: canonical JSONL rows -> token ids + per-token labels.

The tech report trains the Stream heads with
- a query label at the user turn's `<|im_end|>` (the only position the query heads are read at), and
- a label at every response token: Safe before the first unsafe token, the sample's label from it on.

Where the first unsafe token is known (`unsafe_span` in the data, or a splice made here) we use it; the
report finds it with rollouts (see `qguard.train.labeling`); without either, the boundary is the first
response token. `splice` builds responses with a benign opening before unsafe text at a known boundary
(the cheap method that needs no LLM).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

# The row schema lives in qguard.data.schema; these names stay importable from here.
from qguard.data.schema import Row, expand_paths, guard_against_eval, parse_row, read_rows  # noqa: F401
from qguard.errors import InputError
from qguard.families.stream import stream_layout
from qguard.taxonomy import SEVERITIES, STREAM_CATEGORY_ORDER, Category, Severity
from qguard.tokenizer import IM_END, encode_text_offsets

RISK_INDEX = {s: i for i, s in enumerate(SEVERITIES)}  # Safe 0, Unsafe 1, Controversial 2 (config order)
QUERY_CATEGORIES: tuple[Category, ...] = STREAM_CATEGORY_ORDER  # 9 classes, Jailbreak last
RESPONSE_CATEGORIES: tuple[Category, ...] = STREAM_CATEGORY_ORDER[:8]
IGNORE = -100  # label of positions that carry no loss


# -------------------------------------------------------------------------------------------- labels

def token_labels(n_tokens: int, first_unsafe: int | None, label: Severity) -> list[int]:
    """Per-token risk indices: Safe before `first_unsafe`, `label` from it on (all Safe for Safe rows)."""
    if label is Severity.SAFE or first_unsafe is None or first_unsafe >= n_tokens:
        return [RISK_INDEX[Severity.SAFE]] * n_tokens
    b = max(0, first_unsafe)
    return [RISK_INDEX[Severity.SAFE]] * b + [RISK_INDEX[label]] * (n_tokens - b)


def category_target(cats: Sequence[Category], classes: Sequence[Category]) -> list[float] | None:
    """A soft target spread evenly over the row's categories, or None when it has none we can use."""
    idx = [classes.index(c) for c in cats if c in classes]
    if not idx:
        return None
    t = [0.0] * len(classes)
    for i in idx:
        t[i] += 1.0 / len(idx)
    return t


def first_token_at(offsets: Sequence[tuple[int, int]], char: int) -> int:
    """Index of the first token whose text reaches past `char` (the token holding that character)."""
    for i, (_, end) in enumerate(offsets):
        if end > char:
            return i
    return len(offsets)


# ------------------------------------------------------------------------------------------ examples

@dataclass
class Example:
    """One training sequence. Positions index `ids`; IGNORE marks positions without a label."""

    ids: list[int]
    query_pos: int = -1  # the user <|im_end|> (prompt rows), else -1
    query_label: int = IGNORE
    query_cat: list[float] | None = None
    resp_start: int = 0  # response tokens [resp_start, resp_start + len(resp_labels))
    resp_labels: list[int] = field(default_factory=list)
    resp_cat: list[float] | None = None
    row_id: str = ""


def _middle_cut(ids: list[int], limit: int, keep_tail: int) -> list[int]:
    """Shorten to `limit` tokens by dropping from the middle; keeps the start and the last `keep_tail`."""
    if len(ids) <= limit:
        return ids
    tail = min(keep_tail, limit - 1)
    return ids[: limit - tail] + ids[len(ids) - tail:]


def encode_row(tok, row: Row, max_len: int = 256, max_prompt: int = 96) -> Example:
    """Token ids and labels of one row, shortened to at most `max_len` tokens.

    Prompts lose tokens from the middle of the conversation (the start and the request's end often carry
    the intent). Responses keep at most `max_prompt` prompt tokens and the start of the answer: the
    per-token labels stay exact because they are cut together with the tokens.
    """
    lay = stream_layout(tok, list(row.messages))
    if row.task == "prompt":
        ids = _middle_cut(lay.ids[: lay.user_end + 1], max_len, keep_tail=max_len // 2)
        assert ids[-1] == IM_END
        return Example(ids=ids, query_pos=len(ids) - 1, query_label=RISK_INDEX[row.label],
                       query_cat=_cat_if_risky(row, QUERY_CATEGORIES), row_id=row.id)
    head = _middle_cut(lay.ids[: lay.answer_start], max_prompt, keep_tail=max_prompt // 2)
    answer = lay.ids[lay.answer_start: lay.answer_end]
    labels = token_labels(len(answer), _first_unsafe_token(tok, row, answer), row.label)
    room = max(1, max_len - len(head))
    return Example(ids=head + answer[:room], resp_start=len(head), resp_labels=labels[:room],
                   resp_cat=_cat_if_risky(row, RESPONSE_CATEGORIES), row_id=row.id)


def _cat_if_risky(row: Row, classes: Sequence[Category]) -> list[float] | None:
    # The report trains the category heads only where the gold risk is Unsafe or Controversial.
    return None if row.label is Severity.SAFE else category_target(row.categories, classes)


def _first_unsafe_token(tok, row: Row, answer_ids: list[int]) -> int | None:
    """Token index (in the answer) of the first unsafe token: from `unsafe_span`, else 0."""
    if row.label is Severity.SAFE:
        return None
    if row.unsafe_span is None:
        return 0
    content = row.text
    # The chat template drops leading newlines of the answer; shift the span by what it dropped.
    rendered = content.split("</think>")[-1].lstrip("\n")
    shift = len(content) - len(rendered)
    ids, offsets = encode_text_offsets(tok, rendered)  # content is text, as stream_layout encodes it
    if ids != list(answer_ids):
        return 0  # tokenised differently in context: fall back to the safe default (whole answer)
    return first_token_at(offsets, max(0, row.unsafe_span[0] - shift))


def encode_rows(tok, rows: Sequence[Row], max_len: int = 256, max_prompt: int = 96) -> list[Example]:
    return [encode_row(tok, r, max_len, max_prompt) for r in rows]


# ------------------------------------------------------------------------------------------ splicing

def splice(opening: str, unsafe: Row, sep: str = " ") -> Row:
    """A benign `opening` + `sep` + the unsafe response: the unsafe part starts at a known character.

    Keeps the unsafe row's prompt, label and categories; `unsafe_span` marks where its text begins (or,
    when the row has its own span, where that span begins inside the spliced text).
    """
    if unsafe.task != "response" or unsafe.label is Severity.SAFE:
        raise InputError(f"{unsafe.id}: splicing needs an Unsafe/Controversial response row")
    opening = opening.strip()
    if not opening:
        raise InputError("splice: empty opening")
    start = len(opening) + len(sep)
    text = opening + sep + unsafe.text
    s0, s1 = unsafe.unsafe_span or (0, len(unsafe.text))
    msgs = (*unsafe.messages[:-1], {"role": "assistant", "content": text})
    return replace(unsafe, id=unsafe.id + "+splice", messages=msgs, unsafe_span=(start + s0, start + s1))


def spliced_rows(openings: Sequence[str], unsafe: Sequence[Row], n: int, rng: random.Random) -> list[Row]:
    """`n` splices of random openings before random unsafe responses."""
    if not openings or not unsafe:
        raise InputError("splicing needs at least one benign opening and one unsafe response")
    return [splice(rng.choice(openings), rng.choice(unsafe), sep=rng.choice((" ", "\n\n", "\n"))) for _ in range(n)]


def is_refusal(text: str) -> bool:
    """A canned refusal ("I'm sorry, I can't..."): not usable as benign opening or informative answer."""
    t = text.lower()
    return any(k in t for k in ("i'm sorry", "i cannot", "i can't", "as an ai", "i am sorry"))


def with_prompt(row: Row, prompt: str) -> Row:
    """Give a response row without a user turn (e.g. toxic_spans comments) a user message before it."""
    if any(m["role"] == "user" for m in row.messages):
        return row
    return replace(row, messages=({"role": "user", "content": prompt}, *row.messages))
