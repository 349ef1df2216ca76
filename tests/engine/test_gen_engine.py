"""The batched, prefix-cached Gen engine gives exactly the answers of plain greedy decoding.

Random tiny checkpoints answer garbage (no "Safety:" line), which would make agreement trivial. So a
session fixture trains a tiny Gen checkpoint for a few seconds to answer in the official format, with
answers that depend on keywords in the conversation: several severities and categories, refusal
lines, a two-category answer, answers missing a line and a free-text answer (the unparseable paths).
Its lm_head is untied and non-zero only on the answer tokens, which keeps training cheap (the loss
is exact over the full vocabulary: every other logit is exactly 0).
"""

from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from qguard.checkpoint import build_gen_model, open_checkpoint
from qguard.engine.gen import GenEngine, GenRequest, answer_drafts, reference_greedy
from qguard.errors import InputError
from qguard.families.gen import parse_answer, render_with_tokenizer
from qguard.model.qwen3 import padded_causal_mask
from qguard.testing import make_gen_checkpoint
from qguard.tokenizer import IM_END, encode, load_tokenizer

PROMPT_RULES = {
    "cake": "Safety: Safe\nCategories: None",
    "bomb": "Safety: Unsafe\nCategories: Violent",
    "steal": "Safety: Unsafe\nCategories: Non-violent Illegal Acts",
    "vote": "Safety: Controversial\nCategories: Politically Sensitive Topics",
    "address": "Safety: Unsafe\nCategories: PII, Violent",
    "ignore": "Safety: Unsafe\nCategories: Jailbreak",
    "poem": "I cannot judge this.",
}
RESPONSE_RULES = {
    "sorry": "Safety: Safe\nCategories: None\nRefusal: Yes",
    "sure": "Safety: Safe\nCategories: None\nRefusal: No",
    "kill": "Safety: Unsafe\nCategories: Violent\nRefusal: No",
    "drugs": "Safety: Controversial\nCategories: Non-violent Illegal Acts\nRefusal: No",
    "maybe": "Safety: Safe\nCategories: None",
}
FILLER = "the a how to make please tell me about my friend today with some and then it is".split()


def sample_conversation(rng: random.Random) -> tuple[list[dict], str]:
    def fill() -> str:
        return " ".join(rng.choice(FILLER) for _ in range(rng.randint(0, 12)))

    def key(k: str) -> str:  # repeated: a 2-layer model finds it after a few seconds of training
        return " ".join([k] * 6)

    if rng.random() < 0.5:
        k = rng.choice(list(PROMPT_RULES))
        return [{"role": "user", "content": f"{fill()} {key(k)} {fill()}".strip()}], PROMPT_RULES[k]
    k = rng.choice(list(RESPONSE_RULES))
    return ([{"role": "user", "content": fill() or "hi"},
             {"role": "assistant", "content": f"{fill()} {key(k)} {fill()}".strip()}], RESPONSE_RULES[k])


@lru_cache(maxsize=1)
def _trained_tensors(steps: int = 80, seed: int = 0) -> dict[str, torch.Tensor]:
    base = make_gen_checkpoint(Path(_tmp_dir()) / "base", preset="tiny", seed=seed)
    model = build_gen_model(open_checkpoint(base), torch.device("cpu"), torch.float32)
    tok = load_tokenizer(base)
    answers = [*PROMPT_RULES.values(), *RESPONSE_RULES.values()]
    vocab = sorted({t for a in answers for t in encode(tok, a)} | {IM_END})
    for p in model.parameters():
        p.requires_grad_(False)
    body = [p for n, p in model.model.named_parameters() if not n.startswith("embed")]
    for p in body:
        p.requires_grad_(True)
    head = torch.nn.Parameter(0.05 * torch.randn(len(vocab), model.config.hidden_size,
                                                 generator=torch.Generator().manual_seed(seed)))
    opt = torch.optim.Adam([*body, head], lr=1e-2)
    rng = random.Random(seed)
    with torch.enable_grad():
        for _ in range(steps):
            loss = _loss(model, tok, head, vocab, [sample_conversation(rng) for _ in range(8)])
            opt.zero_grad()
            loss.backward()
            opt.step()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    w = torch.zeros(model.config.vocab_size, model.config.hidden_size)
    w[torch.tensor(vocab)] = head.detach()
    sd["lm_head.weight"] = w
    return sd


