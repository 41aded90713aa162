"""UT -> magnetic local time (MLT) at a station, vectorised over whole columns of timestamps."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

import aacgmv2
import numpy as np
import pandas as pd

from pipeline.config import StationConfig
from pipeline.errors import ConfigError, InputError

NS_PER_HOUR = 3_600_000_000_000
NS_PER_DAY = 24 * NS_PER_HOUR
#: aacgm MLT is evaluated on this UT grid and interpolated linearly in between: MLT advances
#: ~1 h per UT hour with a slow modulation; 10-minute linear pieces stay within a few seconds.
AACGM_GRID_NS = 600 * 1_000_000_000
#: Years covered by the IGRF model inside aacgmv2 (2.7: IGRF14, 1990 <= year < 2030).
AACGM_YEARS = (1990, 2030)
METHODS = ("offset", "aacgm")

_NAT = np.iinfo(np.int64).min


def to_utc_ns(times: Iterable | pd.Series | pd.DatetimeIndex | np.ndarray) -> np.ndarray:
    """Timestamps as int64 nanoseconds since 1970 UTC (naive times taken as UTC; NaT stays NaT)."""
    if isinstance(times, pd.Series):
        times = times.array
    idx = pd.DatetimeIndex(times)
    if idx.tz is not None:
        idx = idx.tz_convert("UTC").tz_localize(None)
    # pandas may hold s/ms/us resolution: asi8 is in the index's own unit, so fix it to ns first.
    return idx.as_unit("ns").asi8.copy()


def ut_to_mlt(times, station: StationConfig, method: str | None = None) -> np.ndarray:
    """MLT in float hours [0, 24) for UTC ``times`` at ``station`` (NaT -> NaN).

    ``method``: ``offset`` or ``aacgm`` (default: the station's ``mlt.method``).
    """
    method = method or station.mlt.method
    if method not in METHODS:
        raise ConfigError(f"unknown MLT method {method!r}; allowed: {', '.join(METHODS)}")
    ns = to_utc_ns(times)
    if method == "offset":
        return offset_mlt(ns, station.mlt.offset_hours)
    return aacgm_mlt(ns, station.lat, station.lon, station.mlt.altitude_km)


def offset_mlt(ns: np.ndarray, offset_hours: float) -> np.ndarray:
    """MLT = UT + ``offset_hours`` (mod 24), in integer nanoseconds so that bin edges stay exact."""
    ns = np.asarray(ns, dtype=np.int64)
    bad = ns == _NAT
    off = int(round(offset_hours * NS_PER_HOUR))
    tod = (np.where(bad, 0, ns) % NS_PER_DAY + off) % NS_PER_DAY
    out = tod / NS_PER_HOUR
    out[bad] = np.nan
    return out


def _magnetic_longitudes(days: np.ndarray, lat: float, lon: float, alt_km: float) -> np.ndarray:
    """AACGM-v2 magnetic longitude of the station, one per UT day.

    One a day is enough: it drifts only with the IGRF epoch.
    """
    out = np.empty(len(days))
    for i, d in enumerate(days):
        t = dt.datetime(1970, 1, 1) + dt.timedelta(days=int(d), hours=12)
        _, mlon, _ = aacgmv2.get_aacgm_coord(lat, lon, alt_km, t)
        out[i] = mlon
    if not np.all(np.isfinite(out)):
        raise InputError(
            f"aacgm: no magnetic coordinates for lat={lat}, lon={lon}, altitude {alt_km} km "
            "(aacgmv2 covers 0-2000 km without field-line tracing); use --mlt-method offset"
        )
    return out


def aacgm_mlt(ns: np.ndarray, lat: float, lon: float, alt_km: float = 110.0) -> np.ndarray:
    """AACGM-v2 MLT at a site for int64 UTC nanoseconds; exact on a 10-min grid, linear between."""
    ns = np.asarray(ns, dtype=np.int64)
    out = np.full(ns.shape, np.nan)
    good = ns != _NAT
    if not good.any():
        return out
    t = ns[good]
    years = t.astype("datetime64[ns]").astype("datetime64[Y]").astype(np.int64) + 1970
    if years.min() < AACGM_YEARS[0] or years.max() >= AACGM_YEARS[1]:
        raise InputError(
            f"aacgm MLT covers {AACGM_YEARS[0]}-{AACGM_YEARS[1] - 1} only (IGRF in aacgmv2), "
            f"the data span {years.min()}-{years.max()}; use --mlt-method offset"
        )
    cell = t // AACGM_GRID_NS
    cells, inv = np.unique(cell, return_inverse=True)
    # The grid nodes needed: both ends of every occupied 10-minute cell.
    nodes = np.union1d(cells, cells + 1)
    node_ns = nodes * AACGM_GRID_NS
    days, day_inv = np.unique(node_ns // NS_PER_DAY, return_inverse=True)
    mlon = _magnetic_longitudes(days, lat, lon, alt_km)[day_inv]
    node_dt = pd.DatetimeIndex(node_ns).to_pydatetime()
    node_mlt = np.asarray(aacgmv2.convert_mlt(mlon, node_dt), dtype=float)
    a = node_mlt[np.searchsorted(nodes, cells)]
    b = node_mlt[np.searchsorted(nodes, cells + 1)]
    # Unwrap across midnight: MLT moves forwards by ~1/6 h per cell, so the step mod 24 is it.
    step = np.mod(b - a, 24.0)
    frac = (t - cell * AACGM_GRID_NS) / AACGM_GRID_NS
    mlt = np.mod(a[inv] + frac * step[inv], 24.0)
    mlt[mlt >= 24.0] = 0.0  # np.mod(-1e-17, 24) rounds to 24.0
    out[good] = mlt
    return out
