"""classify-archive: distributed, resumable inference over a whole archive (docs/design.md).

The driver splits the manifest into shards of frames; only paths, frame indices and times travel
through the task graph, with the checkpoint PATH and a few settings. Each Dask worker loads the
model once (a per-process cache keyed by checkpoint path, model_id and device), decodes and
preprocesses frames in a small thread pool while the model runs the previous batch, and writes
its shard itself, atomically, as ``PRED_DIR/shards/shard-000123.parquet`` (PREDICTIONS_SCHEMA).
A frame store (:mod:`pipeline.framestore`, ``preprocess --format zarr``) is classified like an
archive of its frames, with the same paths, times and predictions: its shards are runs of store
indices, and workers read them chunk by chunk (the next batch while the model runs this one)
instead of decoding files.

The output folder (PRED_DIR) and how to read it are :mod:`pipeline.predictions`. It is a
resumable stage's folder (:class:`pipeline.output_folder.OutputFolder`): the run record
``_run.json`` says ``finished: false`` while a run writes shards into it, is rewritten at most
every FLUSH_S seconds with the shards done so far, and says ``finished: true`` at the end.
``ShardFailed`` rows of ``_errors.parquet`` (a shard that kept raising or whose workers kept
dying) are retried by the next run; per-frame errors (unreadable, wrong geometry) are not.

Resuming: a rerun reads the (path, frame) keys of the done shards plus the per-frame error rows,
and classifies only the manifest frames not covered yet, in new shards numbered after the highest
existing one. So a rerun with the same inputs does no work, ``--since`` runs append, a crashed
run resumes where it stopped, and the union of the shards holds every frame once.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from pipeline import cluster, devices, framestore
from pipeline.archive import load_manifest_and_errors
from pipeline.checkpoint import load_checkpoint, preprocess_mismatch, read_meta, warn_if_unfinished
from pipeline.classes import CLASSES, PROB_COLUMNS
from pipeline.config import StationConfig, resolve_station, to_dict
from pipeline.cores import usable_cores
from pipeline.errors import (
    AuroraError,
    CheckpointError,
    FrameGeometryError,
    FrameReadError,
    InputError,
)
from pipeline.imageio import read_frame
from pipeline.mlt import ut_to_mlt
from pipeline.models import sky_level, to_model_input
from pipeline.output_folder import OutputFolder, refuse_foreign_out
from pipeline.predictions import (
    COMMAND,
    ERRORS_FILE,
    FEATURES_DIR,
    RUN_FILE,
    SHARD_FAILED,
    STAGE,
    done_shards,
    features_path,
    read_errors,
    read_run,
    remove_strays,
    shard_files,
    shard_path,
)
from pipeline.preprocess import (
    calibration_from_station,
    dark_coverage_note,
    dark_for_time,
    dark_frames,
    find_dark_dir,
    preprocess,
)
from pipeline.storage import (
    ERRORS_SCHEMA,
    PREDICTIONS_SCHEMA,
    atomic_path,
    exclusive_lock,
    predictions_metadata,
    replace_stage_errors,
    write_table,
)
from pipeline.storage import read_errors as read_errors_table

log = logging.getLogger(__name__)

#: The public names. Those of the predictions folder (FEATURES_DIR, RUN_FILE, SHARD_FAILED,
#: features_*, read_*, shard_*) belong to pipeline.predictions: import them from there.
__all__ = [
    "ClassifySummary",
    "ShardResult",
    "ShardSettings",
    "classify_archive",
    "classify_shard",
    "decode_frame",
    "manifest_hash",
    "parse_since",
    "plan_shards",
    "predict_batch",
    "print_summary",
    "remaining_frames",
]

SCAN_STAGE = "scan"
#: at most one rewrite of _run.json and _errors.parquet per this many seconds during a run.
FLUSH_S = 2.0
#: One driver per predictions folder (an flock: it vanishes with the process that held it).
LOCK_FILE = ".classify.lock"


# =============================================================================== worker side


@dataclass(frozen=True)
class ShardSettings:
    """Everything a shard task needs besides its frames: small and picklable (no weights)."""

    checkpoint: str
    model_id: str
    out_dir: str
    station: StationConfig
    device: str = "auto"
    batch_size: int = 64
    dark_dir: str | None = None
    preprocessed: bool = False
    features: bool = False
    #: torch intra-op threads per worker; None = the worker's cores / workers on its host.
    torch_threads: int | None = None
    #: decoding threads per worker; None = as many as torch threads (CPU) or its share of the
    #: cores (GPU).
    decode_threads: int | None = None
    #: worker processes per host, so a worker can share its host's cores fairly.
    workers_per_host: dict[str, int] = field(default_factory=dict)
    #: a frame store (pipeline.framestore) to read the frames from instead of their files.
    store: str | None = None


@dataclass
class ShardResult:
    """What a shard task returns to the driver (small: counts and error rows, no predictions)."""

    shard: int
    n_frames: int
    n_predicted: int
    class_counts: dict[str, int]
    #: (path, frame, error class, message) of frames that could not be classified.
    errors: list[tuple[str, int, str, str]]
    worker_pid: int
    #: how many times this worker process has loaded this checkpoint (1 when the cache works).
    model_loads: int
    t_decode: float
    t_model: float
    t_wall: float


# Per-process caches: a Dask worker process keeps its model between shard tasks; the weights are
# read from the checkpoint path once, never shipped through the task graph.
_MODELS: dict[tuple[str, str, str], tuple[Any, dict, Any]] = {}
_MODEL_LOADS: Counter[tuple[str, str, str]] = Counter()
_MODEL_LOCK = threading.Lock()
_CALIBS: dict[tuple[str | None, str, bool], Any] = {}
_CALIB_LOCK = threading.Lock()
_POOLS: dict[int, ThreadPoolExecutor] = {}
_BUFFERS: dict[tuple, list[tuple[Any, np.ndarray]]] = {}


def _worker_identity() -> tuple[str | None, Any]:
    """(host, name) of the Dask worker running this task, (None, None) outside a worker."""
    try:
        from distributed import get_worker  # noqa: PLC0415 - dask.distributed stays lazy

        w = get_worker()
    except (ImportError, ValueError):
        return None, None
    host = w.address.split("://")[-1].rsplit(":", 1)[0]
    return host, w.name


def _torch_threads(settings: ShardSettings) -> int:
    if settings.torch_threads:
        return settings.torch_threads
    return max(1, usable_cores() // _workers_on_this_host(settings))


def _workers_on_this_host(settings: ShardSettings) -> int:
    host, _ = _worker_identity()
    return settings.workers_per_host.get(host or "", 1) or 1


def worker_model(settings: ShardSettings) -> tuple[Any, dict, Any, int]:
    """The cached (model, meta, torch device, load count) of this process for the settings."""
    key = (settings.checkpoint, settings.model_id, settings.device)
    with _MODEL_LOCK:
        hit = _MODELS.get(key)
        if hit is None:
            model, meta, tdev = _load_model(settings)
            _MODELS.clear()  # one model per run: free the previous one before holding the next
            hit = _MODELS[key] = (model, meta, tdev)
            _MODEL_LOADS[key] += 1
        if hit[2].type == "cpu":
            # every shard: a later run on a long-lived cluster may ask for other threads
            n = _torch_threads(settings)
            if torch.get_num_threads() != n:
                torch.set_num_threads(n)
        return (*hit, _MODEL_LOADS[key])


def _load_model(settings: ShardSettings) -> tuple[Any, dict, torch.device]:
    """The checkpoint's model on this worker's device (its own GPU of several), in eval mode."""
    device = str(devices.resolve_device(settings.device))
    if device == "cuda" and torch.cuda.device_count() > 1:
        _, name = _worker_identity()
        device = f"cuda:{cluster.worker_gpu_index(name, torch.cuda.device_count())}"
    if device != "cpu":
        torch.backends.cudnn.benchmark = True  # fixed batch shapes: pick kernels once
    model, meta = load_checkpoint(settings.checkpoint, map_location="cpu")
    if meta.get("model_id") != settings.model_id:
        raise CheckpointError(
            f"{settings.checkpoint}: model_id changed during the run "
            f"({settings.model_id} -> {meta.get('model_id')}); rerun classify-archive"
        )
    tdev = torch.device(device)
    return model.to(tdev).eval(), meta, tdev


def model_load_counts() -> dict[tuple[str, str, str], int]:
    """How often this process loaded each checkpoint (tests: one load per worker)."""
    return dict(_MODEL_LOADS)


def _decode_pool(n: int) -> ThreadPoolExecutor:
    pool = _POOLS.get(n)
    if pool is None:
        pool = _POOLS[n] = ThreadPoolExecutor(n, thread_name_prefix="aurora-decode")
    return pool


def _batch_buffers(bs: int, crop: int, cuda: bool) -> list[tuple[Any, np.ndarray]]:
    """Two reusable batch buffers (torch tensor, numpy view) per worker thread.

    Decode threads write frames straight into them (no serial np.stack), one filling while the
    other is classified. float32, as preprocess() returns (a float16 buffer would cost the decode
    threads a cast per frame); pinned on GPU workers, for asynchronous copies.
    """
    # Per thread: a worker with several Dask threads may run shards side by side.
    key = (threading.get_ident(), bs, crop, cuda)
    bufs = _BUFFERS.get(key)
    if bufs is None:
        bufs = []
        for _ in range(2):
            t = torch.empty((bs, crop, crop), dtype=torch.float32, pin_memory=cuda)
            bufs.append((t, t.numpy()))
        _BUFFERS[key] = bufs
    return bufs


def _calibration(settings: ShardSettings, time_utc: pd.Timestamp) -> Any:
    """The station calibration for a frame time, with the dark frame of its date when available."""
    dark_path = None
    if (
        settings.dark_dir
        and not settings.preprocessed
        and settings.station.preprocess.dark_subtract
    ):
        p = dark_for_time(Path(settings.dark_dir), time_utc)
        dark_path = str(p) if p is not None else None
    # The whole (frozen) station: a long-lived worker may serve runs with other geometries.
    key = (dark_path, settings.station, settings.preprocessed)
    with _CALIB_LOCK:
        calib = _CALIBS.get(key)
        if calib is None:
            dark = read_frame(dark_path) if dark_path else None
            calib = _CALIBS[key] = calibration_from_station(
                settings.station, dark=dark, dtype="float32"
            )
        return calib


def decode_frame(
    abspath: str, frame: int, time_utc: pd.Timestamp, settings: ShardSettings
) -> np.ndarray:
    """Read a frame and preprocess it like the preprocess stage: float32 (crop, crop) in [0, 1]."""
    arr = read_frame(abspath, frame)
    st = settings.station
    if settings.preprocessed and arr.shape != (st.crop_size, st.crop_size):
        raise FrameGeometryError(
            abspath,
            f"frame is {'x'.join(map(str, arr.shape))}, but --preprocessed frames of station "
            f"{st.code} are {st.crop_size}x{st.crop_size} (drop --preprocessed for raw frames)",
        )
    # preprocess() refuses other geometries itself (FrameGeometryError naming the file).
    out = preprocess(arr, _calibration(settings, time_utc), source=abspath)
    return np.asarray(out, dtype=np.float32)


def predict_batch(
    model: Any,
    batch: Any,
    input_size: int,
    device: Any,
    features: bool = False,
    in_chans: int = 1,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Softmax probabilities (B, 4) float32, FC7 features (B, D) float16 (or None) and sky
    levels (B,) float32 (:func:`pipeline.models.sky_level`) of a batch.

    ``batch``: (B, H, W) preprocessed frames in [0, 1], a numpy array or a (pinned) CPU tensor.
    """
    cuda = device.type == "cuda"
    if cuda:
        # Resize and normalise on the GPU: on the host they would cap a GPU worker's rate.
        t = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(batch)
        x = to_model_input(t.to(device, non_blocking=True), input_size, in_chans)
    else:
        x = to_model_input(batch, input_size, in_chans)
    # bf16 autocast on GPU only: on CPU it is slower and would break the 1e-5 agreement.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    feats = None
    with torch.inference_mode(), autocast:
        if features and hasattr(model, "head"):
            feats = model.features(x)  # FC7 once; the FC8 head on it gives the same logits
            logits = model.head(feats)
        else:
            logits = model(x)
            feats = model.features(x) if features else None
    probs = torch.softmax(logits.float(), dim=1).cpu().numpy().astype(np.float32)
    f16 = feats.float().cpu().numpy().astype(np.float16) if feats is not None else None
    sky = sky_level(x).cpu().numpy().astype(np.float32)
    return probs, f16, sky


