"""HTTP serving: a moderation API and a guarded OpenAI-compatible chat proxy (FastAPI)."""

from qguard.serve.app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]
