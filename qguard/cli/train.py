"""`qguard train stream|gen|starter|label-rollouts`: training and labeling (see docs/starter_model.md).

`train stream` and `train gen` run unchanged under `torchrun --nproc-per-node N -m qguard train ...` or
`accelerate launch -m qguard train ...` (DDP; `--fsdp` for FSDP).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
from pathlib import Path

from qguard.cli import checkpoint_dir, device, output_file, positive_float, positive_int
from qguard.errors import InputError

log = logging.getLogger("qguard.train")


def register(sub) -> None:
    p = sub.add_parser("train", help="train Stream heads, Gen SFT, the starter model; label data")
    tsub = p.add_subparsers(dest="train_command", required=True, metavar="WHAT")
    _stream_parser(tsub)
    _gen_parser(tsub)
    _starter_parser(tsub)
    _rollout_parser(tsub)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", required=True, help="JSONL files or folders of *.jsonl (canonical schema)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--epochs", type=positive_float, default=1.0)
    p.add_argument("--max-steps", type=positive_int, default=None)
    p.add_argument("--minutes", type=positive_float, default=None, help="wall-clock budget; stops cleanly when spent")
    p.add_argument("--batch-tokens", type=positive_int, default=8192, help="padded tokens per step (per process)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, type=device,
                   help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--fsdp", action="store_true", help="FSDP instead of DDP when run under torchrun")
    p.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])


def _stream_parser(tsub) -> None:
    p = tsub.add_parser("stream", help="train Qwen3Guard-Stream heads (and optionally the backbone)")
    _common(p)
    p.add_argument("--init", default=None, help="Stream checkpoint to start from (default: a fresh model, --arch)")
    p.add_argument("--arch", default=None,
                   help="JSON object overriding the fresh model's config (hidden_size, ...); not with --init")
    p.add_argument("--backbone", default="full", choices=["full", "frozen", "lora"])
    p.add_argument("--lora-rank", type=positive_int, default=8)
    p.add_argument("--lr", type=positive_float, default=2e-3)
    p.add_argument("--max-len", type=positive_int, default=256, help="tokens per training sequence")
    p.add_argument("--splices", type=int, default=0,
                   help="add N benign-opening + unsafe-response splices (first unsafe token known)")
    p.add_argument("--controversial-minutes", type=float, default=0.0,
                   help="run the A/B strict/loose Controversial relabelling first, with this budget")
    p.add_argument("--controversial-max-fraction", type=float, default=None,
                   help="relabel at most this share of the rows, the largest strict/loose gaps first (default: every "
                        "disagreement, as the report; small or briefly trained A/B models disagree often)")
    p.add_argument("--no-tokenizer-files", action="store_true", help="do not copy the Qwen3 tokenizer files")
    p.add_argument("--sparse-embedding", action="store_true",
                   help="lazy Adam on a sparse token-embedding gradient: faster CPU steps, not always a better model "
                        "(single process; docs/benchmarks.md, Training)")
    p.set_defaults(func=run_stream)


def _gen_parser(tsub) -> None:
    p = tsub.add_parser("gen", help="SFT a Qwen3 causal LM to the Qwen3Guard-Gen answer format")
    _common(p)
    p.add_argument("--init", required=True, help="Qwen3ForCausalLM checkpoint (Gen or base model)")
    p.add_argument("--lr", type=positive_float, default=1e-5)
    p.add_argument("--max-content-chars", type=positive_int, default=4000)
    p.set_defaults(func=run_gen)


def _starter_parser(tsub) -> None:
    p = tsub.add_parser("starter", help="re-train the embedded starter model (the one command)")
    p.add_argument("--data", nargs="+", default=None, help="default: ../shared/data/train")
    p.add_argument("--out", default=None, help="default: qguard/assets/starter")
    p.add_argument("--minutes", type=float, default=None, help="final training budget (default 20)")
    p.add_argument("--controversial-minutes", type=float, default=None, help="A/B models budget (default 4, 0 skips)")
    p.add_argument("--pretrain-minutes", type=float, default=None,
                   help="self-supervised pre-training of the backbone first (default 12, 0 skips)")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--scale", type=float, default=None, help="multiply the per-source row caps")
    p.add_argument("--dev-fraction", type=float, default=None,
                   help="share of rows held out as the dev slice: dev F1 and the calibration fit (default 0.03)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=run_starter)


def _rollout_parser(tsub) -> None:
    p = tsub.add_parser("label-rollouts", help="first-unsafe-token labels by LLM rollouts + a Gen judge")
    p.add_argument("--data", required=True, help="JSONL of response rows")
    p.add_argument("--out", required=True, help="JSONL with unsafe_span set where a boundary was found")
    p.add_argument("--llm", required=True, help="hf:PATH_OR_ID or openai:BASE_URL#MODEL (rollout generator)")
    p.add_argument("--judge", required=True, help="Gen guard checkpoint that judges finished rollouts")
    p.add_argument("--confirm-llm", default=None, help="LLM-as-judge for the confirmation (default: --llm)")
    p.add_argument("--rollouts", type=positive_int, default=8)
    p.add_argument("--threshold", type=float, default=0.85)
    p.add_argument("--stride", type=positive_int, default=1)
    p.add_argument("--api-key", default=None)
    p.set_defaults(func=run_rollouts)


# ------------------------------------------------------------------------------------------- runners

def _setup(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("qguard").setLevel(logging.INFO)


def _read(args: argparse.Namespace):
    from qguard.data.schema import expand_paths, guard_against_eval, read_rows

    files = expand_paths(args.data)
    guard_against_eval(files)
    rows = [r for f in files for r in read_rows(f)]
    if not rows:
        raise InputError("the training data has no rows")
    return rows


def run_stream(args: argparse.Namespace) -> int:
    from qguard.families.registry import STREAM, family_for
    from qguard.tokenizer import load_tokenizer
    from qguard.train import labeling
    from qguard.train.data import encode_rows
    from qguard.train.starter import add_token_label_rows
    from qguard.train.stream import StreamTrainConfig, train_stream
    from qguard.weights import open_checkpoint

    _setup(args)
    if args.max_len < 8:
        raise InputError("--max-len must be at least 8 tokens (a chat template alone takes several)")
    if args.init is not None:  # before reading data: the wrong kind of checkpoint fails at once
        ckpt = open_checkpoint(args.init)
        if not STREAM.matches(ckpt.config):
            family = family_for(ckpt.config, str(ckpt.path / "config.json"))  # or: no family at all
            raise InputError(f"--init {args.init} is a {family.name} checkpoint; train stream needs a Stream one")
        if args.arch is not None:
            raise InputError("--arch shapes a fresh model; with --init the checkpoint's own config is used")
    frac = args.controversial_max_fraction
    if frac is not None and not 0 < frac <= 1:
        raise InputError(f"--controversial-max-fraction must be in (0, 1], got {frac}")
    checkpoint_dir(args.out, "--out")  # a bad path fails now, not after the training
    rows = _read(args)
    tok = load_tokenizer(args.init)
    arch = _arch(args.arch, len(tok))
    n_rows = len(rows)
    # comments without a user turn (toxic_spans) get one, as the Stream layout needs it; --splices adds
    # benign-opening splices with a known first unsafe token
    rows = add_token_label_rows(rows, args.splices, random.Random(args.seed))
    n_splices = sum(r.id.endswith("+splice") for r in rows)
    if len(rows) - n_splices < n_rows:
        log.warning("%d response rows have no user turn and no dialogue prompt could be lent to them: dropped",
                    n_rows - (len(rows) - n_splices))
    if args.splices and not n_splices:
        log.warning("--splices %d added none: splicing needs Safe responses (openings) and Unsafe responses",
                    args.splices)
    if args.controversial_minutes > 0:
        trainer = labeling.StreamCrossTrainer(tok, max_len=min(args.max_len, 128), minutes=args.controversial_minutes / 4,
                                              lr=args.lr, arch=arch, batch_tokens=args.batch_tokens)
        rows, stats = labeling.controversial_relabel(rows, trainer, labeling.ControversialConfig(max_fraction=frac),
                                                     seed=args.seed)
        print(json.dumps({"controversial": stats}))
    cfg = StreamTrainConfig(
        out=Path(args.out), init=args.init, arch=arch, backbone=args.backbone, lora_rank=args.lora_rank,
        epochs=args.epochs, max_steps=args.max_steps, max_minutes=args.minutes, lr=args.lr,
        batch_tokens=args.batch_tokens, max_len=args.max_len, seed=args.seed, save_dtype=args.save_dtype,
        tokenizer_files=not args.no_tokenizer_files, device=args.device, strategy="fsdp" if args.fsdp else "ddp",
        sparse_embedding=args.sparse_embedding,
    )
    res = train_stream(cfg, encode_rows(tok, rows, args.max_len, args.max_len // 2))
    _print_main({"out": args.out, "steps": res.steps, "seconds": round(res.seconds, 1),
                      "last": res.history[-1] if res.history else None})
    return 0


def run_gen(args: argparse.Namespace) -> int:
    from qguard.tokenizer import load_tokenizer
    from qguard.train.gen import GenTrainConfig, encode_gen_row, train_gen

    _setup(args)
    checkpoint_dir(args.out, "--out")
    rows = _read(args)
    tok = load_tokenizer(args.init)
    examples = [encode_gen_row(tok, r, args.max_content_chars) for r in rows]
    cfg = GenTrainConfig(init=args.init, out=Path(args.out), epochs=args.epochs, max_steps=args.max_steps,
                         max_minutes=args.minutes, lr=args.lr, batch_tokens=args.batch_tokens, seed=args.seed,
                         save_dtype=args.save_dtype, device=args.device, strategy="fsdp" if args.fsdp else "ddp")
    res = train_gen(cfg, examples)
    _print_main({"out": args.out, "steps": res["steps"], "seconds": round(res["seconds"], 1),
                      "first_loss": res["losses"][0], "last_loss": res["losses"][-1]})
    return 0


def run_starter(args: argparse.Namespace) -> int:
    from qguard.train.starter import StarterRecipe, check_recipe, replace_recipe, train_starter

    logging.getLogger("qguard").setLevel(logging.INFO)
    r = replace_recipe(StarterRecipe(), data=tuple(args.data) if args.data else None,
                       out=Path(args.out) if args.out else None, minutes=args.minutes,
                       controversial_minutes=args.controversial_minutes, pretrain_minutes=args.pretrain_minutes,
                       epochs=args.epochs, scale=args.scale, dev_fraction=args.dev_fraction,
                       threads=args.threads, seed=args.seed)
    check_recipe(r)
    if r.out is not None:
        checkpoint_dir(r.out, "--out")  # checked before 40 minutes of training, not after
    print(json.dumps(train_starter(r), indent=2, default=str))
    return 0


def run_rollouts(args: argparse.Namespace) -> int:
    from qguard.data.schema import read_rows
    from qguard.runtime.guard import Guard
    from qguard.tokenizer import load_tokenizer
    from qguard.train import labeling

    if not 0 < args.threshold <= 1:
        raise InputError(f"--threshold must be in (0, 1], got {args.threshold}")
    out = output_file(args.out, "--out")
    if out.exists() and Path(args.data).exists() and out.samefile(args.data):
        raise InputError("--out must differ from --data (the input would be overwritten)")
    rows = read_rows(args.data)
    llm = _llm(args.llm, args.api_key)
    confirm = labeling.LLMAsJudge(_llm(args.confirm_llm, args.api_key) if args.confirm_llm else llm)
    judge = labeling.GuardJudge(Guard.from_pretrained(args.judge))
    cfg = labeling.RolloutConfig(n_rollouts=args.rollouts, threshold=args.threshold, stride=args.stride)
    tok = load_tokenizer()
    found = 0
    tmp = out.with_name(out.name + ".partial")  # --out only changes once every row is labelled
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            new = labeling.rollout_label_row(r, tok, llm, judge, confirm, cfg)
            found += new.unsafe_span is not None and new.unsafe_span != r.unsafe_span
            f.write(json.dumps(_row_json(new), ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    print(json.dumps({"rows": len(rows), "boundaries_found": found, "out": args.out}))
    return 0


def _print_main(obj: dict) -> None:
    """Print a JSON summary once: on rank 0 under torchrun, always in a single process."""
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(obj))


def _llm(spec: str, api_key: str | None):
    from qguard.train import labeling

    kind, _, rest = spec.partition(":")
    if kind == "hf" and rest:
        return labeling.TransformersLLM(rest)
    if kind == "openai" and "#" in rest:
        url, _, model = rest.rpartition("#")
        return labeling.OpenAICompatLLM(url, model, api_key)
    raise InputError(f"--llm {spec!r}: expected hf:PATH_OR_ID or openai:BASE_URL#MODEL")


def _row_json(r) -> dict:
    return {"id": r.id, "source": r.source, "task": r.task, "messages": list(r.messages), "label": r.label.value,
            "categories": [c.value for c in r.categories], "refusal": r.refusal, "lang": r.lang,
            **({"unsafe_span": list(r.unsafe_span)} if r.unsafe_span else {})}


def _arch(raw: str | None, vocab: int) -> dict:
    """The fresh model's config: DEFAULT_ARCH with the --arch overrides, checked (a misspelt key would be
    ignored silently, a too-small vocabulary would fail deep in the first step)."""
    from qguard.train.stream import DEFAULT_ARCH

    over = _json_arg(raw, "--arch")
    unknown = sorted(set(over) - set(DEFAULT_ARCH))
    if unknown:
        raise InputError(f"--arch: unknown keys {unknown}; known: {', '.join(DEFAULT_ARCH)}")
    arch = dict(DEFAULT_ARCH, **over)
    for k, v in arch.items():
        if k not in ("rms_norm_eps", "rope_theta", "tie_word_embeddings") and not (isinstance(v, int) and v > 0):
            raise InputError(f"--arch: {k} must be a positive integer, got {v!r}")
    if arch["vocab_size"] < vocab:
        raise InputError(f"--arch: vocab_size {arch['vocab_size']} is smaller than the tokenizer's {vocab} tokens")
    if arch["num_attention_heads"] % arch["num_key_value_heads"]:
        raise InputError("--arch: num_attention_heads must be a multiple of num_key_value_heads")
    return arch


def _json_arg(raw: str | None, what: str) -> dict:
    if raw is None:
        return {}
    try:
        val = json.loads(raw)
    except ValueError as e:
        raise InputError(f"{what}: not valid JSON ({e})") from None
    if not isinstance(val, dict):
        raise InputError(f"{what}: expected a JSON object")
    return val
