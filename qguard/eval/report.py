"""Write an evaluation's outputs: results.json, predictions.jsonl, report.md and PNG plots.

report.md follows the tech report's layout: one table per suite, rows are models, columns are
benchmarks, then the suite average. Several results.json can be rendered into one report
(`qguard eval-report`) to compare models side by side.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qguard.errors import InputError
from qguard.eval.metrics import LATENCY_BINS, MODES
from qguard.eval.suites import CUSTOM
from qguard.taxonomy import SEVERITY_KEYS

log = logging.getLogger(__name__)

KIND_MARK = {"f1": "", "recall": " (R)", "specificity": " (Spec)"}
SUITE_TITLES = {
    "english-prompt": "English prompt classification",
    "english-response": "English response classification",
    "multilingual": "Multilingual prompt classification",
    "chinese": "Chinese prompt and response classification",
    "stream": "Streaming detection set",
    CUSTOM: "Other files",
}


# -------------------------------------------------------------------------------------- files

def write_outputs(out: Path, rows: list[dict], results: dict[str, Any], plots: bool = True) -> list[Path]:
    """Write every output file into `out`; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "predictions.jsonl", out / "report.md"]
    written[0].write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", "utf-8")
    with written[1].open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    pngs = write_plots(out, results) if plots else []
    written[2].write_text(render_report([results], [p.name for p in pngs]), "utf-8")
    return written + pngs


def load_results(path: Path) -> dict[str, Any]:
    """results.json of a run (a run directory or the file itself)."""
    f = path / "results.json" if path.is_dir() else path
    try:
        data = json.loads(f.read_text("utf-8"))
    except FileNotFoundError:
        raise InputError(f"{f}: no such file (expected a `qguard eval` output)") from None
    except ValueError as e:
        raise InputError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or "benchmarks" not in data or "suites" not in data:
        raise InputError(f"{f}: not a qguard eval results.json")
    data["_source"] = str(path)  # tells apart runs of the same model in a comparison (not written back)
    return data


def run_names(results: Sequence[dict]) -> list[str]:
    """Row labels: the model, and the run's folder when several runs share a model."""
    names = [str(r.get("model", "?")) for r in results]
    if len(set(names)) == len(names):
        return names
    return [f"{n} [{r.get('_source') or i + 1}]" for i, (n, r) in enumerate(zip(names, results))]


# ------------------------------------------------------------------------------------- markdown

def _fmt(v: Any, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 1) -> list[str]:
    # numbers right-aligned, text left-aligned, judged by the first row
    first = rows[0] if rows else [0] * len(header)
    align = ["---:" if isinstance(c, (int, float)) or c is None or _is_marked(c) else "---" for c in first]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_fmt(c, digits) for c in row) + " |" for row in rows]
    return lines + [""]


def _is_marked(c: Any) -> bool:
    """A number with its metric mark, e.g. "100.0 (Spec)" (see _cell)."""
    return isinstance(c, str) and c.split(" ")[0].replace(".", "", 1).isdigit()


def _suite_columns(results: Sequence[dict], suite: str) -> tuple[list[str], list[str]]:
    """(averaged benchmarks, extra benchmarks) of a suite, over every run, in first-seen order."""
    avg: list[str] = []
    extra: list[str] = []
    for res in results:
        s = res["suites"].get(suite)
        for n in (s or {}).get("benchmarks", []):
            target = avg if n in s["averaged"] else extra
            if n not in avg and n not in extra:
                target.append(n)
    return avg, extra


def _kinds(results: Sequence[dict], name: str) -> set[str]:
    return {(b["headline"] or {}).get("kind", "f1") for r in results if (b := r["benchmarks"].get(name))}


def _column_title(results: Sequence[dict], name: str) -> str:
    """The benchmark's column, with its metric mark when every run reports the same metric (a run with
    fewer rows can have one class only, and so report recall or specificity instead of F1)."""
    kinds = _kinds(results, name)
    for res in results:
        b = res["benchmarks"].get(name)
        if b:
            return b["column"] + (KIND_MARK.get(next(iter(kinds)), "") if len(kinds) == 1 else "")
    return name


def _cell(res: dict, name: str, mark: bool = False) -> Any:
    b = res["benchmarks"].get(name)
    if not b or not b["headline"]:
        return None
    if b["role"] == "refusal":
        return (b["refusal"] or {}).get("f1")
    best = b["headline"]["best"]
    if mark and best is not None:  # the runs disagree on the metric: each cell says its own
        return f"{best:.1f}{KIND_MARK.get(b['headline'].get('kind', 'f1'), '') or ' (F1)'}"
    return best


