"""Run a Guard over evaluation files and turn its verdicts into prediction rows and results.

Everything goes through the Guard facade (batched calls), so the Gen and Stream engines' batching
applies automatically. Results are computed from the prediction rows alone (`summarize`), so a
predictions.jsonl can be re-scored without the model.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from qguard.errors import QGuardError
from qguard.eval import metrics as M
from qguard.eval.data import Sample, find_files, read_benchmark, subsample
from qguard.eval.spans import span_to_tokens
from qguard.eval.suites import benchmark, select, suite_order
from qguard.families.stream import stream_layout
from qguard.policy import Severity, Verdict


@dataclass
class EvalConfig:
    data: Path
    suite: str = "all"
    limit: int | None = None  # rows per benchmark
    batch_size: int = 16  # conversations per Guard call
    progress: bool = True


@dataclass
class Timing:
    wall_s: float = 0.0
    tokens: int = 0


# ------------------------------------------------------------------------------------ prediction

def _classify(guard, samples: Sequence[Sample]) -> list[Verdict | str]:
    """Verdicts for a batch; a row the guard rejects (e.g. longer than the context) becomes its error
    message instead of sinking the whole run."""
    convs = [s.messages for s in samples]
    call = guard.classify_prompts if samples[0].task == "prompt" else guard.classify_responses
    try:
        return list(call(convs))
    except QGuardError:
        pass
    out: list[Verdict | str] = []
    for c in convs:  # find the offending rows one by one
        try:
            out.append(call([c])[0])
        except QGuardError as e:
            out.append(str(e))
    return out


def _latency(guard, sample: Sample, v: Verdict, is_stream: bool) -> dict | None:
    """Gold token span and bin of one gold-Unsafe row with a span (Stream checkpoints only)."""
    if not (is_stream and sample.label == M.UNSAFE and sample.unsafe_span):
        return None
    official = getattr(guard, "official_special_tokens", False)  # tokenize the answer as the guard did
    try:
        s, e = span_to_tokens(guard.tokenizer, sample.messages, sample.unsafe_span,
                              official_special_tokens=official)
    except QGuardError as err:
        return {"error": str(err)}
    # the official eval counts any debounced flag (Unsafe or Controversial) as the detection point;
    # unsafe_position counts the moderated tokens, reasoning first: shift it to the answer's frame
    # (a flag inside the reasoning comes out negative: ahead of the answer)
    pos = v.unsafe_position if v.label is not Severity.SAFE else None
    if pos is not None:
        lay = stream_layout(guard.tokenizer, sample.messages, official_special_tokens=official)
        pos -= len(lay.moderated(getattr(guard, "moderate_thinking", True))) - (lay.answer_end - lay.answer_start)
    return {"gold_tokens": [s, e], "pred_position": pos, "bin": M.latency_bin((s, e), pos)}


def prediction_row(guard, sample: Sample, v: Verdict | str, is_stream: bool) -> dict[str, Any]:
    """One predictions.jsonl row. No message text: ids point back to the data."""
    row: dict[str, Any] = {
        "id": sample.id, "benchmark": sample.benchmark, "task": sample.task, "lang": sample.lang,
        "label": sample.label, "gold_categories": list(sample.categories), "gold_refusal": sample.refusal,
        "collection_label": sample.collection_label,
    }
    if isinstance(v, str):
        return row | {"pred": None, "skipped": v}
    return row | {
        "pred": v.label.value,
        "strict": M.to_binary(v.label.value, "strict"), "loose": M.to_binary(v.label.value, "loose"),
        "categories": [c.value for c in v.categories], "refusal": v.refusal,
        "probs": v.probs, "refusal_prob": v.refusal_prob,
        "unsafe_position": v.unsafe_position, "latency": _latency(guard, sample, v, is_stream),
        "n_tokens": v.n_tokens, "error": v.error,
    }


def predict_benchmark(guard, samples: list[Sample], cfg: EvalConfig) -> tuple[list[dict], Timing]:
    from tqdm import tqdm

    is_stream = getattr(guard, "live", False)  # per-token positions, hence a detection latency
    rows: list[dict] = []
    timing = Timing()
    bar = tqdm(total=len(samples), desc=samples[0].benchmark, unit="row", disable=not cfg.progress,
               file=sys.stderr, leave=False)
    try:
        for i in range(0, len(samples), cfg.batch_size):
            chunk = samples[i:i + cfg.batch_size]
            t0 = time.perf_counter()
            verdicts = _classify(guard, chunk)
            timing.wall_s += time.perf_counter() - t0
            for s, v in zip(chunk, verdicts):
                if isinstance(v, Verdict):
                    timing.tokens += v.n_tokens or 0
                rows.append(prediction_row(guard, s, v, is_stream))
            bar.update(len(chunk))
    finally:
        bar.close()
    return rows, timing


# -------------------------------------------------------------------------------------- scoring

def summarize_benchmark(name: str, rows: list[dict], timing: Timing | None = None) -> dict[str, Any]:
    """Every figure of one benchmark from its prediction rows."""
    spec = benchmark(name)
    scored = [r for r in rows if r["pred"] is not None]
    gold = [r["label"] for r in scored]
    pred = [r["pred"] for r in scored]
    collection = any(r["collection_label"] for r in rows)
    kind = M.headline_kind(gold, collection) if gold else "f1"
    lat = [r["latency"]["bin"] for r in scored if r.get("latency") and "bin" in r["latency"]]
    res: dict[str, Any] = {
        "suite": spec.suite, "role": spec.role, "column": spec.title, "task": rows[0]["task"],
        "n": len(rows), "n_scored": len(scored), "n_skipped": len(rows) - len(scored),
        "n_errors": sum(1 for r in scored if r.get("error")),
        "gold": {M.SAFE: gold.count(M.SAFE), M.UNSAFE: gold.count(M.UNSAFE)},
        "collection_label": collection,
        "strict": M.binary_metrics(gold, pred, "strict"), "loose": M.binary_metrics(gold, pred, "loose"),
        "headline": M.headline(gold, pred, kind) if gold else None,
        "refusal": M.refusal_metrics([r["gold_refusal"] for r in scored], [r["refusal"] for r in scored]),
        "calibration": M.calibration_metrics(gold, [r.get("probs") for r in scored]),
        "latency": M.latency_histogram(lat),
        "latency_unmapped": sum(1 for r in scored if r.get("latency") and "error" in r["latency"]),
        "severity_confusion": M.severity_confusion(gold, pred),
        "category_confusion": M.category_confusion([r["gold_categories"] for r in scored],
                                                   [r["categories"] for r in scored]),
        "languages": M.by_language([r["lang"] for r in scored], gold, pred, collection),
    }
    if timing is not None:
        res["cost"] = _cost(timing, len(scored))
    return res


def _cost(t: Timing, n: int) -> dict[str, float | int | None]:
    return {"wall_s": round(t.wall_s, 3), "tokens": t.tokens, "samples": n,
            "tokens_per_s": round(t.tokens / t.wall_s, 1) if t.wall_s > 0 else None,
            "samples_per_s": round(n / t.wall_s, 2) if t.wall_s > 0 else None}


def summarize_suites(benchmarks: dict[str, dict], rows: list[dict]) -> dict[str, dict]:
    """Per suite: the averaged benchmarks, the extras, the best-mode / strict / loose averages, and a
    per-language breakdown pooled over the averaged benchmarks' rows."""
    out = {}
    for suite in suite_order(list(benchmarks)):
        names = [n for n, b in benchmarks.items() if b["suite"] == suite]
        avg = [n for n in names if benchmarks[n]["role"] == "avg" and benchmarks[n]["headline"]]
        heads = [benchmarks[n]["headline"] for n in avg]
        pooled = [r for r in rows if r["benchmark"] in avg and r["pred"] is not None]
        out[suite] = {
            "benchmarks": names, "averaged": avg,
            "average": {k: M.average(h[k] for h in heads) for k in ("best", "strict", "loose")},
            "languages": M.by_language([r["lang"] for r in pooled], [r["label"] for r in pooled],
                                       [r["pred"] for r in pooled]),
        }
    return out


