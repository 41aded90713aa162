"""Occurrence statistics: exact bins, counts, ratios, grouping, intervals, correction, NetCDF."""

from __future__ import annotations

import bounds
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from pipeline.classes import CLASSES
from pipeline.errors import InputError
from pipeline.occurrence import (
    DROPPED_BIN,
    MISSING_BIN,
    bin_index,
    clustered_effective_n,
    correct_proportions,
    count_bins,
    group_keys,
    hourly_summary,
    make_bins,
    occurrence_columns,
    occurrence_from_counts,
    occurrence_table,
    to_dataset,
    wilson_interval,
)

H = 1 / 3600  # one second in hours


def hms(h: int, m: int = 0, s: int = 0) -> float:
    return h + m / 60 + s / 3600


# ----------------------------------------------------------------------------- bins


def test_3min_bins_over_6_to_18_are_240_with_exact_last_edge():
    spec = make_bins("3min", (6, 18))
    assert spec.nbins == 240
    edges = spec.edges
    assert len(edges) == 241 and edges[0] == 6.0 and edges[-1] == 18.0
    np.testing.assert_allclose(np.diff(edges), 0.05)
    assert make_bins("5min").nbins == 144
    assert make_bins("0.5h").nbins == 24
    assert make_bins("1h", (0, 24)).nbins == 24


@pytest.mark.parametrize(
    "bins, mlt_range, match",
    [
        ("7min", (6, 18), "whole bins"),
        ("often", (6, 18), "not a duration"),
        ("3min", (18, 6), "start < end"),
        ("3min", (6, 31), "start < end <= start \\+ 24"),
        ("3min", (24, 26), "start < 24"),
        ("3min", (22, 2), "across midnight ends past 24"),
        ("1h", (22.5, 26.5), "midnight must be a bin edge"),
        ("13h", (6, 18), "at most"),
        ("3", (6, 18), "no unit"),
        (3, (6, 18), "no unit"),
        ("1ms", (6, 18), "bins; at most"),
    ],
)
def test_bad_bins_are_clear_errors(bins, mlt_range, match):
    with pytest.raises(InputError, match=match):
        make_bins(bins, mlt_range)


def test_edge_frames_fall_in_the_right_bin():
    spec = make_bins("3min", (6, 18))
    mlt = [hms(6), hms(6, 3), hms(6, 2, 59), hms(17, 59, 59), hms(18), hms(5, 59, 59), np.nan]
    got = bin_index(np.array(mlt), spec)
    assert got.tolist() == [0, 1, 0, 239, DROPPED_BIN, DROPPED_BIN, MISSING_BIN]


def test_edges_hold_for_mlt_computed_from_ut():
    """Frames whose MLT comes from UT + 3 h land exactly: 03:03:00 UT is 06:03:00 MLT, bin 1."""
    from pipeline.config import load_station
    from pipeline.mlt import ut_to_mlt

    t = pd.to_datetime(
        ["2004-01-01 03:03:00", "2004-01-01 14:59:59", "2004-01-01 15:00:00"], utc=True
    )
    got = bin_index(ut_to_mlt(t, load_station("yrs")), make_bins("3min"))
    assert got.tolist() == [1, 239, DROPPED_BIN]


# ----------------------------------------------------------------------------- counts


@pytest.fixture()
def hand_table() -> pd.DataFrame:
    """Frames with known bins in 1-hour bins over 6-9 MLT."""
    return pd.DataFrame(
        {
            "mlt": [6.1, 6.5, 6.9, 7.2, 7.5, 8.99, 9.0, 5.0, np.nan],
            "label": ["arc", "arc", "drapery", "radial", "radial", "hotspot", "arc", "arc", "arc"],
            "time_utc": pd.to_datetime(["2004-01-10 03:00:00"] * 9, utc=True),
        }
    )


