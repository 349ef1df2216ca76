"""`qguard annotate`: label a JSONL / CSV / Parquet dataset with a Gen (or Stream) guard, resumably."""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

from qguard.backends import BACKENDS
from qguard.cli import (
    add_model_args,
    calibration_arg,
    cli_policy,
    model_name,
    model_source,
    policy_file,
    positive_int,
)
from qguard.errors import InputError


def register(sub) -> None:
    p = sub.add_parser("annotate", help="add a `guard` object to every row of a JSONL/JSON/CSV/Parquet file "
                                        "(resumable: re-run the same command to continue)")
    add_model_args(p)
    p.add_argument("input", help="input file (.jsonl, .json: an array or JSON Lines, .csv or .parquet); with --ray "
                                 "also a folder of such files")
    p.add_argument("-o", "--output", required=True,
                   help="output file; its extension picks the format (with --ray: a folder of Parquet parts, or JSONL "
                        "parts when its name ends in .jsonl, plus _manifest.jsonl and _errors.jsonl)")
    p.add_argument("--messages-field",
                   help="field holding a list of {role, content}, the last of which is judged (default: each row's "
                        "`messages` or `conversation` list, else its `prompt` and `response` fields; a row with "
                        "both a list and prompt/response is read from the list)")
    p.add_argument("--prompt-field", help="field holding the user prompt (instead of --messages-field)")
    p.add_argument("--response-field", help="with --prompt-field: field holding the assistant response to judge")
    p.add_argument("--filter", choices=["safe", "unsafe"],
                   help="keep only rows judged safe / unsafe under --mode")
    p.add_argument("--batch-size", type=positive_int, default=64, help="rows per engine call and per checkpoint write")
    p.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="torch: qguard's engine (default); vllm: vLLM on GPU (pip install 'qguard[vllm]')")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="answer budget of Gen models (default 64: room for the longest well-formed answer)")
    p.add_argument("--restart", action="store_true", help="discard a partial run of OUTPUT and start over")
    ray = p.add_argument_group("scale-out on Ray (docs/ray.md; pip install 'qguard[ray]')")
    ray.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="judge the rows on a Ray cluster, exactly once across failures: the cluster at ADDRESS "
                          "(HOST:PORT, ray://HOST:PORT or auto), or without ADDRESS $RAY_ADDRESS, else a new local one")
    ray.add_argument("--actors", type=positive_int, default=None,
                     help="actors, each holding one guard (default: one per GPU of the cluster, else one per CPU)")
    ray.add_argument("--gpus-per-actor", type=non_negative_float, default=None,
                     help="default: 1 when the cluster has GPUs, else 0 (CPU actors); 0.5 puts two actors on a GPU")
    ray.add_argument("--shard-rows", type=positive_int, default=1024,
                     help="rows per shard: the unit of work, commit and retry (default 1024)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    p.set_defaults(func=run_annotate)


def load_classifier(args: argparse.Namespace):
    name = model_name(args)
    budget = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
    policy, pf = cli_policy(args), policy_file(args)  # a bad --policy file fails before the model loads
    with model_source(args):
        if args.backend == "vllm":
            from qguard.backends.vllm import VLLMGenBackend

            if args.quantize:
                raise InputError("--quantize is a CPU option of the torch backend; vLLM runs the checkpoint's weights")

            backend = VLLMGenBackend.from_pretrained(name, mode=policy.mode, **budget,
                                                     calibration=calibration_arg(args),
                                                     official_special_tokens=args.official_special_tokens)
            backend.policy = policy  # its verdicts are read under it (actions, threshold too)
            return backend
        from qguard.runtime.guard import Guard

        return Guard.from_pretrained(name, device=args.device, dtype=args.dtype, policy=policy,
                                     calibration=calibration_arg(args), quantize=args.quantize,
                                     official_special_tokens=args.official_special_tokens, **budget,
                                     **(pf.guard_options() if pf is not None else {}))


def non_negative_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return x


def run_annotate(args: argparse.Namespace) -> int:
    from qguard.annotate import FieldMap, annotate

    fields = FieldMap(args.messages_field, args.prompt_field, args.response_field)
    if args.ray is not None:
        summary = run_ray(args, fields)
    else:
        for flag, value, default in (("--actors", args.actors, None), ("--gpus-per-actor", args.gpus_per_actor, None),
                                     ("--shard-rows", args.shard_rows, 1024)):
            if value != default:
                raise InputError(f"{flag} is an option of --ray runs")
        summary = annotate(load_classifier(args), args.input, args.output, fields=fields, mode=cli_policy(args).mode,
                           filter=args.filter, batch_size=args.batch_size, restart=args.restart,
                           progress=not args.no_progress)
    if args.json:
        print(json.dumps(summary.to_dict()))
    else:
        labels = ", ".join(f"{k} {v}" for k, v in sorted(summary.labels.items())) or "none"
        msg = f"annotated {summary.rows} rows ({labels}); wrote {summary.written} to {summary.output}"
        if getattr(summary, "shards", 0):
            msg += f" in {summary.shards} shards"
            if summary.resumed_shards:
                msg += f" (resumed: {summary.resumed_shards} shards, {summary.resumed_from} rows, were committed)"
        elif summary.resumed_from:
            msg += f" (resumed after row {summary.resumed_from})"
        print(msg, file=sys.stderr)
        if getattr(summary, "categories", None):
            print("categories: " + ", ".join(f"{k} {v}" for k, v in summary.categories.items()), file=sys.stderr)
        if summary.errors:
            shown = ", ".join(map(str, summary.error_rows)) + (", ..." if summary.errors > len(summary.error_rows) else "")
            print(f"{summary.errors} bad rows (rows {shown}); reasons in {summary.errors_file}", file=sys.stderr)
    if summary.all_failed:  # nothing was judged: almost surely the wrong file or field names, not a result
        reasons = "; ".join(f"{n} x {why}" for why, n in summary.error_reasons.items())
        raise InputError(f"every one of the {summary.rows} rows failed, nothing was judged ({reasons}); "
                         f"see {summary.errors_file}")
    return 0


def run_ray(args: argparse.Namespace, fields):
    """`annotate --ray`: each actor builds the classifier this command would (`load_classifier`)."""
    from qguard.annotate_ray import annotate_ray, check_model

    if args.device is not None and args.device != "cpu":
        raise InputError("--device with --ray: leave it out (an actor uses the GPU Ray gives it, else the CPU) or "
                         "pass --device cpu")
    opts = {k: v for k, v in vars(args).items() if k != "func"}
    with model_source(args):
        opts["model"] = model_name(args)  # resolved here: $QGUARD_MODEL may not be set where the actors run
    for key in ("model", "policy", "calibration"):  # actors may run in another folder (or on another node)
        if isinstance(opts.get(key), str) and opts[key] != "none" and Path(opts[key]).exists():
            opts[key] = str(Path(opts[key]).resolve())
    check_model(opts["model"])  # before Ray starts: an actor would only fail after its start
    gpus = 0.0 if args.device == "cpu" else args.gpus_per_actor
    return annotate_ray(partial(load_classifier, argparse.Namespace(**opts)), args.input, args.output,
                        fields=fields, mode=cli_policy(args).mode, filter=args.filter, batch_size=args.batch_size,
                        shard_rows=args.shard_rows, actors=args.actors, gpus_per_actor=gpus,
                        address=args.ray or None, restart=args.restart, progress=not args.no_progress,
                        name=opts["model"])
