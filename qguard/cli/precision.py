"""`qguard check-precision`: the same rows at full precision and at a reduced one, and how far apart they are.

Reduced precision (bf16, int8 weights: `qguard.model.quant`) changes a guard's probabilities a little and
can flip a label where two classes are close. Measured agreement for the embedded starter and for random
weights is in docs/benchmarks.md; it says nothing about another checkpoint, so users of the official
weights run this on their own data before they switch.

What is compared, per benchmark file and over all rows (reference = float32, no quantization, same device):
- `label_agreement`: the same severity (Safe / Unsafe / Controversial); `binary_agreement`: the same strict
  verdict (Unsafe or Controversial vs Safe); `category_agreement`: the same categories;
  `refusal_agreement` (Gen responses);
- `unsafe_position_agreement` (Stream responses): the same debounced position where the response became
  unsafe (or both never), which is where a live stream would be cut off;
- `prob_max_diff` / `prob_mean_diff`: |p_reference - p_reduced| of the verdict's severity probabilities,
  max over classes, then max / mean over rows; Stream responses also per moderated token
  (`token_label_agreement`, `token_prob_max_diff`, `token_prob_mean_diff`).
Rows the model cannot take (e.g. longer than its context) are counted in `errors` and left out.
The two models run one after the other (one in memory at a time).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from qguard.cli import add_model_args, calibration_arg, model_name, model_source, output_file, positive_int
from qguard.errors import InputError

SEVERITIES = ("Safe", "Unsafe", "Controversial")


def register(sub) -> None:
    p = sub.add_parser("check-precision",
                       help="run the same rows at full precision and at --dtype/--quantize; report label, "
                            "unsafe-position and probability agreement")
    add_model_args(p, mode=False)
    p.add_argument("--data", nargs="+", required=True,
                   help="JSONL files or folders of *.jsonl in the canonical row schema (one task per file)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="at most N rows per file, evenly spaced over it (quick runs)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="conversations per engine call (default 16)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="Gen answer budget (default 64: room for the longest well-formed answer)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--out", default=None, help="also write the JSON report to this file")
    p.set_defaults(func=run_check_precision)


# --------------------------------------------------------------------------------------------- records

@dataclass
class RowResult:
    """What one model said about one row (plain values: the model can be freed before the next pass)."""

    error: str | None = None  # the row was rejected (InputError), not judged
    label: str = ""
    binary: str = ""
    categories: tuple[str, ...] = ()
    refusal: bool | None = None
    answer_error: bool = False  # Gen: the answer could not be parsed
    probs: tuple[float, ...] | None = None  # severity probabilities in SEVERITIES order
    unsafe_position: int | None = None
    token_labels: list[str] = field(default_factory=list)  # Stream responses: each moderated token
    token_probs: list[tuple[float, ...]] = field(default_factory=list)


def _severity(probs: dict[str, float] | None) -> tuple[float, ...] | None:
    return None if probs is None else tuple(float(probs.get(k, 0.0)) for k in SEVERITIES)


def _from_verdict(v, **extra) -> RowResult:
    return RowResult(label=v.label.value, binary=v.binary.value, categories=tuple(c.value for c in v.categories),
                     refusal=v.refusal, answer_error=v.error is not None, probs=_severity(v.probs),
                     unsafe_position=v.unsafe_position, **extra)


def judge_rows(guard, samples: Sequence, batch_size: int = 16) -> list[RowResult]:
    """One model's results for rows of one task. Stream responses go through `stream_trace` (the verdict
    and every moderated token's probabilities from one forward); everything else through batched
    `classify_conversations`."""
    out: list[RowResult] = []
    if guard.live and samples and samples[0].task == "response":
        for s in samples:
            try:
                t = guard.stream_trace(s.messages)
            except InputError as e:
                out.append(RowResult(error=str(e)))
                continue
            out.append(_from_verdict(t.response, token_labels=[tv.label.value for tv in t.tokens],
                                     token_probs=[_severity(tv.probs) for tv in t.tokens]))
        return out
    for a in range(0, len(samples), batch_size):
        batch = samples[a:a + batch_size]
        for v in guard.classify_conversations([s.messages for s in batch], return_errors=True):
            out.append(RowResult(error=str(v)) if isinstance(v, InputError) else _from_verdict(v))
    return out


# --------------------------------------------------------------------------------------------- compare

def _rate(n: int, d: int) -> float | None:
    return None if d == 0 else round(n / d, 6)


def agreement(ref: Sequence[RowResult], red: Sequence[RowResult], task: str, stream: bool) -> dict[str, Any]:
    """The agreement statistics of two models' results on the same rows (see the module docstring)."""
    pairs = [(a, b) for a, b in zip(ref, red) if a.error is None and b.error is None]
    error_mismatch = sum((a.error is None) != (b.error is None) for a, b in zip(ref, red))
    n = len(pairs)
    stats: dict[str, Any] = {
        "task": task, "rows": len(ref), "compared": n, "errors": len(ref) - n - error_mismatch,
        "error_mismatch": error_mismatch,
        "label_agreement": _rate(sum(a.label == b.label and a.answer_error == b.answer_error for a, b in pairs), n),
        "binary_agreement": _rate(sum(a.binary == b.binary for a, b in pairs), n),
        "category_agreement": _rate(sum(a.categories == b.categories for a, b in pairs), n),
        "label_flips": _flips(pairs),
    }
    if not stream and task == "response":
        stats["refusal_agreement"] = _rate(sum(a.refusal == b.refusal for a, b in pairs), n)
    diffs = [max(abs(x - y) for x, y in zip(a.probs, b.probs)) for a, b in pairs
             if a.probs is not None and b.probs is not None]
    stats["prob_max_diff"] = round(max(diffs), 6) if diffs else None
    stats["prob_mean_diff"] = round(sum(diffs) / len(diffs), 6) if diffs else None
    if stream and task == "response":
        stats["unsafe_position_agreement"] = _rate(sum(a.unsafe_position == b.unsafe_position for a, b in pairs), n)
        stats["flagged_reference"] = sum(a.unsafe_position is not None for a, _ in pairs)
        stats["flagged_reduced"] = sum(b.unsafe_position is not None for _, b in pairs)
        tok_same = tok_n = 0
        tok_max = tok_sum = 0.0
        for a, b in pairs:
            for la, lb, pa, pb in zip(a.token_labels, b.token_labels, a.token_probs, b.token_probs):
                tok_n += 1
                tok_same += la == lb
                d = max(abs(x - y) for x, y in zip(pa, pb))
                tok_max, tok_sum = max(tok_max, d), tok_sum + d
        stats["tokens"] = tok_n
        stats["token_label_agreement"] = _rate(tok_same, tok_n)
        stats["token_prob_max_diff"] = round(tok_max, 6) if tok_n else None
        stats["token_prob_mean_diff"] = round(tok_sum / tok_n, 6) if tok_n else None
    return stats


