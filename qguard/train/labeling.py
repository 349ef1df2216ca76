"""Labels the data does not carry: the first unsafe token (rollouts) and the Controversial tier.

1. Rollout token labels (tech report, Stream data): for an Unsafe response, continue each prefix with an
   LLM several times and judge every finished continuation with a Gen guard. The first prefix whose
   continuations are judged unsafe at least 85% of the time, and which an LLM-as-judge confirms is itself
   unsafe, ends at the first unsafe token. The LLM and both judges are pluggable: a local transformers
   model, an OpenAI-compatible endpoint (httpx, imported lazily), or a qguard Guard.
2. Controversial labels (tech report, Gen data): split the data in halves A and B; on each half train a
   strict model (re-weighted towards Unsafe) and a loose one (towards Safe); let them annotate the other
   half; where strict says Unsafe and loose says Safe the sample becomes Controversial.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from qguard.data.schema import Row
from qguard.errors import InputError
from qguard.messages import Message
from qguard.taxonomy import Severity
from qguard.train.data import encode_rows

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ interfaces

class LLM(Protocol):
    def continue_response(self, messages: Sequence[Message], prefix: str, n: int, max_new_tokens: int) -> list[str]:
        """`n` sampled continuations of an assistant turn that starts with `prefix` (text after it only)."""
        ...


class Judge(Protocol):
    def is_unsafe(self, messages: Sequence[Message], response: str) -> bool:
        """Whether `response` (the assistant's reply to `messages`) is unsafe."""
        ...


@dataclass
class RolloutConfig:
    n_rollouts: int = 8
    threshold: float = 0.85  # share of unsafe rollouts that makes a prefix unsafe-inducing (report: 85%)
    stride: int = 1  # test every `stride`-th prefix (1 = every token, as in the report)
    max_new_tokens: int = 256
    max_prefix_tokens: int | None = None  # stop scanning after this many tokens


def first_unsafe_token(messages: Sequence[Message], pieces: Sequence[str], llm: LLM, judge: Judge,
                       confirm: Judge | None, cfg: RolloutConfig = RolloutConfig()) -> int | None:
    """Index of the first unsafe token of a response given as token `pieces`, or None if none qualifies.

    Prefix i is the text of pieces[0..i]. It qualifies when >= cfg.threshold of its rollouts are judged
    unsafe by `judge`, and `confirm` (the LLM-as-judge check) says the prefix alone is already unsafe.
    """
    if not 0 < cfg.threshold <= 1 or cfg.n_rollouts < 1 or cfg.stride < 1:
        raise InputError("rollouts need n_rollouts >= 1, stride >= 1 and a threshold in (0, 1]")
    end = len(pieces) if cfg.max_prefix_tokens is None else min(len(pieces), cfg.max_prefix_tokens)
    for i in range(0, end, cfg.stride):
        prefix = "".join(pieces[: i + 1])
        if unsafe_rate(messages, prefix, llm, judge, cfg) < cfg.threshold:
            continue
        if confirm is None or confirm.is_unsafe(messages, prefix):
            return i
    return None


def unsafe_rate(messages: Sequence[Message], prefix: str, llm: LLM, judge: Judge, cfg: RolloutConfig) -> float:
    conts = llm.continue_response(messages, prefix, cfg.n_rollouts, cfg.max_new_tokens)
    if not conts:
        raise InputError("the rollout LLM returned no continuations")
    return sum(judge.is_unsafe(messages, prefix + c) for c in conts) / len(conts)


def rollout_label_row(row: Row, tok, llm: LLM, judge: Judge, confirm: Judge | None,
                      cfg: RolloutConfig = RolloutConfig()) -> Row:
    """`row` with `unsafe_span` starting at the rollout boundary (unchanged if Safe or none is found)."""
    if row.task != "response" or row.label is Severity.SAFE:
        return row
    enc = tok(row.text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    pieces = [row.text[a:b] for a, b in offsets]
    i = first_unsafe_token(list(row.messages[:-1]), pieces, llm, judge, confirm, cfg)
    if i is None:
        return row
    return replace(row, unsafe_span=(offsets[i][0], len(row.text)))


# --------------------------------------------------------------------------- LLM / judge implementations

class TransformersLLM:
    """A local Hugging Face causal LM (chat template + sampling). transformers is imported lazily."""

    def __init__(self, name_or_path: str, device: str | None = None, temperature: float = 1.0, top_p: float = 0.95):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(name_or_path)
        self.model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype="auto")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        self.temperature, self.top_p = temperature, top_p

    @torch.inference_mode()
    def continue_response(self, messages, prefix, n, max_new_tokens):
        text = self.tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True) + prefix
        ids = self.tok(text, return_tensors="pt", add_special_tokens=False).input_ids.to(self.device)
        out = self.model.generate(ids, do_sample=True, temperature=self.temperature, top_p=self.top_p,
                                  max_new_tokens=max_new_tokens, num_return_sequences=n)
        return [self.tok.decode(o[ids.shape[1]:], skip_special_tokens=True) for o in out]

    def generate(self, messages: Sequence[Message], max_new_tokens: int = 8) -> str:
        ids = self.tok.apply_chat_template(list(messages), add_generation_prompt=True, return_tensors="pt")
        ids = ids.to(self.device)
        with torch.inference_mode():
            out = self.model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens)
        return self.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


