"""The audit log (qguard.audit) against SQLite and a real PostgreSQL server, and `qguard audit`.

PostgreSQL tests need a server: `.ci/run` starts a throwaway one and exports QGUARD_TEST_POSTGRES (and
QGUARD_TEST_POSTGRES_CTL, which the outage test uses to stop and restart it). On a machine without one
they skip; in CI (CI=true) a missing server is a failure, never a silent skip. To run them locally:
`eval "$(.ci/postgres /tmp/qguard-pg start)"`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shlex
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from qguard.audit import AuditError, AuditLog, AuditRecord, Filters, api_key_id, query, summary
from qguard.audit import db as audit_db
from qguard.audit.schema import COLUMNS, TABLE, metadata
from qguard.cli import main
from qguard.errors import InputError
from qguard.metrics import Metrics
from qguard.policy import Category, Policy, Severity

PG_ENV, PG_CTL_ENV = "QGUARD_TEST_POSTGRES", "QGUARD_TEST_POSTGRES_CTL"
SECRET_KEY = "sk-very-secret-client-key"


def _need(var: str) -> str:
    value = os.environ.get(var)
    if not value:
        why = f"${var} is not set: no PostgreSQL server for this test (start one: eval \"$(.ci/postgres /tmp/qguard-pg start)\")"
        if os.environ.get("CI"):
            pytest.fail(why + "; CI must run it (.ci/run starts the server)")
        pytest.skip(why)
    return value


def pg_ctl(action: str) -> None:
    subprocess.run([*shlex.split(_need(PG_CTL_ENV)), action], check=True, timeout=120, capture_output=True)


@pytest.fixture
def pg_url():
    """A fresh, empty database on the test server, dropped afterwards."""
    base = sa.make_url(_need(PG_ENV))
    name = f"qguard_t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(audit_db.database_url(base.render_as_string(hide_password=False)),
                             isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as c:
        c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    yield base.set(database=name).render_as_string(hide_password=False)
    if os.environ.get(PG_CTL_ENV):
        pg_ctl("start")  # a test that stopped the server and failed half-way
    with admin.connect() as c:
        c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path):
    """The audit database of one test: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "audit" / "audit.db")  # a folder that does not exist yet
    return request.getfixturevalue("pg_url")


def verdicts(n: int):
    """`n` verdicts of every kind: safe, unsafe with one or two categories, controversial, flagged."""
    policy = Policy(actions={"PII": "flag"})
    kinds = [
        lambda i: policy.verdict(Severity.SAFE, probs={"Safe": 0.9, "Unsafe": 0.05, "Controversial": 0.05}, n_tokens=i),
        lambda i: policy.verdict(Severity.UNSAFE, [Category.VIOLENT, Category.JAILBREAK], n_tokens=i,
                                 probs={"Safe": 0.1, "Unsafe": 0.85, "Controversial": 0.05}, unsafe_position=3),
        lambda i: policy.verdict(Severity.CONTROVERSIAL, [Category.POLITICAL], refusal=False, n_tokens=i,
                                 probs={"Safe": 0.3, "Unsafe": 0.2, "Controversial": 0.5}),
        lambda i: policy.verdict(Severity.UNSAFE, [Category.PII], n_tokens=i,
                                 probs={"Safe": 0.2, "Unsafe": 0.7, "Controversial": 0.1},
                                 category_probs={"PII": 0.9}, refusal_prob=0.25),
    ]
    return [kinds[i % len(kinds)](i + 1) for i in range(n)]


def text_of(i: int) -> str:
    return f"message number {i}: how do I pick the lock of my own shed?"


def rows_by_request(target) -> dict[str, dict]:
    return {r["request_id"]: r for r in query(target)}


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    """Poll `condition` (a bounded wait on the writer thread, not a timing assertion)."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for: {what}")
        time.sleep(0.02)


def raw_dump(target: str) -> str:
    """Everything stored, as text: the SQLite file's bytes, or every row of the table as PostgreSQL text."""
    if "://" not in target:
        return _sqlite_bytes(target)
    engine = audit_db.create_engine(audit_db.database_url(target))
    with engine.connect() as c:
        text = "\n".join(c.exec_driver_sql(f"SELECT t::text FROM {TABLE} t").scalars())
    engine.dispose()
    return text


