"""Every failure of the HTTP API as OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`.

OpenAI client libraries pick their exception from the HTTP status and show `message`; `type` and `code`
are OpenAI's vocabulary (never a Python class name), so a client written for OpenAI reads them as is.
A failure while judging the upstream's answer is a server-side condition (5xx), never the client's 400.
"""

from __future__ import annotations

import json
import logging
import re
import traceback
from typing import Any, Literal

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
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


# upstream error fields a client may see: identifiers (context_length_exceeded, messages[0].content), never prose
_ERROR_FIELD = re.compile(r"[A-Za-z0-9_.:\[\]-]{1,64}")


def error_fields(payload: Any) -> dict[str, str]:
    """The identifier-like `type`, `code` and `param` of an upstream error object (or of its `error`);
    its free text (`message`, anything else) is the upstream's and is never relayed unjudged."""
    err = payload.get("error", payload) if isinstance(payload, dict) else None
    if not isinstance(err, dict):
        return {}
    return {k: v for k in ("type", "code", "param")
            if isinstance(v := err.get(k), str) and _ERROR_FIELD.fullmatch(v)}


def _described(fields: dict[str, str], status: int | None = None) -> str:
    parts = ([f"HTTP {status}"] if status is not None else []) + [f"{k} {v}" for k, v in fields.items()]
    return f" ({', '.join(parts)})" if parts else ""


def _log_upstream(what: str, text: str, log_content: bool) -> None:
    if log_content:  # the upstream's text may quote message content: only when the operator opts in
        log.info("upstream %s text=%r", what, text[:4000])


def upstream_error(status: int, text: str, log_content: bool = False) -> APIError:
    """The upstream's refusal of a request: the status keeps its meaning, so a client can tell its own
    mistake (400/404/413/422) or a rate limit (429) from an outage or a misconfigured server (502). The
    upstream's message is not relayed (it is unjudged text); its identifier-like type/code/param are."""
    try:
        fields = error_fields(json.loads(text))
    except ValueError:
        fields = {}
    _log_upstream(f"HTTP {status}", text, log_content)
    if status == 429:
        return APIError(429, f"the upstream LLM is rate-limiting requests{_described(fields, 429)}; retry later",
                        code="rate_limit_exceeded")
    if status in (400, 404, 413, 422):
        return APIError(status, f"the upstream LLM rejected the request{_described(fields, status)}",
                        code=fields.get("code"), param=fields.get("param"))
    if status in (401, 403):
        return APIError(502, f"upstream LLM refused qguard's credentials (HTTP {status}); check the server's "
                             "upstream key", code="upstream_auth_error")
    return APIError(502, f"the upstream LLM failed{_described(fields, status)}", code="upstream_error")


def upstream_stream_error(payload: Any, text: str, log_content: bool = False) -> APIError:
    """An error the upstream reported inside its stream (an `error` event or object): qguard's own
    message, with the upstream's identifier-like fields only."""
    _log_upstream("stream error", text, log_content)
    return APIError(502, f"the upstream LLM failed mid-stream{_described(error_fields(payload))}; the rest of "
                         "the answer was withheld", code="upstream_error")


# ------------------------------------------------------------------------------ as HTTP responses

def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(status_code=e.status, content=e.body(), headers=e.headers)


async def reply(e: APIError, scope, receive, send) -> None:
    """Answer an ASGI request with `e` (for middleware, which runs outside FastAPI's handlers)."""
    await error_response(e)(scope, receive, send)


def jsonable_errors(e: RequestValidationError) -> list[dict[str, Any]]:
    return [{"loc": list(x.get("loc", ())), "msg": x.get("msg"), "type": x.get("type")} for x in e.errors()]


async def _openai_error(_: Request, e: APIError) -> JSONResponse:
    return error_response(e)


async def _any_error(_: Request, e: Exception) -> JSONResponse:
    return error_response(api_error(e))


async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0] if e.errors() else {}
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    return error_response(APIError(422, f"{where}: {first.get('msg', 'invalid request')}", param=where or None,
                                   details=jsonable_errors(e)))


def install(app: FastAPI) -> None:
    """Every error a route raises as OpenAI's error object. (An exception that escapes these handlers
    becomes one too, in `deps.Gate`.)"""
    app.add_exception_handler(APIError, _openai_error)
    app.add_exception_handler(QGuardError, _any_error)
    app.add_exception_handler(HTTPException, _any_error)  # FastAPI's own 404, 405, ...
    app.add_exception_handler(RequestValidationError, _validation_error)
