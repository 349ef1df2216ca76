"""The LiteLLM guardrail in remote mode (`api_base`) against the real `litellm` package and a real `qguard
serve` app: uvicorn on 127.0.0.1 (a free port) in a thread, the embedded starter model (or a tiny Gen
checkpoint). Each remote result is compared with the in-process guardrail on the same model; a stopped,
silent or refusing server must fail closed. Loopback only; every wait bounded."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm fetches a price list at import otherwise
litellm = pytest.importorskip("litellm")
uvicorn = pytest.importorskip("uvicorn")

import yaml  # noqa: E402
from litellm.exceptions import GuardrailRaisedException  # noqa: E402
from litellm.proxy._types import UserAPIKeyAuth  # noqa: E402

from qguard.errors import InputError  # noqa: E402
from qguard.integrations.litellm import QGuard, QGuardBlocked  # noqa: E402
from qguard.serve import ServeSettings, create_app  # noqa: E402
from tests import served  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.integrations import test_litellm as local  # noqa: E402  # its texts, drivers and the starter guard
from tests.integrations.test_litellm import BENIGN, BOMB, STORY, STORY_PROMPT, chunk, scripted, text_of, user  # noqa: E402
from tests.served import wait_for  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Items? .* (is|are) using the `ReadOnly` qualifier:UserWarning")

KEY = "k-remote"


class Served(served.Served):
    """`qguard serve`'s app for `guard` served on 127.0.0.1; `url` is its base URL."""

    def __init__(self, guard, **settings):
        super().__init__(create_app(guard, ServeSettings(**settings)))
        self.url = self.http_url


@pytest.fixture(scope="module")
def starter():
    from qguard.runtime.guard import Guard
    from qguard.starter import starter_model_path

    return Guard.from_pretrained(starter_model_path())


@pytest.fixture(scope="module")
def server(starter):
    with Served(starter) as s:
        yield s


def remote(url: str, **kw) -> QGuard:
    kw.setdefault("event_hook", ["pre_call", "post_call"])
    return QGuard(api_base=url, guardrail_name="qguard", default_on=True, timeout=30, **kw)


def in_process(starter) -> QGuard:
    return QGuard(guard=starter, guardrail_name="qguard", default_on=True, event_hook=["pre_call", "post_call"])


def run(coro, seconds: float = 120):
    return asyncio.run(asyncio.wait_for(coro, seconds))


def pre_call(g: QGuard, data: dict) -> dict:
    return run(g.async_pre_call_hook(UserAPIKeyAuth(), None, data, "completion"))


def stream(g: QGuard, answer: str | list, prompt: str = STORY_PROMPT) -> list:
    up = scripted(answer) if isinstance(answer, list) else run(local.mock_stream(user(prompt), answer))
    return run(local.judged_stream(g, user(prompt), up))


def same_verdict(a, b) -> None:
    da, db = a.to_dict(), b.to_dict()
    for k in ("label", "binary", "mode", "action", "categories", "refusal", "unsafe_position"):
        assert da[k] == db[k], k
    assert da["probs"] == pytest.approx(db["probs"], abs=1e-4)


# ------------------------------------------------------------------------------------- pre-call, post-call

def test_remote_pre_call_blocks_and_passes_with_the_in_process_verdicts(server, starter):
    g, ref = remote(server.url), in_process(starter)
    assert g.guard is None and g.remote is not None  # no model in this process
    with pytest.raises(QGuardBlocked) as e:
        pre_call(g, {"messages": user(BOMB)})
    with pytest.raises(QGuardBlocked) as want:
        pre_call(ref, {"messages": user(BOMB)})
    assert e.value.stage == "prompt" and e.value.status_code == 400 and "Violent" in str(e.value)
    same_verdict(e.value.verdict, want.value.verdict)
    data = {"messages": user(STORY_PROMPT)}
    assert pre_call(g, data) is data
    (mine,) = run(g.judge_conversations([user(STORY_PROMPT)]))
    (theirs,) = run(ref.judge_conversations([user(STORY_PROMPT)]))
    assert not mine.blocked
    same_verdict(mine, theirs)
    # a text completion's many prompts: more than one /v1/moderate batch, in order
    prompts = [STORY_PROMPT] * 70 + [BOMB]
    with pytest.raises(QGuardBlocked):
        pre_call(g, {"prompt": prompts})


