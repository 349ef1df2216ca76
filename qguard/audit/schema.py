"""The audit table: one row per moderation decision.

What a row may hold is decided here. Message text only ever goes to `content`, which stays NULL unless
the operator opted in (`--log-content`); `content_sha256` lets two decisions about the same text be
matched without keeping the text. The API key is stored as a short hash (`api_key_id`), never as given.

The schema evolves through the Alembic revisions in `migrations/versions/`, never by `create_all`: a
change here needs a new revision (tests compare the two).
"""

from __future__ import annotations

from datetime import datetime, timezone

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

TABLE = "qguard_audit"
VERSION_TABLE = "qguard_audit_version"  # Alembic's bookkeeping, named so it never meets an app's own

# short strings come from fixed sets (labels, actions, endpoints); the others are cut to these lengths
# when a record is built, so an odd value can never make a whole batch fail to insert
LENGTHS = {"request_id": 128, "endpoint": 64, "stage": 16, "model": 256, "api_key_id": 16, "label": 16,
           "binary": 16, "action": 16, "mode": 16, "policy_version": 128, "content_sha256": 64}


class UTCDateTime(sa.TypeDecorator):
    """Times stored as UTC and read back as aware UTC datetimes, on every backend (SQLite keeps no zone)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("audit times must be timezone-aware")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def json_type() -> sa.types.TypeEngine:
    """JSON, as JSONB on PostgreSQL (its containment and array functions serve the category filter).
    Python None is SQL NULL, not JSON null, so "no categories known" never reads as a value."""
    return sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")


def _id_type() -> sa.types.TypeEngine:
    # SQLite only autoincrements an INTEGER PRIMARY KEY (the rowid)
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


metadata = sa.MetaData()

decisions = sa.Table(
    TABLE, metadata,
    sa.Column("id", _id_type(), primary_key=True, autoincrement=True),
    sa.Column("time", UTCDateTime(), nullable=False),
    sa.Column("request_id", sa.String(LENGTHS["request_id"])),
    sa.Column("endpoint", sa.String(LENGTHS["endpoint"]), nullable=False),
    sa.Column("stage", sa.String(LENGTHS["stage"])),  # prompt / response: which turn was judged
    sa.Column("model", sa.String(LENGTHS["model"])),
    sa.Column("api_key_id", sa.String(LENGTHS["api_key_id"])),
    # the verdict (Verdict.to_dict); NULL where the request failed before one was made
    sa.Column("label", sa.String(LENGTHS["label"])),
    sa.Column("binary", sa.String(LENGTHS["binary"])),
    sa.Column("action", sa.String(LENGTHS["action"])),
    sa.Column("mode", sa.String(LENGTHS["mode"])),
    sa.Column("categories", json_type()),
    sa.Column("refusal", sa.Boolean()),
    sa.Column("probs", json_type()),
    sa.Column("category_probs", json_type()),
    sa.Column("refusal_prob", sa.Float()),
    sa.Column("unsafe_position", sa.Integer()),
    sa.Column("n_tokens", sa.Integer()),
    sa.Column("policy_version", sa.String(LENGTHS["policy_version"])),
    sa.Column("latency_ms", sa.Float()),
    sa.Column("content_sha256", sa.String(LENGTHS["content_sha256"])),
    sa.Column("content", sa.Text()),  # NULL unless the operator opted in
    sa.Column("blocked", sa.Boolean(), nullable=False),
    sa.Column("error", sa.Text()),  # what went wrong, never message text
    sa.Index("ix_qguard_audit_time", "time"),
    sa.Index("ix_qguard_audit_label", "label"),
    sa.Index("ix_qguard_audit_endpoint", "endpoint"),
    sa.Index("ix_qguard_audit_request_id", "request_id"),
)

COLUMNS: tuple[str, ...] = tuple(c.name for c in decisions.columns)
