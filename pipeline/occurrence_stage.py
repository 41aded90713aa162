"""The ``occurrence`` stage: read predicted or expert labels, bin by MLT, write table/NetCDF/figure.

Inputs (PRED):
- a predictions directory (Parquet dataset of ``shards/shard-*.parquet``,
  :mod:`pipeline.predictions`), read with dask.dataframe so archives of any size stream through
  partition by partition;
- one Parquet file with ``time_utc`` and ``label`` columns (class names);
- a label text file like ``Alllabel2003_38044.txt``: lines ``N20031221G030001  1`` (the frame
  name in the station's filename pattern, then the numeric code 1..4 of pipeline.classes, or a
  class name).
MLT is always recomputed from ``time_utc`` with the chosen method, so one archive can be binned
with either method; a table with ``mlt`` but no ``time_utc`` is binned on its stored MLT.

Outputs (docs/design.md, "Output folders"): every input and option is checked before anything is
written; the outputs are written into a hidden staging folder inside OUT and moved into OUT
together, the run record ``_run.json`` last (it is removed first): a folder holds a finished
result only when its record says ``finished: true``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from tqdm.dask import TqdmCallback

from pipeline import plots
from pipeline.classes import CLASSES, LABEL_CODES, PROB_COLUMNS
from pipeline.config import StationConfig, resolve_station
from pipeline.errors import ConfigError, InputError
from pipeline.mlt import METHODS
from pipeline.occurrence import (
    CI_DESCRIPTIONS,
    UnknownLabelError,
    add_mlt,
    count_bins,
    hourly_summary,
    label_codes,
    make_bins,
    normalise_confusion,
    occurrence_column_docs,
    occurrence_from_counts,
    occurrence_schema,
    to_dataset,
)
from pipeline.output_folder import RUN_RECORD, OutputFolder, refuse_foreign_out
from pipeline.predictions import done_shard_files, read_run, unclassified_frames
from pipeline.storage import contract_metadata, write_table

COMMAND = "occurrence"
OUTPUT_NAMES = (
    "occurrence.parquet",
    "occurrence.nc",
    "occurrence.png",
    "occurrence.pdf",
    "occurrence.md",
    RUN_RECORD,
)
#: The inputs occurrence reads, for errors about a file that is none of them.
ACCEPTED_INPUTS = (
    "occurrence reads a classify-archive predictions folder, a Parquet file with time_utc "
    "(or mlt) and label columns, or a text file of '<frame name> <label>' lines"
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- readers


def read_label_file(path: str | os.PathLike, station: StationConfig) -> pd.DataFrame:
    """Expert label text file -> DataFrame(name, time_utc, label); bad lines raise InputError."""
    p = Path(path)
    try:
        raw = pd.read_csv(
            p, sep=r"\s+", header=None, names=["name", "code"], dtype=str, comment="#"
        )
    except UnicodeDecodeError:
        raise InputError(_not_an_input(p, "not text")) from None
    except pd.errors.ParserError as exc:  # e.g. "Expected 2 fields in line 2, saw 3"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "unparsable"
        reason = reason.removeprefix("Error tokenizing data. C error: ")
        raise InputError(f"{p}: {reason}; expected lines '<frame name> <label>'") from None
    if raw.empty:
        raise InputError(f"{p}: no label lines found; {ACCEPTED_INPUTS}")
    if not isinstance(raw.index, pd.RangeIndex):  # pandas made an index of a third field
        detail = f"line 1 {_first_line(p)!r} has more than two fields"
        raise InputError(_not_an_input(p, detail))
    # The name may carry an extension (N20031221G030001.jpg): strip it before parsing.
    names = raw["name"].str.replace(r"\.[A-Za-z0-9.]+$", "", regex=True)
    times = pd.to_datetime(names, format=station.filename_pattern, errors="coerce", utc=True)
    if pd.isna(times.iloc[0]):
        # Line 1 is no frame name: a table of another kind (CSV, ...) or another station's labels.
        first = _first_line(p)
        raise InputError(
            _not_an_input(
                p,
                f"line 1 {first!r} does not start with a frame name of station {station.code} "
                f"(pattern {station.filename_pattern!r}; for another station's labels pass "
                "--station)",
            )
        )
    if raw["code"].isna().any():
        line = int(np.flatnonzero(raw["code"].isna().to_numpy())[0]) + 1
        raise InputError(f"{p}: line {line} has no label; expected '<frame name> <label>'")
    if times.isna().any():
        line = int(np.flatnonzero(times.isna().to_numpy())[0]) + 1
        raise InputError(
            f"{p}: line {line}: {raw['name'].iloc[line - 1]!r} does not match the station's "
            f"filename pattern {station.filename_pattern!r} (choose the station with --station)"
        )
    codes = raw["code"]
    numeric = pd.to_numeric(codes, errors="coerce")
    if numeric.notna().all():
        labels = numeric.astype(int).map(LABEL_CODES)
    else:
        labels = codes.str.lower().where(codes.str.lower().isin(CLASSES))
    if labels.isna().any():
        line = int(np.flatnonzero(labels.isna().to_numpy())[0]) + 1
        allowed = ", ".join(f"{k} ({v})" for k, v in LABEL_CODES.items())
        raise InputError(
            f"{p}: line {line}: unknown label {codes.iloc[line - 1]!r}; allowed: {allowed}"
        )
    return pd.DataFrame(
        {"name": raw["name"], "time_utc": times, "label": pd.Categorical(labels, CLASSES)}
    )


def _first_line(path: Path, limit: int = 60) -> str:
    """The first line of a text file that is not blank or a comment, shortened for a message."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return ""
    line = next((x.strip() for x in head.splitlines() if x.strip() and x.strip()[0] != "#"), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _not_an_input(path: Path, detail: str) -> str:
    """The error for a file that is none of the inputs occurrence reads (with a hint for CSV)."""
    hint = ""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        head = b""
    first = head.split(b"\n", 1)[0]
    if path.suffix.lower() in (".csv", ".tsv") or b"," in first or b"\t" in first.strip():
        hint = (
            "; convert a CSV table to Parquet, e.g. "
            "pd.read_csv(f, parse_dates=['time_utc']).to_parquet('pred.parquet')"
        )
    return f"{path}: {ACCEPTED_INPUTS}, and this file is none of them: {detail}{hint}"


def _is_parquet(path: Path) -> bool:
    if path.suffix.lower() in (".parquet", ".pq"):
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"PAR1"  # Parquet's magic bytes, whatever the name
    except OSError:
        return False


def _parquet_columns(path: Path) -> list[str]:
    try:
        return pq.read_schema(path).names
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from None


def _columns_to_read(path: Path, available: list[str]) -> list[str]:
    if "label" not in available:
        raise InputError(
            f"{path}: no 'label' column (has {', '.join(available)}); expected predictions "
            "with time_utc and label (docs/design.md)"
        )
    if "time_utc" in available:
        return ["time_utc", "label"]
    if "mlt" in available:
        return ["mlt", "label"]
    raise InputError(f"{path}: needs a 'time_utc' (or 'mlt') column besides 'label'")


def read_predictions(
    source: str | os.PathLike,
    station: StationConfig,
    probabilities: bool = False,
    sky: bool = False,
):
    """PRED as a frames table: dask DataFrame for a predictions directory, pandas otherwise.

    ``probabilities``: also read the p_<class> columns; ``sky``: the sky_level column (an
    error where there are none).
    """
    p = Path(source)
    extra = list(PROB_COLUMNS) if probabilities else []
    extra += ["sky_level"] if sky else []

    def columns(path: Path) -> list[str]:
        available = _parquet_columns(path)
        lacking = [c for c in extra if c not in available]
        if "sky_level" in lacking:
            raise InputError(
                f"{path}: no sky_level column (classified before sky levels were recorded); "
                "classify again into a new folder for --min-sky, or drop it"
            )
        if lacking:
            raise InputError(
                f"{path}: no class probabilities ({', '.join(lacking)}); --min-prob needs "
                "classify-archive predictions"
            )
        return _columns_to_read(path, available) + extra

    if p.is_dir():
        files = done_shard_files(p)
        if not files:
            raise InputError(
                f"{p}: no shards/shard-*.parquet files; give a classify-archive predictions "
                "directory"
            )
        return dd.read_parquet([str(f) for f in files], columns=columns(files[0]))
    if not p.is_file():
        raise InputError(f"{p}: no such file or directory")
    if _is_parquet(p):
        return pd.read_parquet(p, columns=columns(p))
    if extra:
        raise InputError(
            f"{p}: a label file has no class probabilities or sky levels; --min-prob and "
            "--min-sky need classify-archive predictions"
        )
    return read_label_file(p, station)


def predictions_station(
    pred: str | os.PathLike, station: str | os.PathLike | StationConfig | None
) -> StationConfig:
    """The station whose MLT the frames get: the one classify-archive recorded for a predictions
    directory (a different --station is refused), else ``station``, else yrs."""
    run = read_run(pred) if Path(pred).is_dir() else None
    recorded = (run or {}).get("station_config") or (run or {}).get("station")
    if station is None:
        try:
            return resolve_station(None, None, recorded)
        except ConfigError:
            raise InputError(
                f"{pred}: predictions of station {recorded!r}, which is not a built-in station; "
                "pass its YAML with --station"
            ) from None
    st = resolve_station(station)
    code = recorded.get("code") if isinstance(recorded, dict) else recorded
    if code is not None and code != st.code:
        raise InputError(
            f"{pred}: these predictions are of station {code}, not {st.code}: MLT would be "
            f"computed for the wrong site; drop --station (or pass {code}'s)"
        )
    return st


def _unknown_labels_source(pred: str | os.PathLike) -> str:
    """The file whose labels are unknown: the first such shard of a predictions folder."""
    p = Path(pred)
    if not p.is_dir():
        return str(p)
    for f in done_shard_files(p):  # the error path only: read the label columns one by one
        try:
            label_codes(pq.read_table(f, columns=["label"]).column("label").to_pandas())
        except UnknownLabelError:
            return str(f)
        except Exception:  # noqa: BLE001 - an unreadable shard: fall back to the folder
            break
    return str(p)


def _range_text(mlt_range: tuple[float, float] | list[float]) -> str:
    """'6-18 MLT', or '22-2 MLT across midnight' for a range written 22 26."""
    start, end = mlt_range
    if end - start >= 24:
        return f"{start:g}-{end - 24:g} MLT, all 24 h"
    if end > 24:
        return f"{start:g}-{end - 24:g} MLT across midnight"
    return f"{start:g}-{end:g} MLT"


def model_sky_floor(pred: str | os.PathLike) -> float:
    """The sky level of the dimmest frame the model of a predictions folder learnt from (its
    checkpoint's ``sky_level.min``, which classify-archive records): ``--min-sky model``."""
    run = read_run(pred) if Path(pred).is_dir() else None
    recorded = (run or {}).get("train_sky_level")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("min"), (int, float)):
        raise InputError(
            f"{pred}: no sky level of the model's training frames on record (a predictions "
            "file, or a checkpoint trained before train recorded it); give a number instead, "
            "e.g. --min-sky 0.1"
        )
    return float(recorded["min"])