def test_remote_post_call_through_litellm(server, callbacks):
    callbacks.append(remote(server.url))
    with pytest.raises(QGuardBlocked) as e:
        run(local.complete(user(STORY_PROMPT), STORY))
    assert e.value.stage == "response" and e.value.verdict.blocked
    assert run(local.complete(user(STORY_PROMPT), BENIGN)).choices[0].message.content == BENIGN
    with pytest.raises(QGuardBlocked):
        run(local.complete(user(BOMB), BENIGN))


@pytest.fixture
def callbacks():
    saved = list(litellm.callbacks)
    yield litellm.callbacks
    litellm.callbacks[:] = saved


def test_a_conversation_the_server_refuses_is_the_requests_400(server):
    with pytest.raises(GuardrailRaisedException) as e:
        pre_call(remote(server.url), {"messages": user("   ")})
    assert e.value.status_code == 400 and not e.value.blocked_content


# ------------------------------------------------------------------------------------------- streaming

@pytest.mark.parametrize("hold", [0, 2, 5])
def test_a_remote_stream_is_cut_before_the_unsafe_position_like_in_process(starter, tmp_path, hold):
    trace = starter.stream_trace(STORY_PROMPT, STORY)  # one full forward, independent of any live session
    k = trace.response.unsafe_position
    assert trace.response.blocked and k is not None and k >= 2
    with Served(starter, hold_tokens=hold) as s:
        chunks = stream(remote(s.url), STORY)
        wait_for(lambda: s.active() == 0, 10, "the server to free the session")
    released = text_of(chunks)
    shown = k - 1 if hold >= 1 else k  # the deciding pair (k-1, k): with a window neither is shown
    assert STORY.startswith(released) and len(released) <= len("".join(t.text for t in trace.tokens[:shown]))
    if hold <= 2:
        assert released.startswith("Once upon a time")  # benign text was released as it was judged
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    # the same chunks as in-process under the same window (the server applies the same HoldBack rule)
    ref = local.guardrail(starter, tmp_path, f"leak_control:\n  hold_tokens: {hold}\n")
    want = stream(ref, STORY)
    assert [text_of([c]) for c in chunks] == [text_of([c]) for c in want]


def test_a_benign_remote_stream_is_released_whole_and_the_refusal_is_ours(server, starter):
    chunks = stream(remote(server.url), BENIGN)
    assert text_of(chunks) == BENIGN and len(chunks) > 2  # released as judged, not all at the end
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].model == "gpt-4o"
    assert [text_of([c]) for c in chunks] == [text_of([c]) for c in stream(in_process(starter), BENIGN)]
    refused = stream(remote(server.url, on_unsafe="refuse", refusal_message="I will not continue this."), STORY)
    last = refused[-1].choices[0]
    assert last.finish_reason == "content_filter" and last.delta.content == "I will not continue this."
    wait_for(lambda: server.active() == 0, 10, "the server to free the sessions")


