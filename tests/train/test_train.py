"""Training pipeline: token labels, splicing, the report's loss masking, Stream/Gen trainers, CLI, DDP."""

from __future__ import annotations

import json
import os
import random
import socket
from pathlib import Path

import pytest
import torch

from qguard.cli import main
from qguard.errors import CheckpointError, InputError, LabelError
from qguard.guard import Guard
from qguard.model.stream import StreamOutput
from qguard.policy import Category, Severity
from qguard.tokenizer import IM_END, load_tokenizer
from qguard.train import dist as D
from qguard.train.data import (
    IGNORE,
    RISK_INDEX,
    Row,
    encode_row,
    guard_against_eval,
    parse_row,
    read_rows,
    splice,
    token_labels,
)
from qguard.train.gen import GenTrainConfig, encode_gen_row, train_gen
from qguard.train.lora import LoRALinear, add_lora, merge_lora
from qguard.train.stream import (
    DEFAULT_ARCH,
    StreamTrainConfig,
    collate,
    fresh_model,
    gold,
    predict,
    stream_losses,
    train_stream,
)

TINY = dict(DEFAULT_ARCH, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, guard_inner_size=16)
SAFE, UNSAFE, CONTRO = (RISK_INDEX[s] for s in (Severity.SAFE, Severity.UNSAFE, Severity.CONTROVERSIAL))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def prompt_row(text: str, label: str = "Unsafe", cats=("Violent",), rid="p") -> Row:
    return parse_row({"id": rid, "task": "prompt", "messages": [{"role": "user", "content": text}],
                      "label": label, "categories": list(cats) if label != "Safe" else []}, rid)


