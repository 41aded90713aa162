"""Synthetic Yellow River Station 557.7 nm all-sky archive: raw frames, labelled sets, timelines.

The generator is a small physical instrument model, so that every later measurement made on its
output means something:

* **Sky.** Auroral emission is a 3-D field: a horizontal pattern (arcs, folded curtains, ray
  footprints, spots, patches; in km, defined in a plane at the 110 km reference altitude) times
  a vertical volume-emission profile (a Chapman layer, 557.7 nm). It is integrated along each
  pixel's line of sight through 20 altitude layers (spherical Earth; field-aligned structures
  follow the tilted geomagnetic field, dip 82 deg at YRS). So curtains off zenith look wide with
  a sharp lower border, thin near zenith, and rays converge on the magnetic zenith, as they do.
* **Camera.** An equidistant fisheye (zenith angle proportional to radius, horizon at ~250 px
  of 512) around the station's optical centre, vignetting, airglow with the van Rhijn
  brightening, twilight from the real solar elevation, stars from a fixed catalogue that turn
  with sidereal time, station lights and glare in the outer ring only (the 440 crop removes
  them), photon (shot) noise, read noise, and a fixed-pattern dark frame per camera season
  (bias, column/row pattern, amplifier glow, hot pixels) that is written out as calib/dark_*.png.
* **Drift.** :class:`Season` (one per winter, derived from the year) changes gain, sensitivity,
  read noise, vignetting, dark frame and hot pixels, so train-on-2003/test-on-later is a real test.
* **Classes.** Brightness distributions of the four classes overlap on purpose and ~15 % of
  frames carry a weaker second morphology (40 % of archive frames that sit at a class change of
  the timeline carry the neighbouring class), so only shape and texture separate the classes.

Public API: :func:`render_frame`, :func:`make_labelled`, :func:`make_archive`, :class:`Season`,
:func:`season_for`, :func:`dark_frame`, :func:`read_timeline`, :func:`derive_occurrence_model`,
:func:`load_occurrence_model`, :func:`labelled_plan`, :func:`archive_plan`, :func:`montage`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import shutil
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.classes import ASI8K_COUNTS, CLASSES, LABEL_CODES
from pipeline.config import CONFIG_DIR, StationConfig, dump_yaml, load_station
from pipeline.errors import InputError
from pipeline.storage import atomic_path, write_table

log = logging.getLogger(__name__)

#: Fisheye horizon radius of the YRS camera at 512 px (scaled with the frame size).
FOV_RADIUS_512 = 250.0
#: Frame sizes synth renders (a 4096 px frame takes ~3 GB and ~12 s; larger ones exhaust memory).
MIN_SIZE, MAX_SIZE = 32, 4096
#: Earth radius, reference emission altitude and geomagnetic dip at YRS.
RE_KM = 6371.0
H_REF_KM = 110.0
DIP_DEG = 82.0
#: Image direction (degrees above the +col axis) along which arcs run in the real YRS examples
#: (lower left to upper right in N20040116G050623.jpg, N20051221G141300.jpg, demo_a.png).
ARC_DIRECTION_DEG = 30.0
#: Geographic north in the raw frame: the published preprocessing rotates 61.11 deg CCW.
NORTH_IMAGE_DEG = 61.11
#: Altitude layers of the line-of-sight integration (denser low down, where 557.7 nm peaks).
LAYERS_KM = (90.0 + 230.0 * np.linspace(0.0, 1.0, 20) ** 1.6).astype(np.float64)
#: Share of frames with a weaker second morphology mixed in (anywhere; at class changes).
AMBIGUOUS_SHARE = 0.15
TRANSITION_SHARE = 0.4
#: Default occurrence model (frame counts and class shares per MLT hour of the real labels).
OCCURRENCE_MODEL = CONFIG_DIR / "occurrence" / "occurrence_model.csv"
#: Offsets that keep the plan and the season generators independent of the frame generators.
_PLAN_SALT = 0x5EED_0F_A11
_SEASON_SALT = 0xDA4C
_STARS_SALT = 0x57A25
_GEOM_SALT = 0x6E0


# ============================================================================ geometry
@dataclass(frozen=True)
class _Geometry:
    """Everything about the camera that depends only on the frame size (cached per size)."""

    size: int
    work: int  # size at which the sky is rendered before upsampling (size or size / 2)
    centre: tuple[float, float]  # full-resolution optical centre (row, col)
    radius: float  # full-resolution fisheye horizon radius, px
    crop_rho: float  # crop/mask radius as a fraction of the horizon radius
    in_idx: np.ndarray  # flat indices of work pixels inside the fisheye circle
    rho_in: np.ndarray  # their normalised radius (0 zenith .. 1 horizon)
    psi_in: np.ndarray  # their image angle (rad, clockwise from "up")
    crop_in: np.ndarray  # bool, inside the crop/mask circle
    vr_in: np.ndarray  # van Rhijn factor of a thin 95 km layer
    layer_idx: np.ndarray  # (K, n_in) index into the F grid of each layer sample
    layer_w: np.ndarray  # (K, n_in) dz / cos(local zenith angle)
    nf: int  # F grid side
    fx: np.ndarray  # (nf*nf,) horizontal X (km, along +col) of each F cell at 110 km
    fy: np.ndarray  # (nf*nf,) horizontal Y (km, along +row)
    f_sc: float  # q-space scale (km)
    fov: np.ndarray  # (size, size) soft fisheye mask (1 inside, 0 outside)
    ring_idx: np.ndarray  # flat full-resolution indices of the outer ring (rho > 0.9)
    ring_rho: np.ndarray
    ring_psi: np.ndarray
    mag_dir: tuple[float, float]  # horizontal unit vector (X, Y) towards the magnetic zenith


def _ground_distance(theta: np.ndarray, z_km: float) -> tuple[np.ndarray, np.ndarray]:
    """Ground distance (km), and cos(local zenith angle), where a line of sight at zenith angle
    ``theta`` reaches altitude ``z_km`` (spherical Earth)."""
    elev = np.pi / 2 - theta
    sin_local = RE_KM * np.cos(elev) / (RE_KM + z_km)
    gamma = np.pi / 2 - elev - np.arcsin(sin_local)
    return RE_KM * gamma, np.sqrt(np.clip(1.0 - sin_local**2, 1e-6, None))


def _q_of(x: np.ndarray, y: np.ndarray, nf: int, sc: float) -> np.ndarray:
    """Nearest F-grid cell of horizontal positions (km); q = s/(s + sc) keeps zenith detail fine."""
    s = np.hypot(x, y)
    k = 1.0 / (s + sc)
    col = ((x * k + 1.0) * 0.5 * nf).astype(np.int64)
    row = ((y * k + 1.0) * 0.5 * nf).astype(np.int64)
    np.clip(col, 0, nf - 1, out=col)
    np.clip(row, 0, nf - 1, out=row)
    return row * nf + col


@functools.lru_cache(maxsize=8)
def _station(size: int) -> StationConfig:
    return load_station("yrs").scaled(size)


@functools.lru_cache(maxsize=8)
def _geometry(size: int) -> _Geometry:
    """Build (once per size) the fisheye, layer-projection and F-grid look-up tables."""
    st = _station(size)
    f = size / 512.0
    radius = FOV_RADIUS_512 * f
    work = size // 2 if (size > 128 and size % 2 == 0) else size
    ws = work / size
    r0, c0 = st.optical_centre
    # work-grid pixel centres in full-resolution coordinates
    wr = (np.arange(work) + 0.5) / ws - 0.5
    rr, cc = np.meshgrid(wr, wr, indexing="ij")
    dr, dc = rr - r0, cc - c0
    rho = np.hypot(dr, dc) / radius
    inside = (rho < 1.0 + 2.5 / (radius * ws)).ravel()
    in_idx = np.flatnonzero(inside)
    rho_in = np.minimum(rho.ravel()[in_idx], 0.9995)
    psi_in = np.arctan2(dc.ravel()[in_idx], -dr.ravel()[in_idx])
    theta = rho_in * (np.pi / 2)
    ux, uy = np.sin(psi_in), -np.cos(psi_in)  # image direction in (X=col, Y=row)
    a = math.radians(ARC_DIRECTION_DEG)
    mag = (math.sin(a), math.cos(a))  # magnetic south, across the arcs, towards lower right
    cot_dip = 1.0 / math.tan(math.radians(DIP_DEG))
    nf = int(np.clip(round(size * 0.625), 64, 320))
    sc = 100.0  # km: F cells of ~0.6 km at zenith for nf = 320 (a 512 px pixel is 0.7 km there)
    dz = np.gradient(LAYERS_KM)
    # a fixed per-pixel altitude dither turns the layers' discreteness into fine noise
    dither = np.random.default_rng(np.random.SeedSequence([_GEOM_SALT, size])).random(theta.size)
    idx, w = [], []
    for zk, dzk in zip(LAYERS_KM, dz):
        zk = zk + (dither - 0.5) * dzk
        s, cos_local = _ground_distance(theta, zk)
        # footprint at the reference altitude of the field line through this sample
        shift = (zk - H_REF_KM) * cot_dip
        x = s * ux - shift * mag[0]
        y = s * uy - shift * mag[1]
        idx.append(_q_of(x, y, nf, sc))  # intp: take() then needs no conversion
        w.append((dzk / np.maximum(cos_local, 1.0 / 6.0)).astype(np.float32))
    _, cos95 = _ground_distance(theta, 95.0)
    # F grid: cell centres in q-space -> km
    g = (np.arange(nf) + 0.5) / nf * 2.0 - 1.0
    qy, qx = np.meshgrid(g, g, indexing="ij")
    q = np.minimum(np.hypot(qx, qy), 0.995)
    s_cell = sc * q / (1.0 - q)
    with np.errstate(invalid="ignore", divide="ignore"):
        fx = np.where(q > 0, qx / np.maximum(q, 1e-9) * s_cell, 0.0)
        fy = np.where(q > 0, qy / np.maximum(q, 1e-9) * s_cell, 0.0)
    # full-resolution soft fisheye edge and outer ring
    fr = np.arange(size, dtype=np.float64)
    FR, FC = np.meshgrid(fr, fr, indexing="ij")
    rfull = np.hypot(FR - r0, FC - c0)
    fov = np.clip(radius - rfull + 0.5, 0.0, 1.0).astype(np.float32)
    rho_full = (rfull / radius).ravel()
    ring_idx = np.flatnonzero((rho_full > 0.9) & (rho_full < 1.0 + 1.0 / radius))
    ring_psi = np.arctan2((FC - c0).ravel()[ring_idx], -(FR - r0).ravel()[ring_idx])
    return _Geometry(
        size=size,
        work=work,
        centre=(r0, c0),
        radius=radius,
        crop_rho=float(st.mask_radius / radius),
        in_idx=in_idx,
        rho_in=rho_in.astype(np.float32),
        psi_in=psi_in.astype(np.float32),
        crop_in=rho_in < st.mask_radius / radius,
        vr_in=(1.0 / cos95).astype(np.float32),
        layer_idx=np.stack(idx),
        layer_w=np.stack(w),
        nf=nf,
        fx=fx.ravel().astype(np.float32),
        fy=fy.ravel().astype(np.float32),
        f_sc=sc,
        fov=fov,
        ring_idx=ring_idx,
        ring_rho=rho_full[ring_idx].astype(np.float32),
        ring_psi=ring_psi.astype(np.float32),
        mag_dir=mag,
    )


@functools.lru_cache(maxsize=32)
def _interp_index(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbours and weights of linear interpolation from a coarse 1-D grid onto a fine one."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    i0 = np.floor(pos).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (pos - i0).astype(np.float32)


def _box(a: np.ndarray, width: int, axis: int) -> np.ndarray:
    """Moving average of odd ``width`` along ``axis`` (edge-padded), via a cumulative sum."""
    if width <= 1:
        return a
    h = width // 2
    pad = [(0, 0)] * a.ndim
    pad[axis] = (h + 1, h)
    c = np.cumsum(np.pad(a, pad, mode="edge"), axis=axis, dtype=np.float64)
    n = a.shape[axis]
    hi = np.take(c, np.arange(width, width + n), axis=axis)
    lo = np.take(c, np.arange(0, n), axis=axis)
    return ((hi - lo) / width).astype(np.float32)


def _smooth_field(rng: np.random.Generator, knots: int, n: int) -> np.ndarray:
    """A smooth random field (n, n): low-res noise, bilinear upsampling, then a box blur of one
    knot spacing, which removes the creases that bilinear interpolation leaves at the knots."""
    i0, i1, t = _interp_index(n, knots)
    z = rng.standard_normal((knots, knots)).astype(np.float32)
    z = z[i0] * (1 - t)[:, None] + z[i1] * t[:, None]
    z = z[:, i0] * (1 - t)[None, :] + z[:, i1] * t[None, :]
    w = int(n / knots) | 1
    z = _box(_box(z, w, 0), w, 1)
    return z / max(float(z.std()), 1e-6)


def _smooth_1d(rng: np.random.Generator, v: np.ndarray, scale_km: float, span: float = 3000.0):
    """A smooth random function of an along-structure coordinate (km), unit variance."""
    n = int(span / scale_km) + 2
    fine = np.linspace(-span / 2, span / 2, 4 * n)
    table = np.interp(fine, np.linspace(-span / 2, span / 2, n), rng.standard_normal(n))
    table = _box(table, 5, 0)  # one knot spacing: no kinks
    table /= max(float(table.std()), 1e-6)
    return np.interp(v, fine, table).astype(np.float32)


def _upsample2(a: np.ndarray) -> np.ndarray:
    """Bilinear 2x upsampling by slicing (no BLAS: same bytes whatever the thread count)."""
    p = np.pad(a, 1, mode="edge")
    rows = np.empty((2 * a.shape[0], a.shape[1] + 2), dtype=a.dtype)
    rows[0::2] = 0.25 * p[:-2] + 0.75 * p[1:-1]
    rows[1::2] = 0.75 * p[1:-1] + 0.25 * p[2:]
    out = np.empty((2 * a.shape[0], 2 * a.shape[1]), dtype=a.dtype)
    out[:, 0::2] = 0.25 * rows[:, :-2] + 0.75 * rows[:, 1:-1]
    out[:, 1::2] = 0.75 * rows[:, 1:-1] + 0.25 * rows[:, 2:]
    return out


def _blur(f2: np.ndarray, passes: int = 1) -> np.ndarray:
    """Binomial [1 2 1]/4 blur, separable, ``passes`` times (ray footprints)."""
    for _ in range(passes):
        p = np.pad(f2, 1, mode="constant")
        f2 = 0.25 * p[:-2, 1:-1] + 0.5 * p[1:-1, 1:-1] + 0.25 * p[2:, 1:-1]
        p = np.pad(f2, 1, mode="constant")
        f2 = 0.25 * p[1:-1, :-2] + 0.5 * p[1:-1, 1:-1] + 0.25 * p[1:-1, 2:]
    return f2


def _profile(z_peak: float, h: float) -> np.ndarray:
    """Chapman-layer volume emission over LAYERS_KM, normalised to unit column (sum V dz = 1)."""
    zeta = (LAYERS_KM - z_peak) / h
    v = np.exp(1.0 - zeta - np.exp(-zeta))
    v /= np.sum(v * np.gradient(LAYERS_KM))
    return v.astype(np.float32)


# ============================================================================ camera seasons
@dataclass(frozen=True)
class Season:
    """One camera season (a winter): gain, sensitivity, noise and dark pattern, from the year."""

    winter: int
    gain: float  # counts per photo-electron (sets the shot noise)
    sensitivity: float  # multiplies the sky signal (intensifier ageing, re-alignment)
    read_noise: float  # counts, rms
    bias: float  # counts
    column_sigma: float  # counts, rms of the column pattern
    hot_fraction: float  # share of hot pixels
    vignetting: float  # fall-off to the horizon (share lost at rho = 1)
    lights_psi: tuple[float, ...]  # image angles of the station lights

    @property
    def start(self) -> pd.Timestamp:
        """The season's first day (1 November of the winter's year): the dark frame's date."""
        return pd.Timestamp(year=self.winter, month=11, day=1, tz="UTC")

    @property
    def dark_name(self) -> str:
        return f"dark_{self.start:%Y%m%d}.png"


