"""Hand-made features of one all-sky frame: brightness, ring profile and edge directions.

The baseline that the CNN has to beat (``scripts/feature_baseline.py``): the paper's
introduction says CNN features replaced hand-designed descriptors of auroral intensity, shape
and texture; these few, measured by the same episode folds as ``aurora-pipeline cv``, say
how much of the classes a linear model finds without any learnt feature. Pure: array in,
array out.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import InputError

#: brightness percentiles of the sky disc (plus its standard deviation).
PERCENTILES = (1, 10, 50, 90, 99)
#: equal-width rings of the sky disc for the radial brightness profile.
N_RINGS = 8
#: radius bands (fraction of the frame's half-width) for the edge-direction histograms.
BANDS = ((0.0, 0.35), (0.35, 0.65), (0.65, 0.95))
#: bins of |cos| of the angle between an edge's gradient and the radius through it: near 0
#: the edge runs along the radius (rays converging on the zenith), near 1 across it (a ring).
N_REL_BINS = 6
#: bins of the gradient's direction in the frame (0..pi): arcs lie east-west, rays do not.
N_ORIENT_BINS = 8
#: the sky disc: r < SKY_RADIUS of the half-width (the corners and the horizon rim left out).
SKY_RADIUS = 0.95


def feature_names() -> list[str]:
    """Names of the values :func:`sky_features` returns, in order."""
    names = [f"p{p}" for p in PERCENTILES] + ["std"]
    names += [f"ring{k}" for k in range(N_RINGS)]
    for lo, hi in BANDS:
        names += [f"rel{k}_r{lo:.2f}-{hi:.2f}" for k in range(N_REL_BINS)]
        names.append(f"gradmean_r{lo:.2f}-{hi:.2f}")
    return names + [f"orient{k}" for k in range(N_ORIENT_BINS)]


def _polar(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Radius (1 at the frame's half-width) and azimuth of every pixel about the centre."""
    yy, xx = np.mgrid[0:size, 0:size] - (size - 1) / 2.0
    return np.hypot(yy, xx) / (size / 2.0), np.arctan2(yy, xx)


def _weighted_hist(values: np.ndarray, weights: np.ndarray, bins: int, top: float) -> np.ndarray:
    """Histogram of ``values`` on [0, top] weighted and normalised to sum 1 (0 if no weight)."""
    hist, _ = np.histogram(values, bins=bins, range=(0.0, top), weights=weights)
    total = weights.sum()
    return hist / total if total > 0 else hist


def sky_features(frame: np.ndarray) -> np.ndarray:
    """Feature vector (float64, :func:`feature_names` order) of one square frame in 0..1."""
    a = np.asarray(frame, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 16:
        raise InputError(f"sky_features needs one square frame of >= 16 px, got {a.shape}")
    r, azimuth = _polar(a.shape[0])
    sky = r < SKY_RADIUS
    out = [*np.percentile(a[sky], PERCENTILES), a[sky].std()]
    ring = np.minimum((r / SKY_RADIUS * N_RINGS).astype(int), N_RINGS)
    out += [a[ring == k].mean() for k in range(N_RINGS)]
    gy, gx = np.gradient(a)
    mag = np.hypot(gx, gy)
    direction = np.arctan2(gy, gx)
    rel = np.abs(np.cos(direction - azimuth))
    for lo, hi in BANDS:
        band = (r >= lo) & (r < hi)
        out += list(_weighted_hist(rel[band], mag[band], N_REL_BINS, 1.0))
        out.append(mag[band].mean())
    out += list(_weighted_hist(np.mod(direction[sky], np.pi), mag[sky], N_ORIENT_BINS, np.pi))
    return np.asarray(out, dtype=np.float64)
