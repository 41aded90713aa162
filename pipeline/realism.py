"""Realism statistics: how synthetic all-sky frames compare with real ones (pure: arrays in,
numbers and arrays out; ``scripts/realism.py`` reads the frames and writes the report).

Every statistic takes frames in the preprocessed form (square, 440x440 at YRS, the horizon
circle at the centre) and looks only inside an analysis circle of radius ``ANALYSIS_RADIUS``,
a few pixels inside the r = 220 horizon, so that the rim, where masks of different origin differ
by a pixel, does not count:

- brightness and contrast: the mean and standard deviation of the pixels inside the circle;
- the radial profile: the mean brightness in rings of ``PROFILE_BIN`` pixels of zenith distance;
- the power-spectrum slope: the log-log slope of the radially averaged power spectrum of the
  central ``SPECTRUM_BOX`` square (Hann-windowed, mean removed) over ``SPECTRUM_BAND``
  (cycles per box; 4..64 is wavelengths from 64 px down to 4 px), and over its coarse and fine
  parts (``SLOPE_BANDS``);
- texture: rotation-invariant uniform LBP histograms (8 neighbours at radius 1, 10 codes) at the
  full resolution and after 2x2 binning;
- dark or featureless frames: a mean or a standard deviation below thresholds taken as a
  quantile of real frames (``featureless_thresholds``);
- a domain classifier: logistic regression on those statistics telling real from synthetic,
  scored by its ROC AUC under grouped cross-validation (``domain_auc``).

Both sides are brought to 8 bits by ``set_stretch``: one linear stretch per set of frames whose
limits are pooled percentiles of that set (the way a station stretches a whole archive with fixed
limits), so that the frames of a set keep their brightness relative to each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

#: Radius (px) of the analysis circle, inside the r = 220 horizon of the 440x440 form.
ANALYSIS_RADIUS = 215.0
#: Pooled percentiles that anchor the 8-bit stretch of a set of frames.
STRETCH_PERCENTILES = (1.0, 99.5)
#: Ring width (px) of the radial profile.
PROFILE_BIN = 5.0
#: Side (px) of the central square whose power spectrum is taken.
SPECTRUM_BOX = 256
#: Frequency band (cycles per SPECTRUM_BOX) of the spectral-slope fit.
SPECTRUM_BAND = (4.0, 64.0)
#: The per-frame slopes: the whole band, and its coarse (wavelengths 128..16 px) and fine
#: (16..4 px) parts, which tell smooth structure from pixel-scale noise.
SLOPE_BANDS = {"slope": SPECTRUM_BAND, "slope_coarse": (2.0, 16.0), "slope_fine": (16.0, 64.0)}
#: Rotation-invariant uniform LBP with 8 neighbours: codes 0..8 (the number of neighbours at
#: least as bright as the centre, for patterns with at most two 0/1 transitions) and 9 (others).
LBP_CODES = 10
#: LBP scales: 1 is the full resolution, 2 the frame after 2x2 binning.
LBP_SCALES = (1, 2)
#: Coarse radial-profile bins (px edges) for the domain classifier's profile-shape features.
SHAPE_EDGES = (0.0, 36.0, 72.0, 108.0, 144.0, 180.0, ANALYSIS_RADIUS)
#: Families of the domain classifier's features, by column-name prefix.
FEATURE_FAMILIES = {
    "brightness": ("mean", "std", "p1", "p50", "p99"),
    "radial profile": ("limb_ratio", "profile_"),
    "spectrum": ("slope",),
    "texture (LBP)": ("lbp",),
}
#: Neighbours of a pixel in circular order (row, column offsets).
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))
#: Per-frame scalar statistics, in the order of ``Description.scalars``.
SCALARS = ("mean", "std", "p1", "p50", "p99", "limb_ratio", *SLOPE_BANDS)


def circle_mask(size: int, radius: float = ANALYSIS_RADIUS) -> np.ndarray:
    """A boolean (size, size) disc of ``radius`` around the centre ((size - 1) / 2)."""
    mid = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size]
    return (yy - mid) ** 2 + (xx - mid) ** 2 <= radius * radius


def pooled_percentiles(
    frames: Sequence[np.ndarray],
    mask: np.ndarray,
    percentiles: Sequence[float] = STRETCH_PERCENTILES,
    step: int = 7,
) -> np.ndarray:
    """Percentiles of the pixels inside ``mask`` of all ``frames`` (every ``step``-th pixel)."""
    pixels = np.concatenate([np.asarray(f, dtype=np.float32)[mask][::step] for f in frames])
    return np.percentile(pixels, percentiles)


def set_stretch(
    frames: Sequence[np.ndarray],
    source: Sequence[float],
    target: Sequence[float],
    mask: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Map every frame linearly so that ``source`` values land on ``target`` 8-bit levels.

    The result is clipped to 0..255 and rounded to uint8; pixels outside ``mask`` become 0.
    """
    (s0, s1), (t0, t1) = source, target
    if s1 <= s0:
        raise ValueError(f"set_stretch: source limits {source} must increase")
    gain = (t1 - t0) / (s1 - s0)
    out = []
    for f in frames:
        y = np.clip(np.rint(t0 + (np.asarray(f, dtype=np.float64) - s0) * gain), 0, 255)
        y = y.astype(np.uint8)
        if mask is not None:
            y[~mask] = 0
        out.append(y)
    return out


