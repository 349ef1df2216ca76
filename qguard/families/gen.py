"""The Qwen3Guard-Gen format: the guard prompt, the answer grammar and its token ids, the strict parser,
the answer drafts, and a Gen result read into a `Verdict`. Every Gen reader and writer (the torch engine,
the vLLM backend, the trainer) takes its format knowledge from here, so they cannot drift apart.

The answer is `Safety: <label>\\nCategories: <names or None>[\\nRefusal: Yes|No]` (spec section 2).
Rendering is byte-exact with the official chat template (tests compare against spec/reference). No engine
and no runtime here; the model classes are imported only to build one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from qguard.errors import CheckpointError, InputError
from qguard.messages import Message, check_messages
from qguard.policy import Policy, Verdict
from qguard.taxonomy import SEVERITY_KEYS, Category, Severity
from qguard.tokenizer import ASSETS, ENDOFTEXT, IM_END, encode, prepare_chat

if TYPE_CHECKING:
    import torch

    from qguard.model.gen import GenGuardModel
    from qguard.model.qwen3 import Qwen3Config
    from qguard.weights import Checkpoint

ARCHITECTURE = "Qwen3ForCausalLM"

# Token ids of the answer's fixed parts (spec section 2); tests pin them against the tokenizer.
SAFETY, COLON = 73037, 25
SEVERITY_FIRST_TOKEN = {Severity.SAFE: 22291, Severity.UNSAFE: 73067, Severity.CONTROVERSIAL: 2093}
CATEGORIES_PREFIX = (20970, 25)  # "Categories", ":"
REFUSAL_PREFIX = (3945, 35414, 25)  # "Ref", "usal", ":"
YES, NO = 7414, 2308
STOP = (IM_END, ENDOFTEXT)
# Answer budget: the longest well-formed answer (a response in every category, then "Refusal: ...") is
# 48 tokens; a smaller budget would cut it and lose categories (the official eval uses 128)
GEN_MAX_NEW_TOKENS = 64
GUARD_TEMPLATE_MARKER = "<BEGIN UNSAFE CONTENT CATEGORIES>"
# The instruction text before the conversation ends here: the prefix every request of a target shares
CONVERSATION_MARK = "<BEGIN CONVERSATION>\n\n"
# The guard chat template qguard writes into the Gen checkpoints it makes (the official ones carry theirs)
CHAT_TEMPLATE = ASSETS / "qwen3guard_gen_template.jinja"


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


def read_answer(text: str, target: str) -> tuple[GenAnswer | None, str | None]:
    """(answer, None) for a well-formed answer, else (None, the error a Verdict carries)."""
    try:
        return parse_answer(text, target), None
    except ParseError as e:
        return None, f"unparseable guard answer: {e}"


def answer_segments(label: Severity, categories: Sequence[Category], refusal: bool | None,
                    target: str) -> list[tuple[str, bool]]:
    """The answer a trainer teaches, as (text, trained?) pieces: a field the data does not know (no
    categories on an Unsafe row, an unknown refusal) keeps a placeholder that carries no loss."""
    cats = ", ".join(c.value for c in categories)
    if label is Severity.SAFE:
        cat_seg = ("None", True)
    else:  # an Unsafe row without categories: a placeholder that carries no loss
        cat_seg = (cats, True) if cats else ("None", False)
    segs = [("Safety: " + label.value, True), ("\nCategories: ", True), cat_seg]
    if target == "response":
        segs += [("\nRefusal: ", True), ("Yes" if refusal else "No", refusal is not None)]
    return segs


# ------------------------------------------------------------------------------------- answer tokens

def first_token_ids(tokenizer) -> dict[str, int]:
    """First token of " <name>" for None and every category (all distinct in the Qwen3 vocabulary)."""
    ids = {"None": encode(tokenizer, " None")[0]}
    for c in Category:
        ids[c.value] = encode(tokenizer, " " + c.value)[0]
    return ids


def target_categories(first: dict[str, int], target: str) -> dict[str, int]:
    """The category answers a target allows, for the softmax over them: a response cannot be Jailbreak
    (spec section 1), so its probability mass is not handed to a label that cannot be given."""
    return first if target == "prompt" else {k: t for k, t in first.items() if k != Category.JAILBREAK.value}


def find_after(seq: Sequence[int], pattern: Sequence[int]) -> int | None:
    """Index just after the first occurrence of `pattern` in `seq` (where the label after a prefix such
    as "Categories:" is read)."""
    n = len(pattern)
    for i in range(len(seq) - n + 1):
        if tuple(seq[i : i + n]) == tuple(pattern):
            return i + n
    return None


def answer_drafts(tokenizer, target: str) -> list[list[int]]:
    """Token ids of every single-category well-formed answer (+ stop token), most likely first.

    Only a guess list: a wrong guess costs one more verification step, never a different answer.
    """
    cats = [c.value for c in Category if target == "prompt" or c is not Category.JAILBREAK]
    refusals = ["No", "Yes"] if target == "response" else [None]
    out = []
    for sev in SEVERITY_KEYS:
        for cat in (["None", *cats] if sev == Severity.SAFE.value else [*cats, "None"]):
            for ref in refusals:
                text = f"Safety: {sev}\nCategories: {cat}" + (f"\nRefusal: {ref}" if ref else "")
                out.append(encode(tokenizer, text) + [IM_END])
    return out


# -------------------------------------------------------------------------------------------- verdict

def verdict(policy: Policy, answer: GenAnswer | None, error: str | None, *, text: str,
            severity_probs: dict[str, float] | None, category_probs: dict[str, float] | None,
            refusal_prob: float | None, n_tokens: int) -> Verdict:
    """A Gen result under `policy`: the one place an answer (or its parse error) becomes a Verdict. An
    answer that could not be read is never Safe (`Policy.error_verdict`)."""
    if answer is None:
        return policy.error_verdict(error, raw_output=text, probs=severity_probs, n_tokens=n_tokens)
    return policy.verdict(answer.severity, answer.categories, refusal=answer.refusal, probs=severity_probs,
                          category_probs=category_probs, refusal_prob=refusal_prob, n_tokens=n_tokens)


# ------------------------------------------------------------------------------------------ checkpoint

def matches(config: dict[str, Any]) -> bool:
    """A Gen checkpoint's config.json: a Qwen3 causal LM (the registry asks Stream first)."""
    return ARCHITECTURE in (config.get("architectures") or [])


