"""A Stream checkpoint whose verdicts a test knows in advance: the tiny random one, edited so that a response
token is Unsafe exactly when it is one of `tokens` (by default " bomb" and " explosives").

Hidden dimension 0 carries only those tokens' embeddings (every attention and MLP output row 0 is zero),
the risk head reads only that dimension, and elsewhere its logits are exactly 0, a tie that argmax
resolves to index 0, Safe. The category head is left as it was, so category probabilities still depend
on the whole context. With `safe_prompts` the prompt head's scores are uniform too, so every prompt is Safe.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

BOMB, EXPLOSIVES = 12764, 56309  # " bomb", " explosives"


def trigger_checkpoint(src: Path, out: Path, tokens: Sequence[int] = (BOMB, EXPLOSIVES), *,
                       safe_prompts: bool = False) -> Path:
    """A copy of the Stream checkpoint `src` at `out`, edited as the module says; returns `out`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    cfg = json.loads((out / "config.json").read_text())
    risk = {v: int(k) for k, v in cfg["response_risk_level_map"].items()}
    assert risk["Safe"] == 0  # the tie's argmax
    sd = load_file(str(out / "model.safetensors"))
    emb = sd["model.embed_tokens.weight"]
    emb[:, 0] = 0.0
    emb[list(tokens), 0] = 30.0
    for name, w in sd.items():
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            w[0, :] = 0.0
    sd["model.norm.weight"][0] = 1.0
    pre = sd["risk_level_category_pre.weight"]
    pre[0, :] = 0.0
    pre[0, 0] = 1.0
    sd["risk_level_category_layernorm.weight"][0] = 1.0
    head = sd["risk_level_head.weight"]
    head.zero_()
    head[risk["Unsafe"], 0] = 20.0
    if safe_prompts:
        sd["query_risk_level_category_layernorm.weight"].zero_()  # every prompt: uniform scores, argmax Safe
    save_file(sd, str(out / "model.safetensors"))
    return out
