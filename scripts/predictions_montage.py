"""A montage of classified frames by confidence: what a model does with faint, cloudy or empty
frames (the least confident row first). Usage:

    python scripts/predictions_montage.py PRED_DIR ARCHIVE_ROOT OUT.png [--per-row 8]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pipeline.classes import PROB_COLUMNS
from pipeline.imageio import read_frame
from pipeline.predictions import read_predictions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pred", type=Path)
    ap.add_argument("root", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-row", type=int, default=8)
    a = ap.parse_args()
    pred = read_predictions(a.pred)
    pred["pmax"] = pred[list(PROB_COLUMNS)].max(axis=1)
    pred = pred.sort_values("pmax").reset_index(drop=True)
    # Rows: quantiles of confidence, from the least confident frames to the most.
    rows = [0.0, 0.25, 0.5, 0.75, 0.97]
    fig = Figure(figsize=(a.per_row * 1.6, len(rows) * 1.8), layout="constrained")
    axes = fig.subplots(len(rows), a.per_row)
    for r, q in enumerate(rows):
        start = int(q * (len(pred) - a.per_row))
        for c in range(a.per_row):
            row = pred.iloc[start + c]
            ax = axes[r, c]
            ax.imshow(read_frame(a.root / row["path"]), cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"{row['label']} {row['pmax']:.2f}", fontsize=7)
            ax.set_axis_off()
    counts = pred["label"].value_counts().to_dict()
    share = float(np.mean(pred["pmax"] >= 0.6))
    fig.suptitle(
        f"{len(pred)} frames by confidence (top row least): {counts}; {share:.0%} at p >= 0.6",
        fontsize=9,
    )
    fig.savefig(a.out, dpi=80)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
