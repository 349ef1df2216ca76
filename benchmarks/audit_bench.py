"""What the audit log and the metrics cost: on the request path, and how fast the writer empties its queue.

For each database (a SQLite file; PostgreSQL when --postgres or $QGUARD_TEST_POSTGRES names a server):

- request path: the µs one decision costs the route, `AuditLog.record_verdict(verdict, ...)` (building the
  record: `Verdict.to_dict`, SHA-256 of the judged text, the API-key hash; then the non-blocking queue
  put), while the writer thread inserts the earlier ones (it competes for the GIL, as in a server);
- writer throughput: records/s from the first `record` until every record is in the database (`flush`),
  with the default batch size and with batches of 1 (what batching buys);
- the same record built with no writer running (the request path's own work, without GIL contention);
- metrics: µs of `Metrics.observe_verdict` + `observe_request` per request, and of one scrape.

    python benchmarks/audit_bench.py                       # SQLite, and PostgreSQL if $QGUARD_TEST_POSTGRES
    python benchmarks/audit_bench.py --records 50000 --postgres postgresql://user@127.0.0.1:5432/db

The PostgreSQL run writes into a table of the named database: give it a scratch database (the rows are
deleted afterwards). The last line printed is a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from qguard.audit import AuditLog, AuditRecord
from qguard.audit.db import open_database
from qguard.audit.schema import decisions
from qguard.metrics import Metrics
from qguard.policy import Category, Policy, Severity

TEXT = ("Can you explain how to pick the lock on my own garden shed? I lost the key last week and the "
        "locksmith cannot come before Monday, so I'd like to try it myself without breaking the door.")


def verdict():
    return Policy().verdict(Severity.UNSAFE, [Category.NON_VIOLENT_ILLEGAL], n_tokens=48, unsafe_position=5,
                            probs={"Safe": 0.12, "Unsafe": 0.81, "Controversial": 0.07},
                            category_probs={c.value: 0.1 for c in Category})


def request_path_us(audit: AuditLog, n: int, rounds: int = 5) -> float:
    """Median over `rounds` of the mean µs per `record_verdict` call, `n // rounds` calls a round."""
    v, per = verdict(), max(1, n // rounds)
    samples = []
    for r in range(rounds):
        t0 = time.perf_counter()
        for i in range(per):
            audit.record_verdict(v, endpoint="/v1/moderate", stage="prompt", text=TEXT, request_id=f"r{r}-{i}",
                                 model="Qwen3Guard-Stream-0.6B", api_key="sk-bench-key", latency_ms=3.2)
        samples.append((time.perf_counter() - t0) / per * 1e6)
    return statistics.median(samples)


def writer_records_per_s(target: str, n: int, batch_size: int) -> tuple[float, float, int]:
    """(records/s from the first record to the last row written, µs per record on the request path,
    records dropped). The queue holds all `n`, so none is dropped for want of room."""
    with AuditLog(target, queue_size=n + 1, batch_size=batch_size) as audit:
        t0 = time.perf_counter()
        us = request_path_us(audit, n)
        if not audit.flush(timeout=600):
            raise SystemExit(f"the writer did not finish {n} records in 600 s")
        dt = time.perf_counter() - t0
        assert audit.written == n - n % 5, (audit.written, n)
        return audit.written / dt, us, audit.dropped


def build_us(n: int) -> float:
    """µs to build one record with no writer thread running (the request path's own work, no GIL
    contention): `AuditRecord.from_verdict` with the text and key hashes."""
    v = verdict()
    t0 = time.perf_counter()
    for i in range(n):
        AuditRecord.from_verdict(v, endpoint="/v1/moderate", stage="prompt", text=TEXT, request_id=f"r{i}",
                                 model="Qwen3Guard-Stream-0.6B", api_key="sk-bench-key", latency_ms=3.2)
    return (time.perf_counter() - t0) / n * 1e6


def metrics_us(n: int) -> tuple[float, float]:
    m, v = Metrics(), verdict()
    t0 = time.perf_counter()
    for _ in range(n):
        m.observe_verdict("/v1/moderate", v, stage="prompt")
        m.observe_request("/v1/moderate", 200, seconds=0.004)
    per_request = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for _ in range(20):
        m.render()
    return per_request, (time.perf_counter() - t0) / 20 * 1e6


def clear(target: str) -> None:
    engine, _ = open_database(target)
    with engine.begin() as c:
        c.execute(decisions.delete())
    engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=20_000, help="records per run (default 20000)")
    ap.add_argument("--postgres", default=os.environ.get("QGUARD_TEST_POSTGRES"),
                    help="a scratch PostgreSQL database (default $QGUARD_TEST_POSTGRES; none: SQLite only)")
    args = ap.parse_args()
    n = args.records
    result = {"records": n, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "python": platform.python_version(), "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        targets = {"sqlite": str(Path(tmp) / "audit.db")}
        if args.postgres:
            targets["postgresql"] = args.postgres
        print(f"audit log, {n} records per run ({result['machine']})")
        print(f"{'database':<12}{'batch':>7}{'records/s':>12}{'request path µs/record':>26}{'dropped':>9}")
        for name, target in targets.items():
            clear(target)
            for batch in (500, 1):
                count = n if batch > 1 else min(n, 2_000)  # one transaction per record: fewer, it is slow
                rate, us, dropped = writer_records_per_s(target, count, batch)
                clear(target)
                result["results"][f"{name}_batch{batch}"] = {"records": count, "records_per_s": round(rate),
                                                             "request_path_us": round(us, 1), "dropped": dropped}
                print(f"{name:<12}{batch:>7}{rate:>12,.0f}{us:>26.1f}{dropped:>9}")
    built = build_us(n)
    result["build_record_us_no_writer"] = round(built, 1)
    print(f"building one record with no writer running: {built:.1f} µs")
    per_request, scrape = metrics_us(n)
    result["metrics_us_per_request"], result["metrics_scrape_us"] = round(per_request, 2), round(scrape)
    print(f"metrics: observe_verdict + observe_request {per_request:.1f} µs per request; one scrape {scrape:,.0f} µs")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