def season_for(winter: int) -> Season:
    """The camera season of ``winter`` (the year of its December), deterministic in the year."""
    if not 1990 <= int(winter) <= 2100:
        raise InputError(
            f"winter {winter!r} out of range; give the year of the December, e.g. 2004"
        )
    age = int(winter) - 2003
    rng = np.random.default_rng(np.random.SeedSequence([_SEASON_SALT, int(winter) + 10000]))
    return Season(
        winter=int(winter),
        gain=float(2.4 * (1 + 0.06 * age) * rng.uniform(0.85, 1.15)),
        sensitivity=float(max(0.55, (1 - 0.045 * age) * rng.uniform(0.88, 1.12))),
        read_noise=float(6.0 * (1 + 0.08 * age) * rng.uniform(0.8, 1.25)),
        bias=float(rng.uniform(260.0, 480.0)),
        column_sigma=float(rng.uniform(2.0, 7.0)),
        hot_fraction=float(2e-4 * (1 + 0.5 * age) * rng.uniform(0.7, 1.3)),
        vignetting=float(rng.uniform(0.35, 0.5)),
        lights_psi=tuple(float(p) for p in rng.uniform(-np.pi, np.pi, rng.integers(2, 5))),
    )


@functools.lru_cache(maxsize=32)
def _dark(winter: int, size: int) -> np.ndarray:
    season = season_for(winter)
    rng = np.random.default_rng(np.random.SeedSequence([_SEASON_SALT, int(winter), size]))
    rr = np.linspace(0, 1, size, dtype=np.float32)[:, None]
    cc = np.linspace(0, 1, size, dtype=np.float32)[None, :]
    cols = rng.normal(0, season.column_sigma, size).astype(np.float32)
    bad = rng.random(size) < 0.006
    cols[bad] += rng.uniform(15, 60, bad.sum())
    rows = rng.normal(0, season.column_sigma * 0.3, size).astype(np.float32)
    corner = rng.integers(0, 4)
    gr, gc = (rr if corner < 2 else 1 - rr), (cc if corner % 2 else 1 - cc)
    glow = rng.uniform(15, 60) * np.exp(-(gr + gc) * 6.0)  # amplifier glow from one corner
    dark = season.bias + cols[None, :] + rows[:, None] + glow + 8.0 * (rr - 0.5)
    # hot pixels accumulate with age: a pixel's onset year is fixed, so later seasons keep them
    onset = np.random.default_rng(np.random.SeedSequence([_SEASON_SALT, size, 1])).random(
        (size, size)
    )
    hot = onset < season.hot_fraction
    level = np.random.default_rng(np.random.SeedSequence([_SEASON_SALT, size, 2])).pareto(
        1.3, (size, size)
    )
    dark = dark + hot * np.minimum(150.0 * (1 + level), 6000.0)
    out = np.clip(np.rint(dark), 0, 65535).astype(np.uint16)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=32)
