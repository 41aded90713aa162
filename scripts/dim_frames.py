"""Archive frames dimmer than every frame of a labelled set: what a model calls them, and whether
``occurrence --min-prob`` screens them out. Usage:

    python scripts/dim_frames.py PRED_DIR ARCHIVE_ROOT LABELLED_DIR [--min-prob 0.6]

Brightness is the mean inside the sky circle (realism.ANALYSIS_RADIUS of a 440-px frame, scaled
to the frame's size). Prints Markdown: the class counts of all frames, of those at p >= MIN_PROB,
and of those at p >= MIN_PROB that are not dimmer than the dimmest labelled frame.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.classes import CLASSES, PROB_COLUMNS
from pipeline.errors import AuroraError
from pipeline.imageio import read_frame
from pipeline.labelled import load_labelled
from pipeline.predictions import read_predictions
from pipeline.realism import ANALYSIS_RADIUS, circle_mask


def sky_mean(path: Path) -> float:
    """Mean brightness inside the frame's sky circle."""
    frame = read_frame(path)
    mask = circle_mask(frame.shape[0], ANALYSIS_RADIUS * frame.shape[0] / 440.0)
    return float(np.asarray(frame, dtype=np.float64)[mask].mean())


def _counts_row(name: str, df: pd.DataFrame) -> str:
    counts = df["label"].value_counts()
    cells = [str(int(counts.get(c, 0))) for c in CLASSES]
    return f"| {name} | {len(df)} | " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pred", type=Path)
    ap.add_argument("root", type=Path)
    ap.add_argument("labelled", type=Path)
    ap.add_argument("--min-prob", type=float, default=0.6)
    a = ap.parse_args()
    try:  # a wrong folder is one line, not a traceback
        floor = min(sky_mean(Path(p)) for p in load_labelled(a.labelled)["path"])
        pred = read_predictions(a.pred)
        if pred.empty:
            raise AuroraError(f"{a.pred}: no predictions; give a folder classify-archive wrote")
    except AuroraError as exc:
        sys.exit(f"dim_frames: {exc}")
    try:
        pred["sky_mean"] = [sky_mean(a.root / p) for p in pred["path"]]
    except AuroraError as exc:
        sys.exit(f"dim_frames: {exc} (the predictions' paths are relative to ARCHIVE_ROOT)")
    pred["label"] = pred["label"].astype(str)
    pred["pmax"] = pred[list(PROB_COLUMNS)].max(axis=1)
    dim = pred["sky_mean"] < floor
    sure = pred["pmax"] >= a.min_prob
    print(f"dimmest labelled frame: sky mean {floor:.1f}; archive frames dimmer: {int(dim.sum())}")
    print()
    print("| frames | n | " + " | ".join(CLASSES) + " |")
    print("|---|---:|" + "---:|" * len(CLASSES))
    print(_counts_row("all", pred))
    print(_counts_row("dimmer than every labelled frame", pred[dim]))
    print(_counts_row(f"... of those, p >= {a.min_prob}", pred[dim & sure]))
    print(_counts_row(f"p >= {a.min_prob}", pred[sure]))
    print(_counts_row(f"p >= {a.min_prob}, not dimmer", pred[sure & ~dim]))


if __name__ == "__main__":
    main()
