"""Times, expert timelines, the occurrence model, and the frame plans of sets and archives."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.classes import ASI8K_COUNTS, CLASSES, LABEL_CODES
from pipeline.config import CONFIG_DIR
from pipeline.errors import InputError
from pipeline.storage import atomic_path
from pipeline.synth.geometry import sun_elevation_deg
from pipeline.winter import winter_of

#: Default occurrence model (frame counts and class shares per MLT hour of the real labels).
OCCURRENCE_MODEL = CONFIG_DIR / "occurrence" / "occurrence_model.csv"
#: Offset that keeps the plan generators independent of the frame generators.
_PLAN_SALT = 0x5EED_0F_A11
#: Labelled sets hold frames an expert could read: none while the sun is above this elevation
#: (degrees), where twilight washes out the sky (all of 03-15 UT is darker in December).
LABELLED_SUN_MAX_DEG = -10.0


def _winters(times: pd.Series) -> np.ndarray:
    """The winter of each time, as int64."""
    return winter_of(pd.Series(times)).to_numpy(np.int64)


def frame_name(time: pd.Timestamp) -> str:
    """YRS file stem ``N<yyyymmdd>G<hhmmss>``."""
    return f"N{time:%Y%m%d}G{time:%H%M%S}"


def read_timeline(path: str | os.PathLike) -> pd.DataFrame:
    """Read an expert label file (``N20031221G030001  1`` lines) into (time_utc, label), sorted."""
    p = Path(path)
    try:
        df = pd.read_csv(p, sep=r"\s+", header=None, names=["name", "code"], comment="#")
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise InputError(
            f"{p}: cannot read the timeline ({exc}); expected lines like 'N20031221G030001  1'"
        ) from None
    if df.empty:
        raise InputError(f"{p}: the timeline is empty; expected lines like 'N20031221G030001  1'")
    times = pd.to_datetime(
        df["name"].astype(str).str[1:], format="%Y%m%dG%H%M%S", errors="coerce", utc=True
    )
    codes = pd.to_numeric(df["code"], errors="coerce")
    bad = times.isna() | ~codes.isin(list(LABEL_CODES))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(
            f"{p}: line {i + 1} ({df['name'].iloc[i]} {df['code'].iloc[i]}) is not "
            f"'N<yyyymmdd>G<hhmmss> <code>' with code in {sorted(LABEL_CODES)}"
        )
    out = pd.DataFrame(
        {"time_utc": times.dt.as_unit("ns"), "label": codes.astype(int).map(LABEL_CODES)}
    )
    return out.sort_values("time_utc", kind="stable").reset_index(drop=True)


def derive_occurrence_model(
    timeline: str | os.PathLike | pd.DataFrame, mlt_offset_hours: float = 3.0
) -> pd.DataFrame:
    """Frame counts, coverage (share of 10 s slots labelled) and class shares per MLT hour."""
    df = read_timeline(timeline) if not isinstance(timeline, pd.DataFrame) else timeline
    t = df["time_utc"]
    mlt = ((t.dt.hour + t.dt.minute / 60 + t.dt.second / 3600 + mlt_offset_hours) % 24).astype(
        float
    )
    hour = np.floor(mlt).astype(int)
    n_days = t.dt.normalize().nunique()
    rows = []
    for h in sorted(hour.unique()):
        sel = df["label"][hour == h]
        row = {
            "mlt_hour": int(h),
            "n_frames": int(sel.size),
            "coverage": round(sel.size / (n_days * 360.0), 5),
        }
        for c in CLASSES:
            row[f"share_{c}"] = round(float((sel == c).mean()), 5)
        rows.append(row)
    return pd.DataFrame(rows)


def write_occurrence_model(
    timeline: str | os.PathLike, out: str | os.PathLike = OCCURRENCE_MODEL
) -> Path:
    """Derive the occurrence model from a label file and write it as a commented CSV."""
    model = derive_occurrence_model(timeline)
    header = (
        "# Frame counts, coverage (share of 10 s slots with a labelled frame) and class\n"
        "# shares per MLT hour (MLT = UT + 3 h) of the real YRS expert labels, winter 2003/04.\n"
        f"# Derived from {Path(timeline).name} by:\n"
        '#   .venv/bin/python -c "from pipeline.synth import write_occurrence_model as w; '
        "w('../shared/data/yrs_labels/Alllabel2003_38044.txt')\"\n"
    )
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_text(header + model.to_csv(index=False))
    return out


def load_occurrence_model(path: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read the occurrence-model CSV (default configs/occurrence/occurrence_model.csv)."""
    p = Path(path) if path is not None else OCCURRENCE_MODEL
    if not p.is_file():
        raise InputError(
            f"{p}: occurrence model not found; rebuild it with synth.write_occurrence_model"
        )
    df = pd.read_csv(p, comment="#")
    need = {"mlt_hour", "n_frames", "coverage", *(f"share_{c}" for c in CLASSES)}
    if not need <= set(df.columns):
        raise InputError(f"{p}: occurrence model lacks columns {sorted(need - set(df.columns))}")
    return df


