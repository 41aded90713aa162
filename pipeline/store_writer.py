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
import math
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
from pipeline.storage import (
    ERRORS_SCHEMA,
    error_rows,
    exclusive_lock,
    read_errors,
    refuse_foreign_out,
    replace_stage_errors,
    write_table,
)

STAGE = "preprocess"
#: frames per append (and commit): four chunks; an append costs ~0.1 s whatever its size.
APPEND_FRAMES = 4 * framestore.FRAMES_PER_CHUNK
_FRAME_FAULTS = ("FrameReadError", "FrameGeometryError")


# ------------------------------------------------------------------------------ the worker task


def store_chunk(
    items: Sequence[tuple[int, str, int, Any]],
    station: StationConfig,
    darks: Any,
    input_size: int,
) -> tuple[list[int], np.ndarray, list[tuple[int, str, str]]]:
    """Read, preprocess and resize each (index, input path, frame, time) of a chunk.

    Returns (indices of the frames that worked, their frames (k, S, S) float32 in that order,
    (index, error class, message) of the others). Never raises for a bad frame.
    """
    import torch

    from pipeline.models import resize_frames
    from pipeline.preprocess import preprocess
    from pipeline.preprocess_stage import _read_group, calibration_for

    torch.set_num_threads(1)  # one Dask thread per worker: the resize must not take the cores
    ok: list[int] = []
    crops: list[np.ndarray] = []
    errors: list[tuple[int, str, str]] = []
    for path, group in itertools.groupby(items, key=lambda it: it[1]):
        group = list(group)
        for (idx, _, _, t), arr in zip(group, _read_group(path, [it[2] for it in group])):
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


def write_store(
    source: Path,
    out: Path,
    kind: str,
    root: Path,
    station: StationConfig,
    df: pd.DataFrame,
    scan_errors: pd.DataFrame,
    darks: Any,
    settings: dict[str, Any],
    input_size: int,
    summary: Any,
    workers: int | None = None,
    scheduler: str | None = None,
    chunk_size: int | None = None,
) -> Any:
    """Append the frames of ``df`` missing from the store OUT (created when absent); fills in
    and returns ``summary`` (a PreprocessSummary)."""
    from pipeline.models import MIN_INPUT_SIZE

    t0 = time.perf_counter()
    if input_size < MIN_INPUT_SIZE:
        raise InputError(f"--input-size must be >= {MIN_INPUT_SIZE} px, got {input_size}")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file; --out takes the folder of the frame store")
    if out.is_dir() and not framestore.is_store(out) and any(out.iterdir()):
        raise InputError(
            f"{out}: exists and is not a frame store; give `preprocess --format zarr` a new folder"
        )
    refuse_foreign_out(out, ("zarr.json",), "preprocess --format zarr")
    coords = framestore.COORDS + tuple(c for c in framestore.LABEL_COORDS if c in df.columns)
    attrs = _attrs(source, kind, root, station, settings, input_size, coords)
    out.mkdir(parents=True, exist_ok=True)
    what = f"{out}: another preprocess run is writing this store"
    with exclusive_lock(framestore.side_path(out, framestore.LOCK_NAME), what):
        if framestore.is_store(out):
            _check_store(framestore.open_info(out), attrs)
            framestore.repair(out)
        else:
            framestore.create(out, attrs)
        have = framestore.read_items(out)
        in_store = set(zip(have["path"].astype(str), have["frame"].astype(int)))
        errors_path = framestore.side_path(out, framestore.ERRORS_NAME)
        old_errors = read_errors(errors_path)
        known = _known_failures(old_errors)
        errors_mtime = os.stat(errors_path).st_mtime_ns if errors_path.is_file() else None

        rels = [str(p) for p in df["path"]]
        frames = [int(f) for f in df["frame"]]
        abspaths = [str(p) for p in df["abspath"]]
        todo: list[int] = []
        for i, key in enumerate(zip(rels, frames)):
            if key in in_store:
                summary.up_to_date += 1
            elif key in known and _unchanged(abspaths[i], errors_mtime):
                summary.known_errors += 1
            else:
                todo.append(i)
        failed: list[pd.DataFrame] = []
        done: set[tuple[str, int]] = set()
        if todo:
            _run(out, df, todo, station, darks, input_size, workers, scheduler, chunk_size,
                 summary, failed, done)  # fmt: skip
        _update_errors(errors_path, old_errors, failed, done)
        replace_stage_errors(errors_path, scan_errors, "scan", keep_empty=True)
        summary.scan_errors = len(scan_errors)
    summary.seconds = time.perf_counter() - t0
    return summary


