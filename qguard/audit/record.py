"""`AuditRecord`: one moderation decision as the audit log stores it, built from a `Verdict` and the
request's metadata. Message text is kept only when the operator opted in; its SHA-256 always."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

from qguard.audit.schema import LENGTHS
from qguard.metrics import endpoint_name
from qguard.policy import Verdict

API_KEY_ID_CHARS = 16  # 64 bits of sha256: tells keys apart in a log, reveals nothing of them

Judged = str | Sequence[Mapping[str, Any]]  # the judged text, or the messages it was read from


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def api_key_id(key: str) -> str:
    """The id under which the audit log knows an API key: its SHA-256, cut short. Never the key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:API_KEY_ID_CHARS]


def judged_text(judged: Judged) -> str:
    """The text a record hashes (and stores when opted in): a string as it is; messages as canonical
    JSON (sorted keys, no spaces), so the same conversation always gives the same hash."""
    if isinstance(judged, str):
        return judged
    return json.dumps(list(judged), ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=str)


def content_sha256(judged: Judged) -> str:
    return hashlib.sha256(judged_text(judged).encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class AuditRecord:
    """One row of the audit log. Build it with `from_verdict` (a decision) or `failure` (a request that
    ended in an error); the fields are the table's columns (`qguard.audit.schema`)."""

    endpoint: str  # one of qguard.metrics.ENDPOINTS (anything else is stored as "other")
    time: datetime = field(default_factory=utcnow)
    request_id: str | None = None
    stage: str | None = None  # "prompt" or "response": which turn was judged
    model: str | None = None
    api_key_id: str | None = None
    label: str | None = None
    binary: str | None = None
    action: str | None = None
    mode: str | None = None
    categories: list[str] | None = None
    refusal: bool | None = None
    probs: dict[str, float] | None = None
    category_probs: dict[str, float] | None = None
    refusal_prob: float | None = None
    unsafe_position: int | None = None
    n_tokens: int | None = None
    policy_version: str | None = None
    latency_ms: float | None = None
    content_sha256: str | None = None
    content: str | None = None  # None unless the operator opted in
    blocked: bool = False
    error: str | None = None  # what went wrong, never message text

    @classmethod
    def from_verdict(cls, verdict: Verdict, *, endpoint: str, text: Judged | None = None,
                     log_content: bool = False, blocked: bool | None = None, api_key: str | None = None,
                     **meta: Any) -> AuditRecord:
        """The record of `verdict` (its `to_dict()` fields) on `endpoint`.

        `text` is what was judged (a string or the messages): hashed always, stored only with
        `log_content=True`. `blocked` defaults to the verdict's own (`action == block`); pass it when the
        route decided otherwise (e.g. a stream cut). `api_key` is hashed here (`api_key_id`) and dropped.
        `meta`: request_id, stage, model, policy_version, latency_ms, time, error."""
        v = verdict.to_dict()
        fields = {k: v[k] for k in ("label", "binary", "action", "mode", "categories", "refusal", "probs",
                                    "category_probs", "refusal_prob", "unsafe_position", "n_tokens")}
        meta.setdefault("error", v["error"])
        return cls(endpoint=endpoint, blocked=verdict.blocked if blocked is None else bool(blocked),
                   **fields, **_content(text, log_content), **_key(api_key), **meta)

    @classmethod
    def failure(cls, error: str, *, endpoint: str, text: Judged | None = None, log_content: bool = False,
                api_key: str | None = None, **meta: Any) -> AuditRecord:
        """A request that ended without a verdict (the guard or the upstream failed): `error` says how,
        in words that hold no message text (an error type or code, not an exception carrying input)."""
        return cls(endpoint=endpoint, error=error, **_content(text, log_content), **_key(api_key), **meta)

    def row(self) -> dict[str, Any]:
        """The column values: short strings cut to their column's length and NUL characters replaced
        and lone surrogates replaced (PostgreSQL refuses both), so no value can make a batch fail to insert."""
        row = {name: getattr(self, name) for name in _FIELDS}  # shallow: asdict's deep copy is 10x the cost
        row["endpoint"] = endpoint_name(self.endpoint)
        for name, value in row.items():
            if isinstance(value, str):
                # lone surrogates (text split mid-character) have no UTF-8 form: the database refuses them
                value = value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
                row[name] = value[:LENGTHS[name]] if name in LENGTHS else value
        return row


_FIELDS = tuple(f.name for f in fields(AuditRecord))


def _content(text: Judged | None, log_content: bool) -> dict[str, Any]:
    if text is None:
        return {}
    body = judged_text(text)
    return {"content_sha256": hashlib.sha256(body.encode("utf-8", "surrogatepass")).hexdigest(),
            "content": body if log_content else None}


def _key(api_key: str | None) -> dict[str, Any]:
    return {} if api_key is None else {"api_key_id": api_key_id(api_key)}
