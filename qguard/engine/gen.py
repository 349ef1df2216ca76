"""Gen classification at scale: batched, prefix-cached, draft-verified greedy decoding.

The answer is exactly what plain greedy decoding (`generate(do_sample=False)`, stop at <|im_end|> /
<|endoftext|> or after `max_new_tokens`) would produce, token for token. It is computed faster by:

1. **Prefix caching.** The instruction text before the conversation (`... <BEGIN CONVERSATION>\\n\\n`)
   is fixed per moderation target. Its KV cache is computed once per distinct header and copied into
   every batch; only the rest (conversation + footer) runs through the model. The full prompt is
   tokenized as one string and we check that its ids start with the header's ids, so the model sees
   exactly the ids plain generation would see (a template whose boundary tokenizes differently falls
   back to no prefix sharing).
2. **Length-bucketed batches.** Requests are sorted by suffix length and packed under a token budget;
   right padding, per-row positions and a key-validity mask keep every row independent.
3. **Draft verification (speculative decoding with a grammar draft).** The answer follows a tiny
   grammar (`Safety: X\\nCategories: Y[\\nRefusal: Z]`), so each step feeds the tokens greedy decoding
   would most likely produce next and keeps the longest prefix that equals the model's own argmax at
   every position, plus the argmax after it. The first forward scores the conversation with
   "Safety", ":" appended: the severity comes from that single forward whenever greedy would itself
   have produced "Safety:" (checked by argmax). Categories and refusal are decoded only where the
   draft guessed wrong. Rejected draft tokens are masked out of the cache and never influence a kept
   position (causal attention), so the result equals plain greedy decoding by construction; only
   floating-point summation order differs (see tests/engine/test_gen_engine.py for the agreement checks).

Probabilities come from the same forwards (they equal the batch-1 reference's):
- severity: softmax over the first tokens of " Safe", " Unsafe", " Controversial" after "Safety:";
- categories: softmax over the first tokens of " None" and each category name after "Categories:";
- refusal: P(" Yes") / (P(" Yes") + P(" No")) after "Refusal:".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from qguard.engine.kvcache import ContiguousCache
from qguard.errors import InputError
from qguard.families.gen import (
    CATEGORIES_PREFIX,
    COLON,
    CONVERSATION_MARK,
    GEN_MAX_NEW_TOKENS,
    NO,
    REFUSAL_PREFIX,
    SAFETY,
    SEVERITY_FIRST_TOKEN,
    STOP,
    YES,
    GenAnswer,
    answer_drafts,
    find_after,
    first_token_ids,
    guard_prompt_ids,
    moderation_target,
    read_answer,
    target_categories,
)
from qguard.messages import Message, check_messages
from qguard.model.gen import GenGuardModel
from qguard.model.qwen3 import additive_mask
from qguard.tokenizer import encode


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
    token_ids: list[int] = field(default_factory=list)  # the greedy answer, without the stop token


@dataclass
class GenRequest:
    """A conversation ready to run: its full prompt ids and how many of them the shared prefix covers."""

    ids: list[int]
    target: str
    header: str  # the header text whose KV cache covers ids[:prefix_len] ("" = no sharing)
    prefix_len: int


# ------------------------------------------------------------------------------------------- cache

class BatchCache:
    """KV cache for a batch of rows of different lengths sharing one prefix (the `KVCache` protocol).

    Keys live in one buffer per layer, [B, KV, capacity, D]; columns are appended for the whole batch
    at once and `valid` [B, capacity] says which columns each row may attend to (its prefix, its real
    tokens, accepted drafts), so padding and rejected drafts are masked out instead of moved.
    """

    def __init__(self, n_layers: int, batch: int, prefix: ContiguousCache | None, capacity: int,
                 device: torch.device):
        self.n_layers, self.batch, self.capacity = n_layers, batch, capacity
        self.prefix = prefix
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.length = 0 if prefix is None else prefix.length
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.valid[:, : self.length] = True
        self._mask: torch.Tensor | None = None
        self._n_new = 0

    def begin(self, new_valid: torch.Tensor) -> None:
        """Prepare a forward of new_valid.shape[1] tokens per row (new_valid: which are real)."""
        n = new_valid.shape[1]
        if self.length + n > self.capacity:
            self._grow(self.length + n)
        self.valid[:, self.length : self.length + n] = new_valid
        S = self.length + n
        cols = torch.arange(S, device=self.valid.device)
        causal = cols[None, :] <= (self.length + torch.arange(n, device=cols.device))[:, None]  # [n, S]
        self._mask = (self.valid[:, None, :S] & causal[None])[:, None]  # [B, 1, n, S]
        self._n_new = n

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.k[layer] is None:
            self._allocate(layer, k, v)
        if self._mask.dtype == torch.bool:  # once per forward: SDPA would convert it in every layer
            self._mask = additive_mask(self._mask, k.dtype)
        a, b = self.length, self.length + self._n_new
        self.k[layer][:, :, a:b] = k
        self.v[layer][:, :, a:b] = v
        return self.k[layer][:, :, :b], self.v[layer][:, :, :b], self._mask

    def commit(self) -> None:
        self.length += self._n_new
        self._n_new, self._mask = 0, None

    def _allocate(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        B, H, _, D = k.shape
        self.k[layer] = k.new_empty(B, H, self.capacity, D)
        self.v[layer] = v.new_empty(B, H, self.capacity, D)
        if self.prefix is not None:  # one copy of the shared prefix per row, made once per batch
            P = self.prefix.length
            self.k[layer][:, :, :P] = self.prefix.k[layer]
            self.v[layer][:, :, :P] = self.prefix.v[layer]

    def _grow(self, need: int) -> None:
        cap = max(need, self.capacity * 2)
        extra = cap - self.capacity
        self.valid = torch.cat([self.valid, self.valid.new_zeros(self.batch, extra)], 1)
        for lst in (self.k, self.v):
            for i, t in enumerate(lst):
                if t is not None:
                    lst[i] = torch.cat([t, t.new_empty(t.shape[0], t.shape[1], extra, t.shape[3])], 2)
        self.capacity = cap

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (finished rows leave the batch)."""
        self.valid = self.valid[rows]
        for lst in (self.k, self.v):
            for i, t in enumerate(lst):
                if t is not None:
                    lst[i] = t[rows]
        self.batch = len(rows)


