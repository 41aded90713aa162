"""One raw frame: the sky of a class, airglow, twilight, stars, the horizon ring, the camera."""

from __future__ import annotations

import functools
import math

import numpy as np
import pandas as pd

from pipeline.classes import CLASSES
from pipeline.errors import InputError
from pipeline.mlt import offset_mlt, to_utc_ns
from pipeline.preprocess import bilinear_taps
from pipeline.synth.geometry import (
    NORTH_IMAGE_DEG,
    _blur,
    _Geometry,
    _geometry,
    _smooth_field,
    _upsample2,
    lst_and_sun,
    yrs,
)
from pipeline.synth.morphology import _BUILDERS, _PEAK_COUNTS, _arc, _mix_profiles, _project, _Sky
from pipeline.synth.season import Season, _dark_f32, season_for
from pipeline.winter import winter_of

#: Share of frames with a weaker second morphology mixed in (anywhere; at class changes).
AMBIGUOUS_SHARE = 0.15
TRANSITION_SHARE = 0.4
#: Share of non-arc frames with faint east-west bands behind the main form.
BACKGROUND_BANDS_SHARE = 0.8
#: Diffuse aurora behind the forms (counts): full level far from noon, a "midday gap" of this
#: depth and width (MLT hours) around this MLT, fitted with the airglow to the dark sky of the
#: real frames hour by hour (results/synth/calibration.md, second pass).
DIFFUSE_COUNTS = (250.0, 650.0)
MIDDAY_GAP = (0.95, 2.2, 12.3)
#: Binomial blur passes of the shot noise: the intensifier's phosphor spreads each
#: photo-electron over a few pixels, so real frames' grain is smooth at the pixel scale
#: (their power spectrum falls steeply at the finest scales, white noise's does not).
INTENSIFIER_BLUR_PASSES = 2
#: Offset that keeps the star catalogue independent of the frame generators.
_STARS_SALT = 0x57A25


