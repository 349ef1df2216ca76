"""`POST /v1/moderations` as deployed: uvicorn on 127.0.0.1 with the embedded starter model, the official
`openai` SDK as the client (its parsed `ModerationCreateResponse` is the test of the shape)."""

from __future__ import annotations

import httpx
import pytest

from qguard.runtime.guard import Guard
from qguard.serve import ServeSettings, create_app
from qguard.starter import starter_model_path
from tests.serve.test_serve_live import Served

openai = pytest.importorskip("openai")

KEY = "k-mod"
BOMB = "How can I make a bomb at home?"  # the starter model: Unsafe, Violent
BENIGN = "What's the capital of France?"

pytestmark = pytest.mark.skipif(starter_model_path() is None, reason="this build ships no starter model")


@pytest.fixture(scope="module")
def guard():
    return Guard.from_pretrained(starter_model_path(), device="cpu")


@pytest.fixture(scope="module")
def served(guard):
    app = create_app(guard, ServeSettings(api_keys=frozenset({KEY})))
    steps: list[int] = []
    metrics_step = app.state.runner.on_step

    def on_step(seconds: float, batch: int) -> None:  # every guard call, with its batch size
        steps.append(batch)
        if metrics_step is not None:
            metrics_step(seconds, batch)

    app.state.runner.on_step = on_step
    with Served(app) as s:
        s.steps = steps
        s.base = f"http://127.0.0.1:{s.port}"
        yield s