def _sqlite_bytes(path: str) -> str:
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "replace")


# ------------------------------------------------------------------------------------------- writing

def test_n_records_give_n_rows_with_their_fields_and_no_content(db):
    vs = verdicts(24)
    m = Metrics()
    with AuditLog(db, metrics=m) as audit:
        for i, v in enumerate(vs):
            assert audit.record_verdict(v, endpoint="chat" if i % 2 else "/v1/moderate", stage="prompt",
                                        text=text_of(i), request_id=f"req-{i}", model="Qwen3Guard-Stream-0.6B",
                                        api_key=SECRET_KEY, latency_ms=1.5 + i, policy_version="policy-7")
    assert audit.written == 24 and audit.dropped == 0
    assert m.sample("qguard_audit_written_total") == 24
    rows = rows_by_request(db)
    assert len(rows) == 24
    for i, v in enumerate(vs):
        row, want = rows[f"req-{i}"], v.to_dict()
        for field in ("label", "binary", "action", "mode", "categories", "refusal", "probs", "category_probs",
                      "refusal_prob", "unsafe_position", "n_tokens", "error"):
            assert row[field] == want[field], field
        assert row["endpoint"] == ("/v1/chat/completions" if i % 2 else "/v1/moderate")
        assert row["blocked"] is v.blocked
        assert row["model"] == "Qwen3Guard-Stream-0.6B" and row["policy_version"] == "policy-7"
        assert row["latency_ms"] == pytest.approx(1.5 + i)
        assert row["api_key_id"] == hashlib.sha256(SECRET_KEY.encode()).hexdigest()[:16] == api_key_id(SECRET_KEY)
        assert row["content_sha256"] == hashlib.sha256(text_of(i).encode()).hexdigest()
        assert row["content"] is None
        assert row["time"].tzinfo is not None and abs(datetime.now(timezone.utc) - row["time"]) < timedelta(hours=1)
    stored = raw_dump(db)
    assert "req-23" in stored  # the dump does hold the rows...
    assert SECRET_KEY not in stored and "pick the lock" not in stored  # ...but neither the key nor the text


def test_content_is_stored_only_when_the_operator_opts_in(db):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    v = verdicts(1)[0]
    with AuditLog(db, log_content=True) as audit:
        audit.record_verdict(v, endpoint="moderate", text="the judged text", request_id="text")
        audit.record_verdict(v, endpoint="moderate", text=messages, request_id="messages")
        audit.record_verdict(v, endpoint="moderate", text="odd \x00 text \ud800 here", request_id="odd")
    rows = rows_by_request(db)
    assert rows["text"]["content"] == "the judged text"
    assert json.loads(rows["messages"]["content"]) == messages
    # the same conversation always hashes the same (canonical JSON)
    assert rows["messages"]["content_sha256"] == AuditRecord.from_verdict(v, endpoint="x", text=list(messages)).content_sha256
    assert rows["odd"]["content"].startswith("odd \ufffd text ")  # what PostgreSQL cannot hold is replaced, not lost


def test_failures_are_recorded_without_a_verdict(db):
    with AuditLog(db) as audit:
        audit.record_failure("upstream_timeout", endpoint="chat", request_id="r1", text="secret question")
    (row,) = query(db)
    assert row["error"] == "upstream_timeout" and row["label"] is None and row["categories"] is None
    assert row["blocked"] is False and row["content"] is None
    assert summary(db)["label"] == {"none": 1}


def test_a_row_the_database_refuses_costs_only_itself(db):
    good = [AuditRecord.from_verdict(v, endpoint="moderate", request_id=f"ok-{i}") for i, v in enumerate(verdicts(6))]
    bad = AuditRecord(endpoint="moderate", request_id="bad", blocked=None)  # NOT NULL column
    with AuditLog(db) as audit:
        for rec in [*good[:3], bad, *good[3:]]:
            audit.record(rec)
    assert audit.written == 6 and audit.dropped_by["rejected"] == 1
    assert sorted(rows_by_request(db)) == sorted(f"ok-{i}" for i in range(6))


