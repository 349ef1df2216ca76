"""`GET /health/live`, `GET /health/ready` and `GET /metrics`: what an orchestrator and a scraper read.

Live: the process answers. Ready: the model is loaded and was warmed by one judge at startup (the app's
lifespan), and the server is not draining; 503 otherwise, so a load balancer sends its traffic elsewhere.
`/metrics` is the Prometheus exposition of the app's own registry (`qguard.metrics`). When the server has
API keys it asks for one too, unless `metrics_public` (`--metrics-public`: for a scraper on a private
network, which usually scrapes without credentials).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from qguard.serve.deps import StateDep
from qguard.serve.errors import APIError

router = APIRouter()


@router.get("/health/live")
async def live() -> dict[str, str]:
    return {"status": "live"}


@router.get("/health/ready")
async def ready(state: StateDep):
    if state.drain.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not state.ready:
        return JSONResponse({"status": "starting"}, status_code=503)
    return {"status": "ready", "model": state.name}


@router.get("/metrics")
async def metrics(request: Request, state: StateDep) -> Response:
    s = state.settings
    if not s.metrics:
        raise APIError(404, "metrics are off (the server runs with metrics disabled)", code="not_found")
    if s.api_keys is not None and not s.metrics_public:
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or auth[len("Bearer "):] not in s.api_keys:
            raise APIError(401, "missing or invalid API key (or start the server with --metrics-public)",
                           code="invalid_api_key")
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)
