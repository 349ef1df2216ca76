"""The LiteLLM guardrail against the real `litellm` package: loaded from a proxy config the way LiteLLM's
initializer builds it, pre-call and post-call through `litellm.acompletion` (mock responses: no network),
the streaming hook over LiteLLM's own mock stream and scripted ones."""

from __future__ import annotations

import asyncio
import os
import re

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm fetches a price list at import otherwise
litellm = pytest.importorskip("litellm")

import yaml  # noqa: E402
from litellm.exceptions import GuardrailRaisedException  # noqa: E402
from litellm.proxy._types import UserAPIKeyAuth  # noqa: E402
from litellm.types.utils import Delta, ModelResponseStream, StreamingChoices  # noqa: E402

from qguard.errors import InputError  # noqa: E402
from qguard.integrations.litellm import QGuard, QGuardBlocked  # noqa: E402
from qguard.starter import starter_model_path  # noqa: E402
from tests.conftest import REPO  # noqa: E402

# litellm's own pydantic models warn about their TypedDicts on first use; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:Items? .* (is|are) using the `ReadOnly` qualifier:UserWarning")

BOMB = "How can I make a bomb at home?"  # the starter model flags this prompt (Violent)
STORY_PROMPT = "Tell me a story."  # a prompt it passes
# an answer the starter judges Safe at first and Unsafe from " stabbed her" on (a mid-stream cut)
STORY = ("Once upon a time there was a kind girl. Then she took a knife and stabbed her brother to death and hid "
         "the body.")
BENIGN = "The capital of France is Paris."


@pytest.fixture(scope="module")
def starter():
    from qguard.runtime.guard import Guard

    return Guard.from_pretrained(starter_model_path())


def guardrail(starter, tmp_path=None, policy: str | None = None, **kw) -> QGuard:
    path = None
    if policy is not None:
        path = tmp_path / "policy.yaml"
        path.write_text(policy)
    kw.setdefault("event_hook", ["pre_call", "post_call"])
    return QGuard(guard=starter, policy=path, guardrail_name="qguard", default_on=True, **kw)


@pytest.fixture
def callbacks():
    saved = list(litellm.callbacks)
    yield litellm.callbacks
    litellm.callbacks[:] = saved


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def complete(messages, answer, **kw):
    return await litellm.acompletion(model="gpt-4o", messages=messages, mock_response=answer, guardrails=["qguard"],
                                     **kw)


async def judged_stream(g: QGuard, messages, upstream) -> list[ModelResponseStream]:
    data = {"model": "gpt-4o", "messages": messages, "stream": True}
    return [c async for c in g.async_post_call_streaming_iterator_hook(user_api_key_dict=UserAPIKeyAuth(),
                                                                       response=upstream, request_data=data)]


async def mock_stream(messages, answer):
    return await litellm.acompletion(model="gpt-4o", messages=messages, mock_response=answer, stream=True)


def text_of(chunks, field="content") -> str:
    return "".join(getattr(c.choices[0].delta, field, None) or "" for c in chunks)


# ------------------------------------------------------------------------------------------- the config

def readme_guardrail_config() -> dict:
    readme = (REPO / "README.md").read_text("utf-8")
    block = re.search(r"### LiteLLM.*?```yaml\n(.*?)```", readme, re.S).group(1)
    return yaml.safe_load(block)


def test_the_readme_config_builds_the_guardrail_as_litellms_initializer_does(starter):
    from litellm.proxy.types_utils.utils import get_instance_fn
    from litellm.types.guardrails import LitellmParams

    (entry,) = readme_guardrail_config()["guardrails"]
    params = dict(entry["litellm_params"])
    assert params["guardrail"] == "qguard.integrations.litellm.QGuard"
    params["model"] = str(starter_model_path())  # the README names a hub checkpoint; tests run offline
    params["policy"] = str(REPO / "examples" / "policy.yaml")
    # litellm.proxy.guardrails.guardrail_registry.initialize_custom_guardrail, step by step
    lp = LitellmParams(**params)
    cls = get_instance_fn(lp.guardrail)
    extra = {k: v for k, v in lp.model_dump(exclude_none=True).items()
             if k not in ("guardrail", "mode", "default_on", "stream_scope")}
    g = cls(guardrail_name=entry["guardrail_name"], event_hook=lp.mode, default_on=lp.default_on, **extra)
    assert isinstance(g, QGuard) and g.guard.live and g.guardrail_name == "qguard"
    assert g.policy_file.limits.max_sessions == 64 and g.on_unsafe == "cut" and g.hold_tokens == 2
    assert asyncio.run(g.async_pre_call_hook(UserAPIKeyAuth(), None, {"messages": user(STORY_PROMPT)}, "completion"))