def suite_summary(results: Sequence[dict], suite: str) -> list[str]:
    """Rows: models; columns: benchmarks (best mode), the average, then extras."""
    avg, extra = _suite_columns(results, suite)
    header = ["Model", *(_column_title(results, n) for n in avg), "Avg", *(_column_title(results, n) for n in extra)]
    mixed = {n for n in (*avg, *extra) if len(_kinds(results, n)) > 1}
    rows = []
    for name, res in zip(run_names(results), results):
        s = res["suites"].get(suite, {})
        rows.append([name, *(_cell(res, n, n in mixed) for n in avg),
                     (s.get("average") or {}).get("best"), *(_cell(res, n, n in mixed) for n in extra)])
    return [f"### {SUITE_TITLES.get(suite, suite)}", ""] + _table(header, rows)


def detail_table(res: dict) -> list[str]:
    header = ["Benchmark", "n", "Unsafe", "Metric", *(f"{m} {k}" for m in MODES for k in ("F1", "P", "R")),
              "Best (mode)", "Errors", "Skipped"]
    rows = []
    for name, b in res["benchmarks"].items():
        h = b["headline"] or {}
        best = None if h.get("best") is None else f"{h['best']:.1f} ({h['best_mode']})"
        rows.append([name, b["n"], b["gold"]["Unsafe"], h.get("kind"),
                     *(b[m][k] for m in MODES for k in ("f1", "precision", "recall")),
                     best, b["n_errors"], b["n_skipped"]])
    return _table(header, rows)


def refusal_table(res: dict) -> list[str]:
    rows = [[n, b["refusal"]["n"], b["refusal"]["precision"], b["refusal"]["recall"], b["refusal"]["f1"]]
            for n, b in res["benchmarks"].items() if b["refusal"]]
    return _table(["Benchmark", "n", "Precision", "Recall", "Refusal F1"], rows) if rows else []


def calibration_table(res: dict) -> list[str]:
    rows = [[n, c["n"], c["ece"], c["brier"], c["log_loss"]]
            for n, b in res["benchmarks"].items() if (c := b.get("calibration"))]
    return _table(["Benchmark", "n", "ECE", "Brier", "Log-loss"], rows, digits=3) if rows else []


def latency_table(res: dict) -> list[str]:
    rows = [[n, b["latency"]["n"], *(b["latency"]["percent"][k] for k in LATENCY_BINS),
             b["latency"]["within_128"]] for n, b in res["benchmarks"].items() if b["latency"]]
    return _table(["Benchmark", "n", *LATENCY_BINS, "Stop within 128"], rows) if rows else []


def language_table(res: dict) -> list[str]:
    rows = []
    for name, b in res["benchmarks"].items():
        if len(b["languages"]) < 2:
            continue
        for lang, g in b["languages"].items():
            h = g["headline"]
            rows.append([name, lang, g["n"], g["gold_unsafe"], h["kind"], h["best"], h["best_mode"]])
    return _table(["Benchmark", "Lang", "n", "Unsafe", "Metric", "Best", "Mode"], rows) if rows else []


def suite_language_table(res: dict) -> list[str]:
    """Per language, pooled over each suite's averaged benchmarks (suites with several languages)."""
    rows = []
    for suite, s in res["suites"].items():
        langs = s.get("languages") or {}
        if len(langs) < 2:
            continue
        for lang, g in langs.items():
            h = g["headline"]
            rows.append([suite, lang, g["n"], g["gold_unsafe"], g["strict"]["f1"], g["loose"]["f1"],
                         h["kind"], h["best"]])
    header = ["Suite", "Lang", "n", "Unsafe", "strict F1", "loose F1", "Metric", "Best"]
    return _table(header, rows) if rows else []


def cost_table(res: dict) -> list[str]:
    rows = [[n, b["cost"]["samples"], b["cost"]["wall_s"], b["cost"]["tokens"], b["cost"]["tokens_per_s"],
             b["cost"]["samples_per_s"]] for n, b in res["benchmarks"].items() if b.get("cost")]
    if res.get("cost"):
        c = res["cost"]
        rows.append(["**total**", c["samples"], c["wall_s"], c["tokens"], c["tokens_per_s"], c["samples_per_s"]])
    return _table(["Benchmark", "Samples", "Wall s", "Input tokens", "Tokens/s", "Samples/s"], rows) if rows else []


def _meta(res: dict, name: str) -> list[str]:
    lim = f", at most {res['limit']} rows per benchmark" if res.get("limit") else ""
    return [f"- **{name}** ({res.get('kind', '?')}, {res.get('device', '?')}): data "
            f"`{res.get('data', '?')}`, suite `{res.get('suite', '?')}`{lim}, {res.get('created', '')}"]


