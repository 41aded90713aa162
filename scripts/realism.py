"""The realism report: synthetic frames beside real YRS frames, class by class (issue #15).

Makes a balanced synthetic labelled set (`synth labelled`), preprocesses it (`preprocess`, dark
frame, crop, r = 220 mask; the stretch limit raised to the 16-bit top so nothing clips), brings
it to 8 bits with one set-wide percentile stretch that puts its pooled 1st and 99.5th
percentiles on the real frames' (pipeline.realism), and compares it with a class-balanced subset
of `yrs_real/labelled` (frames spread over the episodes). Writes to --out:

- realism.md: one table per statistic (real vs synthetic, per class), the share of dark or
  featureless frames (thresholds from `yrs_real/unlabelled`), the domain classifier's AUC;
- realism.png: brightness and contrast histograms, radial profiles, spectra, LBP histograms;
- montage.png: per class a row of real frames (different episodes) above a row of synthetic.

Usage (from the repository root; a few minutes on two cores):

    python scripts/realism.py [--real ../shared/data/yrs_real] [--out results/synth] [--n 40]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from pipeline import realism
from pipeline.classes import CLASS_COLOURS, CLASSES
from pipeline.config import dump_yaml, load_station
from pipeline.imageio import read_frame

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REAL = "../shared/data/yrs_real"
#: Synthetic raw frame size: the YRS camera's, so that preprocess gives the 440x440 form.
SIZE = 512
#: The pipeline's own fixed stretch (configs/stations/yrs.yaml): counts 0..4000 to 0..255.
PIPELINE_STRETCH_HIGH = 4000.0
#: 16-bit top: the stretch limit given to `preprocess` here, so that no count clips.
COUNTS_TOP = 65535.0
#: Frames per block of consecutive synthetic frames (the synthetic side's CV groups).
SYNTH_BLOCK = 4
#: Quantile of the real unlabelled frames' mean and std below which a frame is dark/featureless.
FEATURELESS_QUANTILE = 0.10
TILE = 110
MONTAGE_COLUMNS = 6
SOURCES = ("real", "synthetic")
SOURCE_COLOURS = {"real": "#222222", "synthetic": "#D55E00"}


def log(msg: str) -> None:
    print(f"[realism {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--real",
        default=DEFAULT_REAL,
        help=f"yrs_real folder (labelled/, unlabelled/); default {DEFAULT_REAL} "
        "relative to the repository root",
    )
    ap.add_argument("--out", type=Path, default=REPO / "results" / "synth")
    ap.add_argument("--n", type=int, default=40, help="synthetic frames per class")
    ap.add_argument(
        "--real-n", type=int, default=40, help="real labelled frames per class (at most)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder for the synthetic frames (default: a temporary folder)",
    )
    a = ap.parse_args(argv)
    a.real_arg = a.real
    a.real = REPO / a.real if a.real == DEFAULT_REAL else Path(a.real)
    return a


def check_real(real: Path) -> None:
    """Exit with one line when the real frames are not where --real says."""
    needed = [real / "labelled" / "labels.parquet", real / "unlabelled" / "frames.csv"]
    missing = [p for p in needed if not p.is_file()]
    if missing:
        sys.exit(f"realism: no real frames at {real} ({missing[0]} is missing); pass --real DIR")


# ------------------------------------------------------------------------------ frames


def _cli(*args: str) -> None:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    log(" ".join(["pipeline.cli", *args]))
    subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)


def make_synthetic(work: Path, n: int, seed: int) -> pd.DataFrame:
    """A balanced synthetic labelled set, preprocessed to float counts (no clipping).

    Returns path (of the .npy frame, values are counts / COUNTS_TOP), label and group.
    """
    raw, pre = work / "raw", work / "preprocessed"
    opts = ["--n", str(n * len(CLASSES)), "--size", str(SIZE), "--seed", str(seed)]
    _cli("synth", "labelled", str(raw), *opts, "--balanced", "--overwrite")
    station = load_station("yrs")
    station = replace(station, preprocess=replace(station.preprocess, stretch_high=COUNTS_TOP))
    station_yaml = work / "station.yaml"
    dump_yaml(station, station_yaml)
    opts = ["--out", str(pre), "--format", "npy", "--workers", "1", "--station", str(station_yaml)]
    _cli("preprocess", str(raw), *opts)
    labels = pd.read_parquet(raw / "labels.parquet").sort_values(["label", "time_utc"])
    labels["path"] = [str(pre / Path(p).with_suffix(".npy")) for p in labels["path"]]
    labels["group"] = [
        f"{lab}-{i // SYNTH_BLOCK}"
        for lab, g in labels.groupby("label", sort=False)
        for i in range(len(g))
    ]
    return labels.reset_index(drop=True)


def pick_real(labels: pd.DataFrame, per_class: int, seed: int) -> pd.DataFrame:
    """Up to ``per_class`` frames of each class, spread round-robin over its episodes.

    The first frames of a class come from as many different episodes as it has.
    """
    rng = np.random.default_rng(seed)
    picked = []
    for cls in CLASSES:
        g = labels[labels["label"] == cls]
        g = g.iloc[rng.permutation(len(g))]
        ep_order = {e: i for i, e in enumerate(rng.permutation(g["episode"].unique()))}
        # rank: the frame's place within its episode (after the shuffle); frames of rank 0 first.
        g = g.assign(rank=g.groupby("episode").cumcount(), ep_order=g["episode"].map(ep_order))
        picked.append(g.sort_values(["rank", "ep_order"], kind="stable").head(per_class))
    return pd.concat(picked, ignore_index=True).drop(columns=["rank", "ep_order"])


def read_frames(paths: list[str], what: str) -> list[np.ndarray]:
    frames = []
    for i, p in enumerate(paths):
        frames.append(np.load(p) if p.endswith(".npy") else read_frame(p))
        if (i + 1) % 100 == 0 or i + 1 == len(paths):
            log(f"read {i + 1}/{len(paths)} {what} frames")
    return frames


def pipeline_stretch(counts_frames: list[np.ndarray], horizon: np.ndarray) -> list[np.ndarray]:
    """The pipeline's fixed stretch of the synthetic frames: counts 0..4000 to 0..255."""
    return realism.set_stretch(
        [f * COUNTS_TOP for f in counts_frames], (0.0, PIPELINE_STRETCH_HIGH), (0.0, 255.0), horizon
    )