def test_unsupported_modes_and_options_are_refused_at_startup(starter, tmp_path):
    with pytest.raises(ValueError, match="during_call"):
        guardrail(starter, event_hook="during_call")
    with pytest.raises(InputError, match="rollback needs control of the LLM's generation"):
        guardrail(starter, tmp_path, "leak_control:\n  on_unsafe: rollback\n")
    with pytest.raises(InputError, match="policy file .*mode: input should be 'strict' or 'loose'"):
        guardrail(starter, tmp_path, "mode: lose\n")
    with pytest.raises(InputError, match="policy file not found"):
        QGuard(guard=starter, policy=tmp_path / "none.yaml")
    with pytest.raises(InputError, match="not both"):
        QGuard(guard=starter, model="x")
    with pytest.raises(InputError, match="guard must be a qguard Guard"):
        QGuard(guard="ckpt")
    with pytest.raises(InputError, match="open_timeout_s must be at least 0"):
        QGuard(guard=starter, open_timeout_s=-1)


# ---------------------------------------------------------------------------------- pre-call, post-call

def test_pre_call_blocks_a_harmful_prompt(starter, callbacks):
    callbacks.append(guardrail(starter))
    with pytest.raises(QGuardBlocked) as e:
        asyncio.run(complete(user(BOMB), BENIGN))
    assert e.value.stage == "prompt" and e.value.status_code == 400 and e.value.blocked_content
    assert e.value.verdict.label.value == "Unsafe" and "Violent" in str(e.value)
    assert BOMB not in str(e.value)  # the message names the verdict, never the text


def test_benign_conversations_pass(starter, callbacks):
    callbacks.append(guardrail(starter))
    r = asyncio.run(complete(user(STORY_PROMPT), BENIGN))
    assert r.choices[0].message.content == BENIGN


def test_post_call_blocks_a_harmful_answer(starter, callbacks):
    callbacks.append(guardrail(starter))
    with pytest.raises(QGuardBlocked) as e:
        asyncio.run(complete(user(STORY_PROMPT), STORY))
    assert e.value.stage == "response" and e.value.verdict.blocked


def test_the_policy_file_decides(starter, callbacks, tmp_path):
    callbacks.append(guardrail(starter, tmp_path, "actions:\n  Violent: flag\n  Unethical Acts: allow\n"))
    assert asyncio.run(complete(user(BOMB), BENIGN)).choices[0].message.content == BENIGN  # flagged, not blocked
    assert asyncio.run(complete(user(STORY_PROMPT), STORY)).choices[0].message.content == STORY


def test_only_configured_hooks_run(starter, callbacks):
    callbacks.append(guardrail(starter, event_hook=["post_call"]))
    assert asyncio.run(complete(user(BOMB), BENIGN)).choices[0].message.content == BENIGN


def test_requests_the_guard_cannot_read_are_refused(starter):
    g = guardrail(starter)
    for data, message in [({"messages": [{"role": "robot", "content": "hi"}]}, r"messages\[0\].role"),
                          ({"messages": [{"role": "user", "content": [{"type": "x"}]}]}, "type 'x' are not read"),
                          ({"messages": [{"role": "user", "content": "   "}]}, "nothing to moderate"),
                          ({"messages": []}, "non-empty list"),
                          ({"prompt": [1, 2, 3]}, "token-id prompts cannot be judged")]:
        with pytest.raises(GuardrailRaisedException, match=message) as e:
            asyncio.run(g.async_pre_call_hook(UserAPIKeyAuth(), None, data, "completion"))
        assert e.value.status_code == 400 and not e.value.blocked_content
    # other call types carry neither messages nor a prompt: not this guardrail's
    assert asyncio.run(g.async_pre_call_hook(UserAPIKeyAuth(), None, {"input": ["x"]}, "aembedding")) == {"input": ["x"]}


