"""`qguard calibrate`: fit temperature-scaled risk probabilities on labelled rows (qguard.calibration)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qguard.cli import add_model_args, model_name, model_source, output_file, positive_int


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="fit the temperatures that make a guard's P(unsafe) calibrated, "
                                         "on labelled JSONL rows (labels never change, only probabilities)")
    # fits strict P(unsafe) of the raw, full-precision model: the file is read by every later load of it
    add_model_args(p, mode=False, calibration=False, quantize=False)
    p.add_argument("--data", nargs="+", required=True,
                   help="JSONL files or folders of *.jsonl in the canonical schema (prompt and/or response rows); "
                        "use data the model was not trained on")
    p.add_argument("--out", default=None,
                   help="where to write the calibration (default: qguard_calibration.json in the model's "
                        "directory, where every qguard command finds it; required for the embedded starter)")
    p.add_argument("--holdout", type=float, default=0.3,
                   help="share of rows kept out of the fit to report honest before/after figures (default 0.3)")
    p.add_argument("--limit", type=positive_int, default=None, help="use at most N rows per task (after shuffling)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    import random

    from qguard.data.schema import expand_paths, read_rows
    from qguard.errors import InputError
    from qguard.eval.calibration import fit
    from qguard.runtime.calibration import FILE_NAME, Calibration
    from qguard.runtime.guard import Guard
    from qguard.starter import starter_model_path

    name = model_name(args)
    if args.out is None and not Path(name).is_dir():
        raise InputError(f"--out is needed: {name} is not a local directory to write {FILE_NAME} into")
    starter = starter_model_path()
    if args.out is None and starter is not None and Path(name).resolve() == starter.resolve():
        raise InputError("the model is the embedded starter, whose calibration ships with qguard: pass --out FILE "
                         "(then --calibration FILE), or calibrate a copy of the model directory")
    out = output_file(args.out if args.out else Path(name) / FILE_NAME, "--out")
    rows = [r for f in expand_paths(args.data) for r in read_rows(f)]  # bad data fails before the model loads
    if args.limit:
        rng = random.Random(args.seed)
        rows = [r for task in ("prompt", "response") for r in _sample([x for x in rows if x.task == task], args.limit, rng)]
    old = Calibration.load(out) if out.is_file() else None  # read first: a broken file fails before the fit
    with model_source(args):
        guard = Guard.from_pretrained(name, device=args.device, dtype=args.dtype, calibration=False,
                                      official_special_tokens=args.official_special_tokens)
    cal = fit(guard, rows, holdout=args.holdout, seed=args.seed)
    if old is not None:  # a head with no rows here keeps its temperature
        cal.keep_unfitted_from(old, out.name)
    cal.report["data"] = [str(p) for p in args.data]
    cal.report["model"] = name
    cal.save(out)
    print(json.dumps({"out": str(out), "temperature": cal.temperature, **{
        k: v for k, v in cal.report.items() if k.endswith(("_holdout", "_skipped")) or k == "kept"}}))
    if out.name == FILE_NAME and (out.parent / "config.json").is_file():
        print(f"wrote {out}; qguard loads it with the model in that directory", file=sys.stderr)
    else:
        print(f"wrote {out}; pass --calibration {out} to use it", file=sys.stderr)
    return 0


def _sample(rows: list, n: int, rng) -> list:
    return rows if len(rows) <= n else rng.sample(rows, n)