def _dark_f32(winter: int, size: int) -> np.ndarray:
    return _dark(winter, size).astype(np.float32)


def dark_frame(winter: int, size: int = 512) -> np.ndarray:
    """The season's dark frame (bias, column/row pattern, amplifier glow, hot pixels), uint16."""
    return _dark(int(winter), int(size))


# ============================================================================ morphologies
class _Sky:
    """Horizontal emission patterns on the F grid, split by vertical profile."""

    def __init__(self, g: _Geometry) -> None:
        self.g = g
        self.sheet = np.zeros(g.nf * g.nf, dtype=np.float32)  # arcs, curtains, spots, patches
        self.rays = np.zeros(g.nf * g.nf, dtype=np.float32)  # field-aligned ray footprints
        self.sheet_profile: list[tuple[float, np.ndarray]] = []
        self.ray_profile: list[tuple[float, np.ndarray]] = []

    def uv(self, beta: float, u0: float = 0.0, v0: float = 0.0):
        """Across (u) and along (v) coordinates (km) of the F grid for direction ``beta``."""
        ax, ay = math.cos(beta), -math.sin(beta)  # along, in (X=col, Y=row)
        nx, ny = math.sin(beta), math.cos(beta)
        return self.g.fx * nx + self.g.fy * ny - u0, self.g.fx * ax + self.g.fy * ay - v0

    def add_rays(self, x: np.ndarray, y: np.ndarray, amp: np.ndarray, weight: float, blur: int):
        """Splat ray footprints (km positions) and blur them to a ~1-2 km footprint."""
        nf = self.g.nf
        f = np.zeros(nf * nf, dtype=np.float32)
        np.add.at(f, _q_of(x, y, nf, self.g.f_sc), amp.astype(np.float32))
        f = _blur(f.reshape(nf, nf), blur).ravel()
        peak = float(np.percentile(f[f > 0], 99.5)) if np.any(f > 0) else 1.0
        self.rays += weight * np.minimum(f / max(peak, 1e-9), 1.5)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _beta(rng: np.random.Generator) -> float:
    return math.radians(ARC_DIRECTION_DEG + rng.normal(0, 25))


def _arc(sky: _Sky, rng: np.random.Generator, weight: float) -> None:
    """One to a few long, thin, quiet bands with smooth along-arc brightness."""
    n = int(rng.choice([1, 2, 3, 4], p=[0.3, 0.35, 0.23, 0.12]))
    beta = _beta(rng)
    u, v = sky.uv(beta, u0=rng.uniform(-160, 110))
    spacing = rng.uniform(25, 90)
    curv = rng.uniform(-1, 1) / rng.uniform(1500, 5000)
    length = rng.uniform(700, 1600)
    f = np.zeros_like(u)
    for i in range(n):
        centre = i * spacing + curv * v * v + rng.uniform(1, 7) * _smooth_1d(rng, v, 180)
        width = rng.uniform(3.5, 13.0) * np.clip(1.0 + 0.2 * _smooth_1d(rng, v, 300), 0.4, None)
        along = np.clip(1.0 + 0.25 * _smooth_1d(rng, v, 450), 0.3, None)
        shift = rng.uniform(-300, 300)
        ends = _sigmoid((length - np.abs(v - shift)) / 120.0)
        b = rng.uniform(0.45, 1.0)
        f += b * along * ends * np.exp(-0.5 * ((u - centre) / width) ** 2)
        if rng.random() < 0.4:  # a fainter filament beside the main band
            du = rng.choice([-1, 1]) * rng.uniform(1.5, 3.0) * width
            f += 0.4 * b * along * ends * np.exp(-0.5 * ((u - centre - du) / (0.5 * width)) ** 2)
    sky.sheet += weight * f / max(float(f.max()), 1e-6)
    sky.sheet_profile.append((weight, _profile(rng.uniform(115, 150), rng.uniform(15, 35))))


def _drapery(sky: _Sky, rng: np.random.Generator, weight: float) -> None:
    """A folded curtain made of dense parallel rays."""
    beta = _beta(rng)
    nb = int(rng.choice([1, 2], p=[0.75, 0.25]))
    u0 = rng.uniform(-220, 180)
    for b in range(nb):
        lam = rng.uniform(100, 400)
        amp_fold = rng.uniform(5, 22)
        v0 = rng.uniform(-250, 250)
        length = rng.uniform(250, 800)
        width = rng.uniform(5, 16)
        off = u0 + b * rng.uniform(40, 110)
        ph = rng.uniform(0, 2 * np.pi)
        ph2 = rng.uniform(0, 2 * np.pi)
        lam2 = rng.uniform(25, 70)
        a2 = rng.uniform(0, 5)

        def centre(v, lam=lam, ph=ph, a=amp_fold, ph2=ph2, lam2=lam2, a2=a2, off=off):
            return (
                off + a * np.sin(2 * np.pi * v / lam + ph) + a2 * np.sin(2 * np.pi * v / lam2 + ph2)
            )

        # dense rays along the folded band: footprints every 1.5-4 km, bunched into folds
        ds = rng.uniform(1.5, 4.0)
        vs = np.arange(v0 - length, v0 + length, ds) + rng.uniform(-0.4, 0.4, 1) * ds
        vs = vs + rng.normal(0, 0.25 * ds, vs.size)
        us = centre(vs) + rng.normal(0, 0.35 * width, vs.size)
        env = _sigmoid((0.8 * length - np.abs(vs - v0)) / 60.0)
        bunch = 1.0 + 0.6 * np.sin(2 * np.pi * vs / rng.uniform(15, 45) + rng.uniform(0, 6))
        amp = env * bunch * rng.lognormal(0, 0.45, vs.size) * rng.uniform(0.6, 1.0)
        ax, ay = math.cos(beta), -math.sin(beta)
        nx, ny = math.sin(beta), math.cos(beta)
        sky.add_rays(us * nx + vs * ax, us * ny + vs * ay, amp, weight, blur=1)
        # the curtain's continuous sheet, weaker than its rays
        u, v = sky.uv(beta)
        envv = _sigmoid((0.8 * length - np.abs(v - v0)) / 60.0)
        sheet = envv * np.exp(-0.5 * ((u - centre(v)) / (1.3 * width)) ** 2)
        sky.sheet += weight * rng.uniform(0.25, 0.5) * sheet
    sky.sheet_profile.append((weight, _profile(rng.uniform(115, 135), rng.uniform(15, 25))))
    sky.ray_profile.append((weight, _profile(rng.uniform(118, 140), rng.uniform(35, 60))))