def _unchanged(path: str, errors_mtime: int | None) -> bool:
    """The file is no newer than the errors table that recorded its failure."""
    try:
        return errors_mtime is not None and os.stat(path).st_mtime_ns <= errors_mtime
    except OSError:
        return False


def _run(
    out: Path,
    df: pd.DataFrame,
    todo: list[int],
    station: StationConfig,
    darks: Any,
    input_size: int,
    workers: int | None,
    scheduler: str | None,
    chunk_size: int | None,
    summary: Any,
    failed: list[pd.DataFrame],
    done: set[tuple[str, int]],
) -> None:
    """Submit the chunks, append their frames in planned order, commit after every append."""
    from pipeline.cluster import dask_client, run_windowed

    rels = df["path"].astype(str).tolist()
    frames = df["frame"].astype(int).tolist()
    abspaths = df["abspath"].astype(str).tolist()
    times = list(df["time_utc"]) if "time_utc" in df.columns else [None] * len(df)
    extra = [c for c in framestore.LABEL_COORDS if c in df.columns]
    with dask_client(workers=workers, threads_per_worker=1, scheduler=scheduler) as client:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})) or (workers or 1))
        size = chunk_size or min(
            framestore.FRAMES_PER_CHUNK, max(1, math.ceil(len(todo) / (n_workers * 4)))
        )
        chunks = [todo[k : k + size] for k in range(0, len(todo), size)]
        ready: dict[int, tuple[list[int], np.ndarray]] = {}
        pending: list[tuple[list[int], np.ndarray]] = []
        nxt = [0]

        def tasks():
            for key, chunk in enumerate(chunks):
                items = [(i, abspaths[i], frames[i], times[i]) for i in chunk]
                yield key, (items, station, darks, input_size), len(chunk)

        def flush() -> None:
            idx = [i for ok, _ in pending for i in ok]
            if idx:
                arr = np.concatenate([a for _, a in pending])
                rows = df.iloc[idx]
                items = pd.DataFrame(
                    {
                        "time_utc": pd.to_datetime(rows["time_utc"], utc=True).to_numpy(),
                        "path": [rels[i] for i in idx],
                        "frame": [frames[i] for i in idx],
                        **{c: rows[c].to_numpy() for c in extra},
                    }
                )
                framestore.append(out, arr, items)
                summary.written += len(idx)
                done.update((rels[i], frames[i]) for i in idx)
            pending.clear()

        def advance(key: int, result: tuple[list[int], np.ndarray]) -> None:
            # Append in the planned order: the store stays in time order, run after run.
            ready[key] = result
            while nxt[0] in ready:
                pending.append(ready.pop(nxt[0]))
                nxt[0] += 1
                if sum(len(ok) for ok, _ in pending) >= APPEND_FRAMES:
                    flush()

        def on_result(key: int, res: tuple[list[int], np.ndarray, list]) -> None:
            ok, arr, errs = res
            for i, err, msg in errs:
                summary.failed += 1
                summary.note_error(msg)
                failed.append(error_rows([(rels[i], frames[i])], STAGE, msg, error=err))
            advance(key, (ok, arr))

        def on_error(key: int, exc: BaseException) -> None:
            chunk = chunks[key]
            summary.failed += len(chunk)
            summary.note_error(f"{type(exc).__name__}: {exc}")
            failed.append(error_rows([(rels[i], frames[i]) for i in chunk], STAGE, exc))
            advance(key, ([], np.zeros((0, input_size, input_size), np.float32)))

        try:
            run_windowed(
                client,
                store_chunk,
                tasks(),
                on_result=on_result,
                on_error=on_error,
                window=2 * n_workers + 2,
                total=len(todo),
                desc="preprocess",
            )
        finally:
            # Ctrl-C too: what arrived in order is kept (and committed) for the rerun.
            flush()


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