def ut_to_mlt_hours(times: pd.DatetimeIndex, station: StationConfig) -> np.ndarray:
    """MLT (hours in [0, 24)) of each frame time by the station's MLT method."""
    return np.asarray(ut_to_mlt(times, station), dtype=np.float64)


@dataclass(frozen=True)
class _ShardFrames:
    """The frames of one shard task, as the driver sent them."""

    paths: Sequence[str]
    abspaths: Sequence[str]
    frames: Sequence[int]
    times: pd.DatetimeIndex
    #: the frames' indices in the frame store, read instead of decoding ``abspaths``.
    rows: Sequence[int] | None = None

    def __len__(self) -> int:
        return len(self.paths)


class _BatchFeeder:
    """Fills a shard's batches into the two batch buffers in the decode pool, one batch ahead.

    Files are decoded one frame per pool task (PIL, zlib and numpy release the GIL); a frame
    store is read one batch per task, whole chunks at a time.
    """

    def __init__(
        self, frames: _ShardFrames, settings: ShardSettings, device: Any, side: int
    ) -> None:
        self.frames = frames
        self.settings = settings
        self.bs = settings.batch_size
        self.store = settings.store if frames.rows is not None else None
        self.pool = _decode_pool(max(1, self._decode_threads(device)))
        self.bufs = _batch_buffers(self.bs, side, device.type == "cuda")

    def _decode_threads(self, device: Any) -> int:
        if self.settings.decode_threads:
            return self.settings.decode_threads
        if self.store:
            return 1
        if device.type == "cpu":
            return _torch_threads(self.settings)
        return usable_cores() // _workers_on_this_host(self.settings)

    def tensor(self, start: int) -> Any:
        """The torch buffer that holds the batch starting at ``start``."""
        return self.bufs[(start // self.bs) % 2][0]

    def submit(self, start: int) -> list[Future]:
        """Start filling the batch at ``start`` (none past the end)."""
        n = len(self.frames)
        if start >= n:
            return []
        arr = self.bufs[(start // self.bs) % 2][1]
        if self.store:
            return [self.pool.submit(self._read, start, arr)]
        stop = min(n, start + self.bs)
        return [self.pool.submit(self._decode, i, arr[i - start]) for i in range(start, stop)]

    def outcomes(self, futs: list[Future]) -> list[AuroraError | None]:
        """Per frame of a submitted batch: None when it is in the buffer, else its error."""
        return futs[0].result() if self.store else [fut.result() for fut in futs]

    def _decode(self, i: int, dst: np.ndarray) -> AuroraError | None:
        f = self.frames
        try:
            dst[...] = decode_frame(f.abspaths[i], int(f.frames[i]), f.times[i], self.settings)
        except AuroraError as exc:  # per-frame problems: recorded, the shard goes on
            return exc
        except (OSError, ValueError) as exc:  # e.g. a file that vanished or a truncated stream
            return FrameReadError(f.abspaths[i], f"{type(exc).__name__}: {exc}")
        return None

    def _read(self, start: int, dst: np.ndarray) -> list[None]:
        stop = min(len(self.frames), start + self.bs)
        rows = np.asarray(self.frames.rows[start:stop], dtype=np.int64)  # type: ignore[index]
        framestore.read_rows(self.store, rows, dst)
        return [None] * (stop - start)


@dataclass
class _Classified:
    """What the model made of a shard's frames."""

    keep: list[int] = field(default_factory=list)
    probs: list[np.ndarray] = field(default_factory=list)
    feats: list[np.ndarray] = field(default_factory=list)
    sky: list[np.ndarray] = field(default_factory=list)
    errors: list[tuple[str, int, str, str]] = field(default_factory=list)
    t_decode: float = 0.0
    t_model: float = 0.0


def _classify_frames(
    model: Any, meta: dict, device: Any, frames: _ShardFrames, feeder: _BatchFeeder
) -> _Classified:
    """Run the model over the feeder's batches while it fills the next one."""
    input_size = int(meta.get("input_size", 227))
    in_chans = int(meta.get("in_chans", 1))
    features = feeder.settings.features
    bs, n = feeder.bs, len(frames)
    out = _Classified()
    pending, futs = feeder.submit(0), []
    try:
        for start in range(0, n, bs):
            futs, pending = pending, feeder.submit(start + bs)
            td = time.perf_counter()
            done = feeder.outcomes(futs)
            ok = [j for j, res in enumerate(done) if res is None]
            for j, res in enumerate(done):
                if res is not None:
                    i = start + j
                    out.errors.append(
                        (frames.paths[i], int(frames.frames[i]), type(res).__name__, str(res))
                    )
            tm = time.perf_counter()
            out.t_decode += tm - td
            if ok:
                tensor = feeder.tensor(start)
                batch = tensor[: len(done)] if len(ok) == len(done) else tensor[ok]
                p, f, sky = predict_batch(model, batch, input_size, device, features, in_chans)
                out.probs.append(p)
                out.sky.append(sky)
                if f is not None:
                    out.feats.append(f)
                out.keep.extend(start + j for j in ok)
            out.t_model += time.perf_counter() - tm
    finally:
        # A shard that fails must not leave decodes running: they write into the buffers the
        # retry of this shard (on this worker) will use.
        for fut in [*futs, *pending]:
            fut.cancel()
        wait([*futs, *pending])
    return out


def _predictions_table(
    frames: _ShardFrames, got: _Classified, settings: ShardSettings
) -> pd.DataFrame:
    """The shard's predictions (PREDICTIONS_SCHEMA columns), in the order of its frames."""
    probs = np.concatenate(got.probs) if got.probs else np.zeros((0, len(CLASSES)), "f4")
    sky = np.concatenate(got.sky) if got.sky else np.zeros(0, "f4")
    k = np.asarray(got.keep, dtype=np.int64)
    n = len(frames)
    labels = pd.Categorical.from_codes(probs.argmax(axis=1), categories=list(CLASSES))
    df = pd.DataFrame(
        {
            "path": [frames.paths[i] for i in got.keep],
            "frame": np.asarray(frames.frames, dtype=np.int16)[k] if n else np.zeros(0, np.int16),
            "time_utc": frames.times[k],
            "mlt": ut_to_mlt_hours(frames.times[k], settings.station),
            "label": labels,
            **{c: probs[:, j] for j, c in enumerate(PROB_COLUMNS)},
            "sky_level": sky,
            "model_id": settings.model_id,
        }
    )
    return df


def _write_shard(
    shard: int, df: pd.DataFrame, got: _Classified, model: Any, settings: ShardSettings
) -> None:
    """The features first, the parquet file last: its presence means the shard is complete."""
    out = Path(settings.out_dir)
    if settings.features:
        dim = int(getattr(model, "feature_dim", 4096))
        feats = np.concatenate(got.feats) if got.feats else np.zeros((0, dim), np.float16)
        with atomic_path(features_path(out, shard)) as tmp, open(tmp, "wb") as fh:
            np.save(fh, feats)
    st = settings.station
    meta = predictions_metadata(st.code, settings.model_id, st.mlt.method)
    write_table(df, shard_path(out, shard), PREDICTIONS_SCHEMA, meta)


def classify_shard(
    shard: int,
    paths: Sequence[str],
    abspaths: Sequence[str],
    frames: Sequence[int],
    times_ns: Sequence[int],
    settings: ShardSettings,
    rows: Sequence[int] | None = None,
) -> ShardResult:
    """Classify one shard on this worker and write its predictions (and features) atomically.

    The Dask task of classify-archive. ``rows``: the frames' indices in ``settings.store``, read
    chunk by chunk instead of decoding ``abspaths`` (then unused).
    """
    t0 = time.perf_counter()
    model, meta, device, loads = worker_model(settings)
    times = pd.to_datetime(np.asarray(times_ns, dtype="int64"), utc=True)
    todo = _ShardFrames(paths, abspaths, frames, times, rows)
    side = int(meta.get("input_size", 227)) if rows is not None and settings.store else None
    feeder = _BatchFeeder(todo, settings, device, side or settings.station.crop_size)
    got = _classify_frames(model, meta, device, todo, feeder)
    df = _predictions_table(todo, got, settings)
    _write_shard(shard, df, got, model, settings)
    counts = Counter(df["label"].astype(str)) if len(df) else Counter()
    return ShardResult(
        shard=shard,
        n_frames=len(todo),
        n_predicted=len(df),
        class_counts={c: int(counts.get(c, 0)) for c in CLASSES},
        errors=got.errors,
        worker_pid=os.getpid(),
        model_loads=loads,
        t_decode=got.t_decode,
        t_model=got.t_model,
        t_wall=time.perf_counter() - t0,
    )


# =============================================================================== planning (pure)


def manifest_hash(manifest: pd.DataFrame) -> str:
    """A content hash of the manifest's (path, frame, time) list, independent of its row order."""
    keys = manifest[["path", "frame", "time_utc"]].sort_values(["time_utc", "path", "frame"])
    ns = pd.to_datetime(keys["time_utc"], utc=True).astype("int64").astype(str)
    lines = keys["path"].astype(str) + "\t" + keys["frame"].astype(int).astype(str) + "\t" + ns
    h = hashlib.sha256()
    for chunk in range(0, len(lines), 100_000):
        h.update(("\n".join(lines.iloc[chunk : chunk + 100_000]) + "\n").encode())
    return h.hexdigest()[:16]


def remaining_frames(manifest: pd.DataFrame, covered: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``manifest`` whose (path, frame) is not in ``covered``, in time order."""
    m = manifest.sort_values(["time_utc", "path", "frame"], kind="stable")
    if len(covered) == 0 or len(m) == 0:
        return m.reset_index(drop=True)
    c = covered[["path", "frame"]].astype({"path": str, "frame": "int64"}).drop_duplicates()
    key = m[["path", "frame"]].astype({"path": str, "frame": "int64"})
    hit = key.merge(c, how="left", on=["path", "frame"], indicator=True)["_merge"].to_numpy()
    return m[hit == "left_only"].reset_index(drop=True)


def plan_shards(
    frames: pd.DataFrame, shard_size: int, first_shard: int = 0
) -> list[tuple[int, pd.DataFrame]]:
    """Consecutive chunks of ``shard_size`` frames numbered from ``first_shard``."""
    if shard_size < 1:
        raise InputError(f"--shard-size must be at least 1, got {shard_size}")
    return [
        (first_shard + k, frames.iloc[s : s + shard_size])
        for k, s in enumerate(range(0, len(frames), shard_size))
    ]


def parse_since(since: str | pd.Timestamp | None) -> pd.Timestamp | None:
    """``--since`` as a UTC timestamp (naive values are UTC)."""
    if since is None or since == "":
        return None
    try:
        ts = pd.Timestamp(since)
    except (ValueError, TypeError):
        raise InputError(
            f"--since {since!r}: not a date/time; use e.g. 2004-12-01 or 2004-12-01T06:00"
        ) from None
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


# =============================================================================== output folder


def _wipe(out: Path) -> None:
    """--overwrite: forget every shard, feature file, run record and classify error of ``out``."""
    for p in shard_files(out).values():
        p.unlink()
    if (out / FEATURES_DIR).is_dir():
        for p in (out / FEATURES_DIR).glob("shard-*.npy"):
            p.unlink()
    (out / RUN_FILE).unlink(missing_ok=True)
    err = read_errors(out)
    if len(err):
        write_table(err[err["stage"] != STAGE], out / ERRORS_FILE, ERRORS_SCHEMA)


def _run_lock(out: Path) -> contextlib.AbstractContextManager[None]:
    """One driver per predictions folder: a second run would delete the first one's new shards."""
    return exclusive_lock(out / LOCK_FILE, f"{out}: another classify-archive run is writing here")


def _one_driver_per_folder(fn: Any) -> Any:
    """Run ``fn(source, checkpoint, out, ...)`` holding the lock of the predictions folder.

    Another stage's folder is refused before anything (the lock file too) is created in it.
    """

    @functools.wraps(fn)
    def locked(source: Any, checkpoint: Any, out: Any, **kwargs: Any) -> Any:
        out = Path(out).resolve()
        if out.is_dir():
            read_run(out)  # a damaged record: the error that says so
        refuse_foreign_out(out, COMMAND)
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        with _run_lock(out):
            try:
                return fn(source, checkpoint, out, **kwargs)
            except BaseException:
                # A run refused before writing anything leaves no folder behind (tidied while
                # the lock is held, so no other run can be starting in it).
                if created and {p.name for p in out.iterdir()} <= {LOCK_FILE}:
                    (out / LOCK_FILE).unlink(missing_ok=True)
                    out.rmdir()
                raise

    return locked


class _ErrorBook:
    """_errors.parquet of a run: new rows merged in, retried ShardFailed rows removed on success."""

    def __init__(self, path: Path, retry_errors: bool = False) -> None:
        self.path = path
        self.retry_errors = retry_errors
        self.table = read_errors(path.parent).astype({"frame": "int64"})

    def _retried(self) -> pd.Series:
        t = self.table
        mine = t["stage"] == STAGE
        return mine if self.retry_errors else mine & (t["error"] == SHARD_FAILED)

    def covered(self) -> pd.DataFrame:
        """(path, frame) of frames already settled by a per-frame error (not retried)."""
        t = self.table
        return t[(t["stage"] == STAGE) & ~self._retried()][["path", "frame"]]

    def retried_keys(self) -> set[tuple[str, int]]:
        """(path, frame) of error rows this run classifies again (dropped when they succeed)."""
        t = self.table[self._retried()]
        return set(zip(t["path"].astype(str), t["frame"].astype(int)))

    def replace_scan_rows(self, rows: pd.DataFrame) -> None:
        """The source's scan errors replace an earlier run's (a repaired file leaves the table)."""
        table = replace_stage_errors(self.path, rows, SCAN_STAGE)
        self.table = table.astype({"frame": "int64"}).reset_index(drop=True)

    def update(self, add: pd.DataFrame, drop: set[tuple[str, int]]) -> None:
        t = self.table
        if drop:
            mask = (t["stage"] == STAGE) & pd.Series(
                [(p, int(f)) in drop for p, f in zip(t["path"], t["frame"])], index=t.index
            )
            t = t[~mask]
        if len(add):
            t = pd.concat([t, add.astype({"frame": "int64"})], ignore_index=True)
            t = t.drop_duplicates(subset=["path", "frame", "stage"], keep="last")
        self.table = t.reset_index(drop=True)
        write_table(self.table, self.path, ERRORS_SCHEMA)


# =============================================================================== driver


@dataclass
class ClassifySummary:
    """What a classify-archive run did (printed by the CLI, returned to callers and tests)."""

    out: str
    model_id: str
    manifest_frames: int
    already_done: int
    frames_planned: int
    frames_classified: int = 0
    frames_errors: int = 0
    shards_submitted: int = 0
    shards_failed: int = 0
    wall_s: float = 0.0
    class_counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLASSES, 0))
    #: worker pid -> model loads of this checkpoint reported by that worker (max over its shards).
    model_loads: dict[int, int] = field(default_factory=dict)
    t_decode_s: float = 0.0
    t_model_s: float = 0.0
    #: seconds from the first shard submitted to the last result (no cluster start, no planning).
    compute_s: float = 0.0
    #: frames in _errors.parquet from earlier runs, not tried again (see --retry-errors).
    earlier_errors: int = 0
    #: "path: message" of the first frame this run could not classify.
    first_error: str | None = None
    #: planned frames that were in _errors.parquet before (failed shards, --retry-errors).
    frames_retried: int = 0
    #: files named like frames that the scan could not list as frames (no time, broken link...).
    scan_errors: int = 0

    @property
    def nothing_new_succeeded(self) -> bool:
        """New frames were planned and not one was classified (a run-level mistake, likely)."""
        return self.frames_planned > self.frames_retried and not self.frames_classified

    @property
    def frames_per_s(self) -> float:
        """Frames handled (classified or in errors) per second of wall time."""
        done = self.frames_classified + self.frames_errors
        return done / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def steady_frames_per_s(self) -> float:
        """Frames handled per second of ``compute_s`` (cluster start and planning excluded)."""
        done = self.frames_classified + self.frames_errors
        return done / self.compute_s if self.compute_s > 0 else 0.0

    def text(self) -> str:
        """A human-readable summary block."""
        earlier = (
            f"; {self.earlier_errors} frames in _errors.parquet from earlier runs "
            "(--retry-errors tries them again)"
            if self.earlier_errors
            else ""
        )
        if self.scan_errors:
            earlier += (
                f"; {self.scan_errors} files named like frames are not frames "
                "(no time, unreadable, broken link or folder: _errors.parquet, stage scan)"
            )
        if self.frames_planned == 0:
            if self.manifest_frames == 0:
                return "nothing to do: no frame of the manifest is newer than --since"
            return (
                f"nothing to do: all {self.already_done} frames of the manifest are already "
                f"classified in {self.out} (model {self.model_id}){earlier}"
            )
        counts = ", ".join(f"{c} {n}" for c, n in self.class_counts.items())
        return "\n".join(
            [
                f"classified {self.frames_classified} frames, {self.frames_errors} in errors "
                f"({self.shards_submitted} shards, {self.shards_failed} failed), "
                f"{self.already_done} already done{earlier}",
                f"wall time {self.wall_s:.1f} s, {self.frames_per_s:.1f} frames/s "
                f"({self.steady_frames_per_s:.1f} frames/s once the cluster was up)",
                f"per class: {counts}",
                f"predictions: {self.out}",
            ]
        )

    def add_result(self, res: ShardResult) -> None:
        """Count a shard a worker classified."""
        if res.errors and self.first_error is None:
            self.first_error = f"{res.errors[0][0]}: {res.errors[0][3]}"
        self.shards_submitted += 1
        self.frames_classified += res.n_predicted
        self.frames_errors += len(res.errors)
        for c, n in res.class_counts.items():
            self.class_counts[c] += n
        pid = res.worker_pid
        self.model_loads[pid] = max(res.model_loads, self.model_loads.get(pid, 0))
        self.t_decode_s += res.t_decode
        self.t_model_s += res.t_model

    def add_failed_shard(self, n_frames: int, reason: str) -> None:
        """Count a shard that failed after its retries (its frames go to the errors table)."""
        if self.first_error is None:
            self.first_error = reason
        self.shards_submitted += 1
        self.shards_failed += 1
        self.frames_errors += n_frames


class _Recorder:
    """Takes a run's shard results and failures into its run record and errors table.

    ``_run.json`` and ``_errors.parquet`` are rewritten at most every FLUSH_S seconds (per shard
    it would be quadratic in the archive size). Errors reach disk before the shards that reported
    them count as done; a crash loses at most FLUSH_S of finished shards (the rerun redoes them).
    """

    def __init__(
        self,
        folder: OutputFolder,
        shards: dict[str, Any],
        runs: list[dict[str, Any]],
        book: _ErrorBook,
        summary: ClassifySummary,
    ) -> None:
        self.folder = folder
        #: _run.json's done shards ("000123" -> counts) and runs (one entry per run).
        self.shards = dict(shards)
        self.runs = list(runs)
        self.book = book
        self.summary = summary
        self.entry: dict[str, Any] = {}
        self.retries = 0
        self._pending: dict[int, pd.DataFrame] = {}
        self._retried = book.retried_keys()
        self._new_errors: list[pd.DataFrame] = []
        self._drop_errors: set[tuple[str, int]] = set()
        self._last_flush = time.monotonic()

    def write(self, finished: bool) -> None:
        """Rewrite _run.json now (``finished`` only once every shard is in place)."""
        write = self.folder.finish if finished else self.folder.begin
        write(shards=self.shards, runs=self.runs)

    def start(
        self, shards: list[tuple[int, pd.DataFrame]], entry: dict[str, Any], retries: int
    ) -> None:
        """Record this run as under way (finished: false) before its first shard is submitted."""
        self._pending = dict(shards)
        self.entry = entry
        self.retries = retries
        self.runs.append(entry)
        self.write(finished=False)

    def flush(self, force: bool = False) -> None:
        """Write the errors and done shards gathered so far (throttled unless ``force``)."""
        if not force and time.monotonic() - self._last_flush < FLUSH_S:
            return
        if self._new_errors or self._drop_errors:
            new = self._new_errors
            add = pd.concat(new, ignore_index=True) if new else self.book.table[:0]
            self.book.update(add, self._drop_errors)
            self._new_errors, self._drop_errors = [], set()
        self.write(finished=False)
        self._last_flush = time.monotonic()

    def on_result(self, s: int, res: ShardResult) -> None:
        """A shard a worker wrote: its frame errors, and its entry among the done shards."""
        df = self._pending.pop(s)
        if res.errors:
            rows = [(p, f, STAGE, e, m) for p, f, e, m in res.errors]
            self._new_errors.append(pd.DataFrame(rows, columns=ERRORS_SCHEMA.names))
        if self._retried:  # ShardFailed rows of an earlier run, now classified: forget them
            keys = set(zip(df["path"].astype(str), df["frame"].astype(int)))
            self._drop_errors.update(keys & self._retried)
            self._retried.difference_update(keys)
        self.shards[f"{s:06d}"] = {
            "frames": res.n_frames,
            "predicted": res.n_predicted,
            "errors": len(res.errors),
            "first": _iso(df["time_utc"].iloc[0]),
            "last": _iso(df["time_utc"].iloc[-1]),
            "worker_pid": res.worker_pid,
        }
        self.flush()
        self.summary.add_result(res)

    def on_error(self, s: int, exc: BaseException) -> None:
        """A shard that kept failing: its frames become ShardFailed rows, retried by the rerun."""
        df = self._pending.pop(s)
        reason = f"shard {s:06d}: {type(exc).__name__}: {exc}"
        log.error("shard %06d failed after %d retries: %s", s, self.retries, exc)
        rows = pd.DataFrame(
            {
                "path": df["path"].astype(str).to_numpy(),
                "frame": df["frame"].astype(int).to_numpy(),
                "stage": STAGE,
                "error": SHARD_FAILED,
                "message": reason[:500],
            }
        )
        self._new_errors.append(rows)
        # This run's own count: shard numbers are reused by later runs, so rows of
        # _errors.parquet cannot tell which run's frames are missing (occurrence reads it).
        self.entry["frames_failed"] = self.entry.get("frames_failed", 0) + len(df)
        shard_path(self.folder.path, s).unlink(missing_ok=True)
        self.summary.add_failed_shard(len(df), reason)
        self.flush()

    def finish(self) -> None:
        """Close this run's entry and mark the folder finished (after every shard is in)."""
        summary = self.summary
        self.entry.update(
            finished=_iso(pd.Timestamp.now(tz="UTC")),
            frames_classified=summary.frames_classified,
            frames_errors=summary.frames_errors,
            wall_s=round(summary.wall_s, 3),
            compute_s=round(summary.compute_s, 3),
        )
        self.write(finished=True)


@dataclass
class _Source:
    """The frames a run classifies and where they come from."""

    path: Path
    #: the StoreInfo of a frame store (pipeline.framestore), else None.
    store: Any
    station: StationConfig
    #: the frames after --since (a store's with their ``store_index``).
    manifest: pd.DataFrame
    #: files named like frames that are not classifiable frames (stage scan).
    scan_errors: pd.DataFrame
    #: frames of the whole manifest, before --since.
    n_manifest: int
    root: Any
    since: pd.Timestamp | None


@dataclass
class _Plan:
    """What a run does: the frames not covered yet, in shards numbered after the existing ones."""

    todo: pd.DataFrame
    shards: list[tuple[int, pd.DataFrame]]
    #: _run.json's entries of the done shards whose files are there.
    done: dict[str, Any]
    #: done shards whose files vanished (redone).
    lost: list[int]


def _read_source(
    source: str | os.PathLike,
    station: str | os.PathLike | StationConfig | None,
    ckpt: Path,
    meta: dict,
    preprocessed: bool,
    dark_dir: Any,
    since: str | pd.Timestamp | None,
) -> _Source:
    """The station, manifest and scan errors of an archive, manifest or frame store."""
    store = framestore.open_info(source) if framestore.is_store(source) else None
    if store is not None:
        st, manifest, scan_errors = _store_and_manifest(
            store, station, ckpt, meta, preprocessed, dark_dir
        )
    else:
        st, manifest, scan_errors = _station_and_manifest(source, station)
    if not len(manifest):
        raise InputError(
            f"{source}: no frames to classify (an empty manifest, or no file in it has a time "
            f"for station {st.code}); `aurora-pipeline scan` lists why"
        )
    n_manifest, root = len(manifest), manifest.attrs.get("root")
    since_ts = parse_since(since)
    if since_ts is not None:
        manifest = manifest[pd.to_datetime(manifest["time_utc"], utc=True) > since_ts]
    path = Path(source).resolve()
    return _Source(path, store, st, manifest, scan_errors, n_manifest, root, since_ts)


def _refuse_out_is_source(out: Path, src: _Source) -> None:
    if (src.root is not None and out == Path(src.root).resolve()) or (
        src.store and out == src.store.path
    ):
        raise InputError(
            f"--out {out} is the {'store' if src.store else 'archive'} itself; give the "
            "predictions a folder of their own"
        )


def _previous_run(
    out: Path, overwrite: bool, model_id: str, ckpt: Path, src: _Source
) -> dict[str, Any] | None:
    """The run record of an earlier run to resume (None: a fresh start; --overwrite wipes)."""
    run = read_run(out)
    if run is not None and overwrite:
        _wipe(out)
        return None
    if run is not None and run.get("model_id") != model_id:
        raise InputError(
            f"{out}: holds predictions of model {run.get('model_id')} "
            f"({run.get('checkpoint')}), not {model_id} ({ckpt}); refusing to mix models in one "
            "output: pass --overwrite to replace them or choose another --out"
        )
    if run is not None:
        _refuse_other_archive_or_station(out, run, src.root, src.station)
    return run


def _run_settings(
    previous: dict[str, Any] | None, meta: dict, ckpt: Path, src: _Source, shard_size: int
) -> dict[str, Any]:
    """What _run.json records besides its shards and runs: the folder's model and station (from
    its first run), and this run's checkpoint, archive, manifest and shard size."""
    first = previous or {
        "model_id": str(meta["model_id"]),
        "variant": meta.get("variant"),
        "station": src.station.code,
        # the whole station: occurrence computes MLT with it (a YAML path may not travel)
        "station_config": to_dict(src.station),
        # the sky levels of the model's labelled set: occurrence --min-sky model
        "train_sky_level": meta.get("sky_level"),
    }
    root = str(Path(src.root).resolve()) if src.root is not None else first.get("root")
    return {
        "model_id": first.get("model_id"),
        "checkpoint": str(ckpt),
        "variant": first.get("variant"),
        "station": first.get("station"),
        "station_config": first.get("station_config"),
        "train_sky_level": first.get("train_sky_level"),
        "root": root,
        "manifest_hash": manifest_hash(src.manifest),
        "manifest_frames": src.n_manifest,
        "shard_size": shard_size,
    }


def _plan_run(
    out: Path, previous: dict[str, Any] | None, book: _ErrorBook, src: _Source, shard_size: int
) -> _Plan:
    """Remove the strays of killed runs and plan the frames that no done shard or error covers."""
    done = done_shards(previous)
    remove_strays(out, done)
    files = shard_files(out)
    covered = [book.covered()]
    for s in sorted(done & set(files)):
        covered.append(pq.read_table(files[s], columns=["path", "frame"]).to_pandas())
    lost = sorted(done - set(files))  # a done shard whose file vanished is redone
    entries = {k: v for k, v in (previous or {}).get("shards", {}).items() if int(k) not in lost}
    todo = remaining_frames(src.manifest, pd.concat(covered, ignore_index=True))
    if src.store is not None:  # shards of consecutive store indices: whole chunks per read
        todo = todo.sort_values("store_index", kind="stable", ignore_index=True)
    first = max([int(k) for k in entries] + list(files), default=-1) + 1
    return _Plan(todo, plan_shards(todo, shard_size, first), entries, lost)


def _new_summary(
    out: Path, model_id: str, src: _Source, plan: _Plan, book: _ErrorBook, retry_errors: bool
) -> ClassifySummary:
    todo = plan.todo
    keys = set(zip(todo["path"].astype(str), todo["frame"].astype(int)))
    return ClassifySummary(
        out=str(out),
        model_id=model_id,
        manifest_frames=len(src.manifest),
        already_done=len(src.manifest) - len(todo),
        frames_planned=len(todo),
        earlier_errors=0 if retry_errors else len(book.covered()),
        scan_errors=len(src.scan_errors),
        frames_retried=len(keys & book.retried_keys()),
    )


def _run_entry(
    src: _Source, settings: dict[str, Any], plan: _Plan, **options: Any
) -> dict[str, Any]:
    """This run's entry in _run.json's ``runs``; ``options``: the classify settings it used."""
    return {
        "started": _iso(pd.Timestamp.now(tz="UTC")),
        "source": str(src.path),
        "manifest_hash": settings["manifest_hash"],
        "manifest_frames": src.n_manifest,
        "frames_considered": len(src.manifest),
        "since": _iso(src.since) if src.since is not None else None,
        "shard_size": settings["shard_size"],
        **options,
        "frames_planned": len(plan.todo),
        "shards_planned": [s for s, _ in plan.shards],
        "frames_failed": 0,
    }


def _resolve_darks(dark_dir: Any, src: _Source, preprocessed: bool) -> str | None:
    """The dark frames of raw frames (--dark-dir, else the archive's calib/), checked once."""
    st = src.station
    raw = src.store is None and not preprocessed  # a store's frames are preprocessed already
    if dark_dir is None and src.root is not None and raw and st.preprocess.dark_subtract:
        found = find_dark_dir(Path(src.root))
        dark_dir = str(found) if found is not None else None
    if dark_dir is None and raw and st.preprocess.dark_subtract:
        log.warning("no dark frames found (calib/ or --dark-dir): noise from the corners only")
    if dark_dir is not None and raw:
        _check_dark_size(Path(dark_dir), st)
        first = src.manifest["time_utc"].min() if len(src.manifest) else None
        if first is not None and (note := dark_coverage_note(dark_dir, first)):
            log.warning(note)
    return str(dark_dir) if dark_dir else None


def _connect(
    stack: contextlib.ExitStack,
    client: Any,
    scheduler: str | None,
    workers: int | None,
    device: str,
    local_device: str,
) -> tuple[Any, dict[str, float] | None, dict[str, Any]]:
    """The Dask client (a local cluster, or the scheduler's), the resources a shard task needs
    (a GPU where the workers declare them) and the workers' info."""
    resources = None
    if client is None:
        if scheduler is None:
            n_default, resources = _default_workers(local_device)
            client = stack.enter_context(
                cluster.dask_client(workers or n_default, 1, None, resources=resources)
            )
        else:
            client = stack.enter_context(cluster.dask_client(scheduler=scheduler))
    info = client.scheduler_info(n_workers=-1) if _accepts_n_workers(client) else None
    info = info or client.scheduler_info()
    wk = info.get("workers", {})
    if resources is None and device != "cpu":
        if any(w.get("resources", {}).get("GPU") for w in wk.values()):
            resources = {"GPU": 1}
    # run_windowed's as_completed() binds to the *current* client's event loop: make that ours
    # (a caller inside `with Client(...)` would otherwise lend its loop, which breaks when a
    # worker dies and a result must be re-gathered).
    stack.enter_context(client.as_current())
    return client, resources, wk


def _shard_settings(
    ckpt: Path, model_id: str, out: Path, src: _Source, workers: dict[str, Any], **kw: Any
) -> ShardSettings:
    """What every shard task gets besides its frames; ``kw``: the other ShardSettings fields."""
    per_host = Counter(a.split("://")[-1].rsplit(":", 1)[0] for a in workers)
    return ShardSettings(
        checkpoint=str(ckpt),
        model_id=model_id,
        out_dir=str(out),
        station=src.station,
        workers_per_host=dict(per_host),
        store=str(src.store.path) if src.store is not None else None,
        **kw,
    )


def _tasks(
    shards: list[tuple[int, pd.DataFrame]], settings: ShardSettings, store: Any
) -> Iterator[tuple[int, tuple, int]]:
    """(shard, classify_shard's arguments, frames) of each shard, made as they are submitted."""
    for s, df in shards:
        args = (
            s,
            df["path"].astype(str).tolist(),
            df["abspath"].astype(str).tolist(),
            df["frame"].astype(int).tolist(),
            pd.to_datetime(df["time_utc"], utc=True).astype("int64").tolist(),
            settings,
        )
        if store is not None:
            args += (df["store_index"].astype(int).tolist(),)
        yield s, args, len(df)


def _compute(
    client: Any,
    recorder: _Recorder,
    tasks: Iterator[tuple[int, tuple, int]],
    total: int,
    window: int,
    retries: int,
    resources: dict[str, float] | None,
) -> float:
    """Run the shard tasks on the cluster into the recorder; the seconds it took."""
    t = time.perf_counter()
    try:
        cluster.run_windowed(
            client,
            classify_shard,
            tasks,
            on_result=recorder.on_result,
            on_error=recorder.on_error,
            window=window,
            total=total,
            desc="classify",
            retries=retries,
            resources=resources,
        )
    finally:
        # Ctrl-C or a lost scheduler too: the shards finished so far count as done, so the
        # rerun does not classify them again.
        recorder.flush(force=True)
    return time.perf_counter() - t


@_one_driver_per_folder
def classify_archive(
    source: str | os.PathLike,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    station: str | os.PathLike | StationConfig | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    decode_threads: int | None = None,
    scheduler: str | None = None,
    dark_dir: str | os.PathLike | None = None,
    shard_size: int = 512,
    batch_size: int = 64,
    device: str = "auto",
    preprocessed: bool = False,
    since: str | pd.Timestamp | None = None,
    features: bool = False,
    overwrite: bool = False,
    retry_errors: bool = False,
    window: int | None = None,
    retries: int = 2,
    client: Any = None,
) -> ClassifySummary:
    """Classify every frame of an archive or manifest into ``out`` (resumable, see module doc).

    ``station``: a config, name or YAML path; None: the archive's calib/station.yaml, else yrs.
    ``retry_errors``: classify again the frames an earlier run recorded in _errors.parquet (a
    file repaired or finished copying since); they leave the errors table when they succeed.
    """
    t_start = time.perf_counter()
    ckpt = Path(checkpoint).resolve()
    meta = read_meta(ckpt)
    warn_if_unfinished(meta, ckpt)
    model_id = str(meta["model_id"])
    out = Path(out).resolve()
    src = _read_source(source, station, ckpt, meta, preprocessed, dark_dir, since)
    _refuse_out_is_source(out, src)
    previous = _previous_run(out, overwrite, model_id, ckpt, src)
    settings = _run_settings(previous, meta, ckpt, src, shard_size)
    with OutputFolder(out, COMMAND, settings) as folder:
        book = _ErrorBook(out / ERRORS_FILE, retry_errors)
        book.replace_scan_rows(src.scan_errors.sort_values(["path", "frame"], ignore_index=True))
        plan = _plan_run(out, previous, book, src, shard_size)
        summary = _new_summary(out, model_id, src, plan, book, retry_errors)
        recorder = _Recorder(folder, plan.done, (previous or {}).get("runs", []), book, summary)
        if not plan.shards:
            # Nothing to do: leave a finished _run.json untouched (its mtime tells workflows
            # nothing changed).
            if previous is None or plan.lost or previous.get("finished") is not True:
                recorder.write(finished=True)
            summary.wall_s = time.perf_counter() - t_start
            return summary
        # Run-level checks before _run.json records this run: a refused run must leave nothing
        # that a corrected rerun would trip over.
        darks = _resolve_darks(dark_dir, src, preprocessed)
        _warn_preprocess_mismatch(meta, src.station, ckpt)
        local = (
            str(devices.resolve_device(device)) if client is None and scheduler is None else device
        )
        options = dict(batch_size=batch_size, preprocessed=preprocessed, features=features)
        entry = _run_entry(src, settings, plan, device=device, **options)
        recorder.start(plan.shards, entry, retries)
        with contextlib.ExitStack() as stack:
            client, resources, wk = _connect(stack, client, scheduler, workers, device, local)
            shard_settings = _shard_settings(
                ckpt, model_id, out, src, wk, device=local, dark_dir=darks,
                torch_threads=threads_per_worker, decode_threads=decode_threads, **options,
            )  # fmt: skip
            tasks = _tasks(plan.shards, shard_settings, src.store)
            window = window or 2 * max(1, len(wk))
            summary.compute_s = _compute(
                client, recorder, tasks, len(plan.todo), window, retries, resources
            )
        remove_strays(out, set(map(int, recorder.shards)))
        summary.wall_s = time.perf_counter() - t_start
        recorder.finish()
    return summary


def _station_and_manifest(
    source: str | os.PathLike, station: str | os.PathLike | StationConfig | None
) -> tuple[StationConfig, pd.DataFrame, pd.DataFrame]:
    """The station (given, else the archive's calib/station.yaml, else yrs), the manifest and
    the scan's error rows (files named like frames that are not classifiable frames)."""
    if isinstance(station, StationConfig):
        return station, *load_manifest_and_errors(source, station)
    src = Path(source)
    if src.is_dir():
        st = resolve_station(station, src)
        return st, *load_manifest_and_errors(src, st)
    # A manifest: its archive root (in its metadata) may hold the station file.
    first = resolve_station(station, src.parent)
    manifest, errors = load_manifest_and_errors(src, first)
    root = manifest.attrs.get("root")
    if station is None and root is not None:
        st = resolve_station(None, Path(root))
        if st != first:
            manifest, errors = load_manifest_and_errors(src, st)
        return st, manifest, errors
    return first, manifest, errors


def _store_and_manifest(
    info: Any,
    station: str | os.PathLike | StationConfig | None,
    ckpt: Path,
    meta: dict,
    preprocessed: bool,
    dark_dir: Any,
) -> tuple[StationConfig, pd.DataFrame, pd.DataFrame]:
    """The station, the manifest (with ``store_index``) and the frames the store lacks (its
    errors table) of a frame store; one clear error when the model's input size is not its."""
    if preprocessed or dark_dir is not None:
        raise InputError(
            f"{info.path}: a frame store holds preprocessed frames; drop --preprocessed/--dark-dir"
        )
    framestore.check_input_size(info, int(meta.get("input_size", 227)), ckpt)
    st = resolve_station(None, None, info.station)
    if station is not None and resolve_station(station).code != st.code:
        raise InputError(
            f"{info.path}: holds frames of station {st.code}; drop --station (the store "
            "records its own) or classify the archive of the other station"
        )
    manifest = framestore.read_items(info.path, info)
    root = Path(info.root) if info.root else None
    manifest["abspath"] = [str(root / p) if root else p for p in manifest["path"]]
    manifest.attrs["root"] = info.root
    errors = read_errors_table(framestore.side_path(info.path, framestore.ERRORS_NAME))
    errors = errors.drop_duplicates(["path", "frame"]).reset_index(drop=True)
    return st, manifest, errors


def _check_dark_size(dark_dir: Path, st: StationConfig) -> None:
    """Dark frames of another camera size are a run-level mistake: one error, not one per frame."""
    darks = dark_frames(dark_dir)
    if not darks or not st.preprocess.dark_subtract:
        return
    shape = read_frame(darks[0][1]).shape
    if shape != (st.raw_size, st.raw_size):
        raise InputError(
            f"{darks[0][1]}: dark frame is {shape[0]}x{shape[1]} but station {st.code}'s raw "
            f"frames are {st.raw_size}x{st.raw_size}; pass the archive's --station (its "
            "calib/station.yaml) or another --dark-dir"
        )


def _refuse_other_archive_or_station(out: Path, run: dict, root: Any, st: StationConfig) -> None:
    """An output holds one archive's frames for one station: mixing would collide or mislead."""
    if run.get("station") not in (None, st.code):
        raise InputError(
            f"{out}: holds predictions for station {run['station']}, not {st.code}; pass "
            f"--station {run['station']} (or its YAML), or choose another --out, or --overwrite"
        )
    # Paths are stored relative to the archive root: frames of two archives would collide.
    if root is not None and run.get("root") and Path(root).resolve() != Path(run["root"]):
        raise InputError(
            f"{out}: holds predictions of the archive at {run['root']}, not {Path(root).resolve()}"
            " (frames are named relative to their archive); choose another --out, or --overwrite"
        )


def _warn_preprocess_mismatch(meta: dict, station: StationConfig, ckpt: Path) -> None:
    """One warning when the station preprocesses frames differently from the training data."""
    diff = preprocess_mismatch(meta, calibration_from_station(station).params())
    if diff:
        log.warning(
            "%s was trained on frames preprocessed otherwise than station %s does (%s): "
            "predictions may be biased; classify with the training station's settings or retrain",
            ckpt,
            station.code,
            "; ".join(diff),
        )


def _accepts_n_workers(client: Any) -> bool:
    try:
        return "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def print_summary(summary: ClassifySummary, file: Any = None) -> None:
    """Print the end-of-run summary (stderr by default, so stdout stays clean for pipes)."""
    print(summary.text(), file=file or sys.stderr)


def _default_workers(device: str) -> tuple[int, dict[str, float] | None]:
    """Several worker processes per GPU (each declaring resource GPU=1), else cores / 2.

    One process per GPU does not decode frames fast enough to keep the GPU busy: see
    ``cluster.workers_per_gpu`` (benchmarks/gpu_classify.sh compares the layouts).
    """
    if device.startswith("cuda"):
        # cuda:N names one GPU: its workers all use it (worker_model spreads only "cuda")
        n_gpu = 1 if ":" in device else max(1, torch.cuda.device_count())
        return n_gpu * cluster.workers_per_gpu(usable_cores(), n_gpu), {"GPU": 1}
    return cluster.default_workers(), None


def _iso(ts: pd.Timestamp) -> str:
    return pd.Timestamp(ts).isoformat()
