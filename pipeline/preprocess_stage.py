"""The ``preprocess`` stage: every frame of an archive, manifest or labelled set, on a Dask cluster.

Tasks carry chunks of file paths, never pixels: each task reads its frames, applies
:func:`pipeline.preprocess.preprocess` and writes each output by temporary name plus rename, then
returns one status per frame. Outputs newer than their input are skipped, so a rerun after a
crash finishes the job and a rerun of a finished job does nothing. Frames that fail go to
OUT/errors.parquet and the run goes on. OUT follows the output-folder protocol (docs/design.md,
"Output folders"): its run record ``_run.json`` holds the resolved settings and says ``finished``
only once a run has been through every frame. ``--format zarr`` writes a frame store instead
(:mod:`pipeline.store_writer`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline import __version__, framestore
from pipeline.archive import load_manifest_and_errors
from pipeline.config import StationConfig, resolve_station, to_dict
from pipeline.errors import InputError
from pipeline.imageio import write_frame
from pipeline.labels import LABELS_NAME, read_labels_table
from pipeline.output_folder import RUN_RECORD, OutputFolder, is_finished
from pipeline.preprocess import calibration_from_station, is_preprocessed_shape, preprocess
from pipeline.preprocess_tasks import (
    Chunking,
    DarkSource,
    calibration_for,
    mtime_ns,
    read_group,
    resolve_darks,
    run_chunks,
)
from pipeline.storage import (
    ERRORS_SCHEMA,
    atomic_path,
    empty_frame,
    error_rows,
    exclusive_lock,
    merge_errors,
    read_errors,
    replace_stage_errors,
    write_table,
)
from pipeline.store_writer import write_store

__all__ = ["DarkSource", "PreprocessSummary", "process_chunk", "run_preprocess"]

log = logging.getLogger(__name__)

STAGE = "preprocess"
ERRORS_NAME = "errors.parquet"
LOCK_NAME = ".preprocess.lock"
#: Failures that belong to the frame file itself: retried on a rerun only when the file changed.
_FRAME_FAULTS = ("FrameReadError", "FrameGeometryError")
_PGM = (".pgm.gz", ".pgm")
FORMATS = ("png", "npy", "zarr")
#: a store's frame size when --input-size is not given: the paper's AlexNet input.
DEFAULT_INPUT_SIZE = 227


# ------------------------------------------------------------------------------ inputs


def _load_labelled(root: Path) -> pd.DataFrame:
    df = read_labels_table(root, required=("path",))
    added = ["abspath"]  # columns the stage needs; dropped again from OUT/labels.parquet
    if "frame" not in df.columns:
        df["frame"] = 0
        added.append("frame")
    if "time_utc" not in df.columns:
        df["time_utc"] = pd.NaT
        added.append("time_utc")
    paths = [Path(str(p)) for p in df["path"]]
    df["abspath"] = [str(p if p.is_absolute() else root / p) for p in paths]
    df.attrs["added"] = added
    return df


def _load_frames(
    source: Path, station: StationConfig | str | os.PathLike | None
) -> tuple[str, Path, StationConfig, pd.DataFrame, pd.DataFrame]:
    """(kind, root, station, frames with path, frame, time_utc, abspath, scan errors) of any
    accepted INPUT."""
    if source.is_dir() and (source / LABELS_NAME).is_file():
        st = resolve_station(station, source)
        return "labelled", source, st, _load_labelled(source), empty_frame(ERRORS_SCHEMA)
    if source.is_dir():
        st = resolve_station(station, source)
        df, errors = load_manifest_and_errors(source, st)
        return "archive", Path(df.attrs.get("root", source)).resolve(), st, df, errors
    # A manifest (or list of paths): the station may sit beside the archive it points to.
    first = resolve_station(station if station is not None else "yrs", source.parent)
    df, errors = load_manifest_and_errors(source, first)
    root = Path(df.attrs.get("root", source.parent)).resolve()
    st = first if station is not None else resolve_station(None, root)
    return "manifest", root, st, df, errors


def _out_relpath(rel: str, frame: int, fmt: str) -> Path:
    """Output path relative to OUT: the input's relative path, new extension, _f<idx> for stacks."""
    p = Path(rel)
    if p.is_absolute():
        p = Path(*p.parts[1:])
    name = p.name
    multi = name.lower().endswith(_PGM) or frame > 0
    for suffix in _PGM:
        if name.lower().endswith(suffix):
            stem = name[: -len(suffix)]
            break
    else:
        stem = p.stem
    if multi:
        stem = f"{stem}_f{int(frame):03d}"
    return p.with_name(f"{stem}.{fmt}")


