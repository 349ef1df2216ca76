"""Gen classification: greedy answer + probabilities, one conversation at a time.

Probabilities come from the same forward passes as the greedy answer:
- severity: softmax over the first tokens of " Safe", " Unsafe", " Controversial" at the label position
  (after "Safety:"), i.e. the model's distribution renormalised to the three labels;
- categories: softmax over the first tokens of " None" and each category name after "Categories:",
  the probability of each name being listed first;
- refusal: P(" Yes") / (P(" Yes") + P(" No")) after "Refusal:".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qguard.engine.kvcache import ContiguousCache
from qguard.errors import InputError
from qguard.model.gen import (
    COLON,
    SAFETY,
    SEVERITY_FIRST_TOKEN,
    GenAnswer,
    GenGuardModel,
    ParseError,
    moderation_target,
    parse_answer,
    render_with_tokenizer,
)
from qguard.policy import Category
from qguard.tokenizer import ENDOFTEXT, IM_END, Message, check_messages, encode

CATEGORIES_PREFIX = (20970, 25)  # "Categories", ":"
REFUSAL_PREFIX = (3945, 35414, 25)  # "Ref", "usal", ":"
YES, NO = 7414, 2308


@dataclass
class GenResult:
    text: str
    answer: GenAnswer | None
    error: str | None
    severity_probs: dict[str, float]
    category_probs: dict[str, float] | None
    refusal_prob: float | None
    n_tokens: int
    target: str


def first_token_ids(tokenizer) -> dict[str, int]:
    """First token of " <name>" for None and every category (all distinct in the Qwen3 vocabulary)."""
    ids = {"None": encode(tokenizer, " None")[0]}
    for c in Category:
        ids[c.value] = encode(tokenizer, " " + c.value)[0]
    return ids


def _find(seq: Sequence[int], pattern: Sequence[int]) -> int | None:
    """Index just after the first occurrence of `pattern` in `seq`."""
    n = len(pattern)
    for i in range(len(seq) - n + 1):
        if tuple(seq[i : i + n]) == tuple(pattern):
            return i + n
    return None


class GenEngine:
    def __init__(self, model: GenGuardModel, tokenizer, max_new_tokens: int = 32):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.device = next(model.parameters()).device
        self.max_len = model.config.max_position_embeddings
        self.cat_first = first_token_ids(tokenizer)

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        ids = encode(self.tokenizer, render_with_tokenizer(self.tokenizer, messages))
        if len(ids) + self.max_new_tokens > self.max_len:
            raise InputError(
                f"conversation is {len(ids)} tokens; with {self.max_new_tokens} answer tokens it exceeds the "
                f"model's context of {self.max_len} tokens. Shorten it (qguard does not silently truncate)."
            )
        return ids

    @torch.inference_mode()
    def greedy(self, ids: list[int]) -> tuple[list[int], list[torch.Tensor]]:
        """Greedy answer tokens and the logits that chose each of them (plus the one after the last)."""
        cache = ContiguousCache(self.model.config.num_hidden_layers)
        x = torch.tensor([ids], device=self.device)
        pos = torch.arange(len(ids), device=self.device)[None]
        out: list[int] = []
        step_logits: list[torch.Tensor] = []
        for _ in range(self.max_new_tokens):
            logits = self.model(x, pos, cache)[0, -1].float()
            step_logits.append(logits)
            nxt = int(logits.argmax())
            if nxt in (IM_END, ENDOFTEXT):
                break
            out.append(nxt)
            x = torch.tensor([[nxt]], device=self.device)
            pos = torch.tensor([[len(ids) + len(out) - 1]], device=self.device)
        return out, step_logits

    @torch.inference_mode()
    def forced_logits(self, ids: list[int], forced: Sequence[int]) -> torch.Tensor:
        x = torch.tensor([ids + list(forced)], device=self.device)
        return self.model(x)[0, -1].float()

    def classify_one(self, messages: Sequence[Message]) -> GenResult:
        messages = check_messages(messages)
        target = moderation_target(messages)
        ids = self.prompt_ids(messages)
        gen, logits = self.greedy(ids)
        text = self.tokenizer.decode(gen, skip_special_tokens=False)
        # severity at the label position; teacher-force "Safety:" if greedy went elsewhere
        sev_logits = logits[2] if gen[:2] == [SAFETY, COLON] and len(logits) > 2 else self.forced_logits(ids, [SAFETY, COLON])
        sev = torch.stack([sev_logits[t] for t in SEVERITY_FIRST_TOKEN.values()]).softmax(-1)
        severity_probs = {s.value: float(p) for s, p in zip(SEVERITY_FIRST_TOKEN, sev)}
        category_probs = refusal_prob = None
        at = _find(gen, CATEGORIES_PREFIX)
        if at is not None and at < len(logits):
            c = torch.stack([logits[at][t] for t in self.cat_first.values()]).softmax(-1)
            category_probs = {k: float(p) for k, p in zip(self.cat_first, c)}
            if target == "response":
                category_probs.pop(Category.JAILBREAK.value, None)
        at = _find(gen, REFUSAL_PREFIX)
        if target == "response" and at is not None and at < len(logits):
            yn = torch.stack([logits[at][YES], logits[at][NO]]).softmax(-1)
            refusal_prob = float(yn[0])
        try:
            answer, error = parse_answer(text, target), None
        except ParseError as e:
            answer, error = None, f"unparseable guard answer: {e}"
        return GenResult(text, answer, error, severity_probs, category_probs, refusal_prob, len(ids), target)

    def classify(self, batch: Sequence[Sequence[Message]]) -> list[GenResult]:
        return [self.classify_one(m) for m in batch]
