"""Training: Stream heads (query/response risk + category), Gen SFT, token labels and Controversial labels.

- `data`: canonical JSONL rows -> token ids + per-token labels; splicing at a known boundary.
- `labeling`: the report's rollout labeling and the strict/loose Controversial procedure.
- `stream` / `gen`: the trainers; `dist`: torch.distributed glue; `starter`: the embedded starter recipe.
"""
