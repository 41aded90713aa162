"""The renderer's values fitted on real YRS frames (``configs/synth/realism.yaml``).

The file is written by ``scripts/fit_synth.py`` from ``yrs_real/`` (labelled and unlabelled
frames) and read once per process; every value is validated, and a bad one is a ConfigError
naming the file and the key.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import CONFIG_DIR, load_config

#: The fitted values that the renderer reads.
REALISM_CONFIG = CONFIG_DIR / "synth" / "realism.yaml"
#: Counts above the dark frame per 8-bit level of the real frames: the published YRS stretch
#: maps 0..4000 counts to 0..255.
COUNTS_PER_LEVEL = 4000.0 / 255.0


@dataclass(frozen=True)
class ClassLevels:
    """Brightness of one class in 8-bit levels of the real frames (the station's stretch)."""

    floor: float  # median 5th percentile of a frame: background glow under the aurora
    floor_sigma: float  # log-normal spread of the floor between frames
    peak: float  # median 99.5th percentile minus the floor: the aurora's brightest parts
    peak_sigma: float  # log-normal spread of the peak between frames

    def validate(self) -> None:
        _positive("floor", self.floor)
        _positive("peak", self.peak)
        _within("floor_sigma", self.floor_sigma, 0.0, 2.0)
        _within("peak_sigma", self.peak_sigma, 0.0, 2.0)


@dataclass(frozen=True)
class Levels:
    """The brightness of each class."""

    arc: ClassLevels
    drapery: ClassLevels
    radial: ClassLevels
    hotspot: ClassLevels

    def of(self, label: str) -> ClassLevels:
        return getattr(self, label)


@dataclass(frozen=True)
class RealismConfig:
    """Fitted appearance of the real YRS frames; see configs/synth/realism.yaml for each key."""

    levels: Levels
    glow_profile: tuple[float, ...] = (1.0, 1.0)
    noise_scale: float = 1.0
    pixel_noise: float = 0.5
    psf_passes: int = 1
    spectrum_slope: float = -3.2
    texture_sigma: float = 0.5
    glow_patchiness: float = 0.3
    arc_direction_deg: float = 30.0
    arc_direction_sd_deg: float = 25.0
    cloud_share: float = 0.0

    def validate(self) -> None:
        """Raise ValueError naming the first key whose value is out of range."""
        if len(self.glow_profile) < 2 or min(self.glow_profile) <= 0:
            raise ValueError(
                f"glow_profile must hold at least 2 positive values, got {list(self.glow_profile)}"
            )
        _positive("noise_scale", self.noise_scale)
        _within("pixel_noise", self.pixel_noise, 0.0, 20.0)
        _within("psf_passes", self.psf_passes, 0, 4)
        _within("spectrum_slope", self.spectrum_slope, -6.0, -1.0)
        _within("texture_sigma", self.texture_sigma, 0.0, 2.0)
        _within("glow_patchiness", self.glow_patchiness, 0.0, 2.0)
        _within("arc_direction_deg", self.arc_direction_deg, -90.0, 90.0)
        _within("arc_direction_sd_deg", self.arc_direction_sd_deg, 0.0, 90.0)
        _within("cloud_share", self.cloud_share, 0.0, 1.0)


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{key} must be above 0, got {value!r}")


def _within(key: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ValueError(f"{key} must be within {lo:g}..{hi:g}, got {value!r}")


def load_realism(path: str | os.PathLike = REALISM_CONFIG) -> RealismConfig:
    """Read and validate a realism config (a ConfigError names the file and the key)."""
    return load_config(RealismConfig, Path(path))


@functools.lru_cache(maxsize=1)
def realism() -> RealismConfig:
    """The built-in fitted values, read once per process."""
    return load_realism()
