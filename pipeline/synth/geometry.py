"""Camera geometry of the synthetic YRS imager: the fisheye, the altitude layers, the F grid.

Everything here depends only on the frame size and is cached per size, plus the small numeric
helpers (smoothing, upsampling, blurring, the Chapman profile) the sky renderers share.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from pipeline.config import StationConfig, load_station

#: Fisheye horizon radius of the YRS camera at 512 px (scaled with the frame size).
FOV_RADIUS_512 = 250.0
#: Earth radius, reference emission altitude and geomagnetic dip at YRS.
RE_KM = 6371.0
H_REF_KM = 110.0
DIP_DEG = 82.0
#: Image direction (degrees above the +col axis) along which arcs run: lower left to upper
#: right as in the real YRS examples, fitted to the labelled frames of yrs_real (30 from the
#: examples drew them steeper than those; results/synth/calibration.md).
ARC_DIRECTION_DEG = 23.0
#: Geographic north in the raw frame: the published preprocessing rotates 61.11 deg CCW.
NORTH_IMAGE_DEG = 61.11
#: Altitude layers of the line-of-sight integration (denser low down, where 557.7 nm peaks).
LAYERS_KM = (90.0 + 230.0 * np.linspace(0.0, 1.0, 20) ** 1.6).astype(np.float64)
#: Offset that keeps the altitude dither independent of the frame generators.
_GEOM_SALT = 0x6E0


def lst_and_sun(jd: np.ndarray | float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local sidereal angle (rad), solar elevation and azimuth (rad) at YRS for Julian dates."""
    d = np.asarray(jd, dtype=np.float64) - 2451545.0
    lon, lat = math.radians(yrs().lon), math.radians(yrs().lat)
    lst = np.radians((280.46061837 + 360.98564736629 * d) % 360.0) + lon
    g = np.radians((357.529 + 0.98560028 * d) % 360)
    q = np.radians((280.459 + 0.98564736 * d) % 360)
    lam = q + math.radians(1.915) * np.sin(g) + math.radians(0.020) * np.sin(2 * g)
    eps = np.radians(23.439 - 0.00000036 * d)
    ra = np.arctan2(np.cos(eps) * np.sin(lam), np.cos(lam))
    dec = np.arcsin(np.sin(eps) * np.sin(lam))
    ha = lst - ra
    el = np.arcsin(np.sin(lat) * np.sin(dec) + np.cos(lat) * np.cos(dec) * np.cos(ha))
    az = np.arctan2(-np.sin(ha), np.tan(dec) * np.cos(lat) - np.sin(lat) * np.cos(ha))
    return lst, el, az


def sun_elevation_deg(times_ns: np.ndarray) -> np.ndarray:
    """Solar elevation (degrees) at YRS for UTC times in int64 nanoseconds."""
    jd = np.asarray(times_ns, dtype=np.int64) / 86_400e9 + 2440587.5
    return np.degrees(lst_and_sun(jd)[1])


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


@functools.lru_cache(maxsize=1)
def yrs() -> StationConfig:
    """The station the renderer draws: YRS as in configs/stations/yrs.yaml."""
    return load_station("yrs")


@functools.lru_cache(maxsize=8)
def _station(size: int) -> StationConfig:
    return yrs().scaled(size)


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
