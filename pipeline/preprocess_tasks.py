"""What both writers of ``preprocess`` share: dark frames, calibrations, reading, chunked tasks.

The frame writer (:mod:`pipeline.preprocess_stage`) and the store writer
(:mod:`pipeline.store_writer`) run the same worker-side steps: choose a frame's dark frame and
calibration, read the frames of one file (a PGM stack once for all its frames), and submit the
frames to do in windowed chunks on a Dask cluster.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from pipeline.cluster import dask_client, run_windowed
from pipeline.config import StationConfig
from pipeline.errors import ConfigError, FrameReadError, InputError
from pipeline.imageio import PGM_SUFFIXES, read_frame, read_pgm_stack
from pipeline.preprocess import (
    Calibration,
    calibration_from_station,
    dark_coverage_note,
    dark_for_time,
    dark_frames,
    find_dark_dir,
)

log = logging.getLogger(__name__)


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

    def describe(self, station: StationConfig) -> str:
        """What the run subtracts, for the summary line."""
        if self.mode == "file":
            return f"dark frame {Path(self.path).name}"  # type: ignore[arg-type]
        if self.mode == "dir":
            return f"dark frames by date from {self.path}"
        if station.preprocess.bias_from_corners:
            return "no dark frame: bias from the unlit corners"
        return "no dark frame, no bias subtraction"


def mtime_ns(path: str) -> int | None:
    """The file's modification time (ns), or None when it cannot be stat'ed."""
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def load_dark(path: str | os.PathLike) -> np.ndarray:
    """Read a dark frame once per process (16-bit PNG); later calls return the cached array."""
    p = os.fspath(path)
    return _load_dark(p, mtime_ns(p))  # a replaced file (new mtime) is read again


@functools.lru_cache(maxsize=8)
def _load_dark(path: str, _mtime_ns: int | None) -> np.ndarray:
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
    mtime = None if dark_path is None else mtime_ns(dark_path)
    return _calibration(station, dark_path, mtime, dtype)


def check_darks(station: StationConfig, darks: DarkSource) -> None:
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


def resolve_darks(
    station: StationConfig,
    root: Path,
    frames: pd.DataFrame,
    dark: str | os.PathLike | None = None,
    dark_dir: str | os.PathLike | None = None,
) -> DarkSource:
    """The dark frames of a run: ``--dark``, ``--dark-dir``, else ROOT/calib, checked."""
    if dark is not None or dark_dir is not None:
        if not station.preprocess.dark_subtract:
            raise ConfigError(
                f"station {station.code}: preprocess.dark_subtract is false; remove --dark/"
                "--dark-dir or switch dark_subtract on in the station YAML"
            )
        if dark is not None:
            darks = DarkSource("file", str(Path(dark).resolve()))
        else:
            d = Path(dark_dir).resolve()  # type: ignore[arg-type]
            if not dark_frames(d):
                raise InputError(f"{d}: no dark frames (dark_<YYYYMMDD>.png) in --dark-dir")
            darks = DarkSource("dir", str(d))
    else:
        found = find_dark_dir(root) if station.preprocess.dark_subtract else None
        darks = DarkSource("dir", str(found)) if found is not None else DarkSource()
    check_darks(station, darks)
    if darks.mode == "dir" and "time_utc" in frames.columns and len(frames):
        note = dark_coverage_note(darks.path, frames["time_utc"].min())  # type: ignore[arg-type]
        if note:
            log.warning(note)
    return darks


# ------------------------------------------------------------------------------ reading
def read_group(path: str, frames: list[int]) -> list[np.ndarray | BaseException]:
    """Read frames of one file; a PGM stack is decoded once for all its frames in the chunk."""
    if len(frames) > 1 and path.lower().endswith(PGM_SUFFIXES):
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


# ------------------------------------------------------------------------------ chunked tasks
class ChunkCollector(Protocol):
    """What receives the chunks' outcomes (in completion order) on the driver."""

    def result(self, key: int, chunk: list[int], result: Any) -> None: ...

    def error(self, key: int, chunk: list[int], exc: BaseException) -> None: ...


@dataclass(frozen=True)
class Chunking:
    """How the frames to do are cut into tasks: ``per_worker`` chunks a worker at least (the
    bar keeps moving, every worker stays busy to the end), ``largest`` frames a chunk at most."""

    per_worker: int
    largest: int
    size: int | None = None  # --chunk-size: frames per task, whatever the cluster

    def cut(self, todo: list[int], n_workers: int) -> list[list[int]]:
        size = self.size or min(
            self.largest, max(1, math.ceil(len(todo) / (n_workers * self.per_worker)))
        )
        return [todo[k : k + size] for k in range(0, len(todo), size)]


def run_chunks(
    todo: list[int],
    task: Callable[..., Any],
    args_of: Callable[[list[int]], tuple],
    collector: ChunkCollector,
    chunking: Chunking,
    workers: int | None = None,
    scheduler: str | None = None,
) -> None:
    """Run ``task(*args_of(chunk))`` for every chunk of ``todo`` on a Dask cluster, a window of
    tasks in flight, and hand each outcome to ``collector``."""
    with dask_client(workers=workers, threads_per_worker=1, scheduler=scheduler) as client:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})) or (workers or 1))
        chunks = chunking.cut(todo, n_workers)
        run_windowed(
            client,
            task,
            ((key, args_of(chunk), len(chunk)) for key, chunk in enumerate(chunks)),
            on_result=lambda key, res: collector.result(key, chunks[key], res),
            on_error=lambda key, exc: collector.error(key, chunks[key], exc),
            window=2 * n_workers + 2,
            total=len(todo),
            desc="preprocess",
        )
