"""scripts/real_table.py: Table I of results/real_yrs.md from per-fold rows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd

from pipeline.classes import CLASSES

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "real_table.py"


def _rows(recipe: str, variant: str, mean_class: list[float]) -> pd.DataFrame:
    n = len(mean_class)
    per_class = {f"acc_{c}": [0.5] * n for c in CLASSES}
    return pd.DataFrame({"recipe": recipe, "variant": variant, "fold": range(n), "n": 10,
                         "average_accuracy": 0.5, "mean_class_accuracy": mean_class,
                         **per_class})  # fmt: skip


def test_table_one_labels_each_recipe_and_summarises_its_folds(tmp_path):
    csv = tmp_path / "folds.csv"
    pd.concat([
        _rows("v2", "alexnet", [0.1, 0.1]),
        _rows("v4", "alexnet", [0.6, 0.8]),
        _rows("v4", "stn-lsoftmax-alexnet", [0.5, 0.7]),
    ]).to_csv(csv, index=False)  # fmt: skip
    out = tmp_path / "t.png"
    args = [sys.executable, str(SCRIPT), str(csv), "--out", str(out), "--recipes", "v4"]
    run = subprocess.run(args, capture_output=True, text=True, check=True)
    header, _, *body = run.stdout.splitlines()
    assert header == "| Method | alexnet (v4) | stn-lsoftmax-alexnet (v4) |"
    mean_row = next(line for line in body if "Mean per-class" in line)
    # mean and sample sd over the folds: (0.6, 0.8) -> 0.700 ± 0.141; v2 is left out
    assert "0.700 ± 0.141" in mean_row and "0.600 ± 0.141" in mean_row
    assert "v2" not in run.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_recipe_is_one_line_naming_the_recipes_there(tmp_path):
    csv = tmp_path / "folds.csv"
    _rows("v4", "alexnet", [0.6, 0.8]).to_csv(csv, index=False)
    run = subprocess.run([sys.executable, str(SCRIPT), str(csv), "--out", str(tmp_path / "t.png"),
                          "--recipes", "v9"], capture_output=True, text=True)  # fmt: skip
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert run.stderr.strip() == f"{csv}: no rows of --recipes 'v9'; its recipes: v4"
