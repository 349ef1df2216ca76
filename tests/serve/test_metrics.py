"""qguard.metrics: the exposition parses, counters move by exactly what the helpers were told, each app
has its own registry, and label values stay in fixed sets whatever names the routes pass."""

from __future__ import annotations

import asyncio
import math
import random

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qguard.metrics import ENDPOINT_LABELS, OTHER, STAGES, Metrics, endpoint_name
from qguard.policy import Action, Category, Policy, Severity


def scrape(m: Metrics) -> dict[tuple[str, frozenset], float]:
    """Every sample of the exposition text, parsed by prometheus_client's own parser."""
    body, content_type = m.render()
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before, after) -> dict[tuple[str, frozenset], float]:
    """The samples whose value changed, and by how much (gauges and _created timestamps left out)."""
    return {k: after[k] - before.get(k, 0.0) for k in after
            if not k[0].endswith("_created") and after[k] != before.get(k, 0.0)}


def unsafe_verdict(n_tokens: int = 7):
    return Policy().verdict(Severity.UNSAFE, [Category.VIOLENT, Category.PII],
                            probs={"Safe": 0.1, "Unsafe": 0.8, "Controversial": 0.1}, n_tokens=n_tokens)


def test_counters_move_by_exactly_what_the_helpers_were_told():
    m = Metrics()
    before = scrape(m)
    m.observe_request("/v1/moderate", 200, seconds=0.02)
    m.observe_request("moderate", 200)
    m.observe_request("chat", 429)
    m.observe_rate_limited("chat")
    m.observe_verdict("moderate", unsafe_verdict(n_tokens=7), stage="prompt")
    m.observe_verdict("chat", Policy().verdict(Severity.SAFE, n_tokens=5), stage="response", tokens=False)
    m.observe_tokens("chat", 11)
    m.observe_cut("chat")
    m.observe_refusal("chat", "response")
    m.observe_rollback("stream")
    m.observe_guard_latency("moderate", 0.004)
    m.observe_step(0.003, batch_size=3)
    m.observe_audit(written=4)
    m.observe_audit(dropped=2, reason="queue_full")
    after = scrape(m)
    mod, chat = "/v1/moderate", "/v1/chat/completions"
    expected = {
        ("qguard_requests_total", frozenset({"endpoint": mod, "status": "200"}.items())): 2,
        ("qguard_requests_total", frozenset({"endpoint": chat, "status": "429"}.items())): 1,
        ("qguard_rate_limited_total", frozenset({"endpoint": chat}.items())): 1,
        ("qguard_verdicts_total", frozenset({"endpoint": mod, "stage": "prompt", "label": "Unsafe",
                                             "action": "block"}.items())): 1,
        ("qguard_verdicts_total", frozenset({"endpoint": chat, "stage": "response", "label": "Safe",
                                             "action": "allow"}.items())): 1,
        ("qguard_verdict_categories_total", frozenset({"endpoint": mod, "stage": "prompt",
                                                       "category": "Violent"}.items())): 1,
        ("qguard_verdict_categories_total", frozenset({"endpoint": mod, "stage": "prompt",
                                                       "category": "PII"}.items())): 1,
        ("qguard_tokens_judged_total", frozenset({"endpoint": mod}.items())): 7,  # the verdict's n_tokens
        ("qguard_tokens_judged_total", frozenset({"endpoint": chat}.items())): 11,  # tokens=False: pushes only
        ("qguard_stream_cuts_total", frozenset({"endpoint": chat}.items())): 1,
        ("qguard_refusals_total", frozenset({"endpoint": chat, "stage": "response"}.items())): 1,
        ("qguard_rollbacks_total", frozenset({"endpoint": "/v1/stream"}.items())): 1,
        ("qguard_audit_written_total", frozenset()): 4,
        ("qguard_audit_dropped_total", frozenset({"reason": "queue_full"}.items())): 2,
    }
    histograms = {k: v for k, v in moved(before, after).items() if k[0].endswith(("_bucket", "_count", "_sum"))}
    counters = {k: v for k, v in moved(before, after).items() if k not in histograms}
    assert counters == expected
    # histograms: one observation each, in the right bucket
    assert value(after, "qguard_request_seconds_count", endpoint=mod) == 1
    assert value(after, "qguard_request_seconds_bucket", endpoint=mod, le="0.025") == 1
    assert value(after, "qguard_request_seconds_bucket", endpoint=mod, le="0.01") == 0
    assert value(after, "qguard_guard_seconds_count", endpoint=mod) == 1
    assert value(after, "qguard_guard_seconds_sum", endpoint=mod) == pytest.approx(0.004)
    assert value(after, "qguard_engine_step_seconds_count") == 1
    assert value(after, "qguard_engine_batch_size_bucket", le="2.0") == 0
    assert value(after, "qguard_engine_batch_size_bucket", le="4.0") == 1
    assert value(after, "qguard_engine_batch_size_sum") == 3