def test_records_that_cannot_be_built_or_come_after_close_are_counted_never_raised(tmp_path):
    m = Metrics()
    audit = AuditLog(tmp_path / "a.db", metrics=m)
    assert audit.record_verdict(verdicts(1)[0], endpoint="moderate", no_such_field=1) is False
    assert audit.record_verdict("not a verdict", endpoint="moderate") is False
    assert audit.close() == 0
    assert audit.record_verdict(verdicts(1)[0], endpoint="moderate") is False
    assert audit.dropped_by == {"queue_full": 0, "rejected": 0, "closed": 1, "invalid": 2}
    assert m.sample("qguard_audit_dropped_total", {"reason": "invalid"}) == 2
    assert m.sample("qguard_audit_dropped_total", {"reason": "closed"}) == 1


# ---------------------------------------------------------------------------------------- migrations

def test_migrations_create_the_schema_from_empty_and_are_idempotent(db):
    engine, _ = audit_db.open_database(db)  # from empty: upgrade head
    try:
        with engine.connect() as c:
            assert audit_db.current_revision(c) == audit_db.head_revision()
            inspector = sa.inspect(c)
            assert tuple(col["name"] for col in inspector.get_columns(TABLE)) == COLUMNS
            indexed = {tuple(ix["column_names"]) for ix in inspector.get_indexes(TABLE)}
            assert {("time",), ("label",), ("endpoint",)} <= indexed
            # the migration and schema.py describe the same table (a change needs a new revision)
            diff = compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), metadata)
            assert [d for d in diff if not (isinstance(d, tuple) and d[0] == "remove_table"
                                            and d[1].name == audit_db.VERSION_TABLE)] == []
        with AuditLog(db) as audit:
            audit.record_verdict(verdicts(1)[0], endpoint="moderate", request_id="kept")
        for _ in range(2):  # again, twice: nothing changes, nothing is lost
            audit_db.migrate(engine)
            with AuditLog(db):
                pass
        assert list(rows_by_request(db)) == ["kept"]
        with engine.connect() as c:
            assert audit_db.current_revision(c) == audit_db.head_revision()
    finally:
        engine.dispose()


