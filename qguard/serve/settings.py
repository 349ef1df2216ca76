"""The server's settings, and the name it gives its model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qguard.leak import DEFAULT_BUFFER_TOKENS, DEFAULT_HOLD_TOKENS, DEFAULT_MAX_RETRIES

DEFAULT_REFUSAL = "I can't help with that."


@dataclass
class ServeSettings:
    api_keys: frozenset[str] | None = None  # None: no auth (bind to localhost only)
    upstream_url: str | None = None  # OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1
    upstream_api_key: str | None = None
    refusal_message: str = DEFAULT_REFUSAL
    max_concurrency: int = 16  # requests in flight; more get 429 instead of queueing without bound
    max_context: int = 4096  # tokens per live-moderated stream (prompt + answer); bounds KV memory
    upstream_timeout_s: float = 120.0  # connect / read / write timeout of each upstream request
    max_request_bytes: int = 4 << 20  # larger request bodies get 413 before any of them is read
    keepalive_s: float | None = 15.0  # SSE comment while the upstream is silent this long (None: never)
    # longest upstream stream line read (None: derived from the guard's context, `limits.max_line_bytes`)
    max_upstream_line_bytes: int | None = None
    docs: bool = False  # /docs, /redoc and /openapi.json (the pages load their scripts from a CDN)
    log_content: bool = False
    stream_idle_timeout_s: float = 60.0  # a /v1/stream WebSocket silent this long is closed
    playground: bool = False  # the /playground page (`qguard serve` turns it on for a localhost bind)
    # leak control (`serve.proxy`, README "Leak control"): streamed text is released only hold_tokens judged
    # guard tokens behind the newest (0: stream-first); what an unsafe verdict does (cut | refuse | rollback)
    hold_tokens: int = DEFAULT_HOLD_TOKENS
    on_unsafe: str = "refuse"  # refuse: the held text becomes the refusal message (the proxy's old behaviour)
    buffer_tokens: int = DEFAULT_BUFFER_TOKENS  # rollback's hold-back (CARE's buffer)
    max_retries: int = DEFAULT_MAX_RETRIES  # rollbacks per answer before refusing
    intervention: str = "nudge"  # "nudge", "introspect" or the operator's text
    upstream_continuation: bool = False  # the upstream continues a final assistant message (vLLM, SGLang)
    # operations (`serve.ops`, docs/deployment.md): Prometheus /metrics (metrics_public: no API key needed
    # for it), the audit database (a SQLite path or a postgresql:// URL; None: no audit log), one judge at
    # startup before /health/ready says ready (`qguard serve` turns it on), the SIGTERM drain and its deadline
    metrics: bool = True
    metrics_public: bool = False
    audit: str | None = None
    warmup: bool = False
    drain_on_sigterm: bool = False  # under uvicorn in the main thread (`qguard serve` turns it on)
    policy_version: str | None = None  # the --policy file's version (`PolicyFile.version`), for the audit log
    drain_timeout_s: float = 30.0


def public_name(name: str) -> str:
    """What /health and replies call the model: a hub id as given, a local checkpoint by its folder name
    only (its filesystem path is nobody's business), the embedded starter as such."""
    from qguard.starter import starter_model_path

    p = Path(name).expanduser()
    try:
        if not p.exists():
            return name
        starter = starter_model_path()
        return "qguard-starter (embedded)" if starter is not None and p.resolve() == starter.resolve() else p.name
    except OSError:
        return Path(name).name
