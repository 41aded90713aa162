"""Fit the synthetic renderer's appearance on real YRS frames; write configs/synth/realism.yaml.

Measured on `yrs_real/` (all labelled frames, and the unlabelled ones for the background glow):
per-class brightness (the 5th percentile of a frame as the glow floor, the 99.5th percentile
above it as the aurora's peak, each as a median and a log-normal spread), the radial profile of
the glow, the power-spectrum slope, and the direction of arcs and curtains (structure tensor).
Then the pixel noise and the blur of the camera are fitted by rendering: the blur passes whose
high-pass autocorrelation at one pixel is nearest the real frames', and the noise scale that
gives the real frames' high-pass standard deviation.

Usage (from the repository root; about a minute):

    python scripts/fit_synth.py [--real ../shared/data/yrs_real] [--out pipeline/configs/synth]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from pipeline import realism
from pipeline.classes import CLASSES
from pipeline.config import load_station
from pipeline.errors import ConfigError
from pipeline.imageio import read_frame
from pipeline.preprocess import calibration_from_station, preprocess
from pipeline.synth import dark_frame, frame_rng, render_frame, season_for
from pipeline.synth.calibration import REALISM_CONFIG, RealismConfig, load_realism

REPO = Path(__file__).resolve().parents[1]
#: Rings of the glow profile: fractions of the analysis radius.
GLOW_RINGS = np.linspace(0.0, 1.0, 6)
#: Frames rendered per class for the noise fit.
NOISE_FIT_FRAMES = 6
#: High-pass of the noise statistics: frame minus its 5x5 moving average.
HIGH_PASS = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", type=Path, default=REPO / "../shared/data/yrs_real")
    ap.add_argument("--out", type=Path, default=REALISM_CONFIG)
    return ap.parse_args(argv)


def read_real(real: Path) -> tuple[pd.DataFrame, list[np.ndarray], list[np.ndarray]]:
    """The labelled frames with their labels, and the unlabelled frames."""
    labels = pd.read_parquet(real / "labelled" / "labels.parquet")
    if not len(labels):
        sys.exit(f"fit_synth: no labelled frames in {real}")
    lab = [read_frame(str(real / "labelled" / p)) for p in labels["path"]]
    unl_list = pd.read_csv(real / "unlabelled" / "frames.csv")
    unl = [read_frame(str(real / "unlabelled" / p)) for p in unl_list["path"]]
    return labels.reset_index(drop=True), lab, unl


def class_levels(labels: pd.DataFrame, frames: list[np.ndarray]) -> dict[str, dict]:
    """Per class: median and log-spread of the floor (p5) and of the peak above it (p99.5)."""
    mask = realism.circle_mask(frames[0].shape[0])
    p = np.array([np.percentile(f[mask], [5.0, 99.5]) for f in frames], dtype=float)
    floor, peak = np.maximum(p[:, 0], 1.0), np.maximum(p[:, 1] - p[:, 0], 1.0)
    out = {}
    for cls in CLASSES:
        m = (labels["label"] == cls).to_numpy()
        out[cls] = {
            "floor": round(float(np.median(floor[m])), 1),
            "floor_sigma": round(float(np.std(np.log(floor[m]))), 2),
            "peak": round(float(np.median(peak[m])), 1),
            "peak_sigma": round(float(np.std(np.log(peak[m]))), 2),
        }
    return out


def glow_profile(frames: list[np.ndarray]) -> list[float]:
    """The glow's radial profile: the median over frames of each ring's 10th percentile over
    the zenith's, divided by the synthetic camera's vignetting (which the renderer applies)."""
    n = frames[0].shape[0]
    yy, xx = np.mgrid[:n, :n]
    r = np.hypot(yy - (n - 1) / 2, xx - (n - 1) / 2) / realism.ANALYSIS_RADIUS
    half = 0.5 / (len(GLOW_RINGS) - 1)
    rings = [(r >= max(g - half, 0)) & (r < min(g + half, 1.0)) for g in GLOW_RINGS]
    rows = np.array([[np.percentile(f[m], 10) for m in rings] for f in frames], dtype=float)
    prof = np.median(rows / np.maximum(rows[:, :1], 1.0), axis=0)
    # GLOW_RINGS span the analysis circle: 0.86 of the fisheye horizon radius in raw frames
    rho = GLOW_RINGS * realism.ANALYSIS_RADIUS / 220.0 * 0.86
    vig = 1.0 - season_for(2003).vignetting * rho**2.5
    return [round(float(v), 3) for v in prof / vig]


def band_direction(frame: np.ndarray, mask: np.ndarray) -> float:
    """Direction (deg above the +column axis) of the bands of a frame: the structure tensor."""
    g = ndimage.gaussian_filter(frame.astype(float), 3)
    gy, gx = np.gradient(g)
    jxx, jyy, jxy = (gx * gx)[mask].sum(), (gy * gy)[mask].sum(), (gx * gy)[mask].sum()
    across = 0.5 * np.degrees(np.arctan2(2 * jxy, jxx - jyy))  # gradient, rows down
    return float(-((across + 90.0 + 90.0) % 180.0 - 90.0))


def arc_direction(labels: pd.DataFrame, frames: list[np.ndarray]) -> tuple[float, float]:
    """Median and robust spread (IQR / 1.35) of the band direction of arc frames."""
    mask = realism.circle_mask(frames[0].shape[0], 190.0)
    ang = np.array([band_direction(f, mask) for f, c in zip(frames, labels["label"]) if c == "arc"])
    q1, med, q3 = np.percentile(ang, [25, 50, 75])
    return round(float(med), 1), round(float((q3 - q1) / 1.35), 1)


def spectrum_slope(frames: list[np.ndarray]) -> float:
    """Median coarse power-spectrum slope (wavelengths 128..16 px) of the frames."""
    band = realism.SLOPE_BANDS["slope_coarse"]
    slopes = []
    for f in frames:
        k, p = realism.radial_spectrum(f)
        slopes.append(realism.spectral_slope(k, p, band))
    return round(float(np.nanmedian(slopes)), 2)


def noise_stats(frames: list[np.ndarray]) -> tuple[float, float]:
    """Median high-pass standard deviation and lag-1 autocorrelation inside r = 200 px."""
    mask = realism.circle_mask(frames[0].shape[0], 200.0)
    sd, ac = [], []
    for f in frames:
        f = f.astype(float)
        hp = f - ndimage.uniform_filter(f, HIGH_PASS)
        sd.append(hp[mask].std())
        a, b = hp[:, 1:][mask[:, 1:]], hp[:, :-1][mask[:, 1:]]
        ac.append(np.corrcoef(a, b)[0, 1])
    return float(np.median(sd)), float(np.median(ac))


def render_set(cfg, real_anchor: np.ndarray) -> list[np.ndarray]:
    """A few synthetic frames per class in the real 8-bit form (set-wide percentile stretch)."""
    station = load_station("yrs")
    station = dataclasses.replace(
        station, preprocess=dataclasses.replace(station.preprocess, stretch_high=65535.0)
    )
    cal = calibration_from_station(station, dark=dark_frame(2003))
    t0 = pd.Timestamp("2003-12-21 03:00", tz="UTC")
    frames = []
    for j, cls in enumerate(CLASSES):
        for i in range(NOISE_FIT_FRAMES):
            rng = frame_rng(1, 100 * j + i)
            t = t0 + pd.Timedelta(hours=2 * i)
            frames.append(preprocess(render_frame(cls, rng, 512, time=t, calibration=cfg), cal))
    mask = realism.circle_mask(440)
    anchor = realism.pooled_percentiles(frames, mask)
    return realism.set_stretch(frames, anchor, real_anchor, realism.circle_mask(440, 220.0))


def fit_camera(cfg, real_frames: list[np.ndarray]) -> tuple[int, float, float]:
    """Blur passes, photon-noise scale and white pixel noise that match the real frames'
    high-pass standard deviation and lag-1 autocorrelation (a small grid, by rendering)."""
    real_sd, real_ac = noise_stats(real_frames)
    anchor = realism.pooled_percentiles(real_frames, realism.circle_mask(440))
    best = None
    for passes in (1, 2):
        for scale in (0.5, 1.0, 1.5):
            for white in (0.2, 0.5):
                c = dataclasses.replace(
                    cfg, psf_passes=passes, noise_scale=scale, pixel_noise=white
                )
                sd, ac = noise_stats(render_set(c, anchor))
                cost = ((sd - real_sd) / real_sd) ** 2 + (ac - real_ac) ** 2
                print(
                    f"passes {passes} scale {scale} white {white}: high-pass sd {sd:.2f} "
                    f"(real {real_sd:.2f}), lag-1 autocorrelation {ac:.2f} (real {real_ac:.2f})"
                )
                if best is None or cost < best[0]:
                    best = (cost, passes, scale, white)
    return best[1], best[2], best[3]


HEADER = """\
# Appearance of the real YRS frames that the synthetic renderer (pipeline.synth) reproduces.
# Written by scripts/fit_synth.py from {real} ({n_lab} labelled and {n_unl} unlabelled frames);
# rerun it to refit. Levels are 8-bit levels of the real frames (the station's stretch of
# 0..4000 counts above the dark frame to 0..255), measured inside r = 215 px of the 440 form.
"""

BODY = """\
# Per class: floor = median over frames of the 5th percentile (the glow under the aurora),
# peak = median of the 99.5th percentile above the floor; *_sigma = standard deviation of their
# logarithms over the frames (the renderer draws each frame log-normally).
levels:
{levels}
# Radial profile of the background glow at 0, 0.2, .. 1 of the analysis radius, relative to the
# zenith: median over all frames of each ring's 10th percentile, divided by the synthetic
# camera's vignetting (2003 season), which the renderer applies on top.
glow_profile: {glow}
# Camera: binomial blur passes on the half-resolution sky, the multiplier of the photon noise
# (added before the blur, so it is correlated) and the white pixel noise (levels rms), fitted by
# rendering on a small grid to the real frames' high-pass (frame minus its 5x5 mean) standard
# deviation ({real_sd:.2f} levels) and lag-1 autocorrelation ({real_ac:.2f}).
psf_passes: {psf_passes}
noise_scale: {noise_scale}
pixel_noise: {pixel_noise}
# Median power-spectrum slope of the real frames over wavelengths 128..16 px: the exponent of
# the power-law texture that modulates the emission.
spectrum_slope: {slope}
# Set by hand against the realism report (scripts/realism.py), not fitted: the log-amplitude
# of that texture, the patchiness of the diffuse glow, and the share of frames under cloud.
texture_sigma: {texture_sigma}
glow_patchiness: {glow_patchiness}
cloud_share: {cloud_share}
# Direction of arcs (deg above the image's +column axis, in the raw and the 440 form alike):
# median and IQR / 1.35 of the structure-tensor direction of the real arc frames.
arc_direction_deg: {arc_dir}
arc_direction_sd_deg: {arc_sd}
"""


def write_config(out: Path, fitted: dict, real: Path, n_lab: int, n_unl: int) -> None:
    levels = "\n".join(
        f"  {c}: {{floor: {v['floor']}, floor_sigma: {v['floor_sigma']}, "
        f"peak: {v['peak']}, peak_sigma: {v['peak_sigma']}}}"
        for c, v in fitted["levels"].items()
    )
    text = HEADER.format(real="yrs_real/", n_lab=n_lab, n_unl=n_unl) + BODY.format(
        levels=levels,
        glow=fitted["glow"],
        **{k: v for k, v in fitted.items() if k != "levels" and k != "glow"},
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    load_realism(out)  # what was written validates


def current_config() -> RealismConfig | None:
    """The values set by hand are kept from the current config, when it reads."""
    try:
        return load_realism(REALISM_CONFIG)
    except ConfigError:
        return None


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if not (a.real / "labelled" / "labels.parquet").is_file():
        sys.exit(f"fit_synth: no real frames at {a.real}; pass --real DIR")
    labels, lab, unl = read_real(a.real)
    current = current_config()
    fitted = {
        "levels": class_levels(labels, lab),
        "glow": glow_profile(lab + unl),
        "slope": spectrum_slope(lab),
        "texture_sigma": current.texture_sigma if current else 0.5,
        "glow_patchiness": current.glow_patchiness if current else 0.3,
        "cloud_share": current.cloud_share if current else 0.1,
    }
    fitted["arc_dir"], fitted["arc_sd"] = arc_direction(labels, lab)
    fitted["real_sd"], fitted["real_ac"] = noise_stats(lab)
    print(fitted)
    write_config(
        a.out,
        {**fitted, "psf_passes": 1, "noise_scale": 1.0, "pixel_noise": 0.5},
        a.real,
        len(lab),
        len(unl),
    )
    cfg = load_realism(a.out)
    fitted["psf_passes"], fitted["noise_scale"], fitted["pixel_noise"] = fit_camera(cfg, lab)
    write_config(a.out, fitted, a.real, len(lab), len(unl))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