# ------------------------------------------------------------------------------ analysis


@dataclass
class Side:
    """One source's frames (8-bit) and their statistics, with labels and CV groups."""

    meta: pd.DataFrame
    frames: list[np.ndarray]
    desc: realism.Description

    def of(self, cls: str) -> np.ndarray:
        return (self.meta["label"] == cls).to_numpy()


def describe_side(meta: pd.DataFrame, frames: list[np.ndarray], what: str) -> Side:
    log(f"statistics of {len(frames)} {what} frames")
    t = time.time()
    desc = realism.describe(frames, realism.circle_mask(frames[0].shape[0]))
    log(f"  {time.time() - t:.0f} s")
    return Side(meta.reset_index(drop=True), frames, desc)


def domain(real: Side, syn: Side, family: str | None = None) -> realism.DomainResult:
    """The domain classifier on all features, or on one of realism.FEATURE_FAMILIES."""
    xr, xs = realism.feature_matrix(real.desc), realism.feature_matrix(syn.desc)
    if family is not None:
        cols = realism.family_columns(xr.columns, family)
        xr, xs = xr[cols], xs[cols]
    return realism.domain_auc(xr, xs, real.meta["episode"].tolist(), syn.meta["group"].tolist())


def unlabelled_scalars(real: Path) -> pd.DataFrame:
    """Mean and std inside the analysis circle of every real unlabelled frame."""
    paths = [
        str(real / "unlabelled" / p)
        for p in pd.read_csv(real / "unlabelled" / "frames.csv")["path"]
    ]
    mask = realism.circle_mask(440)
    rows = []
    for i, p in enumerate(paths):
        rows.append(realism.brightness(read_frame(p), mask))
        if (i + 1) % 200 == 0 or i + 1 == len(paths):
            log(f"unlabelled frames {i + 1}/{len(paths)}")
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------ tables


