"""`GET /playground`: a page that shows the guard judging a response token by token, in a browser.

The page (`qguard/assets/playground/`: plain HTML, JS and CSS, no CDN, no build step) talks to the server's
own surfaces only: the WebSocket sessions of `/v1/stream` (docs/stream_protocol.md) for the prompt and
response boxes, and the guarded proxy `/v1/chat/completions` for its chat mode. Both are `/v1/` routes, so
the API keys apply to them as to any client; the page itself and `/playground/info` carry no message data
and are public like `/health` (a browser must load the page before it can ask for a key).

Served when `ServeSettings.playground` is set (`qguard serve` sets it by default on a localhost bind).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from qguard.serve.deps import StateDep
from qguard.serve.errors import APIError
from qguard.taxonomy import RESPONSE_CATEGORIES

router = APIRouter()

ASSETS = resources.files("qguard") / "assets" / "playground"
# the files the page is made of, and their media types (nothing else under the folder is served)
FILES = {"index.html": "text/html; charset=utf-8", "playground.js": "text/javascript; charset=utf-8",
         "playground.css": "text/css; charset=utf-8"}
STARTER_NAME = "qguard-starter (embedded)"  # `settings.public_name` of the embedded starter model
# the page's own headers: it loads nothing from elsewhere and nothing may frame it
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
                               "style-src 'self'; script-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache",
}


@router.get("/playground", include_in_schema=False)
async def page() -> FileResponse:
    return _asset("index.html")


@router.get("/playground/", include_in_schema=False)
async def page_slash() -> RedirectResponse:
    return RedirectResponse("/playground")


@router.get("/playground/info")
async def info(state: StateDep) -> dict[str, Any]:
    """What the page shows and needs: the model, whether it is the small embedded starter, the policy it
    recomputes verdicts with, the limits it checks before sending, and which modes can work."""
    g, s = state.guard, state.settings
    p = g.policy
    return {
        "model": state.name, "starter": state.name == STARTER_NAME,
        "kind": getattr(g.kind, "value", g.kind), "live": bool(g.live),
        "chat": s.upstream_url is not None, "auth": s.api_keys is not None,
        "policy": {"mode": p.mode.value, "default_action": p.default_action.value,
                   "actions": {c.value: a.value for c, a in p.actions.items()},
                   "block_threshold": p.block_threshold, "debounce": g.debounce_rule.value},
        "categories": [c.value for c in RESPONSE_CATEGORIES],
        "limits": {"max_request_bytes": s.max_request_bytes, "max_context": s.max_context},
    }


@router.get("/playground/{name}", include_in_schema=False)
async def asset(name: str) -> FileResponse:
    return _asset(name)


def _asset(name: str) -> FileResponse:
    if name not in FILES:  # a fixed list: no path from the URL ever reaches the filesystem
        raise APIError(404, f"no such playground file: {name}", code="not_found")
    with resources.as_file(ASSETS / name) as path:
        return FileResponse(path, media_type=FILES[name], headers=SECURITY_HEADERS)
