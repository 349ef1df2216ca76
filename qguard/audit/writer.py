"""`AuditLog`: writes decisions to the audit database off the request path.

`record()` only puts the record on a bounded queue (no I/O, no lock held for long, never raises); one
background thread takes what is queued and inserts it in batches (one executemany per transaction). A
slow database slows only that thread. While the database is unreachable the thread keeps its batch and
retries with backoff (fresh connections each time), so an outage shorter than the queue loses nothing;
past that, `record()` drops new records. Nothing is lost silently: every dropped record is counted
(`dropped`, `dropped_by`, and `qguard_audit_dropped_total` when a `Metrics` is given) and reported in
the log, at most every `log_every_s`, by count and reason only (never content).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc

from qguard.audit.db import describe, migrate, open_database, reason
from qguard.audit.record import AuditRecord
from qguard.audit.schema import decisions
from qguard.errors import InputError, check_int, check_number
from qguard.metrics import AUDIT_DROP_REASONS, Metrics
from qguard.policy import Verdict

log = logging.getLogger("qguard.audit")

# the database is away (down, restarting, locked, unreachable): keep the batch and retry. Any other error
# is about the rows themselves, which are then written one by one so that only the bad ones are lost.
OUTAGE = (exc.OperationalError, exc.InterfaceError, exc.DisconnectionError, exc.TimeoutError, OSError)
_STOP = object()  # wakes the writer at close
CLOSE_GRACE_S = 0.5
STATEMENT_TIMEOUT_S = 30.0  # PostgreSQL: an insert stuck on a lock this long is cancelled and retried


class AuditLog:
    """The audit log of one server. Thread-safe; `record()` may be called from the event loop.

    `target`: a SQLite file path or a postgresql:// URL (`qguard.audit.db.database_url`). The schema is
    migrated to head at start; with `require_database` (the default) an unreachable database is an
    `AuditError` here, at start, otherwise the writer migrates once it answers and records wait (or are
    dropped and counted) until then. `log_content` is the operator's opt-in for `record_verdict`.
    """

    def __init__(self, target: str | os.PathLike, *, log_content: bool = False, metrics: Metrics | None = None,
                 queue_size: int = 10_000, batch_size: int = 500, flush_interval_s: float = 0.25,
                 retry_max_s: float = 30.0, log_every_s: float = 10.0, require_database: bool = True):
        self.queue_size = check_int(queue_size, "audit queue_size")
        self.batch_size = check_int(batch_size, "audit batch_size")
        self.flush_interval_s = _positive(flush_interval_s, "audit flush_interval_s")
        self.retry_max_s = _positive(retry_max_s, "audit retry_max_s")
        self.log_every_s = _positive(log_every_s, "audit log_every_s")
        self.log_content = bool(log_content)
        self.metrics = metrics
        self.engine, self.url = open_database(target, create=True, connect=require_database,
                                              statement_timeout_s=STATEMENT_TIMEOUT_S)
        self._ready = require_database  # schema at head
        self._queue: queue.Queue = queue.Queue(maxsize=self.queue_size)
        self._lock = threading.Lock()
        self._closed = False
        self._stopping, self._wake = threading.Event(), threading.Event()
        self._deadline = math.inf
        # records accepted by record() and records done with (written or dropped by the writer): their
        # difference is what is waiting, with no moment where a batch taken off the queue counts nowhere
        self._accepted = self._settled = 0
        self.written = 0
        self.dropped_by: dict[str, int] = dict.fromkeys(AUDIT_DROP_REASONS, 0)
        self._unreported: dict[str, int] = {}
        self._last_report = -math.inf
        self._down_since: float | None = None
        self._last_outage_log = -math.inf
        if metrics is not None:
            metrics.watch("audit_queue_depth", lambda: self.queue_depth)
        self._thread = threading.Thread(target=self._run, name="qguard-audit-writer", daemon=True)
        self._thread.start()

    # --------------------------------------------------------------------------- the request path

    def record(self, rec: AuditRecord) -> bool:
        """Queue `rec` for writing. Never blocks, never raises: False when it was dropped (and counted)."""
        try:
            with self._lock:
                if not self._closed:
                    self._queue.put_nowait(rec)
                    self._accepted += 1
                    return True
                why = "closed"
        except queue.Full:
            why = "queue_full"
        except Exception:  # nothing on the request path may fail because of the audit log
            why = "invalid"
        self._drop(why, 1)
        return False

    def record_verdict(self, verdict: Verdict, **fields: Any) -> bool:
        """`record(AuditRecord.from_verdict(verdict, log_content=self.log_content, **fields))`, and it
        never raises either: a record that cannot be built is dropped and counted ("invalid")."""
        try:
            rec = AuditRecord.from_verdict(verdict, log_content=self.log_content, **fields)
        except Exception:
            self._drop("invalid", 1)
            return False
        return self.record(rec)

    def record_failure(self, error: str, **fields: Any) -> bool:
        """`record(AuditRecord.failure(error, log_content=self.log_content, **fields))`, never raising."""
        try:
            rec = AuditRecord.failure(error, log_content=self.log_content, **fields)
        except Exception:
            self._drop("invalid", 1)
            return False
        return self.record(rec)

    # ------------------------------------------------------------------------------------- state

    @property
    def dropped(self) -> int:
        """Records lost so far, every reason together (see `dropped_by`)."""
        return sum(self.dropped_by.values())

    @property
    def queue_depth(self) -> int:
        """Records accepted and not yet written (queued, or in the batch being written)."""
        return self._accepted - self._settled

    @property
    def database_down(self) -> bool:
        return self._down_since is not None

    def stats(self) -> dict[str, Any]:
        return {"written": self.written, "dropped": self.dropped, "dropped_by": dict(self.dropped_by),
                "queue_depth": self.queue_depth, "database_down": self.database_down}

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every record accepted so far is written or dropped (tests, benchmarks, shutdown).
        True when that happened within `timeout` seconds."""
        end = time.monotonic() + timeout
        while self.queue_depth:
            if time.monotonic() >= end or not self._thread.is_alive():
                return False
            time.sleep(0.005)
        return True

    def close(self, timeout: float = 5.0) -> int:
        """Stop taking records and write what is queued, for at most `timeout` seconds (a database that
        is down is retried until then). Returns how many accepted records were not written by then
        (counted as dropped, reason "closed"; 0: everything was written). Idempotent."""
        with self._lock:
            if self._closed:
                return 0
            self._closed = True
        before = self.dropped_by["closed"]
        self._deadline = time.monotonic() + timeout
        self._stopping.set()
        self._wake.set()
        try:
            self._queue.put_nowait(_STOP)
        except queue.Full:  # the writer is busy and sees `_stopping` after its batch
            pass
        self._thread.join(timeout + CLOSE_GRACE_S)  # the grace: the writer's own accounting at its deadline
        if self._thread.is_alive():  # stuck in a database call: the queue is lost, and so is its batch
            self._drop("closed", self._settle(self._drain()))
            lost = self.dropped_by["closed"] - before + self.queue_depth
        else:
            self.engine.dispose()
            lost = self.dropped_by["closed"] - before
        self._report_drops(force=True)
        return lost

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------- writer thread

    def _run(self) -> None:
        pending: list[AuditRecord] = []
        delay = 0.0
        while True:
            try:
                self._report_drops()
                if not pending:
                    pending = self._take()
                if pending:
                    pending = self._write(pending)
            except Exception:  # a bug here must not end the writer (the queue would fill up for good)
                log.exception("audit log: the writer failed; %d records dropped", len(pending))
                self._drop("rejected", self._settle(len(pending)))
                pending = []
            if pending:  # the database is away: back off, then retry the same batch
                if self._stopping.is_set() and time.monotonic() >= self._deadline:
                    self._drop("closed", self._settle(len(pending) + self._drain()))
                    break
                delay = min(max(2 * delay, 0.25), self.retry_max_s)
                self._wake.wait(min(delay, max(0.0, self._deadline - time.monotonic())))
                if self._stopping.is_set():
                    self._wake.clear()  # from now on retry at the backoff pace until the deadline
                continue
            delay = 0.0
            if self._stopping.is_set() and self._queue.empty():
                break

    def _take(self) -> list[AuditRecord]:
        """Up to `batch_size` records: waits for the first at most `flush_interval_s`, then takes what
        is there without waiting (a busy server fills its batches, a quiet one writes at once)."""
        try:
            first = self._queue.get(timeout=self.flush_interval_s)
        except queue.Empty:
            return []
        batch = [] if first is _STOP else [first]
        while len(batch) < self.batch_size:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                batch.append(item)
        return batch

    def _write(self, batch: list[AuditRecord]) -> list[AuditRecord]:
        """Insert `batch`; returns what is left to retry (all of it during an outage, else nothing)."""
        rows, kept = [], []
        for rec in batch:
            try:
                rows.append(rec.row())
                kept.append(rec)
            except Exception:
                self._drop("invalid", self._settle(1))
        try:
            self._insert(rows)
        except OUTAGE as e:
            self._outage(e, len(kept))
            return kept
        except Exception:  # one bad row (or a schema problem): find out which, one by one
            return self._write_each(kept, rows)
        self._wrote(len(rows))
        return []

    def _write_each(self, batch: list[AuditRecord], rows: list[dict[str, Any]]) -> list[AuditRecord]:
        for i, row in enumerate(rows):
            try:
                self._insert([row])
            except OUTAGE as e:
                self._outage(e, len(rows) - i)
                return batch[i:]
            except Exception as e:
                log.warning("audit log: the database refused a record (%s); it is dropped",
                            type(getattr(e, "orig", e)).__name__)
                self._drop("rejected", self._settle(1))
            else:
                self._wrote(1)
        return []

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if not self._ready:
            migrate(self.engine)
            self._ready = True
        with self.engine.begin() as conn:
            conn.execute(sa.insert(decisions), rows)

    def _wrote(self, n: int) -> None:
        self.written += self._settle(n)
        if self.metrics is not None and n:
            try:
                self.metrics.observe_audit(written=n)
            except Exception:  # the rows are written; a metrics fault changes nothing about them
                pass
        if self._down_since is not None:
            log.warning("audit log: writing to %s again after %.1f s away", describe(self.url),
                        time.monotonic() - self._down_since)
            self._down_since = None

    def _outage(self, e: BaseException, waiting: int) -> None:
        now = time.monotonic()
        self._down_since = self._down_since if self._down_since is not None else now
        self.engine.dispose()  # its connections may be dead: the retry opens fresh ones
        if now - self._last_outage_log >= self.log_every_s:
            self._last_outage_log = now
            log.warning("audit log: cannot write to %s (%s); %d records waiting, retrying; once %d are queued "
                        "new records are dropped (and counted)", describe(self.url), reason(e),
                        waiting + self._queue.qsize(), self.queue_size)

    def _settle(self, n: int) -> int:
        """`n` accepted records are done with (written or dropped)."""
        with self._lock:
            self._settled += n
        return n

    def _drain(self) -> int:
        n = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return n
            n += item is not _STOP

    def _drop(self, why: str, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            self.dropped_by[why] += n
            self._unreported[why] = self._unreported.get(why, 0) + n
        if self.metrics is not None:
            try:
                self.metrics.observe_audit(dropped=n, reason=why)
            except Exception:  # a metrics fault must not reach the request path either
                pass

    def _report_drops(self, force: bool = False) -> None:
        """Log the drops since the last report, at most every `log_every_s` (the writer thread and close
        do this, so the request path never waits on a log handler)."""
        now = time.monotonic()
        if not self._unreported or (not force and now - self._last_report < self.log_every_s):
            return
        with self._lock:
            counts, self._unreported = self._unreported, {}
        self._last_report = now
        log.warning("audit log: dropped %d records (%s); %d dropped since start", sum(counts.values()),
                    ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())), self.dropped)


def _positive(value: float, what: str) -> float:
    x = check_number(value, what)
    if not x > 0:
        raise InputError(f"{what} must be positive, got {value}")
    return x


@contextmanager
def audit_log(target: str | os.PathLike, **options: Any) -> Iterator[AuditLog]:
    """`AuditLog(target, **options)`, closed (and flushed) on leaving the block."""
    log_ = AuditLog(target, **options)
    try:
        yield log_
    finally:
        log_.close()
