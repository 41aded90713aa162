"""The Table I of results/real_yrs.md from the per-fold rows of results/real/cv_folds.csv: the
Markdown table (mean ± sd over folds, per class) on stdout and the figure. Usage:

    python scripts/real_table.py [results/real/cv_folds.csv] [--out results/real/table1.png]
        [--recipes "v4,v4 + synthetic init"]

Recipe names hold no comma (the option splits on commas). Rows are appended to the CSV from
each run's OUT/cv.parquet with a `recipe` column added.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from pipeline.classes import CLASSES
from pipeline.cv import cv_markdown
from pipeline.plots import cv_figure


def table_one(rows: pd.DataFrame, recipes: list[str] | None = None) -> pd.DataFrame:
    """The rows of the chosen recipes, each labelled 'variant (recipe)' in the variant column."""
    if recipes:
        rows = rows[rows["recipe"].isin(recipes)]
    return rows.assign(variant=rows["variant"] + " (" + rows["recipe"] + ")")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", type=Path, nargs="?", default=Path("results/real/cv_folds.csv"))
    ap.add_argument("--out", type=Path, default=Path("results/real/table1.png"))
    ap.add_argument("--recipes", default="", help="comma-separated; default: every recipe")
    a = ap.parse_args()
    if not a.csv.is_file():
        sys.exit(f"{a.csv}: no such file; give the per-fold CSV (results/real/cv_folds.csv)")
    rows = pd.read_csv(a.csv)
    table = table_one(rows, [r for r in a.recipes.split(",") if r])
    if table.empty:
        known = ", ".join(rows["recipe"].unique())
        sys.exit(f"{a.csv}: no rows of --recipes {a.recipes!r}; its recipes: {known}")
    print(cv_markdown(table, CLASSES))
    cv_figure(table, CLASSES).savefig(a.out, dpi=120)
    print(f"figure: {a.out}")


if __name__ == "__main__":
    main()
