"""`/v1/stream` over the network next to in-process `StreamGuard`: the cost of the WebSocket hop.

    python benchmarks/ws_bench.py                          # tiny preset, 16 sessions (well under a minute)
    python benchmarks/ws_bench.py --preset 0.6B --sessions 32 --rounds 2

One random checkpoint (qguard.testing, the preset's exact architecture) is served by `qguard serve` in a
subprocess on 127.0.0.1 (its own interpreter, as deployed). The same workload runs against it and against
a `StreamGuard` in this process, in alternating rounds, so load from other processes hits both alike:
N concurrent sessions, each opens on the same prompt, pushes the same response as text deltas (one word
each, as an LLM streams), one reply awaited before the next push, then finishes.
- tokens/s: moderated tokens of all sessions / the round's wall time (median over rounds);
- per-push latency: from sending a delta to holding its verdicts, p50 and p95 over every push of the
  round (median over rounds);
- overhead: in-process tokens/s / WebSocket tokens/s, and the latency ratios.
Both paths must give the same labels (checked). The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from qguard.runtime.stream import StreamGuard
from qguard.testing import make_stream_checkpoint

PROMPT = "How do I bake bread at home?"
WORDS = ("Mix flour, water, salt and yeast; knead the dough for ten minutes, let it rise for an hour in a warm "
         "place, shape the loaf, and bake it at 230 degrees until the crust is brown and it sounds hollow. ").split(" ")


def deltas(n_words: int) -> list[str]:
    words = [WORDS[i % len(WORDS)] for i in range(n_words)]
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# ------------------------------------------------------------------------------ the two paths

async def in_process(sg: StreamGuard, n: int, chunks: list[str]) -> tuple[float, int, list[float], list]:
    lat: list[float] = []

    async def one():
        s = await sg.open_async(PROMPT, timeout=60)
        labels = []
        try:
            for d in chunks:
                t0 = time.perf_counter()
                labels += [tv.label.value for tv in await s.push_text(d)]
                lat.append(time.perf_counter() - t0)
            labels += [tv.label.value for tv in await s.flush()]
            await s.finish()
        finally:
            await s.aclose()
        return labels

    t0 = time.perf_counter()
    labels = await asyncio.gather(*(one() for _ in range(n)))
    return time.perf_counter() - t0, sum(map(len, labels)), lat, labels


async def over_ws(url: str, n: int, chunks: list[str]) -> tuple[float, int, list[float], list]:
    from websockets.asyncio.client import connect

    lat: list[float] = []

    async def one():
        async with connect(url, max_size=None) as ws:
            async def rpc(frame):
                await ws.send(json.dumps(frame))
                r = json.loads(await ws.recv())
                if r["type"] == "error":
                    raise RuntimeError(f"server refused {frame['type']}: {r['code']}: {r['message']}")
                return r

            await rpc({"type": "open", "messages": [{"role": "user", "content": PROMPT}]})
            labels = []
            for d in chunks:
                t0 = time.perf_counter()
                labels += [t["label"] for t in (await rpc({"type": "push", "text": d}))["tokens"]]
                lat.append(time.perf_counter() - t0)
            labels += [t["label"] for t in (await rpc({"type": "flush"}))["tokens"]]
            await rpc({"type": "finish"})
            return labels

    t0 = time.perf_counter()
    labels = await asyncio.gather(*(one() for _ in range(n)))
    return time.perf_counter() - t0, sum(map(len, labels)), lat, labels


# ------------------------------------------------------------------------------ the server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, port: int, sessions: int, context: int) -> subprocess.Popen:
    env = {**os.environ, "QGUARD_API_KEYS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "qguard", "serve", "--model", str(ckpt), "--port", str(port),
                             "--max-concurrency", str(sessions), "--max-context", str(context), "--device", "cpu"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"qguard serve exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("qguard serve did not start within 180 s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=["tiny", "0.6B"])
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--words", type=int, default=48, help="text deltas (one word each) per session")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--context", type=int, default=1024)
    args = p.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # the server subprocess gets the other half
    chunks = deltas(args.words)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_stream_checkpoint(Path(tmp) / "ckpt", preset=args.preset, seed=0)
        sg = StreamGuard.from_pretrained(ckpt, device="cpu", max_sessions=args.sessions, max_context=args.context)
        port = free_port()
        proc = start_server(ckpt, port, args.sessions, args.context)
        url = f"ws://127.0.0.1:{port}/v1/stream"
        try:
            asyncio.run(over_ws(url, 1, chunks[:4]))  # warm-up: the server makes its engine on first use
            asyncio.run(in_process(sg, 1, chunks[:4]))
            rows = {"in_process": [], "websocket": []}
            for _ in range(args.rounds):
                for name, run in (("in_process", lambda: in_process(sg, args.sessions, chunks)),
                                  ("websocket", lambda: over_ws(url, args.sessions, chunks))):
                    wall, tokens, lat, labels = asyncio.run(run())
                    rows[name].append((tokens / wall, pct(lat, 0.5), pct(lat, 0.95), labels))
        finally:
            proc.terminate()
            proc.wait(30)
            sg.close()
    assert rows["in_process"][0][3] == rows["websocket"][0][3], "the two paths gave different labels"
    out = {"preset": args.preset, "sessions": args.sessions, "pushes_per_session": len(chunks),
           "tokens_per_session": len(rows["in_process"][0][3][0]), "rounds": args.rounds}
    for name, rs in rows.items():
        out[name] = {"tokens_per_s": statistics.median(r[0] for r in rs),
                     "push_p50_ms": 1e3 * statistics.median(r[1] for r in rs),
                     "push_p95_ms": 1e3 * statistics.median(r[2] for r in rs)}
    ip, ws = out["in_process"], out["websocket"]
    out["overhead"] = {"tokens_per_s_ratio": ip["tokens_per_s"] / ws["tokens_per_s"],
                       "push_p50_ratio": ws["push_p50_ms"] / ip["push_p50_ms"],
                       "push_p95_ratio": ws["push_p95_ms"] / ip["push_p95_ms"]}
    out["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                      "torch": torch.__version__, "load_avg_1m": os.getloadavg()[0]}
    for name in ("in_process", "websocket"):
        r = out[name]
        print(f"{name:11s} {r['tokens_per_s']:9.0f} tokens/s  push p50 {r['push_p50_ms']:7.2f} ms  "
              f"p95 {r['push_p95_ms']:7.2f} ms")
    o = out["overhead"]
    print(f"overhead: in-process/ws tokens/s {o['tokens_per_s_ratio']:.2f}x, push latency p50 "
          f"{o['push_p50_ratio']:.2f}x, p95 {o['push_p95_ratio']:.2f}x")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