# ------------------------------------------------------------------------------ the worker task


def process_chunk(
    items: Sequence[tuple[int, str, int, Any, str]],
    station: StationConfig,
    darks: DarkSource,
    dtype: str,
) -> list[tuple[int, str, str, str]]:
    """Read, preprocess and write each (index, input path, frame, time, output path) of a chunk.

    Returns (index, status, error class, message) per frame; status is ``written``,
    ``passed`` (already at the output geometry) or ``error``. Never raises for a bad frame.
    """
    results: list[tuple[int, str, str, str]] = []
    for path, group in itertools.groupby(items, key=lambda it: it[1]):
        group = list(group)
        arrays = read_group(path, [it[2] for it in group])
        for (idx, _, _, t, out_path), arr in zip(group, arrays):
            try:
                if isinstance(arr, BaseException):
                    raise arr
                calib = calibration_for(station, t, darks, dtype)
                img = preprocess(arr, calib, source=path)
                write_frame(out_path, img)
            except Exception as exc:  # noqa: BLE001 - one bad frame never stops the chunk
                results.append((idx, "error", type(exc).__name__, str(exc)))
            else:
                status = "passed" if is_preprocessed_shape(arr.shape, calib) else "written"
                results.append((idx, status, "", ""))
    return results


# ------------------------------------------------------------------------------ the driver


@dataclass
class PreprocessSummary:
    """What one run did (counts of frames) and where its outputs are."""

    out: Path
    total: int = 0
    written: int = 0
    passed_through: int = 0
    up_to_date: int = 0
    known_errors: int = 0
    failed: int = 0
    #: files named like frames that the scan could not list (no time, broken link, folder...).
    scan_errors: int = 0
    seconds: float = 0.0
    dark: str = ""
    #: the first few error messages, for the summary line.
    errors: list[str] = field(default_factory=list)
    #: where the errors table is, relative to ``out``.
    errors_file: str = ERRORS_NAME

    def note_error(self, message: str) -> None:
        """Keep the first few error messages (the table holds them all)."""
        if len(self.errors) < 5:
            self.errors.append(message)

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        parts = [
            f"preprocess: {self.total} frames",
            f"{self.written + self.passed_through} written",
            f"{self.up_to_date} up to date",
            f"{self.failed + self.known_errors} failed",
        ]
        if self.passed_through:
            parts.append(f"{self.passed_through} already preprocessed (passed through)")
        if self.scan_errors:
            parts.append(f"{self.scan_errors} files named like frames are not frames")
        tail = ""
        if self.failed + self.known_errors + self.scan_errors:
            first = f"; first: {self.errors[0]}" if self.errors else ""
            tail = f" (see {self.out / self.errors_file}{first})"
        return ", ".join(parts) + f"; {self.dark}; {self.seconds:.1f} s -> {self.out}" + tail


def _settings(station: StationConfig, darks: DarkSource, fmt: str, dtype: str) -> dict[str, Any]:
    calib = calibration_from_station(station, dtype=dtype)  # type: ignore[arg-type]
    params = calib.params()
    params["dark"] = darks.mode != "none" and station.preprocess.dark_subtract
    return {
        "calibration": params,
        "dark": {"mode": darks.mode, "path": darks.path},
        "format": fmt,
    }


def _check_settings(folder: OutputFolder) -> None:
    """Refuse to mix outputs of different settings in one folder (up-to-date checks would lie)."""
    old = (folder.previous() or {}).get("settings")
    new = json.loads(json.dumps(folder.record["settings"]))  # tuples become lists, as in the file
    if not isinstance(old, dict) or old == new:
        return
    diff = [
        f"{k}.{kk}"
        for k, v in new.items()
        if isinstance(v, dict)
        for kk in v
        if not isinstance(old.get(k), dict) or old[k].get(kk) != v[kk]
    ] + [k for k, v in new.items() if not isinstance(v, dict) and old.get(k) != v]
    raise InputError(
        f"{folder.path / RUN_RECORD}: {folder.path} holds frames preprocessed with other settings"
        + (f" ({diff[0]} differs)" if diff else "")
        + "; use another --out or delete it"
    )


