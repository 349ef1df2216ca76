"""`qguard eval-intervention`: a prompt set through the rollback proxy (CARE) and without it, in one run.

Each prompt goes (1) straight to the upstream (no guard, no intervention: the baseline) and (2) through
qguard's guarded proxy with `on_unsafe=rollback` (in process, the same code `qguard serve` runs). Both
answers are judged by the judge guard (`--judge`, a Gen or Stream model; default: the proxy's guard). The
report: safety rate (share of answers the judge does not block; a refusal counts as safe), mean wait
tokens, mean retries and refusals of the rollback run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import httpx

from qguard.cli import add_model_args, load_guard, positive_int
from qguard.errors import InputError


def register(sub) -> None:
    p = sub.add_parser("eval-intervention", help="safety rate, wait tokens and retries of rollback (CARE) "
                                                 "against an upstream LLM, next to no intervention")
    add_model_args(p)
    p.add_argument("--prompts", required=True, help="JSONL: one {\"prompt\": ...} (or {\"messages\": [...]}) a line")
    p.add_argument("--upstream", required=True, help="OpenAI-compatible base URL of the LLM (…/v1)")
    p.add_argument("--llm", required=True, help="the model name the upstream serves")
    p.add_argument("--judge", default=None, help="the guard that judges the released answers (default: --model)")
    p.add_argument("--buffer-tokens", type=positive_int, default=40)
    p.add_argument("--max-retries", type=positive_int, default=5)
    p.add_argument("--intervention", default="introspect", help="nudge, introspect or the text to insert")
    p.add_argument("--upstream-continuation", action="store_true",
                   help="the upstream continues a final assistant message (vLLM, SGLang)")
    p.add_argument("--max-tokens", type=positive_int, default=512, help="max_tokens of each answer request")
    p.add_argument("--limit", type=positive_int, default=None, help="the first N prompts only")
    p.add_argument("--out", default=None, help="also write the per-prompt rows (JSONL) here")
    p.set_defaults(func=run_eval_intervention)


def read_prompts(path: str | Path, limit: int | None = None) -> list[list[dict[str, str]]]:
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--prompts {path}: cannot read it ({e})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise InputError(f"--prompts {path} line {i}: not JSON") from None
        if isinstance(row, dict) and isinstance(row.get("prompt"), str) and row["prompt"].strip():
            out.append([{"role": "user", "content": row["prompt"]}])
        elif isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
            out.append(row["messages"])
        else:
            raise InputError(f"--prompts {path} line {i}: expected {{\"prompt\": text}} or {{\"messages\": [...]}}")
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise InputError(f"--prompts {path}: no prompts")
    return out


def evaluate(guard, judge, prompts: list[list[dict[str, str]]], llm: str, baseline: httpx.Client,
             upstream: httpx.AsyncClient, *, buffer_tokens: int = 40, max_retries: int = 5,
             intervention: str = "introspect", continuation: bool = False, max_tokens: int = 512,
             refusal_message: str | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, per-prompt rows). `baseline`: a client of the upstream for the unguarded answers;
    `upstream`: the proxy's client of the same upstream."""
    from fastapi.testclient import TestClient

    from qguard.serve import ServeSettings, create_app

    settings = ServeSettings(upstream_url=str(upstream.base_url), on_unsafe="rollback", buffer_tokens=buffer_tokens,
                             max_retries=max_retries, intervention=intervention, upstream_continuation=continuation,
                             keepalive_s=None, **({"refusal_message": refusal_message} if refusal_message else {}))
    rows = []
    with TestClient(create_app(guard, settings, upstream=upstream)) as proxy:
        for messages in prompts:
            req = {"model": llm, "messages": messages, "max_tokens": max_tokens}
            r = baseline.post("/chat/completions", json=req)
            if r.status_code != 200:
                raise InputError(f"the upstream answered HTTP {r.status_code} to a baseline request")
            plain = r.json()["choices"][0]["message"].get("content") or ""
            g = proxy.post("/v1/chat/completions", json={**req, "stream": True})
            text, info = released(g)
            leak = info.get("leak_control") or {}
            rows.append({
                "messages": messages, "baseline": plain, "rollback": text,
                "baseline_safe": not judge.classify_responses([(messages, plain)])[0].blocked,
                "rollback_safe": leak.get("refused") or not judge.classify_responses([(messages, text)])[0].blocked,
                "retries": leak.get("retries", 0), "wait_tokens": leak.get("wait_tokens", 0),
                "refused": bool(leak.get("refused")), "prompt_blocked": info.get("blocked") == "prompt",
            })
    n = len(rows)
    summary = {
        "prompts": n,
        "baseline": {"safety_rate": sum(r["baseline_safe"] for r in rows) / n},
        "rollback": {"safety_rate": sum(r["rollback_safe"] for r in rows) / n,
                     "mean_wait_tokens": sum(r["wait_tokens"] for r in rows) / n,
                     "mean_retries": sum(r["retries"] for r in rows) / n,
                     "refusals": sum(r["refused"] for r in rows),
                     "prompts_blocked": sum(r["prompt_blocked"] for r in rows)},
        "settings": {"buffer_tokens": buffer_tokens, "max_retries": max_retries, "intervention": intervention,
                     "upstream_continuation": continuation},
    }
    return summary, rows


def released(r: httpx.Response) -> tuple[str, dict[str, Any]]:
    """The text a streaming client received and the reply's `qguard` object."""
    if r.status_code != 200:
        raise InputError(f"the proxy answered HTTP {r.status_code}: {r.text[:200]}")
    text, info = [], {}
    for line in r.text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        e = json.loads(line[6:])
        if "error" in e:
            raise InputError(f"the proxy's stream failed: {e['error'].get('message')}")
        text += [c["delta"].get("content") or "" for c in e.get("choices", [])]
        info = e.get("qguard", info)
    return "".join(text), info


def run_eval_intervention(args: argparse.Namespace) -> int:
    prompts = read_prompts(args.prompts, args.limit)
    guard = load_guard(args)
    judge = guard
    if args.judge:
        from qguard.runtime.guard import Guard

        judge = Guard.from_pretrained(args.judge)
    base = args.upstream.rstrip("/")
    with httpx.Client(base_url=base, timeout=600) as baseline:
        upstream = httpx.AsyncClient(base_url=base, timeout=600)
        summary, rows = evaluate(guard, judge, prompts, args.llm, baseline, upstream,
                                 buffer_tokens=args.buffer_tokens, max_retries=args.max_retries,
                                 intervention=args.intervention, continuation=args.upstream_continuation,
                                 max_tokens=args.max_tokens)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
