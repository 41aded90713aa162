"""A montage of classified frames by confidence: what a model does with faint, cloudy or empty
frames (the least confident row first). Usage:

    python scripts/predictions_montage.py PRED_DIR ARCHIVE_ROOT OUT.png [--per-row 8]
        [--below-sky] [--vmax 255]

``--below-sky``: instead, a random sample (in time order) of the frames that
``occurrence --min-sky model`` leaves out: sky level below every frame the model trained on
(the predictions' sky_level and the model's range in PRED_DIR/_run.json). ``--vmax``: the
display's white level (a lower one shows faint structure).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pipeline.classes import PROB_COLUMNS
from pipeline.errors import AuroraError
from pipeline.imageio import read_frame
from pipeline.occurrence_stage import model_sky_floor
from pipeline.predictions import read_predictions

#: Rows of the confidence montage: quantiles of confidence, least confident first.
QUANTILES = (0.0, 0.25, 0.5, 0.75, 0.97)


def by_confidence(pred: pd.DataFrame, per_row: int) -> tuple[list[pd.DataFrame], str]:
    """Rows of frames at the confidence quantiles, and the figure's title."""
    pred = pred.sort_values("pmax").reset_index(drop=True)
    rows = []
    for q in QUANTILES:
        start = int(q * (len(pred) - per_row))
        rows.append(pred.iloc[start : start + per_row])
    counts = pred["label"].value_counts().to_dict()
    share = float(np.mean(pred["pmax"] >= 0.6))
    title = f"{len(pred)} frames by confidence (top row least): {counts}; {share:.0%} at p >= 0.6"
    return rows, title


def below_sky(pred: pd.DataFrame, floor: float, per_row: int) -> tuple[list[pd.DataFrame], str]:
    """Rows of a seeded random sample, in time order, of the frames below ``floor``."""
    if pred["sky_level"].isna().all():
        raise AuroraError(
            "these predictions have no sky_level (classified before it was recorded); "
            "classify again to draw --below-sky"
        )
    dim = pred[pred["sky_level"] < floor]
    if dim.empty:
        raise AuroraError(f"no frame has a sky level below the model's floor {floor:.4g}")
    n = min(len(dim), per_row * len(QUANTILES))
    sample = dim.sample(n, random_state=0).sort_values("time_utc").reset_index(drop=True)
    rows = [sample.iloc[i : i + per_row] for i in range(0, n, per_row)]
    counts = dim["label"].value_counts().to_dict()
    title = (
        f"{len(dim)} of {len(pred)} frames below the sky level of every training frame "
        f"({floor:.4g}; {n} shown, in time order): {counts}"
    )
    return rows, title


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pred", type=Path)
    ap.add_argument("root", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-row", type=int, default=8)
    ap.add_argument("--below-sky", action="store_true")
    ap.add_argument("--vmax", type=float, default=255.0)
    a = ap.parse_args()
    try:  # a wrong folder is one line, not a traceback
        pred = read_predictions(a.pred)
        pred["pmax"] = pred[list(PROB_COLUMNS)].max(axis=1)
        if a.below_sky:
            rows, title = below_sky(pred, model_sky_floor(a.pred), a.per_row)
        else:
            rows, title = by_confidence(pred, a.per_row)
        fig = draw(rows, title, a)
    except AuroraError as exc:  # an unreadable frame too: FrameReadError names the file
        sys.exit(f"predictions_montage: {exc}")
    fig.savefig(a.out, dpi=80)
    print(f"wrote {a.out}")


def draw(rows: list[pd.DataFrame], title: str, a: argparse.Namespace) -> Figure:
    """The montage: one row of frames per entry of ``rows``."""
    fig = Figure(figsize=(a.per_row * 1.6, len(rows) * 1.8), layout="constrained")
    axes = fig.subplots(len(rows), a.per_row, squeeze=False)
    for r, frames in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            ax.set_axis_off()
            if c >= len(frames):
                continue
            row = frames.iloc[c]
            ax.imshow(read_frame(a.root / row["path"]), cmap="gray", vmin=0, vmax=a.vmax)
            when = f" {row['time_utc']:%H:%M}" if a.below_sky else ""
            ax.set_title(f"{row['label']} {row['pmax']:.2f}{when}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    return fig


if __name__ == "__main__":
    main()