def response_row(prompt: str, answer: str, label: str = "Unsafe", cats=("Violent",), span=None, rid="r") -> Row:
    obj = {"id": rid, "task": "response", "label": label, "categories": list(cats) if label != "Safe" else [],
           "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
    if span is not None:
        obj["unsafe_span"] = list(span)
    return parse_row(obj, rid)


# ------------------------------------------------------------------------------------------ token labels

def test_token_labels_safe_before_first_unsafe_then_sample_label():
    assert token_labels(5, 2, Severity.UNSAFE) == [SAFE, SAFE, UNSAFE, UNSAFE, UNSAFE]
    assert token_labels(4, 0, Severity.CONTROVERSIAL) == [CONTRO] * 4
    assert token_labels(3, 1, Severity.SAFE) == [SAFE] * 3  # a Safe sample never gets risky tokens
    assert token_labels(3, None, Severity.UNSAFE) == [SAFE] * 3  # no unsafe token found
    assert token_labels(3, 7, Severity.UNSAFE) == [SAFE] * 3  # boundary beyond a truncated answer


def test_prompt_row_is_read_at_the_user_im_end(tok):
    e = encode_row(tok, prompt_row("How do I build a pipe bomb?"))
    assert e.ids[e.query_pos] == IM_END and e.query_pos == len(e.ids) - 1
    assert e.query_label == UNSAFE and e.resp_labels == []
    assert e.query_cat is not None and e.query_cat[0] == 1.0  # Violent is index 0 of the Stream heads
    safe = encode_row(tok, prompt_row("What is the capital of France?", "Safe"))
    assert safe.query_label == SAFE and safe.query_cat is None  # no category loss on Safe rows


def test_unknown_boundary_labels_the_whole_answer(tok):
    e = encode_row(tok, response_row("q", "Here is how to do it: step one."))
    assert e.resp_labels and set(e.resp_labels) == {UNSAFE}
    assert e.query_pos == -1 and e.query_label == IGNORE


def test_splice_boundary_is_the_first_token_of_the_unsafe_text(tok):
    unsafe = response_row("Tell me something", "Kill them all with the knife.", cats=("Violent",))
    row = splice("Sure, I can help with that request.", unsafe, sep=" ")
    assert row.text[row.unsafe_span[0]:].startswith("Kill them all")
    e = encode_row(tok, row)
    first = e.resp_labels.index(UNSAFE)
    answer = e.ids[e.resp_start: e.resp_start + len(e.resp_labels)]
    assert tok.decode(answer[:first]).strip() == "Sure, I can help with that request."
    assert tok.decode(answer[first:]).strip().startswith("Kill")
    assert all(x == UNSAFE for x in e.resp_labels[first:]) and e.resp_cat is not None


def test_toxic_span_offset_marks_the_first_unsafe_token(tok):
    text = "I think that you are a complete idiot and so on."
    start = text.index("complete")
    e = encode_row(tok, response_row("hi", text, span=(start, start + 14), cats=("Unethical Acts",)))
    first = e.resp_labels.index(UNSAFE)
    answer = e.ids[e.resp_start: e.resp_start + len(e.resp_labels)]
    assert tok.decode(answer[first:first + 1]).strip() == "complete"
    assert gold(e) is Severity.UNSAFE


def test_long_rows_are_cut_with_labels_kept_in_step(tok):
    long = " ".join(["word"] * 600)
    e = encode_row(tok, response_row("q " * 300, long), max_len=64, max_prompt=24)
    assert len(e.ids) == 64 and e.resp_start == 24 and len(e.resp_labels) == 40
    p = encode_row(tok, prompt_row(long), max_len=32)
    assert len(p.ids) == 32 and p.ids[p.query_pos] == IM_END


# --------------------------------------------------------------------------------------------- losses

def _fake_out(B: int, T: int) -> StreamOutput:
    g = torch.Generator().manual_seed(0)
    return StreamOutput(*(torch.randn(B, T, n, generator=g, requires_grad=True) for n in (3, 8, 3, 9)))


def test_losses_touch_only_their_positions(tok):
    rows = [prompt_row("Make a bomb", rid="a"), prompt_row("Hello there", "Safe", rid="b"),
            splice("Fine, thanks.", response_row("hey", "You idiot, go die.", cats=("Violent",)))]
    examples = [encode_row(tok, r) for r in rows]
    b = collate(examples)
    out = _fake_out(*b.ids.shape)
    losses = stream_losses(out, b)
    sum(losses.values()).backward()
    qgrad = out.query_risk_logits.grad.abs().sum(-1)
    for r, e in enumerate(examples):  # query risk: the user <|im_end|> of prompt rows only
        expect = {e.query_pos} if e.query_pos >= 0 else set()
        assert set(qgrad[r].nonzero().flatten().tolist()) == expect
    qcat = out.query_category_logits.grad.abs().sum(-1)
    assert qcat[0].sum() > 0 and qcat[1].sum() == 0  # category only where the gold risk is not Safe
    e = examples[2]
    rgrad = out.risk_logits.grad.abs().sum(-1)[2]
    span = set(range(e.resp_start, e.resp_start + len(e.resp_labels)))
    assert set(rgrad.nonzero().flatten().tolist()) == span  # every response token, nothing else
    cgrad = out.category_logits.grad.abs().sum(-1)[2]
    risky = {e.resp_start + i for i, x in enumerate(e.resp_labels) if x != SAFE}
    assert risky and set(cgrad.nonzero().flatten().tolist()) == risky  # not on the Safe opening
    assert out.risk_logits.grad[:2].abs().sum() == 0  # prompt rows never train the response head


def test_response_loss_is_a_mean_over_all_response_tokens(tok):
    examples = [encode_row(tok, response_row("q", "a b c", "Safe")),
                encode_row(tok, response_row("q", "one two three four five six seven", "Safe"))]
    b = collate(examples)
    out = _fake_out(*b.ids.shape)
    got = stream_losses(out, b)["response"]
    mask = b.resp_labels != IGNORE
    want = torch.nn.functional.cross_entropy(out.risk_logits[mask], b.resp_labels[mask])
    assert torch.allclose(got, want)


# -------------------------------------------------------------------------------------------- trainer

def _fixture_rows() -> list[dict]:
    rng = random.Random(0)
    bad = ["how do I make a bomb", "kill my neighbour", "steal a car fast", "poison the water"]
    good = ["what is the capital of France", "write a poem about spring", "sum of 2 and 3", "bake bread"]
    rows = []
    for i in range(24):
        unsafe = i % 2 == 0
        text = rng.choice(bad if unsafe else good)
        rows.append({"id": f"p{i}", "task": "prompt", "messages": [{"role": "user", "content": text}],
                     "label": "Unsafe" if unsafe else "Safe", "categories": ["Violent"] if unsafe else []})
        ans = "Sure, here is how: first get the explosive." if unsafe else "I can't help with that."
        rows.append({"id": f"r{i}", "task": "response", "label": "Unsafe" if unsafe else "Safe",
                     "categories": ["Violent"] if unsafe else [],
                     "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": ans}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    return path


def test_cli_train_stream_end_to_end(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", _fixture_rows())
    out = tmp_path / "ckpt"
    rc = main(["train", "stream", "--data", str(data), "--out", str(out), "--max-steps", "4", "--batch-tokens", "2048",
               "--arch", json.dumps({k: TINY[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                           "num_attention_heads", "num_key_value_heads", "head_dim",
                                                           "guard_inner_size")}),
               "--splices", "4", "--no-tokenizer-files", "--sparse-embedding"])
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForGuardModel"] and cfg["guard_inner_size"] == 16
    assert cfg["query_category_map"]["8"] == "Jailbreak" and cfg["response_risk_level_map"]["2"] == "Controversial"
    assert not (out / "tokenizer.json").exists()
    g = Guard.from_pretrained(out)
    assert g.classify_prompt("how do I make a bomb").label in set(Severity)
    assert g.classify_response("hi", "Sure, here is how").label in set(Severity)


def test_training_learns_a_separable_fixture(tok):
    rows = [parse_row(r, r["id"]) for r in _fixture_rows()]
    ex = [encode_row(tok, r) for r in rows]
    res = train_stream(StreamTrainConfig(arch=dict(TINY), max_steps=60, lr=1e-2, batch_tokens=4096, log_every=10), ex)
    assert res.history[-1]["query"] < res.history[0]["query"]
    preds = predict(res.model, ex)
    acc = sum(p is gold(e) for p, e in zip(preds, ex)) / len(ex)
    assert acc > 0.8


def test_lora_and_frozen_backbones(tmp_path, tok):
    ex = [encode_row(tok, parse_row(r, r["id"])) for r in _fixture_rows()[:8]]
    base = tmp_path / "base"
    train_stream(StreamTrainConfig(out=base, arch=dict(TINY), max_steps=1, tokenizer_files=False), ex)
    before = Guard.from_pretrained(base).model.state_dict()
    res = train_stream(StreamTrainConfig(out=tmp_path / "lora", init=str(base), backbone="lora", lora_rank=4,
                                         max_steps=3, lr=1e-2, tokenizer_files=False), ex)
    after = Guard.from_pretrained(tmp_path / "lora").model.state_dict()  # plain names: adapters merged
    assert not any(isinstance(m, LoRALinear) for m in res.model.modules())
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])  # frozen under LoRA
    res = train_stream(StreamTrainConfig(init=str(base), backbone="frozen", max_steps=2, lr=1e-2), ex)
    frozen = res.model.state_dict()
    assert torch.equal(before["model.layers.0.mlp.up_proj.weight"], frozen["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(before["query_head.risk.weight"], frozen["query_head.risk.weight"])


def test_lora_merge_is_exact():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 6, bias=False)
    holder = torch.nn.Module()
    holder.q_proj = lin
    add_lora(holder, rank=2, alpha=4.0)
    with torch.no_grad():
        holder.q_proj.lora_b.normal_()
    x = torch.randn(3, 8)
    y = holder.q_proj(x)
    merge_lora(holder)
    assert isinstance(holder.q_proj, torch.nn.Linear)
    assert torch.allclose(holder.q_proj(x), y, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_single_process_gloo_group(tok, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        ctx = D.setup("cpu")
        assert ctx.enabled and ctx.is_main
        ex = [encode_row(tok, parse_row(r, r["id"])) for r in _fixture_rows()[:8]]
        res = train_stream(StreamTrainConfig(arch=dict(TINY), max_steps=3, log_every=1), ex, ctx)
        assert res.steps == 3 and len(res.history) == 3
        assert sorted(ctx.shard(list(range(5)), epoch=0, seed=0)) == [0, 1, 2, 3, 4]
    finally:
        dist.destroy_process_group()


def test_no_distributed_environment_is_a_noop(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = D.setup("cpu")
    m = torch.nn.Linear(2, 2)
    assert not ctx.enabled and ctx.wrap(m) is m and ctx.world == 1


# --------------------------------------------------------------------------------------------- errors

def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_rows(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": "prompt", "messages": [{"role": "user", "content": "x"}], "label": "Safe"}\n{oops\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: not valid JSON"):
        read_rows(bad)
    cat = write_jsonl(tmp_path / "cat.jsonl", [{"task": "prompt", "messages": [{"role": "user", "content": "x"}],
                                                "label": "Unsafe", "categories": ["Weird Stuff"]}])
    with pytest.raises(LabelError, match=r"cat.jsonl:1: unknown category 'Weird Stuff'"):
        read_rows(cat)
    with pytest.raises(LabelError, match="prompt-only"):
        response_row("q", "a", cats=("Jailbreak",))
    with pytest.raises(InputError, match="must end with a user message"):
        parse_row({"task": "prompt", "label": "Safe",
                   "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "x")
    with pytest.raises(InputError, match="unsafe_span"):
        response_row("q", "abc", span=(2, 99))
    with pytest.raises(InputError, match="eval/ folder"):
        guard_against_eval([tmp_path / "eval" / "x.jsonl"])


def test_cli_reports_bad_data_as_an_error(tmp_path, capsys):
    rc = main(["train", "stream", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "training data not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ Gen

def test_gen_labels_cover_only_known_answer_tokens(tok):
    row = response_row("how to hack", "Sure, step 1...", cats=("Non-violent Illegal Acts",))
    e = encode_gen_row(tok, row)  # refusal unknown: its value carries no loss
    trained = [t for t in e.labels if t != IGNORE]
    # " No" is one token (space included), so the untrained value takes its space with it
    assert tok.decode(trained) == "Safety: Unsafe\nCategories: Non-violent Illegal Acts\nRefusal:<|im_end|>"
    n_prompt = e.labels.index(trained[0])
    assert all(x == IGNORE for x in e.labels[:n_prompt])
    assert e.ids[n_prompt + 1] == trained[0]  # labels are next-token targets
    p = encode_gen_row(tok, prompt_row("hello", "Safe"))
    assert tok.decode([t for t in p.labels if t != IGNORE]) == "Safety: Safe\nCategories: None<|im_end|>"


def test_gen_sft_reduces_loss_and_saves_an_official_gen_checkpoint(tiny_gen, tmp_path, tok):
    rows = [prompt_row("make a bomb", rid="a"), prompt_row("bake bread", "Safe", rid="b"),
            parse_row({"id": "c", "task": "response", "label": "Safe", "categories": [], "refusal": True,
                       "messages": [{"role": "user", "content": "hurt someone"},
                                    {"role": "assistant", "content": "I can't help."}]}, "c")]
    ex = [encode_gen_row(tok, r) for r in rows]
    out = tmp_path / "gen"
    res = train_gen(GenTrainConfig(init=str(tiny_gen), out=out, max_steps=12, lr=3e-3, batch_tokens=4096), ex)
    assert res["losses"][-1] < 0.7 * res["losses"][0]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["tie_word_embeddings"] is True
    g = Guard.from_pretrained(out)
    assert g.kind.value == "gen"
    v = g.classify_prompt("make a bomb")
    assert v.label in set(Severity)


def test_category_strings_round_trip_through_the_saved_config(tmp_path, tok):
    ex = [encode_row(tok, prompt_row("x", rid="a"))]
    train_stream(StreamTrainConfig(out=tmp_path / "c", arch=dict(TINY), max_steps=1, tokenizer_files=False), ex)
    g = Guard.from_pretrained(tmp_path / "c")
    assert g.labels.query_category[8] is Category.JAILBREAK and g.labels.category[0] is Category.VIOLENT
    assert os.path.getsize(tmp_path / "c" / "model.safetensors") < 151936 * 32 * 2 + 200_000  # bf16
    assert fresh_model(TINY, 0).model.embed_tokens.weight.std() < 0.05


def test_category_weights_favour_rare_classes_and_skip_unseen():
    from qguard.train.stream import category_weights

    w = category_weights([[1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], None], 3)
    assert w[1] > w[0] > 0 and w[2] == 0
    assert torch.isclose(w[:2].mean(), torch.tensor(1.0))


def test_schedule_warms_up_then_decays_to_ten_percent():
    from qguard.train.stream import Schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = Schedule(opt, warmup=4, total=20, minutes=None)
    lrs = []
    for step in range(21):
        s.step(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == 0.25 and max(lrs) == 1.0 and abs(lrs[-1] - 0.1) < 1e-9
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_benign_answers_and_splices_are_added_with_user_turns():
    from qguard.train.starter import add_token_label_rows

    rows = [parse_row({"id": f"benign_x/{i}", "source": "benign_x", "task": "prompt", "label": "Safe",
                       "messages": [{"role": "user", "content": f"Question {i}: " + "tell me about rivers " * 5}]}, "b")
            for i in range(6)]
    rows += [parse_row({"id": "c", "task": "response", "label": "Unsafe", "categories": ["Unethical Acts"],
                        "messages": [{"role": "assistant", "content": "you are a stupid idiot"}],
                        "unsafe_span": [10, 22]}, "c"),
             response_row("hello", "Nice to meet you, how are you today?", "Safe", rid="d")]
    out = add_token_label_rows(rows, n_splices=3, rng=random.Random(0), n_benign=4)
    answers = [r for r in out if "+as_answer" in r.id]
    assert len(answers) == 4 and all(r.task == "response" and r.label is Severity.SAFE for r in answers)
    assert all(r.messages[0]["role"] == "user" for r in out)  # the comment got a user turn
    splices = [r for r in out if r.id.endswith("+splice")]
    assert len(splices) == 3
    for r in splices:
        # the row's own toxic span, shifted past the benign opening
        assert r.text[r.unsafe_span[0]: r.unsafe_span[1]] == "stupid idiot" and r.unsafe_span[0] > 12


def test_benign_answers_can_follow_unsafe_prompts_and_stay_safe():
    from qguard.train.starter import benign_answers

    benign = [parse_row({"id": f"benign_x/{i}", "source": "benign_x", "task": "prompt", "label": "Safe",
                         "messages": [{"role": "user", "content": f"Passage {i}: " + "rivers flow to the sea " * 5}]}, "b")
              for i in range(40)]
    harmful = [parse_row({"id": f"h/{i}", "source": "h", "task": "prompt", "label": "Unsafe",
                          "messages": [{"role": "user", "content": f"how do I hurt person {i}"}]}, "h") for i in range(5)]
    out = benign_answers(benign + harmful, 40, random.Random(0), after_unsafe=0.5)
    after = [r for r in out if r.messages[0]["content"].startswith("how do I hurt")]
    assert 10 <= len(after) <= 30 and all(r.label is Severity.SAFE and r.task == "response" for r in out)
    assert all(r.text.startswith("Passage") for r in out)
    assert not any(r.messages[0]["content"].startswith("how do I hurt")
                   for r in benign_answers(benign + harmful, 40, random.Random(0)))


def test_the_shipped_starter_model():
    """The embedded artifact: official Stream format, <= 30 MB, loads offline, sane on blatant cases."""
    from qguard.starter import starter_model_path

    path = starter_model_path()
    if path is None:
        pytest.skip("this build ships no starter model")
    assert sum(f.stat().st_size for f in path.iterdir()) <= 30_000_000
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForGuardModel"] and cfg["vocab_size"] == 151936
    g = Guard.from_pretrained(path)
    assert g.classify_prompt("How do I make a pipe bomb to kill people?").is_unsafe
    assert not g.classify_prompt("What is the capital of France?").is_unsafe


def test_upsample_repeats_only_the_named_sources():
    from qguard.train.starter import upsample

    rows = [parse_row({"id": f"{src}/{i}", "source": src, "task": "prompt", "label": "Safe",
                       "messages": [{"role": "user", "content": f"q {i}"}]}, "u")
            for src in ("a", "b") for i in range(10)]
    out = upsample(rows, {"a": 2.5}, random.Random(0))
    count = {src: sum(r.source == src for r in out) for src in ("a", "b")}
    assert count == {"a": 25, "b": 10}
    assert len({r.id for r in out if r.source == "a"}) == 10  # copies of the same rows, nothing invented


def test_sampled_lm_loss_is_the_full_softmax_when_every_token_is_a_candidate():
    from qguard.train.pretrain import sampled_lm_loss

    g = torch.Generator().manual_seed(0)
    emb, hidden = torch.randn(50, 8, generator=g), torch.randn(12, 8, generator=g)
    targets = torch.randint(0, 50, (12,), generator=g)
    full = torch.nn.functional.cross_entropy(hidden @ emb.T, targets)
    torch.testing.assert_close(sampled_lm_loss(hidden, targets, emb, torch.arange(50)), full)
    # with fewer candidates the loss is smaller (fewer competitors), never larger
    assert sampled_lm_loss(hidden, targets, emb, torch.tensor([0])) <= full


def test_pretraining_learns_next_tokens_and_leaves_the_heads_alone(tok):
    from qguard.train.pretrain import PretrainConfig, pretrain_backbone, sampled_lm_loss

    # two fixed "sentences": after pre-training the backbone predicts their next tokens far better
    seqs = [tok("the quick brown fox jumps over the lazy dog")["input_ids"],
            tok("un deux trois quatre cinq six sept huit")["input_ids"]] * 8
    model = fresh_model(TINY, 0)
    heads = {k: v.clone() for k, v in model.state_dict().items() if "head" in k}
    ids = torch.tensor(seqs[0])[None]
    cand = torch.tensor(sorted({t for s in seqs for t in s}))

    def loss() -> float:
        with torch.no_grad():
            return float(sampled_lm_loss(model.model(ids)[0, :-1], ids[0, 1:], model.model.embed_tokens.weight, cand))

    before = loss()
    res = pretrain_backbone(model, seqs, PretrainConfig(minutes=None, max_steps=60, lr=1e-2, warmup_steps=5,
                                                        negatives=16, log_every=10))
    assert res.steps == 60 and res.tokens > 0 and len(res.history) == 6
    assert loss() < 0.3 * before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in heads.items())
    # the pre-trained model is the starting point of the Stream trainer
    ex = [encode_row(tok, prompt_row("how do I build a bomb", rid="a")),
          encode_row(tok, prompt_row("how do I bake bread", "Safe", rid="b"))]
    out = train_stream(StreamTrainConfig(arch=TINY, max_steps=2, warmup_steps=1), ex, model=model)
    assert out.model is model


def test_sparse_embedding_adam_equals_dense_adam_except_that_absent_rows_stay_put():
    from qguard.train.optim import TrainOptimizer

    dense, lazy = fresh_model(TINY, 0), fresh_model(TINY, 0)
    opts = {id(dense): TrainOptimizer(dense, 1e-2, 0.01), id(lazy): TrainOptimizer(lazy, 1e-2, 0.01, sparse_embedding=True)}
    assert lazy.model.embed_tokens.sparse and not dense.model.embed_tokens.sparse

    def step(model, ids) -> float:
        out = model(ids)
        (1e4 * sum(t.float().square().mean() for t in vars(out).values())).backward()
        opt = opts[id(model)]
        norm = float(opt.clip_grad_norm_(1.0))
        assert norm > 1.0  # the clip coefficient is active
        opt.step()
        opt.zero_grad()
        return norm

    first, second = torch.arange(10, 20)[None], torch.arange(30, 40)[None]
    assert step(dense, first) == pytest.approx(step(lazy, first), rel=1e-5)
    # step 1: identical everywhere (up to where SparseAdam adds eps: visible only for gradients near 1e-8)
    close = dict(atol=1e-4, rtol=1e-3)  # a step moves a weight by ~lr = 1e-2
    for a, b in zip(dense.parameters(), lazy.parameters()):
        torch.testing.assert_close(a, b, **close)
    emb_after_first = lazy.model.embed_tokens.weight.detach().clone()
    assert step(dense, second) == pytest.approx(step(lazy, second), rel=1e-5)
    d, w = dense.model.embed_tokens.weight.detach(), lazy.model.embed_tokens.weight.detach()
    # rows of step 1 only: dense Adam keeps moving them on momentum, lazy Adam leaves them where they were
    assert torch.equal(w[10:20], emb_after_first[10:20]) and not torch.allclose(d[10:20], w[10:20])
    keep = torch.ones(len(w), dtype=torch.bool)
    keep[10:20] = False
    torch.testing.assert_close(d[keep], w[keep], **close)  # every other row (and every other tensor) agrees
    for (name, a), b in zip(dense.named_parameters(), lazy.parameters()):
        if "embed_tokens" not in name:
            torch.testing.assert_close(a, b, **close)
    opts[id(lazy)].close()
    assert not lazy.model.embed_tokens.sparse


def test_pretraining_rejects_empty_input():
    from qguard.train.pretrain import PretrainConfig, pretrain_backbone

    with pytest.raises(InputError, match="sequence"):
        pretrain_backbone(fresh_model(TINY, 0), [[1]], PretrainConfig(max_steps=1))
    with pytest.raises(InputError, match="budget"):
        pretrain_backbone(fresh_model(TINY, 0), [[1, 2, 3]], PretrainConfig(minutes=None))


def test_train_starter_end_to_end_with_pretraining(tmp_path):
    """The one re-training command, at toy scale on a toy data folder: pre-train, train, save, load."""
    data = tmp_path / "train"
    data.mkdir()
    rows = []
    for i in range(12):
        bad = i % 2 == 0
        rows.append({"id": f"p{i}", "task": "prompt", "label": "Unsafe" if bad else "Safe",
                     "categories": ["Violent"] if bad else [],
                     "messages": [{"role": "user", "content": ("how to hurt someone " if bad else "a recipe for soup ")
                                   + str(i)}]})
        rows.append({"id": f"r{i}", "task": "response", "label": "Unsafe" if bad else "Safe",
                     "categories": ["Violent"] if bad else [],
                     "messages": [{"role": "user", "content": "tell me"},
                                  {"role": "assistant", "content": ("hit them hard " if bad else "sure, here it is ")
                                   + str(i)}]})
    (data / "toy.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", "utf-8")
    out = tmp_path / "starter"
    rc = main(["train", "starter", "--data", str(data), "--out", str(out), "--minutes", "0.05",
               "--pretrain-minutes", "0.03", "--controversial-minutes", "0", "--epochs", "1", "--dev-fraction", "0.3"])
    assert rc == 0
    summary = json.loads((out / "training_summary.json").read_text("utf-8"))
    assert summary["pretrain"]["steps"] >= 1 and summary["pretrain"]["sequences"] >= 15  # every row but the dev slice
    g = Guard.from_pretrained(out)  # with the calibration fitted on the dev slice (step 7)
    assert g.classify_prompt("hello").label in set(Severity)
    assert g.calibration.temperature == summary["calibration"]["temperature"]


def test_every_upsampled_source_exists_in_the_train_data():
    """UPSAMPLE matches the rows' `source` field; a key that matches no row silently repeats nothing."""
    from qguard.train.starter import SHARED_TRAIN, UPSAMPLE, load_sources

    if not SHARED_TRAIN.is_dir():
        pytest.skip(f"needs the public train data at {SHARED_TRAIN} (../shared/data/train; CI has it)")
    present = {r.source for rows in load_sources([str(SHARED_TRAIN)]).values() for r in rows}
    assert set(UPSAMPLE) <= present, sorted(set(UPSAMPLE) - present)


# ------------------------------------------------------------------------------ saving and run safety

TINY_ARCH = json.dumps({k: TINY[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "num_key_value_heads", "head_dim",
                                              "guard_inner_size")})


def test_an_interrupted_save_leaves_the_old_checkpoint_and_a_new_one_leaves_nothing_stale(tmp_path, monkeypatch):
    import qguard.weights
    from qguard.train.stream import fresh_model, save_stream

    out = tmp_path / "ckpt"
    save_stream(fresh_model(dict(TINY), 0), out, tokenizer_files=False)
    (out / "qguard_calibration.json").write_text("{}")  # a file fitted for this model only
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def killed(*a, **k):
        raise KeyboardInterrupt
    # write_checkpoint copies the tokenizer last: dying there is dying after the config and the weights
    monkeypatch.setattr(qguard.weights, "copy_tokenizer_files", killed)
    with pytest.raises(KeyboardInterrupt):
        save_stream(fresh_model(dict(TINY, hidden_size=64), 1), out, tokenizer_files=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no half-written folder left either
    monkeypatch.undo()
    save_stream(fresh_model(dict(TINY, hidden_size=64), 1), out, tokenizer_files=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # the old calibration went
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 64
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("my notes")
    with pytest.raises(CheckpointError, match="holds files but no checkpoint"):
        save_stream(fresh_model(dict(TINY), 0), other, tokenizer_files=False)
    assert (other / "notes.txt").read_text() == "my notes"


def test_a_diverged_run_stops_without_saving_and_nan_weights_never_load(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", _fixture_rows())
    out = tmp_path / "nan"
    rc = main(["train", "stream", "--data", str(data), "--out", str(out), "--max-steps", "30", "--lr", "1e9",
               "--batch-tokens", "2048", "--arch", TINY_ARCH, "--no-tokenizer-files"])
    assert rc == 2 and "non-finite" in capsys.readouterr().err
    assert not (out / "config.json").exists()
    from safetensors.torch import load_file, save_file

    from qguard.train.stream import fresh_model, save_stream

    save_stream(fresh_model(dict(TINY), 0), out, tokenizer_files=False)
    sd = load_file(str(out / "model.safetensors"))
    sd["model.norm.weight"][0] = float("nan")
    save_file(sd, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="NaN or infinite values: \\['model.norm.weight'\\]"):
        Guard.from_pretrained(out)


def test_train_stream_cli_checks_its_options_before_the_data(tmp_path, tiny_gen, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", _fixture_rows())
    out = str(tmp_path / "o")
    for argv, msg in [
        (["--init", str(tiny_gen)], "is a gen checkpoint; train stream needs a Stream one"),
        (["--arch", '{"hiden_size": 64}'], "unknown keys ['hiden_size']"),
        (["--arch", '{"vocab_size": 1000}'], "smaller than the tokenizer's"),
        (["--controversial-max-fraction", "2"], "must be in (0, 1]"),
    ]:
        assert main(["train", "stream", "--data", str(data), "--out", out, "--max-steps", "1", *argv]) == 2
        assert msg in capsys.readouterr().err, argv
    string_cats = write_jsonl(tmp_path / "s.jsonl", [{"task": "prompt", "label": "Unsafe", "categories": "Violent",
                                                      "messages": [{"role": "user", "content": "x"}]}])
    assert main(["train", "stream", "--data", str(string_cats), "--out", out]) == 2
    assert "categories must be a list of names, got str" in capsys.readouterr().err


def test_train_stream_gives_comments_without_a_user_turn_one(tmp_path):
    rows = _fixture_rows() + [{"id": "c1", "task": "response", "label": "Unsafe", "categories": [],
                               "messages": [{"role": "assistant", "content": "you are all idiots"}],
                               "unsafe_span": [12, 18]}]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    rc = main(["train", "stream", "--data", str(data), "--out", str(tmp_path / "o"), "--max-steps", "2",
               "--batch-tokens", "2048", "--arch", TINY_ARCH, "--no-tokenizer-files"])
    assert rc == 0 and (tmp_path / "o" / "config.json").is_file()


def test_a_folder_with_other_files_is_refused_before_training(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", _fixture_rows())
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for argv in (["stream", "--arch", TINY_ARCH], ["starter", "--minutes", "0.01"]):
        assert main(["train", *argv, "--data", str(data), "--out", str(mine)]) == 2
        assert "holds files but no checkpoint" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me"
