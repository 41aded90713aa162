"""The four auroral classes as horizontal emission patterns with their vertical profiles."""

from __future__ import annotations

import math

import numpy as np

from pipeline.synth.geometry import (
    ARC_DIRECTION_DEG,
    DIP_DEG,
    H_REF_KM,
    LAYERS_KM,
    _blur,
    _Geometry,
    _profile,
    _q_of,
    _smooth_1d,
    _smooth_field,
)


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
    return math.radians(ARC_DIRECTION_DEG + rng.normal(0, 12))


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
    cx, cy = rng.normal(0, 70, 2)
    for _ in range(int(rng.integers(1, 5))):
        x0, y0 = cx + rng.normal(0, 60), cy + rng.normal(0, 60)
        sx, sy = rng.uniform(6, 30, 2)
        t = rng.uniform(0, np.pi)
        dx, dy = g.fx - x0, g.fy - y0
        a = (dx * math.cos(t) + dy * math.sin(t)) / sx
        b = (-dx * math.sin(t) + dy * math.cos(t)) / sy
        f += rng.uniform(0.5, 1.0) * np.exp(-0.5 * (a * a + b * b))
    # irregular patches: a thresholded smooth random field, confined around the display
    field = _smooth_field(rng, int(rng.integers(7, 13)), g.nf).ravel()
    d2 = (g.fx - cx) ** 2 + (g.fy - cy) ** 2
    patch = np.clip(field - rng.uniform(0.3, 1.0), 0, None) * np.exp(-d2 / (2 * 220.0**2))
    f += rng.uniform(0.2, 0.5) * patch / max(float(patch.max()), 1e-6)
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
#: Fitted so that each class's brightest pixels under the archive's 0..4000 stretch sit where
#: the real labelled frames' do (results/synth/calibration.md).
_PEAK_COUNTS = {"arc": 3300.0, "drapery": 1700.0, "radial": 1700.0, "hotspot": 3000.0}


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
