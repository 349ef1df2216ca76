"""Incremental tokenization: committed + flushed ids equal tokenizing the whole text, for any split."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qguard.errors import InputError
from qguard.incremental import IncrementalTokenizer, attaches_to_previous
from qguard.tokenizer import END_THINK, THINK, encode, load_tokenizer

TOK = load_tokenizer(None)

# pieces that stress every pre-tokenizer rule: letters, CJK, emoji (with ZWJ / variation selectors),
# whitespace runs and newlines, digits, punctuation, contractions, combining marks, Hangul jamo,
# and added tokens (whole and split)
PIECES = ["a", "b", "Hello", " world", " ", "  ", "\t", "\n", "\n\n", "\r\n", " \n", "1", "23", "4.5", "!", "?",
          "...", ",", "'s", "'ll", "'", "-", "世界", "你好", "テスト", "😀", "👍🏽", "👨\u200d👩\u200d👧", "\u200d",
          "\ufe0f", "é", "e\u0301", "\u0301", "\u0308", "ᄀ", "ᅡ", "ᆨ", "한", "ß", "İ", "Ω", "<think>", "</think>",
          "<|im_end|>", "<", "think", ">", "</", "<|", "|>", "$", "€", "…", "\u00a0", "\u3000"]

text_strategy = st.one_of(
    st.lists(st.sampled_from(PIECES), max_size=25).map("".join),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30),
)


def stream(text: str, cuts: list[int]) -> tuple[list[int], int]:
    inc = IncrementalTokenizer(TOK)
    ids, prev = [], 0
    for c in sorted(set(cuts)) + [len(text)]:
        ids += inc.push(text[prev:c])
        prev = c
    committed_before_flush = len(ids)
    return ids + inc.flush(), committed_before_flush


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), text=text_strategy)
def test_committed_ids_equal_whole_text_tokenization(data, text):
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    ids, _ = stream(text, cuts)
    assert ids == encode(TOK, text)


def test_character_by_character_commits_early():
    text = "The quick brown fox jumps over the lazy dog. 一二三 😀 done\n\nNext line here"
    ids, committed = stream(text, list(range(len(text))))
    assert ids == encode(TOK, text)
    # everything but the last word or two is committed before the flush: the stream does not lag
    assert committed >= len(ids) - 3


def test_added_tokens_split_across_deltas():
    inc = IncrementalTokenizer(TOK)
    got = inc.push("<thi") + inc.push("nk>\nI should") + inc.push(" answer.\n</th") + inc.push("ink>\n\nOK") + inc.flush()
    assert got == encode(TOK, "<think>\nI should answer.\n</think>\n\nOK")
    assert got[0] == THINK and END_THINK in got


def test_held_text_and_errors():
    inc = IncrementalTokenizer(TOK)
    assert inc.push("Hello") == []  # a word may still grow
    assert inc.pending_text == "Hello"
    assert inc.push(" world") == encode(TOK, "Hello")
    with pytest.raises(InputError, match="must be str"):
        inc.push(b"bytes")
    inc.flush()
    with pytest.raises(InputError, match="already flushed"):
        inc.push("more")


def test_nfc_attachment_table():
    assert attaches_to_previous("\u0301")  # combining acute
    assert attaches_to_previous("ᅡ")  # Hangul vowel jamo composes with a leading consonant
    assert not attaches_to_previous("a") and not attaches_to_previous(" ")
