"""A LiteLLM guardrail backed by qguard, in-process or a remote qguard server (`pip install 'qguard[litellm]'`).

LiteLLM's proxy loads it from its config:

    guardrails:
      - guardrail_name: qguard
        litellm_params:
          guardrail: qguard.integrations.litellm.QGuard
          mode: [pre_call, post_call]       # prompts; answers (whole, or streamed token by token)
          default_on: true
          model: ckpt/stream-0.6b           # checkpoint folder or hub id (left out: the embedded starter)
          policy: /etc/qguard/policy.yaml   # optional: a qguard policy file

or, with the model in a `qguard serve` of its own (the proxy loads no model):

          api_base: http://qguard:8000      # the qguard server (`/v1/moderate`, `/v1/stream`)
          api_key: os.environ/QGUARD_KEY    # optional (LiteLLM reads the variable); or api_key_env: QGUARD_KEY
          timeout: 30                       # seconds per call to the server (default 30)
          on_unsafe: cut                    # optional: cut or refuse (refusal_message: the refusal's text)

In-process, the model is loaded once, when the proxy starts. What each hook does (the policy decides what
blocks):

- `pre_call` (`async_pre_call_hook`): the request's conversation is judged before the LLM sees it
  (`messages`, or a text completion's `prompt`); a blocked prompt is a `QGuardBlocked` (LiteLLM's
  `GuardrailRaisedException`, HTTP 400): the LLM is never called.
- `post_call`, non-streaming (`async_post_call_success_hook`): every choice's answer is judged (content,
  reasoning, tool calls as JSON text); a blocked one is a `QGuardBlocked` and nothing of it reaches the client.
  An answer that passes is LiteLLM's response object as it is: its other fields (Anthropic
  `thinking_blocks`, audio, provider-specific fields) are not read.
- `post_call`, streaming (`async_post_call_streaming_iterator_hook`): with a Stream model the answer is
  pushed to a live session as it arrives and judged token by token; only judged text is released, and only
  once it is `leak_control.hold_tokens` (default 2) judged tokens behind the newest, so the tokens that
  decide a block are never shown; the rest is released when the finished answer is judged. When the policy
  blocks, the upstream stream is closed (the LLM stops) and the client's stream ends with a chunk whose
  `finish_reason` is `content_filter` (`on_unsafe: refuse`: carrying the refusal message). A Gen model
  judges the whole answer before releasing any of it. The chunks sent are qguard's own: content, reasoning
  and tool calls that were judged; other delta fields are dropped, never passed on unjudged.

Remote (`api_base`): the same hooks, the same `Verdict` objects, blocks, chunks and errors, through
`qguard.client.AsyncQGuardClient`: prompts and whole answers through `POST /v1/moderate`, a streamed answer
through a `/v1/stream` session (docs/stream_protocol.md), released exactly as far as the server's `release`
fields allow (the server applies its hold-back window) and its remainder only when the server's verdict does
not block. A Gen server (`live_required` on open) has the whole answer judged through `/v1/moderate` first.
The server's policy decides (`qguard serve --policy`: mode, actions, debounce, `hold_tokens`): a local
`policy` (or `model`, `guard`, `device`, `dtype`, `calibration`) is refused, so two policies never disagree.

Failures fail closed: a conversation the guard cannot read is a 400, no free live session within
`open_timeout_s` a 429, an answer that cannot be judged (longer than the guard's context, text after the
finish_reason, several choices in a stream) ends the stream with an error (502); text not judged is never sent.
A remote server that cannot be reached (or drops the connection) is a 503, one that does not answer within
`timeout` a 504, one that answers with an error (its own 5xx, a refused API key, a broken reply) a 502.
Only chat and text completions are read: other call types (embeddings, images, ...) pass unchecked.
Message text is never logged; block lines carry the label, categories and position only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from litellm.exceptions import GuardrailRaisedException
from litellm.integrations.custom_guardrail import CustomGuardrail
from litellm.types.guardrails import GuardrailEventHooks
from litellm.types.utils import Delta, ModelResponseStream, StreamingChoices

from qguard.client import AsyncQGuardClient, HTTPError, StreamError
from qguard.errors import CapacityError, InputError, QGuardError, check_number
from qguard.leak import HoldBack
from qguard.moderations import content_text
from qguard.policy import Policy, Verdict
from qguard.policy_file import DEFAULT_HOLD_TOKENS, LeakControl, PolicyFile, load_policy_file
from qguard.runtime.guard import Guard

__all__ = ["DEFAULT_REFUSAL", "QGuard", "QGuardBlocked"]

log = logging.getLogger("qguard.litellm")

DEFAULT_REFUSAL = "Sorry, I can't help with that."
ON_UNSAFE = ("cut", "refuse")  # rollback needs control of the LLM's generation (qguard.generate)
DEFAULT_TIMEOUT_S = 30.0  # a remote qguard server's answer to one call
WS_POLICY_VIOLATION = 1008  # the close code of a /v1/stream connection refused for its API key
MODERATE_BATCH = 64  # conversations per /v1/moderate request (the server's MAX_CONVERSATIONS)
Path = tuple  # where a piece of answer text goes: ("content",), ("tool_calls", 0, "arguments"), ...


class QGuardBlocked(GuardrailRaisedException):
    """The policy blocked a prompt or an answer (HTTP 400 through LiteLLM's proxy). `stage` is "prompt"
    or "response"; `verdict` the qguard Verdict that blocked."""

    def __init__(self, guardrail_name: str | None, stage: str, verdict: Verdict):
        cats = ", ".join(c.value for c in verdict.categories) or "no category"
        super().__init__(guardrail_name=guardrail_name, status_code=400, blocked_content=True,
                         should_wrap_with_default_message=False,
                         message=f"qguard blocked the {stage}: {verdict.label.value} ({cats})")
        self.stage, self.verdict = stage, verdict


def _failure(guardrail_name: str | None, status: int, message: str) -> GuardrailRaisedException:
    """A request qguard could not judge: refused (fail closed), not a verdict on its content."""
    return GuardrailRaisedException(guardrail_name=guardrail_name, status_code=status, blocked_content=False,
                                    should_wrap_with_default_message=False, message=f"qguard: {message}")


class QGuard(CustomGuardrail):
    """qguard as a LiteLLM guardrail (see the module doc).

    In-process: `model`: checkpoint folder or hub id (None: the embedded starter model, a weak fallback);
    `policy`: a policy file (path or `PolicyFile`): its policy, debounce, thinking moderation, refusal message,
    `limits.max_sessions` / `max_context` (the live engine) and `leak_control.hold_tokens` / `on_unsafe`
    (cut or refuse) are used. `device`, `dtype`, `calibration`: as in `Guard.from_pretrained`. `guard`: an
    already loaded `Guard` instead of `model` (with `policy`, its weights are shared under the file's
    policy).

    Remote: `api_base`: a qguard server's base URL (`http://qguard:8000`); `api_key` or `api_key_env` (the
    name of the environment variable holding it); `timeout`: seconds per call to the server (default 30);
    `on_unsafe` (cut or refuse) and `refusal_message`: what a cut stream ends with (the rest of the policy
    is the server's).

    `open_timeout_s`: how long a stream waits for a free live session. Other keyword arguments are
    LiteLLM's (`guardrail_name`, `event_hook`, `default_on`, ...: the proxy passes them from its config).
    """

    def __init__(self, *, model: str | os.PathLike | None = None,
                 policy: str | os.PathLike | PolicyFile | None = None,
                 device: str | None = None, dtype: str | None = None, calibration: str | bool | None = None,
                 guard: Guard | None = None, open_timeout_s: float = 30.0, api_base: str | None = None,
                 api_key: str | None = None, api_key_env: str | None = None, timeout: float | None = None,
                 on_unsafe: str | None = None, refusal_message: str | None = None, **kwargs: Any):
        kwargs.setdefault("supported_event_hooks", [GuardrailEventHooks.pre_call, GuardrailEventHooks.post_call])
        super().__init__(**kwargs)
        self.open_timeout_s = check_number(open_timeout_s, "open_timeout_s")
        if self.open_timeout_s < 0:
            raise InputError(f"open_timeout_s must be at least 0 seconds, got {open_timeout_s}")
        self.guard: Guard | None = None
        self.remote: AsyncQGuardClient | None = None
        self.policy_file: PolicyFile | None = None
        self._lock = threading.Lock()  # one guard call at a time (the live engine has its own step thread)
        self._live = None
        if api_base is not None:
            self._init_remote(api_base, api_key, api_key_env, timeout, on_unsafe, refusal_message,
                              {"policy": policy, "model": model, "guard": guard, "device": device, "dtype": dtype,
                               "calibration": calibration})
            return
        for name, value, where in (("api_key", api_key, None), ("api_key_env", api_key_env, None),
                                   ("timeout", timeout, None), ("on_unsafe", on_unsafe, "leak_control.on_unsafe"),
                                   ("refusal_message", refusal_message, "refusal_message")):
            if value is not None:
                raise InputError(f"{name} is an option of a remote qguard server (api_base); in-process, "
                                 + (f"set {where} in the policy file" if where else "there is no server to call"))
        pf = policy if isinstance(policy, PolicyFile) or policy is None else load_policy_file(policy)
        self.policy_file = pf
        lc = pf.leak_control if pf is not None else LeakControl()
        self.on_unsafe = _on_unsafe(lc.on_unsafe or "cut", "leak_control.on_unsafe")
        self.hold_tokens: int | None = DEFAULT_HOLD_TOKENS if lc.hold_tokens is None else lc.hold_tokens
        self.refusal_message = (pf.refusal_message if pf is not None else None) or DEFAULT_REFUSAL
        if guard is not None and not isinstance(guard, Guard):
            raise InputError(f"guard must be a qguard Guard, got {type(guard).__name__}")
        if guard is not None and model is not None:
            raise InputError("give model (to load) or guard (loaded), not both")
        if guard is None:
            if model is None:
                log.warning("qguard guardrail: no model given, using the embedded starter model (much weaker than "
                            "the official Qwen3Guard checkpoints); set `model` in litellm_params for real traffic")
            opts = pf.guard_options() if pf is not None else {}
            guard = Guard.from_pretrained(model, device=device, dtype=dtype, calibration=calibration,
                                          policy=Policy.from_policy_file(pf) if pf is not None else None, **opts)
        elif pf is not None:
            guard = _with_policy(guard, pf)
        self.guard = guard

    def _init_remote(self, api_base: Any, api_key: str | None, api_key_env: str | None, timeout: float | None,
                     on_unsafe: str | None, refusal_message: str | None, local: Mapping[str, Any]) -> None:
        """Remote mode: no model here, a client of the qguard server at `api_base` (whose policy decides)."""
        for name, value in local.items():
            if value is not None:
                why = ("the qguard server's policy decides (qguard serve --policy); a local policy file is "
                       "refused so that two policies never disagree" if name == "policy"
                       else "the qguard server's model judges; the guardrail loads none")
                raise InputError(f"{name} cannot be given with api_base: {why}")
        parts = urlsplit(api_base) if isinstance(api_base, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise InputError(f"api_base must be a qguard server's http(s) URL, e.g. http://qguard:8000, got "
                             f"{api_base!r}")
        if api_key_env is not None:
            if api_key is not None:
                raise InputError("give api_key or api_key_env, not both")
            if not isinstance(api_key_env, str) or not os.environ.get(api_key_env):
                raise InputError(f"api_key_env: the environment variable {api_key_env!r} is not set")
            api_key = os.environ[api_key_env]
        if api_key is not None and (not isinstance(api_key, str) or not api_key):
            raise InputError("api_key must be a non-empty string")
        seconds = DEFAULT_TIMEOUT_S if timeout is None else check_number(timeout, "timeout")
        if seconds <= 0:
            raise InputError(f"timeout must be more than 0 seconds, got {timeout}")
        if refusal_message is not None and (not isinstance(refusal_message, str) or not refusal_message.strip()):
            raise InputError("refusal_message must be a non-empty string")
        self.on_unsafe = _on_unsafe("cut" if on_unsafe is None else on_unsafe, "on_unsafe")
        self.hold_tokens = None  # the server's window (each /v1/stream session says which)
        self.refusal_message = refusal_message or DEFAULT_REFUSAL
        self.remote = AsyncQGuardClient(api_base, api_key=api_key, timeout=seconds)

    # ------------------------------------------------------------------------------------- LiteLLM hooks

    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict, call_type: str) -> dict:
        """Judge the prompt before the LLM sees it; raise `QGuardBlocked` when the policy blocks it."""
        if self.should_run_guardrail(data=data, event_type=GuardrailEventHooks.pre_call) is not True:
            return data
        convs = self._request_conversations(data)
        if convs:
            for v in await self.judge_conversations(convs):
                if v.blocked:
                    self.log_block("prompt", v)
                    raise QGuardBlocked(self.guardrail_name, "prompt", v)
        return data

    async def async_post_call_success_hook(self, data: dict, user_api_key_dict: Any, response: Any) -> Any:
        """Judge every choice of a whole answer; raise `QGuardBlocked` when the policy blocks one."""
        if self.should_run_guardrail(data=data, event_type=GuardrailEventHooks.post_call) is not True:
            return response
        try:
            answers = _answers(response)
        except InputError as e:
            raise _failure(self.guardrail_name, 502, f"the answer cannot be judged ({e}); it was withheld") from None
        if answers is None:  # not a chat or text completion: not this guardrail's
            return response
        conv = self._conversation(data)
        if conv is None:
            return response
        convs = [[*conv, {"role": "assistant", "content": a}] for a in answers if a.strip()]
        for v in await self.judge_conversations(convs, answer=True) if convs else []:
            if v.blocked:
                self.log_block("response", v)
                raise QGuardBlocked(self.guardrail_name, "response", v)
        return response

    async def async_post_call_streaming_iterator_hook(self, user_api_key_dict: Any, response: Any,
                                                      request_data: dict) -> AsyncIterator[ModelResponseStream]:
        """The streamed answer, judged: only judged text comes out; a block ends the stream (module doc)."""
        if self.should_run_guardrail(data=request_data, event_type=GuardrailEventHooks.post_call) is not True:
            async for chunk in response:
                yield chunk
            return
        conv = self._conversation(request_data)
        if conv is None:
            raise _failure(self.guardrail_name, 400, "a streamed answer to a request without messages cannot be "
                                                     "judged")
        try:
            session = await (self._open_remote(conv) if self.remote is not None else self._open_local(conv))
        except BaseException:
            await _close(response)  # nothing of it is read or sent
            raise
        judge = _WholeJudge(self, conv) if session is None else _LiveJudge(self, conv, session)
        async for chunk in judge.run(response):
            yield chunk

    # ------------------------------------------------------------------------------------------ helpers

    def live_guard(self):
        """The live Stream engine of an in-process guard (built at the first streamed answer; `limits` of the
        policy file)."""
        if self.guard is None:
            raise InputError("a remote qguard guardrail has no live engine here (the server's is used)")
        if self._live is None:
            opts = self.policy_file.stream_guard_options() if self.policy_file is not None else {}
            self._live = self.guard.stream_guard(**opts)
        return self._live

    async def judge_conversations(self, convs: list[list[dict[str, str]]], answer: bool = False) -> list[Verdict]:
        """Judge conversations off the event loop (or on the remote server, `/v1/moderate`); one that cannot
        be judged is a 400 (the request's) or, for an answer, a 502 (the upstream's text)."""
        if self.remote is not None:
            out: list[Verdict] = []
            for i in range(0, len(convs), MODERATE_BATCH):
                verdicts = await self.remote_call(self.remote.moderate(convs[i:i + MODERATE_BATCH]), answer=answer)
                if not isinstance(verdicts, list) or len(verdicts) != len(convs[i:i + MODERATE_BATCH]):
                    raise self.remote_failure(ValueError("wrong number of verdicts"), answer)
                out += verdicts
            return out

        def run() -> list[Verdict]:
            with self._lock:
                return self.guard.classify_conversations(convs)

        try:
            return await asyncio.to_thread(run)
        except InputError as e:
            raise _input_failure(self.guardrail_name, str(e), answer) from None

    async def remote_call(self, call: Any, answer: bool) -> Any:
        """Await a call to the qguard server within `timeout`; every failure is the guardrail's error (fail
        closed: `remote_failure`)."""
        try:
            return await asyncio.wait_for(call, self.remote.timeout)
        except Exception as e:
            failure = self.remote_failure(e, answer)
            if failure is None:
                raise
            raise failure from None

    def remote_failure(self, e: BaseException, answer: bool, opening: bool = False) -> GuardrailRaisedException | None:
        """What a failed call to the qguard server is for the client (None: not a failure of the server).
        `answer`: judging the LLM's answer (its bad input is the upstream's, 502); `opening`: opening the
        live session of a streamed answer (its bad input is the request's conversation, 400)."""
        import httpx
        from websockets.exceptions import ConnectionClosed, WebSocketException

        name, url = self.guardrail_name, self.remote.url
        withheld = "the answer was withheld" if answer or opening else "the request was not sent to the LLM"
        if isinstance(e, ConnectionClosed) and e.rcvd is not None and e.rcvd.code == WS_POLICY_VIOLATION:
            e = StreamError("unauthorized", "the connection was closed for its API key")  # may outrun the frame
        if isinstance(e, (TimeoutError, asyncio.TimeoutError, httpx.TimeoutException)):
            return _failure(name, 504, f"the qguard server at {url} did not answer within {self.remote.timeout:g} "
                                       f"s; {withheld}")
        if isinstance(e, (httpx.TransportError, OSError, ConnectionClosed)):
            return _failure(name, 503, f"the qguard server at {url} cannot be reached ({type(e).__name__}); "
                                       f"{withheld}")
        if isinstance(e, HTTPError):
            if e.status == 429:
                return _failure(name, 429, f"the qguard server is busy ({e.message}); {withheld}")
            if e.status in (401, 403):
                return _failure(name, 502, f"the qguard server refused the guardrail's API key (HTTP {e.status}); "
                                           f"{withheld}")
            if 400 <= e.status < 500:  # the conversation itself (bad input, over the guard's context)
                return _input_failure(name, e.message, answer)
            return _failure(name, 502, f"the qguard server answered an error (HTTP {e.status}); {withheld}")
        if isinstance(e, StreamError):
            if e.code == "unauthorized":
                return _failure(name, 502, f"the qguard server refused the guardrail's API key; {withheld}")
            if e.code in ("bad_field", "too_long") and not answer:
                return _input_failure(name, e.message, answer)
            if answer:
                return _failure(name, 502, f"the answer cannot be judged ({e.code}: {e.message}); it was withheld")
            return _failure(name, 502, f"the qguard server answered an error ({e.code}); {withheld}")
        if isinstance(e, (WebSocketException, KeyError, TypeError, ValueError)):  # ValueError: InputError too
            return _failure(name, 502, f"the qguard server's answer is not qguard's protocol ({type(e).__name__}); "
                                       f"{withheld}")
        return None

    async def _open_local(self, conv: list[dict[str, str]]) -> _LocalSession | None:
        """An in-process live session for a streamed answer (None: a Gen model, whole answers only)."""
        if not self.guard.live:
            return None
        try:
            session = await self.live_guard().open_async(conv, timeout=self.open_timeout_s)
        except CapacityError as e:
            raise _failure(self.guardrail_name, 429, f"no live guard session is free ({e})") from None
        except InputError as e:
            raise _failure(self.guardrail_name, 400, str(e)) from None
        return _LocalSession(self, session)

    async def _open_remote(self, conv: list[dict[str, str]]) -> _RemoteSession | None:
        """A `/v1/stream` session on the qguard server (None: a Gen server, whole answers only). A full
        server answers `capacity` at once; the open is retried until `open_timeout_s`, as in-process waits."""
        loop = asyncio.get_running_loop()
        deadline, pause = loop.time() + self.open_timeout_s, 0.05
        while True:
            try:
                session = await asyncio.wait_for(self.remote.open_stream(conv), self.remote.timeout)
                return _RemoteSession(self, session)
            except StreamError as e:
                if e.code == "live_required":
                    return None
                if e.code != "capacity":
                    raise self.remote_failure(e, answer=False, opening=True) from None
                if loop.time() >= deadline:
                    raise _failure(self.guardrail_name, 429, "no live guard session is free on the qguard "
                                                             f"server within {self.open_timeout_s:g} s") from None
            except Exception as e:
                failure = self.remote_failure(e, answer=False, opening=True)
                if failure is None:
                    raise
                raise failure from None
            await asyncio.sleep(max(0.0, min(pause, deadline - loop.time())))  # the last try at the deadline
            pause = min(2 * pause, 1.0)

    def _conversation(self, data: Mapping[str, Any]) -> list[dict[str, str]] | None:
        convs = self._request_conversations(data)
        if not convs:
            return None
        if len(convs) > 1:
            raise _failure(self.guardrail_name, 400, "a request with several prompts has several answers; the "
                                                     "qguard guardrail judges one conversation per request")
        return convs[0]

    def _request_conversations(self, data: Mapping[str, Any]) -> list[list[dict[str, str]]]:
        try:
            return request_conversations(data)
        except InputError as e:
            raise _failure(self.guardrail_name, 400, str(e)) from None

    def log_block(self, stage: str, v: Verdict) -> None:
        log.info("qguard blocked the %s: %s (%s)%s", stage, v.label.value,
                 ", ".join(c.value for c in v.categories) or "no category",
                 f" at token {v.unsafe_position}" if v.unsafe_position is not None else "")


def _on_unsafe(value: Any, name: str) -> str:
    if value not in ON_UNSAFE:
        raise InputError(f"{name} {value!r}: the LiteLLM guardrail can 'cut' or 'refuse' (rollback needs control "
                         "of the LLM's generation: qguard.generate)")
    return value


def _input_failure(guardrail_name: str | None, message: str, answer: bool) -> GuardrailRaisedException:
    """A conversation the guard refused to read: the request's fault (400) or, for an answer, the upstream's
    text (502, withheld)."""
    if answer:
        return _failure(guardrail_name, 502, f"the answer cannot be judged ({message}); it was withheld")
    return _failure(guardrail_name, 400, message)


def _with_policy(guard: Guard, pf: PolicyFile) -> Guard:
    """`guard`'s weights under the policy file's policy, debounce and thinking moderation (nothing reloaded)."""
    return Guard(guard.family, guard.name, guard.tokenizer, Policy.from_policy_file(pf), guard.model, guard.labels,
                 pf.debounce, guard.max_new_tokens, guard.calibration, pf.moderate_thinking,
                 guard.official_special_tokens)


# --------------------------------------------------------------------------------- request and answer text

def guard_message(m: Any, i: int) -> dict[str, str]:
    """One OpenAI chat message as the guard reads it: developer instructions are a system turn, a tool
    result the user turn the answer follows, an assistant's tool calls join its text as JSON lines."""
    if not isinstance(m, Mapping):
        raise InputError(f"messages[{i}] must be an object with 'role' and 'content'")
    role = m.get("role")
    content = m.get("content")
    text = "" if content is None else content_text(content, f"messages[{i}].content")
    if role in ("system", "developer"):
        return {"role": "system", "content": text}
    if role in ("user", "tool", "function"):
        return {"role": "user", "content": text}
    if role == "assistant":
        calls = [*(m.get("tool_calls") or [])]
        if isinstance(m.get("function_call"), Mapping):
            calls.append({"function": m["function_call"]})
        return {"role": "assistant", "content": "\n".join(t for t in (text, tool_calls_text(calls)) if t)}
    raise InputError(f"messages[{i}].role must be system, developer, user, assistant or tool, got {role!r}")


def tool_calls_text(calls: Sequence[Any]) -> str:
    """Tool calls as the text the guard reads: one JSON object (name, arguments) a line."""
    out = []
    for call in calls:
        call = call.model_dump() if hasattr(call, "model_dump") else call
        fn = call.get("function", call) if isinstance(call, Mapping) else {}
        fn = fn.model_dump() if hasattr(fn, "model_dump") else fn
        if not isinstance(fn, Mapping):  # nothing to read: never passed on unjudged
            raise InputError("a tool call without a function object cannot be judged")
        args = fn.get("arguments", "")
        args = args if isinstance(args, str) else json.dumps(args)
        out.append(json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False))
    return "\n".join(out)


