"""The streaming latency cost of leak control's hold-back window, next to the upstream streamed directly.

    python benchmarks/holdback_bench.py                         # 60 tokens at 20 ms, 3 rounds: about a minute
    python benchmarks/holdback_bench.py --tokens 120 --interval-ms 30 --rounds 5 --holds 0 2 8 40 80

A scripted OpenAI-compatible upstream (a subprocess of this file, `--serve-upstream`, on 127.0.0.1) streams
an answer of `--tokens` words, one chunk per word every `--interval-ms`, as an LLM decodes. One `qguard
serve` per hold-back setting (`--hold-tokens N`; the embedded starter Stream guard, CPU, one torch thread
each) proxies it. The official `openai` SDK is the client. Each round asks the upstream directly (the
baseline) and every proxy once, in that order, so load from other processes hits all of them alike; the
figures are medians over rounds:
- first token: from sending the request to the first chunk with content (for the proxy: the first text the
  guard released, after the prompt was judged and the window filled);
- total: until the stream's end (`[DONE]`);
- ratios: each proxy's figure / the direct one.
The proxied answer must be the upstream's, whole (checked: the scripted answer is safe). The last line
printed is a JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

from _machine import cpu_name  # a sibling module: the scripts run from this folder

PROMPT = "Tell me a story about a lighthouse."
WORDS = ("The keeper climbed the stairs every evening, lit the great lamp and watched the ships pass safely "
         "along the rocky coast while the gulls circled overhead and the waves rolled in.").split(" ")


def answer_words(n: int) -> list[str]:
    return [(" " if i else "") + WORDS[i % len(WORDS)] for i in range(n)]


# ------------------------------------------------------------------------------ the scripted upstream

def serve_upstream(port: int, n: int, interval_s: float) -> None:
    """An OpenAI-compatible upstream on 127.0.0.1:`port`: every chat completion streams the same `n` words,
    one chunk each, `interval_s` apart (the first at once), then its finish_reason and `[DONE]`."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    words = answer_words(n)

    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "scripted",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(body)}\n\n"

    async def events():
        start = time.perf_counter()
        for i, w in enumerate(words):  # on a fixed schedule: a slow reader does not slow the "LLM" down
            await asyncio.sleep(max(0.0, start + i * interval_s - time.perf_counter()))
            yield chunk({"role": "assistant", "content": w} if i == 0 else {"content": w})
        yield chunk({}, "stop")
        yield "data: [DONE]\n\n"

    async def completions(request):
        body = await request.json()
        if not body.get("stream"):
            return JSONResponse({"error": {"message": "this upstream only streams"}}, status_code=400)
        return StreamingResponse(events(), media_type="text/event-stream")

    async def health(request):
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"]),
                            Route("/health", health)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ------------------------------------------------------------------------------ processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_thread_env() -> dict[str, str]:
    # every process one torch thread: the machine is shared (2 cores) and the servers run side by side
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "QGUARD_API_KEYS": ""}


