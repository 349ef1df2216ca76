"""Compare starter recipe variants on held-out TRAIN sources (never eval/): how the recipe is chosen.

The starter's in-distribution dev slice cannot see the gap between train and benchmark data, so recipe
choices are made on whole shares of the train sources closest to real user traffic, removed from training
here (docs/starter_model.md, "How the recipe was chosen"):

- 40% of the GuardReasoner sample (WildGuardTrain/Aegis prompts), 30% of Latent Jailbreak, 15% of the
  GPTFuzz responses;
- all of CoCoNot, JBB behaviors, the JailbreakBench responses and the benign OASST and Arena-Hard prompts.

One variant per run: the starter recipe without the Controversial step (its A/B models would add noise),
with the given architecture and time budgets, then strict-mode scores on the held-out rows: unsafe F1 per
source, and the share of the benign OASST / Arena-Hard prompts flagged (lower is better). Appends one JSON
line to --results.

    .venv/bin/python scripts/starter_heldout.py --name base --pretrain-minutes 10 --minutes 14 --threads 1
    .venv/bin/python scripts/starter_heldout.py --name 4layers --layers 4 --pretrain-minutes 10 --minutes 14
    .venv/bin/python scripts/starter_heldout.py --name wrap --wrapped 4000 --benign-after-unsafe 0.3 ...

Blind spots (docs/starter_model.md, "Style-shortcut breakers"): protocol 1's held-out rows are all English
and only GuardReasoner and JBB behaviors measure plain harmful requests; `--protocol 2` adds held-out
harmful requests and Chinese/Korean comments, but rows of sources still in training are near the ceiling.
Neither showed the benchmark regression of the wrapped-prompt variant: a gain here is necessary, not
sufficient.

(about 27 minutes each; the runs of 2026-11-30 ran three at once, one thread each, on the 2-core machine.)
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import torch

from qguard.policy import Severity
from qguard.tokenizer import load_tokenizer
from qguard.train.data import encode_rows
from qguard.train.pretrain import PretrainConfig, pretrain_backbone
from qguard.train.starter import (
    SHARED_TRAIN,
    UPSAMPLE,
    StarterRecipe,
    add_token_label_rows,
    load_sources,
    pretrain_sequences,
    sample_sources,
    training_rows,
)
from qguard.train.stream import (
    DEFAULT_ARCH,
    StreamTrainConfig,
    fresh_model,
    gold,
    predict,
    train_stream,
    unsafe_f1,
)

HELD_OUT = {"guardreasoner_train_sample": 0.4, "latent_jailbreak": 0.3, "gptfuzz_responses": 0.15, "coconot": 1.0,
            "jbb_behaviors": 1.0, "jailbreakbench_responses": 1.0, "benign_oasst_prompts": 1.0, "benign_arena_hard": 1.0}
# Protocol 2 (2026-11-30) also holds out plain harmful requests (CatQA/HarmfulQA/DangerousQA in English and
# Chinese, SG-Bench) and Chinese and Korean offensive comments, because protocol 1 has no row outside English.
# It did not show the benchmark regression of the wrapped-prompt variant either (rows of a source still in
# training are near the ceiling), so it is an option, not the default (docs/starter_model.md).
HELD_OUT_2 = {**HELD_OUT, "red_instruct": 0.2, "sgbench_malicious": 0.2, "cold": 0.05, "kmhas": 0.05}
BY_LANGUAGE = ("red_instruct",)  # also scored per language
BENIGN = ("benign_oasst_prompts", "benign_arena_hard")


def split_sources(sources: dict, seed: int, shares: dict[str, float] = HELD_OUT) -> tuple[dict, dict]:
    train, held = {}, {}
    for src, rows in sources.items():
        rows = list(rows)
        random.Random(f"{seed}/{src}").shuffle(rows)
        n = round(len(rows) * shares.get(src, 0.0))
        held[src], train[src] = rows[:n], rows[n:]
    return {k: v for k, v in train.items() if v}, {k: v for k, v in held.items() if v}


def scores(model, tok, held: dict, max_len: int) -> dict[str, float]:
    out = {}
    for src, rows in sorted(held.items()):
        rows = [r for r in rows if any(m["role"] == "user" for m in r.messages)]
        ex = encode_rows(tok, rows, max_len, max_len // 2)
        preds, golds = predict(model, ex), [gold(e) for e in ex]
        if src in BENIGN:
            out[f"{src}_flagged_pct"] = round(100 * sum(p is not Severity.SAFE for p in preds) / len(preds), 1)
        else:
            out[f"{src}_f1"] = round(unsafe_f1(preds, golds), 1)
        if src in BY_LANGUAGE:
            for lang in sorted({r.lang for r in rows}):
                idx = [i for i, r in enumerate(rows) if r.lang == lang]
                out[f"{src}_{lang}_f1"] = round(unsafe_f1([preds[i] for i in idx], [golds[i] for i in idx]), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--data", default=str(SHARED_TRAIN))
    ap.add_argument("--layers", type=int, default=DEFAULT_ARCH["num_hidden_layers"])
    ap.add_argument("--intermediate", type=int, default=DEFAULT_ARCH["intermediate_size"])
    ap.add_argument("--pretrain-minutes", type=float, default=12.0)
    ap.add_argument("--minutes", type=float, default=16.0)
    ap.add_argument("--epochs", type=float, default=4.0)
    ap.add_argument("--sparse-embedding", action="store_true", help="lazy Adam on the embedding (train/optim.py)")
    ap.add_argument("--wrapped", type=int, default=0, help="instruction-wrapped prompts (train/augment.py)")
    ap.add_argument("--restyle", type=float, default=0.0, help="share of prompt rows restyled (train/augment.py)")
    ap.add_argument("--benign-after-unsafe", type=float, default=0.0,
                    help="share of the benign answers given to an Unsafe prompt (starter.benign_answers)")
    ap.add_argument("--protocol", type=int, choices=(1, 2), default=1,
                    help="held-out shares: 1 = the rows of 2026-11-28/30, 2 = plus harmful requests, Chinese, Korean")
    ap.add_argument("--upsample", nargs="*", default=[], metavar="SOURCE=FACTOR",
                    help="extra or changed UPSAMPLE factors (row source field)")
    ap.add_argument("--max-len", type=int, default=384)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default="runs/heldout.jsonl")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)
    t0, rng, tok = time.monotonic(), random.Random(a.seed), load_tokenizer()
    arch = dict(DEFAULT_ARCH, num_hidden_layers=a.layers, intermediate_size=a.intermediate)
    train_src, held = split_sources(load_sources([a.data]), a.seed, HELD_OUT if a.protocol == 1 else HELD_OUT_2)
    factors = {**UPSAMPLE, **{k: float(v) for k, v in (x.split("=", 1) for x in a.upsample)}}
    rows = add_token_label_rows(sample_sources(train_src, 1.0, rng), 4000, rng, 4000, a.benign_after_unsafe)
    rows = training_rows(StarterRecipe(wrapped_prompts=a.wrapped, restyle=a.restyle), rows, rng, factors)
    model = fresh_model(arch, a.seed)
    pre = None
    if a.pretrain_minutes > 0:
        seqs = pretrain_sequences(tok, train_src, [], min(a.max_len, 256))
        pre = pretrain_backbone(model, seqs, PretrainConfig(minutes=a.pretrain_minutes, sparse_embedding=a.sparse_embedding))
    cfg = StreamTrainConfig(arch=arch, epochs=a.epochs, max_minutes=a.minutes, lr=3e-3, batch_tokens=8192,
                            max_len=a.max_len, seed=a.seed, warmup_steps=100, sparse_embedding=a.sparse_embedding)
    res = train_stream(cfg, encode_rows(tok, rows, a.max_len, a.max_len // 2), model=model)
    line = {"name": a.name, "wrapped": a.wrapped, "restyle": a.restyle, "benign_after_unsafe": a.benign_after_unsafe,
            "protocol": a.protocol, "upsample": factors, "layers": a.layers, "intermediate": a.intermediate, "sparse_embedding": a.sparse_embedding,
            "pretrain_steps": pre.steps if pre else 0, "train_steps": res.steps,
            "train_seconds": round(res.seconds), **scores(res.model, tok, held, a.max_len),
            "total_seconds": round(time.monotonic() - t0)}
    print(json.dumps(line))
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    with open(a.results, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