def test_counts_and_ratios_on_a_hand_made_table(hand_table):
    tab = occurrence_table(hand_table, bins="1h", mlt_range=(6, 9))
    assert list(tab.columns) == occurrence_columns()
    assert tab["mlt_start"].tolist() == [6.0, 7.0, 8.0]
    assert tab["mlt_end"].tolist() == [7.0, 8.0, 9.0]
    assert tab["n_frames"].tolist() == [3, 2, 1]
    assert tab["n_arc"].tolist() == [2, 0, 0]
    assert tab["n_drapery"].tolist() == [1, 0, 0]
    assert tab["n_radial"].tolist() == [0, 2, 0]
    assert tab["n_hotspot"].tolist() == [0, 0, 1]
    np.testing.assert_allclose(tab["ratio_arc"], [2 / 3, 0, 0])
    np.testing.assert_allclose(tab["ratio_radial"], [0, 1, 0])
    assert tab.attrs["n_binned"] == 6
    assert tab.attrs["n_dropped"] == 2  # 9.0 and 5.0
    assert tab.attrs["n_missing"] == 1  # NaN MLT


def test_ratios_sum_to_one_and_empty_bins_are_nan():
    rng = np.random.default_rng(0)
    n = 5000
    df = pd.DataFrame(
        {
            "mlt": rng.uniform(6, 12, n),  # 12-18 stays empty
            "label": rng.choice(CLASSES, n),
        }
    )
    tab = occurrence_table(df, ci=True)
    ratios = tab[[f"ratio_{c}" for c in CLASSES]].to_numpy()
    full = tab["n_frames"].to_numpy() > 0
    assert full.sum() == 120
    np.testing.assert_allclose(ratios[full].sum(axis=1), 1.0)
    assert np.isnan(ratios[~full]).all()
    assert tab.loc[~full, "ci_low_arc"].isna().all()
    assert (tab.loc[full, "ci_low_arc"] <= tab.loc[full, "ratio_arc"]).all()
    assert (tab.loc[full, "ratio_arc"] <= tab.loc[full, "ci_high_arc"]).all()
    assert tab["n_frames"].sum() == n


def test_labels_as_categorical_give_the_same_table(hand_table):
    cat = hand_table.assign(label=hand_table["label"].astype("category"))
    pd.testing.assert_frame_equal(
        occurrence_table(cat, bins="1h", mlt_range=(6, 9)),
        occurrence_table(hand_table, bins="1h", mlt_range=(6, 9)),
    )


def test_unknown_label_and_missing_columns_are_clear_errors(hand_table):
    with pytest.raises(InputError, match="unknown labels aurora"):
        occurrence_table(hand_table.assign(label="aurora"))
    with pytest.raises(InputError, match="lacks column"):
        occurrence_table(hand_table.drop(columns="mlt"))


# ----------------------------------------------------------------------------- grouping


def test_winter_grouping_puts_january_into_the_previous_december_winter():
    t = pd.to_datetime(
        ["2003-12-21", "2004-01-10", "2004-02-28", "2004-11-30", "2004-12-01", "2005-01-05"],
        utc=True,
    )
    assert group_keys(t, "winter").tolist() == [2003, 2003, 2003, 2004, 2004, 2004]
    assert group_keys(t, "year").tolist() == [2003, 2004, 2004, 2004, 2004, 2005]
    days = group_keys(t[:2], "day")
    assert (days[1] - days[0]) == 20


def test_grouped_table_has_every_bin_per_group():
    t = pd.to_datetime(["2003-12-21 06:00", "2004-01-10 06:00", "2004-12-24 06:00"], utc=True)
    df = pd.DataFrame(
        {"mlt": [6.1, 7.1, 6.2], "label": ["arc", "drapery", "hotspot"], "time_utc": t}
    )
    tab = occurrence_table(df, bins="1h", mlt_range=(6, 8), by="winter")
    assert tab.columns[0] == "winter"
    assert tab["winter"].tolist() == [2003, 2003, 2004, 2004]
    assert tab["n_frames"].tolist() == [1, 1, 1, 0]
    assert (
        tab.loc[0, "n_arc"] == 1 and tab.loc[1, "n_drapery"] == 1 and tab.loc[2, "n_hotspot"] == 1
    )
    days = occurrence_table(df, bins="1h", mlt_range=(6, 8), by="day")
    assert days["day"].nunique() == 3
    assert pd.Timestamp(days["day"].iloc[0]) == pd.Timestamp("2003-12-21")


# ----------------------------------------------------------------------------- pandas vs dask