def _cell(v: np.ndarray, fmt: str = "{:.1f}") -> str:
    v = np.asarray(v, dtype=float)
    v = v[np.isfinite(v)]
    if not v.size:
        return "-"
    lo, med, hi = np.percentile(v, [10, 50, 90])
    return f"{fmt.format(med)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def scalar_table(
    real: Side, syn: Side, column: str, fmt: str, gaps: list, pipe: Side | None = None
) -> list[str]:
    """Rows: classes; cells: median [10th, 90th percentile] of a per-frame statistic; KS D.

    With ``pipe``, a last column shows the synthetic frames under the pipeline's fixed stretch.
    """
    extra = ("", "")
    if pipe is not None:
        extra = (" synthetic, fixed stretch | KS D |", "---:|---:|")
    lines = [f"| class | real | synthetic | KS D |{extra[0]}", f"|---|---:|---:|---:|{extra[1]}"]
    for cls in CLASSES:
        a = real.desc.scalars[column].to_numpy()[real.of(cls)]
        b = syn.desc.scalars[column].to_numpy()[syn.of(cls)]
        d = realism.ks_distance(a, b)
        gaps.append((d, column, cls, np.nanmedian(a), np.nanmedian(b)))
        row = f"| {cls} | {_cell(a, fmt)} | {_cell(b, fmt)} | {d:.2f} |"
        if pipe is not None:
            c = pipe.desc.scalars[column].to_numpy()[pipe.of(cls)]
            row += f" {_cell(c, fmt)} | {realism.ks_distance(a, c):.2f} |"
        lines.append(row)
    return lines


def profile_table(real: Side, syn: Side) -> list[str]:
    """Mean brightness at a few zenith distances, real / synthetic, per class."""
    radii = real.desc.radii
    at = [0, 50, 100, 150, 200]
    idx = [int(np.argmin(np.abs(radii - r))) for r in at]
    head = " | ".join(f"r={radii[i]:.0f}" for i in idx)
    lines = [f"| class | {head} |", "|---|" + "---:|" * len(idx)]
    for cls in CLASSES:
        pr = np.nanmean(real.desc.profiles[real.of(cls)], axis=0)
        ps = np.nanmean(syn.desc.profiles[syn.of(cls)], axis=0)
        lines.append(f"| {cls} | " + " | ".join(f"{pr[i]:.0f} / {ps[i]:.0f}" for i in idx) + " |")
    return lines


def lbp_table(real: Side, syn: Side, gaps: list) -> list[str]:
    """Mean LBP code shares (%) at full resolution per class and source; TV at both scales."""
    codes = " | ".join(str(c) for c in range(realism.LBP_CODES))
    lines = [
        f"| class | source | {codes} | TV (x1) | TV (x2) |",
        "|---|---|" + "---:|" * (realism.LBP_CODES + 2),
    ]
    for cls in CLASSES:
        hr = real.desc.lbp[real.of(cls)].mean(axis=0)
        hs = syn.desc.lbp[syn.of(cls)].mean(axis=0)
        tv = [realism.total_variation(hr[s], hs[s]) for s in range(len(realism.LBP_SCALES))]
        gaps.append((tv[0], "LBP x1 (TV)", cls, np.nan, np.nan))
        for src, h in (("real", hr), ("synthetic", hs)):
            cells = " | ".join(f"{100 * x:.1f}" for x in h[0])
            tail = f"{tv[0]:.2f} | {tv[1]:.2f}" if src == "real" else " | "
            lines.append(f"| {cls} | {src} | {cells} | {tail} |")
    return lines


