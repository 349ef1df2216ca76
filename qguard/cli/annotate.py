"""`qguard annotate`: label a JSONL / CSV / Parquet dataset with a Gen (or Stream) guard, resumably."""

from __future__ import annotations

import argparse
import json
import sys

from qguard.cli import add_model_args, calibration_arg, model_name, model_source, positive_int
from qguard.errors import InputError


def register(sub) -> None:
    p = sub.add_parser("annotate", help="add a `guard` object to every row of a JSONL/JSON/CSV/Parquet file "
                                        "(resumable: re-run the same command to continue)")
    add_model_args(p)
    p.add_argument("input", help="input file (.jsonl, .json: an array or JSON Lines, .csv or .parquet)")
    p.add_argument("-o", "--output", required=True, help="output file; its extension picks the format")
    p.add_argument("--messages-field",
                   help="field holding a list of {role, content}, the last of which is judged (default: each row's "
                        "`messages` or `conversation` list, else its `prompt` and `response` fields; a row with "
                        "both a list and prompt/response is read from the list)")
    p.add_argument("--prompt-field", help="field holding the user prompt (instead of --messages-field)")
    p.add_argument("--response-field", help="with --prompt-field: field holding the assistant response to judge")
    p.add_argument("--filter", choices=["safe", "unsafe"],
                   help="keep only rows judged safe / unsafe under --mode")
    p.add_argument("--batch-size", type=positive_int, default=64, help="rows per engine call and per checkpoint write")
    p.add_argument("--backend", choices=["torch", "vllm"], default="torch",
                   help="torch: qguard's engine (default); vllm: vLLM on GPU (pip install 'qguard[vllm]')")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="answer budget of Gen models (default 64: room for the longest well-formed answer)")
    p.add_argument("--restart", action="store_true", help="discard a partial run of OUTPUT and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    p.set_defaults(func=run_annotate)


def load_classifier(args: argparse.Namespace):
    name = model_name(args)
    budget = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
    with model_source(args):
        if args.backend == "vllm":
            from qguard.backends.vllm import VLLMGenBackend

            if args.quantize:
                raise InputError("--quantize is a CPU option of the torch backend; vLLM runs the checkpoint's weights")

            return VLLMGenBackend.from_pretrained(name, mode=args.mode, **budget,
                                                  calibration=calibration_arg(args),
                                                  official_special_tokens=args.official_special_tokens)
        from qguard.guard import Guard

        return Guard.from_pretrained(name, device=args.device, dtype=args.dtype, mode=args.mode,
                                     calibration=calibration_arg(args), quantize=args.quantize,
                                     official_special_tokens=args.official_special_tokens, **budget)


def run_annotate(args: argparse.Namespace) -> int:
    from qguard.annotate import FieldMap, annotate

    fields = FieldMap(args.messages_field, args.prompt_field, args.response_field)
    summary = annotate(load_classifier(args), args.input, args.output, fields=fields, mode=args.mode,
                       filter=args.filter, batch_size=args.batch_size, restart=args.restart,
                       progress=not args.no_progress)
    if args.json:
        print(json.dumps(summary.to_dict()))
    else:
        labels = ", ".join(f"{k} {v}" for k, v in sorted(summary.labels.items())) or "none"
        msg = f"annotated {summary.rows} rows ({labels}); wrote {summary.written} to {summary.output}"
        if summary.resumed_from:
            msg += f" (resumed after row {summary.resumed_from})"
        print(msg, file=sys.stderr)
        if summary.errors:
            shown = ", ".join(map(str, summary.error_rows)) + (", ..." if summary.errors > len(summary.error_rows) else "")
            print(f"{summary.errors} bad rows (rows {shown}); reasons in {summary.errors_file}", file=sys.stderr)
    if summary.all_failed:  # nothing was judged: almost surely the wrong file or field names, not a result
        reasons = "; ".join(f"{n} x {why}" for why, n in summary.error_reasons.items())
        raise InputError(f"every one of the {summary.rows} rows failed, nothing was judged ({reasons}); "
                         f"see {summary.errors_file}")
    return 0
