"""``preprocess --format zarr``: decode and preprocess every frame once, into a frame store.

The store's layout is :mod:`pipeline.framestore`'s. Dask tasks carry chunks of file paths; each
decodes and preprocesses its frames (float32, as classify-archive does), resizes them to the
store's input size with the resize of ``to_model_input`` and returns the chunk's pixels. The
driver alone writes: it appends the chunks in their planned (time) order, a few at a time, and
commits each append, so appends of one store never race and a killed run leaves the store
readable up to its last commit.

A rerun skips the (path, frame) keys already in the store and the frames that failed before
from files that have not changed since (STORE/_aurora/errors.parquet); so the nightly run
appends the new frames, a killed run finishes, and a finished one does nothing.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import __version__, framestore
from pipeline.config import StationConfig, to_dict
from pipeline.errors import InputError
from pipeline.output_folder import RUN_RECORD, OutputFolder, is_finished
from pipeline.preprocess import preprocess
from pipeline.preprocess_tasks import Chunking, DarkSource, calibration_for, read_group, run_chunks
from pipeline.storage import (
    ERRORS_SCHEMA,
    error_rows,
    exclusive_lock,
    read_errors,
    replace_stage_errors,
    write_table,
)

STAGE = "preprocess"
#: frames per append (and commit): four chunks (an append's cost hardly depends on its size).
APPEND_FRAMES = 4 * framestore.FRAMES_PER_CHUNK
_FRAME_FAULTS = ("FrameReadError", "FrameGeometryError")


# ------------------------------------------------------------------------------ the worker task


def store_chunk(
    items: Sequence[tuple[int, str, int, Any]],
    station: StationConfig,
    darks: DarkSource,
    input_size: int,
) -> tuple[list[int], np.ndarray, list[tuple[int, str, str]]]:
    """Read, preprocess and resize each (index, input path, frame, time) of a chunk.

    Returns (indices of the frames that worked, their frames (k, S, S) float32 in that order,
    (index, error class, message) of the others). Never raises for a bad frame.
    """
    import torch  # noqa: PLC0415 - torch only in the worker task

    from pipeline.models import resize_frames  # noqa: PLC0415 - imports torch

    torch.set_num_threads(1)  # one Dask thread per worker: the resize must not take the cores
    ok: list[int] = []
    crops: list[np.ndarray] = []
    errors: list[tuple[int, str, str]] = []
    for path, group in itertools.groupby(items, key=lambda it: it[1]):
        group = list(group)
        for (idx, _, _, t), arr in zip(group, read_group(path, [it[2] for it in group])):
            try:
                if isinstance(arr, BaseException):
                    raise arr
                img = preprocess(arr, calibration_for(station, t, darks, "float32"), source=path)
            except Exception as exc:  # noqa: BLE001 - one bad frame never stops the chunk
                errors.append((idx, type(exc).__name__, str(exc)))
            else:
                ok.append(idx)
                crops.append(np.asarray(img, dtype=np.float32))
    if not crops:
        return ok, np.zeros((0, input_size, input_size), np.float32), errors
    # Crops of one chunk share a size unless --preprocessed and raw frames mix: resize by size.
    out = np.empty((len(crops), input_size, input_size), np.float32)
    shapes = sorted({c.shape for c in crops})
    for shape in shapes:
        pos = [k for k, c in enumerate(crops) if c.shape == shape]
        x = torch.from_numpy(np.stack([crops[k] for k in pos]))[:, None]
        out[pos] = resize_frames(x, input_size)[:, 0].numpy()
    return ok, out, errors


# ------------------------------------------------------------------------------ the driver


def _attrs(
    source: Path,
    kind: str,
    root: Path,
    station: StationConfig,
    settings: dict[str, Any],
    input_size: int,
    coords: tuple[str, ...],
) -> dict[str, Any]:
    return {
        "input_size": int(input_size),
        "station": to_dict(station),
        "settings": settings,
        "root": str(root),
        "source": str(source),
        "kind": kind,
        "coords": list(coords),
        "pipeline_version": __version__,
        "description": "preprocessed all-sky frames at a model's input size (aurora-pipeline)",
    }


def _check_store(info: framestore.StoreInfo, attrs: dict[str, Any]) -> None:
    """Refuse appends that would mix frames of another size, preprocessing, archive or layout."""
    p = info.path
    if info.input_size != attrs["input_size"]:
        raise InputError(
            f"{p}: holds {info.input_size} px frames, not {attrs['input_size']} px; "
            f"pass --input-size {info.input_size} to add to it, or choose another --out"
        )
    new = framestore._jsonable(attrs["settings"])
    if info.settings != new:
        diff = [k for k in new if info.settings.get(k) != new[k]] or ["settings"]
        raise InputError(
            f"{p}: holds frames preprocessed with other settings ({diff[0]} differs); "
            "use another --out or delete it"
        )
    if info.root != attrs["root"] or info.coords != tuple(attrs["coords"]):
        raise InputError(
            f"{p}: holds the frames of {info.root} ({info.kind}), not of {attrs['root']} "
            f"({attrs['kind']}); frames are named relative to their archive: choose another --out"
        )


def _known_failures(errors: pd.DataFrame) -> set[tuple[str, int]]:
    if not len(errors):
        return set()
    mine = errors[(errors["stage"] == STAGE) & errors["error"].isin(_FRAME_FAULTS)]
    return {(str(p), int(f)) for p, f in zip(mine["path"], mine["frame"])}


def _refuse_other_folder(out: Path) -> None:
    """A store goes into a new folder or an existing store, never among other files."""
    if framestore.is_store(out):
        return
    if any(p.name != RUN_RECORD for p in out.iterdir()):
        raise InputError(
            f"{out}: exists and is not a frame store; give `preprocess --format zarr` a new folder"
        )


def write_store(
    source: Path,
    out: Path,
    kind: str,
    root: Path,
    station: StationConfig,
    df: pd.DataFrame,
    scan_errors: pd.DataFrame,
    darks: DarkSource,
    settings: dict[str, Any],
    input_size: int,
    summary: Any,
    workers: int | None = None,
    scheduler: str | None = None,
    chunk_size: int | None = None,
) -> Any:
    """Append the frames of ``df`` missing from the store OUT (created when absent); fills in
    and returns ``summary`` (a PreprocessSummary).

    OUT's run record (``_run.json``, docs/design.md "Output folders") says ``finished: false``
    while frames are appended and true once every frame is in the store or in its errors table.
    """
    from pipeline.models import MIN_INPUT_SIZE  # noqa: PLC0415 - torch, for the driver only here

    t0 = time.perf_counter()
    if input_size < MIN_INPUT_SIZE:
        raise InputError(f"--input-size must be >= {MIN_INPUT_SIZE} px, got {input_size}")
    coords = framestore.COORDS + tuple(c for c in framestore.LABEL_COORDS if c in df.columns)
    attrs = _attrs(source, kind, root, station, settings, input_size, coords)
    record = {k: attrs[k] for k in ("input_size", "settings", "root", "source", "kind")}
    with OutputFolder(out, STAGE, {"format": "zarr", **record}, owns=("zarr.json",)) as folder:
        _refuse_other_folder(out)
        what = f"{out}: another preprocess run is writing this store"
        with exclusive_lock(framestore.side_path(out, framestore.LOCK_NAME), what):
            if framestore.is_store(out):
                _check_store(framestore.open_info(out), attrs)
                framestore.repair(out)
            else:
                framestore.create(out, attrs)
            _append_missing(folder, df, scan_errors, station, darks, input_size, summary,
                            Chunking(4, framestore.FRAMES_PER_CHUNK, chunk_size),
                            workers, scheduler)  # fmt: skip
    summary.seconds = time.perf_counter() - t0
    return summary


def _append_missing(
    folder: OutputFolder,
    df: pd.DataFrame,
    scan_errors: pd.DataFrame,
    station: StationConfig,
    darks: DarkSource,
    input_size: int,
    summary: Any,
    chunking: Chunking,
    workers: int | None,
    scheduler: str | None,
) -> None:
    """Append the frames not in the store yet and not known to fail; update the errors table.

    The run record says ``finished: false`` meanwhile; a rerun with nothing to do leaves it.
    """
    out = folder.path
    have = framestore.read_items(out)
    in_store = set(zip(have["path"].astype(str), have["frame"].astype(int)))
    errors_path = framestore.side_path(out, framestore.ERRORS_NAME)
    old_errors = read_errors(errors_path)
    known = _known_failures(old_errors)
    errors_mtime = os.stat(errors_path).st_mtime_ns if errors_path.is_file() else None
    keys = list(zip(df["path"].astype(str), df["frame"].astype(int)))
    abspaths = [str(p) for p in df["abspath"]]
    todo: list[int] = []
    for i, key in enumerate(keys):
        if key in in_store:
            summary.up_to_date += 1
        elif key in known and _unchanged(abspaths[i], errors_mtime):
            summary.known_errors += 1
        else:
            todo.append(i)
    settled = not todo and folder.same_settings() and is_finished(out, STAGE)
    if not settled:
        folder.begin()
    appender = _Appender(out, df, input_size, summary)
    if todo:
        times = list(df["time_utc"]) if "time_utc" in df.columns else [None] * len(df)

        def args_of(chunk: list[int]) -> tuple:
            items = [(i, abspaths[i], keys[i][1], times[i]) for i in chunk]
            return items, station, darks, input_size

        try:
            run_chunks(todo, store_chunk, args_of, appender, chunking, workers, scheduler)
        finally:
            # Ctrl-C too: what arrived in order is kept (and committed) for the rerun.
            appender.flush()
    _update_errors(errors_path, old_errors, appender.failed, appender.done)
    replace_stage_errors(errors_path, scan_errors, "scan", keep_empty=True)
    summary.scan_errors = len(scan_errors)
    if not settled:
        folder.finish()


def _unchanged(path: str, errors_mtime: int | None) -> bool:
    """The file is no newer than the errors table that recorded its failure."""
    try:
        return errors_mtime is not None and os.stat(path).st_mtime_ns <= errors_mtime
    except OSError:
        return False


class _Appender:
    """Receives the chunks' frames in completion order and appends them to the store in the
    planned (time) order, APPEND_FRAMES at a time, committing each append."""

    def __init__(self, out: Path, df: pd.DataFrame, input_size: int, summary: Any) -> None:
        self.out, self.df, self.input_size, self.summary = out, df, input_size, summary
        self.rels = df["path"].astype(str).tolist()
        self.frames = df["frame"].astype(int).tolist()
        self.extra = [c for c in framestore.LABEL_COORDS if c in df.columns]
        self.ready: dict[int, tuple[list[int], np.ndarray]] = {}
        self.pending: list[tuple[list[int], np.ndarray]] = []
        self.next_key = 0
        self.failed: list[pd.DataFrame] = []
        self.done: set[tuple[str, int]] = set()

    def result(self, key: int, chunk: list[int], res: tuple[list[int], np.ndarray, list]) -> None:
        ok, arr, errs = res
        for i, err, msg in errs:
            self.summary.failed += 1
            self.summary.note_error(msg)
            self.failed.append(error_rows([(self.rels[i], self.frames[i])], STAGE, msg, error=err))
        self._advance(key, (ok, arr))

    def error(self, key: int, chunk: list[int], exc: BaseException) -> None:
        self.summary.failed += len(chunk)
        self.summary.note_error(f"{type(exc).__name__}: {exc}")
        rows = [(self.rels[i], self.frames[i]) for i in chunk]
        self.failed.append(error_rows(rows, STAGE, exc))
        empty = np.zeros((0, self.input_size, self.input_size), np.float32)
        self._advance(key, ([], empty))

    def _advance(self, key: int, result: tuple[list[int], np.ndarray]) -> None:
        # Append in the planned order: the store stays in time order, run after run.
        self.ready[key] = result
        while self.next_key in self.ready:
            self.pending.append(self.ready.pop(self.next_key))
            self.next_key += 1
            if sum(len(ok) for ok, _ in self.pending) >= APPEND_FRAMES:
                self.flush()

    def flush(self) -> None:
        """Append and commit the frames that arrived in order."""
        idx = [i for ok, _ in self.pending for i in ok]
        if idx:
            arr = np.concatenate([a for _, a in self.pending])
            rows = self.df.iloc[idx]
            items = pd.DataFrame(
                {
                    "time_utc": pd.to_datetime(rows["time_utc"], utc=True).to_numpy(),
                    "path": [self.rels[i] for i in idx],
                    "frame": [self.frames[i] for i in idx],
                    **{c: rows[c].to_numpy() for c in self.extra},
                }
            )
            framestore.append(self.out, arr, items)
            self.summary.written += len(idx)
            self.done.update((self.rels[i], self.frames[i]) for i in idx)
        self.pending.clear()


def _update_errors(
    path: Path, old: pd.DataFrame, new: list[pd.DataFrame], done: set[tuple[str, int]]
) -> None:
    """Rows of frames now in the store leave the table, this run's failures join it."""
    table = old
    if len(table) and done:
        fixed = [
            s == STAGE and (str(p), int(f)) in done
            for s, p, f in zip(table["stage"], table["path"], table["frame"])
        ]
        table = table[[not x for x in fixed]]
    if new:
        rows = pd.concat(new, ignore_index=True)
        table = pd.concat([table, rows], ignore_index=True) if len(table) else rows
        table = table.drop_duplicates(["path", "frame", "stage"], keep="last")
    if len(table) != len(old) or new or not path.is_file():
        write_table(table.reset_index(drop=True), path, ERRORS_SCHEMA)
