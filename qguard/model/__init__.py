"""Pure math: the Qwen3 decoder, the Stream guard heads and the Gen LM head. No I/O, no policy."""

from qguard.model.gen import GenGuardModel
from qguard.model.qwen3 import Qwen3Config, Qwen3Model
from qguard.model.stream import StreamGuardModel, StreamOutput

__all__ = ["GenGuardModel", "Qwen3Config", "Qwen3Model", "StreamGuardModel", "StreamOutput"]