def test_pandas_and_dask_give_the_same_table():
    import dask.dataframe as dd

    rng = np.random.default_rng(3)
    n = 3000
    t = pd.Timestamp("2003-12-01", tz="UTC") + pd.to_timedelta(
        rng.integers(0, 500 * 86400, n), unit="s"
    )
    df = pd.DataFrame(
        {"time_utc": t, "mlt": rng.uniform(5, 19, n), "label": rng.choice(CLASSES, n)}
    )
    ddf = dd.from_pandas(df, npartitions=4)
    for by in (None, "winter"):
        a = occurrence_table(df, bins="5min", by=by, ci=True)
        b = occurrence_table(ddf, bins="5min", by=by, ci=True)
        pd.testing.assert_frame_equal(a, b)
        assert a.attrs == b.attrs


# ----------------------------------------------------------------------------- intervals


def test_wilson_interval_known_values():
    low, high = wilson_interval([5, 0, 10], [10, 10, 10])
    # the reference values are rounded to 6 decimals (5e-7); float64 adds ~1e-16
    np.testing.assert_allclose(low, [0.236593, 0.0, 0.722467], atol=5e-7 + 1e-12)
    np.testing.assert_allclose(high, [0.763407, 0.277533, 1.0], atol=5e-7 + 1e-12)
    low, high = wilson_interval(0, 0)
    assert np.isnan(low) and np.isnan(high)


def _days_table(day_classes, frames_per_day=100, mlt=12.01, seed=0):
    """Frames in one MLT bin: for each day, its frames' classes drawn from that day's list."""
    rng = np.random.default_rng(seed)
    rows = []
    for d, classes in enumerate(day_classes):
        t0 = pd.Timestamp("2003-12-21T08:00", tz="UTC") + pd.Timedelta(days=d)
        times = t0 + pd.to_timedelta(np.arange(frames_per_day) * 1, unit="s")
        rows.append(
            pd.DataFrame(
                {"time_utc": times, "mlt": mlt, "label": rng.choice(classes, frames_per_day)}
            )
        )
    return pd.concat(rows, ignore_index=True)


def test_intervals_treat_one_day_as_one_cluster():
    """10 days of 100 frames, each day all arc or all drapery: 10 observations, not 1,000."""
    df = _days_table([["arc"]] * 5 + [["drapery"]] * 5)
    tab = occurrence_table(df, bins="3min", ci=True)
    assert tab.attrs["ci_method"] == "wilson-days"
    row = tab[tab["n_frames"] > 0].iloc[0]
    assert row["ratio_arc"] == 0.5
    width = row["ci_high_arc"] - row["ci_low_arc"]
    lo, hi = wilson_interval(4.5, 9)  # n_eff = p(1-p)/var = D - 1 = 9 for this design
    assert row["ci_low_arc"] == pytest.approx(lo[()]) and row["ci_high_arc"] == pytest.approx(
        hi[()]
    )
    assert width > 0.5
    flo, fhi = wilson_interval(500, 1000)
    assert width > 8 * (fhi - flo)  # what independent frames would claim
    # hotspot never occurs: p = 0 cannot give a variance; n_eff falls back to the 10 days
    assert row["ci_high_hotspot"] == pytest.approx(wilson_interval(0, 10)[1][()])


def test_intervals_of_independent_frames_stay_binomial():
    """Days that all draw from the same mix: the day-level n_eff is close to the frame count."""
    df = _days_table([list(CLASSES)] * 40, frames_per_day=50, seed=4)
    y = np.stack([(df["label"] == c).to_numpy() for c in CLASSES], axis=1).astype(int)
    day = (pd.to_datetime(df["time_utc"]) - pd.Timestamp("2003-12-21", tz="UTC")).dt.days
    y_day = pd.DataFrame(y).groupby(day.to_numpy()).sum().to_numpy()
    n_eff, days = clustered_effective_n(y_day, y_day.sum(1), np.zeros(len(y_day), int), 1)
    assert days[0] == 40
    assert np.all(n_eff <= 2000) and np.all(n_eff > 2000 * 0.6)
    tab = occurrence_table(df, bins="3min", ci=True)
    row = tab[tab["n_frames"] > 0].iloc[0]
    flo, fhi = wilson_interval(row["n_arc"], 2000)
    assert row["ci_high_arc"] - row["ci_low_arc"] < 1.4 * (fhi - flo)


