"""Camera seasons of the synthetic imager: gain, sensitivity, noise and dark frame per winter."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.errors import InputError

#: Offset that keeps the season generators independent of the frame generators.
_SEASON_SALT = 0xDA4C


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