def request_conversations(data: Mapping[str, Any]) -> list[list[dict[str, str]]]:
    """The conversations a request asks the LLM to answer: its chat `messages`, or each text of a text
    completion's `prompt` as a user turn; [] for requests without either (other call types)."""
    messages = data.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise InputError("messages must be a non-empty list")
        return [[guard_message(m, i) for i, m in enumerate(messages)]]
    prompt = data.get("prompt")
    if prompt is None:
        return []
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise InputError("prompt must be text or a list of texts (token-id prompts cannot be judged)")
    return [[{"role": "user", "content": p}] for p in prompts]


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def _answers(response: Any) -> list[str] | None:
    """Each choice's answer text of a whole chat or text completion; None for other responses."""
    choices = _get(response, "choices")
    if not isinstance(choices, list):
        return None
    out = []
    for choice in choices:
        message = _get(choice, "message")
        if message is None:  # a text completion
            text = _get(choice, "text")
            if text is not None and not isinstance(text, str):
                raise InputError(f"a completion's text is not text ({type(text).__name__})")
            out.append(text or "")
            continue
        parts = [_get(message, "reasoning_content"), _get(message, "content")]
        texts = [p if isinstance(p, str) else content_text(p, "message.content") for p in parts if p is not None]
        calls = [*(_get(message, "tool_calls") or [])]
        if _get(message, "function_call") is not None:
            calls.append({"function": _get(message, "function_call")})
        out.append("\n".join(t for t in (*texts, tool_calls_text(calls)) if t))
    return out