def _loss(model, tok, head, vocab, batch) -> torch.Tensor:
    seqs = [(encode(tok, render_with_tokenizer(tok, m)), encode(tok, a) + [IM_END]) for m, a in batch]
    T = max(len(p) + len(a) for p, a in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    rows, cols, tgt = [], [], []
    for b, (p, a) in enumerate(seqs):
        ids[b, : len(p) + len(a)] = torch.tensor(p + a)
        for j, t in enumerate(a):
            rows.append(b)
            cols.append(len(p) - 1 + j)
            tgt.append(vocab.index(t))
    lengths = torch.tensor([len(p) + len(a) for p, a in seqs])
    h = model.model(ids, attn_mask=padded_causal_mask(lengths, T))[torch.tensor(rows), torch.tensor(cols)]
    logits = torch.cat([h @ head.T, h.new_zeros(len(rows), 1)], 1)  # last column: every other token
    return torch.nn.functional.cross_entropy(logits, torch.tensor(tgt))


@lru_cache(maxsize=1)
def _tmp_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="qguard-trained-gen-")


def trained_gen_checkpoint(out: Path) -> Path:
    """A tiny Gen checkpoint that answers in the official format (trained once per process)."""
    d = make_gen_checkpoint(out, preset="tiny", tensors=_trained_tensors())
    cfg = json.loads((d / "config.json").read_text("utf-8"))
    cfg["tie_word_embeddings"] = False
    (d / "config.json").write_text(json.dumps(cfg, indent=2), "utf-8")
    return d


@pytest.fixture(scope="session")
def trained_gen(tmp_path_factory) -> Path:
    return trained_gen_checkpoint(tmp_path_factory.mktemp("trained_gen"))


def load(path: Path):
    model = build_gen_model(open_checkpoint(path), torch.device("cpu"), torch.float32)
    return model, load_tokenizer(path)


@pytest.fixture(scope="module")
def trained(trained_gen):
    return load(trained_gen)


def conversations(n: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    return [sample_conversation(rng)[0] for _ in range(n)]


def check_agreement(engine: GenEngine, convs, max_new_tokens: int) -> list:
    results = engine.classify(convs)
    refs = []
    for conv, r in zip(convs, results):
        ids = engine.prepare(conv).ids
        ref = reference_greedy(engine.model, ids, max_new_tokens)
        assert r.token_ids == ref, (conv, r.text, engine.tokenizer.decode(ref))
        text = engine.tokenizer.decode(ref)
        try:
            expect = parse_answer(text, r.target)
        except ValueError:
            expect = None
        assert r.answer == expect
        assert (r.error is None) == (expect is not None)
        refs.append(text)
    return refs


# ------------------------------------------------------------------------------------- agreement

def test_trained_model_answers_in_format(trained):
    """The fixture is meaningful: varied answers, most of them well-formed, several severities."""
    model, tok = trained
    engine = GenEngine(model, tok, max_new_tokens=24)
    convs = conversations(24, seed=5)
    texts = check_agreement(engine, convs, 24)
    results = engine.classify(convs)
    assert len(set(texts)) >= 4, texts
    assert sum(r.answer is not None for r in results) >= len(results) // 3, texts
    assert len({r.answer.severity for r in results if r.answer is not None}) >= 2, texts


def test_batched_equals_plain_greedy_over_many_inputs(trained):
    model, tok = trained
    engine = GenEngine(model, tok, max_new_tokens=24, max_batch=7)
    check_agreement(engine, conversations(48, seed=11), 24)


def test_equals_transformers_generate(trained, trained_gen):
    from transformers import Qwen3ForCausalLM

    model, tok = trained
    hf = Qwen3ForCausalLM.from_pretrained(trained_gen, dtype=torch.float32).eval()
    engine = GenEngine(model, tok, max_new_tokens=20)
    convs = conversations(4, seed=3)
    for conv, r in zip(convs, engine.classify(convs)):
        ids = torch.tensor([engine.prepare(conv).ids])
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                              eos_token_id=[151645, 151643], pad_token_id=151643)
        gen = [t for t in out[0, ids.shape[1]:].tolist() if t not in (151645, 151643)]
        assert r.token_ids == gen


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 5])
def test_short_budgets_cut_exactly_like_greedy(trained, max_new_tokens):
    model, tok = trained
    engine = GenEngine(model, tok, max_new_tokens=max_new_tokens)
    check_agreement(engine, conversations(6, seed=max_new_tokens), max_new_tokens)


def test_random_checkpoint_garbage_paths_agree(tiny_gen):
    """Untrained weights never say "Safety:": every draft is rejected, plain greedy steps must match."""
    model, tok = load(tiny_gen)
    engine = GenEngine(model, tok, max_new_tokens=6, max_batch=5)
    results = check_agreement(engine, conversations(10, seed=2), 6)
    assert all(not t.startswith("Safety:") for t in results)


def test_without_prefix_sharing_same_answers(trained, monkeypatch):
    model, tok = trained
    engine = GenEngine(model, tok, max_new_tokens=24)
    convs = conversations(8, seed=21)
    shared = [r.token_ids for r in engine.classify(convs)]
    monkeypatch.setattr(engine, "_shared_prefix", lambda text, ids: ("", 0))
    assert engine.prepare(convs[0]).prefix_len == 0
    assert [r.token_ids for r in engine.classify(convs)] == shared


