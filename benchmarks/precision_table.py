"""Per-benchmark agreement of reduced-precision variants, as a Markdown table for docs/benchmarks.md.

    qguard check-precision --data ../shared/data/eval --limit 500 --quantize int8 --json --out int8.json
    ...                                                    (one report per variant)
    python benchmarks/precision_table.py bf16.json int8.json int8-weight.json ...

Reads `qguard check-precision --json` reports (any number, one per variant, on the same rows) and prints
one row per benchmark: label agreement with the fp32 model per variant, and for response benchmarks the
agreement of the stream's unsafe position (the token where the response became unsafe, or none) after
a slash. Then the overall row and each variant's largest and mean probability difference. Only numbers
from the reports are printed; nothing is recomputed or rounded beyond two decimals.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def variant_name(report: dict) -> str:
    red = report["reduced"]
    dt = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(red["dtype"], red["dtype"])
    if not red["quantize"]:
        return dt
    return red["quantize"] if dt == "fp32" else f"{dt}+{red['quantize']}"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def cell(s: dict) -> str:
    pos = s.get("unsafe_position_agreement")
    return pct(s["label_agreement"]) + ("" if pos is None else f" / {pct(pos)}")


def table(reports: list[dict]) -> str:
    names = [variant_name(r) for r in reports]
    benches = list(reports[0]["benchmarks"])
    for r, n in zip(reports, names):
        if list(r["benchmarks"]) != benches or r["overall"]["rows"] != reports[0]["overall"]["rows"]:
            raise SystemExit(f"report {n} was run on other rows than {names[0]}: compare like with like")
    lines = ["| benchmark | task | rows | " + " | ".join(names) + " |",
             "|---|---|---:|" + "---:|" * len(names)]
    for b in benches:
        s0 = reports[0]["benchmarks"][b]
        lines.append(f"| {b} | {s0['task']} | {s0['compared']} | "
                     + " | ".join(cell(r["benchmarks"][b]) for r in reports) + " |")
    o0 = reports[0]["overall"]
    lines.append(f"| **overall** | all | {o0['compared']} | "
                 + " | ".join(f"**{cell(r['overall'])}**" for r in reports) + " |")
    lines.append("| max / mean \\|dp\\| | | | "
                 + " | ".join(f"{r['overall']['prob_max_diff']:.3f} / {r['overall']['prob_mean_diff']:.4f}"
                              for r in reports) + " |")
    lines.append("| token labels (responses) | | | "
                 + " | ".join(pct(r["overall"].get("token_label_agreement")) for r in reports) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+", type=Path, help="`qguard check-precision --json` reports")
    args = ap.parse_args(argv)
    reports = [json.loads(p.read_text("utf-8")) for p in args.reports]
    print(f"model: {reports[0]['model']} ({reports[0]['kind']}, {reports[0]['device']}); cells: label agreement "
          "with fp32, % / unsafe-position agreement, % (responses)\n")
    print(table(reports))


if __name__ == "__main__":
    main()
