"""Guarded generation (qguard.generate): hold-back, rollback with intervention, cut, refuse.

A tiny random transformers Qwen3 LM generates with its own KV cache. Forced unsafe spans come from a
guard that flags exactly two token ids (its weights edited so that only those tokens' embeddings reach
the risk head) and a logits processor that makes the real LM emit them where a test wants them; every
other token is the LM's own greedy choice.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from qguard.engine.scoring import score_sequences
from qguard.errors import CapacityError, InputError
from qguard.generate import (
    DEFAULT_REFUSAL,
    INTROSPECTION_INSERT,
    NUDGE,
    GuardedGeneration,
    guarded_generate,
    guarded_stream,
)
from qguard.guard import Guard
from qguard.policy import Severity, debounce
from qguard.stream import StreamGuard
from qguard.tokenizer import encode_text, load_tokenizer
from tests.conftest import REPO
from tests.trigger import BOMB, EXPLOSIVES, trigger_checkpoint

TRIGGERS = (BOMB, EXPLOSIVES)
PROMPT = [{"role": "user", "content": "Tell me a story about a lighthouse."}]
TOL = 1e-4  # fp32 on CPU


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def trigger_ckpt(tiny_stream, tmp_path_factory):
    """The tiny Stream checkpoint edited so that a response token is Unsafe exactly when it is " bomb" or
    " explosives" (tests/trigger.py)."""
    return trigger_checkpoint(tiny_stream, tmp_path_factory.mktemp("trigger") / "ck", TRIGGERS)


@pytest.fixture(scope="module")
def sg(trigger_ckpt):
    g = StreamGuard.from_pretrained(trigger_ckpt, dtype="fp32", max_sessions=4, max_context=1024)
    with g.open(PROMPT) as s:  # the edit does what the tests rely on
        vs = s.push([100, BOMB, 200, EXPLOSIVES, BOMB, 300])
    assert [v.label for v in vs] == [Severity.SAFE, Severity.UNSAFE, Severity.SAFE] + [Severity.UNSAFE] * 2 + [Severity.SAFE]
    assert [v.stop for v in vs] == [False] * 4 + [True] * 2 and vs[-1].unsafe_position == 4
    return g


@pytest.fixture(scope="module")
def llm():
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                      tie_word_embeddings=False)  # tied random embeddings make greedy decoding repeat one token
    return Qwen3ForCausalLM(cfg).eval()


def contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def remove_all(seq: list[int], sub: list[int]) -> list[int]:
    out, i = [], 0
    while i < len(seq):
        if seq[i:i + len(sub)] == sub:
            i += len(sub)
        else:
            out.append(seq[i])
            i += 1
    return out


class Script:
    """A logits processor that makes the LM emit `tokens` at answer offsets `at` (counted from the start
    of the answer, or from the end of the last inserted intervention when `after` is given), on the
    attempts listed in `attempts` (0 = before any intervention; None = every attempt). Everything else is
    the LM's own greedy choice. Records every answer token the LM produced, per attempt."""

    def __init__(self, prompt_len: int, at: int, tokens=(BOMB, BOMB), attempts=(0,), after: list[int] | None = None):
        self.prompt_len, self.at, self.tokens, self.attempts, self.after = prompt_len, at, tokens, attempts, after
        self.branches: list[list[int]] = []
        self.calls = 0
        self.recorder: Recorder | None = None  # when set: the context given equals what the LM's cache holds


    def _attempt_and_offset(self, ctx: list[int]) -> tuple[int, int]:
        if self.after is None:
            return 0, len(ctx) - self.prompt_len
        n, end, i = 0, self.prompt_len, 0
        while i <= len(ctx) - len(self.after):
            if ctx[i:i + len(self.after)] == self.after:
                n, end = n + 1, i + len(self.after)
                i += len(self.after)
            else:
                i += 1
        return n, len(ctx) - end

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        ctx = input_ids[0].tolist()
        if self.recorder is not None:
            assert ctx == self.recorder.main  # the ids the generator keeps are those in the LM's cache
        attempt, off = self._attempt_and_offset(ctx)
        if len(self.branches) <= attempt:
            self.branches.append([])
        k = off - self.at
        if (self.attempts is None or attempt in self.attempts) and 0 <= k < len(self.tokens):
            scores = torch.full_like(scores, float("-inf"))
            scores[:, self.tokens[k]] = 0.0
        self.branches[attempt].append(int(scores.argmax(-1)))
        return scores


