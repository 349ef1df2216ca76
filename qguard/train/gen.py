"""Gen SFT: teach a Qwen3 causal LM the Qwen3Guard-Gen answer format.

Input: `guard_prompt_ids(tok, messages)` (byte-exact with the official guard template; content as
text). Target: `Safety: <label>\\nCategories: <names or None>[\\nRefusal: Yes|No]<|im_end|>`. The loss
covers the answer tokens only; a field the data does not know (no categories on an Unsafe row, unknown
refusal) keeps its tokens in the sequence but carries no loss, so the model is never taught a made-up value.
The result is saved in the official Gen format (Qwen3ForCausalLM, tied embeddings, guard chat template).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qguard.data.schema import Row
from qguard.errors import InputError
from qguard.families import gen as family
from qguard.model.gen import GenGuardModel
from qguard.tokenizer import ENDOFTEXT, IM_END
from qguard.train import dist as D
from qguard.train.data import IGNORE
from qguard.train.loop import total_steps, train_loop
from qguard.weights import open_checkpoint, write_checkpoint

log = logging.getLogger(__name__)


@dataclass
class GenExample:
    ids: list[int]
    labels: list[int]  # next-token targets aligned with ids (IGNORE: no loss)


def encode_gen_row(tok, row: Row, max_content_chars: int = 4000) -> GenExample:
    """Prompt + answer ids; labels[i] is the token at i+1 when that token is a trained answer token."""
    msgs = [dict(m, content=_cut(m["content"], max_content_chars)) for m in row.messages]
    _, prompt = family.guard_prompt_ids(tok, msgs)  # content as text, as Guard reads it
    segs = family.answer_segments(row.label, row.categories, row.refusal, row.task)
    text = "".join(s for s, _ in segs)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    untrained, at = [], 0
    for s, train in segs:
        if not train:
            untrained.append((at, at + len(s)))
        at += len(s)
    answer = list(enc["input_ids"]) + [IM_END]
    train_mask = [not any(a < e and b > s for s, e in untrained) for a, b in enc["offset_mapping"]] + [True]
    ids = prompt + answer
    labels = [IGNORE] * len(ids)
    for j, (t, keep) in enumerate(zip(answer, train_mask)):
        if keep:
            labels[len(prompt) + j - 1] = t  # position before the token predicts it
    return GenExample(ids, labels)


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n // 2] + "\n...\n" + text[-n // 2:]


@dataclass
class GenTrainConfig:
    init: str  # a Qwen3 causal LM checkpoint (a Gen checkpoint or a base model in Qwen3ForCausalLM format)
    out: Path | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    max_minutes: float | None = None
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 10
    batch_tokens: int = 8192
    seed: int = 0
    save_dtype: str = "bfloat16"
    log_every: int = 20
    device: str | None = None
    strategy: str = "ddp"


class GenLoss(nn.Module):
    """Wraps the LM so that DDP sees one forward returning the loss. The LM head runs only on positions
    with a target: full-vocabulary logits at every position would cost [B, T, 151936] floats."""

    def __init__(self, lm: GenGuardModel):
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        mask = labels != IGNORE
        if not mask.any():
            raise InputError("a Gen batch has no answer tokens to train on")
        h = self.lm.model(ids)[mask]
        return F.cross_entropy(self.lm.lm_head(h).float(), labels[mask])


def collate_gen(examples: Sequence[GenExample], device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), ENDOFTEXT, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for r, e in enumerate(examples):
        ids[r, : len(e.ids)] = torch.tensor(e.ids)
        labels[r, : len(e.labels)] = torch.tensor(e.labels)
    return ids.to(device), labels.to(device)


def train_gen(cfg: GenTrainConfig, examples: Sequence[GenExample], ctx: D.DistContext | None = None) -> dict[str, Any]:
    """SFT on encoded examples; returns the loss history and writes the checkpoint (rank 0) if cfg.out."""
    if not examples:
        raise InputError("no training examples")
    ctx = ctx or D.setup(cfg.device, cfg.strategy)
    lm = family.build_model(open_checkpoint(cfg.init), torch.device("cpu"), torch.float32).train()
    model = ctx.wrap(GenLoss(lm).to(ctx.device))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = total_steps(examples, cfg.batch_tokens, ctx.world, cfg.epochs, cfg.max_steps)
    t0, history = time.monotonic(), []

    def step(idx: list[int]) -> dict[str, float]:
        loss = model(*collate_gen([examples[i] for i in idx], ctx.device))
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"loss": ctx.mean(float(loss.detach()))}  # the mean over ranks: all stop together on a NaN

    def on_step(n: int, losses: dict[str, float], last: bool) -> None:
        history.append(losses["loss"])
        if ctx.is_main and n % cfg.log_every == 0:
            log.info("gen step %d/%d loss %.4f", n, total, losses["loss"])

    steps = train_loop(ctx, examples, opt, step, total=total, batch_tokens=cfg.batch_tokens, seed=cfg.seed,
                       warmup_steps=cfg.warmup_steps, max_minutes=cfg.max_minutes, on_step=on_step)
    final = D.unwrap(model).lm
    if cfg.out is not None:
        sd = D.full_state_dict(final)  # a collective under FSDP: every rank takes part
        if ctx.is_main:
            save_gen(final, Path(cfg.out), cfg.save_dtype, sd)
    ctx.barrier()
    return {"model": final.eval(), "steps": steps, "losses": history, "seconds": time.monotonic() - t0}


def save_gen(model: GenGuardModel, out: Path, dtype: str = "bfloat16",
             state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """config.json + model.safetensors (no lm_head when tied) + tokenizer with the guard chat template."""
    sd = state_dict if state_dict is not None else D.full_state_dict(model)
    tensors = {k: v.to(getattr(torch, dtype)) for k, v in sd.items()
               if not k.endswith("inv_freq") and not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    return write_checkpoint(out, family.config_dict(model.config, dtype), tensors,
                            chat_template=family.CHAT_TEMPLATE.read_text("utf-8"))
