"""Every failure of the HTTP API as OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`.

OpenAI client libraries pick their exception from the HTTP status and show `message`; `type` and `code`
are OpenAI's vocabulary (never a Python class name), so a client written for OpenAI reads them as is.
A failure while judging the upstream's answer is a server-side condition (5xx), never the client's 400.
"""

from __future__ import annotations

import json
import logging
import traceback
from typing import Any, Literal

import httpx
from starlette.exceptions import HTTPException

from qguard.errors import CapacityError, QGuardError

log = logging.getLogger("qguard.serve")

# OpenAI's error types by HTTP status (OpenAI answers a bad key with invalid_request_error too, code
# invalid_api_key)
OPENAI_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
                404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error"}


def openai_type(status: int) -> str:
    return OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


class APIError(HTTPException):
    """An error the client receives as OpenAI's error object, with this HTTP status. An HTTPException, so
    that FastAPI passes it on as it is when it is raised while the request body is read."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(status, message, headers)
        self.status, self.message, self.code, self.param, self.extra = status, message, code, param, extra

    @property
    def type(self) -> str:
        return openai_type(self.status)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code,
                          **self.extra}}


Side = Literal["request", "answer"]


def api_error(e: BaseException, side: Side = "request") -> APIError:
    """`e` as the client should see it. `side`: whether it happened on the client's request (a qguard
    input error is the client's 400) or on the upstream's answer (the answer is not the client's doing:
    a 502, and a guard context too small for it is named as such)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, HTTPException):
        return APIError(e.status_code, str(e.detail), headers=getattr(e, "headers", None))
    if isinstance(e, QGuardError):
        if side == "answer":
            code = "guard_context_exceeded" if isinstance(e, CapacityError) or "context" in str(e) else "guard_error"
            return APIError(502, f"the upstream LLM's answer cannot be judged: {e}; it was withheld", code=code)
        return APIError(400, str(e), code="context_length_exceeded" if isinstance(e, CapacityError) else None)
    if isinstance(e, httpx.TimeoutException):
        return APIError(504, "upstream LLM timed out (raise the server's --upstream-timeout if it is slow)",
                        code="upstream_timeout")
    if isinstance(e, httpx.HTTPError):
        return APIError(502, f"upstream LLM unreachable ({type(e).__name__})", code="upstream_error")
    # anything else is a bug or a fault in the guard: fail closed, with the traceback in the server log
    # only, and without the exception's message (it may quote message content)
    log.error("internal error %s; traceback (most recent call last):\n%s", type(e).__name__,
              "".join(traceback.format_tb(e.__traceback__)).rstrip())
    return APIError(500, "internal error in the guard; nothing unjudged was sent", code="internal_error")


def upstream_error(status: int, text: str) -> APIError:
    """The upstream's refusal of a request, relayed so a client can tell its own mistake (4xx, with the
    upstream's message) or a rate limit (429) from an outage or a misconfigured server (502)."""
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text[:300]
    if status == 429 or status in (400, 404, 413, 422):
        return APIError(status, f"upstream LLM: {message}", code="rate_limit_exceeded" if status == 429 else None)
    if status in (401, 403):
        return APIError(502, f"upstream LLM refused qguard's credentials (HTTP {status}); check the server's "
                             "upstream key", code="upstream_auth_error")
    return APIError(502, f"upstream LLM answered HTTP {status}: {message}", code="upstream_error")
