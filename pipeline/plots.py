"""Figures of the pipeline (pure: tables in, matplotlib Figure out) and one atomic saver.

- ``plot_occurrence``: the paper's Fig. 7 (frames per MLT bin, then the ratio of each class).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MultipleLocator

from pipeline.classes import CLASS_COLOURS, CLASSES
from pipeline.config import CONFIG_DIR, load_config
from pipeline.storage import atomic_path

LOW_COUNT_COLOUR = "#c8c8c8"
#: Journal single-column width in inches.
COLUMN_WIDTH_IN = 3.5
_RC = {
    "font.size": 7,
    "axes.labelsize": 7,
    "axes.titlesize": 7,
    "xtick.labelsize": 6.5,
    "ytick.labelsize": 6.5,
    "legend.fontsize": 6,
    "axes.linewidth": 0.6,
}

DEFAULT_REGIONS = CONFIG_DIR / "occurrence" / "regions.yaml"


# ----------------------------------------------------------------------------- regions config


@dataclass(frozen=True)
class Region:
    """One dayside active region: a short label, a name and its MLT span in hours."""

    label: str
    name: str
    start: float
    end: float

    def validate(self) -> None:
        if not 0 <= self.start < self.end <= 24:
            raise ValueError(f"region {self.label}: need 0 <= start < end <= 24")


@dataclass(frozen=True)
class RegionsConfig:
    """configs/occurrence/regions.yaml: active regions (bold dashed) and minor boundaries (thin)."""

    source: str = ""
    verified: bool = False
    regions: tuple[Region, ...] = ()
    minor_boundaries: tuple[float, ...] = ()
    note: str = ""

    def boundaries(self) -> list[float]:
        """The MLTs of the bold dashed lines: every region start and end, once each."""
        return sorted({r.start for r in self.regions} | {r.end for r in self.regions})


def load_regions(path: str | os.PathLike | None = None) -> RegionsConfig:
    """Load the regions YAML (default configs/occurrence/regions.yaml)."""
    return load_config(RegionsConfig, path or DEFAULT_REGIONS)


# ----------------------------------------------------------------------------- Fig. 7


def plot_occurrence(
    table: pd.DataFrame,
    regions: RegionsConfig | str | os.PathLike | None = None,
    min_frames: int = 0,
    ci: bool = True,
    corrected: bool = True,
    title: str | None = None,
    width_in: float = COLUMN_WIDTH_IN,
) -> Figure:
    """The occurrence figure: frames per bin on top, then one ratio panel per class (5 axes).

    ``table`` is an ungrouped occurrence table. Bins with fewer than ``min_frames`` frames are
    drawn grey. Interval bands and corrected ratios are drawn when the table has them and
    ``ci`` / ``corrected`` are true. ``regions``: a RegionsConfig, a YAML path, or None for
    the default file; pass ``RegionsConfig()`` for none. A table whose range crosses midnight
    (rows 22, ..., 23.5, 0, ..., 1.5) is drawn on one continuous axis (22-26, labelled 22-02).
    """
    by = table.attrs.get("by")
    if by or any(c in table.columns for c in ("year", "winter", "day")):
        raise ValueError("plot_occurrence needs an ungrouped table (one row per MLT bin)")
    if not isinstance(regions, RegionsConfig):
        regions = load_regions(regions)
    start = table["mlt_start"].to_numpy(float)
    end = table["mlt_end"].to_numpy(float)
    width = end - start
    # After midnight the bin starts fall back to 0: continue the axis past 24 (ticks are mod 24).
    turn = 24.0 * np.concatenate([[0], np.cumsum(np.diff(start) < 0)])
    start, end = start + turn, end + turn
    n = table["n_frames"].to_numpy()
    low = n < max(min_frames, 1)
    lo_x, hi_x = float(start.min()), float(end.max())

    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(width_in, width_in * 1.75), layout="constrained")
        axes = fig.subplots(
            len(CLASSES) + 1,
            1,
            sharex=True,
            gridspec_kw={"height_ratios": [1.2] + [1] * len(CLASSES)},
        )
        top = axes[0]
        colours = np.where(low, LOW_COUNT_COLOUR, "0.25")
        top.bar(start, n, width=width, align="edge", color=colours, linewidth=0)
        top.set_ylabel("(a) frames\nper bin")
        top.set_ylim(0, max(1, n.max()) * 1.08)
        for i, cls in enumerate(CLASSES):
            ax = axes[i + 1]
            ratio = table[f"ratio_{cls}"].to_numpy(float)
            col = np.where(low, LOW_COUNT_COLOUR, CLASS_COLOURS[cls])
            ax.bar(start, np.nan_to_num(ratio), width=width, align="edge", color=col, lw=0)
            if ci and f"ci_low_{cls}" in table.columns:
                lo = table[f"ci_low_{cls}"].to_numpy(float)
                hi = table[f"ci_high_{cls}"].to_numpy(float)
                ax.fill_between(
                    np.append(start, end[-1]),
                    np.append(lo, lo[-1]),
                    np.append(hi, hi[-1]),
                    step="post",
                    color="0.1",
                    alpha=0.25,
                    zorder=3,
                    lw=0,
                    label=(
                        "95% interval (days as clusters)"
                        if table.attrs.get("ci_method") == "wilson-days"
                        else "95% interval"
                    ),
                )
            if corrected and f"ratio_{cls}_corrected" in table.columns:
                rc = table[f"ratio_{cls}_corrected"].to_numpy(float)
                ax.step(
                    np.append(start, end[-1]),
                    np.append(rc, rc[-1]),
                    where="post",
                    color="k",
                    lw=0.7,
                    label="corrected",
                )
            ax.set_ylim(0, 1)
            ax.yaxis.set_major_locator(MultipleLocator(0.5))
            ax.yaxis.set_minor_locator(MultipleLocator(0.25))
            ax.set_ylabel(f"({chr(ord('b') + i)}) {cls}\nratio")
        for ax in axes:
            for x in regions.boundaries():
                for xx in (x, x + 24.0):  # x + 24: the same MLT after midnight
                    if lo_x < xx < hi_x:
                        ax.axvline(xx, color="k", ls="--", lw=0.9)
            for x in regions.minor_boundaries:
                for xx in (x, x + 24.0):
                    if lo_x < xx < hi_x:
                        ax.axvline(xx, color="k", ls="--", lw=0.4)
            ax.tick_params(direction="out", length=2.5, width=0.6)
        for r, shift in ((r, shift) for r in regions.regions for shift in (0.0, 24.0)):
            a, b = max(r.start + shift, lo_x), min(r.end + shift, hi_x)
            mid = (a + b) / 2
            if a < b and lo_x < mid < hi_x:
                top.text(
                    mid,
                    1.02,
                    r.label,
                    transform=top.get_xaxis_transform(),
                    ha="center",
                    va="bottom",
                    fontweight="bold",
                    fontsize=7,
                )
        bottom = axes[-1]
        bottom.set_xlim(lo_x, hi_x)
        bottom.xaxis.set_major_locator(MultipleLocator(1.0 if hi_x - lo_x <= 12 else 2.0))
        bottom.xaxis.set_major_formatter(lambda v, _pos: f"{int(round(v)) % 24:02d}")
        bottom.set_xlabel("magnetic local time (h)")
        handles, labels = axes[1].get_legend_handles_labels()
        if handles:
            bottom.legend(
                handles,
                labels,
                loc="upper left",
                bbox_to_anchor=(0.0, -0.42),
                ncol=2,
                frameon=False,
                handlelength=1.4,
                borderaxespad=0,
            )
        notes = []
        if min_frames > 0 and low.any():
            notes.append(f"grey: bins with < {min_frames} frames")
        if regions.regions and not regions.verified:
            notes.append("region boundaries approximate")
        if title:
            fig.suptitle(title, fontsize=7.5)
        if notes:
            bottom.text(
                1.0,
                -0.45,
                "; ".join(notes),
                transform=bottom.transAxes,
                ha="right",
                va="top",
                fontsize=5.5,
                color="0.35",
            )
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 300) -> Path:
    """Save a figure atomically; the format follows the suffix (.png, .pdf, .svg)."""
    p = Path(path)
    with atomic_path(p) as tmp:
        fig.savefig(tmp, format=p.suffix.lstrip(".") or "png", dpi=dpi)
    return p


__all__ = [
    "CLASS_COLOURS",
    "Region",
    "RegionsConfig",
    "load_regions",
    "plot_occurrence",
    "save_figure",
]


def cv_figure(table: pd.DataFrame, classes: tuple[str, ...] | list[str] = CLASSES) -> Figure:
    """Cross-validation accuracies: per variant, each class's mean over folds with the folds as
    dots, and the mean per-class accuracy."""
    variants = list(dict.fromkeys(table["variant"]))
    keys = [f"acc_{c}" for c in classes] + ["mean_class_accuracy"]
    labels = list(classes) + ["mean per-class"]
    colours = [CLASS_COLOURS.get(c, "grey") for c in classes] + ["black"]
    fig = Figure(figsize=(max(6.0, 1.6 * len(variants) + 2), 4.0), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(keys)
    for j, (key, label, colour) in enumerate(zip(keys, labels, colours)):
        for i, v in enumerate(variants):
            vals = table.loc[table["variant"] == v, key].to_numpy(dtype=float)
            x = i + (j - (len(keys) - 1) / 2) * width
            ax.bar(x, np.nanmean(vals), width * 0.9, color=colour, alpha=0.55,
                   label=label if i == 0 else None)  # fmt: skip
            ax.plot(np.full(len(vals), x), vals, "o", color=colour, ms=3)
    ax.set_xticks(range(len(variants)), variants, rotation=15, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy on held-out folds")
    ax.yaxis.set_major_locator(MultipleLocator(0.1))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=len(keys), loc="lower center", bbox_to_anchor=(0.5, 1.0))
    return fig