def _out_lock(out: Path) -> contextlib.AbstractContextManager[None]:
    """Hold OUT/.preprocess.lock: two runs writing a folder would delete each other's temp files."""
    return exclusive_lock(out / LOCK_NAME, f"{out}: another preprocess run is writing this folder")


def _clean_partials(out: Path) -> int:
    """Remove temporary ``.<name>.*.part`` files a killed run left behind; returns their count."""
    n = 0
    for dirpath, _, files in os.walk(out):
        for name in files:
            if name.startswith(".") and name.endswith(".part"):
                try:
                    os.unlink(os.path.join(dirpath, name))
                    n += 1
                except OSError:
                    pass
    if n:
        log.info("removed %d partial file(s) of an interrupted run in %s", n, out)
    return n


def _check_arguments(
    source: Path,
    out_dir: Path,
    fmt: str,
    dark: str | os.PathLike | None,
    dark_dir: str | os.PathLike | None,
    input_size: int | None,
) -> None:
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: allowed values: {', '.join(FORMATS)}")
    if input_size is not None and fmt != "zarr":
        raise InputError(f"--input-size sizes the frames of a store (--format zarr), not {fmt}")
    if dark is not None and dark_dir is not None:
        raise InputError("give either --dark (one frame for all) or --dark-dir, not both")
    if not source.exists():
        raise InputError(f"{source}: input not found")
    if out_dir == source or (source.is_dir() and source in out_dir.parents):
        raise InputError(
            f"{out_dir}: the output folder must not be the input or lie inside it "
            "(a later scan would pick the outputs up as frames); choose another --out"
        )


@dataclass(frozen=True)
class _Input:
    """What a run preprocesses: INPUT's frames, where they come from, how they are calibrated."""

    source: Path
    kind: str
    root: Path
    station: StationConfig
    frames: pd.DataFrame
    scan_errors: pd.DataFrame
    darks: DarkSource


def run_preprocess(
    input: str | os.PathLike,
    out: str | os.PathLike,
    station: StationConfig | str | os.PathLike | None = None,
    dark: str | os.PathLike | None = None,
    dark_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    fmt: str = "png",
    chunk_size: int | None = None,
    input_size: int | None = None,
) -> PreprocessSummary:
    """Preprocess every frame of INPUT (archive tree, manifest or labelled set) into OUT.

    ``fmt`` ``zarr``: OUT is a frame store of the frames at ``input_size`` (default: the
    store's own, else 227), see :mod:`pipeline.store_writer`.
    """
    t0 = time.perf_counter()
    source = Path(input).resolve()
    out_dir = Path(out).resolve()
    _check_arguments(source, out_dir, fmt, dark, dark_dir, input_size)
    kind, root, st, df, scan_errors = _load_frames(source, station)
    darks = resolve_darks(st, root, df, dark, dark_dir)
    job = _Input(source, kind, root, st, df, scan_errors, darks)
    summary = PreprocessSummary(out=out_dir, total=len(df), dark=darks.describe(st))
    if fmt == "zarr":
        # float32: what classify-archive computes from the frames, before its resize.
        settings = _settings(st, darks, fmt, "float32")
        summary.errors_file = f"{framestore.SIDE_GROUP}/{framestore.ERRORS_NAME}"
        if input_size is not None:
            size = int(input_size)
        else:  # the nightly run adds to a store at its own size
            is_store = framestore.is_store(out_dir)
            size = framestore.open_info(out_dir).input_size if is_store else DEFAULT_INPUT_SIZE
        write_store(
            source, out_dir, kind, root, st, df, scan_errors, darks, settings, size, summary,
            workers, scheduler, chunk_size,
        )  # fmt: skip
    else:
        _write_frames(job, out_dir, fmt, summary, Chunking(8, 64, chunk_size), workers, scheduler)
    summary.seconds = time.perf_counter() - t0
    return summary