def featureless_table(real: Side, syn: Side, thr: dict, unl: pd.DataFrame) -> list[str]:
    lines = ["| class | real | synthetic |", "|---|---:|---:|"]
    fr = realism.is_featureless(real.desc.scalars, thr)
    fs = realism.is_featureless(syn.desc.scalars, thr)
    for cls in CLASSES:
        lines.append(f"| {cls} | {fr[real.of(cls)].mean():.1%} | {fs[syn.of(cls)].mean():.1%} |")
    lines.append(f"| all | {fr.mean():.1%} | {fs.mean():.1%} |")
    lines.append(
        f"| real unlabelled ({len(unl)}) | {realism.is_featureless(unl, thr).mean():.1%} | |"
    )
    return lines


def domain_table(results: dict[str, tuple[realism.DomainResult, Side, Side]]) -> list[str]:
    lines = [
        "| features; synthetic 8-bit form | all | " + " | ".join(CLASSES) + " |",
        "|---|" + "---:|" * (len(CLASSES) + 1),
    ]
    for name, (res, real, syn) in results.items():
        per = []
        for cls in CLASSES:
            rows = np.r_[real.of(cls), syn.of(cls)]
            per.append(f"{res.auc_within(rows):.3f}")
        lines.append(f"| {name} | **{res.auc:.3f}** | " + " | ".join(per) + " |")
    return lines


def largest_gaps(gaps: list, n: int = 8) -> list[str]:
    out = []
    for d, stat, cls, med_real, med_syn in sorted(gaps, key=lambda g: -np.nan_to_num(g[0]))[:n]:
        medians = (
            "" if np.isnan(med_real) else f" (median {med_real:.2f} real, {med_syn:.2f} synthetic)"
        )
        out.append(f"- {stat}, {cls}: {d:.2f}{medians}")
    return out


def top_features(res: realism.DomainResult, n: int = 8) -> str:
    coef = res.coefficients.reindex(res.coefficients.abs().sort_values(ascending=False).index)
    return ", ".join(f"{name} ({w:+.2f})" for name, w in coef.head(n).items())


# ------------------------------------------------------------------------------ figures


def _hist(ax, real: Side, syn: Side, cls: str, column: str, bins: np.ndarray) -> None:
    for side, src in ((real, "real"), (syn, "synthetic")):
        v = side.desc.scalars[column].to_numpy()[side.of(cls)]
        ax.hist(
            np.clip(v, bins[0], bins[-1]),
            bins=bins,
            density=True,
            histtype="step",
            color=SOURCE_COLOURS[src],
            label=src,
            lw=1.3,
        )


def _profile(ax, real: Side, syn: Side, cls: str) -> None:
    for side, src in ((real, "real"), (syn, "synthetic")):
        p = side.desc.profiles[side.of(cls)]
        lo, mid, hi = np.nanpercentile(p, [10, 50, 90], axis=0)
        ax.plot(side.desc.radii, mid, color=SOURCE_COLOURS[src], lw=1.3)
        ax.fill_between(side.desc.radii, lo, hi, color=SOURCE_COLOURS[src], alpha=0.15, lw=0)


def _spectrum(ax, real: Side, syn: Side, cls: str) -> None:
    for side, src in ((real, "real"), (syn, "synthetic")):
        s = side.desc.spectra[side.of(cls)]
        ax.loglog(
            side.desc.k,
            np.exp(np.nanmean(np.log(np.maximum(s, 1e-12)), axis=0)),
            color=SOURCE_COLOURS[src],
            lw=1.3,
        )
    ax.axvspan(*realism.SPECTRUM_BAND, color="0.9", zorder=0)


def _lbp(ax, real: Side, syn: Side, cls: str) -> None:
    x = np.arange(realism.LBP_CODES)
    for j, (side, src) in enumerate(((real, "real"), (syn, "synthetic"))):
        h = side.desc.lbp[side.of(cls), 0].mean(axis=0)
        ax.bar(x + (j - 0.5) * 0.4, h, width=0.4, color=SOURCE_COLOURS[src])
    ax.set_xticks(x)


