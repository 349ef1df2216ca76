"""Streaming speed of a Stream checkpoint (default: the embedded starter) at batch 1 on this machine.

    .venv/bin/python scripts/starter_speed.py [--model DIR] [--tokens 512] [--threads 1]

Two measurements, one token pushed per step (what a live LLM stream does):
- stream_guard: the public `qguard.stream.StreamGuard` session API (verdict, debounce, policy included);
- kv_forward: the bare model with `qguard.engine.kvcache.ContiguousCache`, one incremental forward per token.
Each is reported per wall-clock second and per CPU second of this process (with --threads 1 the latter is
the speed on one otherwise idle core: on a machine shared with other jobs the wall-clock figure drops).
Prints one JSON object. Timings on a shared machine vary; run it a few times.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from qguard.checkpoint import build_stream_model, open_checkpoint
from qguard.engine.kvcache import ContiguousCache
from qguard.starter import starter_model_path
from qguard.tokenizer import encode, load_tokenizer

TEXT = ("Sure. Here is a short overview of how rainbows form: sunlight enters raindrops, bends, reflects off "
        "the back of the drop and bends again on the way out, splitting white light into its colours. ") * 20


def response_ids(tok, n: int) -> list[int]:
    ids = encode(tok, TEXT)
    return (ids * (n // len(ids) + 1))[:n]


class Clock:
    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def rates(self, n: int) -> tuple[int, int]:
        return round(n / self.wall), round(n / self.cpu)


def stream_guard_tps(path: str, ids: list[int]) -> tuple[int, int]:
    from qguard.stream import StreamGuard

    sg = StreamGuard.from_pretrained(path, device="cpu", max_sessions=1, max_context=len(ids) + 256)
    with sg.open("Tell me about rainbows.") as s:
        s.push(ids[:8])  # warm-up
        with Clock() as c:
            for i in ids[8:]:
                s.push([i])
    return c.rates(len(ids) - 8)


@torch.inference_mode()
def kv_forward_tps(path: str, ids: list[int]) -> tuple[int, int]:
    model, _ = build_stream_model(open_checkpoint(path), torch.device("cpu"), torch.float32)
    cache = ContiguousCache(model.config.num_hidden_layers)
    model(torch.tensor([ids[:8]]), torch.arange(8)[None], cache)
    with Clock() as c:
        for p in range(8, len(ids)):
            model(torch.tensor([[ids[p]]]), torch.tensor([[p]]), cache)
    return c.rates(len(ids) - 8)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model or str(starter_model_path())
    ids = response_ids(load_tokenizer(path), args.tokens)
    out = {"model": path, "tokens": args.tokens, "threads": args.threads}
    out["kv_forward_tokens_per_s"], out["kv_forward_tokens_per_cpu_s"] = kv_forward_tps(path, ids)
    try:
        out["stream_guard_tokens_per_s"], out["stream_guard_tokens_per_cpu_s"] = stream_guard_tps(path, ids)
    except ImportError as e:  # the batched stream engine is not part of this build
        out["stream_guard_error"] = str(e)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
