"""Operations of the streaming surfaces (issue 18): every decision of a `/v1/stream` WebSocket session is
in the metrics and the audit log like the HTTP routes' (allowed, blocked and cut, dropped without finish,
refused for capacity), and a streamed proxy answer's audit row carries the same content hash as the same
answer unstreamed.

The guard is test_leak_control's: the tiny Stream checkpoint edited so that a response token is Unsafe
exactly when it is " bomb" or " explosives", every prompt Safe. Loopback only; every wait bounded."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import httpx
import pytest
from fastapi.testclient import TestClient

from qguard.audit import api_key_id, query
from qguard.audit.record import judged_text
from qguard.serve import ServeSettings, create_app
from qguard.tokenizer import encode_text
from tests.serve import test_leak_control as leak
from tests.serve.test_leak_control import guard  # noqa: F401  (the trigger guard, a module fixture)
from tests.serve.test_ops import key, moved
from tests.serve.test_stream_ws import Served, call, dial, open_frame, wait_for

WS, CHAT = "/v1/stream", "/v1/chat/completions"
KEY = "sk-ws-secret"
SAFE_ANSWER = leak.SAFE_START + leak.SAFE_CONT


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def scrape(port: int) -> dict[tuple, float]:
    """Every sample of the server's /metrics, by `key(name, **labels)`."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert r.status_code == 200
    return {key(s.name, **s.labels): s.value for f in text_string_to_metric_families(r.text) for s in f.samples}


def session(ws, answer: str) -> tuple[dict, list[dict], dict]:
    """Open a story session, push `answer` word by word, finish: the prompt frame, the tokens frames, the
    verdict frame."""
    opened = call(ws, open_frame(leak.PROMPT))
    assert opened["type"] == "prompt" and not opened["blocked"], opened
    frames = [call(ws, {"type": "push", "text": w}) for w in leak.words(answer)]
    assert all(f["type"] == "tokens" for f in frames), frames
    end = call(ws, {"type": "finish"})
    assert end["type"] == "verdict", end
    return opened, frames, end