def resolve_min_sky(pred: str | os.PathLike, min_sky: float | str | None) -> float | None:
    """``--min-sky`` as a sky level: None (off), a number in [0, 1), or 'model'."""
    if min_sky is None:
        return None
    if isinstance(min_sky, str):
        if min_sky.strip().lower() == "model":
            return model_sky_floor(pred)
        try:
            min_sky = float(min_sky)
        except ValueError:
            raise InputError(
                f"--min-sky {min_sky!r}: give 'model' or a sky level within 0..1 (e.g. 0.1)"
            ) from None
    if not 0.0 <= float(min_sky) < 1.0:
        raise InputError(f"--min-sky must be 'model' or within 0..1 (e.g. 0.1), got {min_sky:g}")
    return float(min_sky)


def screen_dim(frames: Any, floor: float, source: str | os.PathLike) -> tuple[Any, int]:
    """Frames whose sky level is at least ``floor``, and how many were left out; an error where
    a frame has no sky level (classified before it was recorded)."""
    level = frames["sky_level"]
    keep = level >= floor
    # one pass over the column for both counts (a dask frame: a whole archive's shards)
    n_null, n_out = (int(n) for n in dask.compute(level.isna().sum(), (~keep).sum()))
    if n_null:
        raise InputError(
            f"{source}: {n_null:,} frames have no sky_level (classified before it was recorded); "
            "classify again into a new folder, or drop --min-sky"
        )
    return frames[keep], n_out


