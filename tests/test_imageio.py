"""Frame readers on files the tests write, on the real shared files, and on corrupt inputs."""

from __future__ import annotations

import gzip
import logging

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import imageio
from pipeline.errors import FrameReadError, InputError
from pipeline.imageio import pgm_times, read_frame, read_pgm_stack, write_frame


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


@pytest.fixture
def reset_colour_warning(monkeypatch):
    monkeypatch.setattr(imageio, "_warned_colour", False)


def _pgm_frame(arr: np.ndarray, time: str | None, extra: str = "") -> bytes:
    h, w = arr.shape
    head = 'P5\n#"Site unique ID" test\n'
    if time is not None:
        head += f'#"Image request start" {time} UTC\n'
    head += extra + f"{w} {h}\n65535\n"
    return head.encode() + arr.astype(">u2").tobytes()


# ----------------------------------------------------------------------------- written files


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_round_trip_is_exact(tmp_path, rng, dtype):
    hi = np.iinfo(dtype).max
    arr = rng.integers(0, hi, size=(64, 48), endpoint=True).astype(dtype)
    arr[0, 0], arr[-1, -1] = 0, hi  # the extremes survive
    path = tmp_path / "f.png"
    write_frame(path, arr)
    out = read_frame(path)
    assert out.dtype == dtype and out.shape == (64, 48)
    np.testing.assert_array_equal(out, arr)
    assert out.flags.writeable
    assert not list(tmp_path.glob("*.part"))  # the atomic write left no temporary behind


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_npy_round_trip(tmp_path, rng, dtype):
    arr = (rng.random((16, 12)) * 1000).astype(dtype)
    write_frame(tmp_path / "f.npy", arr)
    np.testing.assert_array_equal(np.load(tmp_path / "f.npy"), arr)
    out = read_frame(tmp_path / "f.npy")
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, arr)
    with pytest.raises(FrameReadError, match="out of range"):
        read_frame(tmp_path / "f.npy", 1)
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(FrameReadError, match="not a readable .npy"):
        read_frame(tmp_path / "bad.npy")


def test_write_rejects_bad_dtype_and_suffix(tmp_path):
    with pytest.raises(InputError, match="uint8 or uint16"):
        write_frame(tmp_path / "f.png", np.zeros((4, 4), np.float32))
    with pytest.raises(InputError, match=r"\.jpg"):
        write_frame(tmp_path / "f.jpg", np.zeros((4, 4), np.uint8))


def test_tiff_16bit(tmp_path, rng):
    arr = rng.integers(0, 65535, size=(32, 40)).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "f.tif", format="TIFF")
    out = read_frame(tmp_path / "f.tif")
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, arr)


def test_tiff_32bit_int_with_16bit_values_becomes_uint16(tmp_path, rng):
    arr = rng.integers(0, 65535, size=(8, 8)).astype(np.int32)
    Image.fromarray(arr).save(tmp_path / "f.tiff", format="TIFF")
    out = read_frame(tmp_path / "f.tiff")
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, arr)


def test_jpeg_grey(tmp_path):
    arr = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))
    Image.fromarray(arr).save(tmp_path / "f.jpg", format="JPEG", quality=95)
    out = read_frame(tmp_path / "f.jpg")
    assert out.dtype == np.uint8 and out.shape == (64, 64)
    assert np.abs(out.astype(int) - arr).max() <= 3  # lossy, but close


def test_bmp_grey(tmp_path, rng):
    arr = rng.integers(0, 255, size=(20, 30)).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "f.bmp", format="BMP")
    np.testing.assert_array_equal(read_frame(tmp_path / "f.bmp"), arr)


def test_rgb_converted_to_grey_with_one_warning(tmp_path, caplog, reset_colour_warning):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 200  # pure red: luma 0.299 * 200
    Image.fromarray(rgb).save(tmp_path / "a.png", format="PNG")
    Image.fromarray(np.dstack([rgb, np.full((8, 8), 255, np.uint8)])).save(
        tmp_path / "b.png", format="PNG"
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.imageio"):
        a = read_frame(tmp_path / "a.png")
        b = read_frame(tmp_path / "b.png")
    assert a.ndim == 2 and a.dtype == np.uint8
    assert int(a[0, 0]) == pytest.approx(0.299 * 200, abs=1)
    np.testing.assert_array_equal(a, b)
    warnings = [r for r in caplog.records if "converted to grey" in r.getMessage()]
    assert len(warnings) == 1


def test_grey_palette_png_has_no_warning(tmp_path, caplog, reset_colour_warning):
    arr = (np.arange(64, dtype=np.uint8) * 4).reshape(8, 8)
    Image.fromarray(arr).convert("P").save(tmp_path / "p.png", format="PNG")
    with caplog.at_level(logging.WARNING, logger="pipeline.imageio"):
        out = read_frame(tmp_path / "p.png")
    np.testing.assert_array_equal(out, arr)
    assert not caplog.records


def test_mislabelled_file_is_still_read(tmp_path, rng):
    arr = rng.integers(0, 255, size=(8, 8)).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "really_bmp.png", format="BMP")
    np.testing.assert_array_equal(read_frame(tmp_path / "really_bmp.png"), arr)