def _radial(sky: _Sky, rng: np.random.Generator, weight: float) -> None:
    """Weak rays radiating from the magnetic zenith in all directions."""
    cot_dip = 1.0 / math.tan(math.radians(DIP_DEG))
    mx, my = sky.g.mag_dir
    cx = H_REF_KM * cot_dip * mx + rng.normal(0, 25)
    cy = H_REF_KM * cot_dip * my + rng.normal(0, 25)
    n = int(rng.integers(120, 360))
    scale = rng.uniform(35, 110)
    r = 12.0 + scale * rng.gamma(1.6, 1.0, n)
    ang = rng.uniform(-np.pi, np.pi, n)
    # rays are brighter in a few sectors (an irregular crown)
    k = np.arange(1, 4)
    coef = rng.normal(0, 1, (3, 2)) / k[:, None]
    sector = 1.0 + 0.9 * (
        coef[:, 0, None] * np.cos(k[:, None] * ang) + coef[:, 1, None] * np.sin(k[:, None] * ang)
    ).sum(0)
    amp = np.clip(sector, 0.02, None) * rng.lognormal(0, 0.6, n) * np.exp(-r / (2 * scale))
    amp *= np.clip(r / 60.0, 0.15, 1.0)  # a ray seen end-on is short and would look spot-bright
    sky.add_rays(cx + r * np.cos(ang), cy + r * np.sin(ang), amp, weight, blur=5)
    d2 = (sky.g.fx - cx) ** 2 + (sky.g.fy - cy) ** 2
    sky.sheet += weight * rng.uniform(0.05, 0.2) * np.exp(-d2 / (2 * rng.uniform(40, 110) ** 2))
    sky.sheet_profile.append((weight, _profile(rng.uniform(125, 150), rng.uniform(20, 30))))
    sky.ray_profile.append((weight, _profile(rng.uniform(130, 170), rng.uniform(35, 60))))


def _hotspot(sky: _Sky, rng: np.random.Generator, weight: float) -> None:
    """Bright spots and irregular patches mixed with rays and bundles, intense."""
    g = sky.g
    f = np.zeros_like(g.fx)
    cx, cy = rng.uniform(-200, 200, 2)
    for _ in range(int(rng.integers(1, 5))):
        x0, y0 = cx + rng.normal(0, 90), cy + rng.normal(0, 90)
        sx, sy = rng.uniform(10, 55, 2)
        t = rng.uniform(0, np.pi)
        dx, dy = g.fx - x0, g.fy - y0
        a = (dx * math.cos(t) + dy * math.sin(t)) / sx
        b = (-dx * math.sin(t) + dy * math.cos(t)) / sy
        f += rng.uniform(0.5, 1.0) * np.exp(-0.5 * (a * a + b * b))
    # irregular patches: a thresholded smooth random field, confined around the display
    field = _smooth_field(rng, int(rng.integers(7, 13)), g.nf).ravel()
    d2 = (g.fx - cx) ** 2 + (g.fy - cy) ** 2
    patch = np.clip(field - rng.uniform(0.3, 1.0), 0, None) * np.exp(-d2 / (2 * 220.0**2))
    f += rng.uniform(0.4, 0.9) * patch / max(float(patch.max()), 1e-6)
    sky.sheet += weight * f / max(float(f.max()), 1e-6)
    # rays in bundles plus scattered rays
    xs, ys = [], []
    for _ in range(int(rng.integers(2, 7))):
        m = int(rng.integers(8, 40))
        bx, by = cx + rng.normal(0, 120), cy + rng.normal(0, 120)
        sp = rng.uniform(4, 22)
        xs.append(bx + rng.normal(0, sp, m))
        ys.append(by + rng.normal(0, sp, m))
    m = int(rng.integers(15, 60))
    xs.append(cx + rng.normal(0, 130, m))
    ys.append(cy + rng.normal(0, 130, m))
    x, y = np.concatenate(xs), np.concatenate(ys)
    sky.add_rays(x, y, rng.lognormal(0, 0.6, x.size), weight * rng.uniform(0.6, 1.0), blur=1)
    sky.sheet_profile.append((weight, _profile(rng.uniform(118, 145), rng.uniform(18, 30))))
    sky.ray_profile.append((weight, _profile(rng.uniform(125, 150), rng.uniform(40, 70))))


_BUILDERS = {"arc": _arc, "drapery": _drapery, "radial": _radial, "hotspot": _hotspot}
#: Median 99.5th-percentile aurora level (counts above background) per class; spreads overlap.
_PEAK_COUNTS = {"arc": 3300.0, "drapery": 2900.0, "radial": 1700.0, "hotspot": 4000.0}


def _mix_profiles(parts: list[tuple[float, np.ndarray]]) -> np.ndarray | None:
    if not parts:
        return None
    w = np.array([p[0] for p in parts], dtype=np.float32)
    return (np.stack([p[1] for p in parts]) * w[:, None]).sum(0) / w.sum()


def _project(g: _Geometry, f: np.ndarray, profile: np.ndarray) -> np.ndarray:
    """Integrate the emission along each in-FOV pixel's line of sight (layers x profile)."""
    out = np.zeros(g.in_idx.size, dtype=np.float32)
    for k in range(len(LAYERS_KM)):
        if profile[k] < 2e-3 * profile.max():  # negligible layer
            continue
        out += (profile[k] * g.layer_w[k]) * f.take(g.layer_idx[k])
    return out