def _write_frames(
    job: _Input,
    out_dir: Path,
    fmt: str,
    summary: PreprocessSummary,
    chunking: Chunking,
    workers: int | None,
    scheduler: str | None,
) -> None:
    """Preprocess the frames of ``job`` missing from OUT into OUT (resumable, in place)."""
    if framestore.is_store(out_dir):
        raise InputError(
            f"{out_dir}: is a frame store; add to it with --format zarr, or choose another --out"
        )
    dtype = "uint8" if fmt == "png" else "float32"
    record = {
        "pipeline_version": __version__,
        "input": str(job.source),
        "input_kind": job.kind,
        "station": to_dict(job.station),
        "settings": _settings(job.station, job.darks, fmt, dtype),
    }
    with OutputFolder(out_dir, STAGE, record, owns=(LABELS_NAME,)) as folder, _out_lock(out_dir):
        _check_settings(folder)
        _clean_partials(out_dir)
        df = job.frames
        plan = _FramePlan.of(df, out_dir, fmt)
        errors_path = out_dir / ERRORS_NAME
        old_errors = read_errors(errors_path) if errors_path.is_file() else None
        todo, new_errors = plan.todo(old_errors, mtime_ns(str(errors_path)), summary)
        # A rerun with nothing to do leaves OUT (and its record's mtime) alone.
        settled = not todo and folder.same_settings() and is_finished(out_dir, STAGE)
        if not settled:
            folder.begin()
        done: set[tuple[str, int]] = set()
        if todo:
            collector = _FrameCollector(plan, summary, new_errors, done)
            args = functools.partial(
                plan.task_args, station=job.station, darks=job.darks, dtype=dtype
            )
            run_chunks(todo, process_chunk, args, collector, chunking, workers, scheduler)
            collector.close()
        _update_errors(errors_path, old_errors, new_errors, done)
        replace_stage_errors(errors_path, job.scan_errors, "scan", keep_empty=True)
        summary.scan_errors = len(job.scan_errors)
        if job.kind == "labelled":
            _carry_labels(out_dir, df, plan.outs)
        _write_station(job.station, out_dir)
        if not settled:
            folder.finish()


@dataclass
class _FramePlan:
    """Per input frame: relative path, frame index, time, absolute path, output path."""

    rels: list[str]
    frames: list[int]
    times: list[Any]
    abspaths: list[str]
    outs: list[Path]

    @classmethod
    def of(cls, df: pd.DataFrame, out_dir: Path, fmt: str) -> _FramePlan:
        rels = [str(p) for p in df["path"]]
        frames = [int(f) for f in df["frame"]] if "frame" in df.columns else [0] * len(df)
        times = list(df["time_utc"]) if "time_utc" in df.columns else [None] * len(df)
        abspaths = [str(p) for p in df["abspath"]]
        outs = [out_dir / _out_relpath(r, f, fmt) for r, f in zip(rels, frames)]
        return cls(rels, frames, times, abspaths, outs)

    def key(self, i: int) -> tuple[str, int]:
        return self.rels[i], self.frames[i]

    def todo(
        self, old_errors: pd.DataFrame | None, errors_mtime: int | None, summary: PreprocessSummary
    ) -> tuple[list[int], list[pd.DataFrame]]:
        """The frames to (re)do, and error rows of output-name collisions.

        Skipped: outputs newer than their input, and frames that failed before from a file that
        has not changed since (``errors_mtime``: the errors table's).
        """
        known = _known_faults(old_errors)
        todo: list[int] = []
        collisions: list[pd.DataFrame] = []
        seen: dict[Path, int] = {}
        for i, (ap, o) in enumerate(zip(self.abspaths, self.outs)):
            if o in seen:
                first = self.rels[seen[o]]
                collisions.append(
                    error_rows(
                        [self.key(i)],
                        STAGE,
                        f"output {o} would also be written from {first}; rename one input",
                        error="InputError",
                    )
                )
                summary.failed += 1
                summary.note_error(f"output name collision: {self.rels[i]} and {first}")
                continue
            seen[o] = i
            t_in, t_out = mtime_ns(ap), mtime_ns(str(o))
            if t_in is not None and t_out is not None and t_out >= t_in:
                summary.up_to_date += 1
            elif (
                t_in is not None
                and errors_mtime is not None
                and t_in <= errors_mtime
                and self.key(i) in known
            ):
                summary.known_errors += 1  # the same unchanged file failed before: not retried
            else:
                todo.append(i)
        return todo, collisions

    def task_args(
        self, chunk: list[int], station: StationConfig, darks: DarkSource, dtype: str
    ) -> tuple:
        items = [
            (i, self.abspaths[i], self.frames[i], self.times[i], str(self.outs[i])) for i in chunk
        ]
        return items, station, darks, dtype


