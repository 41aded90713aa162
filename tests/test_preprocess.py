"""The pure preprocessing: geometry, mask, noise subtraction, bias estimate, batch, pass-through."""

from __future__ import annotations

import dataclasses
import logging

import bounds
import numpy as np
import pandas as pd
import pytest

from pipeline import preprocess as pp
from pipeline.config import PreprocessConfig, load_station
from pipeline.errors import ConfigError, FrameGeometryError
from pipeline.preprocess import (
    Calibration,
    calibration_from_station,
    dark_for_time,
    estimate_bias,
    find_dark_dir,
    preprocess,
    preprocess_batch,
)

YRS = load_station("yrs")
TINY = YRS.scaled(64)


def fisheye(station, bias=1000.0, seed=0, sigma=3.0, signal=800.0):
    """(raw uint16 frame, noise-free signal, fixed-pattern dark) of a camera like ``station``.

    The field of view is a circle of radius 0.49 * size around the optical centre; outside it
    the sensor sees only the dark (bias, column pattern, hot pixels) and read noise.
    """
    rng = np.random.default_rng(seed)
    n = station.raw_size
    cr, cc = station.optical_centre
    yy, xx = np.mgrid[0:n, 0:n]
    r = np.hypot(yy - cr, xx - cc)
    fov = r <= 0.49 * n
    dark = bias + 20.0 * np.sin(xx / 7.0) + rng.normal(0, 2.0, (1, n))  # column pattern
    hot = rng.random((n, n)) < 0.002
    dark = dark + hot * 3000.0
    # A smooth arc-like band plus airglow inside the circle, nothing outside.
    band = np.exp(-(((yy - cr) - 0.2 * n) ** 2) / (2 * (0.03 * n) ** 2))
    sig = fov * (0.15 * signal + signal * band)
    frame = dark + sig + rng.normal(0, sigma, (n, n))
    return np.clip(np.rint(frame), 0, 65535).astype(np.uint16), sig, dark


def lit(station, value=3000):
    """A uniformly lit field of view (radius 0.49 * size) on a black sensor."""
    n = station.raw_size
    yy, xx = np.mgrid[0:n, 0:n]
    cr, cc = station.optical_centre
    return np.where(np.hypot(yy - cr, xx - cc) <= 0.49 * n, value, 0).astype(np.uint16)


def counts(out, calib):
    """A float32 output back in counts (undo the stretch)."""
    return out.astype(np.float64) * (calib.stretch_high - calib.stretch_low) + calib.stretch_low


@pytest.mark.parametrize("station", [YRS, TINY], ids=["512", "64"])
def test_optical_centre_lands_at_crop_centre(station):
    frame = np.full((station.raw_size,) * 2, 100, np.uint16)
    r, c = (int(round(v)) for v in station.optical_centre)
    frame[r, c] = 3000
    out = preprocess(frame, calibration_from_station(station))
    assert out.shape == (station.crop_size, station.crop_size)
    half = station.crop_size // 2
    assert np.unravel_index(np.argmax(out), out.shape) == (half, half)
    if station is YRS:
        assert (half, half) == (220, 220)  # raw (258, 254) -> (220, 220)


def test_pixels_beyond_mask_radius_are_zero():
    calib = calibration_from_station(YRS, dtype="float32")
    out = preprocess(lit(YRS), calib)
    mid = (440 - 1) / 2
    yy, xx = np.mgrid[0:440, 0:440]
    r = np.hypot(yy - mid, xx - mid)
    assert (out[r > 220] == 0).all()
    assert (out[r <= 219] > 0).all()
    assert out[0, 0] == 0 and out[439, 439] == 0 and out[220, 220] > 0
    # mask switched off: the corners of the crop keep their signal
    flat = np.full((512, 512), 3000, np.uint16)
    nomask = preprocess(flat, dataclasses.replace(calib, mask=False, bias_from_corners=False))
    assert nomask[0, 0] > 0


def test_mask_matches_the_yrs_erase_map(shared_data):
    from PIL import Image

    erase = np.asarray(Image.open(shared_data / "yrs" / "eraseMap.bmp")) == 255
    out = preprocess(lit(YRS), calibration_from_station(YRS))
    np.testing.assert_array_equal(out == 0, erase)