# ------------------------------------------------------------------------------------------- rows

@dataclass
class _Row:
    """Decoding state of one request inside a batch."""

    req: GenRequest
    index: int  # position in the caller's list
    gen: list[int] = field(default_factory=list)
    done: bool = False
    fed: int = 0  # tokens of this row whose KV is in the cache (prefix included)
    sev_logits: torch.Tensor | None = None
    cat_probs: dict[str, float] | None = None
    ref_prob: float | None = None


class GenEngine:
    """Greedy Gen answers for many conversations at once (see the module docstring)."""

    def __init__(self, model: GenGuardModel, tokenizer, max_new_tokens: int = GEN_MAX_NEW_TOKENS, max_batch: int = 32,
                 batch_tokens: int = 16384, official_special_tokens: bool = False):
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        # message content is text unless this (unsafe for untrusted input) asks for the official ids
        self.official_special_tokens = official_special_tokens
        self.max_batch, self.batch_tokens = max_batch, batch_tokens
        self.device = next(model.parameters()).device
        self.max_len = model.config.max_position_embeddings
        self.n_layers = model.config.num_hidden_layers
        self.cat_first = first_token_ids(tokenizer)
        self.drafts = {t: answer_drafts(tokenizer, t) for t in ("prompt", "response")}
        self._header_ids: dict[str, list[int]] = {}
        self._prefix_kv: dict[str, ContiguousCache] = {}

    # ------------------------------------------------------------------------------------ requests

    def prepare(self, messages: Sequence[Message]) -> GenRequest:
        """Render and tokenize one conversation; raises InputError for anything that cannot run."""
        messages = check_messages(messages)
        target = moderation_target(messages)
        text, ids = guard_prompt_ids(self.tokenizer, messages, official_special_tokens=self.official_special_tokens)
        if len(ids) + self.max_new_tokens > self.max_len:
            raise InputError(
                f"conversation is {len(ids)} tokens; with {self.max_new_tokens} answer tokens it exceeds the "
                f"model's context of {self.max_len} tokens. Shorten it (qguard does not silently truncate)."
            )
        header, plen = self._shared_prefix(text, ids)
        return GenRequest(ids, target, header, plen)

    def _shared_prefix(self, text: str, ids: list[int]) -> tuple[str, int]:
        at = text.find(CONVERSATION_MARK)
        if at < 0:
            return "", 0
        header = text[: at + len(CONVERSATION_MARK)]
        hid = self._header_ids.get(header)
        if hid is None:
            hid = self._header_ids[header] = encode(self.tokenizer, header)
        # Share only if the header's ids are exactly the start of the full prompt's ids, and leave at
        # least one token after it (the first forward needs a real last prompt token).
        if len(hid) < len(ids) and ids[: len(hid)] == hid:
            return header, len(hid)
        return "", 0

    @torch.inference_mode()
    def _prefix_cache(self, req: GenRequest) -> ContiguousCache | None:
        if req.prefix_len == 0:
            return None
        kv = self._prefix_kv.get(req.header)
        if kv is None:
            kv = ContiguousCache(self.n_layers)
            x = torch.tensor([req.ids[: req.prefix_len]], device=self.device)
            self.model.model(x, torch.arange(req.prefix_len, device=self.device)[None], kv)
            self._prefix_kv[req.header] = kv
        return kv

    # -------------------------------------------------------------------------------------- public

    def classify(self, batch: Sequence[Sequence[Message]]) -> list[GenResult]:
        return self.run([self.prepare(m) for m in batch])

    def run(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        """Results in the order of `requests`; batches are formed internally by header and length."""
        out: list[GenResult | None] = [None] * len(requests)
        for group in self._batches(requests):
            for row in self._run_batch([_Row(requests[i], i) for i in group]):
                out[row.index] = self._result(row)
        return out  # type: ignore[return-value]

    def _batches(self, requests: Sequence[GenRequest]) -> list[list[int]]:
        """Length-sorted groups with one shared header each, under max_batch and batch_tokens."""
        order = sorted(range(len(requests)), key=lambda i: (requests[i].header, len(requests[i].ids)))
        groups: list[list[int]] = []
        for i in order:
            r = requests[i]
            g = groups[-1] if groups else None
            if g is not None and requests[g[0]].header == r.header and len(g) < self.max_batch \
                    and (len(g) + 1) * (len(r.ids) + self.max_new_tokens) <= self.batch_tokens:
                g.append(i)
            else:
                groups.append([i])
        return groups

    # ---------------------------------------------------------------------------------- decoding

    @torch.inference_mode()
    def _run_batch(self, rows: list[_Row]) -> list[_Row]:
        prefix = self._prefix_cache(rows[0].req)
        P = rows[0].req.prefix_len
        suffixes = [r.req.ids[P:] for r in rows]
        T = max(len(s) for s in suffixes) + 2
        cache = BatchCache(self.n_layers, len(rows), prefix, P + T + 2 * self.max_new_tokens + 8, self.device)
        for r in rows:
            r.fed = P
        # first forward: the conversation + teacher-forced "Safety:" (kept only where greedy agrees)
        forced = [SAFETY, COLON][: max(0, self.max_new_tokens - 1)]
        self._step(rows, cache, suffixes, [forced] * len(rows), severity=True)
        active = rows
        while True:
            still = [i for i, r in enumerate(active) if not r.done]
            if not still:
                return rows
            if len(still) <= len(active) // 2:  # compacting copies the cache: only when it halves the batch
                cache.select(torch.tensor(still, device=self.device))
                active = [active[i] for i in still]
            feeds = [[] if r.done else [r.gen[-1]] for r in active]
            self._step(active, cache, feeds, [self._draft(r) for r in active])

    def _draft(self, row: _Row) -> list[int]:
        """The rest of the most likely well-formed answer that extends what greedy produced so far."""
        if row.done:
            return []
        g = row.gen
        room = self.max_new_tokens - len(g) - 1  # predictions this step: len(draft) + 1
        for cand in self.drafts[row.req.target]:
            if len(cand) > len(g) and cand[: len(g)] == g:
                return cand[len(g) : len(g) + max(0, room)]
        return []

    def _step(self, rows: list[_Row], cache: BatchCache, feeds: list[list[int]], drafts: list[list[int]],
              severity: bool = False) -> None:
        """One forward over feed+draft tokens of every row (done rows feed padding); verify drafts."""
        seqs = [([] if r.done else f + d) for r, f, d in zip(rows, feeds, drafts)]
        n = max(1, max(len(s) for s in seqs))
        B = len(rows)
        ids = torch.zeros(B, n, dtype=torch.long)
        pos = torch.zeros(B, n, dtype=torch.long)
        valid = torch.zeros(B, n, dtype=torch.bool)
        for b, (r, s) in enumerate(zip(rows, seqs)):
            if s:
                ids[b, : len(s)] = torch.tensor(s)
                pos[b, : len(s)] = torch.arange(r.fed, r.fed + len(s))
                valid[b, : len(s)] = True
        cache.begin(valid.to(self.device))
        hidden = self.model.model(ids.to(self.device), pos.to(self.device), cache)
        cache.commit()
        base = cache.length - n
        # logits only where a prediction is read (the last fed token and each draft token), no padding:
        # the lm_head is a quarter of the 0.6B model's weights, so it is applied to exactly these rows
        spans, bi, pi = [], [], []
        for b, (r, f, d) in enumerate(zip(rows, feeds, drafts)):
            spans.append(len(bi))
            if not r.done:
                bi += [b] * (len(d) + 1)
                pi += range(len(f) - 1, len(f) + len(d))
        logits = self.model.lm_head(hidden[torch.tensor(bi, device=self.device),
                                           torch.tensor(pi, device=self.device)]).float()  # [N, vocab]
        top = logits.argmax(-1).tolist()
        for b, r in enumerate(rows):
            if r.done:
                continue
            a = spans[b]
            if severity:  # the label position after the forced "Safety:", whether greedy keeps it or not
                r.sev_logits = logits[a + 2] if len(drafts[b]) == 2 else self._forced_severity_logits(r)
            accepted = self._verify(r, drafts[b], top[a:], logits[a:])
            # keep the fed tokens and accepted drafts; rejected draft columns become invisible
            kept = len(feeds[b]) + accepted
            cache.valid[b, base + kept : base + n] = False
            r.fed += kept

    def _verify(self, r: _Row, draft: list[int], top: list[int], logits: torch.Tensor) -> int:
        """Append greedy tokens while they match the draft; returns how many draft tokens were kept."""
        for m in range(len(draft) + 1):
            if len(r.gen) >= self.max_new_tokens:
                r.done = True
                return m
            self._record_probs(r, logits[m])
            tok = top[m]
            if tok in STOP:
                r.done = True
                return m
            r.gen.append(tok)
            if len(r.gen) >= self.max_new_tokens:
                r.done = True
                return m
            if m == len(draft) or tok != draft[m]:
                return m
        return len(draft)

    def _record_probs(self, r: _Row, logits: torch.Tensor) -> None:
        """Category / refusal probabilities at the first position right after their prefixes."""
        g = r.gen
        if r.cat_probs is None and tuple(g[-2:]) == CATEGORIES_PREFIX and find_after(g, CATEGORIES_PREFIX) == len(g):
            first = target_categories(self.cat_first, r.req.target)
            c = torch.stack([logits[t] for t in first.values()]).softmax(-1)
            r.cat_probs = {k: float(p) for k, p in zip(first, c)}
        if r.req.target == "response" and r.ref_prob is None and tuple(g[-3:]) == REFUSAL_PREFIX \
                and find_after(g, REFUSAL_PREFIX) == len(g):
            r.ref_prob = float(torch.stack([logits[YES], logits[NO]]).softmax(-1)[0])

    @torch.inference_mode()
    def _forced_severity_logits(self, r: _Row) -> torch.Tensor:
        """Label-position logits when max_new_tokens is too small to carry "Safety:" in the first forward."""
        x = torch.tensor([r.req.ids + [SAFETY, COLON]], device=self.device)
        return self.model(x)[0, -1].float()

    def _result(self, r: _Row) -> GenResult:
        text = self.tokenizer.decode(r.gen, skip_special_tokens=False)
        sev = torch.stack([r.sev_logits[t] for t in SEVERITY_FIRST_TOKEN.values()]).softmax(-1)
        severity_probs = {s.value: float(p) for s, p in zip(SEVERITY_FIRST_TOKEN, sev)}
        answer, error = read_answer(text, r.req.target)
        return GenResult(text, answer, error, severity_probs, r.cat_probs, r.ref_prob, len(r.req.ids),
                         r.req.target, list(r.gen))


# ------------------------------------------------------------------------------------ reference

@torch.inference_mode()
def reference_greedy(model: GenGuardModel, ids: list[int], max_new_tokens: int) -> list[int]:
    """Plain batch-1 greedy decoding with a growing cache: the official eval's semantics, slowly.

    Kept as the yardstick the fast path is tested against (and for the benchmark's agreement check).
    """
    device = next(model.parameters()).device
    cache = ContiguousCache(model.config.num_hidden_layers)
    x = torch.tensor([ids], device=device)
    pos = torch.arange(len(ids), device=device)[None]
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(model.lm_head(model.model(x, pos, cache)[:, -1])[0].argmax())
        if nxt in STOP:
            break
        out.append(nxt)
        x = torch.tensor([[nxt]], device=device)
        pos = torch.tensor([[len(ids) + len(out) - 1]], device=device)
    return out

