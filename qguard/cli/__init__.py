"""`qguard` command line. Each module in this package adds one subcommand through `register(sub)`."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys

from qguard.errors import QGuardError

MODEL_ENV = "QGUARD_MODEL"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help=f"checkpoint directory or hub id (default: ${MODEL_ENV}, else the embedded starter model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--mode", default="strict", choices=["strict", "loose"],
                   help="strict: Controversial counts as Unsafe; loose: as Safe")
    p.add_argument("--calibration", default=None, metavar="FILE|none",
                   help="temperatures from `qguard calibrate` (default: the checkpoint's qguard_calibration.json "
                        "if it has one; 'none': raw probabilities). Labels never change, only probabilities.")


def calibration_arg(args: argparse.Namespace):
    """--calibration as `Guard.from_pretrained` takes it: None (the checkpoint's own), False, or a path."""
    value = getattr(args, "calibration", None)
    return False if value == "none" else value


def model_name(args: argparse.Namespace) -> str:
    name = args.model or os.environ.get(MODEL_ENV)
    if name:
        return name
    from qguard.starter import starter_model_path  # the embedded model, when the package ships one

    path = starter_model_path()
    if path is None:
        raise QGuardError(f"no model given: pass --model DIR_OR_HUB_ID or set ${MODEL_ENV}")
    return str(path)


def load_guard(args: argparse.Namespace):
    from qguard.guard import Guard

    return Guard.from_pretrained(model_name(args), device=args.device, dtype=args.dtype, mode=args.mode,
                                 calibration=calibration_arg(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qguard", description="Qwen3Guard safety moderation")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        importlib.import_module(f"{__name__}.{mod}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except QGuardError as e:
        print(f"qguard: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qguard: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