# ============================================================================ sky and camera
@functools.lru_cache(maxsize=1)
def _star_catalogue() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A fixed synthetic star field (RA, Dec in rad, peak counts), the same for every frame."""
    rng = np.random.default_rng(np.random.SeedSequence(_STARS_SALT))
    n = 700
    ra = rng.uniform(0, 2 * np.pi, n)
    dec = np.arcsin(rng.uniform(math.sin(math.radians(-12)), 1.0, n))
    amp = np.minimum(25.0 * rng.pareto(1.1, n) + 15.0, 4000.0)
    return ra, dec, amp


def _lst_and_sun(time: pd.Timestamp) -> tuple[float, float, float]:
    """Local sidereal angle (rad), solar elevation and azimuth (rad) at YRS for a UTC time."""
    jd = time.to_julian_date()
    d = jd - 2451545.0
    lon, lat = math.radians(11.93), math.radians(78.92)
    gmst = math.radians((280.46061837 + 360.98564736629 * d) % 360.0)
    lst = gmst + lon
    g = math.radians((357.529 + 0.98560028 * d) % 360)
    q = math.radians((280.459 + 0.98564736 * d) % 360)
    lam = q + math.radians(1.915) * math.sin(g) + math.radians(0.020) * math.sin(2 * g)
    eps = math.radians(23.439 - 0.00000036 * d)
    ra = math.atan2(math.cos(eps) * math.sin(lam), math.cos(lam))
    dec = math.asin(math.sin(eps) * math.sin(lam))
    ha = lst - ra
    el = math.asin(math.sin(lat) * math.sin(dec) + math.cos(lat) * math.cos(dec) * math.cos(ha))
    az = math.atan2(-math.sin(ha), math.tan(dec) * math.cos(lat) - math.sin(lat) * math.cos(ha))
    return lst, el, az


def _stars(g: _Geometry, lst: float, season: Season) -> tuple[np.ndarray, np.ndarray]:
    """Flat full-resolution indices and counts of the visible stars (bilinear 2x2 splats)."""
    ra, dec, amp = _star_catalogue()
    lat = math.radians(78.92)
    ha = lst - ra
    sin_el = np.sin(lat) * np.sin(dec) + np.cos(lat) * np.cos(dec) * np.cos(ha)
    el = np.arcsin(np.clip(sin_el, -1, 1))
    az = np.arctan2(-np.sin(ha), np.tan(dec) * np.cos(lat) - np.sin(lat) * np.cos(ha))
    vis = el > math.radians(3)
    el, az, amp = el[vis], az[vis], amp[vis]
    rho = (np.pi / 2 - el) / (np.pi / 2)
    psi = math.radians(NORTH_IMAGE_DEG) - az  # looking up: east is left of north
    r = rho * g.radius
    row = g.centre[0] - r * np.cos(psi)
    col = g.centre[1] + r * np.sin(psi)
    airmass = 1.0 / np.maximum(np.sin(el), 0.08)
    a = amp * np.exp(-0.12 * (airmass - 1)) * (1 - season.vignetting * rho**2.5)
    a *= season.sensitivity * (g.size / 512.0) ** 0  # stars are points: no area scaling
    r0, c0 = np.floor(row).astype(int), np.floor(col).astype(int)
    tr, tc = row - r0, col - c0
    idx, val = [], []
    for dr, dc, wgt in (
        (0, 0, (1 - tr) * (1 - tc)),
        (0, 1, (1 - tr) * tc),
        (1, 0, tr * (1 - tc)),
        (1, 1, tr * tc),
    ):
        rr, cc = r0 + dr, c0 + dc
        ok = (rr >= 0) & (rr < g.size) & (cc >= 0) & (cc < g.size)
        idx.append((rr * g.size + cc)[ok])
        val.append((a * wgt)[ok])
    return np.concatenate(idx), np.concatenate(val).astype(np.float32)


def _wrap(a: np.ndarray) -> np.ndarray:
    """Angle difference wrapped into [-pi, pi)."""
    return np.remainder(a + np.float32(np.pi), np.float32(2 * np.pi)) - np.float32(np.pi)


def _ring(g: _Geometry, rng: np.random.Generator, season: Season) -> np.ndarray:
    """Station lights, glare and distorted horizon features, only beyond the crop radius."""
    rho, psi = g.ring_rho, g.ring_psi
    gate = np.clip((rho - np.float32(0.905)) / np.float32(0.03), 0, 1)  # zero inside the crop
    d_rho = 1.0 - rho
    arg = d_rho * np.float32(-1 / 0.025)  # horizon glow (the settlement, low aurora)
    out = np.float32(rng.uniform(100, 600)) * np.exp(arg)
    bumps = []
    for p in season.lights_psi:
        if rng.random() < 0.85:  # lights on
            bumps.append((p, rng.uniform(0.03, 0.12), 0.965, 0.018, rng.uniform(1500, 15000)))
    if rng.random() < 0.4:  # stretched glare / distorted bright aurora low on the horizon
        p = rng.uniform(-np.pi, np.pi)
        bumps.append((p, rng.uniform(0.2, 0.6), 0.95, 0.025, rng.uniform(800, 5000)))
    for p, w, r0, sr, amp in bumps:
        dp = _wrap(psi - np.float32(p)) * np.float32(1 / w)
        dr = (rho - np.float32(r0)) * np.float32(1 / sr)
        out += np.float32(amp) * np.exp(np.float32(-0.5) * (dr * dr + dp * dp))
    return out * gate


def render_frame(
    label: str,
    rng: np.random.Generator,
    size: int = 512,
    season: Season | None = None,
    *,
    time: pd.Timestamp | None = None,
    secondary: str | None | bool = None,
    transition: str | None = None,
) -> np.ndarray:
    """Render one raw YRS-like 557.7 nm frame of class ``label`` (uint16, size x size).

    ``season`` defaults to the winter of ``time`` (or 2003); ``time`` sets the star field and
    twilight (random when None); ``secondary`` forces (a class) or forbids (False) the weaker
    second morphology that ~15 % of frames carry (None: drawn).
    """
    if label not in _BUILDERS:
        raise InputError(f"unknown class {label!r}; allowed: {', '.join(CLASSES)}")
    g = _geometry(int(size))
    if season is None:
        season = season_for(winter_of(time) if time is not None else 2003)
    sky = _Sky(g)
    _BUILDERS[label](sky, rng, 1.0)
    if secondary is None:
        # frames next to a class change in a timeline mix in the neighbouring class more often
        if rng.random() < (TRANSITION_SHARE if transition else AMBIGUOUS_SHARE):
            secondary = transition or str(rng.choice([c for c in CLASSES if c != label]))
        else:
            secondary = False
    if secondary:
        _BUILDERS[secondary](sky, rng, float(rng.uniform(0.2, 0.45)))
    aurora = np.zeros(g.in_idx.size, dtype=np.float32)
    p_sheet, p_rays = _mix_profiles(sky.sheet_profile), _mix_profiles(sky.ray_profile)
    if p_sheet is not None:
        aurora += _project(g, sky.sheet, p_sheet)
    if p_rays is not None:
        aurora += _project(g, sky.rays, p_rays)
    # brightness: the 99.5th percentile inside the crop follows a class distribution that
    # overlaps the others (log-normal, sigma 0.45), so brightness alone says little
    inner = aurora[g.crop_in]
    k = int(0.995 * (inner.size - 1))
    level = float(np.partition(inner, k)[k]) if inner.size else 1.0
    peak = _PEAK_COUNTS[label] * rng.lognormal(0.0, 0.45)
    aurora *= peak / max(level, 1e-6)
    # background: airglow (van Rhijn), diffuse aurora, twilight gradient towards the sun
    if time is None:
        lst, sun_el, sun_az = (
            rng.uniform(0, 2 * np.pi),
            math.radians(rng.uniform(-18, -6)),
            rng.uniform(-np.pi, np.pi),
        )
    else:
        lst, sun_el, sun_az = _lst_and_sun(pd.Timestamp(time))
    diffuse = _smooth_field(rng, 5, g.work).ravel()[g.in_idx]
    bg = (
        rng.uniform(120, 420) * g.vr_in
        + rng.uniform(50, 600) * np.exp(0.7 * diffuse - 0.25)
        + min(80.0 * math.exp((math.degrees(sun_el) + 12.0) / 3.0), 1200.0)
        * (1.0 + 0.8 * g.rho_in * np.cos(g.psi_in - (math.radians(NORTH_IMAGE_DEG) - sun_az)))
    )
    sky_in = (aurora + bg) * (1.0 - season.vignetting * g.rho_in**2.5) * season.sensitivity
    work = np.zeros(g.work * g.work, dtype=np.float32)
    work[g.in_idx] = sky_in
    # one binomial pass hides the altitude dither of thin sheets seen obliquely
    work = _blur(work.reshape(g.work, g.work), 1)
    signal = _upsample2(work) if g.work != g.size else work
    signal = signal * g.fov
    flat = signal.ravel()
    si, sv = _stars(g, lst, season)
    np.add.at(flat, si, sv)
    flat[g.ring_idx] += _ring(g, rng, season)
    # photon noise (Gaussian limit of Poisson: >= ~50 photo-electrons everywhere lit) + read noise
    np.maximum(signal, 0.0, out=signal)
    raw = rng.standard_normal(signal.shape, dtype=np.float32)
    sigma = signal * np.float32(season.gain)
    sigma += np.float32(season.read_noise**2)
    np.sqrt(sigma, out=sigma)
    raw *= sigma
    raw += signal
    raw += _dark_f32(season.winter, g.size)
    np.clip(raw, 0.0, 65535.0, out=raw)
    raw += np.float32(0.5)  # round half up on the truncating cast
    return raw.astype(np.uint16)


# ============================================================================ times and timelines
def winter_of(time: pd.Timestamp | str) -> int:
    """The winter (year of its December) a time belongs to: July..December -> that year."""
    t = pd.Timestamp(time)
    return int(t.year if t.month >= 7 else t.year - 1)


def _winters(times: pd.Series) -> np.ndarray:
    """Vectorised :func:`winter_of`."""
    t = pd.to_datetime(times, utc=True)
    return np.where(t.dt.month >= 7, t.dt.year, t.dt.year - 1).astype(np.int64)


def frame_name(time: pd.Timestamp) -> str:
    """YRS file stem ``N<yyyymmdd>G<hhmmss>``."""
    return f"N{time:%Y%m%d}G{time:%H%M%S}"


def read_timeline(path: str | os.PathLike) -> pd.DataFrame:
    """Read an expert label file (``N20031221G030001  1`` lines) into (time_utc, label), sorted."""
    p = Path(path)
    try:
        df = pd.read_csv(p, sep=r"\s+", header=None, names=["name", "code"], comment="#")
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise InputError(
            f"{p}: cannot read the timeline ({exc}); expected lines like 'N20031221G030001  1'"
        ) from None
    if df.empty:
        raise InputError(f"{p}: the timeline is empty; expected lines like 'N20031221G030001  1'")
    times = pd.to_datetime(
        df["name"].astype(str).str[1:], format="%Y%m%dG%H%M%S", errors="coerce", utc=True
    )
    codes = pd.to_numeric(df["code"], errors="coerce")
    bad = times.isna() | ~codes.isin(list(LABEL_CODES))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(
            f"{p}: line {i + 1} ({df['name'].iloc[i]} {df['code'].iloc[i]}) is not "
            f"'N<yyyymmdd>G<hhmmss> <code>' with code in {sorted(LABEL_CODES)}"
        )
    out = pd.DataFrame(
        {"time_utc": times.dt.as_unit("ns"), "label": codes.astype(int).map(LABEL_CODES)}
    )
    return out.sort_values("time_utc", kind="stable").reset_index(drop=True)


def derive_occurrence_model(
    timeline: str | os.PathLike | pd.DataFrame, mlt_offset_hours: float = 3.0
) -> pd.DataFrame:
    """Frame counts, coverage (share of 10 s slots labelled) and class shares per MLT hour."""
    df = read_timeline(timeline) if not isinstance(timeline, pd.DataFrame) else timeline
    t = df["time_utc"]
    mlt = ((t.dt.hour + t.dt.minute / 60 + t.dt.second / 3600 + mlt_offset_hours) % 24).astype(
        float
    )
    hour = np.floor(mlt).astype(int)
    n_days = t.dt.normalize().nunique()
    rows = []
    for h in sorted(hour.unique()):
        sel = df["label"][hour == h]
        row = {
            "mlt_hour": int(h),
            "n_frames": int(sel.size),
            "coverage": round(sel.size / (n_days * 360.0), 5),
        }
        for c in CLASSES:
            row[f"share_{c}"] = round(float((sel == c).mean()), 5)
        rows.append(row)
    return pd.DataFrame(rows)


def write_occurrence_model(
    timeline: str | os.PathLike, out: str | os.PathLike = OCCURRENCE_MODEL
) -> Path:
    """Derive the occurrence model from a label file and write it as a commented CSV."""
    model = derive_occurrence_model(timeline)
    header = (
        "# Frame counts, coverage (share of 10 s slots with a labelled frame) and class\n"
        "# shares per MLT hour (MLT = UT + 3 h) of the real YRS expert labels, winter 2003/04.\n"
        f"# Derived from {Path(timeline).name} by:\n"
        '#   .venv/bin/python -c "from pipeline.synth import write_occurrence_model as w; '
        "w('../shared/data/yrs_labels/Alllabel2003_38044.txt')\"\n"
    )
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_text(header + model.to_csv(index=False))
    return out


def load_occurrence_model(path: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read the occurrence-model CSV (default configs/occurrence/occurrence_model.csv)."""
    p = Path(path) if path is not None else OCCURRENCE_MODEL
    if not p.is_file():
        raise InputError(
            f"{p}: occurrence model not found; rebuild it with synth.write_occurrence_model"
        )
    df = pd.read_csv(p, comment="#")
    need = {"mlt_hour", "n_frames", "coverage", *(f"share_{c}" for c in CLASSES)}
    if not need <= set(df.columns):
        raise InputError(f"{p}: occurrence model lacks columns {sorted(need - set(df.columns))}")
    return df