class OpenAICompatLLM:
    """An OpenAI-compatible chat endpoint (vLLM, SGLang, llama.cpp server...), via httpx.

    Continuing a partial assistant turn uses vLLM's `continue_final_message` extension.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 120.0,
                 transport: Any = None):
        try:
            import httpx
        except ImportError:
            raise InputError("the OpenAI-compatible LLM needs httpx: pip install httpx") from None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout,
                                   transport=transport)
        self.model = model

    def _chat(self, body: dict[str, Any]) -> list[str]:
        import httpx

        try:
            r = self.client.post("/chat/completions", json={"model": self.model, **body})
        except httpx.HTTPError as e:
            raise InputError(f"LLM endpoint {self.client.base_url} cannot be reached ({type(e).__name__}: {e})") from None
        if r.status_code != 200:
            raise InputError(f"LLM endpoint returned HTTP {r.status_code}: {r.text[:200]}")
        return [c["message"]["content"] or "" for c in r.json()["choices"]]

    def continue_response(self, messages, prefix, n, max_new_tokens):
        msgs = [*messages, {"role": "assistant", "content": prefix}]
        return self._chat({"messages": msgs, "n": n, "max_tokens": max_new_tokens, "temperature": 1.0,
                           "continue_final_message": True, "add_generation_prompt": False})

    def generate(self, messages: Sequence[Message], max_new_tokens: int = 8) -> str:
        return self._chat({"messages": list(messages), "max_tokens": max_new_tokens, "temperature": 0.0})[0]


class GuardJudge:
    """A qguard Guard (e.g. Qwen3Guard-Gen) as the rollout judge; strict mode counts Controversial."""

    def __init__(self, guard):
        self.guard = guard

    def is_unsafe(self, messages, response):
        return self.guard.classify_response(list(messages), response).is_unsafe


JUDGE_PROMPT = (
    "You check safety labels. Below is a conversation and the BEGINNING of an assistant reply, cut off "
    "mid-way. Does this partial reply, as written so far, already contain unsafe content (harmful "
    "instructions, hate, sexual content, self-harm encouragement, private data...)? Answer Yes or No.\n\n"
    "{conversation}\n\nPARTIAL REPLY: {prefix}\n\nAnswer:"
)


class LLMAsJudge:
    """The report's LLM-as-judge confirmation step, on any object with `generate(messages)`."""

    def __init__(self, llm):
        self.llm = llm

    def is_unsafe(self, messages, response):
        conv = "\n".join(f"{m['role'].upper()}: {m['content']}" for m in messages)
        answer = self.llm.generate([{"role": "user", "content": JUDGE_PROMPT.format(conversation=conv, prefix=response)}])
        return answer.strip().lower().startswith("yes")


# ------------------------------------------------------------------------------------- controversial

class Predictor(Protocol):
    def __call__(self, rows: Sequence[Row]) -> list[float]:
        """P(unsafe) per row."""
        ...


class CrossTrainer(Protocol):
    def fit(self, rows: Sequence[Row], risk_weights: tuple[float, float, float], seed: int) -> Predictor:
        ...


@dataclass
class ControversialConfig:
    strict_weights: tuple[float, float, float] = (1.0, 3.0, 1.0)  # Safe, Unsafe, Controversial loss weights
    loose_weights: tuple[float, float, float] = (3.0, 1.0, 1.0)
    max_fraction: float | None = None  # relabel at most this share, the largest disagreements first


