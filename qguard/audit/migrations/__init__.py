"""Alembic migrations of the audit schema (run programmatically by `qguard.audit.db.migrate`)."""
