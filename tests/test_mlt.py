"""UT -> MLT: the YRS offset convention, aacgmv2 at magnetic noon, vectorisation and edge cases."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from pipeline.config import load_station
from pipeline.errors import ConfigError, InputError
from pipeline.mlt import aacgm_mlt, offset_mlt, to_utc_ns, ut_to_mlt


@pytest.fixture(scope="module")
def yrs():
    return load_station("yrs")


def test_offset_mlt_is_ut_plus_three_hours_for_yrs(yrs):
    t = pd.to_datetime(
        ["2004-01-15 03:00:00", "2004-01-15 09:24:00", "2004-01-15 22:30:00"], utc=True
    )
    np.testing.assert_allclose(ut_to_mlt(t, yrs, "offset"), [6.0, 12.4, 1.5])
    assert yrs.mlt.method == "offset"  # the YRS default is the literature's convention
    np.testing.assert_allclose(ut_to_mlt(t, yrs), [6.0, 12.4, 1.5])


def test_offset_mlt_is_exact_at_bin_edges(yrs):
    """03:03:00 UT must give the float that rounds back to exactly 06:03:00 in nanoseconds."""
    mlt = ut_to_mlt(pd.to_datetime(["2004-01-15 03:03:00"], utc=True), yrs)
    assert round(mlt[0] * 3_600_000_000_000) == (6 * 3600 + 180) * 1_000_000_000


def test_times_in_other_zones_and_naive_times_are_utc(yrs):
    aware = pd.to_datetime(["2004-01-15 10:24:00+01:00"])
    naive = pd.to_datetime(["2004-01-15 09:24:00"])
    np.testing.assert_allclose(ut_to_mlt(aware, yrs), ut_to_mlt(naive, yrs))
    # second resolution (pandas non-ns units) converts the same way
    sec = pd.Series(pd.to_datetime(["2004-01-15 09:24:00"]).as_unit("s"))
    assert to_utc_ns(sec)[0] == to_utc_ns(naive)[0]


def test_missing_times_give_nan(yrs):
    t = pd.Series(pd.to_datetime(["2004-01-15 09:24:00", None], utc=True))
    for method in ("offset", "aacgm"):
        out = ut_to_mlt(t, yrs, method)
        assert np.isfinite(out[0]) and np.isnan(out[1])


def test_aacgm_mlt_is_magnetic_noon_at_0924_ut(yrs):
    mlt = ut_to_mlt(pd.to_datetime(["2004-01-15 09:24:00"], utc=True), yrs, "aacgm")
    assert abs(mlt[0] - 12.0) < 0.1


def test_aacgm_matches_aacgmv2_per_frame_and_mlt_minus_ut_range(yrs):
    import aacgmv2

    t = pd.date_range("2004-01-15", periods=24 * 6, freq="10min") + pd.Timedelta("37s")
    got = ut_to_mlt(t, yrs, "aacgm")
    want = np.array(
        [
            aacgmv2.get_aacgm_coord(yrs.lat, yrs.lon, yrs.mlt.altitude_km, x.to_pydatetime())[2]
            for x in t[::7]
        ]
    )
    diff = (got[::7] - want + 12) % 24 - 12
    assert np.abs(diff).max() < 10 / 3600  # within 10 s of the per-frame value
    lead = (got - ut_to_mlt(t, yrs, "offset") + 3.0) % 24
    assert 2.0 < lead.min() < 2.3 and 2.6 < lead.max() < 3.0  # ~+2.1 .. +2.75 h on this day
    assert np.all((got >= 0) & (got < 24))


def test_aacgm_is_vectorised(yrs, monkeypatch):
    """Vectorised = a call per UT day and one array call, counted (not timed: load-dependent)."""
    import aacgmv2

    calls = {"coord": 0, "mlt": 0}
    coord, convert = aacgmv2.get_aacgm_coord, aacgmv2.convert_mlt

    def count_coord(*args, **kwargs):
        calls["coord"] += 1
        return coord(*args, **kwargs)

    def count_mlt(*args, **kwargs):
        calls["mlt"] += 1
        return convert(*args, **kwargs)

    monkeypatch.setattr(aacgmv2, "get_aacgm_coord", count_coord)
    monkeypatch.setattr(aacgmv2, "convert_mlt", count_mlt)
    t = pd.date_range("2004-01-01", periods=200_000, freq="10s", tz="UTC")  # 23.1 days
    out = ut_to_mlt(t, yrs, "aacgm")
    assert out.shape == (200_000,) and np.isfinite(out).all()
    assert calls == {"coord": 24, "mlt": 1}  # 24 UT days touched (the last grid node included)


def test_aacgm_outside_igrf_years_is_a_clear_error(yrs):
    with pytest.raises(InputError, match="offset"):
        aacgm_mlt(to_utc_ns(pd.to_datetime(["2040-01-01"])), yrs.lat, yrs.lon)


def test_unknown_method_is_a_config_error(yrs):
    with pytest.raises(ConfigError, match="allowed"):
        ut_to_mlt(pd.to_datetime(["2004-01-01"]), yrs, "igrf")


def test_offset_mlt_wraps_midnight():
    ns = to_utc_ns([dt.datetime(2004, 1, 1, 23, 0)])
    assert offset_mlt(ns, 3.0)[0] == pytest.approx(2.0)
    assert offset_mlt(ns, -1.5)[0] == pytest.approx(21.5)