def test_replicas_starting_together_migrate_once(pg_url, tmp_path):
    """Several servers start at once on one PostgreSQL database: each process runs `upgrade head`, and
    the advisory lock makes them take turns (without it, all but one fail: "relation already exists")."""
    go = tmp_path / "go"
    code = ("import os, sys, time\n"
            "from qguard.audit import db\n"
            "engine = db.create_engine(db.database_url(sys.argv[1]))\n"
            "while not os.path.exists(sys.argv[2]): time.sleep(0.001)\n"
            "db.migrate(engine)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, pg_url, str(go)], stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    time.sleep(1.0)  # let them all get to the starting line (not a timing assertion: a head start)
    go.touch()
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errs
    engine, _ = audit_db.open_database(pg_url, create=False)
    with engine.connect() as c:
        assert audit_db.current_revision(c) == audit_db.head_revision()
    engine.dispose()


def test_migrations_in_one_process_take_turns(tmp_path):
    """Two logs opening at once in one process (Alembic's context is process-wide) both come up."""
    paths, errors = [str(tmp_path / f"{i}.db") for i in range(4)], []
    barrier = threading.Barrier(len(paths))

    def start(path):
        barrier.wait()
        try:
            AuditLog(path).close()
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=start, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    for p in paths:
        assert summary(p)["total"] == 0


# ------------------------------------------------------------------------------------------ outages

@pytest.fixture(scope="module")
def guard(tiny_stream):
    from qguard.guard import Guard

    return Guard.from_pretrained(tiny_stream)


def moderate_and_audit(guard, audit: AuditLog, ids: list[str]) -> list:
    """What a route does: judge, then hand the decision to the audit log. Runs in a thread with a
    bounded join, so a `record()` that blocked would fail the test rather than hang it."""
    out, errors = [], []

    def run():
        try:
            for rid in ids:
                v = guard.classify_prompt(f"request {rid}: is this fine?")
                audit.record_verdict(v, endpoint="moderate", request_id=rid, text=f"request {rid}")
                out.append(v)
        except BaseException as e:  # reported below
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(300)
    assert not t.is_alive(), "moderation blocked on the audit log"
    assert errors == []
    return out


def check_accounting(audit: AuditLog, target: str, submitted: list[str], must_have: list[str], m: Metrics) -> None:
    """Every submitted record is either a row or counted as dropped, exactly, and the metrics agree."""
    stored = set(rows_by_request(target))
    assert stored <= set(submitted) and set(must_have) <= stored
    assert len(stored) == audit.written
    assert audit.written + audit.dropped == len(submitted)
    assert m.sample("qguard_audit_written_total") == audit.written
    assert sum(m.sample("qguard_audit_dropped_total", {"reason": r}) for r in audit.dropped_by) == audit.dropped


def test_a_locked_sqlite_database_blocks_no_moderation_and_drops_are_counted(tmp_path, guard, monkeypatch, caplog):
    monkeypatch.setattr(audit_db, "SQLITE_BUSY_S", 0.2)
    path, m = str(tmp_path / "audit.db"), Metrics()
    audit = AuditLog(path, metrics=m, queue_size=20, batch_size=5, retry_max_s=0.5, log_every_s=0.2)
    before = [f"before-{i}" for i in range(5)]
    moderate_and_audit(guard, audit, before)
    assert audit.flush(60)
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # another process holds the database: every write of ours fails
    during = [f"during-{i}" for i in range(60)]
    judged = moderate_and_audit(guard, audit, during)
    assert len(judged) == 60  # every request was moderated
    wait_for(lambda: audit.database_down, "the writer noticing the lock")
    assert audit.dropped_by["queue_full"] >= 60 - 20 - 5  # more than the queue and one batch can hold
    assert m.sample("qguard_audit_queue_depth") == audit.queue_depth > 0
    lock.execute("ROLLBACK")
    lock.close()
    wait_for(lambda: not audit.database_down and audit.queue_depth == 0, "the writer catching up")
    after = [f"after-{i}" for i in range(5)]
    moderate_and_audit(guard, audit, after)
    assert audit.close(60) == 0
    assert not audit.database_down
    check_accounting(audit, path, before + during + after, must_have=before + after, m=m)
    logged = caplog.text
    assert "dropped" in logged and "queue_full" in logged and "request during" not in logged


def test_postgres_stopped_mid_run_blocks_no_moderation_and_recovers_after_restart(pg_url, guard, caplog):
    _need(PG_CTL_ENV)
    m = Metrics()
    audit = AuditLog(pg_url, metrics=m, queue_size=30, batch_size=10, retry_max_s=0.5, log_every_s=0.2)
    before = [f"before-{i}" for i in range(10)]
    moderate_and_audit(guard, audit, before)
    assert audit.flush(60)
    pg_ctl("stop")
    try:
        during = [f"during-{i}" for i in range(80)]
        assert len(moderate_and_audit(guard, audit, during)) == 80
        wait_for(lambda: audit.database_down, "the writer noticing the outage")
        assert audit.dropped_by["queue_full"] >= 80 - 30 - 10
    finally:
        pg_ctl("start")
    wait_for(lambda: not audit.database_down and audit.queue_depth == 0, "the writer catching up")
    after = [f"after-{i}" for i in range(10)]
    moderate_and_audit(guard, audit, after)
    assert audit.close(120) == 0
    assert not audit.database_down
    check_accounting(audit, pg_url, before + during + after, must_have=before + after, m=m)
    assert "cannot write to" in caplog.text and "again after" in caplog.text
    assert "request during" not in caplog.text


def test_an_unreachable_database_at_start(tmp_path):
    url = "postgresql://qguard:hunter2@127.0.0.1:1/audit"  # nothing listens on port 1
    with pytest.raises(AuditError, match=r"cannot use postgresql://qguard:\*\*\*@127.0.0.1:1/audit") as e:
        AuditLog(url)
    assert "hunter2" not in str(e.value)
    # or, by choice, start anyway: moderation goes on and what cannot be written is counted at close
    audit = AuditLog(url, require_database=False, retry_max_s=0.2)
    assert audit.record_verdict(verdicts(1)[0], endpoint="moderate") is True
    assert audit.close(timeout=1.0) == 1
    assert audit.dropped_by["closed"] == 1 and audit.written == 0


def test_without_require_database_the_schema_is_made_on_first_write(tmp_path):
    path = str(tmp_path / "later.db")
    with AuditLog(path, require_database=False) as audit:
        audit.record_verdict(verdicts(1)[0], endpoint="moderate", request_id="first")
    assert list(rows_by_request(path)) == ["first"]


@pytest.mark.parametrize("target, message", [
    ("", "empty"),
    ("mysql://u@h/db", "unsupported kind 'mysql'"),
    ("postgresql+asyncpg://h/db", "'asyncpg' driver is not supported"),
    ("postgresql://host", "names no database"),
    ("sqlite://", "in-memory"),
    ("sqlite:///:memory:", "in-memory"),
])
def test_bad_database_targets(target, message):
    with pytest.raises(InputError, match=message):
        audit_db.database_url(target)


def test_database_url_forms(tmp_path):
    assert audit_db.database_url("postgres://u:p@h:5433/db").drivername == "postgresql+psycopg"
    assert audit_db.database_url(tmp_path / "x.db").database == str(tmp_path / "x.db")
    assert audit_db.database_url("sqlite:///rel.db").database == os.path.abspath("rel.db")


# ----------------------------------------------------------------------------------- reading back

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)