def test_dark_subtraction_recovers_the_noise_free_frame():
    sigma = 4.0
    frame, sig, dark = fisheye(YRS, sigma=sigma, seed=3)
    calib = calibration_from_station(YRS, dark=dark)
    assert calib.dark is not None
    out = counts(preprocess(frame, calib), calib)
    truth = sig[38:478, 34:474]  # the 440 crop around (258, 254)
    inside = calib_mask(calib)
    resid = (out - truth)[inside & (truth > 10 * sigma)]  # away from the clip at zero
    # within the read noise (plus half a count of rounding to uint16)
    assert abs(resid.mean()) < 0.2 * sigma
    assert resid.std() < 1.2 * sigma
    assert np.abs(resid).max() < 6 * sigma
    # without the dark, the hot pixels and the column pattern stay in the frame
    no_dark = counts(preprocess(frame, calibration_from_station(YRS)), calib)
    assert (no_dark - truth)[inside].std() > 5 * sigma


def calib_mask(calib):
    n = calib.crop_size
    mid = (n - 1) / 2
    yy, xx = np.mgrid[0:n, 0:n]
    return np.hypot(yy - mid, xx - mid) <= calib.mask_radius


@pytest.mark.parametrize("bias", [300.0, 1000.0, 2500.0])
def test_bias_estimate_without_dark_is_within_two_percent(bias):
    frame, sig, _ = fisheye(YRS, bias=bias, seed=int(bias))
    calib = calibration_from_station(YRS)
    assert calib.dark is None and calib.bias_from_corners
    est = estimate_bias(frame, calib)
    assert abs(est - bias) / bias < 0.02
    # and the output has that bias removed: an unlit part of the crop sits near zero
    out = counts(preprocess(frame, calib), calib)
    truth = sig[38:478, 34:474]
    dim = calib_mask(calib) & (truth < 1)
    if dim.any():
        assert np.median(out[dim]) < 0.02 * bias + 40  # column pattern amplitude is 20


def test_bias_from_corners_can_be_switched_off():
    frame, _, _ = fisheye(YRS, bias=1000.0)
    on = calibration_from_station(YRS)
    off = dataclasses.replace(on, bias_from_corners=False)
    assert (
        counts(preprocess(frame, off), off)[220, 220]
        > counts(preprocess(frame, on), on)[220, 220] + 900
    )


def test_batch_and_single_agree_exactly():
    stack = np.stack([fisheye(TINY, bias=500 + 50 * i, seed=i)[0] for i in range(5)])
    dark = fisheye(TINY, seed=99)[2]
    base = calibration_from_station(TINY)
    for calib in [
        base,
        calibration_from_station(TINY, dark=dark),
        calibration_from_station(TINY, dtype="uint8"),
        dataclasses.replace(base, rotate_deg=61.11),
        dataclasses.replace(base, mask=False, dtype="uint8"),
    ]:
        batch = preprocess_batch(stack, calib)
        assert batch.dtype == np.dtype(calib.dtype)
        for i in range(len(stack)):
            np.testing.assert_array_equal(batch[i], preprocess(stack[i], calib))


def test_output_dtypes_and_range():
    frame, _, _ = fisheye(TINY)
    f32 = preprocess(frame, calibration_from_station(TINY))
    u8 = preprocess(frame, calibration_from_station(TINY, dtype="uint8"))
    assert f32.dtype == np.float32 and 0 <= f32.min() and f32.max() <= 1
    assert u8.dtype == np.uint8
    np.testing.assert_array_equal(u8, np.rint(f32 * 255).astype(np.uint8))
    sat = preprocess(lit(TINY, 65535), calibration_from_station(TINY))
    assert sat.max() == 1.0  # clipped at the upper cut-off


def test_rotation_is_counter_clockwise_and_off_by_default():
    calib = dataclasses.replace(calibration_from_station(YRS), bias_from_corners=False)
    assert calib.rotate_deg is None
    frame = np.zeros((512, 512), np.uint16)
    frame[258, 254 + 100] = 4000  # 100 px east (right) of the optical centre
    plain = preprocess(frame, calib)
    assert np.unravel_index(np.argmax(plain), plain.shape) == (220, 320)
    turned = preprocess(frame, dataclasses.replace(calib, rotate_deg=90.0))
    r, c = np.unravel_index(np.argmax(turned), turned.shape)
    assert abs(r - 120) <= 1 and abs(c - 220) <= 1  # moved to the top: counter-clockwise
    disk = preprocess(
        np.full((512, 512), 4000, np.uint16), dataclasses.replace(calib, rotate_deg=61.11)
    )
    assert disk[0, 0] == 0 and disk[220, 220] == 1.0