def test_a_remote_gen_server_judges_the_whole_answer_first(tiny_gen):
    from qguard.runtime.guard import Guard

    gen = Guard.from_pretrained(tiny_gen)
    up = [chunk(content="Paris "), chunk(content="is the capital."), chunk(finish="stop")]
    consumed: list = []
    with Served(gen) as s:
        g = remote(s.url)

        async def go():
            out = []
            async for c in g.async_post_call_streaming_iterator_hook(UserAPIKeyAuth(), scripted(up, consumed),
                                                                     {"messages": user("Where?")}):
                out.append((len(consumed), c))
            return out

        out = run(go())
        (verdict,) = run(g.judge_conversations([[*user("Where?"), {"role": "assistant",
                                                                    "content": "Paris is the capital."}]]))
    assert [n for n, _ in out] == [len(up)]  # one chunk, after the last upstream chunk was read
    want = gen.classify_conversations([[*user("Where?"), {"role": "assistant", "content": "Paris is the capital."}]])
    same_verdict(verdict, want[0])
    if verdict.blocked:
        assert out[0][1].choices[0].finish_reason == "content_filter" and not text_of([c for _, c in out])
    else:
        assert text_of([c for _, c in out]) == "Paris is the capital." and out[0][1].choices[0].finish_reason == "stop"


def test_a_remote_answer_the_server_cannot_judge_ends_the_stream_with_an_error(starter):
    with Served(starter, max_context=64) as s:
        with pytest.raises(GuardrailRaisedException, match="cannot be judged") as e:
            stream(remote(s.url), [chunk(content="word " * 200), chunk(finish="stop")])
        assert e.value.status_code == 502
        wait_for(lambda: s.active() == 0, 10, "the server to free the session")


def test_no_free_remote_session_is_a_429_after_open_timeout(starter):
    from qguard.client import QGuardClient

    with Served(starter, max_concurrency=1) as s:
        held = QGuardClient(s.url).open_stream(user("hi"))
        t0 = time.monotonic()
        with pytest.raises(GuardrailRaisedException, match="no live guard session is free") as e:
            stream(remote(s.url, open_timeout_s=0.3), [chunk(content="Hi", finish="stop")])
        assert e.value.status_code == 429 and 0.25 <= time.monotonic() - t0 < 10
        held.close()
        wait_for(lambda: s.active() == 0, 10, "the held session to be freed")
        assert text_of(stream(remote(s.url), [chunk(content="Hi", finish="stop")])) == "Hi"


# ------------------------------------------------------------------------------------------- fail closed

def closed_upstream(record: list):
    async def gen():
        try:
            yield chunk(content=BENIGN)
            yield chunk(finish="stop")
        finally:
            record.append("closed")
    return gen()


def fails_closed(g: QGuard, status: int, match: str) -> None:
    """Pre-call, post-call and streaming all refuse with `status`; the stream yields nothing."""
    with pytest.raises(GuardrailRaisedException, match=match) as e:
        pre_call(g, {"messages": user(STORY_PROMPT)})
    assert e.value.status_code == status and not e.value.blocked_content
    with pytest.raises(GuardrailRaisedException, match=match) as e:
        run(g.async_post_call_success_hook({"messages": user(STORY_PROMPT)}, UserAPIKeyAuth(),
                                           run(litellm.acompletion(model="gpt-4o", messages=user(STORY_PROMPT),
                                                                   mock_response=BENIGN))))
    assert e.value.status_code == status
    got, record = [], []

    async def drain():
        async for c in g.async_post_call_streaming_iterator_hook(UserAPIKeyAuth(), closed_upstream(record),
                                                                 {"messages": user(STORY_PROMPT)}):
            got.append(c)

    with pytest.raises(GuardrailRaisedException, match=match) as e:
        run(drain())
    assert e.value.status_code == status and got == []  # nothing released unjudged


def test_a_stopped_server_fails_closed(starter):
    with Served(starter) as s:
        url = s.url
        assert pre_call(remote(url), {"messages": user(STORY_PROMPT)})
    fails_closed(remote(url), 503, "cannot be reached")


def test_a_silent_server_times_out_closed():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)  # connections are queued, never accepted, never answered
    try:
        t0 = time.monotonic()
        fails_closed(QGuard(api_base=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=0.5,
                            guardrail_name="qguard", default_on=True), 504, "did not answer within 0.5 s")
        assert time.monotonic() - t0 < 30
    finally:
        sock.close()


