"""Qwen3Guard-Stream's format knowledge: labels, loading, the turn layout, and head outputs -> verdicts.

Everything here is about the format, nothing about running it: no engine, no session, no runtime. The
live sessions (`qguard.runtime.stream`), the finished-conversation path (`Guard` on Stream checkpoints),
the trainers and the calibration all read a Stream model's outputs through this module, so they agree by
construction:

- `StreamLabels`, `matches`, `build_model`, `fold_temperature`, `config_dict`, `official_tensors`: the
  checkpoint (config label maps, official tensor names, where a temperature goes).
- `StreamLayout` / `stream_layout` / `check_layout` / `live_prompt`: where the parts of a conversation are
  (spec section 3): the prompt verdict is the query heads at the user turn's `<|im_end|>`; response
  verdicts are the response heads at every answer token, and at the reasoning tokens when thinking is
  moderated. `TurnReader` finds the same positions token by token in a live turn.
- `Readout` / `Table` / `ResponseState`: head probabilities -> `TokenVerdict`s and the debounced response
  `Verdict`. `verdict_from_scores` and `trace_from_scores` feed a finished response's rows through the very
  same `ResponseState` a live session uses.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from qguard.debounce import Debouncer, DebounceRule, debounce
from qguard.errors import CheckpointError, InputError
from qguard.messages import Message, check_messages
from qguard.model.qwen3 import Qwen3Config
from qguard.model.stream import HEAD_TENSORS, StreamGuardModel, StreamHeadConfig, StreamOutput
from qguard.policy import Part, Policy, TokenVerdict, Verdict
from qguard.taxonomy import (
    SEVERITIES,
    SEVERITY_KEYS,
    STREAM_CATEGORY_ORDER,
    Category,
    Severity,
    label_map,
    parse_category,
    parse_severity,
)
from qguard.tokenizer import (
    DOUBLE_NEWLINE,
    END_THINK,
    ENDOFTEXT,
    IM_END,
    NEWLINE,
    THINK,
    chat_ids,
    prepare_chat,
    render_chat,
)
from qguard.weights import Checkpoint, load_weights

ARCHITECTURE = "Qwen3ForGuardModel"

# ------------------------------------------------------------------------------------------ checkpoint


@dataclass(frozen=True)
class StreamLabels:
    """Class index -> taxonomy, read from the checkpoint's config (string-keyed maps)."""

    risk: tuple  # tuple[Severity, ...] for the response risk head
    category: tuple  # tuple[Category, ...] for the response category head
    query_risk: tuple
    query_category: tuple

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> StreamLabels:
        labels = cls(
            risk=label_map(cfg.get("response_risk_level_map"), parse_severity, SEVERITIES, "response_risk_level_map"),
            category=label_map(cfg.get("response_category_map"), parse_category, STREAM_CATEGORY_ORDER[:8], "response_category_map"),
            query_risk=label_map(cfg.get("query_risk_level_map"), parse_severity, SEVERITIES, "query_risk_level_map"),
            query_category=label_map(cfg.get("query_category_map"), parse_category, STREAM_CATEGORY_ORDER, "query_category_map"),
        )
        for name, got, key in [("response_risk_level_map", labels.risk, "num_risk_level"),
                               ("response_category_map", labels.category, "num_category"),
                               ("query_risk_level_map", labels.query_risk, "num_query_risk_level"),
                               ("query_category_map", labels.query_category, "num_query_category")]:
            want = cfg.get(key, len(got))
            if len(got) != want:
                raise CheckpointError(f"config.json: {name} has {len(got)} labels but {key} is {want}")
        return labels


def matches(config: dict[str, Any]) -> bool:
    """A Stream checkpoint's config.json: its architecture, or the guard heads' field (some exporters
    write only `Qwen3ForCausalLM` beside it, so this is asked before Gen's test)."""
    return ARCHITECTURE in (config.get("architectures") or []) or "guard_inner_size" in config


