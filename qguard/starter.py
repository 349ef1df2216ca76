"""The embedded starter model shipped inside the package (see docs/starter_model.md)."""

from __future__ import annotations

from pathlib import Path

STARTER_DIR = Path(__file__).parent / "assets" / "starter"


def starter_model_path() -> Path | None:
    """Directory of the embedded starter checkpoint, or None if this build ships none."""
    return STARTER_DIR if (STARTER_DIR / "config.json").is_file() else None