def test_calibration_from_station_follows_the_switches():
    dark = np.zeros((512, 512))
    on = calibration_from_station(YRS, dark=dark)
    assert on.dark is not None and on.rotate_deg is None and on.centre == (258.0, 254.0)
    off = dataclasses.replace(
        YRS, preprocess=PreprocessConfig(dark_subtract=False, rotate=True, rotate_deg=61.11)
    )
    c = calibration_from_station(off, dark=dark, dtype="uint8")
    assert c.dark is None and c.rotate_deg == 61.11 and c.dtype == "uint8"
    assert c.raw_size == 512 and c.crop_size == 440 and c.stretch_high == 4000.0


def test_calibration_refuses_bad_values():
    with pytest.raises(ConfigError, match="dark frame is 64x64"):
        calibration_from_station(YRS, dark=np.zeros((64, 64)))
    with pytest.raises(ConfigError, match="stretch_high"):
        Calibration(stretch_low=10, stretch_high=5)
    with pytest.raises(ConfigError, match="dtype"):
        Calibration(dtype="uint16")  # type: ignore[arg-type]


def test_wrong_geometry_raises_frame_geometry_error():
    calib = calibration_from_station(YRS)
    with pytest.raises(FrameGeometryError, match="300x300"):
        preprocess(np.zeros((300, 300), np.uint16), calib, source="x.png")
    with pytest.raises(FrameGeometryError):
        preprocess(np.zeros((512, 512, 3), np.uint16), calib)
    with pytest.raises(FrameGeometryError):
        preprocess_batch(np.zeros((512, 512), np.uint16), calib)


def test_raw_frames_of_another_bit_depth_are_refused_not_blackened():
    """The stretch is in the camera's counts: an 8-bit frame through a 16-bit stretch (0-4000)
    would come out near black, so it is refused with the fix; an 8-bit camera works."""
    frame8 = np.zeros((512, 512), np.uint8)
    frame8[200:300, 200:300] = 250
    with pytest.raises(FrameGeometryError, match="8-bit.*16-bit.*bit_depth: 8"):
        preprocess(frame8, calibration_from_station(YRS), source="quicklook.png")
    cam8 = dataclasses.replace(
        YRS,
        bit_depth=8,
        preprocess=dataclasses.replace(YRS.preprocess, stretch_high=255.0, dark_subtract=False),
    )
    out = preprocess(frame8, calibration_from_station(cam8))
    assert out.max() == pytest.approx(1.0, abs=0.02)  # bright, not 250/4000
    with pytest.raises(FrameGeometryError, match="values up to 3000"):
        preprocess(np.full((512, 512), 3000, np.uint16), calibration_from_station(cam8))
    # A 16-bit container of 8-bit values is accepted; Calibration() alone checks no depth.
    preprocess(frame8.astype(np.uint16), calibration_from_station(cam8))
    preprocess(frame8, Calibration(centre=YRS.optical_centre))


def test_already_preprocessed_frame_passes_through(caplog):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (440, 440), dtype=np.uint8)
    pp._noted.clear()
    with caplog.at_level(logging.INFO, logger="pipeline.preprocess"):
        f32 = preprocess(img, calibration_from_station(YRS))
        preprocess(img, calibration_from_station(YRS))
    np.testing.assert_array_equal(f32, img.astype(np.float32) / np.float32(255))
    assert sum("passing it through" in r.message for r in caplog.records) == 1  # once
    u8 = preprocess(img, calibration_from_station(YRS, dtype="uint8"))
    np.testing.assert_array_equal(u8, img)  # not cropped, not masked again
    # a station whose raw frames are already crop-sized (THEMIS 256) still gets full processing
    themis = load_station("themis_gill")
    raw = np.full((256, 256), 1000, np.uint16)
    assert preprocess(raw, calibration_from_station(themis)).shape == (256, 256)


def test_real_yrs_frames_pass_through(shared_data):
    from pipeline.imageio import read_frame

    files = sorted((shared_data / "yrs").glob("N*.jpg"))
    assert len(files) == 5
    calib = calibration_from_station(YRS)
    for f in files:
        img = read_frame(f)
        out = preprocess(img, calib)
        assert out.shape == (440, 440) and out.dtype == np.float32
        # out = img / 255 in float32, times 255 again: two roundings of values <= 255
        np.testing.assert_allclose(out * 255, img, atol=bounds.gamma(2) * 255)
        assert (
            preprocess(img, calibration_from_station(YRS, dtype="uint8")).tolist() == img.tolist()
        )


