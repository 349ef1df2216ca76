"""Stream trainer: the Qwen3Guard-Stream heads (and optionally the backbone) with the report's losses.

Losses (tech report, Stream section), each a cross-entropy:
- query risk: only at the user turn's `<|im_end|>`;
- response risk: at every response token, averaged over all response tokens of the batch;
- query/response category: only where the gold risk is Unsafe or Controversial (and a category is known).
The checkpoint written at the end is in the official Stream format, loadable by `Guard.from_pretrained`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qguard.errors import InputError
from qguard.families import stream as family
from qguard.model.qwen3 import Qwen3Config
from qguard.model.stream import StreamGuardModel, StreamHeadConfig, StreamOutput
from qguard.taxonomy import SEVERITIES, Severity
from qguard.tokenizer import ENDOFTEXT
from qguard.train import dist as D
from qguard.train.data import IGNORE, QUERY_CATEGORIES, RESPONSE_CATEGORIES, RISK_INDEX, Example
from qguard.train.loop import (  # Schedule, check_finite, make_batches: still importable from here
    Schedule,  # noqa: F401
    check_finite,  # noqa: F401
    make_batches,
    total_steps,
    train_loop,
)
from qguard.train.lora import add_lora, merge_lora
from qguard.train.optim import TrainOptimizer
from qguard.weights import open_checkpoint, write_checkpoint

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
    model, _ = family.build_model(open_checkpoint(cfg.init), torch.device("cpu"), torch.float32)
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
    total = total_steps(examples, cfg.batch_tokens, ctx.world, cfg.epochs, cfg.max_steps)
    opt = TrainOptimizer(model, cfg.lr, cfg.weight_decay, sparse_embedding=cfg.sparse_embedding and not ctx.enabled)
    weights = loss_weights(cfg, examples, ctx.device)
    t0, history = time.monotonic(), []

    def step(idx: list[int]) -> dict[str, float]:
        return _step(model, opt, collate([examples[i] for i in idx], ctx.device), weights)

    def on_step(n: int, losses: dict[str, float], last: bool) -> None:
        if n % cfg.log_every == 0 or last:
            history.append(_log(ctx, n, total, losses, t0))

    steps = train_loop(ctx, examples, opt, step, total=total, batch_tokens=cfg.batch_tokens, seed=cfg.seed,
                       warmup_steps=cfg.warmup_steps, max_minutes=cfg.max_minutes, on_step=on_step)
    opt.close()
    final = D.unwrap(model)
    if cfg.backbone == "lora":
        merge_lora(final.model)
    if cfg.out is not None:
        tensors = official_tensors(final, getattr(torch, cfg.save_dtype))  # a collective under FSDP: all ranks
        if ctx.is_main:
            save_stream(final, Path(cfg.out), cfg.save_dtype, cfg.tokenizer_files, tensors=tensors,
                        extra={"qguard_training": {"steps": steps, "examples": len(examples), "backbone": cfg.backbone}})
    ctx.barrier()
    return TrainResult(final.eval(), steps, time.monotonic() - t0, history)


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
            out[i] = family.label_of(o, r, e)
    return out  # type: ignore[return-value]


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

def official_tensors(model: StreamGuardModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's tensors under the official names (a collective under FSDP: every rank calls it)."""
    return family.official_tensors(D.full_state_dict(model), dtype)


def save_stream(model: StreamGuardModel, out: Path, dtype: str = "bfloat16", tokenizer_files: bool = True,
                extra: dict[str, Any] | None = None, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write config.json + model.safetensors (+ the Qwen3 tokenizer files) in the official format."""
    config = family.config_dict(model.config, model.head_config, dtype) | (extra or {})
    if tensors is None:
        tensors = official_tensors(model, getattr(torch, dtype))
    return write_checkpoint(out, config, tensors, tokenizer_files=tokenizer_files)
