"""`qguard classify` and `qguard stream-trace`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qguard.cli import add_model_args, load_guard
from qguard.errors import InputError
from qguard.policy import Verdict


def register(sub) -> None:
    p = sub.add_parser("classify", help="moderate one prompt, or one prompt + response")
    add_model_args(p)
    p.add_argument("text", nargs="?", help="a user prompt to moderate ('-': read it from standard input)")
    p.add_argument("--prompt", help="the user prompt (with --response: moderate the response)")
    p.add_argument("--response", help="the assistant response to moderate")
    p.add_argument("--messages", help="JSON file with a list of {role, content} ('-': standard input); the last "
                                      "message is judged")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_classify)

    t = sub.add_parser("stream-trace", help="per-token Stream verdicts over a response")
    add_model_args(t)
    t.add_argument("--prompt", required=True)
    t.add_argument("--response", required=True)
    t.add_argument("--json", action="store_true", help="JSON lines: the prompt, then one line per token")
    t.set_defaults(func=run_trace)


def read_stdin() -> str:
    try:
        return sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError:
        raise InputError("standard input is not UTF-8 text") from None


def read_messages(path: str) -> list:
    p = Path(path)
    if path != "-" and not p.is_file():
        raise InputError(f"--messages: no such file: {path}")
    try:
        data = json.loads(read_stdin() if path == "-" else p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"--messages: {path} is not UTF-8 text") from None
    except ValueError as e:
        raise InputError(f"--messages: {path} is not valid JSON ({e})") from None
    if isinstance(data, dict) and "messages" in data:
        data = data["messages"]
    return data


def conversation(args: argparse.Namespace) -> list:
    given = [x for x in ("text", "prompt", "messages") if getattr(args, x) is not None]
    if len(given) != 1:
        raise InputError("give exactly one of: TEXT, --prompt P [--response R], --messages FILE.json")
    if args.response is not None and args.prompt is None:
        raise InputError("--response needs --prompt")
    if args.messages is not None:
        return read_messages(args.messages)
    if args.text is not None:
        return [{"role": "user", "content": read_stdin() if args.text == "-" else args.text}]
    msgs = [{"role": "user", "content": args.prompt}]
    if args.response is not None:
        msgs.append({"role": "assistant", "content": args.response})
    return msgs


def human(v) -> str:
    probs = " ".join(f"{k}={p:.2f}" for k, p in (v.probs or {}).items())
    cats = ", ".join(c.value for c in v.categories) or "None"
    parts = [f"{v.label.value}", f"categories: {cats}"]
    if v.refusal is not None:
        parts.append(f"refusal: {'Yes' if v.refusal else 'No'}")
    if v.unsafe_position is not None:
        parts.append(f"at token {v.unsafe_position}")
    parts.append(f"[{v.mode.value}: {v.binary.value}, {v.action.value}] {probs}")
    if v.error:
        parts.append(f"ERROR: {v.error}")
    return " | ".join(parts)


def verdict_json(v: Verdict, model: str) -> dict:
    """A verdict as every JSON output prints it: `Verdict.to_dict()` and the model that gave it."""
    return {**v.to_dict(), "model": model}


def run_classify(args: argparse.Namespace) -> int:
    msgs = conversation(args)
    guard = load_guard(args)
    v = guard.classify_messages(msgs)
    if args.json:
        print(json.dumps(verdict_json(v, guard.name), ensure_ascii=False))
    else:
        print(human(v))
    return 0


COLOURS = {"Safe": "green", "Unsafe": "red", "Controversial": "yellow"}


def run_trace(args: argparse.Namespace) -> int:
    guard = load_guard(args)
    trace = guard.stream_trace(args.prompt, args.response)
    if args.json:  # JSON lines: {"prompt": verdict}, one line per answer token, {"verdict": response verdict}
        out = sys.stdout
        out.write(json.dumps({"prompt": verdict_json(trace.prompt, guard.name)}, ensure_ascii=False) + "\n")
        for t in trace.tokens:
            out.write(json.dumps({"token_id": t.token_id, "text": t.text, "probs": t.probs,
                                  "category_probs": t.category_probs, "label": t.label.value},
                                 ensure_ascii=False) + "\n")
        out.write(json.dumps({"verdict": verdict_json(trace.response, guard.name)}, ensure_ascii=False) + "\n")
        return 0
    from rich.console import Console
    from rich.text import Text

    con = Console()
    con.print(f"prompt: [bold]{trace.prompt.label.value}[/] (P(unsafe)={trace.prompt.probs['Unsafe']:.2f})")
    line = Text()
    for t in trace.tokens:
        line.append(t.text, style=COLOURS[t.label.value])
    con.print(line)
    r = trace.response
    where = f" from token {r.unsafe_position}" if r.unsafe_position is not None else ""
    con.print(f"response: [bold]{r.label.value}[/]{where} categories: {', '.join(c.value for c in r.categories) or 'None'}")
    return 0
