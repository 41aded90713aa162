"""System-noise subtraction, crop, mask and rotation of all-sky frames (pure: array in, array out).

One ``Calibration`` value holds everything a frame needs; ``preprocess`` applies it to one frame
and ``preprocess_batch`` to a stack (the same arithmetic, so both agree bit for bit). The
geometry (crop window, mask, bias pixels, rotation map) is computed once per geometry and cached.
The two small helpers at the end only list a ``calib/`` folder to choose a dark frame by date;
reading pixels is the I/O layer's job (``pipeline.preprocess_stage``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd

from pipeline.config import StationConfig
from pipeline.errors import ConfigError, FrameGeometryError

log = logging.getLogger(__name__)

OutputDtype = Literal["uint8", "float32"]
_DTYPES = ("uint8", "float32")
#: Corner pixels farther than this fraction of the raw size from the optical centre are outside
#: the fisheye circle (radius ~0.49 of the frame at YRS) and see only bias and read noise.
BIAS_RADIUS_FRACTION = 0.55
_DARK_RE = re.compile(r"^dark_(\d{8})\.png$")


@dataclass(frozen=True, eq=False)
class Calibration:
    """What preprocessing needs for one camera: dark frame, geometry, stretch, rotation, dtype.

    ``dark`` is a raw-size frame (None: estimate the bias from the unlit corners when
    ``bias_from_corners``). ``centre`` is the optical centre (row, col) in the raw frame; it lands
    on pixel (crop_size // 2, crop_size // 2) of the output. ``rotate_deg`` rotates
    counter-clockwise (None: no rotation). ``raw_size`` is the station's raw frame size: other
    frame sizes, except the already-preprocessed crop_size square, are refused (None: any size).
    ``bit_depth`` is the camera's: raw frames of another depth are refused, since the stretch
    limits are counts of that depth (None: any depth).
    """

    dark: np.ndarray | None = field(default=None, repr=False)
    centre: tuple[float, float] = (256.0, 256.0)
    crop_size: int = 440
    mask_radius: float = 220.0
    stretch_low: float = 0.0
    stretch_high: float = 4000.0
    bias_from_corners: bool = True
    mask: bool = True
    rotate_deg: float | None = None
    dtype: OutputDtype = "float32"
    raw_size: int | None = None
    bit_depth: int | None = None
    #: corner pixels beyond this radius (raw pixels) estimate the bias; None: 0.55 * frame size.
    bias_radius: float | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ConfigError(f"Calibration.dtype: {self.dtype!r} is not one of {_DTYPES}")
        if self.crop_size < 1:
            raise ConfigError(f"Calibration.crop_size must be positive, got {self.crop_size}")
        if self.stretch_high <= self.stretch_low:
            raise ConfigError(
                f"Calibration: stretch_high ({self.stretch_high}) must be above "
                f"stretch_low ({self.stretch_low})"
            )
        object.__setattr__(self, "centre", (float(self.centre[0]), float(self.centre[1])))
        dark_crop = None
        if self.dark is not None:
            dark = np.array(self.dark, dtype=np.float32)  # a private, read-only copy
            if dark.ndim != 2:
                raise ConfigError(f"Calibration.dark must be a 2-D frame, got shape {dark.shape}")
            if self.raw_size is not None and dark.shape != (self.raw_size, self.raw_size):
                raise ConfigError(
                    f"the dark frame is {dark.shape[0]}x{dark.shape[1]} but the station's raw "
                    f"frames are {self.raw_size}x{self.raw_size}; use a dark frame of this camera"
                )
            dark.setflags(write=False)
            object.__setattr__(self, "dark", dark)
            # The dark is only ever needed inside the crop window: cut it once here.
            dark_crop = _crop(dark[None], _geometry(self._key(dark.shape)))[0]
            dark_crop.setflags(write=False)
        object.__setattr__(self, "_dark_crop", dark_crop)

    def _key(self, shape: tuple[int, ...]) -> tuple:
        return (
            (int(shape[-2]), int(shape[-1])),
            self.centre,
            int(self.crop_size),
            float(self.mask_radius),
            None if self.rotate_deg is None else float(self.rotate_deg),
            self.bias_radius,
        )

    def params(self) -> dict[str, Any]:
        """The scalar parameters (no pixels) as plain data, for the JSON beside an output."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "dark"}
        out["centre"] = list(self.centre)
        out["dark"] = self.dark is not None
        return out


def calibration_from_station(
    station: StationConfig, dark: np.ndarray | None = None, dtype: OutputDtype = "float32"
) -> Calibration:
    """The Calibration of a station config (its preprocess switches) with an optional dark frame."""
    p = station.preprocess
    return Calibration(
        dark=dark if p.dark_subtract else None,
        centre=station.optical_centre,
        crop_size=station.crop_size,
        mask_radius=station.mask_radius,
        stretch_low=p.stretch_low,
        stretch_high=p.stretch_high,
        bias_from_corners=p.bias_from_corners,
        mask=p.mask,
        rotate_deg=p.rotate_deg if p.rotate else None,
        dtype=dtype,
        raw_size=station.raw_size,
        bit_depth=station.bit_depth,
    )


# ------------------------------------------------------------------------------ geometry


class _Geometry(NamedTuple):
    """Everything that depends only on the frame shape and the calibration's geometry."""

    src: tuple[slice, slice]  # window of the raw frame that falls inside the crop
    dst: tuple[slice, slice]  # where that window goes in the crop (differs only at the edges)
    full: bool  # the crop window lies wholly inside the frame
    crop: int
    mask: np.ndarray  # (crop, crop) float32 of 0/1
    bias_idx: np.ndarray  # flat raw indices of the unlit corner pixels
    rot_idx: np.ndarray | None  # (4, crop*crop) flat crop indices of the bilinear neighbours
    rot_w: np.ndarray | None  # (4, crop*crop) float32 bilinear weights (0 outside)


@functools.lru_cache(maxsize=32)
def _geometry(key: tuple) -> _Geometry:
    (h, w), (cr, cc), crop, radius, rotate_deg, bias_radius = key
    r0 = int(round(cr)) - crop // 2
    c0 = int(round(cc)) - crop // 2
    sr = slice(max(r0, 0), min(r0 + crop, h))
    sc = slice(max(c0, 0), min(c0 + crop, w))
    dr = slice(sr.start - r0, sr.stop - r0)
    dc = slice(sc.start - c0, sc.stop - c0)
    full = r0 >= 0 and c0 >= 0 and r0 + crop <= h and c0 + crop <= w

    # The mask is centred on the middle of the crop, (crop - 1) / 2: for 440 and r = 220 this
    # reproduces the YRS group's eraseMap.bmp pixel for pixel.
    mid = (crop - 1) / 2.0
    yy, xx = np.mgrid[0:crop, 0:crop].astype(np.float64)
    mask = (((yy - mid) ** 2 + (xx - mid) ** 2) <= radius * radius).astype(np.float32)
    mask.setflags(write=False)

    rb = bias_radius if bias_radius is not None else BIAS_RADIUS_FRACTION * max(h, w)
    ry, rx = np.mgrid[0:h, 0:w]
    outside = ((ry - cr) ** 2 + (rx - cc) ** 2) > rb * rb
    bias_idx = np.flatnonzero(outside)
    if bias_idx.size < 16:
        # A frame that is all field of view has no unlit corners: use the outermost pixels.
        dist = ((ry - cr) ** 2 + (rx - cc) ** 2).ravel()
        bias_idx = np.sort(np.argsort(dist)[-max(16, dist.size // 50) :])
    bias_idx.setflags(write=False)

    rot_idx = rot_w = None
    if rotate_deg is not None:
        rot_idx, rot_w = _rotation_map(crop, rotate_deg)
    return _Geometry((sr, sc), (dr, dc), full, crop, mask, bias_idx, rot_idx, rot_w)


def bilinear_taps(
    rows: np.ndarray, cols: np.ndarray, size: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The 4 bilinear neighbours of points on a size x size grid: (flat index, weight, inside)."""
    r0, c0 = np.floor(rows), np.floor(cols)
    fr, fc = rows - r0, cols - c0
    taps = []
    for dr, dc, wgt in (
        (0, 0, (1 - fr) * (1 - fc)),
        (0, 1, (1 - fr) * fc),
        (1, 0, fr * (1 - fc)),
        (1, 1, fr * fc),
    ):
        rr, cc = r0 + dr, c0 + dc
        inside = (rr >= 0) & (rr < size) & (cc >= 0) & (cc < size)
        taps.append(((rr * size + cc).astype(np.intp), wgt, inside))
    return taps


def _rotation_map(crop: int, deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear source neighbours and weights that rotate a crop counter-clockwise by ``deg``."""
    mid = (crop - 1) / 2.0
    t = np.deg2rad(deg)
    r, c = np.mgrid[0:crop, 0:crop].astype(np.float64)
    # Image rows grow downwards, so "counter-clockwise as displayed" is computed with y = -row.
    x, y = c - mid, mid - r
    xs = x * np.cos(t) + y * np.sin(t)
    ys = -x * np.sin(t) + y * np.cos(t)
    taps = bilinear_taps(mid - ys, mid + xs, crop)
    rot_idx = np.stack([np.where(ok, flat, 0).ravel() for flat, _, ok in taps])
    rot_w = np.stack([np.where(ok, w, 0.0).astype(np.float32).ravel() for _, w, ok in taps])
    rot_idx.setflags(write=False)
    rot_w.setflags(write=False)
    return rot_idx, rot_w


def _crop(stack: np.ndarray, geo: _Geometry) -> np.ndarray:
    """The crop window of every frame as a new float32 array (zeros where it leaves the frame)."""
    sr, sc = geo.src
    if geo.full:
        return stack[:, sr, sc].astype(np.float32)
    out = np.zeros((stack.shape[0], geo.crop, geo.crop), np.float32)
    dr, dc = geo.dst
    out[:, dr, dc] = stack[:, sr, sc]
    return out


# ------------------------------------------------------------------------------ the steps


def preprocess(frame: np.ndarray, calib: Calibration, *, source: str = "frame") -> np.ndarray:
    """Preprocess one 2-D frame into a (crop, crop) uint8 or float32 [0, 1] image."""
    frame = np.asarray(frame)
    if frame.ndim != 2:
        raise FrameGeometryError(source, f"expected a 2-D grey frame, got shape {frame.shape}")
    return preprocess_batch(frame[None], calib, source=source)[0]


def preprocess_batch(stack: np.ndarray, calib: Calibration, *, source: str = "stack") -> np.ndarray:
    """Preprocess a stack (n, h, w) of frames of one geometry; equal to ``preprocess`` per frame."""
    stack = np.asarray(stack)
    if stack.ndim != 3:
        raise FrameGeometryError(source, f"expected a stack (n, h, w), got shape {stack.shape}")
    _, h, w = stack.shape
    crop = calib.crop_size
    if (h, w) == (crop, crop) and calib.raw_size != crop:
        return _pass_through(stack, calib, source)
    if calib.raw_size is not None and (h, w) != (calib.raw_size, calib.raw_size):
        raise FrameGeometryError(
            source,
            f"frame is {h}x{w}; the station expects raw {calib.raw_size}x{calib.raw_size} "
            f"or preprocessed {crop}x{crop} frames (check --station)",
        )
    if calib.bit_depth is not None:
        _check_depth(stack, calib, source)
    dark = calib.dark
    if dark is not None and dark.shape != (h, w):
        raise FrameGeometryError(
            source, f"frame is {h}x{w} but the dark frame is {dark.shape[0]}x{dark.shape[1]}"
        )
    geo = _geometry(calib._key((h, w)))
    x = _crop(stack, geo)
    if dark is not None:
        x -= calib._dark_crop  # type: ignore[attr-defined]
    elif calib.bias_from_corners:
        x -= _bias(stack, geo)[:, None, None]
    np.maximum(x, 0.0, out=x)
    _stretch(x, calib)
    if geo.rot_idx is not None:
        x = _rotate(x, geo)
    if calib.mask:
        x *= geo.mask
    return _to_dtype(x, calib.dtype)


def _check_depth(stack: np.ndarray, calib: Calibration, source: str) -> None:
    """Refuse raw frames of another bit depth than the camera's (its stretch is in its counts)."""
    if calib.bit_depth == 16 and stack.dtype == np.uint8:
        raise FrameGeometryError(
            source,
            f"frame is 8-bit, but the station's camera is 16-bit (stretch "
            f"{calib.stretch_low:g}-{calib.stretch_high:g} counts would leave it near black); "
            "use the 16-bit originals, or a station YAML with bit_depth: 8 and an 8-bit stretch",
        )
    if calib.bit_depth == 8 and stack.dtype != np.uint8 and stack.size:
        top = float(stack.max())
        if top > 255:
            raise FrameGeometryError(
                source,
                f"frame holds values up to {top:g}, but the station's camera is 8-bit "
                "(check --station, or set bit_depth: 16 with a 16-bit stretch)",
            )


def _bias(stack: np.ndarray, geo: _Geometry) -> np.ndarray:
    # The median ignores hot pixels, stars at the horizon and stray light in the corners.
    corners = stack.reshape(stack.shape[0], -1)[:, geo.bias_idx]
    return np.median(corners, axis=1).astype(np.float32)


def estimate_bias(frame: np.ndarray, calib: Calibration) -> np.ndarray | float:
    """The bias (counts) of a raw frame, or of each frame of a stack, from its unlit corners."""
    arr = np.asarray(frame)
    stack = arr[None] if arr.ndim == 2 else arr
    if stack.ndim != 3:
        raise FrameGeometryError("frame", f"expected a 2-D frame or a stack, got {arr.shape}")
    bias = _bias(stack, _geometry(calib._key(stack.shape)))
    return float(bias[0]) if arr.ndim == 2 else bias


def _stretch(x: np.ndarray, calib: Calibration) -> None:
    """Map stretch_low..stretch_high to 0..1 in place, clipping outside."""
    x -= np.float32(calib.stretch_low)
    x *= np.float32(1.0 / (calib.stretch_high - calib.stretch_low))
    np.clip(x, 0.0, 1.0, out=x)


def _rotate(x: np.ndarray, geo: _Geometry) -> np.ndarray:
    flat = x.reshape(x.shape[0], -1)
    out = flat[:, geo.rot_idx[0]] * geo.rot_w[0]
    for k in range(1, 4):
        out += flat[:, geo.rot_idx[k]] * geo.rot_w[k]
    return out.reshape(x.shape)


def _to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return x
    x *= np.float32(255.0)
    np.rint(x, out=x)
    return x.astype(np.uint8)


_noted: set[str] = set()


def _pass_through(stack: np.ndarray, calib: Calibration, source: str) -> np.ndarray:
    """Frames already at the output geometry: only normalise and convert, never crop again."""
    crop = calib.crop_size
    if "pass" not in _noted:  # once per process: a whole preprocessed set would flood the log
        _noted.add("pass")
        log.info(
            "%s is already %dx%d (preprocessed): passing it through with only the dtype step",
            source,
            crop,
            crop,
        )
    if stack.dtype == np.uint8:
        if calib.dtype == "uint8":
            return stack.copy()
        return np.divide(stack, np.float32(255.0), dtype=np.float32)
    x = stack.astype(np.float32)
    if np.issubdtype(stack.dtype, np.integer):
        _stretch(x, calib)  # 16-bit crops still need the station's cut-offs to reach 0..1
    else:
        np.clip(x, 0.0, 1.0, out=x)
    return _to_dtype(x, calib.dtype)


def is_preprocessed_shape(shape: tuple[int, ...], calib: Calibration) -> bool:
    """True where a frame of ``shape`` is already at the output geometry (passed through)."""
    return tuple(shape[-2:]) == (calib.crop_size, calib.crop_size) and (
        calib.raw_size != calib.crop_size
    )


# ------------------------------------------------------------------------------ dark frames


def _as_date(time: Any) -> date | None:
    if time is None:
        return None
    if isinstance(time, date) and not isinstance(time, datetime):
        return time
    ts = pd.Timestamp(time)
    if ts is pd.NaT:
        return None
    if ts.tzinfo is not None:
        ts = ts.tz_convert("UTC")
    return ts.date()


@functools.lru_cache(maxsize=64)
def _dark_listing(dark_dir: str, _mtime_ns: int) -> tuple[tuple[date, Path], ...]:
    found = []
    for name in os.listdir(dark_dir):
        m = _DARK_RE.match(name)
        if not m:
            continue
        try:
            d = datetime.strptime(m.group(1), "%Y%m%d").date()
        except ValueError:
            continue
        found.append((d, Path(dark_dir) / name))
    return tuple(sorted(found))


def dark_frames(dark_dir: str | os.PathLike) -> tuple[tuple[date, Path], ...]:
    """The (date, path) of every ``dark_<YYYYMMDD>.png`` in ``dark_dir``, oldest first."""
    d = Path(dark_dir)
    try:
        mtime = d.stat().st_mtime_ns  # a new dark frame changes the folder's mtime: cache key
    except OSError:
        return ()
    if not d.is_dir():
        return ()
    return _dark_listing(str(d), mtime)


def dark_for_time(dark_dir: str | os.PathLike, time: Any) -> Path | None:
    """The dark frame with the latest date on or before ``time``'s UTC date (else the earliest)."""
    darks = dark_frames(dark_dir)
    if not darks:
        return None
    day = _as_date(time)
    if day is None:
        return darks[0][1]
    best = None
    for d, p in darks:
        if d <= day:
            best = p
    return best if best is not None else darks[0][1]


def dark_coverage_note(dark_dir: str | os.PathLike, first_time: Any) -> str | None:
    """A warning when frames predate every dark frame (they get the earliest, of a later
    date, and the camera's noise drifts between seasons); None when the darks cover them."""
    darks = dark_frames(dark_dir)
    day = _as_date(first_time)
    if not darks or day is None or darks[0][0] <= day:
        return None
    return (
        f"{Path(dark_dir)}: the earliest dark frame ({darks[0][0]:%Y-%m-%d}) is later than the "
        f"first frame ({day:%Y-%m-%d}); earlier frames use it anyway (add a dark of their season)"
    )


def find_dark_dir(root: str | os.PathLike) -> Path | None:
    """``root/calib`` when it holds dark frames (dark_<YYYYMMDD>.png), else None."""
    calib = Path(root) / "calib"
    return calib if dark_frames(calib) else None
