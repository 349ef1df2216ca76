"""`qguard serve`: the moderation API and the guarded chat proxy over HTTP."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from qguard.cli import (
    MODEL_ENV,
    add_model_args,
    load_guard,
    model_name,
    policy_file,
    port,
    positive_float,
    positive_int,
)
from qguard.errors import InputError, QGuardError

log = logging.getLogger("qguard.serve")

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


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
    p.add_argument("--max-upstream-line-bytes", type=positive_int, default=None, metavar="N",
                   help="longest upstream stream line read; a longer one ends the stream with a 502 "
                        "(default: 32 bytes per token of the guard's context, plus 64 KiB)")
    p.add_argument("--docs", action="store_true",
                   help="serve /docs, /redoc and /openapi.json (off by default: the pages load scripts from a CDN)")
    p.add_argument("--log-content", action="store_true", help="log message text (off by default: privacy)")
    p.add_argument("--stream-idle-timeout", type=positive_float, default=60.0, metavar="SECONDS",
                   help="close a /v1/stream WebSocket connection after this long without a frame")
    p.add_argument("--playground", action=argparse.BooleanOptionalAction, default=None,
                   help="serve the /playground page (default: on when bound to localhost, off elsewhere)")
    leak = p.add_argument_group("leak control (README: Leak control)")
    leak.add_argument("--hold-tokens", type=non_negative_int, default=None, metavar="N",
                      help="stream text only N judged guard tokens behind the newest (default 2, the debounce "
                           "window: a cut never shows a token of the unsafe pair; 0: stream-first)")
    leak.add_argument("--on-unsafe", choices=("cut", "refuse", "rollback"), default=None,
                      help="an unsafe answer is cut (content_filter), refused (the held text becomes the "
                           "refusal; default) or rolled back and continued with an intervention (CARE)")
    leak.add_argument("--buffer-tokens", type=non_negative_int, default=None, metavar="N",
                      help="rollback's hold-back, in guard tokens (default 40)")
    leak.add_argument("--max-retries", type=non_negative_int, default=None, metavar="N",
                      help="rollbacks per answer before refusing (default 5)")
    leak.add_argument("--intervention", default=None, metavar="TEXT",
                      help="rollback's intervention: nudge (default), introspect, or the text to insert")
    leak.add_argument("--upstream-continuation", action="store_true",
                      help="the upstream continues a final assistant message (vLLM, SGLang: "
                           "continue_final_message); else a rollback sends a fresh request")
    ops = p.add_argument_group("operations (docs/deployment.md)")
    ops.add_argument("--audit", default=None, metavar="DB",
                     help="write every decision to an audit database: a SQLite file path or a postgresql:// URL "
                          "(needs the audit extra); text only with --log-content")
    ops.add_argument("--no-metrics", dest="metrics", action="store_false", help="do not serve /metrics")
    ops.add_argument("--metrics-public", action="store_true",
                     help="serve /metrics without an API key even when the server has keys (a private scrape port)")
    ops.add_argument("--log-format", choices=("text", "json"), default="text",
                     help="log lines as text or as JSON objects (each with its request id)")
    ops.add_argument("--drain-timeout", type=positive_float, default=30.0, metavar="SECONDS",
                     help="on SIGTERM, how long requests in flight may finish before open streams are ended")
    p.set_defaults(func=run_serve)


# what `serve` takes from a --policy file: the guard's policy, debounce and moderate_thinking (load_guard),
# the refusal text, and the limits and leak_control keys (`policy_settings`)
SERVE_POLICY_KEYS = frozenset({"mode", "default_action", "actions", "block_threshold", "debounce",
                               "moderate_thinking", "refusal_message", "limits.max_sessions", "limits.max_context",
                               "limits.max_request_bytes", "limits.session_idle_timeout_s",
                               *(f"leak_control.{k}" for k in ("hold_tokens", "on_unsafe", "buffer_tokens",
                                                               "max_retries", "intervention"))})
# a policy file's limits -> (the serve option's attribute, the ServeSettings field it sets)
POLICY_LIMITS = {"max_sessions": ("max_concurrency", "max_concurrency"), "max_context": ("max_context", "max_context"),
                 "max_request_bytes": ("max_request_bytes", "max_request_bytes"),
                 "session_idle_timeout_s": ("stream_idle_timeout", "stream_idle_timeout_s")}


def policy_settings(args: argparse.Namespace) -> dict:
    """The ServeSettings fields the --policy file sets: its limits where the matching option was left at
    its default (an option given on the command line is this run's choice and wins), its leak_control keys
    where no leak option was given, and its version (the audit log's policy_version)."""
    pf = policy_file(args)
    if pf is None:
        return {}
    from qguard.serve import ServeSettings

    out: dict = {"policy_version": pf.version}
    for key, (attr, field) in POLICY_LIMITS.items():
        value = getattr(pf.limits, key)
        if value is not None and getattr(args, attr) == getattr(ServeSettings, field):
            setattr(args, attr, value)  # run_serve's own checks (max_context) see the file's value too
            out[field] = value
    for key, value in pf.leak_control.model_dump().items():
        if value is not None and getattr(args, key, None) is None:
            out[key] = value
    return out


def policy_refusal(args: argparse.Namespace) -> str | None:
    """--refusal, else the --policy file's refusal_message; a warning names the file's keys serve ignores."""
    pf = policy_file(args)
    if pf is None:
        return args.refusal
    ignored = sorted(pf.keys_set() - SERVE_POLICY_KEYS)
    if ignored:
        log.warning("policy file %s: qguard serve does not apply %s yet (use the matching serve options)",
                    pf.path, ", ".join(ignored))
    return args.refusal or pf.refusal_message


def non_negative_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return n


def leak_settings(args: argparse.Namespace) -> dict:
    """The ServeSettings fields of the leak-control options given (the rest keep their defaults)."""
    given = {"hold_tokens": args.hold_tokens, "on_unsafe": args.on_unsafe, "buffer_tokens": args.buffer_tokens,
             "max_retries": args.max_retries, "intervention": args.intervention}
    if args.intervention is not None and not args.intervention.strip():
        raise InputError("--intervention is empty; use nudge, introspect or the text to insert")
    out = {k: v for k, v in given.items() if v is not None}
    if args.upstream_continuation:
        out["upstream_continuation"] = True
    return out


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from qguard.serve import ServeSettings, ops

    if args.max_context < 16:
        raise InputError("--max-context must be at least 16 tokens")
    keys = os.environ.get(args.api_keys_env)
    if not keys and args.host not in LOCAL_HOSTS:
        raise InputError(f"refusing to serve on {args.host} without API keys: set ${args.api_keys_env}")
    refusal = policy_refusal(args)
    from_file = policy_settings(args)
    settings = ServeSettings(
        api_keys=frozenset(k.strip() for k in keys.split(",") if k.strip()) if keys else None,
        upstream_url=args.upstream, upstream_api_key=os.environ.get(args.upstream_key_env),
        max_concurrency=args.max_concurrency, max_context=args.max_context, log_content=args.log_content,
        stream_idle_timeout_s=args.stream_idle_timeout,
        upstream_timeout_s=args.upstream_timeout, keepalive_s=args.keepalive,
        max_request_bytes=args.max_request_bytes, max_upstream_line_bytes=args.max_upstream_line_bytes, docs=args.docs,
        playground=args.host in LOCAL_HOSTS if args.playground is None else args.playground,
        audit=args.audit, metrics=args.metrics, metrics_public=args.metrics_public, warmup=True,
        drain_on_sigterm=True, drain_timeout_s=args.drain_timeout,
        **({"refusal_message": refusal} if refusal else {}),
        **leak_settings(args),
        **{k: v for k, v in from_file.items() if k not in ("max_concurrency", "max_context", "max_request_bytes",
                                                             "stream_idle_timeout_s")},  # (set on args above)
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
    ops.configure_logging(args.log_format)
    app = audited_app(guard, settings)
    # log_config=None: uvicorn's lines go through the root handlers `configure_logging` set (request ids)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", log_config=None)
    if app.state.drain.draining:
        # drained on SIGTERM and its lifespan closed everything (audit log flushed, engine closed): a
        # worker thread still finishing (the engine's last step, a threadpool call) must not hold the
        # exit past the drain's deadline, as interpreter shutdown joining them would
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def audited_app(guard, settings):
    """`create_app`, with a bad --audit database as a clear error (not a traceback)."""
    from qguard.serve import create_app

    try:
        return create_app(guard, settings)
    except ImportError as e:
        raise InputError(f"--audit needs the audit extra (pip install 'qguard[audit]'): {e}") from None
    except QGuardError as e:
        raise InputError(f"--audit {settings.audit}: {e}") from None
