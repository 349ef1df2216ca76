"""Alembic environment of the audit schema.

qguard runs it in-process (`qguard.audit.db.migrate`) with the connection in `config.attributes`; no
alembic.ini is needed. A developer writing a new revision can run Alembic's own commands on the config
from `qguard.audit.db.alembic_config(url)`.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from qguard.audit.schema import VERSION_TABLE, metadata

# Replicas that start together each run `upgrade head`; on PostgreSQL they take turns under this
# transaction-scoped advisory lock, so the second one finds the schema already there.
MIGRATION_LOCK = 0x71677561  # "qgua"

config = context.config


def run_offline() -> None:
    """SQL script output (`alembic upgrade head --sql`), for operators who apply DDL by hand."""
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=metadata,
                      version_table=VERSION_TABLE, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online(connection: sa.Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, version_table=VERSION_TABLE,
                      render_as_batch=True, compare_type=True)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
elif config.attributes.get("connection") is not None:
    run_online(config.attributes["connection"])
else:
    engine = sa.create_engine(config.get_main_option("sqlalchemy.url"), poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        run_online(conn)
    engine.dispose()