def screen_uncertain(frames: Any, min_prob: float) -> tuple[Any, int]:
    """Frames whose most probable class has at least ``min_prob``, and how many were left out."""
    top = frames[list(PROB_COLUMNS)].max(axis=1)
    keep = top >= min_prob
    n_out = (~keep).sum()
    n_out = int(n_out.compute() if hasattr(n_out, "compute") else n_out)
    return frames[keep], n_out


def read_confusion(path: str | os.PathLike) -> np.ndarray:
    """confusion.parquet -> (K, K) counts, rows true class and columns predicted, CLASSES order.

    Accepted format (the evaluate stage's confusion.parquet): one row per true class, a string
    column ``true`` with the class name, and one numeric column per predicted class named
    ``<class>`` or ``pred_<class>`` (counts or row-normalised rates; any row order).
    """
    p = Path(path)
    cols = _parquet_columns(p)
    df = pd.read_parquet(p)
    fix = f"expected a 'true' column and columns {', '.join(CLASSES)} (rows: true classes)"
    if "true" not in cols:
        raise InputError(f"{p}: no 'true' column; {fix}")
    pred_cols = []
    for c in CLASSES:
        if c in cols:
            pred_cols.append(c)
        elif f"pred_{c}" in cols:
            pred_cols.append(f"pred_{c}")
        else:
            raise InputError(f"{p}: no column for predicted class {c!r}; {fix}")
    true = df["true"].astype(str).str.lower().tolist()
    if sorted(true) != sorted(CLASSES):
        raise InputError(f"{p}: 'true' holds {true}; need each of {', '.join(CLASSES)} once")
    df = df.assign(true=true).set_index("true").loc[list(CLASSES), pred_cols]
    try:
        matrix = df.to_numpy(dtype=float)
    except (TypeError, ValueError):
        raise InputError(f"{p}: confusion entries must be numbers") from None
    try:
        normalise_confusion(matrix)
    except InputError as exc:
        raise InputError(f"{p}: {exc}") from None
    return matrix


