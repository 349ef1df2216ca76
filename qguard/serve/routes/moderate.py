"""`POST /v1/moderate`: qguard's own moderation API, one verdict for the last message of a conversation,
or a batch of conversations (`conversations`) judged in one batched guard call, one verdict each."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter

from qguard.moderations import content_text
from qguard.serve.deps import GuardedRoute, StateDep
from qguard.serve.errors import APIError
from qguard.serve.models import ModerateRequest, ModerationMessage

log = logging.getLogger("qguard.serve")

router = APIRouter(route_class=GuardedRoute)


def guard_messages(conv: list[ModerationMessage], where: str) -> list[dict[str, str]]:
    """A conversation as the guard reads it: content parts' text joined (images are not read)."""
    return [{"role": m.role, "content": content_text([p.model_dump() for p in m.content] if isinstance(m.content, list)
                                                     else m.content, f"{where}[{i}].content")}
            for i, m in enumerate(conv)]


@router.post("/v1/moderate")
async def moderate(req: ModerateRequest, state: StateDep) -> dict[str, Any]:
    t0 = time.perf_counter()
    prefix = "messages" if req.conversations is None else "conversations[{}]"
    where = [prefix.format(i) for i in range(len(req.batch))]
    convs = [guard_messages(c, w) for c, w in zip(req.batch, where)]
    limit = state.guard.max_len
    for conv, w in zip(convs, where):  # before anything is tokenized (`serve.limits`)
        if (n := await state.bound.exceeds("".join(m["content"] for m in conv), limit)) is not None:
            raise APIError(400, f"{w} is at least {n} tokens, longer than the guard's context of {limit} tokens; "
                                "shorten it", param=w, code="context_length_exceeded")
    verdicts = await state.runner.classify_all(convs)
    if req.mode:  # the same model output, judged under the mode the client asked for
        policy = state.guard.policy.with_mode(req.mode)
        verdicts = [policy.apply(v) for v in verdicts]
    seconds = time.perf_counter() - t0
    for conv, v in zip(convs, verdicts):
        state.observe("moderate", v, "response" if conv[-1]["role"] == "assistant" else "prompt", text=conv,
                      seconds=seconds / len(verdicts))
    log.info("moderate n=%d labels=%s ms=%.1f", len(verdicts), ",".join(v.label.value for v in verdicts), 1e3 * seconds)
    if state.settings.log_content:
        log.info("moderate content=%r", [c[-1]["content"] for c in convs])
    if req.conversations is None:
        return {"model": state.name, "verdict": verdicts[0].to_dict()}
    return {"model": state.name, "verdicts": [v.to_dict() for v in verdicts]}