def test_one_day_gives_the_widest_honest_interval():
    df = _days_table([["arc", "radial"]])
    row = occurrence_table(df, bins="3min", ci=True).query("n_frames > 0").iloc[0]
    lo, hi = wilson_interval(row["ratio_arc"] * 1, 1)
    assert row["ci_low_arc"] == pytest.approx(lo[()]) and row["ci_high_arc"] == pytest.approx(
        hi[()]
    )


def test_grouped_by_day_intervals_are_frame_level_and_say_so():
    df = _days_table([["arc", "radial"]] * 3)
    tab = occurrence_table(df, bins="3min", by="day", ci=True)
    assert tab.attrs["ci_method"] == "wilson-frames"
    row = tab.query("n_frames > 0").iloc[0]
    lo, _ = wilson_interval(row["n_arc"], row["n_frames"])
    assert row["ci_low_arc"] == pytest.approx(lo[()])


def test_tables_without_times_keep_frame_level_intervals():
    df = _days_table([["arc", "radial"]] * 3).drop(columns="time_utc")
    tab = occurrence_table(df, bins="3min", ci=True)
    assert tab.attrs["ci_method"] == "wilson-frames"
    row = tab.query("n_frames > 0").iloc[0]
    lo, hi = wilson_interval(row["n_arc"], row["n_frames"])
    assert row["ci_low_arc"] == pytest.approx(lo[()])


# ----------------------------------------------------------------------------- correction

CONFUSION = np.array(
    [
        [900, 50, 30, 20],
        [40, 850, 60, 50],
        [30, 80, 800, 90],
        [80, 30, 60, 830],
    ]
)


def _solve_tol(confusion) -> float:
    """Error bound of correct_proportions on exact data: each support's (K+1)-square KKT system
    is solved by a backward-stable pinv (SVD), so its solution is off by at most cond(KKT)
    gamma_{3 (K+1)^2} (float64, Higham ch. 7/9) relative to its size (<= 1 on the simplex)."""
    import itertools

    m = confusion / confusion.sum(axis=1, keepdims=True)
    k = len(m)
    worst = 1.0
    for size in range(1, k + 1):
        for s in itertools.combinations(range(k), size):
            kkt = np.zeros((size + 1, size + 1))
            kkt[:size, :size] = 2 * m.T[:, s].T @ m.T[:, s]
            kkt[:size, size] = kkt[size, :size] = 1.0
            worst = max(worst, np.linalg.cond(kkt))
    return worst * bounds.gamma(3 * (k + 1) ** 2, np.float64)


def test_correction_is_identity_for_the_identity_matrix():
    rng = np.random.default_rng(1)
    q = rng.dirichlet(np.ones(4), size=50)
    np.testing.assert_allclose(correct_proportions(q, np.eye(4)), q, atol=_solve_tol(np.eye(4)))
    counts = rng.integers(0, 100, size=(50, 4))
    counts[0] = 0
    got = correct_proportions(counts, np.eye(4) * 7)
    assert np.isnan(got[0]).all()
    np.testing.assert_allclose(got[1:], counts[1:] / counts[1:].sum(axis=1, keepdims=True))


def test_correction_inverts_an_exact_confusion():
    m = CONFUSION / CONFUSION.sum(axis=1, keepdims=True)
    p = np.array([[0.7, 0.2, 0.1, 0.0], [0.0, 0.0, 0.0, 1.0], [0.25, 0.25, 0.25, 0.25]])
    q = p @ m
    np.testing.assert_allclose(correct_proportions(q, CONFUSION), p, atol=_solve_tol(CONFUSION))


def test_correction_recovers_true_proportions_from_simulated_predictions():
    """Frames of known true classes pass through a known confusion; the correction undoes it."""
    rng = np.random.default_rng(7)
    m = CONFUSION / CONFUSION.sum(axis=1, keepdims=True)
    nbins, per_bin = 12, 20000
    true_p = rng.dirichlet(np.full(4, 0.8), size=nbins)
    mlt = np.repeat(6 + np.arange(nbins) + 0.5, per_bin)
    true = np.concatenate([rng.choice(4, per_bin, p=p) for p in true_p])
    u = rng.random(len(true))
    pred = (u[:, None] > np.cumsum(m[true], axis=1)).sum(axis=1)
    df = pd.DataFrame({"mlt": mlt, "label": np.asarray(CLASSES)[pred]})
    tab = occurrence_table(df, bins="1h", confusion=CONFUSION)
    raw = tab[[f"ratio_{c}" for c in CLASSES]].to_numpy()
    corr = tab[[f"ratio_{c}_corrected" for c in CLASSES]].to_numpy()
    # Sampling error of a share from 20000 frames is < 0.004; the inversion amplifies it a little.
    assert np.abs(corr - true_p).max() < 0.03
    assert np.abs(raw - true_p).max() > 0.05  # the uncorrected ratios really are biased
    np.testing.assert_allclose(corr.sum(axis=1), 1.0)
    assert (corr >= 0).all()


