"""`POST /v1/chat/completions`: the guarded OpenAI-compatible proxy.

The prompt, with every other request text the LLM reads (`models.request_texts`), is judged before the
upstream sees it; a blocked prompt never reaches the LLM and gets a refusal with finish_reason
"content_filter". An allowed request goes to the upstream, and its answer is judged before the client
sees it (`serve.proxy`).
"""

from __future__ import annotations

import logging
import time

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from qguard.policy import Verdict
from qguard.serve.deps import AppState, GuardedRoute, StateDep
from qguard.serve.errors import APIError
from qguard.serve.limits import TokenBound
from qguard.serve.models import (
    ChatCompletionRequest,
    completion_body,
    guard_info,
    guard_message,
    request_texts,
)
from qguard.serve.proxy import proxy_once, proxy_stream, until_disconnect
from qguard.serve.sse import ClosingStreamingResponse, refusal_events

log = logging.getLogger("qguard.serve")

router = APIRouter(route_class=GuardedRoute)

# the assistant turn's opening (<|im_start|>assistant\n<think>\n\n</think>\n\n) that a live session adds
ASSISTANT_OPENING = 7


@router.post("/v1/chat/completions")
async def chat(req: ChatCompletionRequest, request: Request, state: StateDep):
    if req.n not in (None, 1):
        raise APIError(400, f"n={req.n}: qguard judges one answer per request, so only n=1 is accepted "
                            "(send n requests instead)", param="n")
    extras = request_texts(req)  # the request's other texts the LLM reads (400 for unjudged ones)
    messages = [guard_message(m) for m in req.messages]
    if messages[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's or a tool result", param="messages")
    live_stream = req.stream and state.guard.live
    limit = state.guard.max_len
    if live_stream:
        limit = min(limit, state.settings.max_context - ASSISTANT_OPENING)
    await check_prompt_size(messages, extras, state.bound, limit)
    prompt_v, where, shown = await judge_prompt(state, messages, extras)
    if shown.blocked:
        return refuse_prompt(state, req, where, shown)
    upstream = state.upstream()
    body = req.model_dump(exclude_unset=True)  # what the client sent, for the upstream
    if req.stream:
        if live_stream:
            check_room(prompt_v, state.settings.max_context)
        return ClosingStreamingResponse(proxy_stream(state, upstream, body, messages, prompt_v),
                                        media_type="text/event-stream")
    return await until_disconnect(request, proxy_once(state, upstream, body, messages, prompt_v))


async def check_prompt_size(messages: list[dict[str, str]], extras: list[tuple[str, str]], bound: TokenBound,
                            limit: int) -> None:
    """Refuse, before anything is tokenized, a request that cannot fit the guard's context (a 4 MB prompt
    would hold the guard for seconds only to be refused)."""
    n = await bound.exceeds("".join(m["content"] for m in messages), limit)
    if n is not None:
        raise APIError(400, f"the conversation is at least {n} tokens, longer than the guard's context of {limit} "
                            "tokens; shorten it", param="messages", code="context_length_exceeded")
    for field, text in extras:
        if (n := await bound.exceeds(text, limit)) is not None:
            raise APIError(400, f"{field} is at least {n} tokens, longer than the guard's context of {limit} tokens",
                           param=field, code="context_length_exceeded")


async def judge_prompt(state: AppState, messages: list[dict[str, str]],
                       extras: list[tuple[str, str]]) -> tuple[Verdict, str, Verdict]:
    """The conversation's verdict, and the part that decides: (prompt verdict, field, its verdict). The
    request is blocked if any part is: the conversation's verdict first, else the first blocked field's."""
    t0 = time.perf_counter()
    verdicts = await state.runner.classify_all([messages, *([{"role": "user", "content": t}] for _, t in extras)])
    prompt_v = verdicts[0]
    if state.settings.log_content:
        log.info("proxy prompt content=%r", messages[-1]["content"])
    parts = [("messages", prompt_v), *((f, v) for (f, _), v in zip(extras, verdicts[1:]))]
    where, shown = next(((f, v) for f, v in parts if v.blocked), ("messages", prompt_v))
    # one decision per judged turn: the part that decides it (every part's tokens count as judged)
    state.observe("chat", shown, "prompt", text=messages, seconds=time.perf_counter() - t0, tokens=False)
    state.metrics.observe_tokens("chat", sum(v.n_tokens or 0 for v in verdicts))
    return prompt_v, where, shown


def refuse_prompt(state: AppState, req: ChatCompletionRequest, where: str, shown: Verdict):
    """qguard's refusal of a blocked prompt (the upstream never sees it), streamed when the client asked."""
    log.info("proxy blocked prompt (%s) categories=%s", where, [c.value for c in shown.categories])
    info = guard_info(shown, blocked="prompt")
    state.metrics.observe_refusal("chat", "prompt")
    if req.stream:
        return StreamingResponse(refusal_events(req.model, state.settings.refusal_message, info),
                                 media_type="text/event-stream")
    return completion_body(req.model, state.settings.refusal_message, "content_filter", info)


def check_room(prompt_v: Verdict, max_context: int) -> None:
    """A live stream needs room for its answer in the session's context."""
    if prompt_v.n_tokens is not None and prompt_v.n_tokens + ASSISTANT_OPENING >= max_context:
        raise APIError(400, f"the conversation is {prompt_v.n_tokens} tokens, leaving no room for an answer in "
                            f"the server's live-moderation context of {max_context} tokens",
                       param="messages", code="context_length_exceeded")