def _known_faults(errors: pd.DataFrame | None) -> set[tuple[str, int]]:
    """(path, frame) of the frames whose own file failed before (retried only once it changes)."""
    if errors is None or not len(errors):
        return set()
    faults = errors[(errors["stage"] == STAGE) & errors["error"].isin(_FRAME_FAULTS)]
    return {(str(p), int(f)) for p, f in zip(faults["path"], faults["frame"])}


class _FrameCollector:
    """Counts the chunks' statuses into the summary and collects the failures' error rows."""

    def __init__(
        self,
        plan: _FramePlan,
        summary: PreprocessSummary,
        new_errors: list[pd.DataFrame],
        done: set[tuple[str, int]],
    ) -> None:
        self.plan, self.summary, self.new_errors, self.done = plan, summary, new_errors, done
        # One row tuple per failed frame, made into one table at the end (not one per frame).
        self.frame_errors: list[tuple[str, int, str, str, str]] = []

    def result(self, key: int, chunk: list[int], results: list[tuple[int, str, str, str]]) -> None:
        for i, status, err, msg in results:
            if status == "error":
                self.summary.failed += 1
                self.summary.note_error(msg)
                self.frame_errors.append((*self.plan.key(i), STAGE, err, msg))
            else:
                self.done.add(self.plan.key(i))
                if status == "passed":
                    self.summary.passed_through += 1
                else:
                    self.summary.written += 1

    def error(self, key: int, chunk: list[int], exc: BaseException) -> None:
        # The whole chunk failed (a worker died): every frame of it is recorded.
        self.summary.failed += len(chunk)
        self.summary.note_error(f"{type(exc).__name__}: {exc}")
        self.new_errors.append(error_rows([self.plan.key(i) for i in chunk], STAGE, exc))

    def close(self) -> None:
        if self.frame_errors:
            self.new_errors.append(pd.DataFrame(self.frame_errors, columns=ERRORS_SCHEMA.names))


def _update_errors(
    path: Path,
    old: pd.DataFrame | None,
    new: list[pd.DataFrame],
    done: set[tuple[str, int]],
) -> None:
    """Drop rows of frames that now succeeded, add the new failures; write only on change."""
    if old is not None and done:
        fixed = [
            (r.stage == STAGE and (str(r.path), int(r.frame)) in done)
            for r in old.itertuples(index=False)
        ]
        if any(fixed):
            old = old[[not f for f in fixed]].reset_index(drop=True)
            write_table(old, path, ERRORS_SCHEMA)
    rows = pd.concat(new, ignore_index=True) if new else None
    if rows is not None and len(rows):
        if old is not None:
            key = ["path", "frame", "stage", "error", "message"]
            merged = old.merge(rows[key], on=key, how="right", indicator=True)
            if (merged["_merge"] == "both").all():
                return  # the same failures as last time: leave the file alone
        merge_errors(path, rows)
    elif old is None:
        write_table(pd.DataFrame(columns=ERRORS_SCHEMA.names), path, ERRORS_SCHEMA)


def _carry_labels(out_dir: Path, df: pd.DataFrame, outs: list[Path]) -> None:
    """OUT/labels.parquet: the input's table with paths relative to OUT, frames that exist."""
    keep = [o.is_file() for o in outs]
    labels = df.loc[keep].drop(columns=df.attrs.get("added", ["abspath"])).reset_index(drop=True)
    labels["path"] = [o.relative_to(out_dir).as_posix() for o, k in zip(outs, keep) if k]
    table = pa.Table.from_pandas(labels, preserve_index=False)
    target = out_dir / LABELS_NAME
    unchanged = False
    if target.is_file():
        try:
            unchanged = pq.read_table(target).equals(table, check_metadata=False)
        except Exception:  # noqa: BLE001 - an unreadable old table is simply rewritten
            unchanged = False
    if not unchanged:  # a rerun leaves the file (and its mtime) alone
        with atomic_path(target) as tmp:
            pq.write_table(table, tmp)


def _write_station(st: StationConfig, out_dir: Path) -> None:
    """OUT/calib/station.yaml: the camera the frames came from, for every reader of OUT.

    Training, classification and retrieval look for ROOT/calib/station.yaml first, so a set
    preprocessed from a tiny synthetic archive stays readable without repeating --station.
    """
    text = yaml.safe_dump(to_dict(st), sort_keys=False)
    dst = out_dir / "calib" / "station.yaml"
    if dst.is_file() and dst.read_text() == text:
        return
    with atomic_path(dst) as tmp:
        tmp.write_text(text)