def _dedupe_seconds(times: pd.Series) -> pd.Series:
    """Shift frames that fall on the same second by whole seconds until every name is unique."""
    ns = pd.to_datetime(times, utc=True).dt.as_unit("ns").astype("int64").to_numpy().copy()
    order = np.argsort(ns, kind="stable")
    s = ns[order] // 10**9
    for _ in range(100):
        dup = np.r_[False, s[1:] <= s[:-1]]
        if not dup.any():
            break
        s[dup] = s[np.flatnonzero(dup) - 1] + 1
    ns[order] = s * 10**9
    return pd.Series(pd.to_datetime(ns, utc=True), index=times.index)


def _shift_years(times: pd.Series, years: int) -> pd.Series:
    if years == 0:
        return times
    return times + pd.DateOffset(years=years)


def _stride(n_total: int, n: int) -> np.ndarray:
    """Evenly strided sample of ``n`` of ``n_total`` indices in order (the real time structure)."""
    return np.unique(np.floor(np.arange(n) * (n_total / n)).astype(np.int64))


def _model_timeline(rng: np.random.Generator, model: pd.DataFrame, winter: int) -> pd.DataFrame:
    """A full-winter timeline from the occurrence model: weather by day, events of one class."""
    days = pd.date_range(f"{winter}-12-01", f"{winter + 1}-02-28", freq="D", tz="UTC")
    hours = model["mlt_hour"].to_numpy() - 3  # MLT = UT + 3 h
    cov = dict(zip(model["mlt_hour"] - 3, model["coverage"]))
    shares = model[[f"share_{c}" for c in CLASSES]].to_numpy()
    shares = shares / shares.sum(1, keepdims=True)
    cum = dict(zip(hours, np.cumsum(shares, 1)))
    slots = np.arange(360)
    day_clear = rng.beta(0.9, 0.9, len(days))  # clear-sky share varies from day to day
    t_all, h_all = [], []
    for h in sorted(hours):
        if not 0 <= h < 24:
            continue
        p = np.clip(cov[h] * 2.0 * day_clear, 0, 1)  # mean of day_clear is 1/2
        keep = rng.random((len(days), 360)) < p[:, None]
        di, si = np.nonzero(keep)
        t_all.append(days.as_unit("ns").asi8[di] + (h * 3600 + slots[si] * 10 + 1) * 10**9)
        h_all.append(np.full(di.size, h))
    t = np.concatenate(t_all)
    hh = np.concatenate(h_all)
    order = np.argsort(t)
    t, hh = t[order], hh[order]
    # persistence: events of ~10 min (60 frames) of one class drawn from the hour's shares
    new = rng.random(t.size) < 1 / 60.0
    new[0] = True
    new[1:] |= (t[1:] - t[:-1]) > 600 * 10**9
    ev = np.cumsum(new) - 1
    u = rng.random(int(ev[-1]) + 1)
    first = np.flatnonzero(new)
    cls = np.array([np.searchsorted(cum[h], x, side="right") for h, x in zip(hh[first], u)])
    cls = np.minimum(cls, len(CLASSES) - 1)
    labels = np.asarray(CLASSES)[cls[ev]]
    return pd.DataFrame({"time_utc": pd.to_datetime(t, utc=True), "label": labels})


