"""The decisions table.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _json() -> sa.types.TypeEngine:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "qguard_audit",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("request_id", sa.String(128)),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("stage", sa.String(16)),
        sa.Column("model", sa.String(256)),
        sa.Column("api_key_id", sa.String(16)),
        sa.Column("label", sa.String(16)),
        sa.Column("binary", sa.String(16)),
        sa.Column("action", sa.String(16)),
        sa.Column("mode", sa.String(16)),
        sa.Column("categories", _json()),
        sa.Column("refusal", sa.Boolean()),
        sa.Column("probs", _json()),
        sa.Column("category_probs", _json()),
        sa.Column("refusal_prob", sa.Float()),
        sa.Column("unsafe_position", sa.Integer()),
        sa.Column("n_tokens", sa.Integer()),
        sa.Column("policy_version", sa.String(128)),
        sa.Column("latency_ms", sa.Float()),
        sa.Column("content_sha256", sa.String(64)),
        sa.Column("content", sa.Text()),
        sa.Column("blocked", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text()),
    )
    op.create_index("ix_qguard_audit_time", "qguard_audit", ["time"])
    op.create_index("ix_qguard_audit_label", "qguard_audit", ["label"])
    op.create_index("ix_qguard_audit_endpoint", "qguard_audit", ["endpoint"])
    op.create_index("ix_qguard_audit_request_id", "qguard_audit", ["request_id"])


def downgrade() -> None:
    op.drop_table("qguard_audit")
