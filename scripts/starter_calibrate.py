"""Fit the embedded starter's calibration without re-training it (step 6 of `qguard train starter`).

Rebuilds the recipe's dev slice exactly (same seed, same data folder: the row counts are checked against
the model's training_summary.json, so a different split is refused), fits the temperatures on it with
`qguard.calibration.fit`, and writes `qguard_calibration.json` plus the updated summary and card.

    .venv/bin/python scripts/starter_calibrate.py [--model qguard/assets/starter]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qguard.errors import InputError
from qguard.starter import starter_model_path
from qguard.train.starter import StarterRecipe, calibrate_starter, recipe_rows, training_rows, write_card


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded starter")
    a = ap.parse_args()
    out = Path(a.model) if a.model else starter_model_path()
    summary = json.loads((out / "training_summary.json").read_text("utf-8"))
    r = StarterRecipe(out=out)
    _, train_rows, dev_rows, rng = recipe_rows(r)
    n_train = len(training_rows(r, train_rows, rng))
    if (n_train, len(dev_rows)) != (summary["rows"], summary["dev_rows"]):
        raise InputError(f"the rebuilt split ({n_train} train / {len(dev_rows)} dev rows) is not the one this model "
                         f"was trained with ({summary['rows']} / {summary['dev_rows']}): data or recipe changed")
    summary["calibration"] = calibrate_starter(out, dev_rows, r.seed)
    write_card(out, r, summary)
    print(json.dumps(summary["calibration"]))


if __name__ == "__main__":
    main()
