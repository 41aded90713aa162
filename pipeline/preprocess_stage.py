"""The ``preprocess`` stage: every frame of an archive, manifest or labelled set, on a Dask cluster.

Tasks carry chunks of file paths, never pixels: each task reads its frames, applies
:func:`pipeline.preprocess.preprocess` and writes each output by temporary name plus rename, then
returns one status per frame. Outputs newer than their input are skipped, so a rerun after a
crash finishes the job and a rerun of a finished job does nothing. Frames that fail go to
OUT/errors.parquet and the run goes on. The resolved settings are written to OUT/_preprocess.json.
``--format zarr`` writes a frame store instead (:mod:`pipeline.store_writer`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline import __version__, framestore
from pipeline.config import StationConfig, resolve_station, to_dict
from pipeline.errors import ConfigError, FrameReadError, InputError
from pipeline.preprocess import (
    Calibration,
    calibration_from_station,
    dark_coverage_note,
    dark_for_time,
    dark_frames,
    find_dark_dir,
    is_preprocessed_shape,
    preprocess,
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

log = logging.getLogger(__name__)

STAGE = "preprocess"
PARAMS_NAME = "_preprocess.json"
ERRORS_NAME = "errors.parquet"
LOCK_NAME = ".preprocess.lock"
LABELS_NAME = "labels.parquet"
#: Failures that belong to the frame file itself: retried on a rerun only when the file changed.
_FRAME_FAULTS = ("FrameReadError", "FrameGeometryError")
_PGM = (".pgm.gz", ".pgm")
FORMATS = ("png", "npy", "zarr")
#: a store's frame size when --input-size is not given: the paper's AlexNet input.
DEFAULT_INPUT_SIZE = 227


# ------------------------------------------------------------------------------ darks


@dataclass(frozen=True)
class DarkSource:
    """Where dark frames come from: one ``file`` for all, a ``dir`` chosen by date, or ``none``."""

    mode: str = "none"
    path: str | None = None

    def path_for(self, time: Any) -> str | None:
        """The dark frame for a frame taken at ``time`` (None: estimate the bias instead)."""
        if self.mode == "file":
            return self.path
        if self.mode == "dir" and self.path is not None:
            p = dark_for_time(self.path, time)
            return None if p is None else str(p)
        return None


def load_dark(path: str | os.PathLike) -> np.ndarray:
    """Read a dark frame once per process (16-bit PNG); later calls return the cached array."""
    p = os.fspath(path)
    return _load_dark(p, _mtime_ns(p))  # a replaced file (new mtime) is read again


@functools.lru_cache(maxsize=8)
def _load_dark(path: str, _mtime_ns: int | None) -> np.ndarray:
    from pipeline.imageio import read_frame

    arr = read_frame(path)
    arr.setflags(write=False)
    return arr


@functools.lru_cache(maxsize=16)
def _calibration(
    station: StationConfig, dark_path: str | None, _mtime_ns: int | None, dtype: str
) -> Calibration:
    dark = None if dark_path is None else load_dark(dark_path)
    return calibration_from_station(station, dark=dark, dtype=dtype)  # type: ignore[arg-type]


def calibration_for(
    station: StationConfig, time: Any, darks: DarkSource, dtype: str = "float32"
) -> Calibration:
    """The (cached) Calibration for a frame of ``station`` taken at ``time``."""
    dark_path = darks.path_for(time) if station.preprocess.dark_subtract else None
    mtime = None if dark_path is None else _mtime_ns(dark_path)
    return _calibration(station, dark_path, mtime, dtype)


def _check_darks(station: StationConfig, darks: DarkSource) -> None:
    """Refuse dark frames of another camera before any work starts (one clear message)."""
    if darks.mode == "none":
        return
    paths = (
        [Path(darks.path)]  # type: ignore[arg-type]
        if darks.mode == "file"
        else [p for _, p in dark_frames(darks.path)]  # type: ignore[arg-type]
    )
    raw = station.raw_size
    for p in paths:
        try:
            arr = load_dark(str(p))
        except FrameReadError as exc:
            raise ConfigError(f"{p}: cannot read the dark frame ({exc.reason})") from None
        if arr.shape != (raw, raw):
            raise ConfigError(
                f"{p}: dark frame is {arr.shape[0]}x{arr.shape[1]} but {station.code} raw frames "
                f"are {raw}x{raw}; use this camera's dark frames or the matching --station"
            )


# ------------------------------------------------------------------------------ inputs


def _resolve_station(
    station: StationConfig | str | os.PathLike | None, root: Path
) -> StationConfig:
    """The given station, else ROOT/calib/station.yaml (synthetic sets at other sizes), else yrs."""
    return resolve_station(station, root)


def _load_labelled(root: Path) -> pd.DataFrame:
    table = root / LABELS_NAME
    try:
        df = pd.read_parquet(table)
    except Exception as exc:  # noqa: BLE001 - any decode failure is the user's file
        raise InputError(f"{table}: cannot read as Parquet ({exc})") from None
    if "path" not in df.columns:
        raise InputError(f"{table}: no 'path' column; labels.parquet needs path and label")
    df = df.reset_index(drop=True)
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
        st = _resolve_station(station, source)
        return "labelled", source, st, _load_labelled(source), empty_frame(ERRORS_SCHEMA)
    from pipeline.archive import load_manifest_and_errors

    if source.is_dir():
        st = _resolve_station(station, source)
        df, errors = load_manifest_and_errors(source, st)
        return "archive", Path(df.attrs.get("root", source)).resolve(), st, df, errors
    # A manifest (or list of paths): the station may sit beside the archive it points to.
    first = _resolve_station(station if station is not None else "yrs", source.parent)
    df, errors = load_manifest_and_errors(source, first)
    root = Path(df.attrs.get("root", source.parent)).resolve()
    st = first if station is not None else _resolve_station(None, root)
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


def _read_group(path: str, frames: list[int]) -> list[np.ndarray | BaseException]:
    """Read frames of one file; a PGM stack is decoded once for all its frames in the chunk."""
    from pipeline.imageio import read_frame, read_pgm_stack

    if len(frames) > 1 and path.lower().endswith(_PGM):
        try:
            stack, _ = read_pgm_stack(path)
        except Exception as exc:  # noqa: BLE001 - recorded per frame by the caller
            return [exc] * len(frames)
        out: list[np.ndarray | BaseException] = []
        for f in frames:
            if 0 <= f < len(stack):
                out.append(stack[f])
            else:
                out.append(FrameReadError(path, f"frame {f} out of range ({len(stack)} frames)"))
        return out
    res: list[np.ndarray | BaseException] = []
    for f in frames:
        try:
            res.append(read_frame(path, f))
        except Exception as exc:  # noqa: BLE001
            res.append(exc)
    return res


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
    from pipeline.imageio import write_frame

    results: list[tuple[int, str, str, str]] = []
    for path, group in itertools.groupby(items, key=lambda it: it[1]):
        group = list(group)
        arrays = _read_group(path, [it[2] for it in group])
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


def _write_json_if_changed(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    if path.is_file() and path.read_text() == text:
        return  # a rerun leaves the file (and its mtime) alone
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Refuse to mix outputs of different settings in one folder (up-to-date checks would lie)."""
    p = out / PARAMS_NAME
    if not p.is_file():
        return
    try:
        old = json.loads(p.read_text()).get("settings")
    except (json.JSONDecodeError, AttributeError):
        return
    new = json.loads(json.dumps(settings))  # tuples become lists, as in the file
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
        f"{p}: {out} holds frames preprocessed with other settings"
        + (f" ({diff[0]} differs)" if diff else "")
        + "; use another --out or delete it"
    )