def realism_figure(real: Side, syn: Side, out: Path) -> None:
    """Per class (rows): frame-mean and frame-std histograms, radial profile, spectrum, LBP."""
    titles = (
        "frame mean (8-bit)",
        "frame std (contrast)",
        "radial profile: median, 10-90%",
        "power spectrum (geometric mean)",
        "LBP code shares (x1)",
    )
    fig = Figure(figsize=(17, 12), layout="constrained")
    axes = fig.subplots(len(CLASSES), len(titles))
    for r, cls in enumerate(CLASSES):
        _hist(axes[r, 0], real, syn, cls, "mean", np.arange(0, 124, 4.0))
        _hist(axes[r, 1], real, syn, cls, "std", np.arange(0, 72, 2.0))
        _profile(axes[r, 2], real, syn, cls)
        _spectrum(axes[r, 3], real, syn, cls)
        _lbp(axes[r, 4], real, syn, cls)
        axes[r, 0].set_ylabel(cls, fontsize=12, color=CLASS_COLOURS[cls])
    for c, title in enumerate(titles):
        axes[0, c].set_title(title, fontsize=10)
    axes[-1, 2].set_xlabel("distance from zenith (px, 220 = horizon)")
    axes[-1, 3].set_xlabel("k (cycles per 256 px; shaded: fit band)")
    axes[-1, 4].set_xlabel("LBP code (8: flat, 9: non-uniform)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(
        f"real yrs_real/labelled ({len(real.frames)} frames, black) vs synthetic "
        f"({len(syn.frames)} frames, orange), same 8-bit 440x440 form",
        fontsize=11,
    )
    fig.savefig(out, dpi=70)


def _tile(frame: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(frame).resize((TILE, TILE), Image.Resampling.BOX))


