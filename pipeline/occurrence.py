"""Occurrence of the auroral classes per MLT bin: counts, ratios, intervals, confusion correction.

Pure functions: a pandas or dask DataFrame of frames in (``mlt`` in hours, ``label``, and
``time_utc`` when grouping), the docs/design.md section 4 table or an xarray Dataset out. Bin
indices are computed in integer nanoseconds of MLT, so 06:03:00 falls in bin 1 of 3-minute bins
exactly.

A range may cross midnight: ``(22, 26)`` bins 22-24 then 00-02 MLT (the end is written past 24).
Its table rows follow the range (22, ..., 23.5, 0, ..., 1.5 for 0.5 h bins) and each row's
``mlt_start``/``mlt_end`` are MLTs in [0, 24] (the bin 23.5-24 ends at 24.0, the next starts at 0).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import xarray as xr

from pipeline import __version__
from pipeline.classes import CLASS_LONG_NAMES, CLASSES, LABEL_CODES
from pipeline.errors import InputError
from pipeline.mlt import NS_PER_DAY, NS_PER_HOUR, to_utc_ns, ut_to_mlt

GROUPINGS = ("year", "winter", "day")
#: Two-sided 95% normal quantile for the Wilson score interval.
Z95 = 1.959963984540054
#: What each ``ci_method`` of an occurrence table means (figure legends, NetCDF attributes).
CI_DESCRIPTIONS = {
    "wilson-days": "Wilson 95% interval, days as clusters (Kish effective n)",
    "wilson-frames": "Wilson 95% interval, frames as independent",
}
#: Pseudo bin indices of the long count table: frames outside the MLT range, frames without MLT.
DROPPED_BIN = -1
MISSING_BIN = -2
COUNT_COLUMNS = ("group", "bin", "cls", "n")
#: Guard against widths without a sensible unit (one-second bins over 24 h are 86,400).
MAX_BINS = 100_000


# ----------------------------------------------------------------------------- bins


@dataclass(frozen=True)
class BinSpec:
    """Equal MLT bins ``[start + i w, start + (i + 1) w)`` in integer nanoseconds of MLT."""

    start_ns: int
    width_ns: int
    nbins: int
    label: str = ""

    @property
    def end_ns(self) -> int:
        return self.start_ns + self.nbins * self.width_ns

    @property
    def edges(self) -> np.ndarray:
        """Bin edges in float hours (nbins + 1 values; the last is exactly the range end)."""
        return (self.start_ns + np.arange(self.nbins + 1, dtype=np.int64) * self.width_ns) / (
            NS_PER_HOUR
        )

    @property
    def crosses_midnight(self) -> bool:
        """True for a range past 24 h (22-26: 22-24 then 00-02 MLT)."""
        return self.end_ns > NS_PER_DAY

    @property
    def bin_starts(self) -> np.ndarray:
        """MLT (hours, [0, 24)) at which the bins start, in range order (22, 23, 0, 1 for 22-26)."""
        ns = self.start_ns + np.arange(self.nbins, dtype=np.int64) * self.width_ns
        return (ns % NS_PER_DAY) / NS_PER_HOUR

    @property
    def bin_ends(self) -> np.ndarray:
        """MLT (hours, (0, 24]) at which each bin ends (exclusive).

        A bin ending at midnight ends at 24.
        """
        ns = self.start_ns + np.arange(self.nbins, dtype=np.int64) * self.width_ns
        return (ns % NS_PER_DAY + self.width_ns) / NS_PER_HOUR

    @property
    def width_hours(self) -> float:
        return self.width_ns / NS_PER_HOUR

    @property
    def mlt_range(self) -> tuple[float, float]:
        return self.start_ns / NS_PER_HOUR, self.end_ns / NS_PER_HOUR


def make_bins(bins: str | pd.Timedelta = "3min", mlt_range=(6.0, 18.0)) -> BinSpec:
    """Bins of width ``bins`` (pandas offset: '3min', '5min', '0.5h') spanning ``mlt_range`` hours.

    A range across midnight ends past 24: ``(22, 26)`` is 22-24 then 00-02 MLT (at most 24 h).
    """
    if isinstance(bins, (int, float)) or (isinstance(bins, str) and bins.strip().isdigit()):
        raise InputError(f"bin width {bins!r} has no unit; write e.g. 3min, 5min or 0.5h")
    try:
        width = pd.Timedelta(bins).value
    except (ValueError, TypeError):
        try:
            width = pd.tseries.frequencies.to_offset(bins).nanos
        except (ValueError, TypeError):
            raise InputError(
                f"bin width {bins!r} is not a duration; "
                "use a pandas offset such as 3min, 5min, 0.5h"
            ) from None
    start, end = (float(v) for v in mlt_range)
    if not (0.0 <= start < 24.0 and start < end <= start + 24.0):
        raise InputError(
            f"MLT range {start:g} {end:g}: need 0 <= start < 24 and start < end <= start + 24 "
            "hours; a range across midnight ends past 24 (e.g. 22 26 for 22-02 MLT)"
        )
    start_ns, end_ns = round(start * NS_PER_HOUR), round(end * NS_PER_HOUR)
    if width <= 0 or width > end_ns - start_ns:
        raise InputError(f"bin width {bins!r} must be positive and at most the MLT range")
    nbins, rest = divmod(end_ns - start_ns, width)
    if nbins > MAX_BINS:
        raise InputError(f"bin width {bins!r} gives {nbins:,} bins; at most {MAX_BINS:,} allowed")
    if rest:
        raise InputError(
            f"bin width {bins!r} does not divide the MLT range {start:g}-{end:g} h into whole "
            "bins; choose a width that does (e.g. 3min, 5min, 0.5h)"
        )
    if end_ns > NS_PER_DAY and (NS_PER_DAY - start_ns) % width:
        # A bin from 23.5 to 00.5 MLT would have no MLT start and end within 0-24.
        raise InputError(
            f"MLT range {start:g} {end:g} with {bins!r} bins: midnight must be a bin edge; "
            "choose a start or width for which it is (e.g. 22 26 with 0.5h bins)"
        )
    return BinSpec(int(start_ns), int(width), int(nbins), str(bins))


def bin_index(mlt_hours: np.ndarray, spec: BinSpec) -> np.ndarray:
    """Bin of each MLT (hours): 0..nbins-1, DROPPED_BIN outside the range, MISSING_BIN for NaN."""
    mlt = np.asarray(mlt_hours, dtype=float)
    missing = ~np.isfinite(mlt)
    # Round to whole nanoseconds: float hours carry ~1e-15 h of noise, far below 1 ns.
    ns = np.rint(np.where(missing, 0.0, mlt) * NS_PER_HOUR).astype(np.int64)
    rel = ns - spec.start_ns
    if spec.crosses_midnight:  # 00-02 MLT are hours 24-26 of a 22-26 range
        rel = np.where(rel < 0, rel + NS_PER_DAY, rel)
    idx = rel // spec.width_ns
    out = np.where((rel >= 0) & (idx < spec.nbins), idx, DROPPED_BIN)
    out[missing] = MISSING_BIN
    return out.astype(np.int64)


# ----------------------------------------------------------------------------- grouping


def group_keys(times, by: str) -> np.ndarray:
    """Integer group of each UTC time: calendar ``year``, ``winter`` (Jul-Jun season named by its
    December's year: 2004-01-10 -> 2003) or ``day`` (days since 1970-01-01, UT date)."""
    if by not in GROUPINGS:
        raise InputError(f"unknown grouping {by!r}; allowed: {', '.join(GROUPINGS)}")
    ns = to_utc_ns(times)
    if (ns == np.iinfo(np.int64).min).any():
        raise InputError(f"grouping by {by} needs a time for every frame; some times are missing")
    if by == "day":
        return ns // NS_PER_DAY
    months = ns.astype("datetime64[ns]").astype("datetime64[M]").astype(np.int64)
    year = months // 12 + 1970
    if by == "year":
        return year
    return year - ((months % 12) < 6)  # Jan-Jun belong to the winter of the previous December


def group_values(keys: np.ndarray, by: str) -> Any:
    """The group column for integer keys: ints for year/winter, dates (datetime64) for day."""
    keys = np.asarray(keys, dtype=np.int64)
    if by == "day":
        return (keys * NS_PER_DAY).astype("datetime64[ns]")
    return keys.astype(np.int32)


# ----------------------------------------------------------------------------- counting


class UnknownLabelError(InputError):
    """Labels that are not one of CLASSES (the I/O layer adds the file they came from)."""


def label_codes(labels) -> np.ndarray:
    """Class index (CLASSES order) of each label name; -1 for missing; unknown names raise."""
    if isinstance(labels, pd.Series):
        labels = labels.array
    if isinstance(labels, pd.Categorical):
        codes, uniques = np.asarray(labels.codes, dtype=np.int64), labels.categories
    else:
        # factorize hashes each distinct value once: fast for millions of repeated strings
        codes, uniques = pd.factorize(np.asarray(labels, dtype=object), use_na_sentinel=True)
        codes = codes.astype(np.int64)
    lookup = {c: i for i, c in enumerate(CLASSES)}
    table = np.array([lookup.get(u, -2) for u in uniques] + [-1], dtype=np.int64)
    out = table[codes]  # code -1 (missing) picks the trailing -1
    bad = out == -2
    if bad.any():
        # only values that occur (a categorical may list unused categories)
        unknown = sorted(str(uniques[i]) for i in np.unique(codes[bad]))[:5]
        raise UnknownLabelError(
            f"unknown labels {', '.join(unknown)}; allowed classes: {', '.join(CLASSES)} "
            "(map the other labels to these classes or leave those frames out)"
        )
    return out


def _partition_counts(
    pdf: pd.DataFrame,
    spec: BinSpec,
    by: str | None,
    mlt_col: str,
    label_col: str,
    time_col: str,
    by_day: bool = False,
) -> pd.DataFrame:
    """Long counts (group, bin, cls, n) of a partition; run as is on pandas, per partition on dask.

    ``by_day`` adds a ``day`` column (UT days since 1970; -1 without a time): the clusters of the
    day-level intervals.
    """
    k = len(CLASSES)
    b = bin_index(pdf[mlt_col].to_numpy(dtype=float, na_value=np.nan), spec)
    c = label_codes(pdf[label_col])
    b = np.where(c < 0, MISSING_BIN, b)  # a frame without a label is missing, like one without MLT
    c = np.where(c < 0, 0, c)
    if by is None:
        gkeys, ginv = np.zeros(1, dtype=np.int64), np.zeros(len(pdf), dtype=np.int64)
    else:
        gkeys, ginv = np.unique(group_keys(pdf[time_col], by), return_inverse=True)
    nb = spec.nbins + 2  # + the two pseudo bins
    key = (ginv * nb + (b - MISSING_BIN)) * k + c
    day_col = None
    if by_day:
        ns = to_utc_ns(pdf[time_col])
        missing = ns == np.iinfo(np.int64).min
        day = ns // NS_PER_DAY
        d0 = int(day[~missing].min()) - 1 if (~missing).any() else -1
        day[missing] = d0  # one slot below the first day; reported as day -1
        span = int(day.max()) - d0 + 1 if len(day) else 1
        full = key * span + (day - d0)
        if len(gkeys) * nb * k * span <= 1 << 25:
            # a dense count is one pass (an archive's days are few thousand)
            counts = np.bincount(full, minlength=len(gkeys) * nb * k * span)
            ukeys = np.flatnonzero(counts)
            n = counts[ukeys]
        else:  # sparse: sort
            ukeys, n = np.unique(full, return_counts=True)
        key, d = np.divmod(ukeys, span)
        dkeys = np.arange(span, dtype=np.int64) + d0
        dkeys[0] = -1
        day_col = dkeys[d]
    else:
        counts = np.bincount(key, minlength=len(gkeys) * nb * k)
        key = np.flatnonzero(counts)
        n = counts[key]
    g, rem = np.divmod(key, nb * k)
    bb, cc = np.divmod(rem, k)
    cols = {
        "group": gkeys[g].astype(np.int64),
        "bin": (bb + MISSING_BIN).astype(np.int64),
        "cls": cc.astype(np.int64),
        "n": n.astype(np.int64),
    }
    if day_col is not None:
        cols["day"] = day_col.astype(np.int64)
    return pd.DataFrame(cols)


def _is_dask(df: Any) -> bool:
    return hasattr(df, "map_partitions") and hasattr(df, "npartitions")


def count_bins(
    df,
    spec: BinSpec,
    by: str | None = None,
    mlt_col: str = "mlt",
    label_col: str = "label",
    time_col: str = "time_utc",
    by_day: bool = False,
) -> pd.DataFrame:
    """Frames per (group, bin, class) of a pandas or dask DataFrame, as a small long table.

    ``by_day``: also per UT day (a ``day`` column), which ``occurrence_from_counts`` needs for
    intervals that treat the frames of one day as one cluster.
    """
    need = [mlt_col, label_col] + ([time_col] if by or by_day else [])
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise InputError(
            f"the frames table lacks column(s) {', '.join(missing)}; it has {', '.join(df.columns)}"
        )
    args = (spec, by, mlt_col, label_col, time_col, by_day)
    columns = [*COUNT_COLUMNS, "day"] if by_day else list(COUNT_COLUMNS)
    keys = ["group", "bin", "cls", "day"] if by_day else ["group", "bin", "cls"]
    if _is_dask(df):
        meta = pd.DataFrame({c: pd.Series(dtype="int64") for c in columns})
        # Each partition shrinks to <= groups x bins x classes (x days) rows; only those travel.
        parts = df[need].map_partitions(_partition_counts, *args, meta=meta).compute()
    else:
        parts = _partition_counts(df[need], *args)
    out = parts.groupby(keys, as_index=False, sort=True)["n"].sum()
    return out[columns].astype("int64")


# ----------------------------------------------------------------------------- statistics


def wilson_interval(k, n, z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a proportion k/n (NaN where n == 0)."""
    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        z2n = z * z / n
        centre = (p + z2n / 2) / (1 + z2n)
        half = z / (1 + z2n) * np.sqrt(p * (1 - p) / n + z2n / (4 * n))
    low = np.where(n > 0, np.clip(centre - half, 0.0, 1.0), np.nan)
    high = np.where(n > 0, np.clip(centre + half, 0.0, 1.0), np.nan)
    return low, high


def clustered_effective_n(
    y: np.ndarray, n: np.ndarray, cell: np.ndarray, n_cells: int
) -> tuple[np.ndarray, np.ndarray]:
    """Kish effective sample size of each cell's class proportions, days as clusters.

    ``y`` (rows, K) class counts and ``n`` (rows,) frames of one (cell, day) per row; ``cell``
    (rows,) the cell (group x bin) index of each row. Frames 10 s apart on one day are far from
    independent: the variance of p = sum y / sum n is the cluster (linearisation) estimate
    D / (D - 1) * sum_d (y_d - p n_d)^2 / N^2 over the D days, and n_eff = p (1 - p) / var,
    capped at N (never narrower than independent frames). Where that cannot be estimated (p is
    0 or 1, or one day only) n_eff is the number of days. Returns (n_eff (cells, K), days).
    """
    y = np.asarray(y, dtype=float)
    n = np.asarray(n, dtype=float)
    k = y.shape[1]

    def per_cell(w: np.ndarray) -> np.ndarray:
        return np.bincount(cell, weights=w, minlength=n_cells)

    big_n = per_cell(n)
    days = per_cell((n > 0).astype(float))
    s_nn = per_cell(n * n)
    s_yy = np.stack([per_cell(y[:, j] ** 2) for j in range(k)], axis=1)
    s_yn = np.stack([per_cell(y[:, j] * n) for j in range(k)], axis=1)
    y_tot = np.stack([per_cell(y[:, j]) for j in range(k)], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = y_tot / big_n[:, None]
        ss = s_yy - 2 * p * s_yn + p * p * s_nn[:, None]
        var = days[:, None] / (days[:, None] - 1) * np.maximum(ss, 0.0) / big_n[:, None] ** 2
        n_eff = p * (1 - p) / var
    n_eff = np.minimum(n_eff, big_n[:, None])
    fallback = ~np.isfinite(n_eff) | (p <= 0) | (p >= 1) | (days[:, None] < 2)
    n_eff = np.where(fallback, np.minimum(days, big_n)[:, None], n_eff)
    return n_eff, days


def normalise_confusion(confusion) -> np.ndarray:
    """Row-normalise a confusion matrix (rows true class, columns predicted; counts or rates)."""
    c = np.asarray(confusion, dtype=float)
    k = len(CLASSES)
    if c.shape != (k, k):
        raise InputError(f"confusion matrix must be {k}x{k} (classes {', '.join(CLASSES)})")
    if not np.all(np.isfinite(c)) or (c < 0).any():
        raise InputError("confusion matrix entries must be finite and non-negative")
    rows = c.sum(axis=1, keepdims=True)
    if (rows <= 0).any():
        empty = [CLASSES[i] for i in np.flatnonzero(rows[:, 0] <= 0)]
        raise InputError(f"confusion matrix has no frames of true class {', '.join(empty)}")
    return c / rows


def correct_proportions(observed, confusion) -> np.ndarray:
    """True class proportions from observed predicted proportions (..., K) and a confusion matrix.

    Solves min ||M^T p - q||^2 over the simplex (p >= 0, sum p = 1), with M the row-normalised
    confusion matrix (M[i, j] = P(predicted j | true i)) and q the observed shares. The problem is
    a small convex QP; it is solved exactly by trying every support set (2^K - 1 = 15 for the
    four classes) with the equality-constrained least squares on it, and keeping the feasible
    solution with the smallest residual. Rows of ``observed`` with no frames (all zero / NaN)
    give NaN.
    """
    m = normalise_confusion(confusion)
    q = np.asarray(observed, dtype=float)
    shape = q.shape
    q = q.reshape(-1, shape[-1])
    tot = q.sum(axis=1, keepdims=True)
    valid = np.isfinite(tot[:, 0]) & (tot[:, 0] > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.where(valid[:, None], q / tot, 0.0)
    a = m.T  # q ~ a @ p
    k = a.shape[1]
    best = np.full(q.shape, np.nan)
    best_res = np.full(len(q), np.inf)
    tol = 1e-12
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            s = list(support)
            a_s = a[:, s]
            # KKT system of min ||a_s x - q||^2 subject to sum x = 1.
            kkt = np.zeros((size + 1, size + 1))
            kkt[:size, :size] = 2 * a_s.T @ a_s
            kkt[:size, size] = 1.0
            kkt[size, :size] = 1.0
            rhs = np.concatenate([2 * q @ a_s, np.ones((len(q), 1))], axis=1)
            sol = rhs @ np.linalg.pinv(kkt).T
            x = sol[:, :size]
            feasible = (x >= -tol).all(axis=1) & (np.abs(x.sum(axis=1) - 1) < 1e-9)
            x = np.clip(x, 0.0, None)
            res = ((x @ a_s.T - q) ** 2).sum(axis=1)
            take = feasible & (res < best_res - 1e-15)
            if take.any():
                full = np.zeros((int(take.sum()), k))
                full[:, s] = x[take]
                best[take] = full
                best_res[take] = res[take]
    best = best / best.sum(axis=1, keepdims=True)
    best[~valid] = np.nan
    return best.reshape(shape)


# ----------------------------------------------------------------------------- the table


def occurrence_columns(by: str | None = None, ci: bool = False, corrected: bool = False) -> list:
    """Column names of the occurrence table, in order (docs/design.md section 4)."""
    cols = ([by] if by else []) + ["mlt_start", "mlt_end", "n_frames"]
    cols += [f"n_{c}" for c in CLASSES] + [f"ratio_{c}" for c in CLASSES]
    if ci:
        for c in CLASSES:
            cols += [f"ci_low_{c}", f"ci_high_{c}"]
    if corrected:
        cols += [f"ratio_{c}_corrected" for c in CLASSES]
    return cols


#: Units (None: none apply) and meaning of the occurrence table's columns, stated once for
#: occurrence.parquet's metadata and occurrence.nc's attributes. "{}": a class, or each class.
OCCURRENCE_COLUMNS: dict[str, tuple[str | None, str]] = {
    "year": (None, "calendar year (UT)"),
    "winter": (None, "winter (July-June, named by the year of its December)"),
    "day": (None, "UT date"),
    "mlt_start": ("hours", "magnetic local time at bin start (inclusive)"),
    "mlt_end": ("hours", "magnetic local time at bin end (exclusive)"),
    "n_frames": ("1", "frames in bin"),
    "n_{}": ("1", "frames of {} in bin"),
    "ratio_{}": ("1", "occurrence ratio of {}: its frames / all frames in bin"),
    "ci_low_{}": ("1", "{ci}, lower bound of the occurrence ratio of {}"),
    "ci_high_{}": ("1", "{ci}, upper bound of the occurrence ratio of {}"),
    "ratio_{}_corrected": ("1", "occurrence ratio of {} corrected for classifier confusion"),
}


def column_doc(pattern: str, cls: str | None = None, ci_kind: str | None = None) -> dict[str, str]:
    """``long_name``/``units`` of an OCCURRENCE_COLUMNS entry, for class ``cls`` or each class."""
    units, text = OCCURRENCE_COLUMNS[pattern]
    kind = ci_kind or "Wilson 95% interval"
    doc = {"long_name": text.format(f"class {cls}" if cls else "each class", ci=kind)}
    return doc | ({"units": units} if units is not None else {})


def occurrence_column_docs(columns: list[str], ci_kind: str | None = None) -> dict[str, dict]:
    """``column_doc`` of each column of an occurrence table (for occurrence.parquet's metadata)."""
    per_class = {p.format(c): (p, c) for p in OCCURRENCE_COLUMNS if "{}" in p for c in CLASSES}
    docs = {}
    for name in columns:
        pattern, cls = per_class.get(name, (name, None))
        docs[name] = column_doc(pattern, cls, ci_kind)
    return docs


def occurrence_schema(by: str | None = None, ci: bool = False, corrected: bool = False):
    """Arrow schema of occurrence.parquet."""
    fields = []
    for name in occurrence_columns(by, ci, corrected):
        if name == by:
            fields.append((name, pa.timestamp("ns") if by == "day" else pa.int32()))
        elif name.startswith("n_"):
            fields.append((name, pa.int64()))
        else:
            fields.append((name, pa.float64()))
    return pa.schema(fields)


def occurrence_from_counts(
    counts: pd.DataFrame,
    spec: BinSpec,
    by: str | None = None,
    ci: bool = False,
    confusion=None,
) -> pd.DataFrame:
    """The occurrence table (a row per bin, per group when grouped) from count_bins' long counts."""
    k = len(CLASSES)
    if by is None and len(counts) and (counts["group"] != 0).any():
        counts = counts.assign(group=0)  # collapse a grouped count table over its groups
    # Grouped by day, each cell is one day: days-as-clusters would give n_eff = 1 everywhere;
    # within a day only frame-level intervals exist (labelled as such).
    by_day = "day" in counts.columns and by != "day"
    in_range = counts[counts["bin"] >= 0]
    groups = np.unique(counts["group"].to_numpy()) if by else np.zeros(1, dtype=np.int64)
    cube = np.zeros((len(groups), spec.nbins, k), dtype=np.int64)
    if len(in_range):
        gi = np.searchsorted(groups, in_range["group"].to_numpy())
        np.add.at(cube, (gi, in_range["bin"].to_numpy(), in_range["cls"].to_numpy()), in_range["n"])
    n_frames = cube.sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(n_frames[..., None] > 0, cube / n_frames[..., None], np.nan)
    cols: dict[str, Any] = {}
    if by:
        cols[by] = np.repeat(group_values(groups, by), spec.nbins)
    cols["mlt_start"] = np.tile(spec.bin_starts, len(groups))
    cols["mlt_end"] = np.tile(spec.bin_ends, len(groups))
    cols["n_frames"] = n_frames.reshape(-1)
    for i, c in enumerate(CLASSES):
        cols[f"n_{c}"] = cube[..., i].reshape(-1)
    for i, c in enumerate(CLASSES):
        cols[f"ratio_{c}"] = ratio[..., i].reshape(-1)
    if ci:
        if by_day:
            n_eff = _day_clustered_n(in_range, groups, spec.nbins)
            with np.errstate(invalid="ignore", divide="ignore"):
                low, high = wilson_interval(ratio * n_eff, n_eff)
        else:
            low, high = wilson_interval(cube, n_frames[..., None])
        for i, c in enumerate(CLASSES):
            cols[f"ci_low_{c}"] = low[..., i].reshape(-1)
            cols[f"ci_high_{c}"] = high[..., i].reshape(-1)
    if confusion is not None:
        corr = correct_proportions(cube, confusion)
        for i, c in enumerate(CLASSES):
            cols[f"ratio_{c}_corrected"] = corr[..., i].reshape(-1)
    table = pd.DataFrame(cols, columns=occurrence_columns(by, ci, confusion is not None))
    dropped = counts.loc[counts["bin"] == DROPPED_BIN, "n"].sum()
    missing = counts.loc[counts["bin"] == MISSING_BIN, "n"].sum()
    table.attrs.update(
        {
            "bins": spec.label,
            "bin_width_hours": spec.width_hours,
            "mlt_range": list(spec.mlt_range),
            "by": by,
            "classes": list(CLASSES),
            "n_binned": int(n_frames.sum()),
            "n_dropped": int(dropped),
            "n_missing": int(missing),
            "ci": bool(ci),
            # days as clusters when the counts carry days, else independent frames (too narrow
            # for 10-s frames: neighbours are near-duplicates)
            "ci_method": (None if not ci else "wilson-days" if by_day else "wilson-frames"),
            "confusion": None
            if confusion is None
            else normalise_confusion(confusion).round(12).tolist(),
        }
    )
    return table


def _day_clustered_n(in_range: pd.DataFrame, groups: np.ndarray, nbins: int) -> np.ndarray:
    """Effective sample sizes (groups, bins, K) of day-level counts (see clustered_effective_n)."""
    k = len(CLASSES)
    if not len(in_range):
        return np.zeros((len(groups), nbins, k))
    gi = np.searchsorted(groups, in_range["group"].to_numpy())
    cell = gi * nbins + in_range["bin"].to_numpy()
    day = in_range["day"].to_numpy()
    d0 = int(day.min())
    # one row per (cell, day) with the class counts side by side
    row_keys, row = np.unique(cell * (int(day.max()) - d0 + 1) + (day - d0), return_inverse=True)
    flat = row.reshape(-1) * k + in_range["cls"].to_numpy()
    y = np.bincount(flat, weights=in_range["n"].to_numpy(), minlength=len(row_keys) * k)
    y = y.reshape(len(row_keys), k)
    row_cell = row_keys // (int(day.max()) - d0 + 1)
    n_eff, _ = clustered_effective_n(y, y.sum(axis=1), row_cell, len(groups) * nbins)
    return n_eff.reshape(len(groups), nbins, k)


def occurrence_table(
    df,
    bins: str = "3min",
    mlt_range=(6.0, 18.0),
    by: str | None = None,
    ci: bool = False,
    confusion=None,
    mlt_col: str = "mlt",
    label_col: str = "label",
    time_col: str = "time_utc",
) -> pd.DataFrame:
    """Occurrence table of a pandas or dask frames table (``mlt`` hours, ``label``, ``time_utc``).

    attrs: n_binned, n_dropped (MLT outside the range), n_missing (no MLT or label), bins, ...
    """
    spec = make_bins(bins, mlt_range)
    by_day = ci and time_col in df.columns
    counts = count_bins(df, spec, by, mlt_col, label_col, time_col, by_day=by_day)
    return occurrence_from_counts(counts, spec, by, ci, confusion)


def hourly_summary(table: pd.DataFrame, hours: float = 1.0) -> pd.DataFrame:
    """Counts and ratios of an ungrouped table aggregated to ``hours``-wide MLT blocks.

    Each bin goes to the block its start falls in (exact when the bins nest in the blocks, as
    3min, 5min and 0.5h bins do in hours). Blocks keep the table's order (22, 23, 0, 1 for a
    range across midnight) and are clipped to the bins they hold.
    """
    if any(g in table.columns for g in GROUPINGS):
        raise InputError("hourly_summary needs an ungrouped occurrence table")
    if not len(table):
        raise InputError("occurrence table has no bins")
    start = table["mlt_start"].to_numpy(float)
    block = np.floor(start / hours + 1e-9) * hours
    ncols = ["n_frames"] + [f"n_{c}" for c in CLASSES]
    agg = table[ncols].groupby(block, sort=False).sum()
    span = (
        table[["mlt_start", "mlt_end"]]
        .groupby(block, sort=False)
        .agg({"mlt_start": "min", "mlt_end": "max"})
    )
    blocks = agg.index.to_numpy(float)
    out = pd.DataFrame({"mlt_start": np.maximum(blocks, span["mlt_start"].to_numpy(float))})
    out["mlt_end"] = np.minimum(blocks + hours, span["mlt_end"].to_numpy(float))
    for c in ncols:
        out[c] = agg[c].to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        for c in CLASSES:
            out[f"ratio_{c}"] = np.where(
                out["n_frames"] > 0, out[f"n_{c}"] / out["n_frames"], np.nan
            )
    return out


def add_mlt(df, station, method: str | None = None, time_col: str = "time_utc"):
    """``df`` with an ``mlt`` column computed from ``time_col`` (pandas or dask, same code)."""
    if time_col not in df.columns:
        raise InputError(f"the frames table has no {time_col!r} column to compute MLT from")

    def _one(pdf: pd.DataFrame) -> pd.DataFrame:
        return pdf.assign(mlt=ut_to_mlt(pdf[time_col], station, method))

    if _is_dask(df):
        meta = df._meta.assign(mlt=pd.Series(dtype="float64"))
        return df.map_partitions(_one, meta=meta)
    return _one(df)


# ----------------------------------------------------------------------------- xarray


def _nc_attr(value: Any) -> Any:
    """NetCDF attributes hold numbers, strings and number lists only."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        return list(value)
    if isinstance(value, (int, float, str)):
        return value
    return str(value)


def to_dataset(
    table: pd.DataFrame,
    station: str | None = None,
    method: str | None = None,
    source: str | None = None,
    history: str | None = None,
) -> xr.Dataset:
    """The occurrence table as an xarray Dataset, dims (mlt_bin, class[, group]), CF-1.8 attrs.

    ``history``: the CF history line (when and with which command the file was made).
    """
    by = table.attrs.get("by")
    if by is None:
        by = next((g for g in GROUPINGS if g in table.columns), None)
    if by:
        groups = pd.unique(table[by])
        g = len(groups)
    else:
        groups, g = None, 1
    nrows = len(table)
    if nrows % g:
        raise InputError("occurrence table: every group must have the same bins")
    nbins = nrows // g
    dims = ((by,) if by else ()) + ("mlt_bin",)
    shape = ((g,) if by else ()) + (nbins,)

    def arr(col: str) -> np.ndarray:
        return table[col].to_numpy().reshape(shape)

    def stack(fmt: str) -> np.ndarray:
        return np.stack([arr(fmt.format(c)) for c in CLASSES], axis=-1)

    start = table["mlt_start"].to_numpy()[:nbins]
    end = table["mlt_end"].to_numpy()[:nbins]
    codes = np.array(list(LABEL_CODES), dtype=np.int32)  # 1 arc ... 4 hotspot, CLASSES order
    code_text = ", ".join(f"{k} {c}" for k, c in LABEL_CODES.items())
    # CF coordinate variables are numeric and monotonic (the class names are not): the class
    # dimensions carry the label-file codes, their names ride along as auxiliary coordinates.
    coords: dict[str, Any] = {
        "mlt_bin": ("mlt_bin", np.arange(nbins, dtype=np.int32), {"long_name": "MLT bin index"}),
        "class": ("class", codes, {"long_name": f"auroral class code ({code_text})"}),
        "class_name": ("class", np.array(CLASSES, dtype=object), {"long_name": "auroral class"}),
        "mlt_start": ("mlt_bin", start, column_doc("mlt_start")),
        "mlt_end": ("mlt_bin", end, column_doc("mlt_end")),
        # No standard_name: the CF table has none for magnetic local time.
        "mlt": (
            "mlt_bin",
            (start + end) / 2,
            {
                "units": "hours",
                "long_name": "magnetic local time at bin centre",
                "bounds": "mlt_bounds",
            },
        ),
        "mlt_bounds": (("mlt_bin", "nv"), np.stack([start, end], axis=1), {"units": "hours"}),
    }
    if by:
        coords[by] = (by, np.asarray(groups), column_doc(by))
    cdims = dims + ("class",)
    data: dict[str, Any] = {
        "n_frames": (dims, _int32(arr("n_frames"), "n_frames"), column_doc("n_frames")),
        "count": (cdims, _int32(stack("n_{}"), "count"), column_doc("n_{}")),
        "ratio": (cdims, stack("ratio_{}"), column_doc("ratio_{}")),
    }
    kind = CI_DESCRIPTIONS.get(table.attrs.get("ci_method"))
    if f"ci_low_{CLASSES[0]}" in table.columns:
        data["ci_low"] = (cdims, stack("ci_low_{}"), column_doc("ci_low_{}", ci_kind=kind))
        data["ci_high"] = (cdims, stack("ci_high_{}"), column_doc("ci_high_{}", ci_kind=kind))
    if f"ratio_{CLASSES[0]}_corrected" in table.columns:
        data["ratio_corrected"] = (
            cdims,
            stack("ratio_{}_corrected"),
            column_doc("ratio_{}_corrected"),
        )
    conf = table.attrs.get("confusion")
    if conf is not None:
        data["confusion"] = (
            ("true_class", "class"),
            np.asarray(conf, dtype=float),
            {"units": "1", "long_name": "row-normalised confusion matrix (rows true class)"},
        )
        coords["true_class"] = (
            "true_class",
            codes,
            {"long_name": f"true class code ({code_text})"},
        )
        coords["true_class_name"] = (
            "true_class",
            np.array(CLASSES, dtype=object),
            {"long_name": "true auroral class"},
        )
    ds = xr.Dataset(data, coords=coords)
    attrs = {
        "title": "Occurrence of dayside auroral classes per magnetic local time bin",
        "Conventions": "CF-1.8",
        "station": station,
        "mlt_method": method,
        "source": source,
        "class_long_names": ", ".join(CLASS_LONG_NAMES[c] for c in CLASSES),
        "bin_edges_hours": list(map(float, np.append(start, end[-1:]))),
        "history": history or f"aurora-pipeline {__version__} occurrence",
    }
    for key in ("bins", "bin_width_hours", "mlt_range", "by", "n_binned", "n_dropped", "n_missing"):
        if key in table.attrs:
            attrs[key] = table.attrs[key]
    ds.attrs = {k: _nc_attr(v) for k, v in attrs.items()}
    if by:  # CF 2.4: a time dimension (day is one) goes right of the others; all groups alike
        ds = ds.transpose(..., by)
    # CF 7.1: bounds carry no _FillValue; coordinates have no missing values to flag.
    for name in ("mlt", "mlt_start", "mlt_end", "mlt_bounds"):
        ds[name].encoding["_FillValue"] = None
    if by == "day":
        ds[by].encoding.update(dtype="int32", units="days since 1970-01-01")  # not int64 (2.2)
    return ds


def _int32(counts: np.ndarray, name: str) -> np.ndarray:
    """Counts as int32, the widest integer type CF 1.8 allows in netCDF (section 2.2)."""
    if counts.size and counts.max() > np.iinfo(np.int32).max:
        raise InputError(f"occurrence: {name} exceeds 2**31 frames in a bin; use narrower bins")
    return counts.astype(np.int32)