def _flips(pairs) -> dict[str, int]:
    """"reference->reduced" label changes and how often, e.g. {"Safe->Unsafe": 2}."""
    out: dict[str, int] = {}
    for a, b in pairs:
        if a.label != b.label:
            key = f"{a.label}->{b.label}"
            out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def _overall(per: dict[str, dict[str, Any]], results: dict[str, tuple[list, list, str]], stream: bool) -> dict:
    """All rows together: agreement over the pooled rows of each task, then over both tasks."""
    ref = [r for a, _, _ in results.values() for r in a]
    red = [r for _, b, _ in results.values() for r in b]
    total = agreement(ref, red, "all", stream=False)
    responses = [(a, b) for a, b, task in results.values() if task == "response"]
    if stream and responses:
        resp = agreement([r for a, _ in responses for r in a], [r for _, b in responses for r in b], "response", True)
        for k in ("unsafe_position_agreement", "flagged_reference", "flagged_reduced", "tokens",
                  "token_label_agreement", "token_prob_max_diff", "token_prob_mean_diff"):
            total[k] = resp[k]
    total["benchmarks"] = len(per)
    return total


def compare_precision(name: str, benchmarks: dict[str, list], *, dtype: str | None, quantize: str | None,
                      device: str | None = None, calibration=None, batch_size: int = 16,
                      max_new_tokens: int | None = None, log=None) -> dict[str, Any]:
    """Run `benchmarks` ({name: rows of one task}) with the float32 model, then with the reduced one."""
    return compare_precisions(name, benchmarks, [(dtype, quantize)], device=device, calibration=calibration,
                              batch_size=batch_size, max_new_tokens=max_new_tokens, log=log)[0]