def test_correction_stays_on_the_simplex_when_the_inverse_goes_negative():
    m = CONFUSION / CONFUSION.sum(axis=1, keepdims=True)
    q = np.array([1.0, 0.0, 0.0, 0.0])  # purer than any mix of rows of m can be
    got = correct_proportions(q, CONFUSION)
    assert (got >= 0).all() and got.sum() == pytest.approx(1.0)
    unconstrained = np.linalg.solve(m.T, q)
    assert (unconstrained < 0).any()
    assert got[0] == pytest.approx(1.0)


def test_bad_confusion_matrices_are_clear_errors():
    with pytest.raises(InputError, match="4x4"):
        correct_proportions(np.ones(4), np.eye(3))
    bad = np.eye(4)
    bad[2, 2] = 0
    with pytest.raises(InputError, match="radial"):
        correct_proportions(np.ones(4), bad)


# ----------------------------------------------------------------------------- summaries, xarray


def test_hourly_summary_sums_bins_into_hours(hand_table):
    tab = occurrence_table(hand_table, bins="3min", mlt_range=(6, 9))
    hourly = hourly_summary(tab)
    assert hourly["mlt_start"].tolist() == [6.0, 7.0, 8.0]
    assert hourly["n_frames"].tolist() == [3, 2, 1]
    np.testing.assert_allclose(hourly["ratio_arc"], [2 / 3, 0, 0])


def test_netcdf_round_trip(tmp_path, hand_table):
    tab = occurrence_table(hand_table, bins="1h", mlt_range=(6, 9), ci=True, confusion=CONFUSION)
    ds = to_dataset(tab, station="Yellow River Station", method="offset", source="hand")
    assert ds["ratio"].dims == ("mlt_bin", "class")
    assert ds["ratio"].attrs["units"] == "1" and ds["mlt_start"].attrs["units"] == "hours"
    path = tmp_path / "occ.nc"
    ds.to_netcdf(path, engine="netcdf4")
    with xr.open_dataset(path, engine="netcdf4") as back:
        assert list(back["class_name"].values) == list(CLASSES)
        assert back["class"].values.tolist() == [1, 2, 3, 4]  # the label files' codes
        assert back["count"].dtype == np.int32 and back["n_frames"].dtype == np.int32
        assert back["count"].sel({"class": 1}).sum() == tab["n_arc"].sum()  # 1: arc
        np.testing.assert_array_equal(back["count"].values, ds["count"].values)
        np.testing.assert_allclose(back["ratio"].values, ds["ratio"].values)
        np.testing.assert_allclose(back["ci_high"].values, ds["ci_high"].values)
        np.testing.assert_allclose(back["ratio_corrected"].values, ds["ratio_corrected"].values)
        np.testing.assert_allclose(back["mlt_end"].values, [7, 8, 9])
        assert back.attrs["station"] == "Yellow River Station"
        assert back.attrs["n_dropped"] == 2
        np.testing.assert_allclose(back.attrs["bin_edges_hours"], [6, 7, 8, 9])


def test_grouped_dataset_has_a_group_dimension(hand_table):
    tab = occurrence_table(hand_table, bins="1h", mlt_range=(6, 9), by="winter")
    ds = to_dataset(tab)
    assert ds["ratio"].dims == ("mlt_bin", "class", "winter")  # CF 2.4: time-like dims last
    assert ds["winter"].values.tolist() == [2003]