def test_dark_for_time_picks_the_latest_dark_on_or_before_the_date(tmp_path):
    calib = tmp_path / "calib"
    calib.mkdir()
    for d in ("20031201", "20041201", "20061201"):
        (calib / f"dark_{d}.png").write_bytes(b"")  # listing only: never decoded here
    (calib / "station.yaml").write_text("x: 1\n")
    t = pd.Timestamp("2004-01-05 10:00", tz="UTC")
    assert dark_for_time(calib, t).name == "dark_20031201.png"
    assert dark_for_time(calib, pd.Timestamp("2004-12-01 00:00:01", tz="UTC")).name == (
        "dark_20041201.png"
    )
    assert dark_for_time(calib, "2009-01-01").name == "dark_20061201.png"
    assert dark_for_time(calib, pd.Timestamp("2002-01-01", tz="UTC")).name == "dark_20031201.png"
    assert dark_for_time(calib, None).name == "dark_20031201.png"
    # a dark frame added later is seen (the listing cache follows the folder's mtime)
    (calib / "dark_20051201.png").write_bytes(b"")
    assert dark_for_time(calib, "2006-01-01").name == "dark_20051201.png"
    assert find_dark_dir(tmp_path) == calib
    assert find_dark_dir(calib) is None
    assert dark_for_time(tmp_path / "nowhere", t) is None


@pytest.mark.parametrize("size", [64, 128])
def test_bias_estimate_on_synthetic_yrs_frames(size):
    synth = pytest.importorskip("pipeline.synth")
    calib = calibration_from_station(YRS.scaled(size))
    for k, (label, winter) in enumerate(
        [("arc", 2003), ("drapery", 2005), ("radial", 2007), ("hotspot", 2009)]
    ):
        season = synth.season_for(winter)
        frame = synth.render_frame(label, np.random.default_rng(k), size=size, season=season)
        assert abs(estimate_bias(frame, calib) - season.bias) / season.bias < 0.02
        # with the season's dark frame instead, the unlit corners of the raw frame go to ~0
        dark = synth.dark_frame(winter, size).astype(np.float64)
        corners = (frame - dark).ravel()[pp._geometry(calib._key(frame.shape)).bias_idx]
        assert abs(np.median(corners)) < 0.01 * season.bias


def test_frames_before_every_dark_frame_are_noted(tmp_path):
    from pipeline.imageio import write_frame
    from pipeline.preprocess import dark_coverage_note

    write_frame(tmp_path / "dark_20061101.png", np.zeros((8, 8), np.uint16))
    note = dark_coverage_note(tmp_path, pd.Timestamp("2004-12-01T06:00", tz="UTC"))
    assert "earliest dark frame (2006-11-01) is later than the first frame (2004-12-01)" in note
    assert dark_coverage_note(tmp_path, pd.Timestamp("2006-12-01", tz="UTC")) is None


def test_bilinear_taps_weigh_the_four_neighbours_and_flag_those_outside():
    rows, cols = np.array([1.25, 0.0, 3.5]), np.array([2.5, 0.0, 3.0])
    taps = pp.bilinear_taps(rows, cols, size=4)
    flat = np.stack([t[0] for t in taps])
    weight = np.stack([t[1] for t in taps])
    inside = np.stack([t[2] for t in taps])
    # (1.25, 2.5): rows 1-2, cols 2-3 with weights 0.75*0.5, 0.75*0.5, 0.25*0.5, 0.25*0.5
    assert flat[:, 0].tolist() == [1 * 4 + 2, 1 * 4 + 3, 2 * 4 + 2, 2 * 4 + 3]
    assert weight[:, 0].tolist() == [0.375, 0.375, 0.125, 0.125] and inside[:, 0].all()
    # a grid point puts all its weight on itself; sums are 1 wherever the point lies
    assert weight[:, 1].tolist() == [1.0, 0.0, 0.0, 0.0] and flat[0, 1] == 0
    assert np.allclose(weight.sum(axis=0), 1.0)
    # (3.5, 3.0) on a 4x4 grid: row 4 and column 4 lie outside
    assert inside[:, 2].tolist() == [True, False, False, False]
