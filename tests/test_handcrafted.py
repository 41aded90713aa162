"""pipeline/handcrafted.py: brightness, ring profile and edge directions of one frame."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import InputError
from pipeline.handcrafted import (
    BANDS,
    N_ORIENT_BINS,
    N_REL_BINS,
    N_RINGS,
    PERCENTILES,
    feature_names,
    sky_features,
)

S = 128


def _polar() -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:S, 0:S] - (S - 1) / 2.0
    return np.hypot(yy, xx), np.arctan2(yy, xx)


def _named(frame: np.ndarray) -> dict[str, float]:
    return dict(zip(feature_names(), sky_features(frame)))


def _rel_share(f: dict[str, float], low: bool) -> float:
    """Share of the gradient weight in the outer two bands whose |cos| is below (above) 0.5."""
    half = N_REL_BINS // 2
    ks = range(half) if low else range(half, N_REL_BINS)
    bands = BANDS[1:]
    return float(np.mean([sum(f[f"rel{k}_r{lo:.2f}-{hi:.2f}"] for k in ks) for lo, hi in bands]))


def test_names_match_the_vector_and_are_unique():
    v = sky_features(np.zeros((S, S)))
    assert len(feature_names()) == len(v) == len(set(feature_names()))
    assert len(v) == len(PERCENTILES) + 1 + N_RINGS + len(BANDS) * (N_REL_BINS + 1) + N_ORIENT_BINS


def test_uniform_frame_gives_its_level_and_no_edges():
    f = _named(np.full((S, S), 0.3))
    for p in PERCENTILES:
        assert f[f"p{p}"] == pytest.approx(0.3)
    assert f["std"] == pytest.approx(0.0, abs=1e-12)
    assert all(f[f"ring{k}"] == pytest.approx(0.3) for k in range(N_RINGS))
    # no gradient anywhere: the direction histograms are empty, not NaN
    assert all(v == 0 for k, v in f.items() if k.startswith(("rel", "orient", "gradmean")))


def test_ring_profile_follows_a_brightening_towards_the_horizon():
    r, _ = _polar()
    f = _named(np.clip(r / (S / 2), 0, 1))
    rings = [f[f"ring{k}"] for k in range(N_RINGS)]
    assert np.all(np.diff(rings) > 0)


def test_rays_converging_on_the_zenith_are_told_from_rings():
    r, azimuth = _polar()
    rays = 0.5 + 0.5 * np.cos(12 * azimuth)  # brightness varies with azimuth only: radial edges
    rings = 0.5 + 0.5 * np.cos(2 * np.pi * r / 8.0)  # with radius only: ring edges
    f_rays, f_rings = _named(rays), _named(rings)
    assert _rel_share(f_rays, low=True) > 0.9  # gradients across the radius
    assert _rel_share(f_rings, low=False) > 0.9  # gradients along it


def test_an_east_west_arc_has_north_south_gradients():
    yy = np.mgrid[0:S, 0:S][0]
    arc = np.exp(-(((yy - S / 2) / 4.0) ** 2))  # a bright band along x (east-west)
    f = _named(arc)
    orient = np.array([f[f"orient{k}"] for k in range(N_ORIENT_BINS)])
    assert orient.sum() == pytest.approx(1.0)
    # gradient direction pi/2 (along y) falls in the middle bins
    assert orient[N_ORIENT_BINS // 2 - 1 : N_ORIENT_BINS // 2 + 1].sum() > 0.95


@pytest.mark.parametrize("shape", [(S,), (S, S + 1), (8, 8), (2, S, S)])
def test_a_frame_that_is_not_one_square_image_is_refused(shape):
    with pytest.raises(InputError, match="square"):
        sky_features(np.zeros(shape))
