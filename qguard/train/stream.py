"""Stream trainer: the Qwen3Guard-Stream heads (and optionally the backbone) with the report's losses.

Losses (tech report, Stream section), each a cross-entropy:
- query risk: only at the user turn's `<|im_end|>`;
- response risk: at every response token, averaged over all response tokens of the batch;
- query/response category: only where the gold risk is Unsafe or Controversial (and a category is known).
The checkpoint written at the end is in the official Stream format, loadable by `Guard.from_pretrained`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qguard.checkpoint import build_stream_model, open_checkpoint, save_weights, staged_dir
from qguard.errors import InputError, TrainingError
from qguard.model.qwen3 import Qwen3Config
from qguard.model.stream import HEAD_TENSORS, StreamGuardModel, StreamHeadConfig, StreamOutput
from qguard.policy import SEVERITIES, Severity, debounce
from qguard.tokenizer import ENDOFTEXT
from qguard.train import dist as D
from qguard.train.data import IGNORE, QUERY_CATEGORIES, RESPONSE_CATEGORIES, RISK_INDEX, Example
from qguard.train.lora import add_lora, merge_lora
from qguard.train.optim import TrainOptimizer

log = logging.getLogger(__name__)

# Architecture of a freshly initialised model (the starter's; see docs/starter_model.md).
DEFAULT_ARCH: dict[str, Any] = dict(
    hidden_size=80, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, guard_inner_size=64, vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
    max_position_embeddings=8192, tie_word_embeddings=True,
)


@dataclass
class StreamTrainConfig:
    out: Path | None = None  # where the checkpoint goes (None: keep it in memory only)
    init: str | None = None  # checkpoint to start from; None: a fresh model from `arch`
    arch: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_ARCH))
    backbone: str = "full"  # "full" | "frozen" | "lora"
    lora_rank: int = 8
    epochs: float = 1.0
    max_steps: int | None = None
    max_minutes: float | None = None  # wall-clock budget; training stops cleanly when it is spent
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    batch_tokens: int = 8192  # padded tokens per optimizer step (per rank)
    max_len: int = 256
    max_prompt: int = 96
    risk_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # Safe, Unsafe, Controversial
    balance_categories: bool = True  # category loss weights ~ 1/sqrt(class frequency)
    seed: int = 0
    save_dtype: str = "bfloat16"
    sparse_embedding: bool = False  # opt-in lazy Adam on the token embedding, single process (train/optim.py)
    tokenizer_files: bool = True
    log_every: int = 50
    device: str | None = None
    strategy: str = "ddp"

    def __post_init__(self) -> None:
        if self.backbone not in ("full", "frozen", "lora"):
            raise InputError(f"backbone must be full, frozen or lora, got {self.backbone!r}")
        if len(self.risk_weights) != 3 or min(self.risk_weights) <= 0:
            raise InputError(f"risk_weights needs 3 positive numbers (Safe, Unsafe, Controversial), got {self.risk_weights}")


# ------------------------------------------------------------------------------------------ the model

def fresh_model(arch: dict[str, Any], seed: int) -> StreamGuardModel:
    """A randomly initialised Stream model (std 0.02 like Qwen's initializer, unit norms)."""
    cfg = Qwen3Config.from_dict(arch)
    heads = StreamHeadConfig(guard_inner_size=int(arch.get("guard_inner_size", 64)))
    torch.manual_seed(seed)
    model = StreamGuardModel(cfg, heads)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            nn.init.ones_(p)
        else:
            nn.init.normal_(p, std=0.02)
    return model


def initial_model(cfg: StreamTrainConfig) -> StreamGuardModel:
    if cfg.init is None:
        return fresh_model(cfg.arch, cfg.seed)
    model, _ = build_stream_model(open_checkpoint(cfg.init), torch.device("cpu"), torch.float32)
    return model.train()


def prepare_backbone(model: StreamGuardModel, mode: str, lora_rank: int) -> None:
    if mode == "frozen":
        model.model.requires_grad_(False)
    elif mode == "lora":
        add_lora(model.model, rank=lora_rank, alpha=2.0 * lora_rank)


# -------------------------------------------------------------------------------------------- batches

@dataclass
class Batch:
    ids: torch.Tensor  # [B, T]
    query_pos: torch.Tensor  # [B] (-1: none)
    query_label: torch.Tensor  # [B] (IGNORE: none)
    query_cat: torch.Tensor  # [B, 9] soft targets
    query_cat_mask: torch.Tensor  # [B] bool
    resp_labels: torch.Tensor  # [B, T] (IGNORE off the response)
    resp_cat: torch.Tensor  # [B, 8]
    resp_cat_mask: torch.Tensor  # [B] bool


def collate(examples: Sequence[Example], device: torch.device | str = "cpu") -> Batch:
    """Right-padded tensors. Padding sits after every real token, so causal attention never sees it."""
    B, T = len(examples), max(len(e.ids) for e in examples)
    ids = torch.full((B, T), ENDOFTEXT, dtype=torch.long)
    resp = torch.full((B, T), IGNORE, dtype=torch.long)
    qcat, rcat = torch.zeros(B, len(QUERY_CATEGORIES)), torch.zeros(B, len(RESPONSE_CATEGORIES))
    for r, e in enumerate(examples):
        ids[r, : len(e.ids)] = torch.tensor(e.ids)
        if e.resp_labels:
            resp[r, e.resp_start: e.resp_start + len(e.resp_labels)] = torch.tensor(e.resp_labels)
        if e.query_cat is not None:
            qcat[r] = torch.tensor(e.query_cat)
        if e.resp_cat is not None:
            rcat[r] = torch.tensor(e.resp_cat)
    b = Batch(
        ids=ids, query_pos=torch.tensor([e.query_pos for e in examples]),
        query_label=torch.tensor([e.query_label for e in examples]), query_cat=qcat,
        query_cat_mask=torch.tensor([e.query_cat is not None for e in examples]), resp_labels=resp,
        resp_cat=rcat, resp_cat_mask=torch.tensor([e.resp_cat is not None for e in examples]),
    )
    return Batch(**{k: v.to(device) for k, v in vars(b).items()})


def make_batches(examples: Sequence[Example], batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Index lists of similar-length examples with at most `batch_tokens` padded tokens each, shuffled."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    pool = 64 * max(1, batch_tokens // 128)  # sort within pools: little padding, still random
    for s in range(0, len(order), pool):
        chunk = sorted(order[s: s + pool], key=lambda i: len(examples[i].ids))
        cur: list[int] = []
        for i in chunk:
            if cur and (len(cur) + 1) * len(examples[i].ids) > batch_tokens:
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
    rng.shuffle(batches)
    return batches


# --------------------------------------------------------------------------------------------- losses

RISKY = (RISK_INDEX[Severity.UNSAFE], RISK_INDEX[Severity.CONTROVERSIAL])


def soft_ce(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy against soft targets; with class `weights`, a weighted mean like F.cross_entropy's."""
    w = target if weights is None else target * weights
    return -(w * logits.float().log_softmax(-1)).sum() / w.sum().clamp_min(1e-8)


def category_weights(targets: Sequence[list[float] | None], n: int, power: float = 0.5) -> torch.Tensor:
    """Class weights (frequency ** -power, mean 1 over seen classes): the data is dominated by one
    category (Unethical Acts), and unweighted training would predict it for everything."""
    counts = torch.zeros(n)
    for t in targets:
        if t is not None:
            counts += torch.tensor(t)
    w = torch.where(counts > 0, counts.clamp_min(1.0) ** -power, torch.zeros(n))
    seen = counts > 0
    return w / w[seen].mean() if seen.any() else torch.ones(n)


@dataclass
class LossWeights:
    risk: torch.Tensor | None = None  # [3] Safe, Unsafe, Controversial
    query_category: torch.Tensor | None = None  # [9]
    category: torch.Tensor | None = None  # [8]


def stream_losses(out: StreamOutput, b: Batch, weights: LossWeights | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The four losses; each is zero (with a graph) when the batch has nothing for it."""
    w = weights if isinstance(weights, LossWeights) else LossWeights(risk=weights)
    risk_weights = w.risk
    # Every head takes part in every step's graph (with zero weight when the batch has nothing for it),
    # so DDP sees the same parameters used on every rank and needs no unused-parameter search.
    zero = sum(x.sum() for x in (out.risk_logits, out.category_logits, out.query_risk_logits,
                                 out.query_category_logits)) * 0.0
    losses = {"query": zero, "query_cat": zero, "response": zero, "response_cat": zero}
    rows = (b.query_label != IGNORE).nonzero().squeeze(-1)
    if rows.numel():
        at = out.query_risk_logits[rows, b.query_pos[rows]]  # the user <|im_end|> only
        losses["query"] = F.cross_entropy(at.float(), b.query_label[rows], weight=risk_weights)
        cat_rows = rows[b.query_cat_mask[rows]]
        if cat_rows.numel():
            losses["query_cat"] = soft_ce(out.query_category_logits[cat_rows, b.query_pos[cat_rows]],
                                          b.query_cat[cat_rows], w.query_category)
    tok = b.resp_labels != IGNORE
    if tok.any():
        losses["response"] = F.cross_entropy(out.risk_logits[tok].float(), b.resp_labels[tok], weight=risk_weights)
        risky = tok & torch.isin(b.resp_labels, torch.tensor(RISKY, device=tok.device)) & b.resp_cat_mask[:, None]
        if risky.any():
            target = b.resp_cat[:, None, :].expand(-1, b.resp_labels.shape[1], -1)[risky]
            losses["response_cat"] = soft_ce(out.category_logits[risky], target, w.category)
    return losses


# ------------------------------------------------------------------------------------------- training

@dataclass
class TrainResult:
    model: StreamGuardModel
    steps: int
    seconds: float
    history: list[dict[str, float]]


class Schedule:
    """Linear warmup, then cosine to 10% of the peak. Progress is the larger of steps done / total and
    time spent / budget, so a run cut by its wall-clock budget still ends at a low learning rate."""

    def __init__(self, opt: torch.optim.Optimizer | TrainOptimizer, warmup: int, total: int, minutes: float | None):
        self.opt, self.warmup, self.total, self.minutes = opt, warmup, total, minutes
        self.base = [g["lr"] for g in opt.param_groups]
        self.t0 = time.monotonic()
        self.step(0)

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.total - self.warmup)
        if self.minutes:
            t = max(t, (time.monotonic() - self.t0) / (self.minutes * 60))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    def step(self, step: int) -> None:
        f = self.factor(step)
        for g, lr in zip(self.opt.param_groups, self.base):
            g["lr"] = lr * f


def train_stream(cfg: StreamTrainConfig, examples: Sequence[Example], ctx: D.DistContext | None = None,
                 model: StreamGuardModel | None = None) -> TrainResult:
    """Train on `examples` (already encoded); write the checkpoint to cfg.out on rank 0 if set.

    `model`: start from this model (e.g. a pre-trained backbone, `qguard.train.pretrain`) instead of cfg.init.
    """
    if not examples:
        raise InputError("no training examples")
    ctx = ctx or D.setup(cfg.device, cfg.strategy)
    model = initial_model(cfg) if model is None else model.train()
    prepare_backbone(model, cfg.backbone, cfg.lora_rank)
    model = ctx.wrap(model.to(ctx.device).train())
    rng = random.Random(cfg.seed)
    per_epoch = math.ceil(len(make_batches(examples, cfg.batch_tokens, random.Random(0))) / ctx.world)
    total = cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs))
    opt = TrainOptimizer(model, cfg.lr, cfg.weight_decay, sparse_embedding=cfg.sparse_embedding and not ctx.enabled)
    sched = Schedule(opt, min(cfg.warmup_steps, max(1, total // 10)), total, cfg.max_minutes)
    weights = loss_weights(cfg, examples, ctx.device)
    t0, step, history = time.monotonic(), 0, []
    epoch = 0
    while step < total:
        batches = ctx.shard(make_batches(examples, cfg.batch_tokens, rng), epoch, cfg.seed)
        for idx in batches:
            losses = _step(model, opt, collate([examples[i] for i in idx], ctx.device), weights)
            step += 1
            check_finite(losses, step)
            sched.step(step)
            last = step >= total or _out_of_time(cfg, t0)
            if step % cfg.log_every == 0 or last:
                history.append(_log(ctx, step, total, losses, t0))
            if last:
                break
        if _out_of_time(cfg, t0):
            log.info("stopping at step %d: the %.1f-minute budget is spent", step, cfg.max_minutes)
            break
        epoch += 1
    opt.close()
    final = D.unwrap(model)
    if cfg.backbone == "lora":
        merge_lora(final.model)
    if cfg.out is not None:
        tensors = official_tensors(final, getattr(torch, cfg.save_dtype))  # a collective under FSDP: all ranks
        if ctx.is_main:
            save_stream(final, Path(cfg.out), cfg.save_dtype, cfg.tokenizer_files, tensors=tensors,
                        extra={"qguard_training": {"steps": step, "examples": len(examples), "backbone": cfg.backbone}})
    ctx.barrier()
    return TrainResult(final.eval(), step, time.monotonic() - t0, history)


def loss_weights(cfg: StreamTrainConfig, examples: Sequence[Example], device: torch.device) -> LossWeights:
    if not cfg.balance_categories:
        return LossWeights(risk=torch.tensor(cfg.risk_weights, device=device))
    return LossWeights(
        risk=torch.tensor(cfg.risk_weights, device=device),
        query_category=category_weights([e.query_cat for e in examples], len(QUERY_CATEGORIES)).to(device),
        category=category_weights([e.resp_cat for e in examples], len(RESPONSE_CATEGORIES)).to(device),
    )


def _step(model, opt: TrainOptimizer, batch: Batch, weights: LossWeights) -> dict[str, float]:
    losses = stream_losses(model(batch.ids), batch, weights)
    loss = sum(losses.values())
    loss.backward()
    opt.clip_grad_norm_(1.0)
    opt.step()
    opt.zero_grad()
    return {k: float(v.detach()) for k, v in losses.items()}


def check_finite(losses: dict[str, float], step: int) -> None:
    """Stop a diverged run before it can save: a NaN model answers NaN, which reads as Safe."""
    bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
    if bad:
        raise TrainingError(f"the loss became non-finite at step {step} ({', '.join(f'{k}={v}' for k, v in bad.items())}); "
                            "nothing was saved. Lower --lr (or check the data) and run again")


def _out_of_time(cfg: StreamTrainConfig, t0: float) -> bool:
    return cfg.max_minutes is not None and time.monotonic() - t0 > cfg.max_minutes * 60


def _log(ctx: D.DistContext, step: int, total: int, losses: dict[str, float], t0: float) -> dict[str, float]:
    row = {"step": step, **{k: ctx.mean(v) for k, v in losses.items()}, "seconds": time.monotonic() - t0}
    if ctx.is_main:
        log.info("step %d/%d %s", step, total, " ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "step"))
    return row


# ---------------------------------------------------------------------------------------- prediction

@torch.inference_mode()
def predict(model: StreamGuardModel, examples: Sequence[Example], batch_tokens: int = 16384) -> list[Severity]:
    """Verdict per example, read like Guard reads it: the query head at the user `<|im_end|>` for prompt
    rows; the response head's per-token labels debounced (official eval rule) for response rows."""
    model.eval()
    device = next(model.parameters()).device
    out: list[Severity | None] = [None] * len(examples)
    for idx in make_batches(examples, batch_tokens, random.Random(0)):
        group = [examples[i] for i in idx]
        b = collate(group, device)
        o = model(b.ids)
        for r, (i, e) in enumerate(zip(idx, group)):
            out[i] = _verdict(o, r, e)
    return out  # type: ignore[return-value]


def _verdict(o: StreamOutput, r: int, e: Example) -> Severity:
    if e.query_pos >= 0:
        return SEVERITIES[int(o.query_risk_logits[r, e.query_pos].argmax())]
    span = o.risk_logits[r, e.resp_start: e.resp_start + len(e.resp_labels)].argmax(-1).tolist()
    return debounce([SEVERITIES[i] for i in span])[0]


def gold(e: Example) -> Severity:
    """The sample-level gold label of an encoded example."""
    if e.query_pos >= 0:
        return SEVERITIES[e.query_label]
    return max((SEVERITIES[i] for i in e.resp_labels), key=lambda s: s is not Severity.SAFE, default=Severity.SAFE)


def unsafe_f1(preds: Sequence[Severity], golds: Sequence[Severity]) -> float:
    """F1 of the Unsafe class in strict mode (Controversial counts as Unsafe), in percent."""
    p = [s is not Severity.SAFE for s in preds]
    g = [s is not Severity.SAFE for s in golds]
    tp = sum(a and b for a, b in zip(p, g))
    fp = sum(a and not b for a, b in zip(p, g))
    fn = sum(b and not a for a, b in zip(p, g))
    return 0.0 if tp == 0 else 100.0 * 2 * tp / (2 * tp + fp + fn)


# ------------------------------------------------------------------------------------------------ save

def stream_config_dict(model: StreamGuardModel, dtype: str) -> dict[str, Any]:
    """config.json in the official Stream layout; label maps use the Gen category strings."""
    c, h = model.config, model.head_config
    risk = {str(i): s.value for i, s in enumerate(SEVERITIES)}
    return {
        "architectures": ["Qwen3ForGuardModel"], "model_type": "qwen3",
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings, "attention_bias": c.attention_bias, "attention_dropout": 0.0,
        "hidden_act": "silu", "torch_dtype": dtype, "bos_token_id": 151643, "eos_token_id": 151645,
        "guard_inner_size": h.guard_inner_size, "num_risk_level": h.num_risk_level, "num_category": h.num_category,
        "num_query_risk_level": h.num_query_risk_level, "num_query_category": h.num_query_category,
        "response_risk_level_map": risk, "query_risk_level_map": risk,
        "response_category_map": {str(i): cat.value for i, cat in enumerate(RESPONSE_CATEGORIES)},
        "query_category_map": {str(i): cat.value for i, cat in enumerate(QUERY_CATEGORIES)},
    }


def official_tensors(model: StreamGuardModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    local_to_official = {v: k for k, v in HEAD_TENSORS.items()}
    sd = D.full_state_dict(model)
    return {local_to_official.get(k, k): v.to(dtype) for k, v in sd.items() if not k.endswith("inv_freq")}


def save_stream(model: StreamGuardModel, out: Path, dtype: str = "bfloat16", tokenizer_files: bool = True,
                extra: dict[str, Any] | None = None, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write config.json + model.safetensors (+ the Qwen3 tokenizer files) in the official format."""
    from qguard.testing import copy_tokenizer

    cfg = stream_config_dict(model, dtype) | (extra or {})
    with staged_dir(out) as tmp:  # all or nothing, see staged_dir
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", "utf-8")
        save_weights(tensors if tensors is not None else official_tensors(model, getattr(torch, dtype)), tmp)
        if tokenizer_files:
            copy_tokenizer(tmp)
    return out