def test_error_verdicts_are_counted():
    m = Metrics()
    m.observe_verdict("moderate", Policy().error_verdict("unparseable answer"))
    s = scrape(m)
    assert value(s, "qguard_verdict_errors_total", endpoint="/v1/moderate") == 1
    assert value(s, "qguard_verdicts_total", endpoint="/v1/moderate", stage="prompt", label="Unsafe",
                 action="flag") == 1


def test_every_fixed_series_is_there_at_zero_before_any_traffic():
    s = scrape(Metrics())
    for ep in ENDPOINT_LABELS:
        for stage in STAGES:
            for label in Severity:
                for action in Action:
                    key = ("qguard_verdicts_total", frozenset({"endpoint": ep, "stage": stage, "label": label.value,
                                                               "action": action.value}.items()))
                    assert s[key] == 0
        assert s[("qguard_stream_cuts_total", frozenset({"endpoint": ep}.items()))] == 0
    assert s[("qguard_audit_dropped_total", frozenset({"reason": "closed"}.items()))] == 0


def test_each_app_has_its_own_registry():
    a, b = Metrics(), Metrics()  # a second one would raise "Duplicated timeseries" on a shared registry
    a.observe_request("moderate", 200)
    assert a.sample("qguard_requests_total", {"endpoint": "/v1/moderate", "status": "200"}) == 1
    assert b.sample("qguard_requests_total", {"endpoint": "/v1/moderate", "status": "200"}) == 0
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("qguard_requests_total", {"endpoint": "/v1/moderate", "status": "200"}) is None


def test_label_values_stay_in_fixed_sets_whatever_the_routes_pass():
    m = Metrics()
    m.observe_request("moderate", 200)
    m.observe_verdict("moderate", unsafe_verdict())
    n_series = len(scrape(m))
    rng = random.Random(0)
    for i in range(300):
        junk = f"/v1/moderate?user={rng.random()}&id={i}"
        m.observe_request(junk, 200)
        m.observe_request("moderate", rng.choice([9999, -1, "200", None, True]))
        m.observe_verdict(junk, unsafe_verdict(), stage=f"stage-{i}")
        m.observe_refusal(junk, f"turn {i}")
        m.observe_audit(dropped=1, reason=f"why {i}")
    s = scrape(m)
    labels = {k for key in s for k in key[1]}
    endpoints = {v for k, v in labels if k == "endpoint"}
    assert endpoints <= set(ENDPOINT_LABELS)
    assert {v for k, v in labels if k == "stage"} <= {*STAGES, OTHER}
    assert {v for k, v in labels if k == "status"} == {"200", OTHER}
    assert {v for k, v in labels if k == "reason"} <= {"queue_full", "rejected", "closed", "invalid", OTHER}
    assert value(s, "qguard_requests_total", endpoint=OTHER, status="200") == 300
    assert value(s, "qguard_requests_total", endpoint="/v1/moderate", status=OTHER) == 300
    # 300 distinct names made a handful of series, not hundreds
    assert len(s) - n_series < 40


def test_endpoint_names():
    assert endpoint_name("chat") == endpoint_name("/v1/chat/completions") == "/v1/chat/completions"
    assert endpoint_name("/v1/chat/completions/") == OTHER
    assert endpoint_name(None) == OTHER


def test_gauges_are_read_at_scrape_time_and_a_failing_reader_does_not_fail_the_scrape():
    m = Metrics()
    slots = {"free": 3}
    m.watch("free_slots", lambda: slots["free"])
    m.watch("queue_depth", lambda: 1 / 0)
    assert value(scrape(m), "qguard_free_slots") == 3
    slots["free"] = 1
    s = scrape(m)
    assert value(s, "qguard_free_slots") == 1
    assert math.isnan(value(s, "qguard_queue_depth"))
    with pytest.raises(ValueError, match="unknown gauge"):
        m.watch("user_count", lambda: 0)


def test_asgi_app_serves_the_exposition():
    m = Metrics()
    m.observe_cut("chat")

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=m.asgi_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/")

    r = asyncio.run(get())
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    assert [s.value for s in families["qguard_stream_cuts"].samples
            if s.name == "qguard_stream_cuts_total" and s.labels["endpoint"] == "/v1/chat/completions"] == [1.0]
