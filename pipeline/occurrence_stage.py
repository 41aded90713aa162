"""The ``occurrence`` stage: read predictions or expert labels, bin by MLT, write table/NetCDF/figure.

Inputs (PRED):
- a predictions directory (Parquet dataset of ``shards/shard-*.parquet``, DESIGN.md section 3), read
  with dask.dataframe so archives of any size stream through partition by partition;
- one Parquet file with ``time_utc`` and ``label`` columns (class names);
- a label text file like ``Alllabel2003_38044.txt``: lines ``N20031221G030001  1`` (the frame
  name in the station's filename pattern, then the numeric code 1..4 of pipeline.classes, or a
  class name).
MLT is always recomputed from ``time_utc`` with the chosen method, so one archive can be binned
with either method; a table with ``mlt`` but no ``time_utc`` is binned on its stored MLT.

Outputs: every input and option is checked before anything is written; the outputs are written
into a hidden staging folder inside OUT and moved into OUT together, ``occurrence_run.json``
last (it is removed first): a folder holds a finished result only when it has that file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline.classes import CLASSES, LABEL_CODES, PROB_COLUMNS
from pipeline.config import StationConfig
from pipeline.errors import ConfigError, InputError
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
from pipeline.storage import contract_metadata, install_outputs, refuse_foreign_out, write_table

OUTPUT_NAMES = (
    "occurrence.parquet",
    "occurrence.nc",
    "occurrence.png",
    "occurrence.pdf",
    "occurrence.md",
    "occurrence_run.json",
)
#: Written last (and removed before the others are replaced): its presence marks a finished result.
RUN_RECORD = "occurrence_run.json"
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
            "with time_utc and label (DESIGN.md section 3)"
        )
    if "time_utc" in available:
        return ["time_utc", "label"]
    if "mlt" in available:
        return ["mlt", "label"]
    raise InputError(f"{path}: needs a 'time_utc' (or 'mlt') column besides 'label'")


def read_predictions(
    source: str | os.PathLike, station: StationConfig, probabilities: bool = False
):
    """PRED as a frames table: dask DataFrame for a predictions directory, pandas otherwise.

    ``probabilities``: also read the p_<class> columns (an error where there are none).
    """
    p = Path(source)
    extra = list(PROB_COLUMNS) if probabilities else []

    def columns(path: Path) -> list[str]:
        available = _parquet_columns(path)
        lacking = [c for c in extra if c not in available]
        if lacking:
            raise InputError(
                f"{path}: no class probabilities ({', '.join(lacking)}); --min-prob needs "
                "classify-archive predictions"
            )
        return _columns_to_read(path, available) + extra

    if p.is_dir():
        from pipeline.classify import done_shard_files

        files = done_shard_files(p)
        if not files:
            raise InputError(
                f"{p}: no shards/shard-*.parquet files; give a classify-archive predictions "
                "directory"
            )
        import dask.dataframe as dd

        return dd.read_parquet([str(f) for f in files], columns=columns(files[0]))
    if not p.is_file():
        raise InputError(f"{p}: no such file or directory")
    if _is_parquet(p):
        return pd.read_parquet(p, columns=columns(p))
    if extra:
        raise InputError(
            f"{p}: a label file has no class probabilities; --min-prob needs classify-archive "
            "predictions"
        )
    return read_label_file(p, station)


def predictions_station(
    pred: str | os.PathLike, station: str | os.PathLike | StationConfig | None
) -> StationConfig:
    """The station whose MLT the frames get: the one classify-archive recorded for a predictions
    directory (a different --station is refused), else ``station``, else yrs."""
    from pipeline.classify import read_run
    from pipeline.config import resolve_station

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


def unclassified_frames(pred: str | os.PathLike) -> tuple[int, int, str | None]:
    """Frames that classify-archive's last run into ``pred`` was to classify but that are neither
    in a done shard nor in _errors.parquet: (missing, frames the run considered, its --since).

    (0, 0, None) when the last run finished or when _run.json does not say. Cheap for any
    archive: it adds up the per-shard counts _run.json records and reads _errors.parquet (a few
    columns) only when those fall short (a shard that failed puts its frames there).
    """
    from pipeline.classify import SHARD_FAILED, errors_path, read_run

    none = (0, 0, None)
    run = read_run(pred) if Path(pred).is_dir() else None
    runs = (run or {}).get("runs")
    if not isinstance(runs, list) or not runs or not isinstance(runs[-1], dict):
        return none
    last = runs[-1]
    if last.get("finished"):
        return none  # a finished run put every frame it planned into a shard or into errors
    try:
        planned_frames = int(last["frames_planned"])
        planned = {int(s) for s in last.get("shards_planned", [])}
        considered = int(last.get("frames_considered", planned_frames))
        done = 0
        for key, entry in (run.get("shards") or {}).items():
            if int(key) in planned:
                done += int(entry["frames"])
    except (KeyError, TypeError, ValueError):
        return none  # a _run.json of another layout: nothing to go by
    missing = planned_frames - done
    errors = errors_path(pred)
    if "frames_failed" in last:  # the run's own count of frames in its failed shards
        try:
            missing -= int(last["frames_failed"])
        except (TypeError, ValueError):
            return none
    elif missing > 0 and errors.exists():  # older _run.json: estimate from the errors table
        try:
            err = pd.read_parquet(errors, columns=["error", "message"])
        except Exception:  # noqa: BLE001 - unreadable: classify-archive's rerun will say so
            err = pd.DataFrame({"error": [], "message": []})
        failed = err.loc[err["error"] == SHARD_FAILED, "message"].astype(str)
        shard = pd.to_numeric(failed.str.extract(r"^shard (\d+):")[0], errors="coerce")
        missing -= int(shard.isin(list(planned)).sum())
    return max(missing, 0), considered, last.get("since")


def _unknown_labels_source(pred: str | os.PathLike) -> str:
    """The file whose labels are unknown: the first such shard of a predictions folder."""
    p = Path(pred)
    if not p.is_dir():
        return str(p)
    from pipeline.classify import done_shard_files

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
    for name, value in flags.items():  # by, ci, correct, min_frames, regions, min_prob
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
) -> dict[str, Any]:
    """The occurrence stage; returns a summary dict (also written to occurrence_run.json).

    ``min_prob``: leave out frames whose most probable class is below it (a partial screen for
    frames that fit no class well: no aurora, cloud, diffuse aurora), counted as uncertain.
    Every input and option is checked before anything is written, and the outputs replace
    those of an earlier run together (see the module doc), so OUT never mixes two runs.
    """
    from pipeline.classify import read_run
    from pipeline.mlt import METHODS
    from pipeline.plots import load_regions, plot_occurrence, save_figure

    # Options and small files first: errors before any reading of the predictions.
    if not 0.0 <= min_prob < 1.0:
        raise InputError(f"--min-prob must be within 0..1 (e.g. 0.6), got {min_prob:g}")
    if min_frames < 0:
        raise InputError(f"--min-frames must be 0 or more, got {min_frames}")
    if mlt_method is not None and mlt_method not in METHODS:
        raise InputError(f"--mlt-method {mlt_method!r}: allowed {', '.join(METHODS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file; --out takes a folder")
    refuse_foreign_out(out, ("occurrence_run.json",), "occurrence")
    command = command_line(
        pred, out, bins, mlt_range, station, mlt_method, by=by, ci=ci, correct=correct,
        min_frames=min_frames, regions=regions, min_prob=min_prob,
    )  # fmt: skip
    spec = make_bins(bins, mlt_range)
    regions_config = load_regions(regions)
    confusion = read_confusion(correct) if correct is not None else None
    st = predictions_station(pred, station)
    method = mlt_method or st.mlt.method

    n_unclassified, n_considered, since = unclassified_frames(pred)
    if n_unclassified:
        after = f" after --since {since}" if since else ""
        log.warning(
            "%s: %s of the %s manifest frames%s that classify-archive was to classify are neither "
            "predicted nor in _errors.parquet (it was interrupted, or is still running), so they are "
            "not binned; rerun classify-archive with the same arguments to finish, then occurrence",
            pred, f"{n_unclassified:,}", f"{n_considered:,}", after,
        )  # fmt: skip

    frames = read_predictions(pred, st, probabilities=min_prob > 0)
    n_uncertain = 0
    if min_prob > 0:
        frames, n_uncertain = screen_uncertain(frames, min_prob)
        if confusion is not None:
            log.warning(
                "--correct with --min-prob: the confusion matrix was measured on all test "
                "frames, not on the confident ones kept here; the corrected ratios are biased"
            )
    if "time_utc" in frames.columns:
        frames = add_mlt(frames, st, method)
    else:
        if by:
            raise InputError(f"{pred}: grouping by {by} needs a 'time_utc' column")
        method = "stored"
    # Intervals treat the frames of one UT day as one cluster: they need counts per day.
    by_day = ci and "time_utc" in frames.columns
    try:
        if hasattr(frames, "npartitions") and frames.npartitions > 1:
            from tqdm.dask import TqdmCallback

            with TqdmCallback(desc="occurrence", unit="task"):
                counts = count_bins(frames, spec, by, by_day=by_day)
        else:
            counts = count_bins(frames, spec, by, by_day=by_day)
    except UnknownLabelError as exc:
        raise InputError(f"{_unknown_labels_source(pred)}: {exc}") from None
    table = occurrence_from_counts(counts, spec, by, ci, confusion)
    if table.attrs["n_binned"] == 0:
        raise InputError(
            f"{pred}: no frame to bin ({table.attrs['n_dropped']:,} outside "
            f"{_range_text(spec.mlt_range)}, {table.attrs['n_missing']:,} without "
            f"time or label, {n_uncertain:,} uncertain); check --station, --mlt-range, --min-prob"
        )
    overall = occurrence_from_counts(counts, spec, None, ci, confusion) if by else table
    hourly = hourly_summary(overall)

    info: dict[str, Any] = {
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
        "n_uncertain": n_uncertain,
        "n_unclassified": n_unclassified,
        "command": command,
        "n_binned": table.attrs["n_binned"],
        "n_dropped": table.attrs["n_dropped"],
        "n_missing": table.attrs["n_missing"],
        "outputs": [str(out / n) for n in OUTPUT_NAMES],
    }
    table.attrs.update(station=st.code, mlt_method=method, source=str(pred))
    history = f"{pd.Timestamp.now(tz='UTC'):%Y-%m-%dT%H:%M:%SZ}: {command}"  # CF 2.6.2
    ds = to_dataset(table, station=st.name, method=method, source=str(pred), history=history)
    title = f"{st.code.upper()}: {info['n_binned']:,} frames, {spec.label} bins, MLT: {method}"
    fig = plot_occurrence(overall, regions_config, min_frames=min_frames, title=title)
    schema = occurrence_schema(by, ci, confusion is not None)
    docs = occurrence_column_docs(schema.names, CI_DESCRIPTIONS.get(table.attrs.get("ci_method")))
    run = read_run(pred) if Path(pred).is_dir() else None
    metadata = contract_metadata(
        "occurrence",
        docs,
        station=st.code,
        model_id=(run or {}).get("model_id"),
        mlt_method=method,
        bins=spec.label,
        mlt_range=list(spec.mlt_range),
        by=by,
        ci_method=table.attrs.get("ci_method"),
        corrected=confusion is not None,
        source=str(pred),
        command=command,
    )
    write_outputs(
        out,
        {
            "occurrence.parquet": lambda path: write_table(table, path, schema, metadata),
            "occurrence.nc": lambda path: ds.to_netcdf(path, engine="netcdf4"),
            "occurrence.png": lambda path: save_figure(fig, path, dpi=300),
            "occurrence.pdf": lambda path: save_figure(fig, path),
            "occurrence.md": lambda path: path.write_text(summary_markdown(hourly, info, command)),
            RUN_RECORD: lambda path: path.write_text(json.dumps(info, indent=2) + "\n"),
        },
    )
    return info


def write_outputs(out: Path, writers: dict[str, Callable[[Path], Any]]) -> None:
    """Write each output with its writer, then move them all into ``out``, RUN_RECORD last.

    The writers write into a hidden staging folder inside ``out`` (same file system): a failure
    there leaves ``out`` as it was. Then the old run record is removed, the other outputs are
    renamed over the old ones, and the run record is renamed last: a folder with the run record
    holds one run's outputs only, and one without it (a crash during the renames) holds no
    finished result.
    """
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".occurrence-", suffix=".part", dir=out))
    try:
        for name, write in writers.items():
            write(staging / name)
        umask = os.umask(0)
        os.umask(umask)
        names = sorted(writers, key=lambda n: n == RUN_RECORD)  # the run record last
        for name in names:
            os.chmod(staging / name, 0o666 & ~umask)
        install_outputs(staging, out, names, RUN_RECORD)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()  # a failed run into a new folder leaves no folder behind


def format_summary(info: dict[str, Any]) -> str:
    """The one-paragraph summary the CLI prints."""
    return (
        f"binned {info['n_binned']:,} frames into {info['n_bins']} bins of {info['bins']} "
        f"({_range_text(info['mlt_range'])}, {info['mlt_method']}); "
        f"dropped {info['n_dropped']:,} outside the range, {info['n_missing']:,} without "
        f"time or label"
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