def build_model(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> tuple[StreamGuardModel, StreamLabels]:
    """The model of a Stream checkpoint in its fused inference form, and its labels."""
    c = ckpt.config
    if not matches(c):
        raise CheckpointError(f"{ckpt.path} is not a Qwen3Guard-Stream checkpoint "
                              f"(architectures {c.get('architectures')!r})")
    if "guard_inner_size" not in c:
        raise CheckpointError(f"{ckpt.path}/config.json: guard_inner_size is missing")
    cfg = Qwen3Config.from_dict(c)
    labels = StreamLabels.from_config(c)
    heads = StreamHeadConfig(
        guard_inner_size=int(c["guard_inner_size"]), num_risk_level=len(labels.risk), num_category=len(labels.category),
        num_query_risk_level=len(labels.query_risk), num_query_category=len(labels.query_category),
    )
    with torch.device("meta"):
        model = StreamGuardModel(cfg, heads)
    model = model.to_empty(device="cpu").to(dtype)
    model.model.rotary_emb.reset()  # not in the checkpoint; recompute after to_empty
    load_weights(model, ckpt, rename=StreamGuardModel.official_to_local)
    # the fused inference form by default (fewer kernels per step, same results up to rounding); names
    # and saving stay official, and `.train()` restores the plain modules for training
    return model.to(device).fuse_for_inference(), labels


@torch.no_grad()
def fold_temperature(model: StreamGuardModel, t_prompt: float, t_response: float) -> None:
    """Divide the two risk classifiers by their temperature, in place (both bias-free linear layers, so
    logits / T exactly; a view of the fused weight when the model is fused)."""
    model.query_head.risk.weight.div_(t_prompt)
    model.response_head.risk.weight.div_(t_response)


def config_dict(cfg: Qwen3Config, heads: StreamHeadConfig, dtype: str) -> dict[str, Any]:
    """config.json in the official Stream layout; label maps use the Gen category strings, in the Stream
    heads' index order."""
    risk = {str(i): s.value for i, s in enumerate(SEVERITIES)}
    return {
        "architectures": [ARCHITECTURE], "model_type": "qwen3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0, "hidden_act": "silu", "torch_dtype": dtype, "bos_token_id": ENDOFTEXT,
        "eos_token_id": IM_END,
        "guard_inner_size": heads.guard_inner_size, "num_risk_level": heads.num_risk_level,
        "num_category": heads.num_category, "num_query_risk_level": heads.num_query_risk_level,
        "num_query_category": heads.num_query_category,
        "response_risk_level_map": risk, "query_risk_level_map": risk,
        "response_category_map": {str(i): cat.value for i, cat in enumerate(STREAM_CATEGORY_ORDER[:8])},
        "query_category_map": {str(i): cat.value for i, cat in enumerate(STREAM_CATEGORY_ORDER)},
    }


def official_tensors(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A `StreamGuardModel` state dict under the official tensor names, in `dtype` (no rotary buffers)."""
    local_to_official = {v: k for k, v in HEAD_TENSORS.items()}
    return {local_to_official.get(k, k): v.to(dtype) for k, v in state_dict.items() if not k.endswith("inv_freq")}


# -------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class StreamLayout:
    """Token ids of a conversation in the Stream (ChatML) format, and where its parts are.

    - `user_end`: the `<|im_end|>` closing the last user turn, where the query heads are read.
    - `think_start`: first token of the final assistant turn's reasoning (after `<think>`), if it has a turn.
    - `reasoning_start` / `reasoning_end`: [start, end) of the reasoning tokens that thinking moderation
      reads, the way `TurnReader` reads a live turn: after `<think>` and the newline after it, up to
      `</think>`. Empty when the turn has no reasoning (the template's empty think block is scaffolding).
    - `answer_start` / `answer_end`: [start, end) of the answer tokens, after `</think>\\n\\n` and before
      the closing `<|im_end|>`; all four len(ids) when the last message is from the user.
    """

    ids: list[int]
    user_end: int
    think_start: int
    answer_start: int
    answer_end: int
    reasoning_start: int
    reasoning_end: int

    def moderated(self, moderate_thinking: bool = True) -> range | list[int]:
        """Positions of the response tokens that get verdicts: the answer, after the reasoning if it is
        moderated."""
        answer = range(self.answer_start, self.answer_end)
        if not moderate_thinking or self.reasoning_end <= self.reasoning_start:
            return answer
        return [*range(self.reasoning_start, self.reasoning_end), *answer]


def stream_layout(tokenizer, messages: Sequence[Message], *,
                  official_special_tokens: bool = False) -> StreamLayout:
    """The conversation's ids and parts. Content is text (`prepare_chat`): the `<|im_end|>` the prompt
    verdict is read at is the template's, whatever the messages spell; `official_special_tokens` (unsafe)
    tokenizes content the official way."""
    messages = check_messages(messages)
    chat = prepare_chat(tokenizer, messages, official_special_tokens=official_special_tokens)
    if messages[-1]["role"] == "user":
        ids = chat.ids(tokenizer, render_chat(tokenizer, chat.messages, add_generation_prompt=True))
        n = len(ids)
        return StreamLayout(ids, _last_index(ids, IM_END), n, n, n, n, n)
    if not any(m["role"] == "user" for m in messages):
        raise InputError("a response must follow a user message")
    head_text = render_chat(tokenizer, chat.messages[:-1], add_generation_prompt=True, enable_thinking=True)
    full_text = render_chat(tokenizer, chat.messages)
    if not full_text.startswith(head_text):
        raise InputError("chat template did not render the assistant turn after the prompt")
    head = chat.ids(tokenizer, head_text)  # ends with "<|im_start|>assistant\n"
    # The turn is "<think>\n{reasoning}\n</think>\n\n{answer}<|im_end|>\n". Tokenising its pieces
    # apart keeps the scaffolding tokens exact even when the answer starts with whitespace.
    turn = full_text[len(head_text):]
    think_text, sep, rest = turn.partition("</think>\n\n")
    answer, _, _ = rest.rpartition("<|im_end|>")
    think = chat.ids(tokenizer, think_text)  # "<think>", "\n..." ...
    ids = head + think + [END_THINK, DOUBLE_NEWLINE]
    answer_start = len(ids)
    ids += chat.ids(tokenizer, answer)
    answer_end = len(ids)
    ids += [IM_END, NEWLINE]
    # reasoning: what follows "<think>" and its newline, up to "</think>"; the empty think block
    # "<think>\n\n</think>" has none (TurnReader reads a live turn the same way)
    r0 = len(head) + 1 + (len(think) > 1 and think[1] in (NEWLINE, DOUBLE_NEWLINE))
    r1 = len(head) + len(think)
    return StreamLayout(ids, _last_index(head, IM_END), len(head) + 1, answer_start, answer_end, min(r0, r1), r1)


def _last_index(ids: Sequence[int], token: int) -> int:
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == token:
            return i
    raise InputError(f"token {token} not found in the rendered conversation")


def check_layout(tokenizer, messages: list[Message], max_len: int, moderate_thinking: bool = True, *,
                 official_special_tokens: bool = False) -> StreamLayout:
    """The layout of a finished conversation the model can read: it fits the model's context, and a
    response has tokens to moderate."""
    lay = stream_layout(tokenizer, messages, official_special_tokens=official_special_tokens)
    if len(lay.ids) > max_len:
        raise InputError(
            f"conversation is {len(lay.ids)} tokens, longer than the model's context of {max_len}; "
            "shorten it (qguard does not silently truncate)"
        )
    if messages[-1]["role"] == "assistant" and not lay.moderated(moderate_thinking):
        raise InputError("the response has no answer tokens to moderate (only reasoning, and "
                         "moderate_thinking is off)")
    return lay


def live_prompt(tokenizer, messages: list[Message], thinking: bool, *,
                official_special_tokens: bool = False) -> tuple[list[int], int]:
    """(ids, user_end) of a live session's prompt: `messages` (checked, ending with the user's turn) and
    the assistant turn's opening; thinking off puts Qwen3's empty think block in it."""
    ids = chat_ids(tokenizer, messages, add_generation_prompt=True, enable_thinking=thinking,
                   official_special_tokens=official_special_tokens)
    return ids, max(i for i, t in enumerate(ids) if t == IM_END)


# ---------------------------------------------------------------------------------------- turn reader

_ANSWER = (Part.ANSWER,)


class TurnReader:
    """Walks the assistant turn token by token and says which tokens are moderated (O(1) per token).

    Thinking on: `<think>` `\\n` reasoning... `</think>` `\\n\\n` answer... `<|im_end|>` (the newline after
    `<think>` is `\\n\\n` in the empty block that Qwen3 writes when it skips thinking).
    Thinking off: the template already put the empty think block in the prompt; every token is answer.
    `phase`: where the turn is ("start", "think_open", "think", "think_close", "answer", "ended").
    `ends`: the ids that end the turn. Text pushes clear it: "<|im_end|>" in the text of an LLM is text,
    and the caller ends the turn with `finish`; otherwise a response could switch its own moderation off by
    writing it.
    """

    def __init__(self, thinking: bool, moderate_thinking: bool):
        self.phase = "start" if thinking else "answer"
        self.moderate_thinking = moderate_thinking
        self.ends: tuple[int, ...] = (IM_END, ENDOFTEXT)

    def plan(self, ids: Sequence[int], phase: str | None = None) -> tuple[Sequence[Part | None], str]:
        """Part of each token (None = not moderated) and the phase after them, starting from `phase`
        (default: the current one); changes nothing."""
        phase, parts, ends = phase or self.phase, [], self.ends
        if phase == "answer" and not any(e in ids for e in ends):  # the common case, no loop
            return _ANSWER * len(ids), phase  # a one-token push gets the shared tuple itself
        for tok in ids:
            part, phase = self._next(phase, tok, ends)
            parts.append(part if part is not Part.THINK or self.moderate_thinking else None)
        return parts, phase

    @staticmethod
    def _next(phase: str, tok: int, ends: tuple[int, ...]) -> tuple[Part | None, str]:
        if phase == "ended":
            raise InputError("the assistant turn already ended (<|im_end|> was pushed); open a new session")
        if phase == "start":
            if tok == THINK:
                return None, "think_open"
            phase = "answer"  # a model that answers without thinking
        if phase == "think_open":
            if tok == NEWLINE or tok == DOUBLE_NEWLINE:  # "\n\n": the empty block "<think>\n\n</think>"
                return None, "think"
            phase = "think"
        if phase == "think":
            return (None, "think_close") if tok == END_THINK else (Part.THINK, "think")
        if phase == "think_close":
            if tok == DOUBLE_NEWLINE:
                return None, "answer"
            phase = "answer"
        if tok in ends:
            return None, "ended"
        return Part.ANSWER, "answer"


# ------------------------------------------------------------------------------------------- readout


class HeadScores(Protocol):
    """Per-position probabilities of the four heads ([T, classes] each): `engine.scoring.TokenScores`
    (full forwards) and `engine.stream.HeadProbs` (live steps) both are."""

    risk: torch.Tensor
    category: torch.Tensor
    query_risk: torch.Tensor
    query_category: torch.Tensor


def probs_dict(p: torch.Tensor, names: Sequence) -> dict[str, float]:
    """{label: prob} summed per taxonomy name (a config could list a name twice)."""
    out: dict[str, float] = {}
    for name, v in zip(names, p.tolist()):
        out[name.value] = out.get(name.value, 0.0) + float(v)
    return out


def severity_probs(p: torch.Tensor, names: Sequence[Severity]) -> dict[str, float]:
    """`probs_dict` with every severity key present (0.0 where the head lacks it)."""
    d = dict.fromkeys(SEVERITY_KEYS, 0.0)
    d.update(probs_dict(p, names))
    return d


def argmax_label(p: torch.Tensor, names: Sequence) -> Severity | Category:
    return names[int(p.argmax())]


@dataclass
class Table:
    """One run's response readings as plain Python values, indexed by the run's packed row: severity
    probabilities (in `sev_keys` order), category probabilities (`cat_keys` order), P(not Safe)
    = 1 - P(Safe), and the argmax index of the risk and category heads (names: `risk_names`,
    `cat_names`)."""

    sev: list[list[float]]
    cat: list[list[float]]
    unsafe: list[float]
    risk_idx: list[int]
    cat_idx: list[int]
    sev_keys: tuple[str, ...] = ()
    cat_keys: tuple[str, ...] = ()
    risk_names: tuple = ()
    cat_names: tuple = ()


class Readout:
    """Reads a run's packed head probabilities into plain Python values for the verdict records: a few
    tensor ops and conversions per run, instead of tensor slices and conversions per session.

    `probs`: [rows, n_risk + n_cat + ...], the response risk head's columns then its category head's.
    The values equal what `severity_probs` / `probs_dict` and the Python reading of a row give: every
    severity key is present (0.0 where the head lacks it), a label listed twice in the config sums its
    columns in index order (in float64, like Python floats), argmax takes the first maximum.
    """

    def __init__(self, labels: StreamLabels, head_sizes: Sequence[int] | None = None, safe_index: int | None = None):
        head_sizes = head_sizes or (len(labels.risk), len(labels.category))
        self.n_risk, self.n_cat = head_sizes[0], head_sizes[1]
        self.safe_index = list(labels.risk).index(Severity.SAFE) if safe_index is None else safe_index
        self.risk_names, self.cat_names = tuple(labels.risk), tuple(labels.category)
        self.sev_keys, self.sev_cols = _key_columns(labels.risk, SEVERITY_KEYS, 0)
        self.cat_keys, self.cat_cols = _key_columns(labels.category, (), self.n_risk)

    def read(self, probs: torch.Tensor) -> Table:
        risk, cat = probs[:, :self.n_risk], probs[:, self.n_risk:self.n_risk + self.n_cat]
        unsafe = 1.0 - probs[:, self.safe_index].double()  # float64, as 1.0 - a Python float would be
        return Table(self.sev_cols(probs).tolist(), self.cat_cols(probs).tolist(), unsafe.tolist(),
                     risk.argmax(-1).tolist(), cat.argmax(-1).tolist(),
                     self.sev_keys, self.cat_keys, self.risk_names, self.cat_names)


def _key_columns(names: Sequence, keys: Sequence[str], offset: int) -> tuple[tuple[str, ...], _Columns]:
    """The dict keys for a head's labels (`keys` first, then names in first-seen order) and the packed
    columns that add up to each."""
    cols: dict[str, list[int]] = {k: [] for k in keys}
    for i, name in enumerate(names):
        cols.setdefault(name.value, []).append(offset + i)
    return tuple(cols), _Columns(list(cols.values()))


class _Columns:
    """x -> [rows, len(groups)] where column k is the sum of x's columns groups[k] (0.0 for none)."""

    def __init__(self, groups: list[list[int]]):
        self.groups = groups
        # the usual config, each key one column: a plain gather (float32 -> Python float is exact)
        simple = all(len(g) == 1 for g in groups)
        self.index = torch.tensor([g[0] for g in groups]) if simple else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.index is not None:
            return x.index_select(1, self.index)
        x = x.double()  # sums in float64, in index order: what Python computes from the row's floats
        out = x.new_zeros(x.shape[0], len(self.groups))
        for k, g in enumerate(self.groups):
            for i in g:
                out[:, k] += x[:, i]
        return out


# ------------------------------------------------------------------------------------------- verdicts


def prompt_verdict(policy: Policy, labels: StreamLabels, heads: HeadScores, at: int, n_tokens: int) -> Verdict:
    """The prompt verdict: the query heads at row `at` (the user turn's `<|im_end|>`)."""
    p, cp = heads.query_risk[at], heads.query_category[at]
    label = argmax_label(p, labels.query_risk)
    cats = (argmax_label(cp, labels.query_category),) if label is not Severity.SAFE else ()
    return policy.verdict(label, cats, probs=severity_probs(p, labels.query_risk),
                          category_probs=probs_dict(cp, labels.query_category), n_tokens=n_tokens)


class ResponseState:
    """The debounce and readout state of one response: what its verdict so far is made of, O(1) per token.

    `decided`: (probs, category probs, category) at the token where the debounced label was decided;
    `riskiest`: (P(not Safe), probs, category probs, category) at the riskiest token so far (what a Safe
    response reports); `stop`: the policy blocked the response (sticky).
    """

    def __init__(self, policy: Policy, rule: DebounceRule = DebounceRule.EVAL):
        self.policy = policy
        self.debouncer = Debouncer(rule)
        self.decided: tuple[dict, dict, Category] | None = None
        self.riskiest: tuple[float, dict, dict, Category] | None = None
        self.n_moderated = 0
        self.stop = False

    def copy(self) -> ResponseState:
        """An independent continuation of this state (`StreamSession.fork`)."""
        new = copy.copy(self)
        new.debouncer = copy.copy(self.debouncer)
        return new

    def verdict(self, n_tokens: int) -> Verdict:
        """The debounced response verdict: probabilities at the deciding token, else at the riskiest one."""
        d = self.debouncer
        label, pos = d.label, d.position
        if pos is not None and self.decided is not None:
            probs, cprobs, category = self.decided
        elif self.riskiest is not None:
            _, probs, cprobs, category = self.riskiest
        else:
            return self.policy.verdict(Severity.SAFE, (), unsafe_position=None, n_tokens=n_tokens)
        cats = (category,) if label is not Severity.SAFE else ()
        return self.policy.verdict(label, cats, probs=probs, category_probs=cprobs, unsafe_position=pos,
                                   n_tokens=n_tokens)

    def consume(self, ids: Sequence[int], parts: Sequence[Part | None], table: Table, a: int,
                start: int) -> list[TokenVerdict]:
        """Verdicts for tokens `ids` (parts: None = not moderated), read from rows a.. of `table`; `start`:
        the absolute position of ids[0]. Plain Python values only: the tensor work was done once per run.

        Runs for every session of every step, so it keeps to locals: the debounce and riskiest-token
        bookkeeping is inline, and each TokenVerdict's instance dict is filled from one literal (keys =
        `policy.TOKEN_VERDICT_FIELDS`, like `TokenVerdict._fast`), not through the frozen per-field setattr."""
        out = []
        sev_keys, cat_keys, risk_names, cat_names = table.sev_keys, table.cat_keys, table.risk_names, table.cat_names
        sev, cat, unsafe, risk_idx, cat_idx = table.sev, table.cat, table.unsafe, table.risk_idx, table.cat_idx
        end = start + len(ids)
        d, new = self.debouncer, object.__new__
        r = a - 1
        for tok, part in zip(ids, parts):
            r += 1
            if part is None:
                continue
            probs, cprobs = dict(zip(sev_keys, sev[r])), dict(zip(cat_keys, cat[r]))
            label, category = risk_names[risk_idx[r]], cat_names[cat_idx[r]]
            index = self.n_moderated
            self.n_moderated = index + 1
            u = unsafe[r]
            label0, pos0 = d.label, d.position
            d.push(label)
            dlabel, dpos = d.label, d.position
            if dlabel is not label0 or dpos != pos0:
                self.decided = (probs, cprobs, category)
                if not self.stop and self.verdict(end).blocked:
                    self.stop = True  # sticky: once blocked, the response stays cut off
            riskiest = self.riskiest
            if riskiest is None or u > riskiest[0]:
                self.riskiest = (u, probs, cprobs, category)
            tv = new(TokenVerdict)
            tv.__dict__.update({"token_id": tok, "index": index, "position": start + r - a, "part": part,
                                "probs": probs, "category_probs": cprobs, "label": label, "category": category,
                                "response_label": dlabel, "unsafe_position": dpos, "stop": self.stop,
                                "text": None})
            out.append(tv)
        return out


def _read_response(policy: Policy, rule: DebounceRule, labels: StreamLabels, layout: StreamLayout,
                   scores: HeadScores, moderate_thinking: bool) -> tuple[ResponseState, list[TokenVerdict]]:
    """A finished response's moderated rows through `Readout` and `ResponseState`, as a live session
    reads them: one push of the whole turn (its scaffolding rows give no verdict)."""
    state = ResponseState(policy, rule)
    where = layout.moderated(moderate_thinking)
    if not where:
        return state, []
    lo, hi = where[0], where[-1] + 1
    parts: list[Part | None] = [None] * (hi - lo)
    for i in where:  # reasoning rows come before the answer's
        parts[i - lo] = Part.ANSWER if i >= layout.answer_start else Part.THINK
    table = Readout(labels).read(torch.cat([scores.risk[lo:hi], scores.category[lo:hi]], 1))
    return state, state.consume(layout.ids[lo:hi], parts, table, 0, lo)


def verdict_from_scores(policy: Policy, rule: DebounceRule, labels: StreamLabels, messages: Sequence[Message],
                        layout: StreamLayout, scores: HeadScores, moderate_thinking: bool = True) -> Verdict:
    """The verdict of a finished conversation from its full-forward `scores`: the prompt's when the last
    message is the user's, else the debounced response verdict (the live rule, by construction)."""
    if messages[-1]["role"] == "user":
        return prompt_verdict(policy, labels, scores, layout.user_end, layout.user_end + 1)
    state, _ = _read_response(policy, rule, labels, layout, scores, moderate_thinking)
    return state.verdict(n_tokens=len(layout.ids))


@dataclass
class StreamTrace:
    """A finished response read token by token: the prompt verdict, a verdict per moderated token (with
    its text) and the response verdict."""

    prompt: Verdict
    tokens: list[TokenVerdict] = field(default_factory=list)
    response: Verdict | None = None


def trace_from_scores(policy: Policy, rule: DebounceRule, labels: StreamLabels, tokenizer, layout: StreamLayout,
                      scores: HeadScores, moderate_thinking: bool = True) -> StreamTrace:
    """`StreamTrace` of a response's layout and full-forward `scores`: the `TokenVerdict`s a live session
    would return for the same tokens, each with its decoded `text`."""
    state, tvs = _read_response(policy, rule, labels, layout, scores, moderate_thinking)
    return StreamTrace(
        prompt=prompt_verdict(policy, labels, scores, layout.user_end, layout.user_end + 1),
        tokens=[dataclasses.replace(tv, text=tokenizer.decode([tv.token_id])) for tv in tvs],
        response=state.verdict(n_tokens=len(layout.ids)),
    )


# ------------------------------------------------------------------------------------------- training


def label_of(out: StreamOutput, row: int, example) -> Severity:
    """The sample-level label of an encoded training example (`train.data.Example`: `query_pos`,
    `resp_start`, `resp_labels`) from a batch's head logits, whose risk classes are in `SEVERITIES`
    order (the trainers' configs): the query head at the prompt's `<|im_end|>`, else the debounced
    response."""
    if example.query_pos >= 0:
        return SEVERITIES[int(out.query_risk_logits[row, example.query_pos].argmax())]
    span = out.risk_logits[row, example.resp_start: example.resp_start + len(example.resp_labels)].argmax(-1).tolist()
    return debounce([SEVERITIES[i] for i in span])[0]


def debounced_unsafe_score(p_not_safe: torch.Tensor) -> float:
    """The debounce rule in probabilities: a response is as unsafe as its riskiest pair of consecutive
    tokens, max_i min(p[i-1], p[i]) over P(not Safe) per token (0.0 for fewer than two tokens)."""
    p = p_not_safe
    return float(torch.minimum(p[1:], p[:-1]).max()) if len(p) > 1 else 0.0