@dataclass
class _Chunk:
    """One upstream stream chunk as the judge reads it."""

    pieces: list[tuple[Path, str]] = field(default_factory=list)  # its answer text, in the order it is judged
    calls: dict[int, dict[str, str]] = field(default_factory=dict)  # tool-call index -> id/type it starts
    finish: str | None = None
    usage: Any = None


def read_stream_chunk(chunk: Any) -> _Chunk:
    """The judged fields of a LiteLLM stream chunk; InputError for a shape qguard cannot judge."""
    c = _Chunk(usage=_get(chunk, "usage"))
    for choice in _get(chunk, "choices") or []:
        if (_get(choice, "index") or 0) != 0:
            raise InputError("the stream has several choices (n > 1); qguard judges one answer per request")
        delta = _get(choice, "delta")
        if delta is not None:
            _read_delta(delta, c)
        finish = _get(choice, "finish_reason")
        c.finish = finish if isinstance(finish, str) else c.finish
    return c


def _text(value: Any, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value or None
    raise InputError(f"the stream's {where} is not text ({type(value).__name__})")


def _read_delta(delta: Any, c: _Chunk) -> None:
    def add(path: Path, text: str | None) -> None:
        if text:
            c.pieces.append((path, text))

    add(("reasoning_content",), _text(_get(delta, "reasoning_content"), "delta.reasoning_content"))
    content = _get(delta, "content")
    add(("content",), content_text(content, "delta.content") if isinstance(content, list)
        else _text(content, "delta.content"))
    for j, call in enumerate(_get(delta, "tool_calls") or []):
        i = _get(call, "index")
        i = j if i is None else i
        if type(i) is not int or not 0 <= i < 1024:
            raise InputError("the stream's delta.tool_calls index is not a small integer")
        start = {k: v for k in ("id", "type") if isinstance(v := _get(call, k), str)}
        if start:
            c.calls.setdefault(i, {}).update(start)
        fn = _get(call, "function")
        for key in ("name", "arguments"):
            add(("tool_calls", i, key), _text(_get(fn, key), f"delta.tool_calls[{j}].function.{key}"))
    fc = _get(delta, "function_call")
    for key in ("name", "arguments"):
        add(("function_call", key), _text(_get(fc, key), f"delta.function_call.{key}"))


def build_delta(pieces: Sequence[tuple[Path, str]], calls: Mapping[int, Mapping[str, str]], started: set[int],
                first: bool) -> dict[str, Any]:
    """Delta fields carrying `pieces` (consecutive released text): text fields joined, tool calls by index
    (a call's id and type go with its first piece)."""
    out: dict[str, Any] = {"role": "assistant"} if first else {}
    tools: dict[int, dict[str, Any]] = {}
    for path, text in pieces:
        if path[0] == "tool_calls":
            i, key = path[1], path[2]
            call = tools.setdefault(i, {"index": i, "function": {}})
            if i not in started:
                started.add(i)
                call.update({"type": "function", **calls.get(i, {})})
            call["function"][key] = call["function"].get(key, "") + text
        elif path[0] == "function_call":
            fc = out.setdefault("function_call", {})
            fc[path[1]] = fc.get(path[1], "") + text
        else:
            out[path[0]] = out.get(path[0], "") + text
    if tools:
        out["tool_calls"] = [tools[i] for i in sorted(tools)]
    return out


# ------------------------------------------------------------------------------------------ stream judges

class _Release:
    """Judged text on its way to the client: the pieces in the order they were pushed, and how much of them
    was released. How far it may go is the live session's to say (`_LocalSession` / `_RemoteSession`
    `.releasable()`: the hold-back window, `leak.HoldBack`). A tool call's name is released whole (a client
    joins argument pieces, not name pieces)."""

    def __init__(self):
        self.pieces: list[tuple[Path, str, int]] = []  # (path, text, start offset)
        self.pushed = self.released = 0
        self._next = 0  # index of the first piece not wholly released

    def add(self, path: Path, text: str) -> None:
        self.pieces.append((path, text, self.pushed))
        self.pushed += len(text)

    def take(self, upto: int) -> list[tuple[Path, str]]:
        """The text between the released offset and `upto`, as pieces; the released offset moves there
        (less when a tool-call name would be cut)."""
        out = []
        while self._next < len(self.pieces) and self.released < upto:
            path, text, start = self.pieces[self._next]
            end = start + len(text)
            if end > upto and path[-1] == "name" and path[0] in ("tool_calls", "function_call"):
                break
            cut = min(end, upto)
            out.append((path, text[self.released - start:cut - start]))
            self.released = cut
            if cut == end:
                self._next += 1
        return out


class _LocalSession:
    """An in-process live session as a stream judge drives it: after each push the guard's count of judged
    tokens and of judged characters (everything pushed but the session's pending text) is noted, and text is
    releasable up to where it stood `hold_tokens` judged tokens ago (`leak.HoldBack`, the proxy's rule)."""

    def __init__(self, owner: QGuard, session: Any):
        self.owner, self.session = owner, session
        self.window = HoldBack(owner.hold_tokens)
        self.pushed = 0

    @property
    def stop(self) -> bool:
        return self.session.stop

    async def push(self, text: str) -> None:
        self.pushed += len(text)
        await self._judge(self.session.push_text(text))

    def releasable(self) -> int:
        return self.window.releasable()

    async def end(self) -> tuple[Verdict, bool]:
        """The answer's verdict and whether it is blocked (then nothing more is released; else all of it)."""
        if not self.session.stop:
            await self._judge(self.session.flush())
        return self.session.verdict(), self.session.stop

    async def _judge(self, push: Any) -> None:
        """Await a push (or flush) and note what it judged; a guard that cannot judge ends the stream."""
        try:
            verdicts = await push
        except (QGuardError, RuntimeError) as e:  # too long for the guard's context, a fault in the guard
            raise _failure(self.owner.guardrail_name, 502, f"the answer cannot be judged ({type(e).__name__}: "
                                                           f"{_reason(e)}); it was withheld") from None
        self.window.judged(len(verdicts), self.pushed - len(self.session.pending_text))

    async def aclose(self) -> None:
        await self.session.aclose()


class _RemoteSession:
    """A `/v1/stream` session of the qguard server as a stream judge drives it: the server applies its
    hold-back window and says in each reply what may be shown (`release`); text is releasable exactly that
    far. Each release must continue the pushed text (else the reply is not the protocol's: the stream ends)."""

    def __init__(self, owner: QGuard, session: Any):
        self.owner, self.session = owner, session
        self.text = ""  # everything pushed, to check the server's releases against
        self.released = 0

    @property
    def stop(self) -> bool:
        return self.session.stop

    async def push(self, text: str) -> None:
        self.text += text
        await self.owner.remote_call(self.session.push_text(text), answer=True)
        self._note_release()

    def releasable(self) -> int:
        return self.released

    async def end(self) -> tuple[Verdict, bool]:
        """`finish`: the server's verdict; the rest is released only when the server released it, which it
        does only for an answer its policy does not block."""
        verdict = await self.owner.remote_call(self.session.finish(), answer=True)
        self._note_release()
        blocked = self.session.stop or verdict.blocked
        if not blocked and self.released != len(self.text):  # e.g. over the server's context: never sent unjudged
            raise _failure(self.owner.guardrail_name, 502, "the qguard server judged only part of the answer; "
                                                           "the rest was withheld")
        return verdict, blocked

    def _note_release(self) -> None:
        new = self.session.release
        if not isinstance(new, str) or self.text[self.released:self.released + len(new)] != new:
            raise _failure(self.owner.guardrail_name, 502, "the qguard server released text that was not pushed "
                                                           "(not qguard's protocol); the answer was withheld")
        self.released += len(new)

    async def aclose(self) -> None:
        try:  # closes its own connection; a server that is gone has nothing to free
            await asyncio.wait_for(self.session.aclose(), self.owner.remote.timeout)
        except Exception:
            log.debug("closing the qguard server's stream session failed", exc_info=True)


class _Judge:
    """A streamed answer through the guard: chunks in, judged chunks out, a cut when the policy blocks."""

    def __init__(self, owner: QGuard, conv: list[dict[str, str]]):
        self.owner, self.conv = owner, conv
        self.meta: dict[str, Any] = {}
        self.calls: dict[int, dict[str, str]] = {}
        self.started: set[int] = set()
        self.first = True
        self.finish: str | None = None
        self.usage: Any = None

    def fail(self, status: int, message: str) -> GuardrailRaisedException:
        return _failure(self.owner.guardrail_name, status, message)

    def read(self, chunk: Any) -> _Chunk:
        for k in ("id", "created", "model"):
            if (v := _get(chunk, k)) is not None:
                self.meta.setdefault(k, v)
        try:
            c = read_stream_chunk(chunk)
        except InputError as e:
            raise self.fail(502, f"the answer cannot be judged: {e}; it was withheld") from None
        if c.pieces and self.finish is not None:
            raise self.fail(502, "the answer cannot be judged: text came after its finish_reason; it was withheld")
        for i, start in c.calls.items():
            self.calls.setdefault(i, {}).update(start)
        self.finish = c.finish or self.finish
        self.usage = c.usage if c.usage is not None else self.usage
        return c

    def chunk(self, pieces: Sequence[tuple[Path, str]], finish: str | None = None,
              usage: Any = None) -> ModelResponseStream:
        delta = build_delta(pieces, self.calls, self.started, self.first)
        self.first = False
        out = ModelResponseStream(**self.meta, choices=[StreamingChoices(index=0, delta=Delta(**delta),
                                                                         finish_reason=finish)])
        if usage is not None:
            out.usage = usage
        return out

    def blocked_end(self, verdict: Verdict) -> ModelResponseStream:
        self.owner.log_block("response", verdict)
        pieces = [(("content",), self.owner.refusal_message)] if self.owner.on_unsafe == "refuse" else []
        return self.chunk(pieces, finish="content_filter", usage=self.usage)


async def _close(response: Any) -> None:
    """Close the upstream stream (the LLM stops generating)."""
    close = getattr(response, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:  # the stream is being dropped; its own errors are of no use to the client
            log.debug("closing the upstream stream failed", exc_info=True)


class _LiveJudge(_Judge):
    """Stream model, in-process or remote: a live session judges the answer token by token as it arrives."""

    def __init__(self, owner: QGuard, conv: list[dict[str, str]], session: _LocalSession | _RemoteSession):
        super().__init__(owner, conv)
        self.session = session

    async def run(self, response: Any) -> AsyncIterator[ModelResponseStream]:
        release, session = _Release(), self.session
        try:
            try:
                async for chunk in response:
                    for path, text in self.read(chunk).pieces:
                        release.add(path, text)
                        await session.push(text)
                        if session.stop:
                            break
                    if session.stop:
                        break
                    if out := release.take(session.releasable()):
                        yield self.chunk(out)
                verdict, blocked = await session.end()
            finally:
                await session.aclose()
        except BaseException:
            await _close(response)  # nothing more of it is read or sent
            raise
        if blocked:
            await _close(response)
            yield self.blocked_end(verdict)
            return
        yield self.chunk(release.take(release.pushed), finish=self.finish, usage=self.usage)


def _reason(e: BaseException) -> str:
    """An error's words without message text: qguard's own errors say what was wrong, others only their type."""
    return str(e) if isinstance(e, QGuardError) else "internal error"


class _WholeJudge(_Judge):
    """Gen model (no live sessions): the whole answer is judged before any of it is released."""

    async def run(self, response: Any) -> AsyncIterator[ModelResponseStream]:
        pieces: list[tuple[Path, str]] = []
        async for chunk in response:
            pieces += self.read(chunk).pieces
        text = _answer_text(pieces)
        if text.strip():
            conv = [*self.conv, {"role": "assistant", "content": text}]
            (verdict,) = await self.owner.judge_conversations([conv], answer=True)
            if verdict.blocked:
                yield self.blocked_end(verdict)
                return
        yield self.chunk(pieces, finish=self.finish, usage=self.usage)


def _answer_text(pieces: Sequence[tuple[Path, str]]) -> str:
    """A streamed answer as the guard reads a whole one (`_answers`): reasoning, content, tool calls."""
    by: dict[Path, str] = {}
    for path, text in pieces:
        by[path] = by.get(path, "") + text
    texts = [by.get(("reasoning_content",), ""), by.get(("content",), "")]
    calls = sorted({p[1] for p in by if p[0] == "tool_calls"})
    tool_calls = [{"function": {"name": by.get(("tool_calls", i, "name")),
                                "arguments": by.get(("tool_calls", i, "arguments"), "")}} for i in calls]
    if any(p[0] == "function_call" for p in by):
        tool_calls.append({"function": {"name": by.get(("function_call", "name")),
                                        "arguments": by.get(("function_call", "arguments"), "")}})
    return "\n".join(t for t in (*texts, tool_calls_text(tool_calls)) if t)