@pytest.mark.parametrize(("by", "start"), [(None, 22), ("year", 6), ("day", 6)])
def test_netcdf_passes_the_cf_checker(tmp_path, hand_table, cf_problems, by, start):
    """No int64, no invented standard_name, a history, bounds without _FillValue, numeric
    coordinate variables (the class names are an auxiliary coordinate), time dims last."""
    df = hand_table.assign(mlt=(hand_table["mlt"] + start - 6) % 24)  # 22: across midnight
    tab = occurrence_table(
        df, bins="1h", mlt_range=(start, start + 3), by=by, ci=True, confusion=CONFUSION
    )
    path = tmp_path / "occ.nc"
    to_dataset(tab, history="2026-01-01T00:00:00Z: by hand").to_netcdf(path, engine="netcdf4")
    assert cf_problems(path) == []
    with xr.open_dataset(path, engine="netcdf4") as back:
        assert back.attrs["history"] == "2026-01-01T00:00:00Z: by hand"
        assert "standard_name" not in back["mlt"].attrs
        assert "_FillValue" not in back["mlt_bounds"].encoding


def test_from_counts_collapses_groups(hand_table):
    spec = make_bins("1h", (6, 9))
    counts = count_bins(hand_table, spec, by="day")
    a = occurrence_from_counts(counts, spec, None)
    b = occurrence_table(hand_table, bins="1h", mlt_range=(6, 9))
    pd.testing.assert_frame_equal(a, b)


def test_frames_without_label_are_counted_as_missing(hand_table):
    df = hand_table.assign(
        label=[None, "arc", "drapery", "radial", "radial", None, "arc", "arc", "arc"]
    )
    tab = occurrence_table(df, bins="1h", mlt_range=(6, 9))
    assert tab["n_frames"].tolist() == [2, 2, 0]
    assert tab.attrs["n_missing"] == 3  # two without label, one without MLT
    assert tab.attrs["n_dropped"] == 2


# ----------------------------------------------------------------------------- across midnight


def test_a_range_across_midnight_bins_22_to_02():
    """--mlt-range 22 26: 22-24 then 00-02 MLT, rows in range order, MLTs within 0..24."""
    spec = make_bins("0.5h", (22, 26))
    assert spec.nbins == 8 and spec.crosses_midnight and spec.mlt_range == (22.0, 26.0)
    mlt = [22.0, 23.99, 24.0, 0.0, 0.49, 1.99, 2.0, 21.99, 12.0, np.nan]
    assert bin_index(mlt, spec).tolist() == [0, 3, 4, 4, 4, 7, -1, -1, -1, MISSING_BIN]
    assert make_bins("1h", (6, 30)).nbins == 24  # a whole day starting at 06
    df = pd.DataFrame(
        {"mlt": [22.2, 23.7, 0.1, 0.2, 1.9, 12.0], "label": ["arc", "arc", "hotspot"] * 2}
    )
    tab = occurrence_table(df, bins="0.5h", mlt_range=(22, 26))
    assert tab["mlt_start"].tolist() == [22, 22.5, 23, 23.5, 0, 0.5, 1, 1.5]
    assert tab["mlt_end"].tolist() == [22.5, 23, 23.5, 24, 0.5, 1, 1.5, 2]
    assert tab["n_frames"].tolist() == [1, 0, 0, 1, 2, 0, 0, 1]
    assert tab["n_hotspot"].tolist() == [0, 0, 0, 0, 1, 0, 0, 0]
    assert (tab.attrs["n_binned"], tab.attrs["n_dropped"]) == (5, 1)
    hourly = hourly_summary(tab)
    assert hourly["mlt_start"].tolist() == [22, 23, 0, 1]
    assert hourly["mlt_end"].tolist() == [23, 24, 1, 2]
    assert hourly["n_frames"].tolist() == [1, 1, 2, 1]
    ds = to_dataset(tab)
    np.testing.assert_allclose(
        ds["mlt"].values, [22.25, 22.75, 23.25, 23.75, 0.25, 0.75, 1.25, 1.75]
    )


def test_unknown_labels_name_only_labels_that_occur():
    from pipeline.occurrence import UnknownLabelError, label_codes

    used = pd.Categorical(["arc", "arc"], categories=["arc", "cloud"])
    assert label_codes(pd.Series(used)).tolist() == [0, 0]  # an unused category is no error
    with pytest.raises(UnknownLabelError, match="unknown labels cloud; allowed classes"):
        label_codes(pd.Series(["arc", "cloud"]))