def archive_plan(
    n: int,
    seed: int = 0,
    timeline: str | os.PathLike | pd.DataFrame | None = None,
    winters: Sequence[int] = (2004,),
    occurrence: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Times, classes and relative paths of an archive (pure; no rendering)."""
    winters = sorted({int(w) for w in winters})
    if not winters:
        raise InputError("no winters given; e.g. --winters 2004-2009")
    parts = []
    if timeline is not None:
        tl = read_timeline(timeline) if not isinstance(timeline, pd.DataFrame) else timeline
        base = winter_of(tl["time_utc"].iloc[0])
        # The real labels span one month of one winter (29 days). More frames than that per
        # winter (ASI399K: ~67k a winter) come from copies of the month shifted by whole
        # blocks of its length: after it, then before it (Nov..Feb, the dayside season).
        days = tl["time_utc"].dt.normalize()
        block = int((days.iloc[-1] - days.iloc[0]).days) + 1
        copies = max(1, math.ceil(n / (len(tl) * len(winters))))
        shifts = [0, 1, -1][:copies]
        for w in winters:
            yearly = _shift_years(tl["time_utc"], w - base)
            for k in shifts:
                parts.append(tl.assign(time_utc=yearly + pd.Timedelta(days=k * block)))
    else:
        model = occurrence if occurrence is not None else load_occurrence_model()
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), _PLAN_SALT, 1]))
        for w in winters:
            parts.append(_model_timeline(rng, model, w))
    full = pd.concat(parts, ignore_index=True)
    if n > len(full):
        src = timeline if timeline is not None else "the occurrence model"
        raise InputError(
            f"--n {n} exceeds the {len(full)} frames that {src} gives for winters "
            f"{winters[0]}-{winters[-1]} (three shifted copies of the timeline a winter at "
            "most); ask for fewer frames or more winters"
        )
    full = full.sort_values("time_utc", kind="stable").reset_index(drop=True)
    plan = full.iloc[_stride(len(full), n)].reset_index(drop=True)
    plan["time_utc"] = _dedupe_seconds(plan["time_utc"])
    plan["path"] = plan["time_utc"].dt.strftime("%Y/%Y%m%d/N%Y%m%dG%H%M%S.png")
    plan["winter"] = _winters(plan["time_utc"])
    plan["transition"] = _transitions(plan["time_utc"], plan["label"])
    return plan[["path", "time_utc", "label", "winter", "transition"]]


def _transitions(times: pd.Series, labels: pd.Series, gap_s: float = 900.0) -> np.ndarray:
    """The neighbouring class where a frame sits at a class change (previous or next frame
    within ``gap_s`` has another class), else ''."""
    lab = labels.to_numpy().astype(str)
    t = pd.to_datetime(times, utc=True).dt.as_unit("ns").astype("int64").to_numpy() / 1e9
    out = np.full(lab.size, "", dtype=object)
    if lab.size < 2:
        return out
    near = np.diff(t) <= gap_s
    change = near & (lab[1:] != lab[:-1])
    nxt = np.flatnonzero(change)  # frame i differs from frame i + 1
    out[nxt] = lab[nxt + 1]
    out[nxt + 1] = lab[nxt]  # the later frame sees the earlier class (overrides ''-only)
    return out


def class_counts(n: int, balanced: bool = False) -> dict[str, int]:
    """Frames per class: ASI8K proportions (largest remainder) or equal shares."""
    weights = (
        np.ones(len(CLASSES)) if balanced else np.array([ASI8K_COUNTS[c] for c in CLASSES], float)
    )
    exact = n * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    rest = n - counts.sum()
    counts[np.argsort(-(exact - counts), kind="stable")[:rest]] += 1
    return dict(zip(CLASSES, counts.tolist()))


def labelled_plan(
    n: int,
    seed: int = 0,
    winter: int = 2003,
    balanced: bool = False,
    occurrence: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Classes, times and paths of a labelled set (pure; no rendering).

    Times fall in December-February of ``winter`` at 03-15 UT; the hour of each frame is drawn
    from its class's hourly counts in the occurrence model, so labelled times look like real ones.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _PLAN_SALT, 0]))
    model = occurrence if occurrence is not None else load_occurrence_model()
    counts = class_counts(n, balanced)
    labels = np.concatenate([np.full(k, c, dtype=object) for c, k in counts.items()])
    rng.shuffle(labels)
    ut = model["mlt_hour"].to_numpy() - 3
    day0 = pd.Timestamp(f"{winter}-12-01", tz="UTC")
    n_days = (pd.Timestamp(f"{winter + 1}-03-01", tz="UTC") - day0).days
    t = np.empty(n, dtype=np.int64)
    for c in CLASSES:
        sel = np.flatnonzero(labels == c)
        p = model["n_frames"].to_numpy() * model[f"share_{c}"].to_numpy()
        h = rng.choice(ut, sel.size, p=p / p.sum())
        day = rng.integers(0, n_days, sel.size)
        sec = h * 3600 + rng.integers(0, 360, sel.size) * 10 + 1
        t[sel] = day0.value + (day * 86400 + sec) * 10**9
    times = _dedupe_seconds(pd.Series(pd.to_datetime(t, utc=True)))
    df = pd.DataFrame(
        {"label": labels.astype(str), "time_utc": times.to_numpy(), "winter": int(winter)}
    )
    df["time_utc"] = pd.to_datetime(df["time_utc"], utc=True).dt.as_unit("ns")
    df["path"] = df["label"] + df["time_utc"].dt.strftime("/N%Y%m%dG%H%M%S.png")
    return df[["path", "label", "time_utc", "winter"]]


# ============================================================================ writing
def frame_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of frame ``index``: depends on (seed, index) only, not on worker layout."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(index),)))


def _render_chunk(
    out: str, size: int, seed: int, items: list[tuple[int, str, str, int, str]]
) -> int:
    from pipeline.imageio import write_frame

    for index, label, rel, t_ns, transition in items:
        time = pd.Timestamp(t_ns, tz="UTC")
        season = season_for(winter_of(time))
        rng = frame_rng(seed, index)
        arr = render_frame(label, rng, size, season, time=time, transition=transition or None)
        write_frame(Path(out) / rel, arr)
    return len(items)


def _render_all(
    out: Path,
    plan: pd.DataFrame,
    seed: int,
    size: int,
    workers: int,
    desc: str,
    skip_existing: bool = False,
) -> None:
    """Render every frame of ``plan`` into ``out``; ``skip_existing`` keeps the frames already
    there (an interrupted run of this same plan: frames are written atomically and depend on
    (seed, index) only, so each one on disk is complete and right)."""
    from tqdm.auto import tqdm

    trans = plan["transition"] if "transition" in plan else [""] * len(plan)
    items = [
        (i, str(lab), str(rel), int(t.value), str(tr))
        for i, (lab, rel, t, tr) in enumerate(
            zip(plan["label"], plan["path"], plan["time_utc"], trans)
        )
    ]
    if skip_existing:
        n_all = len(items)
        items = [it for it in items if not (out / it[2]).is_file()]
        log.info(
            "%s: %d of %d frames already rendered; rendering the rest",
            out,
            n_all - len(items),
            n_all,
        )
    chunk = max(1, min(32, len(items) // (4 * max(workers, 1)) or 1))
    chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]
    with tqdm(total=len(items), desc=desc, unit="frame", disable=None) as bar:
        if workers <= 1:
            for ch in chunks:
                bar.update(_render_chunk(str(out), size, seed, ch))
            return
        pool = ProcessPoolExecutor(max_workers=workers, initializer=_ignore_sigint)
        todo = iter(chunks)
        try:
            # A few chunks in flight, not all of them queued: on Ctrl-C or a failed chunk only
            # those finish (queued ones are not reliably cancelled at exit), and a 400k-frame
            # plan holds a few futures, not thousands.
            pending = {
                pool.submit(_render_chunk, str(out), size, seed, ch)
                for ch in itertools.islice(todo, 2 * workers)
            }
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    bar.update(fut.result())
                    nxt = next(todo, None)
                    if nxt is not None:
                        pending.add(pool.submit(_render_chunk, str(out), size, seed, nxt))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()


def _ignore_sigint() -> None:
    """Render workers leave Ctrl-C to the parent, which stops them (no traceback per worker)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _write_calib(out: Path, winters: Iterable[int], size: int) -> None:
    from pipeline.imageio import write_frame

    for w in sorted(set(winters)):
        write_frame(out / "calib" / season_for(w).dark_name, dark_frame(w, size))
    if size != 512:
        with atomic_path(out / "calib" / "station.yaml") as tmp:
            dump_yaml(_station(size), tmp)


def _run_record(kind: str, seasons: Iterable[int], **params) -> dict:
    """What made a synthetic folder (synth.json): parameters, camera seasons, version."""
    import dataclasses
    import json

    from pipeline import __version__

    run = {
        "kind": kind,
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in params.items()},
        "ambiguous_share": AMBIGUOUS_SHARE,
        "transition_share": TRANSITION_SHARE,
        "seasons": {str(w): dataclasses.asdict(season_for(w)) for w in sorted(set(seasons))},
        "pipeline_version": __version__,
    }
    return json.loads(json.dumps(run))  # as it reads back from synth.json (tuples as lists)


