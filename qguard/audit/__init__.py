"""The audit log: every moderation decision in a database (SQLite file by default, PostgreSQL by URL).

    from qguard.audit import AuditLog
    audit = AuditLog("audit.db", log_content=False, metrics=metrics)      # migrates the schema to head
    audit.record_verdict(verdict, endpoint="/v1/moderate", stage="prompt", text=judged_text,
                         request_id=rid, model=name, api_key=key, latency_ms=ms)   # never blocks or raises
    audit.close()                                                                 # flushes what it can

`qguard audit` (and `query` / `summary` here) reads it back. Needs the `audit` extra
(`pip install 'qguard[audit]'`: SQLAlchemy, Alembic, psycopg).
"""

from qguard.audit.db import AuditError, database_url, migrate, open_database
from qguard.audit.query import Filters, iter_records, parse_time, query, summary
from qguard.audit.record import AuditRecord, api_key_id, content_sha256
from qguard.audit.writer import AuditLog

__all__ = ["AuditError", "AuditLog", "AuditRecord", "Filters", "api_key_id", "content_sha256", "database_url",
           "iter_records", "migrate", "open_database", "parse_time", "query", "summary"]
