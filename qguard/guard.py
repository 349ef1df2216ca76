"""The old home of the Guard facade, kept for users and scripts: `qguard.runtime.guard` is its home.

    from qguard.guard import Guard   # == qguard.Guard == qguard.runtime.guard.Guard

Nothing inside qguard imports this module (tests/test_architecture.py checks it).
"""

from qguard.messages import Conversation, as_prompt_messages, as_response_messages
from qguard.runtime.guard import Guard, StreamTrace, TokenVerdict

__all__ = ["Conversation", "Guard", "StreamTrace", "TokenVerdict", "as_prompt_messages", "as_response_messages"]