def config_dict(cfg: Qwen3Config, dtype: str) -> dict[str, Any]:
    """config.json of a Gen checkpoint in the official layout (Qwen3ForCausalLM)."""
    c = cfg
    return {
        "architectures": [ARCHITECTURE], "model_type": "qwen3", "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings, "attention_bias": c.attention_bias, "attention_dropout": 0.0,
        "hidden_act": "silu", "torch_dtype": dtype, "bos_token_id": 151643, "eos_token_id": 151645,
    }


def build_model(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> GenGuardModel:
    """The Gen LM of `ckpt` on `device`, strictly loaded, in its fused inference form (`.train()`
    restores the plain one)."""
    import torch

    from qguard.model.gen import GenGuardModel
    from qguard.model.qwen3 import Qwen3Config
    from qguard.weights import load_weights

    if not matches(ckpt.config):
        raise CheckpointError(f"{ckpt.path} is not a Qwen3Guard-Gen checkpoint "
                              f"(architectures {ckpt.config.get('architectures')!r})")
    config = dict(ckpt.config)
    if config.get("tie_word_embeddings") is None:  # transformers' default is untied: read the tensors
        config["tie_word_embeddings"] = not ckpt.has_tensor("lm_head.weight")
    cfg = Qwen3Config.from_dict(config)
    with torch.device("meta"):
        model = GenGuardModel(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    if cfg.tie_word_embeddings:  # to_empty breaks the tie; restore it before loading
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.reset()
    tied = {"lm_head.weight": "model.embed_tokens.weight"} if cfg.tie_word_embeddings else None
    load_weights(model, ckpt, tied=tied)
    return model.to(device).fuse_for_inference()


def fold_temperature(model: GenGuardModel, temperature: float) -> None:
    """Fold a calibration temperature into the model, in place. One LM head gives every label, so Gen has
    one temperature, folded into the final norm's weight: lm_head(norm(h) / T) = logits / T (greedy
    answers stay the same; category and refusal probabilities are tempered alike)."""
    import torch

    with torch.no_grad():
        model.model.norm.weight.div_(temperature)
