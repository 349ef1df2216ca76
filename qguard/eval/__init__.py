"""Evaluation harness: measure a checkpoint the way the Qwen3Guard tech report does.

    from qguard.eval import EvalConfig, run_eval, write_outputs
    rows, results = run_eval(guard, EvalConfig(data=Path("../shared/data/eval"), suite="all", limit=50))
    write_outputs(Path("runs/eval"), rows, results)

metrics.py is pure (no model); data.py reads the canonical JSONL; suites.py maps files to the report's
tables; runner.py drives the Guard facade; report.py writes results.json, predictions.jsonl, report.md
and plots. Nothing here is used for training or threshold tuning.
"""

from qguard.eval.data import Sample, read_benchmark
from qguard.eval.report import render_report, write_outputs
from qguard.eval.runner import EvalConfig, run_eval, summarize

__all__ = ["EvalConfig", "Sample", "read_benchmark", "render_report", "run_eval", "summarize", "write_outputs"]
