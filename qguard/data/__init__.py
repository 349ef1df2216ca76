"""Rows in and out: one row schema and every reader and writer (annotate, eval, train).

- `jsonl`: JSON Lines, read the one way qguard does it (strict `read_jsonl`, or `iter_jsonl`, which
  yields unreadable lines as errors instead of raising).
- `schema`: the canonical row (`Row`) and its one validator (`parse_row`), shared by eval and training.
- `formats`: records of JSONL / JSON / CSV / Parquet files, read as iterators and written atomically.

Nothing is imported here, so importing one of these modules stays cheap.
"""
