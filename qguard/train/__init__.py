"""Training: Stream heads (query/response risk + category), Gen SFT, token labels and Controversial labels.

- `data`: canonical rows (`qguard.data.schema`) -> token ids + per-token labels; splicing at a known boundary.
- `labeling`: the report's rollout labeling and the strict/loose Controversial procedure.
- `stream` / `gen`: the trainers, on the one loop of `loop` (batches, schedule, budget, divergence stop);
  `dist`: torch.distributed glue; `starter`: the embedded starter recipe.
"""