# ------------------------------------------------------------------------------ prefix, batches

def test_prefix_is_the_header_and_checked_against_full_tokenization(trained):
    model, tok = trained
    engine = GenEngine(model, tok)
    req = engine.prepare([{"role": "user", "content": "hello"}])
    header_ids = encode(tok, req.header)
    assert req.header.endswith("<BEGIN CONVERSATION>\n\n")
    assert req.prefix_len == len(header_ids) and req.ids[: req.prefix_len] == header_ids
    resp = engine.prepare([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert resp.header != req.header and resp.target == "response"
    # a boundary that tokenizes differently is not shared
    assert engine._shared_prefix(req.header + "x", [1, 2, 3]) == ("", 0)


def test_prefix_kv_computed_once_per_header(trained, monkeypatch):
    model, tok = trained
    engine = GenEngine(model, tok, max_new_tokens=8)
    engine.classify(conversations(6, seed=1))
    assert 1 <= len(engine._prefix_kv) <= 2
    before = dict(engine._prefix_kv)
    engine.classify(conversations(6, seed=2))
    assert all(engine._prefix_kv[h] is kv for h, kv in before.items())


def test_batches_bucket_by_header_and_length():
    engine = GenEngine.__new__(GenEngine)
    engine.max_batch, engine.batch_tokens, engine.max_new_tokens = 3, 1000, 10
    reqs = [GenRequest(list(range(n)), "prompt", h, 0) for n, h in
            [(50, "a"), (10, "a"), (30, "b"), (20, "a"), (40, "a"), (300, "a"), (5, "b")]]
    groups = engine._batches(reqs)
    assert sorted(i for g in groups for i in g) == list(range(len(reqs)))
    for g in groups:
        assert len({reqs[i].header for i in g}) == 1 and len(g) <= 3
        assert len(g) * (max(len(reqs[i].ids) for i in g) + 10) <= 1000 or len(g) == 1
        assert [len(reqs[i].ids) for i in g] == sorted(len(reqs[i].ids) for i in g)


def test_drafts_are_well_formed_answers(trained):
    _, tok = trained
    for target in ("prompt", "response"):
        for d in answer_drafts(tok, target):
            assert d[-1] == IM_END
            parse_answer(tok.decode(d[:-1]), target)


# ------------------------------------------------------------------------------ probs and errors

def test_probabilities_match_full_forwards(trained):
    model, tok = trained
    engine = GenEngine(model, tok, max_new_tokens=24)
    convs = conversations(6, seed=8)
    for conv, r in zip(convs, engine.classify(convs)):
        ids = engine.prepare(conv).ids
        with torch.inference_mode():
            logits = model(torch.tensor([ids + [73037, 25]]))[0, -1]
        sev = torch.stack([logits[t] for t in (22291, 73067, 2093)]).softmax(-1).tolist()
        assert [r.severity_probs[k] for k in ("Safe", "Unsafe", "Controversial")] == pytest.approx(sev, abs=1e-4)
        assert sum(r.severity_probs.values()) == pytest.approx(1.0, abs=1e-5)
        if r.answer is not None:
            assert r.category_probs is not None and sum(r.category_probs.values()) == pytest.approx(1, abs=1e-5)
            assert (r.refusal_prob is not None) == (r.target == "response")


def test_response_category_probabilities_cover_only_response_categories(trained):
    """Jailbreak is a prompt category: a response's category softmax must not lose mass to it."""
    model, tok = trained
    engine = GenEngine(model, tok, max_new_tokens=24)
    convs = [c for c in conversations(40, seed=7) if c[-1]["role"] == "assistant"]
    seen = 0
    for r in engine.classify(convs):
        if r.category_probs is not None:
            seen += 1
            assert "Jailbreak" not in r.category_probs
            assert sum(r.category_probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert seen


def test_too_long_conversation_is_an_input_error(trained):
    model, tok = trained
    engine = GenEngine(model, tok, max_new_tokens=8)
    engine.max_len = 300
    with pytest.raises(InputError, match="exceeds the model's context"):
        engine.prepare([{"role": "user", "content": "word " * 400}])
    with pytest.raises(InputError):
        engine.prepare([{"role": "user", "content": 5}])


def test_guard_uses_the_batched_engine(trained_gen):
    from qguard.guard import Guard

    guard = Guard.from_pretrained(trained_gen, device="cpu")
    convs = conversations(10, seed=4)
    verdicts = guard.classify_conversations(convs)
    results = guard.gen.classify(convs)
    for v, r in zip(verdicts, results):
        if r.answer is None:
            assert v.error is not None and v.label.value == "Unsafe"
        else:
            assert v.label == r.answer.severity and v.categories == r.answer.categories
            assert v.refusal == r.answer.refusal
