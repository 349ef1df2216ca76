"""Reading the audit log back: decisions by time range, label, category, endpoint; counts of them.

Both functions take the database as a path / URL (opened read-only in spirit: never created, never
migrated) or as an open SQLAlchemy engine. Filters are checked first and name what is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from qguard.audit.db import AuditError, describe, open_database, reason
from qguard.audit.schema import COLUMNS, decisions
from qguard.errors import InputError, LabelError, QGuardError
from qguard.metrics import ENDPOINT_LABELS, ENDPOINTS, OTHER, endpoint_name
from qguard.policy import parse_category, parse_severity

Source = str | os.PathLike | sa.Engine
SUMMARY_FIELDS = ("label", "action", "endpoint", "category")


def parse_time(value: str | datetime, what: str = "time") -> datetime:
    """An ISO 8601 date or time (`2026-11-28`, `2026-11-28T09:30`, `...Z`, `...+01:00`) as an aware UTC
    datetime; a time without a zone is read as UTC."""
    if isinstance(value, datetime):
        t = value
    else:
        text = str(value).strip()
        try:
            t = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in "zZ" and text else text)
        except ValueError:
            raise InputError(f"{what}: {value!r} is not an ISO 8601 date or time (e.g. 2026-11-28 or "
                             "2026-11-28T09:30:00Z)") from None
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


@dataclass(frozen=True)
class Filters:
    """Which decisions to read; every field optional. `since` is inclusive, `until` exclusive."""

    since: datetime | None = None
    until: datetime | None = None
    label: str | None = None
    category: str | None = None
    endpoint: str | None = None
    request_id: str | None = None

    @classmethod
    def of(cls, since: str | datetime | None = None, until: str | datetime | None = None, label: str | None = None,
           category: str | None = None, endpoint: str | None = None, request_id: str | None = None) -> Filters:
        """Checked and spelt as stored: labels and categories in any accepted spelling (`unsafe`,
        `violence`), endpoints as a path or short name (`chat`)."""
        lo = None if since is None else parse_time(since, "since")
        hi = None if until is None else parse_time(until, "until")
        if lo is not None and hi is not None and lo >= hi:
            raise InputError(f"since ({lo.isoformat()}) must be before until ({hi.isoformat()})")
        try:
            lab = None if label is None else parse_severity(label).value
        except LabelError as e:
            raise InputError(f"label: {e}") from None
        try:
            cat = None if category is None else parse_category(category).value
        except LabelError as e:
            raise InputError(f"category: {e}") from None
        ep = None
        if endpoint is not None:
            ep = endpoint_name(endpoint.strip())
            if ep == OTHER and endpoint.strip() != OTHER:
                names = ", ".join([*ENDPOINT_LABELS, *ENDPOINTS])
                raise InputError(f"unknown endpoint {endpoint!r}; known: {names}")
        return cls(lo, hi, lab, cat, ep, request_id)

    def where(self, dialect: str) -> list[sa.ColumnElement[bool]]:
        t = decisions.c
        out = []
        if self.since is not None:
            out.append(t.time >= self.since)
        if self.until is not None:
            out.append(t.time < self.until)
        if self.label is not None:
            out.append(t.label == self.label)
        if self.endpoint is not None:
            out.append(t.endpoint == self.endpoint)
        if self.request_id is not None:
            out.append(t.request_id == self.request_id)
        if self.category is not None:
            out.append(_has_category(dialect, self.category))
        return out


def _categories(dialect: str):
    """The categories of each row as a table-valued function with one column, `value`."""
    fn = sa.func.jsonb_array_elements_text if dialect == "postgresql" else sa.func.json_each
    return fn(decisions.c.categories).table_valued("value", name="category")


def _has_category(dialect: str, category: str) -> sa.ColumnElement[bool]:
    if dialect == "postgresql":
        return sa.type_coerce(decisions.c.categories, postgresql.JSONB()).contains([category])  # JSONB @>
    cats = _categories(dialect)
    return sa.exists(sa.select(sa.literal(1)).select_from(cats).where(cats.c.value == category))


def iter_records(source: Source, filters: Filters | None = None, limit: int | None = None,
                 newest_first: bool = False) -> Iterator[dict[str, Any]]:
    """The matching decisions, oldest first (or newest first), as dicts of the table's columns, read in
    chunks (an export of millions of rows does not sit in memory)."""
    filters = filters or Filters()
    with _engine(source) as engine:
        t = decisions.c
        order = (t.time.desc(), t.id.desc()) if newest_first else (t.time, t.id)
        stmt = sa.select(decisions).where(*filters.where(engine.dialect.name)).order_by(*order)
        if limit is not None:
            stmt = stmt.limit(limit)
        with _errors(engine), engine.connect() as conn:
            for row in conn.execution_options(yield_per=1000).execute(stmt):
                yield dict(row._mapping)


def query(source: Source, filters: Filters | None = None, limit: int | None = None,
          newest_first: bool = False) -> list[dict[str, Any]]:
    """`iter_records` as a list."""
    return list(iter_records(source, filters, limit, newest_first))


def summary(source: Source, filters: Filters | None = None) -> dict[str, Any]:
    """Counts of the matching decisions: {"total", "blocked", "label": {...}, "action": {...},
    "endpoint": {...}, "category": {...}}. A decision without a verdict (a failed request) counts under
    label and action "none"; a decision naming several categories counts once under each."""
    filters = filters or Filters()
    with _engine(source) as engine:
        dialect = engine.dialect.name
        where = filters.where(dialect)
        t = decisions.c
        out: dict[str, Any] = {}
        with _errors(engine), engine.connect() as conn:
            total, blocked = conn.execute(sa.select(sa.func.count(), sa.func.count().filter(t.blocked))
                                          .select_from(decisions).where(*where)).one()
            out["total"], out["blocked"] = int(total), int(blocked or 0)
            for name in ("label", "action", "endpoint"):
                col = t[name]
                rows = conn.execute(sa.select(col, sa.func.count()).where(*where).group_by(col).order_by(col))
                out[name] = _sorted({("none" if k is None else k): int(n) for k, n in rows})
            cats = _categories(dialect)
            rows = conn.execute(sa.select(cats.c.value, sa.func.count()).select_from(decisions)
                                .join(cats, sa.true()).where(*where).group_by(cats.c.value).order_by(cats.c.value))
            out["category"] = _sorted({k: int(n) for k, n in rows})
    return out


def _sorted(counts: dict[str, int]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda kv: (kv[0] == "none", kv[0])))


def jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """A row as JSON data (the time in ISO 8601, UTC), columns in table order."""
    out = {k: row.get(k) for k in COLUMNS}
    if isinstance(out["time"], datetime):
        out["time"] = out["time"].isoformat()
    return out


class _engine:
    """The source as an engine: one opened here (and disposed of after) or the caller's."""

    def __init__(self, source: Source):
        self.source, self.owned = source, not isinstance(source, sa.Engine)

    def __enter__(self) -> sa.Engine:
        self.engine = open_database(self.source, create=False)[0] if self.owned else self.source
        return self.engine

    def __exit__(self, *_: object) -> None:
        if self.owned:
            self.engine.dispose()


class _errors:
    """Database errors while reading, as an AuditError that names the database (never its password)."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, e, _tb) -> bool:
        if e is not None and isinstance(e, sa.exc.SQLAlchemyError) and not isinstance(e, QGuardError):
            raise AuditError(f"audit database: reading {describe(self.engine.url)} failed: {reason(e)}") from None
        return False
