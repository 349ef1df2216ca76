"""`qguard serve`: the moderation API and the guarded chat proxy over HTTP."""

from __future__ import annotations

import argparse
import logging
import os

from qguard.cli import MODEL_ENV, add_model_args, load_guard, model_name, port, positive_float, positive_int
from qguard.errors import InputError

log = logging.getLogger("qguard.serve")


def register(sub) -> None:
    p = sub.add_parser("serve", help="HTTP moderation API + guarded OpenAI-compatible proxy")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port, default=8080)
    p.add_argument("--upstream", default=None, help="OpenAI-compatible base URL of the LLM to guard (…/v1)")
    p.add_argument("--upstream-key-env", default="UPSTREAM_API_KEY",
                   help="environment variable holding the upstream API key (never pass keys on the command line)")
    p.add_argument("--api-keys-env", default="QGUARD_API_KEYS",
                   help="environment variable with comma-separated client API keys; unset = no auth")
    p.add_argument("--refusal", default=None, help="text returned in place of blocked content")
    p.add_argument("--max-concurrency", type=positive_int, default=16, help="requests in flight (and live stream sessions)")
    p.add_argument("--max-context", type=positive_int, default=4096, help="tokens per live-moderated stream")
    p.add_argument("--upstream-timeout", type=positive_float, default=120.0, metavar="SECONDS",
                   help="connect/read timeout of each upstream request; past it the client gets a 504")
    p.add_argument("--keepalive", type=positive_float, default=15.0, metavar="SECONDS",
                   help="send an SSE keep-alive comment when a stream's upstream is silent this long")
    p.add_argument("--max-request-bytes", type=positive_int, default=4 << 20, metavar="N",
                   help="larger request bodies are refused (413) before they are read")
    p.add_argument("--docs", action="store_true",
                   help="serve /docs, /redoc and /openapi.json (off by default: the pages load scripts from a CDN)")
    p.add_argument("--log-content", action="store_true", help="log message text (off by default: privacy)")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from qguard.serve import ServeSettings, create_app

    if args.max_context < 16:
        raise InputError("--max-context must be at least 16 tokens")
    keys = os.environ.get(args.api_keys_env)
    if not keys and args.host not in ("127.0.0.1", "localhost", "::1"):
        raise InputError(f"refusing to serve on {args.host} without API keys: set ${args.api_keys_env}")
    settings = ServeSettings(
        api_keys=frozenset(k.strip() for k in keys.split(",") if k.strip()) if keys else None,
        upstream_url=args.upstream, upstream_api_key=os.environ.get(args.upstream_key_env),
        max_concurrency=args.max_concurrency, max_context=args.max_context, log_content=args.log_content,
        upstream_timeout_s=args.upstream_timeout, keepalive_s=args.keepalive,
        max_request_bytes=args.max_request_bytes, docs=args.docs,
        **({"refusal_message": args.refusal} if args.refusal else {}),
    )
    # the request lines (label, action, timing; content only with --log-content) are INFO records
    logging.getLogger("qguard.serve").setLevel(logging.INFO)
    if not args.model and not os.environ.get(MODEL_ENV):
        from qguard.starter import starter_model_path

        if starter_model_path() is not None and model_name(args) == str(starter_model_path()):
            log.warning("serving the embedded starter model: a small model qguard trained itself, much weaker "
                        "than the official Qwen3Guard checkpoints; for real traffic pass --model DIR_OR_HUB_ID "
                        "(e.g. Qwen/Qwen3Guard-Stream-0.6B) or set $%s", MODEL_ENV)
    guard = load_guard(args)
    if args.max_context > guard.max_len:  # the server's setting, not a client's request, is wrong
        raise InputError(f"--max-context {args.max_context} is over the model's context of {guard.max_len} tokens")
    uvicorn.run(create_app(guard, settings), host=args.host, port=args.port, log_level="info")
    return 0
