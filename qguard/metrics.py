"""Prometheus metrics of a qguard server: one `Metrics` object (with its own registry) per app.

Each app gets its own `CollectorRegistry`, not prometheus_client's global one, so several apps (tests,
one process serving two guards) never share or clash over counters. Label values come from fixed sets
only: endpoints (`ENDPOINTS`, anything else is "other"), turns, labels, actions, categories, status
codes and drop reasons. No user text, model name, key or request id ever becomes a label, so the number
of series stays bounded whatever the traffic.

Routes call the small `observe_*` helpers; `/metrics` is `metrics.asgi_app()` (mount it) or
`metrics.render()` (the exposition text and its content type).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import prometheus_client as prom

from qguard.policy import Action, Category, Severity, Verdict

# the routes qguard serves, by short name; a metric or audit record for any other name says "other"
ENDPOINTS: dict[str, str] = {
    "moderate": "/v1/moderate",
    "moderations": "/v1/moderations",
    "chat": "/v1/chat/completions",
    "stream": "/v1/stream",
}
OTHER = "other"
ENDPOINT_LABELS: tuple[str, ...] = (*ENDPOINTS.values(), OTHER)
STAGES: tuple[str, ...] = ("prompt", "response")  # which turn a verdict judged
AUDIT_DROP_REASONS: tuple[str, ...] = ("queue_full", "rejected", "closed", "invalid")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0)
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
GAUGES = ("active_sessions", "free_slots", "queue_depth", "audit_queue_depth")

_BY_PATH = {path: path for path in ENDPOINTS.values()}


def endpoint_name(name: str) -> str:
    """The endpoint label of `name`: a route path (`/v1/moderate`) or its short name (`moderate`) gives
    the path; anything else, "other"."""
    if not isinstance(name, str):
        return OTHER
    return _BY_PATH.get(name) or ENDPOINTS.get(name) or OTHER


def stage_name(stage: str | None) -> str:
    return stage if stage in STAGES else OTHER


def status_name(status: int) -> str:
    """An HTTP status as a label: the code (a bounded set), or "other" for anything that is not one."""
    ok = isinstance(status, int) and not isinstance(status, bool) and 100 <= status <= 599
    return str(status) if ok else OTHER


def _category_name(category: Category | str) -> str:
    value = category.value if isinstance(category, Category) else category
    return value if value in _CATEGORY_VALUES else OTHER


_CATEGORY_VALUES = frozenset(c.value for c in Category)


class Metrics:
    """The metrics of one app. Attributes are the prometheus_client metrics (read them in tests with
    `registry.get_sample_value`); the `observe_*` methods are what routes call."""

    def __init__(self) -> None:
        r = self.registry = prom.CollectorRegistry()
        e, s = ("endpoint",), ("endpoint", "stage")

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> prom.Counter:
            return prom.Counter(name, doc, labels, registry=r)

        def histogram(name: str, doc: str, labels: tuple[str, ...], buckets) -> prom.Histogram:
            return prom.Histogram(name, doc, labels, buckets=buckets, registry=r)

        def gauge(name: str, doc: str) -> prom.Gauge:
            return prom.Gauge(name, doc, registry=r)

        self.requests = counter("qguard_requests", "HTTP requests answered, by endpoint and status code",
                                (*e, "status"))
        self.verdicts = counter("qguard_verdicts", "Verdicts, by endpoint, judged turn, label and the policy's "
                                "action", (*s, "label", "action"))
        self.verdict_categories = counter("qguard_verdict_categories",
                                          "Categories named in verdicts (one verdict may name several)",
                                          (*s, "category"))
        self.verdict_errors = counter("qguard_verdict_errors",
                                      "Verdicts whose model answer could not be read (counted Unsafe)", e)
        self.cuts = counter("qguard_stream_cuts", "Streams cut off because the policy blocked their answer", e)
        self.refusals = counter("qguard_refusals", "Blocked prompts or answers replaced by the refusal text", s)
        self.rollbacks = counter("qguard_rollbacks", "Released text the client was told to retract", e)
        self.rate_limited = counter("qguard_rate_limited", "Requests refused with 429 (no free slot)", e)
        self.tokens = counter("qguard_tokens_judged", "Tokens the guard judged", e)
        self.guard_seconds = histogram("qguard_guard_seconds", "Time the guard spent judging one request (the "
                                       "upstream LLM not included)", e, LATENCY_BUCKETS)
        self.request_seconds = histogram("qguard_request_seconds", "Whole request time, the upstream LLM included",
                                         e, LATENCY_BUCKETS)
        self.step_seconds = histogram("qguard_engine_step_seconds", "Time of one batched engine step", (),
                                      STEP_BUCKETS)
        self.batch_size = histogram("qguard_engine_batch_size", "Sessions or requests in one engine step", (),
                                    BATCH_BUCKETS)
        self.active_sessions = gauge("qguard_active_sessions", "Live stream sessions open")
        self.free_slots = gauge("qguard_free_slots", "Request slots free (at 0 new requests get 429)")
        self.queue_depth = gauge("qguard_queue_depth", "Work items waiting for the engine's step thread")
        self.audit_queue_depth = gauge("qguard_audit_queue_depth", "Audit records waiting to be written")
        self.audit_written = counter("qguard_audit_written", "Audit records written to the database")
        self.audit_dropped = counter("qguard_audit_dropped", "Audit records lost: queue full, refused by the "
                                     "database, left at close, or not buildable", ("reason",))
        self._zero_series()

    def _zero_series(self) -> None:
        """Create every fixed-label series at 0, so a scrape shows them before the first event (a rate()
        over a series that appears mid-way misses its first increment)."""
        for endpoint in ENDPOINT_LABELS:
            for m in (self.verdict_errors, self.cuts, self.rollbacks, self.rate_limited, self.tokens):
                m.labels(endpoint)
            for stage in STAGES:
                self.refusals.labels(endpoint, stage)
                for label in Severity:
                    for action in Action:
                        self.verdicts.labels(endpoint, stage, label.value, action.value)
                for category in Category:
                    self.verdict_categories.labels(endpoint, stage, category.value)
        for reason in AUDIT_DROP_REASONS:
            self.audit_dropped.labels(reason)

    # ------------------------------------------------------------------------------ what routes call

    def observe_request(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        """One answered request (every status, 4xx and 5xx included) and, when given, its whole time."""
        ep = endpoint_name(endpoint)
        self.requests.labels(ep, status_name(status)).inc()
        if seconds is not None:
            self.request_seconds.labels(ep).observe(seconds)

    def observe_verdict(self, endpoint: str, verdict: Verdict, stage: str = "prompt",
                        tokens: bool = True) -> None:
        """One verdict: its label and action, each category it names, an unreadable answer, and (with
        `tokens`) its `n_tokens` as tokens judged. A live stream that counts tokens as it pushes them
        (`observe_tokens`) passes `tokens=False` for its final verdict."""
        ep, st = endpoint_name(endpoint), stage_name(stage)
        self.verdicts.labels(ep, st, verdict.label.value, verdict.action.value).inc()
        for category in verdict.categories:
            self.verdict_categories.labels(ep, st, _category_name(category)).inc()
        if verdict.error is not None:
            self.verdict_errors.labels(ep).inc()
        if tokens and verdict.n_tokens:
            self.tokens.labels(ep).inc(verdict.n_tokens)

    def observe_tokens(self, endpoint: str, n: int) -> None:
        if n > 0:
            self.tokens.labels(endpoint_name(endpoint)).inc(n)

    def observe_guard_latency(self, endpoint: str, seconds: float) -> None:
        """Time the guard spent on one request (prompt and answer judging, not the upstream)."""
        self.guard_seconds.labels(endpoint_name(endpoint)).observe(seconds)

    def observe_step(self, seconds: float, batch_size: int) -> None:
        """One engine step: its time and how many sessions or requests it carried."""
        self.step_seconds.observe(seconds)
        self.batch_size.observe(batch_size)

    def observe_cut(self, endpoint: str) -> None:
        self.cuts.labels(endpoint_name(endpoint)).inc()

    def observe_refusal(self, endpoint: str, stage: str) -> None:
        self.refusals.labels(endpoint_name(endpoint), stage_name(stage)).inc()

    def observe_rollback(self, endpoint: str) -> None:
        self.rollbacks.labels(endpoint_name(endpoint)).inc()

    def observe_rate_limited(self, endpoint: str) -> None:
        """A 429 for want of a slot (count the response itself with `observe_request` too)."""
        self.rate_limited.labels(endpoint_name(endpoint)).inc()

    def observe_audit(self, written: int = 0, dropped: int = 0, reason: str = "queue_full") -> None:
        """Audit records written, or dropped for `reason` (one of AUDIT_DROP_REASONS)."""
        if written:
            self.audit_written.inc(written)
        if dropped:
            self.audit_dropped.labels(reason if reason in AUDIT_DROP_REASONS else OTHER).inc(dropped)

    def watch(self, gauge: str, read: Callable[[], float]) -> None:
        """Read a gauge (one of GAUGES) from `read()` at each scrape: e.g.
        `metrics.watch("free_slots", lambda: slots.n - slots.in_use)`. A failing `read` shows NaN rather
        than failing the scrape."""
        if gauge not in GAUGES:
            raise ValueError(f"unknown gauge {gauge!r}; one of {', '.join(GAUGES)}")

        def safe() -> float:
            try:
                return float(read())
            except Exception:
                return math.nan

        getattr(self, gauge).set_function(safe)

    # ------------------------------------------------------------------------------------- exposition

    def render(self) -> tuple[bytes, str]:
        """(the Prometheus text exposition of every metric, its content type)."""
        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST

    def asgi_app(self):
        """An ASGI app answering a scrape (mount it at /metrics)."""
        return prom.make_asgi_app(self.registry)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        """The current value of one sample (e.g. `qguard_requests_total`), 0 where it does not exist yet."""
        return self.registry.get_sample_value(name, labels or {}) or 0.0
