"""HTTP serving: a moderation API and a guarded OpenAI-compatible chat proxy (FastAPI)."""

from qguard.serve.app import create_app
from qguard.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]
