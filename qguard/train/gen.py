"""Gen SFT: teach a Qwen3 causal LM the Qwen3Guard-Gen answer format.

Input: `guard_prompt_ids(tok, messages)` (byte-exact with the official guard template; content as
text). Target: `Safety: <label>\\nCategories: <names or None>[\\nRefusal: Yes|No]<|im_end|>`. The loss
covers the answer tokens only; a field the data does not know (no categories on an Unsafe row, unknown
refusal) keeps its tokens in the sequence but carries no loss, so the model is never taught a made-up value.
The result is saved in the official Gen format (Qwen3ForCausalLM, tied embeddings, guard chat template).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qguard.checkpoint import build_gen_model, open_checkpoint, save_weights, staged_dir
from qguard.errors import InputError
from qguard.model.gen import GenGuardModel, guard_prompt_ids
from qguard.policy import Severity
from qguard.tokenizer import ASSETS, ENDOFTEXT, IM_END
from qguard.train import dist as D
from qguard.train.data import IGNORE, Row

log = logging.getLogger(__name__)


def answer_segments(row: Row) -> list[tuple[str, bool]]:
    """The Gen answer as (text, trained?) pieces."""
    cats = ", ".join(c.value for c in row.categories)
    if row.label is Severity.SAFE:
        cat_seg = ("None", True)
    else:  # an Unsafe row without categories: a placeholder that carries no loss
        cat_seg = (cats, True) if cats else ("None", False)
    segs = [("Safety: " + row.label.value, True), ("\nCategories: ", True), cat_seg]
    if row.task == "response":
        segs += [("\nRefusal: ", True), ("Yes" if row.refusal else "No", row.refusal is not None)]
    return segs


@dataclass
class GenExample:
    ids: list[int]
    labels: list[int]  # next-token targets aligned with ids (IGNORE: no loss)


def encode_gen_row(tok, row: Row, max_content_chars: int = 4000) -> GenExample:
    """Prompt + answer ids; labels[i] is the token at i+1 when that token is a trained answer token."""
    msgs = [dict(m, content=_cut(m["content"], max_content_chars)) for m in row.messages]
    _, prompt = guard_prompt_ids(tok, msgs)  # content as text, as Guard reads it
    segs = answer_segments(row)
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
    from qguard.train.stream import Schedule, _out_of_time, check_finite, make_batches

    if not examples:
        raise InputError("no training examples")
    ctx = ctx or D.setup(cfg.device, cfg.strategy)
    lm = build_gen_model(open_checkpoint(cfg.init), torch.device("cpu"), torch.float32).train()
    model = ctx.wrap(GenLoss(lm).to(ctx.device))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = random.Random(cfg.seed)
    per_epoch = math.ceil(len(make_batches(examples, cfg.batch_tokens, random.Random(0))) / ctx.world)
    total = cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs))
    sched = Schedule(opt, min(cfg.warmup_steps, max(1, total // 10)), total, cfg.max_minutes)
    t0, step, epoch, history = time.monotonic(), 0, 0, []
    while step < total and not _out_of_time(cfg, t0):  # type: ignore[arg-type]
        for idx in ctx.shard(make_batches(examples, cfg.batch_tokens, rng), epoch, cfg.seed):
            loss = model(*collate_gen([examples[i] for i in idx], ctx.device))
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            sched.step(step)
            history.append(ctx.mean(float(loss.detach())))
            check_finite({"loss": history[-1]}, step)
            if ctx.is_main and step % cfg.log_every == 0:
                log.info("gen step %d/%d loss %.4f", step, total, history[-1])
            if step >= total or _out_of_time(cfg, t0):  # type: ignore[arg-type]
                break
        epoch += 1
    final = D.unwrap(model).lm
    if cfg.out is not None:
        sd = D.full_state_dict(final)  # a collective under FSDP: every rank takes part
        if ctx.is_main:
            save_gen(final, Path(cfg.out), cfg.save_dtype, sd)
    ctx.barrier()
    return {"model": final.eval(), "steps": step, "losses": history, "seconds": time.monotonic() - t0}


def gen_config_dict(model: GenGuardModel, dtype: str) -> dict[str, Any]:
    c = model.config
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings, "attention_bias": c.attention_bias, "attention_dropout": 0.0,
        "hidden_act": "silu", "torch_dtype": dtype, "bos_token_id": 151643, "eos_token_id": 151645,
    }


def save_gen(model: GenGuardModel, out: Path, dtype: str = "bfloat16",
             state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """config.json + model.safetensors (no lm_head when tied) + tokenizer with the guard chat template."""
    from qguard.testing import copy_tokenizer

    sd = state_dict if state_dict is not None else D.full_state_dict(model)
    tensors = {k: v.to(getattr(torch, dtype)) for k, v in sd.items()
               if not k.endswith("inv_freq") and not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    with staged_dir(out) as tmp:  # all or nothing (qguard.checkpoint.staged_dir)
        (tmp / "config.json").write_text(json.dumps(gen_config_dict(model, dtype), indent=2) + "\n", "utf-8")
        save_weights(tensors, tmp)
        copy_tokenizer(tmp, (ASSETS / "qwen3guard_gen_template.jinja").read_text("utf-8"))
    return out