@functools.lru_cache(maxsize=1)
def _star_catalogue() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A fixed synthetic star field (RA, Dec in rad, peak counts), the same for every frame."""
    rng = np.random.default_rng(np.random.SeedSequence(_STARS_SALT))
    n = 700
    ra = rng.uniform(0, 2 * np.pi, n)
    dec = np.arcsin(rng.uniform(math.sin(math.radians(-12)), 1.0, n))
    amp = np.minimum(25.0 * rng.pareto(1.1, n) + 15.0, 4000.0)
    return ra, dec, amp


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
    taps = bilinear_taps(row, col, g.size)
    idx = np.concatenate([flat[ok] for flat, _, ok in taps])
    return idx, np.concatenate([(a * w)[ok] for _, w, ok in taps]).astype(np.float32)


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


def frame_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of frame ``index``: depends on (seed, index) only, not on worker layout."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(index),)))


def _sky(
    g: _Geometry,
    label: str,
    rng: np.random.Generator,
    secondary: str | None | bool,
    transition: str | None,
) -> _Sky:
    """The emission patterns of class ``label``, with a weaker second morphology where drawn."""
    sky = _Sky(g)
    _BUILDERS[label](sky, rng, 1.0)
    if label != "arc" and rng.random() < BACKGROUND_BANDS_SHARE:
        # real dayside frames of every class show faint east-west bands behind the main form
        _arc(sky, rng, float(rng.uniform(0.25, 0.6)))
    if secondary is None:
        # frames next to a class change in a timeline mix in the neighbouring class more often
        if rng.random() < (TRANSITION_SHARE if transition else AMBIGUOUS_SHARE):
            secondary = transition or str(rng.choice([c for c in CLASSES if c != label]))
        else:
            secondary = False
    if secondary:
        _BUILDERS[secondary](sky, rng, float(rng.uniform(0.2, 0.45)))
    return sky


def _aurora(g: _Geometry, sky: _Sky, label: str, rng: np.random.Generator) -> np.ndarray:
    """The aurora's counts at each in-FOV work pixel, scaled to the class's brightness.

    The 99.5th percentile inside the crop follows a class distribution that overlaps the others
    (log-normal, sigma 0.45), so brightness alone says little.
    """
    aurora = np.zeros(g.in_idx.size, dtype=np.float32)
    p_sheet, p_rays = _mix_profiles(sky.sheet_profile), _mix_profiles(sky.ray_profile)
    if p_sheet is not None:
        aurora += _project(g, sky.sheet, p_sheet)
    if p_rays is not None:
        aurora += _project(g, sky.rays, p_rays)
    inner = aurora[g.crop_in]
    k = int(0.995 * (inner.size - 1))
    level = float(np.partition(inner, k)[k]) if inner.size else 1.0
    peak = _PEAK_COUNTS[label] * rng.lognormal(0.0, 0.45)
    aurora *= peak / max(level, 1e-6)
    return aurora


def _diffuse_level(rng: np.random.Generator, time: pd.Timestamp | None) -> float:
    """Counts of diffuse aurora for a frame at ``time``: weakest around magnetic noon."""
    depth, width, centre = MIDDAY_GAP
    if time is None:
        mlt = rng.uniform(6.0, 18.0)
    else:  # the synthetic archive's clock: the station's fixed UT offset
        mlt = float(offset_mlt(to_utc_ns([time]), yrs().mlt.offset_hours)[0])
    gap = 1.0 - depth * math.exp(-0.5 * ((mlt - centre) / width) ** 2)
    return float(rng.uniform(*DIFFUSE_COUNTS) * gap)


def _background(
    g: _Geometry, rng: np.random.Generator, time: pd.Timestamp | None
) -> tuple[np.ndarray, float]:
    """Airglow (van Rhijn), diffuse aurora and the twilight gradient towards the sun at each
    in-FOV work pixel, and the local sidereal angle (random when ``time`` is None)."""
    if time is None:
        lst, sun_el, sun_az = (
            rng.uniform(0, 2 * np.pi),
            math.radians(rng.uniform(-18, -6)),
            rng.uniform(-np.pi, np.pi),
        )
    else:
        lst, sun_el, sun_az = (float(v) for v in lst_and_sun(pd.Timestamp(time).to_julian_date()))
    diffuse = _smooth_field(rng, 5, g.work).ravel()[g.in_idx]
    # airglow and diffuse levels fitted to the dark sky between the forms of real frames
    bg = (
        rng.uniform(80, 220) * g.vr_in
        + _diffuse_level(rng, time) * np.exp(0.4 * diffuse - 0.08)
        + min(80.0 * math.exp((math.degrees(sun_el) + 12.0) / 3.0), 1200.0)
        * (1.0 + 0.8 * g.rho_in * np.cos(g.psi_in - (math.radians(NORTH_IMAGE_DEG) - sun_az)))
    )
    return bg, lst


def _expose(signal: np.ndarray, rng: np.random.Generator, season: Season) -> np.ndarray:
    """The camera's raw counts of ``signal``: photon and read noise, the dark frame, uint16.

    Photon noise in its Gaussian limit (>= ~50 photo-electrons wherever the sky is lit), spread
    by the image intensifier (INTENSIFIER_BLUR_PASSES) at an unchanged per-pixel level.
    """
    np.maximum(signal, 0.0, out=signal)
    shot = rng.standard_normal(signal.shape, dtype=np.float32)
    shot *= np.sqrt(signal * np.float32(season.gain))
    passes = INTENSIFIER_BLUR_PASSES
    # binomial passes shrink white noise's sd by C(4n, 2n) / 16^n: scale it back
    shot = _blur(shot, passes) * np.float32(16.0**passes / math.comb(4 * passes, 2 * passes))
    raw = rng.standard_normal(signal.shape, dtype=np.float32)
    raw *= np.float32(season.read_noise)
    raw += shot
    raw += signal
    raw += _dark_f32(season.winter, signal.shape[0])
    np.clip(raw, 0.0, 65535.0, out=raw)
    raw += np.float32(0.5)  # round half up on the truncating cast
    return raw.astype(np.uint16)


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
    aurora = _aurora(g, _sky(g, label, rng, secondary, transition), label, rng)
    bg, lst = _background(g, rng, time)
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
    return _expose(signal, rng, season)