def _out_lock(out: Path) -> contextlib.AbstractContextManager[None]:
    """Hold OUT/.preprocess.lock: two runs writing one folder would delete each other's temp files."""
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


def _mtime_ns(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


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
    kind, root, st, df, scan_errors = _load_frames(source, station)
    # float32 for a store: what classify-archive computes from the frames, before its resize.
    dtype = "uint8" if fmt == "png" else "float32"

    if dark is not None or dark_dir is not None:
        if not st.preprocess.dark_subtract:
            raise ConfigError(
                f"station {st.code}: preprocess.dark_subtract is false; remove --dark/--dark-dir "
                "or switch dark_subtract on in the station YAML"
            )
        if dark is not None:
            darks = DarkSource("file", str(Path(dark).resolve()))
        else:
            d = Path(dark_dir).resolve()  # type: ignore[arg-type]
            if not dark_frames(d):
                raise InputError(f"{d}: no dark frames (dark_<YYYYMMDD>.png) in --dark-dir")
            darks = DarkSource("dir", str(d))
    else:
        found = find_dark_dir(root) if st.preprocess.dark_subtract else None
        darks = DarkSource("dir", str(found)) if found is not None else DarkSource()
    _check_darks(st, darks)
    if darks.mode == "dir" and "time_utc" in df.columns and len(df):
        note = dark_coverage_note(darks.path, df["time_utc"].min())  # type: ignore[arg-type]
        if note:
            log.warning(note)
    if darks.mode == "file":
        dark_note = f"dark frame {Path(darks.path).name}"  # type: ignore[arg-type]
    elif darks.mode == "dir":
        dark_note = f"dark frames by date from {darks.path}"
    elif st.preprocess.bias_from_corners:
        dark_note = "no dark frame: bias from the unlit corners"
    else:
        dark_note = "no dark frame, no bias subtraction"

    settings = _settings(st, darks, fmt, dtype)
    if fmt == "zarr":
        from pipeline.store_writer import write_store

        summary = PreprocessSummary(out=out_dir, total=len(df), dark=dark_note)
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
        summary.seconds = time.perf_counter() - t0
        return summary
    if framestore.is_store(out_dir):
        raise InputError(
            f"{out_dir}: is a frame store; add to it with --format zarr, or choose another --out"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    with _out_lock(out_dir):
        _check_settings(out_dir, settings)
        _write_json_if_changed(
            out_dir / PARAMS_NAME,
            {
                "stage": STAGE,
                "pipeline_version": __version__,
                "input": str(source),
                "input_kind": kind,
                "station": to_dict(st),
                "settings": settings,
            },
        )
        _clean_partials(out_dir)

        summary = PreprocessSummary(out=out_dir, total=len(df), dark=dark_note)
        rels = [str(p) for p in df["path"]]
        frames = [int(f) for f in df["frame"]] if "frame" in df.columns else [0] * len(df)
        times = list(df["time_utc"]) if "time_utc" in df.columns else [None] * len(df)
        abspaths = [str(p) for p in df["abspath"]]
        outs = [out_dir / _out_relpath(r, f, fmt) for r, f in zip(rels, frames)]

        errors_path = out_dir / ERRORS_NAME
        old_errors = read_errors(errors_path) if errors_path.is_file() else None
        errors_mtime = _mtime_ns(str(errors_path)) if old_errors is not None else None
        known: set[tuple[str, int]] = set()
        if old_errors is not None and len(old_errors):
            faults = old_errors[
                (old_errors["stage"] == STAGE) & old_errors["error"].isin(_FRAME_FAULTS)
            ]
            known = {(str(p), int(f)) for p, f in zip(faults["path"], faults["frame"])}

        todo: list[int] = []
        new_errors: list[pd.DataFrame] = []
        seen: dict[Path, int] = {}
        for i, (ap, o) in enumerate(zip(abspaths, outs)):
            if o in seen:
                new_errors.append(
                    error_rows(
                        [(rels[i], frames[i])],
                        STAGE,
                        f"output {o} would also be written from {rels[seen[o]]}; rename one input",
                        error="InputError",
                    )
                )
                summary.failed += 1
                summary.note_error(f"output name collision: {rels[i]} and {rels[seen[o]]}")
                continue
            seen[o] = i
            t_in = _mtime_ns(ap)
            t_out = _mtime_ns(str(o))
            if t_in is not None and t_out is not None and t_out >= t_in:
                summary.up_to_date += 1
            elif (
                t_in is not None
                and errors_mtime is not None
                and t_in <= errors_mtime
                and (rels[i], frames[i]) in known
            ):
                summary.known_errors += 1  # the same unchanged file failed before: not retried
            else:
                todo.append(i)

        done: set[tuple[str, int]] = set()
        if todo:
            _run_chunks(
                todo, rels, frames, times, abspaths, outs, st, darks, dtype,
                workers, scheduler, chunk_size, summary, new_errors, done,
            )  # fmt: skip

        _update_errors(errors_path, old_errors, new_errors, done)
        replace_stage_errors(errors_path, scan_errors, "scan", keep_empty=True)
        summary.scan_errors = len(scan_errors)
        if kind == "labelled":
            _carry_labels(out_dir, df, outs)
        _write_station(st, out_dir)
        summary.seconds = time.perf_counter() - t0
        return summary


def _run_chunks(
    todo: list[int],
    rels: list[str],
    frames: list[int],
    times: list[Any],
    abspaths: list[str],
    outs: list[Path],
    station: StationConfig,
    darks: DarkSource,
    dtype: str,
    workers: int | None,
    scheduler: str | None,
    chunk_size: int | None,
    summary: PreprocessSummary,
    new_errors: list[pd.DataFrame],
    done: set[tuple[str, int]],
) -> None:
    """Submit the frames still to do in chunks, windowed, and collect their statuses."""
    from pipeline.cluster import dask_client, run_windowed

    with dask_client(workers=workers, threads_per_worker=1, scheduler=scheduler) as client:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})) or (workers or 1))
        # Several chunks per worker keep every worker busy to the end and the bar moving; 64
        # frames (~0.5 s of work at 512 px) keep the scheduler overhead per frame negligible.
        size = chunk_size or min(64, max(1, math.ceil(len(todo) / (n_workers * 8))))
        chunks = [todo[k : k + size] for k in range(0, len(todo), size)]

        def tasks():
            for key, chunk in enumerate(chunks):
                items = [(i, abspaths[i], frames[i], times[i], str(outs[i])) for i in chunk]
                yield key, (items, station, darks, dtype), len(chunk)

        def on_result(key: Any, results: list[tuple[int, str, str, str]]) -> None:
            for i, status, err, msg in results:
                if status == "error":
                    summary.failed += 1
                    summary.note_error(msg)
                    frame_errors.append((rels[i], frames[i], STAGE, err, msg))
                else:
                    done.add((rels[i], frames[i]))
                    if status == "passed":
                        summary.passed_through += 1
                    else:
                        summary.written += 1

        def on_error(key: Any, exc: BaseException) -> None:
            # The whole chunk failed (a worker died): every frame of it is recorded.
            chunk = chunks[key]
            summary.failed += len(chunk)
            summary.note_error(f"{type(exc).__name__}: {exc}")
            new_errors.append(error_rows([(rels[i], frames[i]) for i in chunk], STAGE, exc))

        # One row tuple per failed frame, made into one table at the end (not one per frame).
        frame_errors: list[tuple[str, int, str, str, str]] = []
        run_windowed(
            client,
            process_chunk,
            tasks(),
            on_result=on_result,
            on_error=on_error,
            window=2 * n_workers + 2,
            total=len(todo),
            desc="preprocess",
        )
        if frame_errors:
            new_errors.append(pd.DataFrame(frame_errors, columns=ERRORS_SCHEMA.names))


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