def write_known(target) -> list[AuditRecord]:
    """Eight decisions an hour apart, of known kinds, on two endpoints."""
    recs = []
    for i, v in enumerate(verdicts(8)):
        recs.append(AuditRecord.from_verdict(v, endpoint="chat" if i >= 4 else "moderate", stage="response",
                                             request_id=f"r{i}", time=T0 + timedelta(hours=i), latency_ms=2.0))
    with AuditLog(target) as audit:
        for r in recs:
            audit.record(r)
    return recs


def test_query_filters_and_counts(db):
    recs = write_known(db)
    assert [r["request_id"] for r in query(db)] == [f"r{i}" for i in range(8)]
    assert [r["request_id"] for r in query(db, limit=3, newest_first=True)] == ["r7", "r6", "r5"]
    in_range = Filters.of(since="2026-11-28T13:00Z", until="2026-11-28T16:00:00+00:00")
    assert [r["request_id"] for r in query(db, in_range)] == ["r1", "r2", "r3"]
    assert [r["request_id"] for r in query(db, Filters.of(since="2026-11-28T14:00:00+01:00"))] == [f"r{i}" for i in range(1, 8)]
    assert [r["request_id"] for r in query(db, Filters.of(label="unsafe"))] == ["r1", "r3", "r5", "r7"]
    assert [r["request_id"] for r in query(db, Filters.of(category="jailbreaking"))] == ["r1", "r5"]
    assert [r["request_id"] for r in query(db, Filters.of(category="PII", endpoint="chat"))] == ["r7"]
    assert query(db, Filters.of(request_id="r4"))[0]["time"] == T0 + timedelta(hours=4)
    counts = summary(db)
    assert counts == {
        "total": 8, "blocked": sum(r.blocked for r in recs),
        "label": {"Controversial": 2, "Safe": 2, "Unsafe": 4},
        "action": {"allow": 2, "block": 4, "flag": 2},
        "endpoint": {"/v1/chat/completions": 4, "/v1/moderate": 4},
        "category": {"Jailbreak": 2, "PII": 2, "Politically Sensitive Topics": 2, "Violent": 2},
    }
    assert summary(db, Filters.of(endpoint="moderate", category="Violent"))["total"] == 1


@pytest.mark.parametrize("kw, message", [
    ({"since": "yesterday"}, "since: 'yesterday' is not an ISO 8601"),
    ({"until": "2026-13-01"}, "until: '2026-13-01'"),
    ({"since": "2026-11-29", "until": "2026-11-28"}, "must be before until"),
    ({"label": "Dangerous"}, "label: unknown risk level 'Dangerous'"),
    ({"category": "Weapons"}, "category: unknown category 'Weapons'"),
    ({"endpoint": "/admin"}, "unknown endpoint '/admin'"),
])
def test_bad_filters(kw, message):
    with pytest.raises(InputError, match=message):
        Filters.of(**kw)


# ----------------------------------------------------------------------------------- qguard audit

def cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["audit", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_exports_what_was_written(db, capsys, tmp_path):
    recs = write_known(db)
    rc, out, err = cli(capsys, "--db", db, "--format", "jsonl")
    assert rc == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [x["request_id"] for x in lines] == [r.request_id for r in recs]
    for x, r in zip(lines, recs):
        assert list(x) == list(COLUMNS)
        assert {k: x[k] for k in ("label", "action", "categories", "probs", "n_tokens", "blocked")} == \
               {k: getattr(r, k) for k in ("label", "action", "categories", "probs", "n_tokens", "blocked")}
        assert datetime.fromisoformat(x["time"]) == r.time

    rc, out, _ = cli(capsys, "--db", db, "--format", "csv", "--label", "Unsafe")
    table = list(csv.DictReader(io.StringIO(out)))
    assert [x["request_id"] for x in table] == ["r1", "r3", "r5", "r7"]
    assert json.loads(table[0]["categories"]) == ["Violent", "Jailbreak"] and table[0]["content"] == ""

    rc, out, _ = cli(capsys, "--db", db, "--endpoint", "chat", "--since", "2026-11-28T17:00Z", "--limit", "2")
    assert rc == 0
    body = out.splitlines()
    assert body[0].split()[:3] == ["time", "request_id", "endpoint"]
    assert [line.split()[1] for line in body[1:-1]] == ["r5", "r6"] and body[-1] == "2 decisions"
    assert "2026-11-28T17:00:00Z" in body[1] and "Violent, Jailbreak" in body[1]

    out_file = tmp_path / "exports" / "unsafe.jsonl"
    rc, out, _ = cli(capsys, "--db", db, "--format", "jsonl", "--category", "PII", "--out", str(out_file))
    assert rc == 0 and out == ""
    assert [json.loads(x)["request_id"] for x in out_file.read_text().splitlines()] == ["r3", "r7"]


def test_cli_counts(db, capsys):
    write_known(db)
    rc, out, _ = cli(capsys, "--db", db, "--counts", "--format", "jsonl")
    assert rc == 0 and json.loads(out) == summary(db)
    rc, out, _ = cli(capsys, "--db", db, "--counts", "--format", "csv", "--endpoint", "moderate")
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[:3] == [["field", "value", "count"], ["total", "", "4"], ["blocked", "", "2"]]
    assert ["label", "Unsafe", "2"] in rows and ["category", "Violent", "1"] in rows
    rc, out, _ = cli(capsys, "--db", db, "--counts")
    assert rc == 0 and "total      8" in out
    assert any(line.split() == ["Unsafe", "4"] for line in out.splitlines())


def test_cli_bad_input(capsys, tmp_path):
    not_db = tmp_path / "notes.txt"
    not_db.write_text("hello")
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).execute("CREATE TABLE other (x)").connection.close()
    cases = [
        (["--db", str(tmp_path / "missing.db")], "no such file"),
        (["--db", str(tmp_path)], "is a directory"),
        (["--db", str(not_db)], "file is not a database"),
        (["--db", str(empty)], "holds no qguard audit log"),
        (["--db", "mysql://u@localhost/x"], "unsupported kind 'mysql'"),
        (["--db", "postgresql://u:pw@127.0.0.1:1/x"], "cannot use postgresql://u:***@127.0.0.1:1/x"),
        (["--db", str(empty), "--since", "last week"], "since: 'last week' is not an ISO 8601"),
        (["--db", str(empty), "--label", "awful"], "label: unknown risk level 'awful'"),
        (["--db", str(empty), "--category", "weapons"], "category: unknown category 'weapons'"),
        (["--db", str(empty), "--endpoint", "/v9"], "unknown endpoint '/v9'"),
        (["--db", str(empty), "--out", str(tmp_path)], "--out"),
    ]
    for args, message in cases:
        rc, out, err = cli(capsys, *args)
        assert rc == 2 and out == "", args
        assert err.startswith("qguard: error: ") and message in err and "Traceback" not in err, (args, err)
        assert "pw@" not in err
    assert not (tmp_path / "missing.db").exists()  # reading never creates a database
    with pytest.raises(SystemExit) as e:
        main(["audit", "--db", str(empty), "--limit", "0"])
    assert e.value.code == 2


def test_operators_can_get_the_ddl_as_sql(capsys):
    import alembic.command

    alembic.command.upgrade(audit_db.alembic_config("postgresql+psycopg://u@h/db"), "head", sql=True)
    sql = capsys.readouterr().out
    assert "CREATE TABLE qguard_audit (" in sql and "categories JSONB" in sql
    assert "CREATE INDEX ix_qguard_audit_time" in sql and "pg_advisory" not in sql