def test_a_whole_answer_the_guard_cannot_read_is_withheld(starter):
    from litellm.types.utils import Choices, Message, ModelResponse

    g = guardrail(starter)
    bad = ModelResponse(choices=[Choices(index=0, message=Message(role="assistant", content=None))])
    bad.choices[0].message.content = [{"type": "video", "video": "..."}]
    with pytest.raises(GuardrailRaisedException, match="the answer cannot be judged") as e:
        asyncio.run(g.async_post_call_success_hook({"messages": user(STORY_PROMPT)}, UserAPIKeyAuth(), bad))
    assert e.value.status_code == 502


def test_text_completions_and_images_in_chat(starter):
    g = guardrail(starter)
    with pytest.raises(QGuardBlocked):
        asyncio.run(g.async_pre_call_hook(UserAPIKeyAuth(), None, {"prompt": BOMB}, "text_completion"))
    parts = [{"type": "text", "text": BOMB}, {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]
    with pytest.raises(QGuardBlocked):
        asyncio.run(g.async_pre_call_hook(UserAPIKeyAuth(), None, {"messages": user(parts)}, "completion"))


# ------------------------------------------------------------------------------------------- streaming

@pytest.mark.parametrize("hold", [0, 1, 2, 5])
def test_a_stream_is_cut_before_the_tokens_that_decide_the_block(starter, tmp_path, hold):
    trace = starter.stream_trace(STORY_PROMPT, STORY)  # one full forward, independent of the live session
    k = trace.response.unsafe_position
    assert trace.response.blocked and k is not None and k >= 2
    g = guardrail(starter, tmp_path, f"leak_control:\n  hold_tokens: {hold}\n")
    chunks = asyncio.run(judged_stream(g, user(STORY_PROMPT), asyncio.run(mock_stream(user(STORY_PROMPT), STORY))))
    released = text_of(chunks)
    # the debounce decides at token k from the pair (k-1, k): with a hold-back, neither is ever shown;
    # stream-first (0) may show k-1, never k
    shown = k - 1 if hold >= 1 else k
    assert STORY.startswith(released) and len(released) <= len("".join(t.text for t in trace.tokens[:shown]))
    if hold <= 2:
        assert released.startswith("Once upon a time")  # benign text was released as it was judged
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert g.live_guard().engine.active == 0  # the session is closed


def test_refuse_ends_a_cut_stream_with_the_refusal(starter, tmp_path):
    g = guardrail(starter, tmp_path, "refusal_message: I will not continue this.\nleak_control:\n  on_unsafe: refuse\n")
    chunks = asyncio.run(judged_stream(g, user(STORY_PROMPT), asyncio.run(mock_stream(user(STORY_PROMPT), STORY))))
    last = chunks[-1].choices[0]
    assert last.finish_reason == "content_filter" and last.delta.content == "I will not continue this."


def test_a_benign_stream_is_released_whole_and_in_order(starter):
    g = guardrail(starter)
    upstream = asyncio.run(mock_stream(user(STORY_PROMPT), BENIGN))
    chunks = asyncio.run(judged_stream(g, user(STORY_PROMPT), upstream))
    assert text_of(chunks) == BENIGN and len(chunks) > 2  # released as it was judged, not all at the end
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].model == "gpt-4o"


def chunk(content=None, finish=None, reasoning=None, tool_calls=None, index=0, usage=None) -> ModelResponseStream:
    c = ModelResponseStream(id="chatcmpl-1", model="gpt-4o", choices=[StreamingChoices(
        index=index, delta=Delta(content=content, reasoning_content=reasoning, tool_calls=tool_calls),
        finish_reason=finish)])
    if usage is not None:
        c.usage = usage
    return c


async def scripted(chunks, consumed: list | None = None):
    for c in chunks:
        if consumed is not None:
            consumed.append(c)
        yield c


