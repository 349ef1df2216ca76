"""`qguard audit`: read the audit log a server wrote (qguard.audit): decisions as a table, JSONL or CSV,
or counts by label, category, action and endpoint."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Iterable
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import IO, Any

from qguard.cli import output_file, positive_int
from qguard.errors import QGuardError

JSON_COLUMNS = ("categories", "probs", "category_probs")
# what a person reads in a terminal; jsonl and csv carry every column
TABLE_COLUMNS = ("time", "request_id", "endpoint", "stage", "label", "action", "categories", "latency_ms",
                 "blocked", "error")


def register(sub) -> None:
    p = sub.add_parser("audit", help="query and export the audit log of `qguard serve` "
                                     "(SQLite file or PostgreSQL)")
    p.add_argument("--db", required=True, metavar="PATH|URL",
                   help="the audit database: a SQLite file, or postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME")
    p.add_argument("--since", default=None, metavar="ISO",
                   help="decisions at or after this time (2026-11-28, 2026-11-28T09:30Z; no zone: UTC)")
    p.add_argument("--until", default=None, metavar="ISO", help="decisions before this time")
    p.add_argument("--label", default=None, help="Safe, Unsafe or Controversial")
    p.add_argument("--category", default=None, help="a category the verdict names, e.g. Violent or PII")
    p.add_argument("--endpoint", default=None,
                   help="moderate, moderations, chat, stream (or the path, e.g. /v1/chat/completions)")
    p.add_argument("--request-id", default=None, help="the decisions of one request (its X-Request-ID)")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N", help="at most N decisions")
    p.add_argument("--newest", action="store_true", help="newest first (default: oldest first)")
    p.add_argument("--format", default="table", choices=["table", "jsonl", "csv"],
                   help="output format (default table)")
    p.add_argument("--out", default=None, metavar="FILE", help="write to FILE instead of standard output")
    p.add_argument("--counts", action="store_true",
                   help="print counts (total, blocked, by label, action, endpoint and category) instead of "
                        "decisions")
    p.set_defaults(func=run_audit)


def run_audit(args: argparse.Namespace) -> int:
    try:
        from qguard.audit import Filters, iter_records, summary
        from qguard.audit.db import open_database
    except ImportError as e:
        raise QGuardError(f"qguard audit needs {e.name or 'SQLAlchemy'}: pip install 'qguard[audit]'") from None

    filters = Filters.of(since=args.since, until=args.until, label=args.label, category=args.category,
                         endpoint=args.endpoint, request_id=args.request_id)  # bad filters fail before any I/O
    out = output_file(args.out, "--out") if args.out else None
    engine, _ = open_database(args.db, create=False)
    try:
        if args.counts:
            text = render_counts(summary(engine, filters), args.format)
            with _output(out) as f:
                f.write(text)
        else:
            rows = iter_records(engine, filters, limit=args.limit, newest_first=args.newest)
            with _output(out) as f:
                write_rows(rows, args.format, f)
    finally:
        engine.dispose()
    return 0


@contextmanager
def _output(path):
    """Standard output, or `path` written whole or not at all (a read that fails half-way leaves no
    half file behind)."""
    if path is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_rows(rows: Iterable[dict[str, Any]], fmt: str, f: IO[str]) -> int:
    from qguard.audit.query import jsonable
    from qguard.audit.schema import COLUMNS

    n = 0
    if fmt == "jsonl":
        for row in rows:
            f.write(json.dumps(jsonable(row), ensure_ascii=False) + "\n")
            n += 1
    elif fmt == "csv":
        w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow(_flat(jsonable(row)))
            n += 1
    else:
        table = [[_cell(c, row.get(c)) for c in TABLE_COLUMNS] for row in rows]
        f.write(_table(list(TABLE_COLUMNS), table))
        n = len(table)
        f.write(f"{n} decision{'s' if n != 1 else ''}\n")
    return n


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """A CSV row: JSON columns as JSON text, None as an empty cell."""
    return {k: ("" if v is None else json.dumps(v, ensure_ascii=False) if k in JSON_COLUMNS else v)
            for k, v in row.items()}


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column == "time" and isinstance(value, datetime):
        return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    if column == "categories":
        return ", ".join(value) or "-"
    if column == "latency_ms":
        return f"{value:.1f}"
    if column == "blocked":
        return "yes" if value else "no"
    return " ".join(str(value).split())  # one line per decision


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    buf = io.StringIO()
    for line in (header, *rows):
        buf.write("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() + "\n")
    return buf.getvalue()


def render_counts(counts: dict[str, Any], fmt: str) -> str:
    """`summary()` as text: one JSON object (jsonl), field,value,count rows (csv), or a table."""
    if fmt == "jsonl":
        return json.dumps(counts, ensure_ascii=False) + "\n"
    groups = [(g, counts[g]) for g in ("label", "action", "endpoint", "category")]
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["field", "value", "count"])
        w.writerow(["total", "", counts["total"]])
        w.writerow(["blocked", "", counts["blocked"]])
        for g, values in groups:
            for value, n in values.items():
                w.writerow([g, value, n])
        return buf.getvalue()
    totals = [["total", str(counts["total"])], ["blocked", str(counts["blocked"])]]
    parts = [_table(["decisions", "count"], totals)]
    for g, values in groups:
        parts.append(_table([g, "count"], [[str(k), str(n)] for k, n in values.items()] or [["-", "0"]]))
    return "\n".join(parts)