# ----------------------------------------------------------------------------- outputs


def summary_markdown(hourly: pd.DataFrame, info: dict[str, Any], command: str | None = None) -> str:
    """Markdown: what was binned and the per-hour share of each class."""
    lines = ["# Occurrence per MLT hour", ""]
    if command:
        lines += ["Made with:", "", "```", command, "```", ""]
    lines += [
        f"- source: `{info['source']}`",
        f"- station: {info['station']}, MLT method: {info['mlt_method']}",
        f"- bins: {info['bins']} over {_range_text(info['mlt_range'])} ({info['n_bins']} bins)",
        f"- frames binned: {info['n_binned']:,}; outside the MLT range: {info['n_dropped']:,}; "
        f"without time or label: {info['n_missing']:,}",
    ]
    if info.get("n_unclassified"):
        lines.append(
            f"- **incomplete predictions**: {info['n_unclassified']:,} frames of the last "
            "classify-archive run are neither predicted nor in _errors.parquet (not binned)"
        )
    if info.get("min_sky_level") is not None:
        lines.append(
            f"- left out as too dim (sky level < {info['min_sky_level']:.4g}, --min-sky "
            f"{info['min_sky']}): {info['n_dim']:,}"
        )
    if info.get("min_prob"):
        lines.append(
            f"- left out as uncertain (top class probability < {info['min_prob']:g}): "
            f"{info['n_uncertain']:,}"
        )
    lines += [
        "",
    ]
    head = ["MLT", "frames"] + [f"{c} %" for c in CLASSES]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * 5) + "|"]
    for _, row in hourly.iterrows():
        cells = [f"{row['mlt_start']:05.2f}-{row['mlt_end']:05.2f}", f"{int(row['n_frames']):,}"]
        for c in CLASSES:
            r = row[f"ratio_{c}"]
            cells.append("" if pd.isna(r) else f"{100 * r:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    tot = hourly["n_frames"].sum()
    cells = ["all", f"{int(tot):,}"]
    for c in CLASSES:
        cells.append(f"{100 * hourly[f'n_{c}'].sum() / tot:.1f}" if tot else "")
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def command_line(pred, out, bins, mlt_range, station, mlt_method, **flags: Any) -> str:
    """The CLI command that reproduces a run (recorded in occurrence.md)."""
    parts = ["aurora-pipeline", "occurrence", str(pred), "--bins", str(bins)]
    parts += ["--mlt-range", f"{mlt_range[0]:g}", f"{mlt_range[1]:g}"]
    if station is not None:
        parts += [
            "--station",
            str(station) if not isinstance(station, StationConfig) else station.code,
        ]
    if mlt_method:
        parts += ["--mlt-method", mlt_method]
    for name, value in flags.items():  # by, ci, correct, min_frames, regions, min_prob, min_sky
        option = "--" + name.replace("_", "-")
        if value is True:
            parts.append(option)
        elif value is not None and value is not False and value != 0:
            parts += [option, f"{value:g}" if isinstance(value, float) else str(value)]
    return " ".join(parts + ["--out", str(out)])


def run_occurrence(
    pred: str | os.PathLike,
    out: str | os.PathLike,
    bins: str = "3min",
    mlt_range: tuple[float, float] = (6.0, 18.0),
    station: str | StationConfig | None = None,
    mlt_method: str | None = None,
    by: str | None = None,
    ci: bool = False,
    correct: str | os.PathLike | None = None,
    min_frames: int = 0,
    regions: str | os.PathLike | None = None,
    min_prob: float = 0.0,
    min_sky: float | str | None = None,
) -> dict[str, Any]:
    """The occurrence stage; returns a summary dict (also the run record, ``_run.json``).

    ``min_prob``: leave out frames whose most probable class is below it (a partial screen for
    frames that fit no class well: no aurora, cloud, diffuse aurora), counted as uncertain.
    ``min_sky``: leave out frames whose sky level is below it ('model': below every frame the
    model learnt from), counted as too dim.
    Every input and option is checked before anything is written, and the outputs replace
    those of an earlier run together (see the module doc), so OUT never mixes two runs.
    """
    # Options and small files first: errors before any reading of the predictions.
    _check_options(min_prob, min_frames, mlt_method)
    out = Path(out)
    refuse_foreign_out(out, COMMAND)
    command = command_line(
        pred, out, bins, mlt_range, station, mlt_method, by=by, ci=ci, correct=correct,
        min_frames=min_frames, regions=regions, min_prob=min_prob, min_sky=min_sky,
    )  # fmt: skip
    spec = make_bins(bins, mlt_range)
    regions_config = plots.load_regions(regions)
    confusion = read_confusion(correct) if correct is not None else None
    st = predictions_station(pred, station)
    n_unclassified = _warn_unclassified(pred)
    floor = resolve_min_sky(pred, min_sky)

    method = mlt_method or st.mlt.method
    screens = {"min_prob": min_prob, "min_sky": floor}
    frames, method, n_uncertain, n_dim = _read_frames(pred, st, method, by, screens, confusion)
    counts = _count(pred, frames, spec, by, ci)
    table = occurrence_from_counts(counts, spec, by, ci, confusion)
    _refuse_nothing_binned(pred, table, spec, n_uncertain, n_dim)
    overall = occurrence_from_counts(counts, spec, None, ci, confusion) if by else table
    settings: dict[str, Any] = {
        "source": str(pred),
        "station": st.code,
        "mlt_method": method,
        "bins": spec.label,
        "mlt_range": list(spec.mlt_range),
        "n_bins": spec.nbins,
        "by": by,
        "ci": ci,
        "correct": None if correct is None else str(correct),
        "min_frames": min_frames,
        "min_prob": min_prob,
        "min_sky": min_sky,
        "command_line": command,
    }
    results = {
        "n_uncertain": n_uncertain,
        "min_sky_level": floor,
        "n_dim": n_dim,
        "n_unclassified": n_unclassified,
        "n_binned": table.attrs["n_binned"],
        "n_dropped": table.attrs["n_dropped"],
        "n_missing": table.attrs["n_missing"],
        "outputs": [str(out / n) for n in OUTPUT_NAMES],
    }
    info = {**settings, **results}
    writers = _output_writers(table, overall, info, st, regions_config)
    with OutputFolder(out, COMMAND, settings) as folder:
        for name, write in writers.items():
            write(folder.staging / name)
        folder.install(list(writers), **results)
    return info


def _refuse_nothing_binned(
    pred: str | os.PathLike, table: pd.DataFrame, spec: Any, n_uncertain: int, n_dim: int
) -> None:
    """One line saying where every frame went when none was binned."""
    if table.attrs["n_binned"] == 0:
        raise InputError(
            f"{pred}: no frame to bin ({table.attrs['n_dropped']:,} outside "
            f"{_range_text(spec.mlt_range)}, {table.attrs['n_missing']:,} without "
            f"time or label, {n_uncertain:,} uncertain, {n_dim:,} too dim); check --station, "
            "--mlt-range, --min-prob, --min-sky"
        )


def _check_options(min_prob: float, min_frames: int, mlt_method: str | None) -> None:
    if not 0.0 <= min_prob < 1.0:
        raise InputError(f"--min-prob must be within 0..1 (e.g. 0.6), got {min_prob:g}")
    if min_frames < 0:
        raise InputError(f"--min-frames must be 0 or more, got {min_frames}")
    if mlt_method is not None and mlt_method not in METHODS:
        raise InputError(f"--mlt-method {mlt_method!r}: allowed {', '.join(METHODS)}")


def _warn_unclassified(pred: str | os.PathLike) -> int:
    """The frames classify-archive's last run into PRED left unclassified, with a warning."""
    n_unclassified, n_considered, since = unclassified_frames(pred)
    if n_unclassified:
        after = f" after --since {since}" if since else ""
        log.warning(
            "%s: %s of the %s manifest frames%s that classify-archive was to classify are neither "
            "predicted nor in _errors.parquet (it was interrupted, or is still running), so they "
            "are not binned; rerun classify-archive with the same arguments to finish, then "
            "occurrence",
            pred, f"{n_unclassified:,}", f"{n_considered:,}", after,
        )  # fmt: skip
    return n_unclassified


def _read_frames(
    pred: str | os.PathLike,
    st: StationConfig,
    method: str,
    by: str | None,
    screens: dict[str, Any],
    confusion: np.ndarray | None,
) -> tuple[Any, str, int, int]:
    """PRED's frames with their MLT by ``method`` (or their stored MLT: method "stored"), less
    the too dim ones (``screens['min_sky']``, a sky level or None) and the uncertain ones
    (``screens['min_prob']``); and how many of each were left out."""
    min_prob, floor = screens["min_prob"], screens["min_sky"]
    frames = read_predictions(pred, st, probabilities=min_prob > 0, sky=floor is not None)
    n_uncertain = n_dim = 0
    if floor is not None:
        frames, n_dim = screen_dim(frames, floor, pred)
        if confusion is not None:
            log.warning(
                "--correct with --min-sky: the confusion matrix was measured on test frames "
                "of every brightness; the corrected ratios may be biased"
            )
    if min_prob > 0:
        frames, n_uncertain = screen_uncertain(frames, min_prob)
        if confusion is not None:
            log.warning(
                "--correct with --min-prob: the confusion matrix was measured on all test "
                "frames, not on the confident ones kept here; the corrected ratios are biased"
            )
    if "time_utc" in frames.columns:
        return add_mlt(frames, st, method), method, n_uncertain, n_dim
    if by:
        raise InputError(f"{pred}: grouping by {by} needs a 'time_utc' column")
    return frames, "stored", n_uncertain, n_dim


def _count(pred: str | os.PathLike, frames: Any, spec: Any, by: str | None, ci: bool) -> Any:
    """The per-bin class counts (per UT day too for intervals: a day's frames are one cluster)."""
    by_day = ci and "time_utc" in frames.columns
    try:
        if hasattr(frames, "npartitions") and frames.npartitions > 1:
            with TqdmCallback(desc="occurrence", unit="task"):
                return count_bins(frames, spec, by, by_day=by_day)
        return count_bins(frames, spec, by, by_day=by_day)
    except UnknownLabelError as exc:
        raise InputError(f"{_unknown_labels_source(pred)}: {exc}") from None


def _output_writers(
    table: pd.DataFrame,
    overall: pd.DataFrame,
    info: dict[str, Any],
    st: StationConfig,
    regions_config: Any,
) -> dict[str, Callable[[Path], Any]]:
    """Each output but the run record, with the function that writes it to a path."""
    source, method, command = info["source"], info["mlt_method"], info["command_line"]
    table.attrs.update(station=st.code, mlt_method=method, source=source)
    history = f"{pd.Timestamp.now(tz='UTC'):%Y-%m-%dT%H:%M:%SZ}: {command}"  # CF 2.6.2
    ds = to_dataset(table, station=st.name, method=method, source=source, history=history)
    title = f"{st.code.upper()}: {info['n_binned']:,} frames, {info['bins']} bins, MLT: {method}"
    fig = plots.plot_occurrence(overall, regions_config, min_frames=info["min_frames"], title=title)
    schema = occurrence_schema(info["by"], info["ci"], info["correct"] is not None)
    metadata = _contract(table, schema.names, info)
    hourly = hourly_summary(overall)
    return {
        "occurrence.parquet": lambda path: write_table(table, path, schema, metadata),
        "occurrence.nc": lambda path: ds.to_netcdf(path, engine="netcdf4"),
        "occurrence.png": lambda path: plots.save_figure(fig, path, dpi=300),
        "occurrence.pdf": lambda path: plots.save_figure(fig, path),
        "occurrence.md": lambda path: path.write_text(summary_markdown(hourly, info, command)),
    }


def _contract(table: pd.DataFrame, columns: list[str], info: dict[str, Any]) -> dict[str, str]:
    """The key-value metadata of occurrence.parquet: what it holds and how it was made."""
    ci_method = table.attrs.get("ci_method")
    docs = occurrence_column_docs(columns, CI_DESCRIPTIONS.get(ci_method))
    source = info["source"]
    run = read_run(source) if Path(source).is_dir() else None
    return contract_metadata(
        "occurrence",
        docs,
        station=info["station"],
        model_id=(run or {}).get("model_id"),
        mlt_method=info["mlt_method"],
        bins=info["bins"],
        mlt_range=info["mlt_range"],
        by=info["by"],
        ci_method=ci_method,
        corrected=info["correct"] is not None,
        source=source,
        command=info["command_line"],
    )


def format_summary(info: dict[str, Any]) -> str:
    """The one-paragraph summary the CLI prints."""
    return (
        f"binned {info['n_binned']:,} frames into {info['n_bins']} bins of {info['bins']} "
        f"({_range_text(info['mlt_range'])}, {info['mlt_method']}); "
        f"dropped {info['n_dropped']:,} outside the range, {info['n_missing']:,} without "
        f"time or label"
        + (
            f", {info['n_dim']:,} below --min-sky {info['min_sky_level']:.4g}"
            if info.get("min_sky_level") is not None
            else ""
        )
        + (
            f", {info['n_uncertain']:,} below --min-prob {info['min_prob']:g}"
            if info.get("min_prob")
            else ""
        )
        + (
            f"; {info['n_unclassified']:,} frames not classified yet (classify-archive did not "
            "finish: rerun it with the same arguments)"
            if info.get("n_unclassified")
            else ""
        )
        + f"\nwrote {', '.join(re.sub(r'^.*/', '', o) for o in info['outputs'])} "
        f"to {Path(info['outputs'][0]).parent}"
    )