def radial_profile(
    frame: np.ndarray, radius: float = ANALYSIS_RADIUS, bin_width: float = PROFILE_BIN
) -> tuple[np.ndarray, np.ndarray]:
    """Ring centres (px from the frame centre) and the mean brightness in each ring."""
    h, w = frame.shape
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(yy - (h - 1) / 2.0, xx - (w - 1) / 2.0)
    inside = r <= radius
    n_bins = int(np.ceil(radius / bin_width))
    idx = np.minimum((r[inside] / bin_width).astype(int), n_bins - 1)
    sums = np.bincount(idx, weights=frame[inside].astype(np.float64), minlength=n_bins)
    counts = np.bincount(idx, minlength=n_bins)
    centres = (np.arange(n_bins) + 0.5) * bin_width
    with np.errstate(invalid="ignore", divide="ignore"):
        return centres, sums / counts


def radial_spectrum(frame: np.ndarray, box: int = SPECTRUM_BOX) -> tuple[np.ndarray, np.ndarray]:
    """The radially averaged power spectrum of the central ``box`` square.

    Returns integer frequencies k = 1..box // 2 (cycles per box) and the mean power in the
    ring of each (|k - k'| < 0.5); the square is Hann-windowed after its mean is removed.
    """
    h, w = frame.shape
    if min(h, w) < box:
        raise ValueError(f"radial_spectrum: frame {h}x{w} is smaller than the {box}-px box")
    r0, c0 = (h - box) // 2, (w - box) // 2
    sq = np.asarray(frame[r0 : r0 + box, c0 : c0 + box], dtype=np.float64)
    win = np.outer(np.hanning(box), np.hanning(box))
    power = np.abs(np.fft.fft2((sq - sq.mean()) * win)) ** 2
    f = np.fft.fftfreq(box) * box
    k = np.rint(np.hypot(*np.meshgrid(f, f, indexing="ij"))).astype(int).ravel()
    sums = np.bincount(k, weights=power.ravel())
    counts = np.bincount(k)
    ks = np.arange(1, box // 2 + 1)
    return ks.astype(float), sums[ks] / counts[ks]


def spectral_slope(
    k: np.ndarray, power: np.ndarray, band: Sequence[float] = SPECTRUM_BAND
) -> float:
    """The slope of log10(power) against log10(k) over ``band`` (NaN if under 3 usable points)."""
    sel = (k >= band[0]) & (k <= band[1]) & (power > 0) & np.isfinite(power)
    if sel.sum() < 3:
        return float("nan")
    return float(np.polyfit(np.log10(k[sel]), np.log10(power[sel]), 1)[0])


def lbp_codes(frame: np.ndarray) -> np.ndarray:
    """Rotation-invariant uniform LBP codes (0..9) of the interior pixels, shape (h-2, w-2).

    A neighbour counts as 1 when it is at least as bright as the centre: a flat field is code 8.
    """
    f = np.asarray(frame, dtype=np.float64)
    h, w = f.shape
    centre = f[1:-1, 1:-1]
    bits = np.stack(
        [f[1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx] >= centre for dy, dx in _NEIGHBOURS]
    )
    ones = bits.sum(axis=0)
    transitions = (bits != np.roll(bits, 1, axis=0)).sum(axis=0)
    return np.where(transitions <= 2, ones, LBP_CODES - 1)


def _bin2(a: np.ndarray) -> np.ndarray:
    h, w = (a.shape[0] // 2) * 2, (a.shape[1] // 2) * 2
    return a[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))


def lbp_histogram(frame: np.ndarray, mask: np.ndarray, scale: int = 1) -> np.ndarray:
    """The share of each LBP code among the pixels inside ``mask`` (after ``scale`` binning).

    ``scale`` 2 bins the frame 2x2 first and keeps the blocks wholly inside the mask.
    """
    f, m = np.asarray(frame, dtype=np.float64), mask
    if scale == 2:
        f, m = _bin2(f), _bin2(mask.astype(np.float64)) == 1.0
    elif scale != 1:
        raise ValueError(f"lbp_histogram: scale must be 1 or 2, got {scale}")
    codes = lbp_codes(f)[m[1:-1, 1:-1]]
    return np.bincount(codes, minlength=LBP_CODES) / max(codes.size, 1)


def brightness(frame: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Mean, standard deviation and the 1st, 50th and 99th percentiles inside ``mask``."""
    v = np.asarray(frame, dtype=np.float64)[mask]
    p1, p50, p99 = np.percentile(v, [1, 50, 99])
    return {"mean": v.mean(), "std": v.std(), "p1": p1, "p50": p50, "p99": p99}


@dataclass
class Description:
    """The statistics of a set of frames: one row (or one curve) per frame."""

    scalars: pd.DataFrame  # columns SCALARS
    radii: np.ndarray  # ring centres (px) of the profiles
    profiles: np.ndarray  # (n, rings) mean brightness per ring
    k: np.ndarray  # frequencies (cycles per SPECTRUM_BOX) of the spectra
    spectra: np.ndarray  # (n, len(k)) radially averaged power
    lbp: np.ndarray  # (n, len(LBP_SCALES), LBP_CODES) LBP histograms

    def take(self, rows: np.ndarray) -> Description:
        """The rows selected by a boolean or integer index."""
        return Description(
            self.scalars.iloc[rows].reset_index(drop=True),
            self.radii,
            self.profiles[rows],
            self.k,
            self.spectra[rows],
            self.lbp[rows],
        )


def _limb_ratio(radii: np.ndarray, profile: np.ndarray) -> float:
    """Mean brightness beyond r = 180 px over the mean within r = 40 px of the centre."""
    zenith = np.nanmean(profile[radii < 40])
    return float(np.nanmean(profile[radii >= 180]) / max(zenith, 1e-6))


def describe(frames: Sequence[np.ndarray], mask: np.ndarray | None = None) -> Description:
    """All statistics of ``frames`` (2-D arrays of one size) inside ``mask``."""
    if not len(frames):
        raise ValueError("describe: no frames")
    if mask is None:
        mask = circle_mask(frames[0].shape[0])
    rows, profiles, spectra, lbps = [], [], [], []
    radii = k = None
    for frame in frames:
        row = brightness(frame, mask)
        radii, prof = radial_profile(frame)
        k, power = radial_spectrum(frame)
        row["limb_ratio"] = _limb_ratio(radii, prof)
        for name, band in SLOPE_BANDS.items():
            row[name] = spectral_slope(k, power, band)
        rows.append(row)
        profiles.append(prof)
        spectra.append(power)
        lbps.append([lbp_histogram(frame, mask, s) for s in LBP_SCALES])
    scalars = pd.DataFrame(rows, columns=list(SCALARS))
    return Description(
        scalars, radii, np.array(profiles), k, np.array(spectra), np.array(lbps, dtype=float)
    )


def feature_matrix(desc: Description) -> pd.DataFrame:
    """The domain classifier's features: the scalars, the profile shape and the LBP shares.

    The profile shape is the mean brightness in the rings of ``SHAPE_EDGES`` over the frame's
    mean brightness.
    """
    feats = desc.scalars.copy()
    mean = desc.scalars["mean"].to_numpy()
    for j, (a, b) in enumerate(zip(SHAPE_EDGES[:-1], SHAPE_EDGES[1:], strict=True)):
        ring = (desc.radii >= a) & (desc.radii < b)
        feats[f"profile_{j}"] = np.nanmean(desc.profiles[:, ring], axis=1) / np.maximum(mean, 1e-6)
    for s, scale in enumerate(LBP_SCALES):
        for c in range(LBP_CODES):
            feats[f"lbp{scale}_{c}"] = desc.lbp[:, s, c]
    return feats


def family_columns(columns: Sequence[str], family: str) -> list[str]:
    """The feature columns of one of ``FEATURE_FAMILIES``."""
    prefixes = FEATURE_FAMILIES[family]
    return [c for c in columns if any(c == p or c.startswith(p) for p in prefixes)]


def featureless_thresholds(scalars: pd.DataFrame, quantile: float = 0.10) -> dict[str, float]:
    """Thresholds of a dark or featureless frame: the ``quantile`` of the frames' mean and std."""
    return {
        "mean": float(scalars["mean"].quantile(quantile)),
        "std": float(scalars["std"].quantile(quantile)),
    }


def is_featureless(scalars: pd.DataFrame, thresholds: dict[str, float]) -> np.ndarray:
    """True for a frame whose mean or standard deviation is below its threshold."""
    return (scalars["mean"].to_numpy() < thresholds["mean"]) | (
        scalars["std"].to_numpy() < thresholds["std"]
    )


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov distance (0: same distribution, 1: disjoint)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if not a.size or not b.size:
        return float("nan")
    return float(stats.ks_2samp(a, b).statistic)


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Half the L1 distance of two histograms (0: equal, 1: disjoint)."""
    p, q = np.asarray(p, dtype=float), np.asarray(q, dtype=float)
    return float(0.5 * np.abs(p / p.sum() - q / q.sum()).sum())


@dataclass
class DomainResult:
    """A real-versus-synthetic classifier: its cross-validated AUC and what it relies on."""

    auc: float
    scores: np.ndarray  # out-of-fold probability of "synthetic", real rows first
    is_synthetic: np.ndarray  # the truth of each row
    coefficients: pd.Series  # standardised weights of the model fitted on all rows

    def auc_within(self, rows: np.ndarray) -> float:
        """The AUC on a subset of rows (e.g. one class on both sides)."""
        y = self.is_synthetic[rows]
        if y.all() or not y.any():
            return float("nan")
        return float(roc_auc_score(y, self.scores[rows]))


def _domain_model():
    """Standardised features into an L2-regularised logistic regression."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))


def domain_auc(
    real: pd.DataFrame,
    synthetic: pd.DataFrame,
    groups_real: Sequence,
    groups_synthetic: Sequence,
    n_splits: int = 5,
    seed: int = 0,
) -> DomainResult:
    """Cross-validated ROC AUC of logistic regression telling ``synthetic`` rows from ``real``.

    Rows of one group (a real episode; a block of synthetic frames) stay in one fold
    (StratifiedGroupKFold), so near-identical frames never sit on both sides of a split.
    """
    x = pd.concat([real, synthetic], ignore_index=True)
    x = x.replace([np.inf, -np.inf], np.nan).fillna(x.median(numeric_only=True)).fillna(0.0)
    y = np.r_[np.zeros(len(real), bool), np.ones(len(synthetic), bool)]
    groups = np.array([f"real:{g}" for g in groups_real] + [f"syn:{g}" for g in groups_synthetic])
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    scores = np.full(len(y), np.nan)
    for train, test in folds.split(x, y, groups):
        model = _domain_model().fit(x.iloc[train], y[train])
        scores[test] = model.predict_proba(x.iloc[test])[:, 1]
    model = _domain_model().fit(x, y)
    coef = pd.Series(model[-1].coef_[0], index=x.columns)
    return DomainResult(float(roc_auc_score(y, scores)), scores, y, coef)