@pytest.mark.parametrize("log_content", [False, True])
def test_ws_sessions_are_counted_and_audited(guard, tmp_path, log_content):  # noqa: F811
    db = str(tmp_path / "a.db")
    app = create_app(guard, ServeSettings(audit=db, api_keys=frozenset({KEY}), metrics_public=True, max_concurrency=2,
                                          max_context=1024, log_content=log_content))
    auth = {"Authorization": f"Bearer {KEY}"}
    with Served(app) as s:
        before = scrape(s.port)
        # A: an allowed session, then one whose answer the policy stops (both finished)
        a = dial(s.url, additional_headers={**auth, "X-Request-ID": "ws-a"})
        p1, f1, safe_end = session(a, SAFE_ANSWER)
        p2, f2, harm_end = session(a, leak.HARM)
        a.close()
        assert safe_end["verdict"]["action"] == "allow" and harm_end["verdict"]["action"] == "block"
        assert any(f["stop"] for f in f2)
        # B (the browser's way: the key in the query): part of an answer, then the client is gone
        b = dial(s.url + f"?api_key={KEY}", additional_headers={"X-Request-ID": "ws-b"})
        pb = call(b, open_frame(leak.PROMPT))
        fb = [call(b, {"type": "push", "text": w}) for w in leak.words(leak.SAFE_START)[:4]]
        # C holds the second engine session; D finds none free
        c = dial(s.url, additional_headers={**auth, "X-Request-ID": "ws-c"})
        pc = call(c, open_frame(leak.PROMPT))
        assert scrape(s.port)[key("qguard_active_sessions")] == 2  # WS sessions are the engine's sessions
        d = dial(s.url, additional_headers={**auth, "X-Request-ID": "ws-d"})
        assert call(d, open_frame(leak.PROMPT))["code"] == "capacity"
        d.close()
        assert call(c, {"type": "close"})["type"] == "closed"  # nothing of an answer judged: no response record
        c.close()
        b.socket.close()  # gone without finish or a close frame
        metrics = app.state.metrics
        wait_for(lambda: metrics.sample("qguard_requests_total", {"endpoint": WS, "status": "101"}) == 4, 20,
                 "the four connections to end")
        wait_for(lambda: metrics.sample("qguard_active_sessions") == 0, 20, "every session to be freed")
        assert app.state.audit.flush()
        after = scrape(s.port)

    # ---- the metrics moved by exactly what happened
    pushed_b = "".join(leak.words(leak.SAFE_START)[:4])
    judged_b = pushed_b[:len(pushed_b) - len(fb[-1]["pending_text"])]
    n_resp = {"a1": sum(len(f["tokens"]) for f in f1) + len(safe_end["tokens"]),
              "a2": sum(len(f["tokens"]) for f in f2) + len(harm_end["tokens"]),
              "b": sum(len(f["tokens"]) for f in fb)}
    assert n_resp["a1"] == len(encode_text(guard.tokenizer, SAFE_ANSWER))  # every token of the answer, once
    prompt_len = safe_end["verdict"]["n_tokens"] - n_resp["a1"]  # the prompt's tokens, as the session ran them
    assert prompt_len > 0 and harm_end["verdict"]["n_tokens"] == prompt_len + n_resp["a2"]
    exp: Counter = Counter()

    def verdict(stage: str, v: dict) -> None:
        exp[key("qguard_verdicts_total", endpoint=WS, stage=stage, label=v["label"], action=v["action"])] += 1
        for cat in v["categories"]:
            exp[key("qguard_verdict_categories_total", endpoint=WS, stage=stage, category=cat)] += 1

    for p in (p1, p2, pb, pc):
        verdict("prompt", p["verdict"])
    verdict("response", safe_end["verdict"])
    verdict("response", harm_end["verdict"])
    verdict("response", {"label": "Safe", "action": "allow", "categories": []})  # B's verdict so far
    exp.update({
        key("qguard_requests_total", endpoint=WS, status="101"): 4, key("qguard_request_seconds_count", endpoint=WS): 4,
        key("qguard_stream_cuts_total", endpoint=WS): 1,  # the stopped session
        key("qguard_rate_limited_total", endpoint=WS): 1,  # D's capacity refusal
        key("qguard_tokens_judged_total", endpoint=WS): 4 * prompt_len + sum(n_resp.values()),
        key("qguard_guard_seconds_count", endpoint=WS): 4 + 3,  # 4 prompts, 3 answers
        key("qguard_audit_written_total"): 4 + 3 + 1,  # the decisions and D's failure
    })
    got = moved(before, after)
    steps, batches = got.pop(key("qguard_engine_step_seconds_count")), got.pop(key("qguard_engine_batch_size_count"))
    assert steps == batches and steps >= 4
    assert got == dict(exp)
    assert after[key("qguard_active_sessions")] == 0 and after[key("qguard_free_slots")] == 2

    # ---- the audit log: one row per decision, hashes always, content only on opt-in
    rows = query(db)
    assert len(rows) == 8
    got_rows = sorted((r["request_id"], r["stage"], r["label"] or "", r["blocked"], r["error"] or "") for r in rows)
    assert got_rows == [("ws-a", "prompt", "Safe", False, ""), ("ws-a", "prompt", "Safe", False, ""),
                        ("ws-a", "response", "Safe", False, ""), ("ws-a", "response", "Unsafe", True, ""),
                        ("ws-b", "prompt", "Safe", False, ""), ("ws-b", "response", "Safe", False, ""),
                        ("ws-c", "prompt", "Safe", False, ""), ("ws-d", "prompt", "", False, "capacity")]
    prompt_text = judged_text([{"role": "user", "content": leak.PROMPT}])
    texts = {("ws-a", "Safe"): SAFE_ANSWER, ("ws-a", "Unsafe"): leak.HARM, ("ws-b", "Safe"): judged_b}
    for r in rows:
        assert r["endpoint"] == WS and r["api_key_id"] == api_key_id(KEY)
        assert KEY not in json.dumps(r, default=str)
        if r["error"]:
            assert r["content_sha256"] is None and r["content"] is None
            continue
        text = prompt_text if r["stage"] == "prompt" else texts[(r["request_id"], r["label"])]
        assert r["content_sha256"] == sha(text)
        assert r["content"] == (text if log_content else None)
        assert r["latency_ms"] is not None and r["latency_ms"] >= 0
    by = {(r["request_id"], r["label"]): r for r in rows if r["stage"] == "response"}
    assert by[("ws-a", "Unsafe")]["n_tokens"] == harm_end["verdict"]["n_tokens"]
    assert by[("ws-a", "Unsafe")]["unsafe_position"] == harm_end["verdict"]["unsafe_position"] is not None
    assert by[("ws-b", "Safe")]["n_tokens"] == prompt_len + n_resp["b"]
    if not log_content:
        assert not any("lighthouse" in json.dumps(r, default=str) for r in rows)