def summarize(rows: list[dict], timings: dict[str, Timing] | None = None,
              meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """results.json from all prediction rows (benchmarks in first-seen order)."""
    by_bench: dict[str, list[dict]] = {}
    for r in rows:
        by_bench.setdefault(r["benchmark"], []).append(r)
    timings = timings or {}
    benches = {n: summarize_benchmark(n, rs, timings.get(n)) for n, rs in by_bench.items()}
    scored = [r for r in rows if r["pred"] is not None]
    lat = [r["latency"]["bin"] for r in scored if r.get("latency") and "bin" in r["latency"]]
    total = Timing(sum(t.wall_s for t in timings.values()), sum(t.tokens for t in timings.values()))
    return {
        **(meta or {}),
        "benchmarks": benches,
        "suites": summarize_suites(benches, rows),
        "latency": M.latency_histogram(lat),
        "category_confusion": M.merge_category_confusions(b["category_confusion"] for b in benches.values()),
        "languages": M.by_language([r["lang"] for r in scored], [r["label"] for r in scored],
                                   [r["pred"] for r in scored]),
        "cost": _cost(total, len(scored)) if timings else None,
    }


# ---------------------------------------------------------------------------------------- driver

def load_data(cfg: EvalConfig) -> dict[str, list[Sample]]:
    """{benchmark: rows to run}, every selected file read and checked (call it before loading a model,
    so a malformed line fails in seconds)."""
    files = find_files(Path(cfg.data))
    return {n: subsample(read_benchmark(files[n]), cfg.limit) for n in select(files, cfg.suite)}


def run_eval(guard, cfg: EvalConfig, data: dict[str, list[Sample]] | None = None) -> tuple[list[dict], dict[str, Any]]:
    """(prediction rows, results) for every selected benchmark of cfg.data (or of `data`, from load_data)."""
    data = load_data(cfg) if data is None else data
    rows: list[dict] = []
    timings: dict[str, Timing] = {}
    for n, samples in data.items():
        r, timings[n] = predict_benchmark(guard, samples, cfg)
        rows.extend(r)
    meta = {
        "model": guard.name, "kind": getattr(guard.kind, "value", str(guard.kind)),
        "mode_note": "strict: Controversial counts as Unsafe; loose: Controversial counts as Safe",
        "data": str(cfg.data), "suite": cfg.suite, "limit": cfg.limit,
        "device": str(getattr(guard, "device", "")),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "qguard_version": _version(),
    }
    return rows, summarize(rows, timings, meta)


def _version() -> str:
    # the installed distribution's version, as `qguard --version` reports it (not `qguard.__version__`:
    # the package root sits above eval/ in the layering)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qguard")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "(not installed)"