def _write_run(out: Path, run: dict, complete: bool) -> None:
    """Write synth.json: first with ``complete: false`` (before any frame), at the end true."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "synth.json") as tmp:
        tmp.write_text(json.dumps({**run, "complete": complete}, indent=2) + "\n")


def _read_run(out: Path) -> dict | None:
    """The synth.json of ``out``, or None when there is none or it is unreadable."""
    import json

    try:
        run = json.loads((out / "synth.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return run if isinstance(run, dict) else None


#: The parameters a user gives; named when an earlier synth in a folder used others.
_USER_PARAMS = ("kind", "n", "seed", "winter", "balanced", "timeline", "winters", "size")


def _count(k: int, word: str, plural: str | None = None) -> str:
    return f"{k} {word if k == 1 else plural or word + 's'}"


def _describe(out: Path, earlier: dict | None, run: dict) -> str:
    """What is in a non-empty ``out``, for the refusal: frames, table, earlier parameters."""
    frames = sum(1 for p in out.rglob("*.png") if "calib" not in p.relative_to(out).parts)
    names = sorted(p.name for p in out.iterdir())
    if earlier is None:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        what = f"{_count(frames, 'frame')} and " if frames else ""
        return f"{what}{_count(len(names), 'entry', 'entries')}: {shown}; no synth.json"
    tables = [t for t in ("labels.parquet", "truth.parquet") if (out / t).is_file()]
    what = _count(frames, "frame") + "".join(f" and {t}" for t in tables)
    diff = [
        f"{k}={earlier.get(k)!r} (now {run.get(k)!r})"
        for k in _USER_PARAMS
        if earlier.get(k) != run.get(k)
    ]
    if diff:
        why = "with " + ", ".join(diff)
    elif run.get("timeline") == "DataFrame":
        why = "made from a timeline DataFrame (synth.json cannot tell it from this one)"
    elif earlier.get("pipeline_version") != run.get("pipeline_version"):
        why = f"of pipeline {earlier.get('pipeline_version')}"
    else:
        why = "of another generator version"
    return f"{what} from an earlier synth {why}"


def _prepare_out(
    out: Path, run: dict, table: str, comparable: bool = True, overwrite: bool = False
) -> pd.DataFrame | None:
    """Check that ``out`` may be written; the earlier result when it already holds this run.

    A missing or empty folder is written. A folder whose synth.json records exactly this run
    (parameters, camera seasons, version; ``--workers`` never changes the output) is either
    finished (synth.json complete, the table and every frame present: nothing is redone, and the
    table is returned) or an interrupted run of it, which is finished (frames are deterministic
    and written atomically, so the ones on disk are kept and only the missing ones rendered). Anything else is
    refused: new frames would mix with the old ones and the table would describe only the new.
    ``overwrite`` deletes another synth run's folder first (never a folder synth did not write).
    """
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file; give a folder to write the synthetic frames into")
    if not out.is_dir() or not any(out.iterdir()):
        return None
    earlier = _read_run(out)
    same = (
        comparable
        and earlier is not None
        and {k: v for k, v in earlier.items() if k != "complete"} == run
    )
    if not same and overwrite and earlier is not None:
        log.warning("%s: replacing an earlier synthetic set (--overwrite)", out)
        shutil.rmtree(out)
        return None
    if not same:
        again = ", --overwrite to replace it" if earlier is not None else ""
        raise InputError(
            f"{out} is not empty ({_describe(out, earlier, run)}); "
            f"choose another folder{again} or delete it"
        )
    if earlier.get("complete", True) and (out / table).is_file():  # no key: written at the end
        try:
            done = pd.read_parquet(out / table)
        except Exception:  # noqa: BLE001 - damaged table: render again
            return None
        if all((out / rel).is_file() for rel in done["path"]):
            log.warning(
                "%s already holds this synthetic set (synth.json); nothing rewritten "
                "(delete the folder to render it again)",
                out,
            )
            return done
    log.warning("%s holds an unfinished run of this synth (synth.json); finishing it", out)
    return None


def _check(n: int, seed: int, size: int, workers: int) -> None:
    if n < 1:
        raise InputError(f"--n must be at least 1, got {n}")
    if seed < 0:
        raise InputError(f"--seed must be a non-negative integer, got {seed}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise InputError(
            f"--size must be within {MIN_SIZE}..{MAX_SIZE} pixels (the YRS camera's is 512), "
            f"got {size}"
        )
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")


def make_labelled(
    out: str | os.PathLike,
    n: int,
    seed: int = 0,
    winter: int = 2003,
    balanced: bool = False,
    size: int = 512,
    workers: int = 1,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Write an ImageFolder-style labelled set of raw frames plus labels.parquet and calib/.

    ``out`` must be new or empty, or hold this same set (see :func:`_prepare_out`).
    """
    _check(n, seed, size, workers)
    out = Path(out)
    plan = labelled_plan(n, seed, winter, balanced)
    run = _run_record(
        "labelled", [winter], n=n, seed=seed, winter=winter, balanced=balanced, size=size
    )
    done = _prepare_out(out, run, "labels.parquet", overwrite=overwrite)
    if done is not None:
        return done
    resuming = out.is_dir() and any(out.iterdir())  # an unfinished run of this same set
    _write_run(out, run, complete=False)
    _write_calib(out, [winter], size)
    _render_all(out, plan, seed, size, workers, f"synth labelled {winter}", resuming)
    write_table(plan, out / "labels.parquet")
    _write_run(out, run, complete=True)
    return plan


def make_archive(
    out: str | os.PathLike,
    n: int,
    seed: int = 0,
    timeline: str | os.PathLike | pd.DataFrame | None = None,
    winters: Sequence[int] = (2004,),
    size: int = 512,
    workers: int = 1,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Write an unlabelled archive in the YRS layout plus truth.parquet and calib/ dark frames.

    ``out`` must be new or empty, or hold this same archive (see :func:`_prepare_out`; a
    timeline given as a DataFrame is never taken as the same).
    """
    _check(n, seed, size, workers)
    out = Path(out)
    plan = archive_plan(n, seed, timeline, winters)
    seasons = plan["winter"].unique().tolist()
    source = "DataFrame" if isinstance(timeline, pd.DataFrame) else timeline
    run = _run_record(
        "archive", seasons, n=n, seed=seed, timeline=source, winters=list(winters), size=size
    )
    # a DataFrame timeline's content is not recorded: never taken as the same run
    done = _prepare_out(
        out, run, "truth.parquet", comparable=source != "DataFrame", overwrite=overwrite
    )
    if done is not None:
        return done
    resuming = out.is_dir() and any(out.iterdir())  # an unfinished run of this same archive
    _write_run(out, run, complete=False)
    _write_calib(out, seasons, size)
    _render_all(out, plan, seed, size, workers, "synth archive", resuming)
    truth = plan[["path", "time_utc", "label"]]
    write_table(truth, out / "truth.parquet")
    _write_run(out, run, complete=True)
    return truth


def parse_winters(text: str) -> tuple[int, ...]:
    """Parse ``2004-2009`` or ``2004,2006`` (or a mix) into a sorted tuple of winters."""
    out: set[int] = set()
    try:
        for part in str(text).split(","):
            part = part.strip()
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if b < a:
                    raise ValueError
                out.update(range(a, b + 1))
            elif part:
                out.add(int(part))
    except ValueError:
        raise InputError(f"winters {text!r}: expected e.g. 2004-2009 or 2004,2006") from None
    if not out or min(out) < 1990 or max(out) > 2100:
        raise InputError(f"winters {text!r}: expected years such as 2004-2009 or 2004,2006")
    return tuple(sorted(out))


# ============================================================================ inspection
def quicklook(raw: np.ndarray, dark: np.ndarray | None, size: int | None = None) -> np.ndarray:
    """The preprocessed look (dark subtracted, 440 crop, stretch 0..4000 to 8 bit, r=220 mask)."""
    st = _station(raw.shape[0])
    x = raw.astype(np.float32) - (dark.astype(np.float32) if dark is not None else 0.0)
    half = st.crop_size // 2
    r0, c0 = (int(round(v)) for v in st.optical_centre)
    x = x[r0 - half : r0 - half + st.crop_size, c0 - half : c0 - half + st.crop_size]
    yy, xx = np.mgrid[: x.shape[0], : x.shape[1]]
    m = np.hypot(yy - (x.shape[0] - 1) / 2, xx - (x.shape[1] - 1) / 2) <= st.mask_radius
    y = np.clip(x / st.preprocess.stretch_high * 255.0, 0, 255) * m
    return y.astype(np.uint8)


def montage(
    out: str | os.PathLike,
    real_dir: str | os.PathLike | None = None,
    per_class: int = 4,
    seed: int = 7,
    size: int = 512,
    tile: int = 220,
) -> Path:
    """Save a PNG: synthetic frames of each class (rows) next to the real YRS examples."""
    from PIL import Image, ImageDraw

    rows = []
    real = []
    if real_dir is not None:
        real_dir = Path(real_dir)
        fig = {"arc": "demo_a", "drapery": "demo_D", "radial": "demo_R", "hotspot": "demo_HS"}
        for c in CLASSES:
            p = real_dir / "figures" / f"{fig[c]}.png"
            im = Image.open(p).convert("L")
            w, h = im.size
            real.append(im.crop((0, int(h * 0.06), w // 3 - 2, h)).resize((tile, tile)))
    time = pd.Timestamp("2004-01-05 09:00:00", tz="UTC")
    for ci, c in enumerate(CLASSES):
        tiles = []
        for j in range(per_class):
            rng = frame_rng(seed, 100 * ci + j)
            raw = render_frame(c, rng, size, season_for(2003), time=time, secondary=False)
            tiles.append(
                Image.fromarray(quicklook(raw, dark_frame(2003, size))).resize((tile, tile))
            )
        if real:
            tiles.append(real[ci])
        rows.append(tiles)
    jpgs = []
    if real_dir is not None:
        jpgs = [
            Image.open(p).convert("L").resize((tile, tile))
            for p in sorted(Path(real_dir).glob("*.jpg"))
        ]
    ncol = max(per_class + (1 if real else 0), len(jpgs))
    pad, lab = 4, 16
    W = ncol * (tile + pad) + pad + 70
    H = (len(rows) + (1 if jpgs else 0)) * (tile + pad + lab) + pad
    canvas = Image.new("L", (W, H), 255)
    draw = ImageDraw.Draw(canvas)
    for ri, tiles in enumerate(rows):
        y = pad + ri * (tile + pad + lab)
        draw.text((4, y + tile // 2), CLASSES[ri], fill=0)
        for ti, t in enumerate(tiles):
            x = 70 + pad + ti * (tile + pad)
            canvas.paste(t, (x, y + lab))
            name = "real (paper fig.)" if (real and ti == len(tiles) - 1) else f"synthetic {ti + 1}"
            draw.text((x, y + 2), name, fill=0)
    if jpgs:
        y = pad + len(rows) * (tile + pad + lab)
        draw.text((4, y + tile // 2), "real YRS", fill=0)
        for ti, t in enumerate(jpgs):
            x = 70 + pad + ti * (tile + pad)
            canvas.paste(t, (x, y + lab))
            draw.text((x, y + 2), "real jpg", fill=0)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, optimize=True)
    return out
