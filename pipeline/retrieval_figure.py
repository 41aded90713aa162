"""The Fig. 6-style retrieval grid: each query with its neighbours at some ranks."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from pipeline.classes import CLASS_COLOURS, CLASSES
from pipeline.errors import AuroraError
from pipeline.retrieval_images import FrameLoader, index_loader
from pipeline.retrieval_index import Index
from pipeline.storage import atomic_path

log = logging.getLogger(__name__)


def try_load(loader: FrameLoader, path: str, frame: int, time: Any) -> np.ndarray | None:
    """A frame to show; None (drawn as missing) when it is gone or unreadable."""
    try:
        return loader(path, frame, time)
    except AuroraError as exc:
        log.warning("cannot show %s: %s", path, exc)
        return None


def item_frame(loader: FrameLoader, items: pd.DataFrame, row: int) -> np.ndarray | None:
    """Item ``row`` of ``items`` (path, frame, time_utc) to show, see :func:`try_load`."""
    it = items.iloc[row]
    return try_load(loader, str(it["path"]), int(it["frame"]), it["time_utc"])


def index_frames(idx: Index, rows: Sequence[int]) -> list[np.ndarray | None]:
    """Index items at ``rows``, preprocessed as when indexed (None where unreadable)."""
    loader = index_loader(idx.meta)
    return [item_frame(loader, idx.items, int(r)) for r in rows]


def figure_title(idx: Index, metric: str = "euclidean") -> str:
    """The figure's title: the index's model and size, the distance."""
    return (
        f"FC7 retrieval ({idx.meta.get('variant')}, model {str(idx.meta.get('model_id'))[:12]}, "
        f"{metric}), {idx.meta.get('count')} frames indexed"
    )


def _panel(ax: Any, img: np.ndarray | None, label: str | None, dashed: bool = False) -> None:
    """One frame of the grid, its border in its class colour (dashed: not the query's class)."""
    if img is None:
        ax.text(0.5, 0.5, "missing", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.imshow(img, cmap="gray", vmin=0.0, vmax=max(1.0, float(np.max(img))))
    ax.set_xticks([])
    ax.set_yticks([])
    colour = CLASS_COLOURS.get(label or "", "0.6")
    for sp in ax.spines.values():
        sp.set_edgecolor(colour)
        sp.set_linewidth(3.5 if label else 0.8)
        sp.set_linestyle("--" if dashed else "-")


def retrieval_grid(
    query_frames: Sequence[np.ndarray | None],
    query_labels: Sequence[str | None],
    neighbour_frames: Sequence[Sequence[np.ndarray | None]],
    neighbour_labels: Sequence[Sequence[str | None]],
    ranks: Sequence[int],
    distances: np.ndarray | None = None,
    row_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Any:
    """Fig. 6-style grid: queries in the first column, neighbours at ``ranks`` after; a Figure.

    Borders take the class colour where a label is known (red arc, green drapery, yellow radial,
    blue hotspot); a neighbour whose class differs from its query's gets a dashed border.
    """
    nrow, ncol = len(query_frames), 1 + len(ranks)
    fig, axes = plt.subplots(
        nrow, ncol, figsize=(1.6 * ncol, 1.6 * nrow + 0.6), squeeze=False, constrained_layout=True
    )
    for r in range(nrow):
        ql = query_labels[r]
        _panel(axes[r, 0], query_frames[r], ql)
        if row_names is not None:
            axes[r, 0].set_ylabel(row_names[r], fontsize=6)
        for c in range(len(ranks)):
            ax = axes[r, c + 1]
            nl = neighbour_labels[r][c]
            _panel(ax, neighbour_frames[r][c], nl, dashed=bool(ql and nl and nl != ql))
            if distances is not None:
                ax.set_xlabel(f"d={distances[r][c]:.3g}", fontsize=6)
    axes[0, 0].set_title("query", fontsize=8)
    for c, rank in enumerate(ranks):
        axes[0, c + 1].set_title(f"rank {rank}", fontsize=8)
    handles = [
        Line2D([], [], color=CLASS_COLOURS[c], lw=3, label=c)
        for c in CLASSES
        if c in set(query_labels) | {x for row in neighbour_labels for x in row}
    ]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    return fig


def retrieval_figure(
    query_frames: Sequence[np.ndarray | None],
    q_items: pd.DataFrame,
    idx: Index,
    indices: np.ndarray,
    distances: np.ndarray,
    ranks: Sequence[int],
    path: Path,
    title: str | None = None,
) -> Path:
    """Draw :func:`retrieval_grid` for queries and their neighbours and save it atomically."""
    cols = [r - 1 for r in ranks]
    loader = index_loader(idx.meta)
    n_frames = [
        [item_frame(loader, idx.items, int(indices[q, c])) for c in cols]
        for q in range(len(indices))
    ]
    labels = idx.items["label"].to_numpy(dtype=object)
    n_labels = [[_lab(labels[int(indices[q, c])]) for c in cols] for q in range(len(indices))]
    fig = retrieval_grid(
        query_frames,
        [_lab(v) for v in q_items["label"]],
        n_frames,
        n_labels,
        ranks,
        distances=distances[:, cols],
        row_names=[Path(p).name for p in q_items["path"]],
        title=title,
    )
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def _lab(v: Any) -> str | None:
    return None if v is None or pd.isna(v) else str(v)