def test_pgm_stack_written_plain_and_gz(tmp_path, rng):
    frames = rng.integers(0, 65535, size=(3, 6, 5)).astype(np.uint16)
    times = ["2020-01-02 03:04:05.250000", "2020-01-02 03:04:08.000000", None]
    data = b"".join(_pgm_frame(f, t) for f, t in zip(frames, times))
    (tmp_path / "s.pgm").write_bytes(data)
    (tmp_path / "s.pgm.gz").write_bytes(gzip.compress(data))
    for name in ("s.pgm", "s.pgm.gz"):
        stack, ts = read_pgm_stack(tmp_path / name)
        assert stack.dtype == np.uint16 and stack.shape == (3, 6, 5)
        np.testing.assert_array_equal(stack, frames)
        assert ts[0] == pd.Timestamp("2020-01-02 03:04:05.25", tz="UTC")
        assert pd.isna(ts[2])  # no header time: NaT, the pixels are still there
        assert pgm_times(tmp_path / name)[:2] == ts[:2]
        np.testing.assert_array_equal(read_frame(tmp_path / name, frame=2), frames[2])
        with pytest.raises(FrameReadError, match="frame 3 out of range"):
            read_frame(tmp_path / name, frame=3)


def test_pgm_truncated_frame_raises(tmp_path, rng):
    frames = rng.integers(0, 65535, size=(2, 4, 4)).astype(np.uint16)
    data = b"".join(_pgm_frame(f, "2020-01-02 03:04:05.0") for f in frames)
    path = tmp_path / "cut.pgm"
    path.write_bytes(data[:-5])
    np.testing.assert_array_equal(read_frame(path, 0), frames[0])
    with pytest.raises(FrameReadError, match="truncated frame 1") as exc:
        read_frame(path, 1)
    assert str(path) in str(exc.value)


# ----------------------------------------------------------------------------- corrupt inputs


def _corrupt_cases(tmp_path, rng):
    good = tmp_path / "good.png"
    write_frame(good, rng.integers(0, 65535, size=(64, 64)).astype(np.uint16))
    data = good.read_bytes()
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("this is not an image\n")
    (tmp_path / "bad.pgm.gz").write_bytes(b"not gzip at all")
    (tmp_path / "text.pgm").write_text("P2\n2 2\n255\n0 0 0 0\n")
    return {
        "zero.png": "empty file",
        "truncated.png": "truncated or corrupt",
        "text.png": "not a recognised image",
        "missing.png": "not found",
        "bad.pgm.gz": "corrupt or truncated",
        "text.pgm": "expected a 'P5'",
    }


def test_corrupt_inputs_raise_frame_read_error_with_path(tmp_path, rng):
    for name, reason in _corrupt_cases(tmp_path, rng).items():
        path = tmp_path / name
        with pytest.raises(FrameReadError, match=reason) as exc:
            read_frame(path)
        assert exc.value.path == str(path)
        assert str(path) in str(exc.value)


def test_frame_index_out_of_range_for_single_frame_file(tmp_path):
    write_frame(tmp_path / "f.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(FrameReadError, match="out of range"):
        read_frame(tmp_path / "f.png", frame=1)


def test_unsupported_mode_raises(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "f.tif", format="TIFF")
    with pytest.raises(FrameReadError, match="unsupported pixel mode 'F'"):
        read_frame(tmp_path / "f.tif")


# ----------------------------------------------------------------------------- real files


def test_real_yrs_jpegs(shared_data):
    paths = sorted((shared_data / "yrs").glob("N*.jpg"))
    assert len(paths) == 5
    for p in paths:
        arr = read_frame(p)
        assert arr.shape == (440, 440) and arr.dtype == np.uint8
        assert arr[0, 0] == 0 and arr.max() > 100  # masked corner, lit sky


def test_real_erase_map_bmp(shared_data):
    arr = read_frame(shared_data / "yrs" / "eraseMap.bmp")
    assert arr.shape == (440, 440) and arr.dtype == np.uint8
    assert arr[0, 0] == 255 and arr[220, 220] == 0  # 255 outside the r = 220 circle


@pytest.mark.parametrize(
    "name, n, shape, first",
    [
        ("themis/20140310_0600_gill_themis19_full.pgm.gz", 20, (256, 256), "2014-03-10 06:00:00"),
        ("themis/20140310_0605_gill_themis19_full.pgm", 20, (256, 256), "2014-03-10 06:05:00"),
        ("trex/20220308_0600_gill_blue-814_full.pgm.gz", 20, (270, 320), "2022-03-08 06:00:00"),
        ("trex/20220307_0600_gill_nir-216_8446.pgm.gz", 10, (256, 256), "2022-03-07 06:00:00"),
    ],
)
def test_real_pgm_stacks(shared_data, name, n, shape, first):
    path = shared_data / name
    stack, times = read_pgm_stack(path)
    assert stack.shape == (n, *shape) and stack.dtype == np.uint16
    assert len(times) == n and all(t.tz is not None and str(t.tz) == "UTC" for t in times)
    assert times[0].floor("s") == pd.Timestamp(first, tz="UTC")
    assert times[0] < times[1] < times[-1]
    assert pgm_times(path) == times
    np.testing.assert_array_equal(read_frame(path, frame=n - 1), stack[-1])
    assert 0 < stack.mean() < 65535 and stack.std() > 0  # real sky, not zeros or saturation


def test_gz_stack_cache_sees_a_rewritten_file(tmp_path, rng):
    path = tmp_path / "s.pgm.gz"
    a, b = rng.integers(0, 65535, size=(2, 2, 4, 4)).astype(np.uint16)
    path.write_bytes(gzip.compress(b"".join(_pgm_frame(f, None) for f in a)))
    first = read_frame(path, 1)
    first[:] = 0  # callers get copies: this must not leak into the next read
    np.testing.assert_array_equal(read_frame(path, 1), a[1])
    path.write_bytes(gzip.compress(b"".join(_pgm_frame(f, None) for f in b[:1])))
    np.testing.assert_array_equal(read_frame(path, 0), b[0])
    with pytest.raises(FrameReadError, match="frame 1 out of range"):
        read_frame(path, 1)