def test_an_ids_session_is_hashed_over_the_text_its_ids_spell(guard, tmp_path):  # noqa: F811
    db = str(tmp_path / "a.db")
    ids = encode_text(guard.tokenizer, SAFE_ANSWER)
    with Served(create_app(guard, ServeSettings(audit=db, max_concurrency=1, max_context=1024))) as s:
        ws = dial(s.url)
        call(ws, open_frame(leak.PROMPT))
        for i in range(0, len(ids), 5):
            assert call(ws, {"type": "push", "ids": ids[i:i + 5]})["type"] == "tokens"
        assert call(ws, {"type": "push", "text": "x"})["code"] == "bad_field"  # refused: not part of the answer
        end = call(ws, {"type": "finish"})
        ws.close()
        assert s.app.state.audit.flush()
    rows = [r for r in query(db) if r["stage"] == "response"]
    assert len(rows) == 1 and rows[0]["n_tokens"] == end["verdict"]["n_tokens"]
    assert rows[0]["content_sha256"] == sha(guard.tokenizer.decode(ids))


# ------------------------------------------------------------------------------ the proxy's streamed answers

def scripted(reasoning: str, content: str) -> httpx.AsyncClient:
    """An upstream answering `reasoning` then `content`, whole or streamed a word per chunk."""

    def handler(request: httpx.Request) -> httpx.Response:
        if not json.loads(request.content).get("stream"):
            msg = {"role": "assistant", "content": content, **({"reasoning_content": reasoning} if reasoning else {})}
            return httpx.Response(200, json={"id": "u", "object": "chat.completion", "created": 1, "model": "m",
                                             "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}]})
        deltas = [{"reasoning_content": w} for w in leak.words(reasoning)] + [{"content": w} for w in leak.words(content)]
        lines = [json.dumps(leak.chunk(d)) for d in deltas] + [json.dumps(leak.chunk({}, "stop")), "[DONE]"]
        return httpx.Response(200, content="".join(f"data: {x}\n\n" for x in lines).encode(),
                              headers={"content-type": "text/event-stream"})

    return httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://u/v1")


@pytest.mark.parametrize("reasoning", ["", " The user wants a calm story about a keeper."])
def test_a_streamed_answer_has_the_content_hash_of_the_same_answer_unstreamed(guard, tmp_path, reasoning):  # noqa: F811
    db = str(tmp_path / "a.db")
    app = create_app(guard, ServeSettings(audit=db, upstream_url="http://u/v1", max_context=1024),
                     upstream=scripted(reasoning, SAFE_ANSWER))
    with TestClient(app) as c:
        for rid, stream in (("whole", False), ("streamed", True)):
            r = c.post(CHAT, json={"model": "m", "stream": stream, "messages": [{"role": "user", "content": leak.PROMPT}]},
                       headers={"x-request-id": rid})
            assert r.status_code == 200 and '"content_filter"' not in r.text, r.text
        assert app.state.audit.flush()
    answers = {r["request_id"]: r for r in query(db) if r["stage"] == "response"}
    assert set(answers) == {"whole", "streamed"}
    # the one text form a whole answer is judged and hashed in (`models.answer_text`)
    judged = f"{reasoning}</think>\n\n{SAFE_ANSWER}" if reasoning else SAFE_ANSWER
    assert answers["whole"]["content_sha256"] == answers["streamed"]["content_sha256"] == sha(judged)
    assert answers["streamed"]["content"] is None and answers["streamed"]["label"] == "Safe"