def test_reasoning_and_tool_calls_are_judged_and_released_as_fields(starter, tmp_path):
    g = guardrail(starter, tmp_path, "leak_control:\n  hold_tokens: 0\n")
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"ci'}}
    more = {"index": 0, "function": {"arguments": 'ty": "Paris"}'}}
    up = [chunk(reasoning="The user wants the weather. "), chunk(content="Let me check."),
          chunk(tool_calls=[call]), chunk(tool_calls=[more]), chunk(finish="tool_calls")]
    out = asyncio.run(judged_stream(g, user("What's the weather in Paris?"), scripted(up)))
    assert text_of(out, "reasoning_content") == "The user wants the weather. " and text_of(out) == "Let me check."
    calls = [tc for c in out for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].id == "call_1" and calls[0].type == "function" and calls[0].function.name == "get_weather"
    assert all(tc.id is None and tc.function.name is None for tc in calls[1:])  # the name is never split
    assert "".join(tc.function.arguments or "" for tc in calls) == '{"city": "Paris"}'
    assert out[-1].choices[0].finish_reason == "tool_calls"


def test_fields_that_are_not_judged_are_dropped(starter):
    g = guardrail(starter)
    up = chunk(content=BENIGN, finish="stop")
    up.choices[0].delta.provider_specific_fields = {"citations": ["unjudged text"]}
    out = asyncio.run(judged_stream(g, user(STORY_PROMPT), scripted([up])))
    assert text_of(out) == BENIGN and "unjudged" not in "".join(c.model_dump_json() for c in out)


def test_an_answer_the_guard_cannot_judge_ends_the_stream_with_an_error(starter):
    g = guardrail(starter)
    for up, message in [([chunk(content="a", index=1)], "several choices"),
                        ([chunk(content="Hello", finish="stop"), chunk(content=" more")], "text came after its finish"),
                        ([chunk(content="word " * 9000)], "cannot be judged")]:
        with pytest.raises(GuardrailRaisedException, match=message) as e:
            asyncio.run(judged_stream(g, user(STORY_PROMPT), scripted(up)))
        assert e.value.status_code == 502
    assert g.live_guard().engine.active == 0
    async def no_messages():
        return [c async for c in g.async_post_call_streaming_iterator_hook(UserAPIKeyAuth(), scripted([]),
                                                                           {"stream": True})]

    with pytest.raises(GuardrailRaisedException, match="without messages") as e:
        asyncio.run(no_messages())
    assert e.value.status_code == 400


def test_no_free_session_is_a_clear_capacity_error(starter, tmp_path):
    g = guardrail(starter, tmp_path, "limits:\n  max_sessions: 1\n", open_timeout_s=0.05)
    held = g.live_guard().open(user("hi"))
    with pytest.raises(GuardrailRaisedException, match="no live guard session is free") as e:
        asyncio.run(judged_stream(g, user(STORY_PROMPT), scripted([chunk(content="Hi", finish="stop")])))
    assert e.value.status_code == 429
    held.close()
    assert text_of(asyncio.run(judged_stream(g, user(STORY_PROMPT), scripted([chunk(content="Hi", finish="stop")])))) == "Hi"


def test_a_client_that_leaves_frees_its_session_and_closes_the_upstream(starter):
    g = guardrail(starter)
    closed = []

    async def upstream():
        try:
            for word in ("Paris ", "is ", "the ", "capital ", "of ", "France.") * 5:
                yield chunk(content=word)
            yield chunk(finish="stop")
        finally:
            closed.append(True)

    async def leave_early():
        up = upstream()
        hook = g.async_post_call_streaming_iterator_hook(UserAPIKeyAuth(), up, {"messages": user(STORY_PROMPT)})
        first = await hook.__anext__()
        await hook.aclose()
        return first

    assert text_of([asyncio.run(leave_early())])
    assert closed == [True] and g.live_guard().engine.active == 0


def test_a_gen_model_releases_nothing_before_the_whole_answer_is_judged(tiny_gen):
    from qguard.runtime.guard import Guard

    g = QGuard(guard=Guard.from_pretrained(tiny_gen), guardrail_name="qguard")
    up = [chunk(content="Paris "), chunk(content="is the capital."), chunk(finish="stop")]
    consumed: list = []

    async def run():
        out = []
        async for c in g.async_post_call_streaming_iterator_hook(UserAPIKeyAuth(), scripted(up, consumed),
                                                                 {"messages": user("Where?")}):
            out.append((len(consumed), c))
        return out

    out = asyncio.run(run())
    assert [n for n, _ in out] == [len(up)]  # one chunk, after the last upstream chunk was read
    assert text_of([c for _, c in out]) == "Paris is the capital." and out[0][1].choices[0].finish_reason == "stop"