def render_report(results: Sequence[dict], pngs: Sequence[str] = ()) -> str:
    lines = ["# qguard evaluation", ""]
    names = run_names(results)
    for name, res in zip(names, results):
        lines += _meta(res, name)
    lines += ["", "Cells are unsafe-class F1 (%) in the better of strict and loose mode, as in the tech report's "
              "tables; (R) marks unsafe recall on sets with one gold class or collection labels, (Spec) the "
              "share of an all-Safe set left Safe. Avg covers the columns before it. Strict reads Controversial "
              "as Unsafe, loose as Safe.", "", "## Summary", ""]
    suites = list(dict.fromkeys(s for res in results for s in res["suites"]))
    for suite in suites:
        lines += suite_summary(results, suite)
    for name, res in zip(names, results):
        title = f" ({name})" if len(results) > 1 else ""
        lines += [f"## Per benchmark{title}", ""] + detail_table(res)
        for head, part in (("Refusal detection", refusal_table(res)),
                           ("Calibration of strict P(unsafe) (lower is better)", calibration_table(res)),
                           ("Streaming detection latency (% of gold-Unsafe rows with a span)", latency_table(res)),
                           ("Per language, pooled per suite", suite_language_table(res)),
                           ("Per language, per benchmark", language_table(res)), ("Cost", cost_table(res))):
            if part:
                lines += [f"### {head}{title}", ""] + part
    if pngs:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in pngs] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- plots

def write_plots(out: Path, res: dict) -> list[Path]:
    """PNG plots; skipped with a warning when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure  # Figure objects need no pyplot state; they render with Agg
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'qguard[eval]'): no plots written")
        return []
    paths = []
    for name, fn in (("precision_recall.png", _plot_pr), ("latency.png", _plot_latency),
                     ("confusion_severity.png", _plot_severity), ("confusion_categories.png", _plot_categories)):
        fig = fn(Figure, res)
        if fig is not None:
            fig.savefig(out / name, dpi=110, bbox_inches="tight")
            paths.append(out / name)
    return paths


def _plot_pr(Figure, res: dict):
    """Precision and recall per benchmark in strict and loose mode (the report's Figure 4)."""
    names = [n for n, b in res["benchmarks"].items() if b["n_scored"]]
    if not names:
        return None
    fig = Figure(figsize=(max(6.0, 0.55 * len(names) + 2), 7), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    x = list(range(len(names)))
    for ax, mode in zip(axes, MODES):
        for off, key, colour in ((-0.2, "precision", "#4c72b0"), (0.2, "recall", "#dd8452")):
            vals = [res["benchmarks"][n][mode][key] or 0.0 for n in names]
            ax.bar([i + off for i in x], vals, width=0.4, label=key, color=colour)
        ax.set_ylim(0, 105)
        ax.set_ylabel(f"{mode} (%)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[0].set_title(f"Unsafe precision / recall: {res.get('model', '')}")
    axes[1].set_xticks(x, names, rotation=45, ha="right")  # file names: table columns repeat across suites
    return fig


def _plot_latency(Figure, res: dict):
    benches = {n: b["latency"] for n, b in res["benchmarks"].items() if b["latency"]}
    if not benches:
        return None
    fig = Figure(figsize=(7.5, 4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(benches)
    for k, (name, lat) in enumerate(benches.items()):
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(LATENCY_BINS))]
        ax.bar(xs, [lat["percent"][b] for b in LATENCY_BINS], width=width, label=f"{name} (n={lat['n']})")
    ax.set_xticks(range(len(LATENCY_BINS)), LATENCY_BINS)
    ax.set_xlabel("detection delay in tokens after the gold unsafe span")
    ax.set_ylabel("% of unsafe responses")
    ax.set_title("Streaming detection latency")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return fig


def _heatmap(ax, matrix: list[list[int]], rows: list[str], cols: list[str], title: str) -> None:
    ax.imshow(matrix, cmap="Blues", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    top = max((max(r) for r in matrix), default=0) or 1
    for i, r in enumerate(matrix):
        for j, v in enumerate(r):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > top / 2 else "black")
    ax.set_title(title, fontsize=9)


def _plot_severity(Figure, res: dict):
    """Gold x predicted severity, summed per suite."""
    per_suite: dict[str, list[list[int]]] = {}
    cols = list(SEVERITY_KEYS)
    for b in res["benchmarks"].values():
        m = per_suite.setdefault(b["suite"], [[0] * 3, [0] * 3])
        for i, g in enumerate(("Safe", "Unsafe")):
            for j, p in enumerate(cols):
                m[i][j] += b["severity_confusion"][g][p]
    if not per_suite:
        return None
    fig = Figure(figsize=(3.6 * len(per_suite), 3.2), layout="constrained")
    axes = fig.subplots(1, len(per_suite), squeeze=False)[0]
    for k, (ax, (suite, m)) in enumerate(zip(axes, per_suite.items())):
        _heatmap(ax, m, ["gold Safe", "gold Unsafe"], cols, suite)
        if k:  # same rows in every panel: label them once
            ax.set_yticks([])
    return fig


def _plot_categories(Figure, res: dict):
    cc = res["category_confusion"]
    gold = [g for g in cc["gold"] if cc["rows"].get(g)]
    if not gold:
        return None
    fig = Figure(figsize=(8, 0.5 * len(gold) + 2.5), layout="constrained")
    ax = fig.subplots()
    _heatmap(ax, [[cc["matrix"][g][p] for p in cc["pred"]] for g in gold], gold, cc["pred"],
             "Gold (rows) x predicted (columns) category")
    return fig
