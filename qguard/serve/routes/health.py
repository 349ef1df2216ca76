"""`GET /health`: the server is up, and which model it serves."""

from __future__ import annotations

from fastapi import APIRouter

from qguard.serve.deps import StateDep

router = APIRouter()


@router.get("/health")
async def health(state: StateDep) -> dict[str, str]:
    kind = state.guard.kind  # a `Kind` for the built-in families; a registered family may name its own
    return {"status": "ok", "model": state.name, "kind": getattr(kind, "value", kind)}