def _dedupe_seconds(times: pd.Series) -> pd.Series:
    """Shift frames that fall on the same second by whole seconds until every name is unique."""
    ns = pd.to_datetime(times, utc=True).dt.as_unit("ns").astype("int64").to_numpy().copy()
    order = np.argsort(ns, kind="stable")
    s = ns[order] // 10**9
    for _ in range(100):
        dup = np.r_[False, s[1:] <= s[:-1]]
        if not dup.any():
            break
        s[dup] = s[np.flatnonzero(dup) - 1] + 1
    ns[order] = s * 10**9
    return pd.Series(pd.to_datetime(ns, utc=True), index=times.index)


def _shift_years(times: pd.Series, years: int) -> pd.Series:
    if years == 0:
        return times
    return times + pd.DateOffset(years=years)


def _stride(n_total: int, n: int) -> np.ndarray:
    """Evenly strided sample of ``n`` of ``n_total`` indices in order (the real time structure)."""
    return np.unique(np.floor(np.arange(n) * (n_total / n)).astype(np.int64))


def _model_timeline(rng: np.random.Generator, model: pd.DataFrame, winter: int) -> pd.DataFrame:
    """A full-winter timeline from the occurrence model: weather by day, events of one class."""
    days = pd.date_range(f"{winter}-12-01", f"{winter + 1}-02-28", freq="D", tz="UTC")
    hours = model["mlt_hour"].to_numpy() - 3  # MLT = UT + 3 h
    cov = dict(zip(model["mlt_hour"] - 3, model["coverage"]))
    shares = model[[f"share_{c}" for c in CLASSES]].to_numpy()
    shares = shares / shares.sum(1, keepdims=True)
    cum = dict(zip(hours, np.cumsum(shares, 1)))
    slots = np.arange(360)
    day_clear = rng.beta(0.9, 0.9, len(days))  # clear-sky share varies from day to day
    t_all, h_all = [], []
    for h in sorted(hours):
        if not 0 <= h < 24:
            continue
        p = np.clip(cov[h] * 2.0 * day_clear, 0, 1)  # mean of day_clear is 1/2
        keep = rng.random((len(days), 360)) < p[:, None]
        di, si = np.nonzero(keep)
        t_all.append(days.as_unit("ns").asi8[di] + (h * 3600 + slots[si] * 10 + 1) * 10**9)
        h_all.append(np.full(di.size, h))
    t = np.concatenate(t_all)
    hh = np.concatenate(h_all)
    order = np.argsort(t)
    t, hh = t[order], hh[order]
    # persistence: events of ~10 min (60 frames) of one class drawn from the hour's shares
    new = rng.random(t.size) < 1 / 60.0
    new[0] = True
    new[1:] |= (t[1:] - t[:-1]) > 600 * 10**9
    ev = np.cumsum(new) - 1
    u = rng.random(int(ev[-1]) + 1)
    first = np.flatnonzero(new)
    cls = np.array([np.searchsorted(cum[h], x, side="right") for h, x in zip(hh[first], u)])
    cls = np.minimum(cls, len(CLASSES) - 1)
    labels = np.asarray(CLASSES)[cls[ev]]
    return pd.DataFrame({"time_utc": pd.to_datetime(t, utc=True), "label": labels})