def montage(real: Side, syn: Side, out: Path) -> None:
    """Per class a row of real frames (different episodes) above a row of synthetic frames."""
    gap, label_w, ncol = 2, 120, MONTAGE_COLUMNS
    rows = [(cls, src) for cls in CLASSES for src in SOURCES]
    w = label_w + ncol * (TILE + gap)
    h = len(rows) * (TILE + gap)
    canvas = np.full((h, w), 255, np.uint8)
    for r, (cls, side) in enumerate((c, real if s == "real" else syn) for c, s in rows):
        idx = np.flatnonzero(side.of(cls))[:ncol]
        for c, i in enumerate(idx):
            y, x = r * (TILE + gap), label_w + c * (TILE + gap)
            canvas[y : y + TILE, x : x + TILE] = _tile(side.frames[i])
    fig = Figure(figsize=(w / 100, h / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    for r, (cls, src) in enumerate(rows):
        ax.text(
            6,
            r * (TILE + gap) + TILE / 2,
            f"{cls}\n{src}",
            va="center",
            fontsize=10,
            color=CLASS_COLOURS[cls] if src == "real" else "black",
        )
    ax.set_axis_off()
    fig.savefig(out, dpi=100)


# ------------------------------------------------------------------------------ report


@dataclass
class Setup:
    """What the report states about how the two sides were made comparable."""

    real_anchor: np.ndarray  # pooled percentiles of the real frames (8-bit levels)
    syn_anchor: np.ndarray  # the same percentiles of the synthetic frames (counts)
    thresholds: dict  # dark / featureless thresholds
    n_unlabelled: int
    n_episodes: dict  # episodes per class in the real subset


def _intro(a: argparse.Namespace, real: Side, syn: Side, s: Setup) -> list[str]:
    lo, hi = realism.STRETCH_PERCENTILES
    eps = ", ".join(
        f"{c} {len(real.meta[real.of(c)])} frames / {s.n_episodes[c]} episodes" for c in CLASSES
    )
    band = realism.SPECTRUM_BAND
    return [
        "# Realism report: synthetic frames beside real YRS frames",
        "",
        f"Real: `yrs_real/labelled`, up to {a.real_n} frames per class spread over the episodes "
        f"({eps}). Synthetic: `synth labelled --n {a.n * len(CLASSES)} --balanced --seed "
        f"{a.seed}` (512 px raw), `preprocess` (dark frame, 440 crop, r = 220 mask).",
        "",
        f"**8-bit form.** The real frames are used as the station's group stretched them (one "
        f"fixed linear stretch for the archive: dim frames stay dim). The synthetic set gets the "
        f"same kind of stretch: one linear map for the whole set that puts its pooled "
        f"percentiles p{lo:g} and p{hi:g} of the pixels inside the circle "
        f"({s.syn_anchor[0]:.0f} and {s.syn_anchor[1]:.0f} counts above the dark frame) on the "
        f"real frames' ({s.real_anchor[0]:.0f} and {s.real_anchor[1]:.0f}), clipped to 0..255. "
        f"This removes the one free gain and offset and keeps each frame's brightness relative "
        f"to the others. The pipeline's own fixed stretch (counts 0..{PIPELINE_STRETCH_HIGH:.0f} "
        f"to 0..255, what training reads) is shown beside it for brightness, contrast and AUC.",
        "",
        f"Statistics inside r <= {realism.ANALYSIS_RADIUS:g} px of the 440x440 frame "
        f"(`pipeline/realism.py`). Cells: median [10th, 90th percentile] over frames; KS D: the "
        f"two-sample Kolmogorov-Smirnov distance (0 same, 1 disjoint). Spectral slope: log-log "
        f"fit of the radially averaged power spectrum of the central "
        f"{realism.SPECTRUM_BOX} px square (Hann window) over k = {band[0]:g}..{band[1]:g} "
        f"cycles per {realism.SPECTRUM_BOX} px (wavelengths {realism.SPECTRUM_BOX / band[0]:g} "
        f"to {realism.SPECTRUM_BOX / band[1]:g} px), and over its coarse and fine parts.",
        "",
    ]


def write_report(
    a, real: Side, syn: Side, pipe: Side, s: Setup, results, unl, out: Path
) -> list[str]:
    """Write realism.md; return the largest gaps (for the console)."""
    gaps: list = []
    thr = s.thresholds
    res = next(iter(results.values()))[0]
    md = _intro(a, real, syn, s)
    sections = [
        ("Brightness: frame mean (8-bit)", scalar_table(real, syn, "mean", "{:.1f}", gaps, pipe)),
        (
            "Contrast: frame standard deviation",
            scalar_table(real, syn, "std", "{:.1f}", gaps, pipe),
        ),
        (
            "Radial profile: mean brightness at distance r (px) from zenith, real / synthetic",
            profile_table(real, syn),
        ),
        (
            "Limb-to-zenith ratio (mean beyond r = 180 over mean within r = 40)",
            scalar_table(real, syn, "limb_ratio", "{:.2f}", gaps),
        ),
        *(
            (
                f"Power-spectrum slope over k = {b[0]:g}..{b[1]:g} ({name})",
                scalar_table(real, syn, name, "{:.2f}", gaps),
            )
            for name, b in realism.SLOPE_BANDS.items()
        ),
        (
            "Texture: uniform LBP (8 neighbours, radius 1) code shares in %, and the "
            "total-variation distance of the mean histograms at full resolution (x1) and after "
            "2x2 binning (x2)",
            lbp_table(real, syn, gaps),
        ),
        (
            f"Dark or featureless frames: mean < {thr['mean']:.1f} or std < {thr['std']:.1f}, the "
            f"{FEATURELESS_QUANTILE:.0%} quantiles of the {s.n_unlabelled} real unlabelled frames",
            featureless_table(real, syn, thr, unl),
        ),
        ("Domain classifier: ROC AUC of real vs synthetic", domain_table(results)),
    ]
    for title, table in sections:
        md += [f"## {title}", "", *table, ""]
    gap_lines = largest_gaps(gaps)
    md += [
        "Logistic regression (standardised, C = 1) on the per-frame statistics: the scalars "
        "above, the radial-profile shape in 6 rings (over the frame mean) and the LBP shares at "
        "both scales; out-of-fold scores of 5-fold StratifiedGroupKFold, real frames grouped by "
        f"episode, synthetic frames by blocks of {SYNTH_BLOCK}; per-class AUCs use the same "
        "scores; the rows below the first two use one family of statistics only. 0.5: "
        "indistinguishable. Heaviest weights of the first row (+: synthetic): " + top_features(res),
        "",
        "## Largest gaps (KS D, LBP: total variation)",
        "",
        *gap_lines,
        "",
        "Figures: `realism.png` (the statistics), `montage.png` (real rows above synthetic rows, "
        f"{TILE} px tiles, synthetic in the set-stretched form above).",
        "",
        "Made by (from the repository root):",
        "",
        f"    python scripts/realism.py --real {a.real_arg} --n {a.n} --real-n {a.real_n} "
        f"--seed {a.seed}",
        "",
    ]
    (out / "realism.md").write_text("\n".join(md))
    return gap_lines


# ------------------------------------------------------------------------------ main


def load_sides(a: argparse.Namespace, work: Path) -> tuple[Side, Side, Side, Setup]:
    """Make and read both sides, bring the synthetic frames to 8 bits, describe all three."""
    syn_meta = make_synthetic(work, a.n, a.seed)
    labels = pd.read_parquet(a.real / "labelled" / "labels.parquet")
    real_meta = pick_real(labels, a.real_n, a.seed)
    real_frames = read_frames([str(a.real / "labelled" / p) for p in real_meta["path"]], "real")
    counts = read_frames(syn_meta["path"].tolist(), "synthetic")
    analysis, horizon = realism.circle_mask(440), realism.circle_mask(440, 220.0)
    real_anchor = realism.pooled_percentiles(real_frames, analysis)
    syn_anchor = realism.pooled_percentiles(counts, analysis)
    syn8 = realism.set_stretch(counts, syn_anchor, real_anchor, horizon)
    pipe8 = pipeline_stretch(counts, horizon)
    setup = Setup(
        real_anchor,
        syn_anchor * COUNTS_TOP,
        {},
        0,
        real_meta.groupby("label")["episode"].nunique().to_dict(),
    )
    real = describe_side(real_meta, real_frames, "real")
    syn = describe_side(syn_meta, syn8, "synthetic")
    pipe = describe_side(syn_meta, pipe8, "synthetic (fixed stretch)")
    return real, syn, pipe, setup


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    check_real(a.real)
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="realism-") as tmp:
        real, syn, pipe, setup = load_sides(a, a.work or Path(tmp))
    unl = unlabelled_scalars(a.real)
    setup.thresholds = realism.featureless_thresholds(unl, FEATURELESS_QUANTILE)
    setup.n_unlabelled = len(unl)
    log("domain classifiers")
    results = {
        "all; set-wide percentile stretch": (domain(real, syn), real, syn),
        "all; pipeline's fixed stretch": (domain(real, pipe), real, pipe),
    }
    for family in realism.FEATURE_FAMILIES:
        results[f"{family} only; set-wide stretch"] = (domain(real, syn, family), real, syn)
    gap_lines = write_report(a, real, syn, pipe, setup, results, unl, a.out)
    realism_figure(real, syn, a.out / "realism.png")
    montage(real, syn, a.out / "montage.png")
    for name, (res, _, _) in results.items():
        log(f"domain AUC ({name}): {res.auc:.3f}")
    print("largest gaps:\n" + "\n".join(gap_lines))
    log(f"wrote {a.out / 'realism.md'}, realism.png, montage.png")


if __name__ == "__main__":
    main()