def test_api_keys_apply_and_a_refused_key_fails_closed(starter, monkeypatch):
    with Served(starter, api_keys=frozenset({KEY})) as s:
        fails_closed(remote(s.url, api_key="wrong"), 502, "refused the guardrail's API key")
        monkeypatch.setenv("QGUARD_TEST_KEY", KEY)
        g = remote(s.url, api_key_env="QGUARD_TEST_KEY")
        with pytest.raises(QGuardBlocked):
            pre_call(g, {"messages": user(BOMB)})
        assert text_of(stream(g, BENIGN)) == BENIGN


# ------------------------------------------------------------------------------------------- configuration

def test_remote_options_are_checked_and_a_local_policy_is_refused(starter, tmp_path):
    url = "http://127.0.0.1:9"
    (tmp_path / "p.yaml").write_text("mode: loose\n")
    with pytest.raises(InputError, match="policy cannot be given with api_base: the qguard server's policy"):
        QGuard(api_base=url, policy=tmp_path / "p.yaml")
    for name, value in (("model", "ckpt"), ("guard", starter), ("device", "cpu"), ("dtype", "fp32")):
        with pytest.raises(InputError, match=f"{name} cannot be given with api_base"):
            QGuard(api_base=url, **{name: value})
    with pytest.raises(InputError, match="api_base must be a qguard server's http"):
        QGuard(api_base="qguard:8000")
    with pytest.raises(InputError, match="not both"):
        QGuard(api_base=url, api_key="a", api_key_env="QGUARD_TEST_KEY")
    with pytest.raises(InputError, match="'QGUARD_UNSET_KEY_VAR' is not set"):
        QGuard(api_base=url, api_key_env="QGUARD_UNSET_KEY_VAR")
    with pytest.raises(InputError, match="timeout must be more than 0"):
        QGuard(api_base=url, timeout=0)
    with pytest.raises(InputError, match="rollback needs control"):
        QGuard(api_base=url, on_unsafe="rollback")
    for name, value in (("api_key", "k"), ("timeout", 3), ("on_unsafe", "refuse")):
        with pytest.raises(InputError, match=f"{name} is an option of a remote qguard server"):
            QGuard(guard=starter, **{name: value})
    with pytest.raises(InputError, match="no live engine here"):
        QGuard(api_base=url).live_guard()


def test_the_readmes_remote_config_builds_the_guardrail_as_litellms_initializer_does(server, monkeypatch):
    from litellm.proxy.types_utils.utils import get_instance_fn
    from litellm.secret_managers.main import get_secret
    from litellm.types.guardrails import LitellmParams

    readme = (REPO / "README.md").read_text("utf-8")
    section = re.search(r"### LiteLLM(.*?)\n## ", readme, re.S).group(1)
    block = re.findall(r"```yaml\n(.*?)```", section, re.S)[1]
    (entry,) = yaml.safe_load(block)["guardrails"]
    params = dict(entry["litellm_params"])
    assert params["guardrail"] == "qguard.integrations.litellm.QGuard" and "model" not in params
    params["api_base"] = server.url  # the README names a deployment's host
    monkeypatch.setenv(params["api_key"].removeprefix("os.environ/"), "any")  # the server has no keys
    # litellm.proxy.guardrails.guardrail_registry: the os.environ/ reference, then initialize_custom_guardrail
    lp = LitellmParams(**params)
    lp.api_key = str(get_secret(lp.api_key))
    extra = {k: v for k, v in lp.model_dump(exclude_none=True).items()
             if k not in ("guardrail", "mode", "default_on", "stream_scope")}
    g = get_instance_fn(lp.guardrail)(guardrail_name=entry["guardrail_name"], event_hook=lp.mode,
                                      default_on=lp.default_on, **extra)
    assert isinstance(g, QGuard) and g.guard is None and g.remote.timeout == 30 and g.remote.api_key == "any"
    with pytest.raises(QGuardBlocked):
        pre_call(g, {"messages": user(BOMB)})
