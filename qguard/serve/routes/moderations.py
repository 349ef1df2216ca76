"""`POST /v1/moderations`: OpenAI's moderation API, so `openai.OpenAI().moderations.create(...)` works as is.

The request's `input` (a string, a list of strings, a list of content parts) becomes one conversation per
result (`qguard.moderations`); every conversation is judged as a user prompt, all of them in ONE batched
guard call; the reply is OpenAI's `ModerationCreateResponse` shape, each result with qguard's own verdict
in `qguard`. `flagged` follows the server's policy (any action but allow). Errors are OpenAI's error
object: a bad body is a 400 naming the field (OpenAI answers bad moderation input with 400, not 422).
"""

from __future__ import annotations

import json
import logging
import time

from fastapi import APIRouter, Request

from qguard.errors import InputError
from qguard.moderations import moderation_response, parse_moderation_request
from qguard.serve.deps import GuardedRoute, StateDep
from qguard.serve.errors import APIError

log = logging.getLogger("qguard.serve")

router = APIRouter(route_class=GuardedRoute)

MAX_INPUTS = 64  # texts per request: one batched guard call holds them all at once


@router.post("/v1/moderations")
async def moderations(request: Request, state: StateDep) -> dict:
    t0 = time.perf_counter()
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    try:
        req = parse_moderation_request(body, max_inputs=MAX_INPUTS)
    except InputError as e:
        raise APIError(400, str(e), param="input", code="invalid_input") from None
    limit = state.guard.max_len
    for i, conv in enumerate(req.conversations):  # before anything is tokenized (`serve.limits`)
        if (n := await state.bound.exceeds(conv[-1]["content"], limit)) is not None:
            where = "input" if len(req.conversations) == 1 else f"input[{i}]"
            raise APIError(400, f"{where} is at least {n} tokens, longer than the guard's context of {limit} "
                                "tokens; shorten it", param="input", code="context_length_exceeded")
    verdicts = await state.runner.classify_all(req.conversations)
    seconds = time.perf_counter() - t0
    for conv, v in zip(req.conversations, verdicts):
        state.observe("moderations", v, "prompt", text=conv, seconds=seconds / len(verdicts))
    log.info("moderations n=%d flagged=%d ms=%.1f", len(verdicts), sum(v.action.value != "allow" for v in verdicts),
             1e3 * seconds)
    if state.settings.log_content:
        log.info("moderations content=%r", [c[-1]["content"] for c in req.conversations])
    return moderation_response(verdicts, model=state.name)