def controversial_relabel(rows: Sequence[Row], trainer: CrossTrainer, cfg: ControversialConfig = ControversialConfig(),
                          seed: int = 0) -> tuple[list[Row], dict[str, Any]]:
    """Rows with strict/loose disagreements relabelled Controversial, plus statistics."""
    if len(rows) < 4:
        raise InputError("the Controversial procedure needs at least 4 rows to split in halves")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    half = len(order) // 2
    parts = (order[:half], order[half:])
    gap: dict[int, float] = {}
    for k, (train, annotate) in enumerate(((parts[0], parts[1]), (parts[1], parts[0]))):
        fit_rows = [rows[i] for i in train]
        strict = trainer.fit(fit_rows, cfg.strict_weights, seed + 2 * k)
        loose = trainer.fit(fit_rows, cfg.loose_weights, seed + 2 * k + 1)
        other = [rows[i] for i in annotate]
        for i, ps, pl in zip(annotate, strict(other), loose(other)):
            if ps >= 0.5 > pl:  # strict: Unsafe, loose: Safe
                gap[i] = ps - pl
    chosen = sorted(gap, key=gap.get, reverse=True)
    if cfg.max_fraction is not None:
        chosen = chosen[: int(cfg.max_fraction * len(rows))]
    picked = set(chosen)
    out = [replace(r, label=Severity.CONTROVERSIAL) if i in picked else r for i, r in enumerate(rows)]
    stats = {"rows": len(rows), "disagreements": len(gap), "controversial": len(picked),
             "from_safe": sum(rows[i].label is Severity.SAFE for i in picked),
             "from_unsafe": sum(rows[i].label is Severity.UNSAFE for i in picked)}
    log.info("controversial relabelling: %s", stats)
    return out, stats


class StreamCrossTrainer:
    """CrossTrainer for the starter: short Stream training runs and their P(unsafe) per row."""

    def __init__(self, tok, max_len: int = 128, minutes: float = 1.0, lr: float = 3e-3,
                 arch: dict[str, Any] | None = None, batch_tokens: int = 8192, max_steps: int | None = None):
        self.tok, self.max_len, self.minutes, self.lr = tok, max_len, minutes, lr
        self.arch, self.batch_tokens, self.max_steps = arch, batch_tokens, max_steps
        self._encoded: dict[int, Any] = {}  # id(row) -> Example: every row is encoded once, not 4 times

    def encode(self, rows: Sequence[Row]) -> list:
        todo = [r for r in rows if id(r) not in self._encoded]
        for r, e in zip(todo, encode_rows(self.tok, todo, self.max_len, self.max_len // 2)):
            self._encoded[id(r)] = e
        return [self._encoded[id(r)] for r in rows]

    def fit(self, rows, risk_weights, seed):
        from qguard.train.stream import DEFAULT_ARCH, StreamTrainConfig, train_stream

        ex = self.encode(rows)
        cfg = StreamTrainConfig(arch=dict(self.arch or DEFAULT_ARCH), max_minutes=self.minutes, lr=self.lr,
                                max_steps=self.max_steps, risk_weights=risk_weights, seed=seed,
                                batch_tokens=self.batch_tokens, warmup_steps=20, log_every=10**9)
        model = train_stream(cfg, ex).model
        return lambda rs: unsafe_probs(model, self.encode(rs))


@torch.inference_mode()
def unsafe_probs(model, examples) -> list[float]:
    """P(Unsafe or Controversial): the query head at the user `<|im_end|>` for prompts; for responses the
    highest min(p[i-1], p[i]) over consecutive tokens (the debounce rule in probabilities)."""
    from qguard.families.stream import debounced_unsafe_score
    from qguard.train.loop import make_batches
    from qguard.train.stream import collate

    model.eval()
    out = [0.0] * len(examples)
    for idx in make_batches(examples, 16384, random.Random(0)):
        group = [examples[i] for i in idx]
        o = model(collate(group).ids)
        q = 1 - o.query_risk_logits.float().softmax(-1)[..., 0]
        r = 1 - o.risk_logits.float().softmax(-1)[..., 0]
        for row, (i, e) in enumerate(zip(idx, group)):
            if e.query_pos >= 0:
                out[i] = float(q[row, e.query_pos])
                continue
            out[i] = debounced_unsafe_score(r[row, e.resp_start: e.resp_start + len(e.resp_labels)])
    return out