def archive_plan(
    n: int,
    seed: int = 0,
    timeline: str | os.PathLike | pd.DataFrame | None = None,
    winters: Sequence[int] = (2004,),
    occurrence: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Times, classes and relative paths of an archive (pure; no rendering)."""
    winters = sorted({int(w) for w in winters})
    if not winters:
        raise InputError("no winters given; e.g. --winters 2004-2009")
    parts = []
    if timeline is not None:
        tl = read_timeline(timeline) if not isinstance(timeline, pd.DataFrame) else timeline
        base = winter_of(tl["time_utc"].iloc[0])
        # The real labels span one month of one winter (29 days). More frames than that per
        # winter (ASI399K: ~67k a winter) come from copies of the month shifted by whole
        # blocks of its length: after it, then before it (Nov..Feb, the dayside season).
        days = tl["time_utc"].dt.normalize()
        block = int((days.iloc[-1] - days.iloc[0]).days) + 1
        copies = max(1, math.ceil(n / (len(tl) * len(winters))))
        shifts = [0, 1, -1][:copies]
        for w in winters:
            yearly = _shift_years(tl["time_utc"], w - base)
            for k in shifts:
                parts.append(tl.assign(time_utc=yearly + pd.Timedelta(days=k * block)))
    else:
        model = occurrence if occurrence is not None else load_occurrence_model()
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), _PLAN_SALT, 1]))
        for w in winters:
            parts.append(_model_timeline(rng, model, w))
    full = pd.concat(parts, ignore_index=True)
    if n > len(full):
        src = timeline if timeline is not None else "the occurrence model"
        raise InputError(
            f"--n {n} exceeds the {len(full)} frames that {src} gives for winters "
            f"{winters[0]}-{winters[-1]} (three shifted copies of the timeline a winter at "
            "most); ask for fewer frames or more winters"
        )
    full = full.sort_values("time_utc", kind="stable").reset_index(drop=True)
    plan = full.iloc[_stride(len(full), n)].reset_index(drop=True)
    plan["time_utc"] = _dedupe_seconds(plan["time_utc"])
    plan["path"] = plan["time_utc"].dt.strftime("%Y/%Y%m%d/N%Y%m%dG%H%M%S.png")
    plan["winter"] = _winters(plan["time_utc"])
    plan["transition"] = _transitions(plan["time_utc"], plan["label"])
    return plan[["path", "time_utc", "label", "winter", "transition"]]


def _transitions(times: pd.Series, labels: pd.Series, gap_s: float = 900.0) -> np.ndarray:
    """The neighbouring class where a frame sits at a class change (previous or next frame
    within ``gap_s`` has another class), else ''."""
    lab = labels.to_numpy().astype(str)
    t = pd.to_datetime(times, utc=True).dt.as_unit("ns").astype("int64").to_numpy() / 1e9
    out = np.full(lab.size, "", dtype=object)
    if lab.size < 2:
        return out
    near = np.diff(t) <= gap_s
    change = near & (lab[1:] != lab[:-1])
    nxt = np.flatnonzero(change)  # frame i differs from frame i + 1
    out[nxt] = lab[nxt + 1]
    out[nxt + 1] = lab[nxt]  # the later frame sees the earlier class (overrides ''-only)
    return out


def class_counts(n: int, balanced: bool = False) -> dict[str, int]:
    """Frames per class: ASI8K proportions (largest remainder) or equal shares."""
    weights = (
        np.ones(len(CLASSES)) if balanced else np.array([ASI8K_COUNTS[c] for c in CLASSES], float)
    )
    exact = n * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    rest = n - counts.sum()
    counts[np.argsort(-(exact - counts), kind="stable")[:rest]] += 1
    return dict(zip(CLASSES, counts.tolist()))


def _dark_sky_times(rng: np.random.Generator, tod_ns: np.ndarray, n_days: int) -> np.ndarray:
    """``tod_ns`` (times on the season's first day) moved by whole random days of the
    season, each redrawn until the sun is below LABELLED_SUN_MAX_DEG then."""
    t = tod_ns + rng.integers(0, n_days, tod_ns.size) * 86_400 * 10**9
    for _ in range(100):  # every hour 03-15 UT is dark in December, so this ends in a few passes
        bright = np.flatnonzero(sun_elevation_deg(t) > LABELLED_SUN_MAX_DEG)
        if not bright.size:
            break
        t[bright] = tod_ns[bright] + rng.integers(0, n_days, bright.size) * 86_400 * 10**9
    return t


def labelled_plan(
    n: int,
    seed: int = 0,
    winter: int = 2003,
    balanced: bool = False,
    occurrence: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Classes, times and paths of a labelled set (pure; no rendering).

    Times fall in December-February of ``winter`` at 03-15 UT, on days when the sun is below
    ``LABELLED_SUN_MAX_DEG`` at that hour; the hour of each frame is drawn from its class's
    hourly counts in the occurrence model, so labelled times look like real ones.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _PLAN_SALT, 0]))
    model = occurrence if occurrence is not None else load_occurrence_model()
    counts = class_counts(n, balanced)
    labels = np.concatenate([np.full(k, c, dtype=object) for c, k in counts.items()])
    rng.shuffle(labels)
    ut = model["mlt_hour"].to_numpy() - 3
    day0 = pd.Timestamp(f"{winter}-12-01", tz="UTC")
    n_days = (pd.Timestamp(f"{winter + 1}-03-01", tz="UTC") - day0).days
    t = np.empty(n, dtype=np.int64)
    for c in CLASSES:
        sel = np.flatnonzero(labels == c)
        p = model["n_frames"].to_numpy() * model[f"share_{c}"].to_numpy()
        h = rng.choice(ut, sel.size, p=p / p.sum())
        sec = h * 3600 + rng.integers(0, 360, sel.size) * 10 + 1
        t[sel] = _dark_sky_times(rng, day0.value + sec * 10**9, n_days)
    times = _dedupe_seconds(pd.Series(pd.to_datetime(t, utc=True)))
    df = pd.DataFrame(
        {"label": labels.astype(str), "time_utc": times.to_numpy(), "winter": int(winter)}
    )
    df["time_utc"] = pd.to_datetime(df["time_utc"], utc=True).dt.as_unit("ns")
    df["path"] = df["label"] + df["time_utc"].dt.strftime("/N%Y%m%dG%H%M%S.png")
    return df[["path", "label", "time_utc", "winter"]]
