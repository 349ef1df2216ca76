"""OpenAI's moderation API (`POST /v1/moderations`) in qguard's terms: request `input` -> conversations,
verdicts -> OpenAI's response shape. Pure: no model, no engine, no HTTP.

    req = parse_moderation_request(body)                    # InputError naming what is wrong
    verdicts = guard.classify_conversations(req.conversations)   # one batched guard call (the caller's)
    moderation_response(verdicts, model="Qwen3Guard-Stream-0.6B")  # parses as openai's ModerationCreateResponse

**Input.** A string is one text, a list of strings one text each (one result each), a list of content
parts (`{"type": "text", "text": ...}`, `{"type": "image_url", ...}`) one text made of its text parts
joined by newlines (one result, as OpenAI does). Each text is judged as a user prompt (prompt moderation,
so Jailbreak can be found). Image parts are accepted and not read (a text guard): every scored category's
`category_applied_input_types` is `["text"]`, which tells the client so; an input of images alone is an
error, as are other part types, empty texts and a list mixing strings and parts.

**Categories.** Each Qwen3Guard category maps onto the broadest OpenAI key it covers (`CATEGORY_MAP`):

| Qwen3Guard | OpenAI key |
|---|---|
| Violent | `violence` |
| Sexual Content or Sexual Acts | `sexual` |
| Suicide & Self-Harm | `self-harm` |
| Non-violent Illegal Acts | `illicit` |
| Unethical Acts (bias, hate speech, harassment, threats, ...) | `harassment` |
| PII, Copyright Violation, Politically Sensitive Topics, Jailbreak | none (in `qguard` only) |

The narrower OpenAI keys (`violence/graphic`, `sexual/minors`, `self-harm/intent`, `self-harm/instructions`,
`illicit/violent`, `hate`, `hate/threatening`, `harassment/threatening`) are claims Qwen3Guard's taxonomy
cannot make: they are always false with score 0.0 and `category_applied_input_types` `[]` (no input type
was scored for them). Every OpenAI key is present in every result.

**Values.** `categories[key]`: the verdict is Unsafe under its mode (strict: Controversial counts) and
names the key's category. `category_scores[key]` = P(unsafe under the mode) x q(category), where q is the
verdict's `category_probs` entry (Stream: the category head's softmax at the deciding token; Gen: the
probability of the category as the first one after "Categories:"), or, where the engine gave no category
probabilities, 1 for the categories the verdict names and 0 for the others; without probabilities at all,
P(unsafe) is 1 for an Unsafe verdict and 0 otherwise. `flagged` follows the policy: true unless the
action is allow (block and flag both flag; so does a Gen answer that could not be read). Each result
carries the whole verdict (`Verdict.to_dict()`) in `qguard`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qguard.errors import InputError
from qguard.messages import Message, check_turn
from qguard.policy import Action, Policy, Verdict
from qguard.taxonomy import Category, Severity

__all__ = ["CATEGORY_MAP", "CHAT_NON_TEXT_PARTS", "OPENAI_CATEGORIES", "SCORED_CATEGORIES", "ModerationRequest",
           "content_text", "moderation_conversations", "moderation_response", "moderation_result",
           "parse_moderation_request"]

# Every key of OpenAI's `categories` / `category_scores` / `category_applied_input_types`, in its order.
OPENAI_CATEGORIES: tuple[str, ...] = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
    "self-harm", "self-harm/instructions", "self-harm/intent", "sexual", "sexual/minors", "violence",
    "violence/graphic",
)
CATEGORY_MAP: dict[Category, str | None] = {
    Category.VIOLENT: "violence",
    Category.SEXUAL: "sexual",
    Category.SELF_HARM: "self-harm",
    Category.NON_VIOLENT_ILLEGAL: "illicit",
    Category.UNETHICAL: "harassment",
    Category.PII: None,
    Category.COPYRIGHT: None,
    Category.POLITICAL: None,
    Category.JAILBREAK: None,
}
# OpenAI key -> the Qwen3Guard category scored for it
SCORED_CATEGORIES: dict[str, Category] = {key: cat for cat, key in CATEGORY_MAP.items() if key is not None}

MODERATION_NON_TEXT_PARTS = frozenset({"image_url"})  # the part types OpenAI's moderation input has besides text
# chat content parts a text guard does not read (what qguard's proxy also passes unread)
CHAT_NON_TEXT_PARTS = frozenset({"image_url", "input_audio", "file", "video_url", "audio_url"})


# ------------------------------------------------------------------------------------------------ input

def content_text(content: Any, where: str = "content", *, non_text: Iterable[str] = CHAT_NON_TEXT_PARTS,
                 refusal_parts: bool = True) -> str:
    """The text of an OpenAI `content`: a string, or the text parts of a list joined by newlines (and
    `refusal` parts' refusals, when `refusal_parts`). Parts of a `non_text` type carry nothing a text guard
    reads and are skipped; any other part type is an InputError naming it (never passed unread)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InputError(f"{where} must be text or a list of content parts, got {type(content).__name__}")
    skip = frozenset(non_text)
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
            raise InputError(f"{where}[{i}] must be a content part: an object with a 'type' such as 'text'")
        kind = part["type"]
        if kind == "text" or (kind == "refusal" and refusal_parts):
            field = "text" if kind == "text" else "refusal"
            text = part.get(field)
            if not isinstance(text, str):
                raise InputError(f"{where}[{i}].{field} must be text, got {type(text).__name__}")
            texts.append(text)
        elif kind not in skip:
            readable = "'text'" + (" or 'refusal'" if refusal_parts else "")
            unread = f"; {', '.join(sorted(skip))} parts are accepted and not read" if skip else ""
            raise InputError(f"{where}[{i}]: content parts of type {kind[:40]!r} are not read; use {readable}"
                             f"{unread}")
    if content and not texts:
        raise InputError(f"{where} has no text part: a text guard reads only text (image and other media parts "
                         "are not read)")
    return "\n".join(texts)


def _prompt(text: str, where: str) -> list[Message]:
    if not text.strip():
        raise InputError(f"{where}: empty text, nothing to moderate")
    try:
        return check_turn([{"role": "user", "content": text}])
    except InputError as e:
        raise InputError(f"{where}: {e}") from None


def moderation_conversations(value: Any, *, max_inputs: int | None = None) -> list[list[Message]]:
    """OpenAI's moderation `input` as the conversations to judge, one per result (see the module doc)."""
    if isinstance(value, str):
        return [_prompt(value, "input")]
    if not isinstance(value, list):
        raise InputError(f"input must be a string, a list of strings or a list of content parts, got "
                         f"{type(value).__name__}")
    if not value:
        raise InputError("input is an empty list: nothing to moderate")
    if all(isinstance(x, str) for x in value):
        if max_inputs is not None and len(value) > max_inputs:
            raise InputError(f"input has {len(value)} texts; at most {max_inputs} per request")
        return [_prompt(x, f"input[{i}]") for i, x in enumerate(value)]
    if all(isinstance(x, Mapping) for x in value):
        text = content_text(value, "input", non_text=MODERATION_NON_TEXT_PARTS, refusal_parts=False)
        return [_prompt(text, "input")]
    kinds = sorted({type(x).__name__ for x in value})
    raise InputError(f"input must be a list of strings or a list of content parts, not a mix ({', '.join(kinds)})")


@dataclass(frozen=True)
class ModerationRequest:
    """A `/v1/moderations` request body, checked: the conversations to judge and the requested model."""

    conversations: list[list[Message]]
    model: str | None = None


REQUEST_KEYS = ("input", "model")


def parse_moderation_request(body: Any, *, max_inputs: int | None = None) -> ModerationRequest:
    """A JSON request body (`{"input": ..., "model": ...}`) -> ModerationRequest; InputError otherwise."""
    if not isinstance(body, Mapping):
        raise InputError(f"the request body must be a JSON object with 'input', got {type(body).__name__}")
    unknown = [k for k in body if k not in REQUEST_KEYS]
    if unknown:
        raise InputError(f"unknown request field {str(unknown[0])[:40]!r}; a moderation request has "
                         f"{' and '.join(REQUEST_KEYS)}")
    if "input" not in body:
        raise InputError("the request has no 'input' (a string, a list of strings or a list of content parts)")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InputError(f"model must be a string, got {type(model).__name__}")
    return ModerationRequest(moderation_conversations(body["input"], max_inputs=max_inputs), model)


# ----------------------------------------------------------------------------------------------- output

def _unsafe_prob(v: Verdict) -> float:
    if v.probs is None:
        return 1.0 if v.is_unsafe else 0.0
    return float(Policy(mode=v.mode).unsafe_prob(v.probs))


def _category_share(v: Verdict, cat: Category) -> float:
    if v.category_probs is None:
        return 1.0 if cat in v.categories else 0.0
    return float(v.category_probs.get(cat.value, 0.0))


def moderation_result(v: Verdict) -> dict[str, Any]:
    """One OpenAI `Moderation` object for a verdict (see the module doc), with `qguard`: the verdict."""
    if not isinstance(v, Verdict):
        raise InputError(f"moderation_result takes a qguard Verdict, got {type(v).__name__}")
    unsafe = v.binary is Severity.UNSAFE
    p = _unsafe_prob(v)
    categories, scores, applied = {}, {}, {}
    for key in OPENAI_CATEGORIES:
        cat = SCORED_CATEGORIES.get(key)
        categories[key] = cat is not None and unsafe and cat in v.categories
        scores[key] = min(1.0, max(0.0, p * _category_share(v, cat))) if cat is not None else 0.0
        applied[key] = ["text"] if cat is not None else []
    return {"flagged": v.action is not Action.ALLOW, "categories": categories, "category_scores": scores,
            "category_applied_input_types": applied, "qguard": v.to_dict()}


def moderation_response(verdicts: Sequence[Verdict], model: str, *, id: str | None = None) -> dict[str, Any]:
    """OpenAI's `ModerationCreateResponse` for the verdicts of one request, in input order."""
    if not isinstance(model, str) or not model:
        raise InputError("model must be the name of the guard model that judged the input")
    return {"id": id or f"modr-{uuid.uuid4().hex}", "model": model,
            "results": [moderation_result(v) for v in verdicts]}