class Recorder:
    """Forward hooks on the LM: for each KV cache object, the token sequence it must hold (rebuilt from
    each call's cache length and inputs) and, per call, the logits it gave and the sequence it saw."""

    def __init__(self, llm):
        self.llm = llm
        self.seqs: dict[int, list[int]] = {}
        self.order: list[int] = []
        self.calls: list[tuple[int, list[int], torch.Tensor]] = []
        self._pending = None
        self.handles = [llm.register_forward_pre_hook(self.pre, with_kwargs=True),
                        llm.register_forward_hook(self.post, with_kwargs=True)]

    def pre(self, module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        key = id(cache)
        if key not in self.seqs:
            self.seqs[key] = []
            self.order.append(key)
        start = cache.get_seq_length()
        ids = kwargs["input_ids"][0].tolist()
        self.seqs[key] = self.seqs[key][:start] + ids
        self._pending = (key, list(self.seqs[key]))

    def post(self, module, args, kwargs, out):
        key, seq = self._pending
        self.calls.append((key, seq, out.logits[0, -1].detach().clone()))

    def close(self):
        for h in self.handles:
            h.remove()

    @property
    def main(self) -> list[int]:
        return self.seqs[self.order[0]]


def stream_prompt_ids(sg: StreamGuard) -> list[int]:
    with sg.open(PROMPT) as s:
        return list(s.prompt_ids)


def full_forward(sg: StreamGuard, answer: list[int]):
    """Per-token response probabilities and the debounced (label, position) of one full forward over the
    guard's prompt + `answer` ids: the reference every session reading must equal."""
    prompt = stream_prompt_ids(sg)
    sc = score_sequences(sg.model, [prompt + answer])[0]
    risk, cat = sc.risk[len(prompt):], sc.category[len(prompt):]
    labels = [sg.labels.risk[i] for i in risk.argmax(-1).tolist()]
    return prompt, risk, cat, debounce(labels, sg.debounce_rule)


def assert_matches_full_forward(sg: StreamGuard, r: GuardedGeneration):
    """The result's token verdicts and final verdict are those of one full forward over the released ids."""
    prompt, risk, cat, (label, pos) = full_forward(sg, r.ids)
    assert len(r.token_verdicts) == len(r.ids)
    for k, tv in enumerate(r.token_verdicts):
        assert tv.position == len(prompt) + k and tv.index == k and tv.token_id == r.ids[k]
        for i, sev in enumerate(sg.labels.risk):
            assert abs(tv.probs[sev.value] - risk[k, i].item()) < TOL
        for i, c in enumerate(sg.labels.category):
            assert abs(tv.category_probs[c.value] - cat[k, i].item()) < TOL
    assert r.verdict.label is label and r.verdict.unsafe_position == pos
    with sg.open(PROMPT) as s:  # a fresh session over the released ids agrees on everything
        s.push(r.ids)
        fresh = s.finish()
    assert fresh.label is r.verdict.label and fresh.categories == r.verdict.categories
    assert fresh.unsafe_position == r.verdict.unsafe_position and fresh.n_tokens == r.verdict.n_tokens
    for key, p in fresh.probs.items():
        assert abs(r.verdict.probs[key] - p) < TOL


def assert_kv_consistent(llm, rec: Recorder):
    """Every LM call (before and after rollbacks) gave the logits of a fresh forward, without a cache, over
    the sequence its cache had to hold plus its inputs: crop left exactly the kept ids."""
    with torch.no_grad():
        for _, seq, logits in rec.calls:
            ref = llm(input_ids=torch.tensor([seq])).logits[0, -1]
            assert (ref - logits).abs().max().item() < TOL


def run(llm, tok, sg, **kw) -> tuple[GuardedGeneration, list[str]]:
    chunks: list[str] = []
    r = guarded_generate(llm, tok, sg, PROMPT, on_release=chunks.append, **kw)
    assert "".join(chunks) == r.text  # the result is exactly what the caller was given
    assert sg.engine.active == 0  # every guard session was closed
    return r, chunks


def llm_prompt_len(tok) -> int:
    from qguard.tokenizer import chat_ids

    return len(chat_ids(tok, PROMPT, add_generation_prompt=True, enable_thinking=False))


# ----------------------------------------------------------------------------------------- rollback

@pytest.mark.parametrize("buffer", [0, 1, 3, 8])
def test_rollback_discards_the_buffer_and_continues_from_the_release_point(llm, tok, sg, buffer):
    p = 12  # the forced span: answer tokens p and p+1 are " bomb" on the first attempt
    nudge = encode_text(tok, NUDGE)
    script = Script(llm_prompt_len(tok), p, after=nudge)
    rec = script.recorder = Recorder(llm)
    try:
        r, _ = run(llm, tok, sg, max_new_tokens=30, buffer_tokens=buffer, intervention="nudge",
                   logits_processor=[script])
    finally:
        rec.close()
    first = script.branches[0]
    assert first[p:p + 2] == [BOMB, BOMB] and len(first) == p + 2  # generation stopped at the verdict
    # independently: where one full forward over the first attempt's answer turns unsafe
    _, _, _, (label, u) = full_forward(sg, first)
    assert label is Severity.UNSAFE and u == p + 1
    assert len(r.rollbacks) == 1 and r.retries == 1
    rb = r.rollbacks[0]
    assert rb.unsafe_position == u and rb.at == max(0, u - buffer) and rb.discarded == len(first) - rb.at
    # the caller got the first attempt's text only up to the release point, never a token at or after u
    # (with any buffer the first token of the deciding pair is held back too), then the new attempt
    assert r.ids[:rb.at] == first[:rb.at] and 0 < rb.at <= u
    assert r.ids[rb.at:] == script.branches[1] and len(r.ids) == 30 and r.finish_reason == "length"
    if buffer:
        assert BOMB not in r.ids
    # the intervention reached the LM's context, never the caller
    assert NUDGE.strip() not in r.text and not contains(r.ids, nudge)
    assert rec.main[:llm_prompt_len(tok)] + first[:rb.at] + nudge == rec.main[:llm_prompt_len(tok) + rb.at + len(nudge)]
    assert remove_all(rec.main[llm_prompt_len(tok):], nudge) == r.ids[:-1]  # the last token was never fed
    assert_kv_consistent(llm, rec)
    # the guard session after the rollback read the released prefix only: the same as a full forward
    assert_matches_full_forward(sg, r)
    assert r.verdict.label is Severity.SAFE and not r.refused
    # what the caller waited for: every sampled answer token beyond the released ones
    assert r.generated_tokens == script.calls == len(first) + len(script.branches[1])
    assert r.rolled_back_tokens == rb.discarded
    assert r.wait_tokens == r.generated_tokens - len(r.ids) == rb.discarded


def test_introspection_critique_goes_into_the_context_never_to_the_caller(llm, tok, sg):
    p = 5
    script = Script(llm_prompt_len(tok), p)  # attempt 0 only: the first time the span comes
    rec = Recorder(llm)
    try:
        r, _ = run(llm, tok, sg, max_new_tokens=16, buffer_tokens=2, intervention="introspect",
                   critique_tokens=6, logits_processor=[script])
    finally:
        rec.close()
    assert r.retries == 1
    rb = r.rollbacks[0]
    # the critique was generated in a context of its own (a second cache) that holds the flagged answer
    crit_calls = [c for c in rec.calls if c[0] == rec.order[1]]
    assert "bomb bomb" in tok.decode(crit_calls[0][1])
    picks = []
    for _, _, logits in crit_calls:  # greedy over the tokenizer's ids: the critique's tokens
        t = int(logits[:len(tok)].argmax())
        if t in (tok.eos_token_id, 151643):
            break
        picks.append(t)
    assert rb.critique_tokens == len(picks) > 0
    insert = encode_text(tok, INTROSPECTION_INSERT.format(critique=tok.decode(picks, skip_special_tokens=True).strip()))
    assert rb.intervention_tokens == len(insert) and contains(rec.main, insert)  # it went into the context
    assert not contains(r.ids, insert) and "Reflection" not in r.text  # and never to the caller
    assert len(picks) < 2 or not contains(r.ids, picks)
    assert_kv_consistent(llm, rec)
    assert_matches_full_forward(sg, r)
    # critique tokens are waited for too
    assert r.generated_tokens == script.calls + rb.critique_tokens
    assert r.wait_tokens == r.generated_tokens - len(r.ids) == rb.discarded + rb.critique_tokens


def test_retries_are_bounded_then_the_refusal_is_released(llm, tok, sg):
    nudge = encode_text(tok, NUDGE)
    script = Script(llm_prompt_len(tok), 3, attempts=None, after=nudge)  # every attempt turns unsafe
    rec = script.recorder = Recorder(llm)
    try:
        r, chunks = run(llm, tok, sg, max_new_tokens=40, buffer_tokens=2, max_retries=3, intervention="nudge",
                        logits_processor=[script])
    finally:
        rec.close()
    assert r.retries == 3 and len(script.branches) == 4  # 3 rollbacks, then the 4th unsafe attempt refuses
    assert r.refused and r.finish_reason == "refused" and r.text.endswith(DEFAULT_REFUSAL)
    assert chunks[-1] == DEFAULT_REFUSAL and BOMB not in r.ids
    kept = r.ids[:len(r.ids) - len(encode_text(tok, DEFAULT_REFUSAL))]
    assert kept + encode_text(tok, DEFAULT_REFUSAL) == r.ids
    assert_kv_consistent(llm, rec)
    assert_matches_full_forward(sg, r)  # the verdict covers the refusal the caller got, too
    assert r.generated_tokens == script.calls == sum(map(len, script.branches))
    assert r.wait_tokens == r.generated_tokens - len(kept)


def test_without_retries_rollback_refuses_at_once(llm, tok, sg):
    script = Script(llm_prompt_len(tok), 4)
    r, _ = run(llm, tok, sg, max_new_tokens=20, buffer_tokens=3, max_retries=0, logits_processor=[script])
    assert r.refused and r.retries == 0 and r.ids[:2] == script.branches[0][:2] and BOMB not in r.ids
    assert_matches_full_forward(sg, r)


# ----------------------------------------------------------------------------------------- cut, refuse

@pytest.mark.parametrize("mode", ["cut", "refuse"])
@pytest.mark.parametrize("hold", [0, 1, 2, 5])
def test_cut_and_refuse_never_release_a_token_at_or_after_the_unsafe_position(llm, tok, sg, mode, hold):
    p = 9
    script = Script(llm_prompt_len(tok), p, tokens=(EXPLOSIVES, BOMB))
    r, chunks = run(llm, tok, sg, max_new_tokens=30, on_unsafe=mode, hold_tokens=hold, logits_processor=[script])
    answer = script.branches[0]
    _, _, _, (label, u) = full_forward(sg, answer)  # computed independently of the session
    assert label is Severity.UNSAFE and u == p + 1 and len(answer) == u + 1
    kept = answer[:max(0, u - hold)]
    refusal = encode_text(tok, DEFAULT_REFUSAL) if mode == "refuse" else []
    assert r.ids == kept + refusal
    assert len(kept) <= u and (hold == 0 or EXPLOSIVES not in r.ids)  # hold >= 1: the pair is never shown
    assert r.refused is (mode == "refuse")
    assert r.finish_reason == ("refused" if mode == "refuse" else "content_filter")
    assert r.retries == 0 and r.rolled_back_tokens == len(answer) - len(kept)
    assert r.generated_tokens == len(answer) and r.wait_tokens == len(answer) - len(kept)
    assert_matches_full_forward(sg, r)


def test_a_safe_answer_is_released_whole(llm, tok, sg):
    """No forced span: everything the LM wrote is released, with the verdict of a full forward."""
    script = Script(llm_prompt_len(tok), 10**6)  # records, never forces
    for mode in ("rollback", "cut", "refuse"):
        r, chunks = run(llm, tok, sg, max_new_tokens=25, on_unsafe=mode, logits_processor=[script])
        assert r.ids == script.branches[-1][:25] and r.finish_reason == "length" and not r.refused
        assert r.wait_tokens == 0 and r.retries == 0 and r.verdict.label is Severity.SAFE
        assert r.text == tok.decode(r.ids, skip_special_tokens=True)
        assert_matches_full_forward(sg, r)
        script.branches.clear()


# ----------------------------------------------------------------------------------------- text path

def test_text_path_rolls_back_on_the_guards_own_tokens(llm, tok, sg, trigger_ckpt):
    """push_ids=False: the guard re-tokenizes the LM's text deltas (what an LLM with another tokenizer
    gets); release follows the judged text, and the released text's verdict is a full forward's."""
    nudge = encode_text(tok, NUDGE)
    script = Script(llm_prompt_len(tok), 8, after=nudge)
    rec = Recorder(llm)
    try:
        r, _ = run(llm, tok, sg, max_new_tokens=24, buffer_tokens=2, intervention="nudge", push_ids=False,
                   logits_processor=[script])
    finally:
        rec.close()
    assert not r.pushed_ids and r.retries == 1
    first = script.branches[0]
    rb = r.rollbacks[0]
    assert 0 < rb.at < 8 and r.ids[:rb.at] == first[:rb.at] and " bomb" not in r.text
    assert r.ids[rb.at:] == script.branches[1]
    assert r.text == tok.decode(r.ids, skip_special_tokens=True)
    assert_kv_consistent(llm, rec)
    full = Guard.from_pretrained(trigger_ckpt, dtype="fp32").classify_response(PROMPT[0]["content"], r.text)
    assert r.verdict.label is full.label and r.verdict.unsafe_position == full.unsafe_position
    with sg.open(PROMPT) as s:
        fresh_vs = s.push_text(r.text) + s.flush()
        fresh = s.finish()
    assert [v.token_id for v in r.token_verdicts] == [v.token_id for v in fresh_vs]
    for a, b in zip(r.token_verdicts, fresh_vs):
        assert a.position == b.position and all(abs(a.category_probs[c] - p) < TOL for c, p in b.category_probs.items())
    assert fresh.label is r.verdict.label


def test_an_llm_with_another_tokenizer_is_judged_through_its_text(sg):
    """A word-level toy tokenizer (not Qwen3's vocabulary): the guard is pushed text, detected."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<eos>", "Once", "upon", "a", "time", "bomb", "there", "was", "light", "house", "sea"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    toy = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<eos>")
    torch.manual_seed(1)
    cfg = Qwen3Config(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512)
    lm = Qwen3ForCausalLM(cfg).eval()
    plan = ["Once", "upon", "a", "time", "there", "was", "a", "bomb", "bomb", "sea"]
    ids = [words.index(w) for w in plan]

    class Story:
        def __init__(self):
            self.n = 0

        def __call__(self, input_ids, scores):  # the plan once, then "light house" until the end
            t = ids[self.n] if self.n < len(ids) else words.index("light" if self.n % 2 else "house")
            self.n += 1
            out = torch.full_like(scores, float("-inf"))
            out[:, t] = 0.0
            return out

    chunks: list[str] = []
    r = guarded_generate(lm, toy, sg, PROMPT, max_new_tokens=12, on_unsafe="cut", hold_tokens=1,
                         logits_processor=[Story()], on_release=chunks.append)
    assert not r.pushed_ids and r.finish_reason == "content_filter"
    assert r.text == "Once upon a time there was a" == "".join(chunks)  # " bomb bomb": cut, never shown
    assert sg.engine.active == 0


# ----------------------------------------------------------------------------------------- API

def test_guarded_stream_yields_released_text_and_closing_early_frees_the_sessions(llm, tok, sg):
    script = Script(llm_prompt_len(tok), 10**6)
    stream = guarded_stream(llm, tok, sg, PROMPT, max_new_tokens=20, buffer_tokens=4, logits_processor=[script])
    chunks = list(stream)
    assert stream.result is not None and "".join(chunks) == stream.result.text
    assert sg.engine.active == 0
    with guarded_stream(llm, tok, sg, PROMPT, max_new_tokens=20, buffer_tokens=4) as stream:
        next(iter(stream))
        assert sg.engine.active == 2  # the live session and its checkpoint
    assert sg.engine.active == 0 and stream.result is None


def test_sampling_is_reproducible_with_a_seed(llm, tok, sg):
    a = guarded_generate(llm, tok, sg, PROMPT, max_new_tokens=12, do_sample=True, temperature=0.8, top_k=50,
                         top_p=0.9, seed=7)
    b = guarded_generate(llm, tok, sg, PROMPT, max_new_tokens=12, do_sample=True, temperature=0.8, top_k=50,
                         top_p=0.9, seed=7)
    assert a.ids == b.ids and len(a.ids) == 12


@pytest.mark.parametrize("kw, message", [
    ({"on_unsafe": "retry"}, "unknown on_unsafe action 'retry'"),
    ({"hold_tokens": -1}, "hold_tokens must be at least 0"),
    ({"buffer_tokens": -3}, "buffer_tokens must be at least 0"),
    ({"max_retries": -1}, "max_retries must be at least 0"),
    ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
    ({"intervention": " "}, "intervention must be"),
    ({"intervention": 3}, "intervention must be"),
    ({"refusal_message": ""}, "refusal_message must be non-empty"),
    ({"top_p": 0.0}, "top_p must be in"),
    ({"temperature": 0}, "temperature must be above 0"),
    ({"push_ids": "yes"}, "push_ids must be"),
])
def test_bad_options_are_input_errors(llm, tok, sg, kw, message):
    with pytest.raises(InputError, match=message):
        guarded_generate(llm, tok, sg, PROMPT, **kw)
    assert sg.engine.active == 0


@pytest.mark.parametrize("messages, message", [
    ([{"role": "system", "content": "Be nice."}, {"role": "assistant", "content": "Hello!"}], "user's turn"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}], "user's turn"),
    ([], "non-empty list"),
    ([{"role": "user", "content": "  "}], "empty"),
])
def test_bad_messages_are_input_errors(llm, tok, sg, messages, message):
    with pytest.raises(InputError, match=message):
        guarded_generate(llm, tok, sg, messages)


def test_bad_components_are_input_errors(llm, tok, sg):
    with pytest.raises(InputError, match="stream_guard must be"):
        guarded_generate(llm, tok, object(), PROMPT)
    with pytest.raises(InputError, match="llm must be"):
        guarded_generate(lambda ids: ids, tok, sg, PROMPT)


def test_readme_example_runs():
    from tests.test_readme import code_after

    code = code_after("### Guarded generation (CARE)", "python")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[-1].startswith("retries=") and "verdict=" in out[-1]


def test_rollback_needs_two_sessions_and_says_so(llm, tok, trigger_ckpt):
    one = StreamGuard.from_pretrained(trigger_ckpt, dtype="fp32", max_sessions=1, max_context=256)
    with pytest.raises(CapacityError, match="two stream sessions"):
        guarded_generate(llm, tok, one, PROMPT, max_new_tokens=4)
    assert one.engine.active == 0
    r = guarded_generate(llm, tok, one, PROMPT, max_new_tokens=4, on_unsafe="cut")  # one session is enough
    assert len(r.ids) == 4