def compare_precisions(name: str, benchmarks: dict[str, list], variants: Sequence[tuple[str | None, str | None]], *,
                       device: str | None = None, calibration=None, batch_size: int = 16,
                       max_new_tokens: int | None = None, log=None) -> list[dict[str, Any]]:
    """One report per (dtype, quantize) variant against one float32 reference pass (models load one at a
    time). Every variant is checked before any model runs."""
    import torch

    from qguard.model.quant import check_quantize
    from qguard.runtime.guard import Guard
    from qguard.runtime.load import pick_device, resolve_dtype

    dev = pick_device(device)
    todo = []
    for dtype, quantize in variants:
        dt, quant = resolve_dtype(dtype, dev), check_quantize(quantize, dev)
        if dt == torch.float32 and quant is None:
            raise InputError("nothing to compare: the reduced model would be float32 without quantization; give "
                             "--dtype bfloat16 (or float16) and/or --quantize int8")
        todo.append((dt, quant))
    budget = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}

    def run(dt, q) -> tuple[list[list[RowResult]], float, Any, bool]:
        guard = Guard.from_pretrained(name, device=dev, dtype=dt, quantize=q, calibration=calibration, **budget)
        t0 = time.perf_counter()
        out = []
        for bench, samples in benchmarks.items():
            if log:
                log(f"{str(dt).removeprefix('torch.')}{', ' + q if q else ''}: {bench}, {len(samples)} rows")
            out.append(judge_rows(guard, samples, batch_size))
        kind, live = guard.kind, guard.live
        del guard
        gc.collect()
        return out, time.perf_counter() - t0, kind, live

    ref, ref_wall, kind, stream = run(torch.float32, None)
    reports = []
    for dt, q in todo:
        red, red_wall, _, _ = run(dt, q)
        results = {b: (ref[i], red[i], samples[0].task) for i, (b, samples) in enumerate(benchmarks.items())}
        per = {b: agreement(a, r, task, stream) for b, (a, r, task) in results.items()}
        reports.append({
            "model": str(name), "kind": kind.value, "device": str(dev),
            "reference": {"dtype": "float32", "quantize": None},
            "reduced": {"dtype": str(dt).removeprefix("torch."), "quantize": q},
            "benchmarks": per, "overall": _overall(per, results, stream),
            "wall_s": {"reference": round(ref_wall, 2), "reduced": round(red_wall, 2)},
        })
    return reports


# --------------------------------------------------------------------------------------------- command

def read_data(paths: Sequence[str], limit: int | None) -> dict[str, list]:
    """{benchmark: rows} from files and folders of canonical JSONL (every row checked now)."""
    from qguard.eval.data import find_files, read_benchmark, subsample

    benchmarks: dict[str, list] = {}
    for p in paths:
        for bench, f in find_files(Path(p)).items():
            if bench in benchmarks:
                raise InputError(f"--data: two files are named {bench}.jsonl; give each benchmark once")
            benchmarks[bench] = subsample(read_benchmark(f), limit)
    return benchmarks


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def print_table(report: dict[str, Any], file: TextIO | None = None) -> None:
    file = file or sys.stdout  # read at call time: a default bound at import misses a later redirect
    red = report["reduced"]
    print(f"check-precision: {report['model']} ({report['kind']}, {report['device']}): float32 vs "
          f"{red['dtype']}{', quantize ' + red['quantize'] if red['quantize'] else ''}", file=file)
    head = (f"{'benchmark':<28}{'task':>9}{'rows':>7}{'label%':>9}{'binary%':>9}{'unsafe_pos%':>12}"
            f"{'max|dp|':>9}{'mean|dp|':>10}{'token%':>9}{'tok max|dp|':>12}")
    print(head, file=file)
    for name, s in [*report["benchmarks"].items(), ("overall", report["overall"])]:
        print(f"{name:<28}{s['task']:>9}{s['compared']:>7}{_pct(s['label_agreement']):>9}"
              f"{_pct(s['binary_agreement']):>9}{_pct(s.get('unsafe_position_agreement')):>12}"
              f"{_num(s['prob_max_diff']):>9}{_num(s['prob_mean_diff']):>10}"
              f"{_pct(s.get('token_label_agreement')):>9}{_num(s.get('token_prob_max_diff')):>12}", file=file)
    o = report["overall"]
    if o["errors"] or o["error_mismatch"]:
        print(f"rows not judged (too long, ...): {o['errors']}; judged by one model only: {o['error_mismatch']}",
              file=file)
    if o["label_flips"]:
        print("label changes (reference->reduced): " + ", ".join(f"{k} x{v}" for k, v in o["label_flips"].items()),
              file=file)
    w = report["wall_s"]
    print(f"wall time: reference {w['reference']:.1f} s, reduced {w['reduced']:.1f} s", file=file)


def run_check_precision(args: argparse.Namespace) -> int:
    out = output_file(args.out, "--out") if args.out else None  # a bad path fails before the runs
    benchmarks = read_data(args.data, args.limit)  # bad rows fail before any model loads

    def log(msg: str) -> None:
        print(f"check-precision: {msg}", file=sys.stderr, flush=True)

    with model_source(args):
        report = compare_precision(model_name(args), benchmarks, dtype=args.dtype, quantize=args.quantize,
                                   device=args.device, calibration=calibration_arg(args),
                                   batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                   log=None if args.json else log)
    text = json.dumps(report)
    if out is not None:
        out.write_text(text + "\n", "utf-8")
    if args.json:
        print(text)
    else:
        print_table(report)
    return 0
