"""Requests/s of `POST /v1/moderate` (a tiny model) with and without the operations layer, same run.

Two apps over the same guard, served by uvicorn on 127.0.0.1 in this process's threads: one with metrics
off and no audit log, one with metrics on and an audit log in a SQLite file (the writer thread inserting
while requests come). A pool of concurrent httpx clients sends the same request for a fixed count; the
runs alternate (off, on, off, on, ...) so both see the same machine load, and the median of each side is
reported with their ratio. Request ids and the drain are always on (they are part of every app).

    python benchmarks/ops_bench.py                     # tiny random checkpoint, ~1 min
    python benchmarks/ops_bench.py --requests 2000 --concurrency 16 --rounds 5

The last line printed is a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn

from qguard.runtime.guard import Guard
from qguard.serve import ServeSettings, create_app
from qguard.testing import make_stream_checkpoint

BODY = {"messages": [{"role": "user", "content": "How do I pick the lock on my own garden shed? I lost the key."}]}


class Served:
    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


async def load(port: int, n: int, concurrency: int) -> float:
    """Requests/s of `n` moderations from `concurrency` clients."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
        todo = iter(range(n))

        async def worker() -> None:
            for _ in todo:
                r = await c.post("/v1/moderate", json=BODY)
                r.raise_for_status()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=600, help="requests per round")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each side (alternating)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="qguard-ops-bench-"))
    guard = Guard.from_pretrained(make_stream_checkpoint(tmp / "tiny", preset="tiny", seed=0))
    db = tmp / "audit.db"
    off = create_app(guard, ServeSettings(metrics=False, max_concurrency=64))
    on = create_app(guard, ServeSettings(metrics=True, audit=str(db), max_concurrency=64))
    figures: dict[str, list[float]] = {"off": [], "on": []}
    with Served(off) as s_off, Served(on) as s_on:
        for port in (s_off.port, s_on.port):  # warm both
            asyncio.run(load(port, 50, args.concurrency))
        for _ in range(args.rounds):
            for side, port in (("off", s_off.port), ("on", s_on.port)):
                figures[side].append(asyncio.run(load(port, args.requests, args.concurrency)))
        audit = on.state.audit
        audit.flush()
        written, dropped = audit.written, audit.dropped
    med = {k: statistics.median(v) for k, v in figures.items()}
    out = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
           "requests": args.requests, "concurrency": args.concurrency, "rounds": args.rounds,
           "rps_off": round(med["off"], 1), "rps_on": round(med["on"], 1),
           "ratio_on_off": round(med["on"] / med["off"], 3), "audit_written": written, "audit_dropped": dropped,
           "rounds_off": [round(x, 1) for x in figures["off"]], "rounds_on": [round(x, 1) for x in figures["on"]]}
    print(f"/v1/moderate, tiny model: {med['off']:.1f} req/s without metrics+audit, {med['on']:.1f} with "
          f"(ratio {out['ratio_on_off']}); audit rows written {written}, dropped {dropped}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
