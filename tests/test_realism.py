"""The realism statistics on constructed frames with a known answer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline import realism


def _power_law_field(size: int, beta: float, seed: int) -> np.ndarray:
    """A Gaussian random field whose power spectrum falls as k ** -beta."""
    rng = np.random.default_rng(seed)
    f = np.fft.fftfreq(size) * size
    k = np.hypot(*np.meshgrid(f, f, indexing="ij"))
    k[0, 0] = 1.0
    amp = k ** (-beta / 2.0)
    amp[0, 0] = 0.0
    noise = np.fft.fft2(rng.standard_normal((size, size)))
    return np.real(np.fft.ifft2(noise * amp))


@pytest.mark.parametrize("beta", [2.0, 3.0])
def test_spectral_slope_of_a_power_law_field(beta: float) -> None:
    # A 320 field cut to the central 256 box: the slope survives the cut edges (Hann window).
    slopes = [
        realism.spectral_slope(*realism.radial_spectrum(_power_law_field(320, beta, s)))
        for s in range(3)
    ]
    assert np.mean(slopes) == pytest.approx(-beta, abs=0.15)


def test_spectrum_of_white_noise_is_flat() -> None:
    noise = np.random.default_rng(0).standard_normal((300, 300))
    assert realism.spectral_slope(*realism.radial_spectrum(noise)) == pytest.approx(0.0, abs=0.1)


def test_radial_profile_of_a_radial_ramp() -> None:
    size = 440
    yy, xx = np.mgrid[0:size, 0:size]
    r = np.hypot(yy - (size - 1) / 2, xx - (size - 1) / 2)
    centres, prof = realism.radial_profile(2.0 * r, radius=215, bin_width=5)
    assert centres[0] == 2.5 and len(centres) == 43
    # Each ring's mean is twice its area-weighted mean radius, 2/3 (b^3 - a^3) / (b^2 - a^2).
    a, b = centres - 2.5, centres + 2.5
    np.testing.assert_allclose(prof, 2.0 * (2 / 3) * (b**3 - a**3) / (b**2 - a**2), atol=0.3)


def test_lbp_of_a_flat_field_is_all_code_8() -> None:
    mask = realism.circle_mask(40, 15)
    for scale in (1, 2):
        hist = realism.lbp_histogram(np.full((40, 40), 77.0), mask, scale)
        np.testing.assert_array_equal(hist, np.eye(realism.LBP_CODES)[8])


def test_lbp_of_a_ramp_and_a_checkerboard() -> None:
    yy, xx = np.mgrid[0:20, 0:20]
    ramp = realism.lbp_codes(yy.astype(float))  # brighter downwards: 5 neighbours >= centre
    assert (ramp == 5).all()
    checker = realism.lbp_codes(((yy + xx) % 2).astype(float))
    # Bright centres see 4 darker edge neighbours and 4 equal diagonals: 8 transitions (code 9);
    # dark centres see no darker neighbour (code 8).
    assert set(np.unique(checker)) == {8, 9}
    assert (checker == 9).mean() == pytest.approx(0.5, abs=0.01)


def test_brightness_and_mask() -> None:
    frame = np.zeros((50, 50))
    mask = realism.circle_mask(50, 20)
    frame[mask] = 10.0
    b = realism.brightness(frame, mask)
    assert b["mean"] == 10.0 and b["std"] == 0.0 and b["p99"] == 10.0


def test_set_stretch_maps_the_limits_and_clips() -> None:
    frame = np.array([[0.0, 100.0, 200.0, 400.0]])
    (out,) = realism.set_stretch([frame], source=(100.0, 200.0), target=(20.0, 220.0))
    np.testing.assert_array_equal(out, [[0, 20, 220, 255]])
    assert out.dtype == np.uint8
    lo, hi = realism.pooled_percentiles(
        [np.arange(100.0).reshape(10, 10)], np.ones((10, 10), bool), (0, 100), step=1
    )
    assert (lo, hi) == (0.0, 99.0)


def test_describe_and_features_on_small_frames() -> None:
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 255, (300, 300)).astype(np.uint8) for _ in range(3)]
    desc = realism.describe(frames, realism.circle_mask(300, 140))
    feats = realism.feature_matrix(desc)
    assert list(desc.scalars.columns) == list(realism.SCALARS)
    assert len(feats) == 3 and feats.notna().all().all()
    np.testing.assert_allclose(desc.lbp.sum(axis=2), 1.0)
    assert desc.take(np.array([0, 2])).profiles.shape[0] == 2
    # Every feature belongs to exactly one family.
    families = [realism.family_columns(feats.columns, f) for f in realism.FEATURE_FAMILIES]
    assert sorted(sum(families, [])) == sorted(feats.columns)


def test_featureless_thresholds_and_flags() -> None:
    unlabelled = pd.DataFrame({"mean": np.arange(1.0, 11.0), "std": np.arange(11.0, 21.0)})
    thr = realism.featureless_thresholds(unlabelled, quantile=0.2)
    assert thr == pytest.approx({"mean": 2.8, "std": 12.8})
    frames = pd.DataFrame({"mean": [1.0, 5.0, 5.0], "std": [20.0, 12.0, 20.0]})
    np.testing.assert_array_equal(realism.is_featureless(frames, thr), [True, True, False])


def test_gap_measures() -> None:
    a = np.arange(100.0)
    assert realism.ks_distance(a, a) == 0.0
    assert realism.ks_distance(a, a + 1000) == 1.0
    assert realism.total_variation([1, 1, 0], [0, 1, 1]) == pytest.approx(0.5)


def _domain(shift: float, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    cols = [f"f{i}" for i in range(5)]
    real = pd.DataFrame(rng.standard_normal((120, 5)), columns=cols)
    syn = pd.DataFrame(rng.standard_normal((120, 5)) + shift, columns=cols)
    groups = np.arange(120) // 6  # blocks of six rows
    return realism.domain_auc(real, syn, groups, groups).auc


def test_domain_auc_of_one_distribution_is_near_half() -> None:
    assert abs(_domain(0.0) - 0.5) < 0.12


def test_domain_auc_of_different_distributions_is_near_one() -> None:
    assert _domain(2.0) > 0.97
