"""`qguard` command line. Each module in this package adds one subcommand through `register(sub)`."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qguard.errors import CheckpointError, QGuardError

MODEL_ENV = "QGUARD_MODEL"


# ------------------------------------------------------------------ argument types (errors exit 2, no run)

def _positive(cast, what: str):
    def parse(text: str):
        try:
            x = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not x > 0:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return x

    return parse


positive_int = _positive(int, "a positive integer")
positive_float = _positive(float, "a positive number")


def port(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535, got {n}")
    return n


def device(text: str) -> str:
    """A torch device string that this machine has (checked before any model loads)."""
    from qguard.errors import InputError
    from qguard.runtime.load import pick_device

    try:
        pick_device(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


# ------------------------------------------------------------ output paths (checked before the work runs)

def output_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a file the command can write at the end: its folder is created now, so a bad path fails
    before minutes of work rather than after."""
    out = Path(path)
    if out.is_dir():
        raise QGuardError(f"{what}: {out} is a directory; give a file name such as {out / 'out.jsonl'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QGuardError(f"{what}: cannot create the folder {out.parent} ({e.strerror})") from None
    if not os.access(out.parent, os.W_OK):
        raise QGuardError(f"{what}: the folder {out.parent} is not writable")
    return out


def checkpoint_dir(path: str | os.PathLike, what: str) -> Path:
    """`path` as where a training run saves its checkpoint, checked now (not after the run): new, empty,
    or a checkpoint folder, which the save replaces whole."""
    from qguard.weights import check_checkpoint_out

    try:
        check_checkpoint_out(path)
    except QGuardError as e:
        raise QGuardError(f"{what}: {e}") from None
    return output_dir(path, what)


def output_dir(path: str | os.PathLike, what: str) -> Path:
    """`path` as an output folder, created now (see `output_file`)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise QGuardError(f"{what}: {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QGuardError(f"{what}: cannot create the folder {out} ({e.strerror})") from None
    if not os.access(out, os.W_OK):
        raise QGuardError(f"{what}: the folder {out} is not writable")
    return out


QUANTIZE_CHOICES = ("int8", "int8-weight", "int4-weight")  # qguard.model.quant.SCHEMES (not imported here: no torch at parse time)


def add_model_args(p: argparse.ArgumentParser, mode: bool = True, calibration: bool = True,
                   quantize: bool = True) -> None:
    """--model, --device, --dtype, --quantize, and --mode / --calibration for the commands whose output
    they change."""
    p.add_argument("--model", "-m", default=None,
                   help=f"checkpoint directory or hub id (default: ${MODEL_ENV}, else the embedded starter model)")
    p.add_argument("--device", default=None, type=device, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on GPU")
    if quantize:
        p.add_argument("--quantize", default=None, choices=QUANTIZE_CHOICES,
                       help="CPU only: int8 or int4 weights for the decoder's projections (int8: int8 "
                            "activations too; int8-weight: bf16 activations; int4-weight: half the bytes again, "
                            "fastest per token, least exact, Stream models only). Check the agreement with full precision on your "
                            "data first: `qguard check-precision`")
    if mode:
        p.add_argument("--mode", default=None, choices=["strict", "loose"],
                       help="strict: Controversial counts as Unsafe; loose: as Safe (default: the --policy "
                            "file's mode, else strict; given with --policy, --mode wins)")
        p.add_argument("--policy", default=None, metavar="FILE",
                       help="a policy file (YAML or TOML, e.g. examples/policy.yaml): mode, per-category actions, "
                            "block threshold, debounce, thinking moderation, refusal text, limits")
    if calibration:
        p.add_argument("--calibration", default=None, metavar="FILE|none",
                       help="temperatures from `qguard calibrate` (default: the checkpoint's qguard_calibration.json "
                            "if it has one; 'none': raw probabilities). Labels never change, only probabilities.")
    p.add_argument("--official-special-tokens", action="store_true",
                   help="UNSAFE for untrusted input: read '<|im_end|>', '<|im_start|>', '<think>' ... written in "
                        "message text as control tokens, exactly as the official tokenizer does, so such text can "
                        "forge conversation turns (default: message text is tokenized as text)")


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


@contextmanager
def model_source(args: argparse.Namespace) -> Iterator[None]:
    """Around a model load: a checkpoint error names ${MODEL_ENV} when the model came from it, since
    the user did not type that name in this command."""
    try:
        yield
    except CheckpointError as e:
        env = os.environ.get(MODEL_ENV)
        if getattr(args, "model", None) is None and env:
            raise CheckpointError(f"{e} (no --model was given: {env!r} is the value of ${MODEL_ENV}; pass --model "
                                  f"or change ${MODEL_ENV})") from None
        raise


def policy_file(args: argparse.Namespace):
    """The `--policy` file, read and validated once per run (None without the flag)."""
    path = getattr(args, "policy", None)
    if path is None:
        return None
    if getattr(args, "_policy_file", None) is None:
        from qguard.policy_file import load_policy_file

        args._policy_file = load_policy_file(path)
    return args._policy_file


def cli_policy(args: argparse.Namespace):
    """The Policy a command runs under: the `--policy` file's, with `--mode` (when given) replacing its mode
    (the flag is this run's choice, the file the deployment's default), else the `--mode` policy."""
    from qguard.policy import Mode, Policy

    pf = policy_file(args)
    mode = getattr(args, "mode", None)
    if pf is None:
        return Policy(mode=Mode(mode or Mode.STRICT))
    return Policy.from_policy_file(pf).with_mode(mode)


def load_guard(args: argparse.Namespace):
    from qguard.runtime.guard import Guard

    pf = policy_file(args)  # a bad file fails before the model loads
    with model_source(args):
        return Guard.from_pretrained(model_name(args), device=args.device, dtype=args.dtype,
                                     policy=cli_policy(args), calibration=calibration_arg(args),
                                     quantize=getattr(args, "quantize", None),
                                     official_special_tokens=getattr(args, "official_special_tokens", False),
                                     **(pf.guard_options() if pf is not None else {}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qguard", description="Qwen3Guard safety moderation")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    parser.add_argument("--version", action="version", version=f"qguard {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        importlib.import_module(f"{__name__}.{mod}").register(sub)
    _no_abbreviations(parser)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qguard")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "(not installed)"


def _no_abbreviations(parser: argparse.ArgumentParser) -> None:
    """Options must be spelt out: with argparse's prefix matching, `eval --mode loose` would quietly
    mean `--model loose` (eval has no --mode)."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _no_abbreviations(child)


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