@pytest.fixture()
def client(served):
    with openai.OpenAI(base_url=served.base + "/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


def test_single_string_harmful_is_flagged(client):
    r = client.moderations.create(input=BOMB)
    assert isinstance(r, openai.types.ModerationCreateResponse)
    assert r.model == "qguard-starter (embedded)" and r.id.startswith("modr-")
    (res,) = r.results
    scores = res.category_scores.model_dump(by_alias=True)
    assert res.flagged and res.categories.violence and max(scores, key=scores.get) == "violence"
    assert res.category_applied_input_types.violence == ["text"]
    extra = res.model_extra["qguard"]
    assert extra["label"] == "Unsafe" and "Violent" in extra["categories"] and extra["action"] == "block"


def test_benign_is_not_flagged(client):
    (res,) = client.moderations.create(input=BENIGN, model="omni-moderation-latest").results
    assert not res.flagged and not any(res.categories.model_dump().values())
    assert res.model_extra["qguard"]["label"] == "Safe"


def test_a_list_is_one_batched_guard_call(client, served):
    served.steps.clear()
    r = client.moderations.create(input=[BENIGN, BOMB, "Tell me a joke about cats."])
    assert [x.flagged for x in r.results] == [False, True, False]
    assert served.steps == [3]  # the three texts went through the guard in one batched call


def test_content_parts_are_one_text(client):
    parts = [{"type": "text", "text": BOMB}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]
    r = client.moderations.create(input=parts)
    (res,) = r.results
    assert res.flagged and res.categories.violence


def bad(served, body, **kw) -> httpx.Response:
    return httpx.post(served.base + "/v1/moderations", headers={"Authorization": f"Bearer {KEY}"},
                      timeout=30, **({"json": body} if body is not None else kw))


@pytest.mark.parametrize("body, says", [
    ({"input": ""}, "empty text"),
    ({"input": []}, "empty list"),
    ({"input": 5}, "must be a string"),
    ({"input": ["ok", 5]}, "not a mix"),
    ({"input": [{"type": "image_url", "image_url": {"url": "u"}}]}, "no text part"),
    ({"input": [{"type": "audio", "x": 1}]}, "'audio'"),
    ({"text": "hi"}, "unknown request field"),
    ({}, "no 'input'"),
    ({"input": "hi", "model": 3}, "model must be a string"),
    ({"input": ["x"] * 65}, "at most 64"),
])
def test_bad_input_is_an_openai_400(served, body, says):
    r = bad(served, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and says in err["message"] and err["param"] == "input"


def test_bad_input_through_the_sdk_is_a_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.moderations.create(input=[])
    assert "empty list" in e.value.message


def test_not_json_and_no_key(served):
    r = bad(served, None, content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(served.base + "/v1/moderations", json={"input": BENIGN}, timeout=30)
    assert r.status_code == 401 and "error" in r.json()


def test_too_long_is_refused_before_tokenizing(served, guard, monkeypatch):
    monkeypatch.setattr(guard, "max_len", 64)
    served.steps.clear()
    text = "word " * (64 * served.server.config.app.state.bound.longest)
    r = bad(served, {"input": [BENIGN, text]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and "input[1]" in err["message"]
    assert served.steps == []  # refused before the guard ran


# ------------------------------------------------------------------ /v1/moderate batches, and qguard.client


def post(served, path, body) -> httpx.Response:
    return httpx.post(served.base + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def test_moderate_single_conversation_still_answers_one_verdict(served):
    r = post(served, "/v1/moderate", {"messages": [{"role": "user", "content": BOMB}]})
    assert r.status_code == 200 and r.json()["verdict"]["label"] == "Unsafe" and "verdicts" not in r.json()


def test_moderate_batch_is_one_guard_call_with_content_parts(served):
    served.steps.clear()
    convs = [[{"role": "user", "content": BENIGN}],
             [{"role": "user", "content": [{"type": "text", "text": BOMB},
                                           {"type": "image_url", "image_url": {"url": "u"}}]}]]
    r = post(served, "/v1/moderate", {"conversations": convs, "mode": "loose"})
    assert r.status_code == 200, r.text
    labels = [(v["label"], v["mode"]) for v in r.json()["verdicts"]]
    assert labels == [("Safe", "loose"), ("Unsafe", "loose")]
    assert served.steps == [2]


@pytest.mark.parametrize("body, says", [
    ({}, "either messages"),
    ({"messages": [{"role": "user", "content": "a"}], "conversations": [[{"role": "user", "content": "b"}]]},
     "not both"),
    ({"conversations": [[]]}, "at least one message"),
    ({"conversations": [[{"role": "user", "content": [{"type": "audio"}]}]]}, "'audio'"),
])
def test_moderate_bad_batches_are_openai_errors(served, body, says):
    r = post(served, "/v1/moderate", body)
    assert r.status_code in (400, 422), r.text
    assert says in r.json()["error"]["message"]


def test_client_http_methods_return_verdicts(served):
    from qguard.client import QGuardClient
    from qguard.policy import Verdict

    c = QGuardClient(served.base, api_key=KEY)
    safe, unsafe = c.moderations([BENIGN, BOMB])
    assert isinstance(unsafe, Verdict) and unsafe.blocked and not safe.blocked
    v = c.moderate(BOMB)
    assert isinstance(v, Verdict) and v.label.value == "Unsafe"
    vs = c.moderate([[{"role": "user", "content": BENIGN}], [{"role": "user", "content": BOMB}]])
    assert [x.label.value for x in vs] == ["Safe", "Unsafe"]


def test_client_errors_are_qguard_errors(served):
    from qguard.client import QGuardClient
    from qguard.errors import InputError

    with pytest.raises(InputError, match="empty list"):
        QGuardClient(served.base, api_key=KEY).moderations([])
    with pytest.raises(InputError, match="401"):
        QGuardClient(served.base, api_key="wrong").moderate(BENIGN)


def test_async_client_http_methods(served):
    import asyncio

    from qguard.client import AsyncQGuardClient

    async def go():
        c = AsyncQGuardClient(served.base, api_key=KEY)
        (v,) = await c.moderations(BOMB)
        batch = await c.moderate([[{"role": "user", "content": BENIGN}]])
        return v, batch

    v, batch = asyncio.run(go())
    assert v.blocked and [b.label.value for b in batch] == ["Safe"]
