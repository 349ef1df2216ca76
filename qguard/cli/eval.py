"""`qguard eval` (measure a checkpoint on eval files) and `qguard eval-report` (compare runs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qguard.cli import (
    add_model_args,
    calibration_arg,
    model_name,
    model_source,
    output_dir,
    output_file,
    positive_int,
)

SUITE_CHOICES = ("english-prompt", "english-response", "multilingual", "chinese", "stream", "all")


def register(sub) -> None:
    p = sub.add_parser("eval", help="measure a checkpoint on eval JSONL files (tech-report metrics)")
    add_model_args(p, mode=False)  # every benchmark is scored in both modes
    p.add_argument("--data", required=True, help="directory of canonical *.jsonl eval files, or one file")
    # suites are checked by qguard.eval.suites so an unknown one gets the same clear error from the API
    p.add_argument("--suite", default="all", metavar="{" + ",".join(SUITE_CHOICES) + "}",
                   help="which benchmarks to run (default: all files in --data)")
    p.add_argument("--out", required=True, help="output directory (results.json, predictions.jsonl, report.md, PNGs)")
    p.add_argument("--limit", "--max-per-benchmark", dest="limit", type=positive_int, default=None,
                   help="at most N rows per benchmark, evenly spaced over the file (quick runs)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="conversations per engine call (default 16)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128,
                   help="Gen answer budget (default 128, as the official eval)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run_eval_cmd)

    r = sub.add_parser("eval-report", help="one report.md comparing several `qguard eval` runs")
    r.add_argument("runs", nargs="+", help="output directories (or results.json files) of `qguard eval`")
    r.add_argument("--out", required=True, help="file to write the markdown report to")
    r.set_defaults(func=run_report_cmd)


def run_eval_cmd(args: argparse.Namespace) -> int:
    from qguard.eval.report import write_outputs
    from qguard.eval.runner import EvalConfig, load_data, run_eval
    from qguard.runtime.guard import Guard

    out = output_dir(args.out, "--out")  # created now: a bad path fails before the run, not after
    cfg = EvalConfig(data=Path(args.data), suite=args.suite, limit=args.limit, batch_size=args.batch_size,
                     progress=not args.quiet)
    data = load_data(cfg)  # a bad --data, --suite or JSONL line fails before the model loads
    with model_source(args):
        guard = Guard.from_pretrained(model_name(args), device=args.device, dtype=args.dtype,
                                      max_new_tokens=args.max_new_tokens, calibration=calibration_arg(args),
                                      quantize=args.quantize, official_special_tokens=args.official_special_tokens)
    rows, results = run_eval(guard, cfg, data)
    written = write_outputs(out, rows, results, plots=not args.no_plots)
    _print_summary(results)
    print(f"wrote {', '.join(p.name for p in written)} to {out}", file=sys.stderr)
    return 0


def _print_summary(results: dict) -> None:
    for suite, s in results["suites"].items():
        avg = s["average"]["best"]
        print(f"{suite}: avg {'-' if avg is None else f'{avg:.1f}'} over {len(s['averaged'])} benchmark(s)")
    lat = results.get("latency")
    if lat:
        print(f"stream latency: exact hit {lat['exact_hit']}%, within 128 tokens {lat['within_128']}%")


def run_report_cmd(args: argparse.Namespace) -> int:
    from qguard.eval.report import load_results, render_report

    out = output_file(args.out, "--out")
    results = [load_results(Path(p)) for p in args.runs]
    out.write_text(render_report(results), "utf-8")
    print(f"wrote {out}", file=sys.stderr)
    return 0
