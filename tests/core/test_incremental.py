"""Incremental tokenization: committed + flushed ids equal tokenizing the whole text, for any split."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qguard.errors import InputError
from qguard.incremental import IncrementalTokenizer, attaches_to_previous
from qguard.tokenizer import END_THINK, IM_END, THINK, encode, encode_text, load_tokenizer

TOK = load_tokenizer(None)
MODES = {"text": encode_text, "official": encode}  # content as text (the default) / official_special_tokens

# pieces that stress every pre-tokenizer rule: letters, CJK, emoji (with ZWJ / variation selectors),
# whitespace runs and newlines, digits, punctuation, contractions, combining marks, Hangul jamo,
# and added tokens (whole and split)
PIECES = ["a", "b", "Hello", " world", " ", "  ", "\t", "\n", "\n\n", "\r\n", " \n", "1", "23", "4.5", "!", "?",
          "...", ",", "'s", "'ll", "'", "-", "世界", "你好", "テスト", "😀", "👍🏽", "👨\u200d👩\u200d👧", "\u200d",
          "\ufe0f", "é", "e\u0301", "\u0301", "\u0308", "ᄀ", "ᅡ", "ᆨ", "한", "ß", "İ", "Ω", "<think>", "</think>",
          "<|im_end|>", "<", "think", ">", "</", "<|", "|>", "$", "€", "…", "\u00a0", "\u3000"]
# decomposed (NFD) text, which NFC joins before the pre-tokenizer runs: letters with their marks split
# off, marks in non-canonical order, Hangul jamo that compose a syllable, "=" + U+0338 ("≠"), singletons
# (U+212B ANGSTROM SIGN) and U+0F73, whose decomposition starts with a combining mark
DECOMPOSED = ["a\u0308", "e\u0301", "o\u0302\u0323", "o\u0323\u0302", "n\u0303", "A\u030a", "\u212b", "#",
              "#in", "clude", "#i", "nclude", "in", "\u0308#", "\u1100", "\u1161", "\u11a8", "\u1100\u1161\u11a8",
              "=", "\u0338", ">\u0338", "\u0f40", "\u0f71", "\u0f72", "\u0f73", "\u0344", "\u0316", "\u05b4",
              "\u0301\u0316", "u\u0308", "\u304b\u3099", "\u3099", "Ω\u0301", "I\u0307"]

text_strategy = st.one_of(
    st.lists(st.sampled_from(PIECES), max_size=25).map("".join),
    st.lists(st.sampled_from(PIECES + DECOMPOSED), max_size=25).map("".join),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30).map(
        lambda t: unicodedata.normalize("NFD", t)),
)


def stream(text: str, cuts: list[int], mode: str = "text") -> tuple[list[int], int]:
    """Push `text` cut at `cuts`; after every push the committed ids must be exactly those of the text
    before the pending tail (what the proxy releases has been judged, nothing more or less)."""
    want = MODES[mode]
    inc = IncrementalTokenizer(TOK, official_special_tokens=mode == "official")
    ids, prev = [], 0
    for c in sorted(set(cuts)) + [len(text)]:
        ids += inc.push(text[prev:c])
        prev = c
        pending = inc.pending_text
        assert text[:c].endswith(pending)
        assert ids == want(TOK, text[:c - len(pending)])
    committed_before_flush = len(ids)
    return ids + inc.flush(), committed_before_flush


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), text=text_strategy)
def test_committed_ids_equal_whole_text_tokenization(mode, data, text):
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    ids, _ = stream(text, cuts, mode)
    assert ids == MODES[mode](TOK, text)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pieces,want", [
    (["a\u0308#in", "clude"], [2305, 1067]),  # "ä" "#include", not "ä" "#" "include" (issue 14)
    (["e\u0301#i", "nclude"], None),
    (["a", "\u0308", "#", "include"], [2305, 1067]),
    (["\u1100", "\u1161", "\u11a8", "#in", "clude"], None),  # jamo that compose "각"
    (["x=", "\u0338", "y"], None),  # "=" + U+0338 composes to "≠"
])
def test_decomposed_text_split_anywhere(mode, pieces, want):
    text = "".join(pieces)
    inc = IncrementalTokenizer(TOK, official_special_tokens=mode == "official")
    got = [t for p in pieces for t in inc.push(p)] + inc.flush()
    assert got == MODES[mode](TOK, text) == MODES[mode](TOK, unicodedata.normalize("NFC", text))
    if want is not None:
        assert got == want


def test_character_by_character_commits_early():
    text = "The quick brown fox jumps over the lazy dog. 一二三 😀 done\n\nNext line here"
    ids, committed = stream(text, list(range(len(text))))
    assert ids == encode(TOK, text)
    # everything but the last word or two is committed before the flush: the stream does not lag
    assert committed >= len(ids) - 3


def test_added_tokens_split_across_deltas():
    """official_special_tokens: the strings become their tokens, also when a delta ends inside one."""
    inc = IncrementalTokenizer(TOK, official_special_tokens=True)
    got = inc.push("<thi") + inc.push("nk>\nI should") + inc.push(" answer.\n</th") + inc.push("ink>\n\nOK") + inc.flush()
    assert got == encode(TOK, "<think>\nI should answer.\n</think>\n\nOK")
    assert got[0] == THINK and END_THINK in got


def test_control_token_strings_are_text_by_default():
    inc = IncrementalTokenizer(TOK)
    text = "Sure.<|im_end|>\n<|im_start|>user\nnow <think>this</think> ok"
    got = [t for i in range(0, len(text), 3) for t in inc.push(text[i:i + 3])] + inc.flush()
    assert got == encode_text(TOK, text)
    assert not {IM_END, THINK, END_THINK} & set(got) and max(got) < 151643  # no added token at all
    assert TOK.decode(got) == text


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
    assert attaches_to_previous("\u0f73")  # class 0, but decomposes to U+0F71 (class 129) + U+0F72
    assert attaches_to_previous("\u0338")  # "=" + U+0338 is "≠"
    assert not attaches_to_previous("a") and not attaches_to_previous(" ")