def wait_ready(proc: subprocess.Popen, url: str, what: str, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{what} did not start within {seconds:g} s")


def start_upstream(port: int, n: int, interval_ms: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, __file__, "--serve-upstream", str(port), "--tokens", str(n),
                             "--interval-ms", str(interval_ms)], env=one_thread_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_ready(proc, f"http://127.0.0.1:{port}/health", "the scripted upstream", 60)
    return proc


def start_proxy(port: int, upstream_port: int, hold: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qguard", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--upstream", f"http://127.0.0.1:{upstream_port}/v1", "--hold-tokens", str(hold),
                             "--device", "cpu", "--max-concurrency", "2", "--no-metrics", "--no-playground"],
                            env=one_thread_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


# ------------------------------------------------------------------------------ the client

def timed_stream(client, max_s: float) -> tuple[float, float, str]:
    """(seconds to the first content, seconds to the end, the content) of one streamed completion."""
    t0 = time.perf_counter()
    first = None
    text = []
    stream = client.chat.completions.create(model="scripted", stream=True,
                                            messages=[{"role": "user", "content": PROMPT}])
    for c in stream:
        for choice in c.choices:
            if choice.delta.content:
                if first is None:
                    first = time.perf_counter() - t0
                text.append(choice.delta.content)
        if time.perf_counter() - t0 > max_s:
            raise SystemExit(f"a stream ran over {max_s:g} s")
    total = time.perf_counter() - t0
    if first is None:
        raise SystemExit("a stream carried no content")
    return first, total, "".join(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=60, help="words (one chunk each) the upstream streams")
    p.add_argument("--interval-ms", type=float, default=20.0, help="time between the upstream's chunks")
    p.add_argument("--holds", type=int, nargs="+", default=[0, 2, 8, 40], help="hold_tokens settings")
    p.add_argument("--rounds", type=int, default=3, help="requests per setting (bounded)")
    p.add_argument("--serve-upstream", type=int, default=None, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_upstream is not None:
        serve_upstream(args.serve_upstream, args.tokens, args.interval_ms / 1000.0)
        return
    if not 1 <= args.rounds <= 50 or not 1 <= args.tokens <= 2000:
        raise SystemExit("--rounds must be 1..50 and --tokens 1..2000")
    import openai

    want = "".join(answer_words(args.tokens))
    max_s = 30 + 3 * args.tokens * args.interval_ms / 1000.0
    up_port = free_port()
    procs: list[subprocess.Popen] = []
    try:
        procs.append(start_upstream(up_port, args.tokens, args.interval_ms))
        ports = {}
        for hold in args.holds:  # start every proxy, then wait for them: their model loads overlap
            ports[hold] = free_port()
            procs.append(start_proxy(ports[hold], up_port, hold))
        for hold, proc in zip(args.holds, procs[1:]):
            wait_ready(proc, f"http://127.0.0.1:{ports[hold]}/health/ready", f"qguard serve --hold-tokens {hold}")
        clients = {"direct": openai.OpenAI(base_url=f"http://127.0.0.1:{up_port}/v1", api_key="none", max_retries=0)}
        for hold in args.holds:
            clients[f"hold {hold}"] = openai.OpenAI(base_url=f"http://127.0.0.1:{ports[hold]}/v1", api_key="none",
                                                    max_retries=0)
        for c in clients.values():  # warm-up: each server's first request builds its live engine
            timed_stream(c, max_s)
        rows: dict[str, list[tuple[float, float]]] = {name: [] for name in clients}
        for _ in range(args.rounds):
            for name, c in clients.items():
                first, total, text = timed_stream(c, max_s)
                if text != want:
                    raise SystemExit(f"{name}: the client got {len(text)} characters, not the upstream's {len(want)}")
                rows[name].append((first, total))
        load = os.getloadavg()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    med = {name: (statistics.median(r[0] for r in rs) * 1e3, statistics.median(r[1] for r in rs) * 1e3)
           for name, rs in rows.items()}
    d_first, d_total = med["direct"]
    print(f"upstream: {args.tokens} words, one every {args.interval_ms:g} ms; {args.rounds} rounds, medians")
    print(f"{'path':<10} {'first token ms':>15} {'ratio':>7} {'+ms':>8} {'total ms':>10} {'ratio':>7}")
    out = {"tokens": args.tokens, "interval_ms": args.interval_ms, "rounds": args.rounds, "paths": {}}
    for name, (first, total) in med.items():
        print(f"{name:<10} {first:>15.1f} {first / d_first:>7.2f} {first - d_first:>8.1f} {total:>10.1f} "
              f"{total / d_total:>7.3f}")
        out["paths"][name] = {"first_token_ms": round(first, 1), "total_ms": round(total, 1),
                              "first_token_ratio": round(first / d_first, 2),
                              "total_ratio": round(total / d_total, 3)}
    out["machine"] = {"cpu": cpu_name(), "cores": os.cpu_count(), "load_avg_1m": round(load[0], 2)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
