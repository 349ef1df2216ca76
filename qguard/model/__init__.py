"""Pure math: the Qwen3 decoder, the Stream guard heads and the Gen LM head. No I/O, no policy."""

from qguard.model.qwen3 import Qwen3Config, Qwen3Model
from qguard.model.stream import StreamGuardModel, StreamOutput

__all__ = ["Qwen3Config", "Qwen3Model", "StreamGuardModel", "StreamOutput"]
