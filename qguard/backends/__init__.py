"""Inference backends for Gen classification behind one interface (`classify_conversations`).

- `torch` (default): qguard's own batched, prefix-cached engine, through `qguard.Guard` (`qguard.runtime.guard`).
- `vllm` (optional extra `qguard[vllm]`, GPU): `qguard.backends.vllm.VLLMGenBackend`, which relies on
  vLLM's automatic prefix caching and returns logprobs for the label probabilities.
"""

from __future__ import annotations

BACKENDS = ("torch", "vllm")
