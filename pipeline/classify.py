"""classify-archive: distributed, resumable inference over a whole archive (DESIGN.md sections 3, 5).

The driver splits the manifest into shards of frames; only paths, frame indices and times travel
through the task graph, with the checkpoint PATH and a few settings. Each Dask worker loads the
model once (a per-process cache keyed by checkpoint path, model_id and device), decodes and
preprocesses frames in a small thread pool while the model runs the previous batch, and writes
its shard itself, atomically, as ``PRED_DIR/shards/shard-000123.parquet`` (PREDICTIONS_SCHEMA).
A frame store (:mod:`pipeline.framestore`, ``preprocess --format zarr``) is classified like an
archive of its frames, with the same paths, times and predictions: its shards are runs of store
indices, and workers read them chunk by chunk (the next batch while the model runs this one)
instead of decoding files.

Output folder (PRED_DIR), a Parquet dataset: ``PRED_DIR/shards`` holds nothing but the shards, so
any client (pandas, pyarrow, Dask, DuckDB, polars) opens it as the predictions table, and
everything else in PRED_DIR starts with ``_`` or ``.``, so pandas and pyarrow open PRED_DIR too:

- ``shards/shard-NNNNNN.parquet``: predictions, one row per classified frame, manifest order.
- ``_features/shard-NNNNNN.npy`` (``--features``): FC7 features, float16, shape (rows, 4096), in
  the same row order as the shard's parquet file (written before the parquet file, so a shard's
  parquet file implies its features).
- ``_errors.parquet``: frames that could not be classified (stage ``classify``), one row per
  frame with the reason. ``ShardFailed`` rows (a shard that kept raising or whose workers kept
  dying) are retried by the next run; per-frame errors (unreadable, wrong geometry) are not.
- ``_run.json``: model_id, checkpoint, manifest hash, shard size, the done shards and a history
  of runs. Rewritten atomically after every finished shard.

Folders of the earlier layout (shards, ``errors.parquet`` and ``features/`` at the top) are read
as they are; classify-archive moves them into this layout before it writes into one.

Resuming: a shard is done when its parquet file exists and ``_run.json`` lists it. A rerun reads
the (path, frame) keys of the done shards plus the per-frame error rows, and classifies only the
manifest frames not covered yet, in new shards numbered after the highest existing one. So a
rerun with the same inputs does no work, ``--since`` runs append, a crashed run resumes where it
stopped, and the union of the shards holds every frame once. Read the predictions back with
:func:`read_predictions` (only the shards ``_run.json`` vouches for: a crashed run may leave a
shard it did not record, which the next run removes) or with any Parquet reader.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.classes import CLASSES, PROB_COLUMNS
from pipeline.config import StationConfig, to_dict
from pipeline.errors import AuroraError, FrameGeometryError, FrameReadError, InputError
from pipeline.storage import (
    ERRORS_SCHEMA,
    PREDICTIONS_SCHEMA,
    atomic_path,
    empty_frame,
    exclusive_lock,
    interrupts_deferred,
    predictions_metadata,
    refuse_foreign_out,
    replace_stage_errors,
    write_table,
)
from pipeline.storage import read_errors as storage_read_errors

log = logging.getLogger(__name__)

STAGE = "classify"
SCAN_STAGE = "scan"
RUN_FILE = "_run.json"
#: The predictions dataset: a folder of shard files and nothing else.
SHARDS_DIR = "shards"
#: Not predictions: hidden from Parquet readers by the leading underscore.
ERRORS_FILE = "_errors.parquet"
FEATURES_DIR = "_features"
#: Names of the layout before PRED_DIR was a Parquet dataset (shards at the top), still read.
LEGACY_ERRORS_FILE = "errors.parquet"
LEGACY_FEATURES_DIR = "features"
#: error class of rows written for a whole shard that failed after its retries (retried by reruns).
SHARD_FAILED = "ShardFailed"
#: at most one rewrite of _run.json and _errors.parquet per this many seconds during a run.
FLUSH_S = 2.0
_SHARD_RE = re.compile(r"^shard-(\d{6,})\.parquet$")


def shard_name(shard: int) -> str:
    """File name of a shard's predictions: ``shard-000123.parquet``."""
    return f"shard-{shard:06d}.parquet"


def features_name(shard: int) -> str:
    """File name of a shard's FC7 features inside ``_features/``: ``shard-000123.npy``."""
    return f"shard-{shard:06d}.npy"


def shard_path(out: str | os.PathLike, shard: int) -> Path:
    """Where a shard's predictions are written: ``OUT/shards/shard-000123.parquet``."""
    return Path(out) / SHARDS_DIR / shard_name(shard)


def errors_path(out: str | os.PathLike) -> Path:
    """The errors table of a predictions folder (``errors.parquet`` in a folder of the old layout)."""
    new, old = Path(out) / ERRORS_FILE, Path(out) / LEGACY_ERRORS_FILE
    return old if old.is_file() and not new.exists() else new


def features_path(out: str | os.PathLike, shard: int) -> Path:
    """A shard's features file (in ``features/`` in a folder of the old layout)."""
    new = Path(out) / FEATURES_DIR / features_name(shard)
    old = Path(out) / LEGACY_FEATURES_DIR / features_name(shard)
    return old if old.is_file() and not new.exists() else new


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
    #: decoding threads per worker; None = as many as torch threads (CPU) or its share of the cores (GPU).
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


def _host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _worker_identity() -> tuple[str | None, Any]:
    """(host, name) of the Dask worker running this task, (None, None) outside a worker."""
    try:
        from distributed import get_worker

        w = get_worker()
    except (ImportError, ValueError):
        return None, None
    host = w.address.split("://")[-1].rsplit(":", 1)[0]
    return host, w.name


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` where CUDA is visible, else ``cpu``; a missing GPU is an error."""
    from pipeline.devices import resolve_device as resolve

    return str(resolve(device))


def _torch_threads(settings: ShardSettings) -> int:
    if settings.torch_threads:
        return settings.torch_threads
    host, _ = _worker_identity()
    per_host = settings.workers_per_host.get(host or "", 1) or 1
    return max(1, _host_cores() // per_host)


def worker_model(settings: ShardSettings) -> tuple[Any, dict, Any, int]:
    """The cached (model, meta, torch device, load count) of this process for the settings."""
    import torch

    from pipeline.checkpoint import load_checkpoint
    from pipeline.errors import CheckpointError

    key = (settings.checkpoint, settings.model_id, settings.device)
    with _MODEL_LOCK:
        hit = _MODELS.get(key)
        if hit is None:
            device = resolve_device(settings.device)
            if device == "cuda" and torch.cuda.device_count() > 1:
                from pipeline.cluster import worker_gpu_index

                _, name = _worker_identity()
                device = f"cuda:{worker_gpu_index(name, torch.cuda.device_count())}"
            if device != "cpu":
                torch.backends.cudnn.benchmark = True  # fixed batch shapes: pick kernels once
            model, meta = load_checkpoint(settings.checkpoint, map_location="cpu")
            if meta.get("model_id") != settings.model_id:
                raise CheckpointError(
                    f"{settings.checkpoint}: model_id changed during the run "
                    f"({settings.model_id} -> {meta.get('model_id')}); rerun classify-archive"
                )
            tdev = torch.device(device)
            model = model.to(tdev).eval()
            _MODELS.clear()  # one model per run: free the previous one before holding the next
            hit = _MODELS[key] = (model, meta, tdev)
            _MODEL_LOADS[key] += 1
        if hit[2].type == "cpu":
            # every shard: a later run on a long-lived cluster may ask for other threads
            n = _torch_threads(settings)
            if torch.get_num_threads() != n:
                torch.set_num_threads(n)
        return (*hit, _MODEL_LOADS[key])


def model_load_counts() -> dict[tuple[str, str, str], int]:
    """How often this process loaded each checkpoint (tests: one load per worker)."""
    return dict(_MODEL_LOADS)


def _decode_pool(n: int) -> ThreadPoolExecutor:
    pool = _POOLS.get(n)
    if pool is None:
        pool = _POOLS[n] = ThreadPoolExecutor(n, thread_name_prefix="aurora-decode")
    return pool


def _batch_buffers(bs: int, crop: int, cuda: bool) -> list[tuple[Any, np.ndarray]]:
    """Two reusable batch buffers (torch tensor, numpy view) per worker: decode threads write
    frames straight into them (no serial np.stack), one filling while the other is classified.
    float32, as preprocess() returns: a float16 buffer would halve the host-to-device bytes but
    costs the decode threads a 0.38 ms cast per 440x440 frame (numpy 2.4, no F16C), 8% of their
    work, while the copy is not the bottleneck. Pinned on GPU workers (asynchronous copies)."""
    import torch

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
    from pipeline.imageio import read_frame
    from pipeline.preprocess import calibration_from_station, dark_for_time

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
    """Read one frame and preprocess it like the preprocess stage: float32 (crop, crop) in [0, 1]."""
    from pipeline.imageio import read_frame
    from pipeline.preprocess import preprocess

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
) -> tuple[np.ndarray, np.ndarray | None]:
    """Softmax probabilities (B, 4) float32 (and FC7 features (B, D) float16) of a batch.

    ``batch``: (B, H, W) preprocessed frames in [0, 1], a numpy array or a (pinned) CPU tensor.
    """
    import torch

    from pipeline.models import to_model_input

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
    return probs, f16


def ut_to_mlt_hours(times: pd.DatetimeIndex, station: StationConfig) -> np.ndarray:
    """MLT (hours in [0, 24)) of each frame time by the station's MLT method."""
    from pipeline.mlt import ut_to_mlt

    return np.asarray(ut_to_mlt(times, station), dtype=np.float64)


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

    ``rows``: the frames' indices in ``settings.store``, read chunk by chunk instead of decoding
    ``abspaths`` (then unused).
    """
    t0 = time.perf_counter()
    model, meta, device, loads = worker_model(settings)
    input_size = int(meta.get("input_size", 227))
    in_chans = int(meta.get("in_chans", 1))
    n = len(paths)
    times = pd.to_datetime(np.asarray(times_ns, dtype="int64"), utc=True)
    cores = _host_cores()
    host, _ = _worker_identity()
    per_host = settings.workers_per_host.get(host or "", 1) or 1
    store = settings.store if rows is not None else None
    n_dec = settings.decode_threads or (
        1 if store else _torch_threads(settings) if device.type == "cpu" else cores // per_host
    )
    pool = _decode_pool(max(1, n_dec))
    bs = settings.batch_size
    side = input_size if store else settings.station.crop_size
    bufs = _batch_buffers(bs, side, device.type == "cuda")

    def decode(i: int, dst: np.ndarray) -> AuroraError | None:
        try:
            dst[...] = decode_frame(abspaths[i], int(frames[i]), times[i], settings)
        except AuroraError as exc:  # per-frame problems: recorded, the shard goes on
            return exc
        except (OSError, ValueError) as exc:  # e.g. a file that vanished or a truncated stream
            return FrameReadError(abspaths[i], f"{type(exc).__name__}: {exc}")
        return None

    def read(start: int, dst: np.ndarray) -> list[None]:
        from pipeline.framestore import read_rows

        stop = min(n, start + bs)
        read_rows(store, np.asarray(rows[start:stop], dtype=np.int64), dst)  # type: ignore[arg-type]
        return [None] * (stop - start)

    def submit(start: int) -> list:
        arr = bufs[(start // bs) % 2][1]
        if store:  # one read per batch: whole chunks of the store, no decoding
            return [pool.submit(read, start, arr)]
        return [pool.submit(decode, i, arr[i - start]) for i in range(start, min(n, start + bs))]

    def outcomes(futs: list) -> list[AuroraError | None]:
        return futs[0].result() if store else [fut.result() for fut in futs]

    errors: list[tuple[str, int, str, str]] = []
    keep: list[int] = []
    probs_parts: list[np.ndarray] = []
    feat_parts: list[np.ndarray] = []
    t_decode = t_model = 0.0
    pending = submit(0)
    futs: list = []
    try:
        for start in range(0, n, bs):
            futs = pending
            # Decode the next batch (into the other buffer) while the model runs this one; PIL,
            # zlib and numpy release the GIL.
            pending = submit(start + bs) if start + bs < n else []
            td = time.perf_counter()
            ok: list[int] = []
            done = outcomes(futs)
            for j, res in enumerate(done):
                if res is None:
                    ok.append(j)
                else:
                    i = start + j
                    errors.append((paths[i], int(frames[i]), type(res).__name__, str(res)))
            tm = time.perf_counter()
            t_decode += tm - td
            if ok:
                tensor = bufs[(start // bs) % 2][0]
                m = len(done)
                batch = tensor[:m] if len(ok) == m else tensor[ok]
                p, f = predict_batch(model, batch, input_size, device, settings.features, in_chans)
                probs_parts.append(p)
                if f is not None:
                    feat_parts.append(f)
                keep.extend(start + j for j in ok)
            t_model += time.perf_counter() - tm
    finally:
        # A shard that fails must not leave decodes running: they write into the buffers the
        # retry of this shard (on this worker) will use.
        for fut in [*futs, *pending]:
            fut.cancel()
        wait([*futs, *pending])

    probs = np.concatenate(probs_parts) if probs_parts else np.zeros((0, len(CLASSES)), "f4")
    k = np.asarray(keep, dtype=np.int64)
    labels = pd.Categorical.from_codes(probs.argmax(axis=1), categories=list(CLASSES))
    df = pd.DataFrame(
        {
            "path": [paths[i] for i in keep],
            "frame": np.asarray(frames, dtype=np.int16)[k] if n else np.zeros(0, np.int16),
            "time_utc": times[k],
            "mlt": ut_to_mlt_hours(times[k], settings.station),
            "label": labels,
            **{c: probs[:, j] for j, c in enumerate(PROB_COLUMNS)},
            "model_id": settings.model_id,
        }
    )
    out = Path(settings.out_dir)
    if settings.features:
        dim = int(getattr(model, "feature_dim", 4096))
        feats = np.concatenate(feat_parts) if feat_parts else np.zeros((0, dim), np.float16)
        with atomic_path(out / FEATURES_DIR / features_name(shard)) as tmp, open(tmp, "wb") as fh:
            np.save(fh, feats)
    # The parquet file last: its presence means the shard (and its features) is complete.
    st = settings.station
    meta = predictions_metadata(st.code, settings.model_id, st.mlt.method)
    write_table(df, shard_path(out, shard), PREDICTIONS_SCHEMA, meta)
    counts = Counter(labels.astype(str)) if len(df) else Counter()
    return ShardResult(
        shard=shard,
        n_frames=n,
        n_predicted=len(df),
        class_counts={c: int(counts.get(c, 0)) for c in CLASSES},
        errors=errors,
        worker_pid=os.getpid(),
        model_loads=loads,
        t_decode=t_decode,
        t_model=t_model,
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


def read_run(out: str | os.PathLike) -> dict | None:
    """The ``_run.json`` of a predictions folder, or None when there is none."""
    p = Path(out) / RUN_FILE
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{p}: not valid JSON ({exc}); delete it or pass --overwrite") from None


def _write_run(out: Path, run: dict) -> None:
    with atomic_path(out / RUN_FILE) as tmp:
        tmp.write_text(json.dumps(run, indent=1, sort_keys=False, default=str) + "\n")


def shard_files(out: str | os.PathLike) -> dict[int, Path]:
    """Shard number -> predictions file of a predictions folder (``shards/``, or the top of a
    folder of the old layout, or of a folder of shard files such as ``shards/`` itself)."""
    found = {}
    for folder in (Path(out), Path(out) / SHARDS_DIR):  # the new layout wins a number
        for p in folder.glob("shard-*.parquet"):
            m = _SHARD_RE.match(p.name)
            if m:
                found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def done_shard_files(out: str | os.PathLike) -> list[Path]:
    """The shard files ``_run.json`` vouches for, in shard order (a crashed run's strays are not).

    A folder of shard files without ``_run.json`` (made elsewhere) counts all of them.
    """
    run = read_run(out)
    files = shard_files(out)
    if run is None:
        return list(files.values())
    done = {int(k) for k in run.get("shards", {})}
    return [p for s, p in files.items() if s in done]


def read_predictions(out: str | os.PathLike, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """All predictions of a folder (the union of its done shards), in shard order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = done_shard_files(out)
    cols = list(columns) if columns else None
    if not files:
        df = empty_frame(PREDICTIONS_SCHEMA)
        return df[cols] if cols else df
    tables = [pq.read_table(f, columns=cols, schema=PREDICTIONS_SCHEMA) for f in files]
    return pa.concat_tables(tables).to_pandas()


def read_errors(out: str | os.PathLike) -> pd.DataFrame:
    """The errors table of a predictions folder (empty when there is none)."""
    return storage_read_errors(errors_path(out))


def upgrade_layout(out: Path) -> None:
    """Move a predictions folder of the old layout (shards, errors.parquet and features/ at the
    top) into the Parquet-dataset layout; renames only, so the files keep their mtimes."""
    moves = [(p, shard_path(out, s)) for s, p in shard_files(out).items() if p.parent == out]
    old_errors, old_features = out / LEGACY_ERRORS_FILE, out / LEGACY_FEATURES_DIR
    if old_errors.is_file() and not (out / ERRORS_FILE).exists():
        moves.append((old_errors, out / ERRORS_FILE))
    if old_features.is_dir():
        moves += [(p, out / FEATURES_DIR / p.name) for p in old_features.glob("shard-*.npy")]
    if not moves:
        return
    what = "moving %d files of the earlier layout into shards/, _errors.parquet, _features/"
    log.info("%s: " + what, out, len(moves))
    (out / SHARDS_DIR).mkdir(exist_ok=True)
    with interrupts_deferred():
        for src, dst in moves:
            dst.parent.mkdir(exist_ok=True)
            os.replace(src, dst)
    with contextlib.suppress(OSError):  # only when nothing else is left in it
        old_features.rmdir()


def _clean_stale(out: Path, done: set[int]) -> None:
    """Remove temporary files of killed writers and shard files no _run.json entry vouches for."""
    for folder in (out, out / SHARDS_DIR, out / FEATURES_DIR):
        for p in folder.glob(".shard-*.part"):
            p.unlink(missing_ok=True)
    for s, p in shard_files(out).items():
        if s not in done:
            log.info("removing %s: written by an interrupted run, not marked done", p.name)
            p.unlink(missing_ok=True)
            (out / FEATURES_DIR / features_name(s)).unlink(missing_ok=True)


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


LOCK_FILE = ".classify.lock"


def _run_lock(out: Path) -> contextlib.AbstractContextManager[None]:
    """One driver per predictions folder: a second run would delete the first one's new shards."""
    return exclusive_lock(out / LOCK_FILE, f"{out}: another classify-archive run is writing here")


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


def _default_workers(device: str) -> tuple[int, dict[str, float] | None]:
    """Several worker processes per GPU (each declaring resource GPU=1), else cores / 2.

    On one H200 a single worker with 15 decode threads reached 386 frames/s with the GPU idle
    (results/bench/gpu_classify.json): one process did not decode fast enough. See
    ``cluster.workers_per_gpu``; benchmarks/gpu_classify.sh measures both layouts side by side.
    """
    from pipeline.cluster import default_workers, workers_per_gpu

    if device.startswith("cuda"):
        import torch

        # cuda:N names one GPU: its workers all use it (worker_model spreads only "cuda")
        n_gpu = 1 if ":" in device else max(1, torch.cuda.device_count())
        return n_gpu * workers_per_gpu(_host_cores(), n_gpu), {"GPU": 1}
    return default_workers(), None


def _iso(ts: pd.Timestamp) -> str:
    return pd.Timestamp(ts).isoformat()


def _one_driver_per_folder(fn: Any) -> Any:
    """Run ``fn(source, checkpoint, out, ...)`` holding the lock of the predictions folder."""

    @functools.wraps(fn)
    def locked(source: Any, checkpoint: Any, out: Any, **kwargs: Any) -> Any:
        out = Path(out).resolve()
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
    from pipeline.checkpoint import read_meta, warn_if_unfinished

    t_start = time.perf_counter()
    ckpt = Path(checkpoint).resolve()
    meta = read_meta(ckpt)
    warn_if_unfinished(meta, ckpt)
    model_id = str(meta["model_id"])
    out = Path(out).resolve()

    store = _store_info(source)
    if store is not None:
        st, manifest, scan_errors = _store_and_manifest(
            store, station, ckpt, meta, preprocessed, dark_dir
        )
    else:
        st, manifest, scan_errors = _station_and_manifest(source, station)
    n_manifest = len(manifest)
    if not n_manifest:
        raise InputError(
            f"{source}: no frames to classify (an empty manifest, or no file in it has a time "
            f"for station {st.code}); `aurora-pipeline scan` lists why"
        )
    root = manifest.attrs.get("root")
    since_ts = parse_since(since)
    if since_ts is not None:
        manifest = manifest[pd.to_datetime(manifest["time_utc"], utc=True) > since_ts]
    mhash = manifest_hash(manifest)

    if (root is not None and out == Path(root).resolve()) or (store and out == store.path):
        raise InputError(
            f"--out {out} is the {'store' if store else 'archive'} itself; give the predictions "
            "a folder of their own"
        )
    refuse_foreign_out(out, (RUN_FILE,), "classify-archive")
    out.mkdir(parents=True, exist_ok=True)
    upgrade_layout(out)
    run = read_run(out)
    if run is not None and overwrite:
        _wipe(out)
        run = None
    if run is not None and run.get("model_id") != model_id:
        raise InputError(
            f"{out}: holds predictions of model {run.get('model_id')} "
            f"({run.get('checkpoint')}), not {model_id} ({ckpt}); refusing to mix models in one "
            "output: pass --overwrite to replace them or choose another --out"
        )
    if run is not None:
        _refuse_other_archive_or_station(out, run, root, st)
    fresh = run is None
    if run is None:
        run = {
            "stage": STAGE,
            "model_id": model_id,
            "checkpoint": str(ckpt),
            "variant": meta.get("variant"),
            "station": st.code,
            # the whole station: occurrence computes MLT with it (a YAML path may not travel)
            "station_config": to_dict(st),
            "shards": {},
            "runs": [],
        }
    done = {int(k) for k in run["shards"]}
    _clean_stale(out, done)
    book = _ErrorBook(out / ERRORS_FILE, retry_errors)
    book.replace_scan_rows(scan_errors.sort_values(["path", "frame"], ignore_index=True))
    files = shard_files(out)
    covered_parts = [book.covered()]
    if files:
        import pyarrow.parquet as pq

        for s in sorted(done & set(files)):
            covered_parts.append(pq.read_table(files[s], columns=["path", "frame"]).to_pandas())
    # A done shard whose file vanished is redone.
    lost = sorted(done - set(files))
    for s in lost:
        run["shards"].pop(f"{s:06d}", None)
    covered = pd.concat(covered_parts, ignore_index=True)
    todo = remaining_frames(manifest, covered)
    if store is not None:  # shards of consecutive store indices: whole chunks per read
        todo = todo.sort_values("store_index", kind="stable", ignore_index=True)
    first = max([int(k) for k in run["shards"]] + [s for s in files], default=-1) + 1
    shards = plan_shards(todo, shard_size, first)

    summary = ClassifySummary(
        out=str(out),
        model_id=model_id,
        manifest_frames=len(manifest),
        already_done=len(manifest) - len(todo),
        frames_planned=len(todo),
        earlier_errors=0 if retry_errors else len(book.covered()),
        scan_errors=len(scan_errors),
        frames_retried=len(
            set(zip(todo["path"].astype(str), todo["frame"].astype(int))) & book.retried_keys()
        ),
    )
    run_entry = {
        "started": _iso(pd.Timestamp.now(tz="UTC")),
        "source": str(Path(source).resolve()),
        "manifest_hash": mhash,
        "manifest_frames": n_manifest,
        "frames_considered": len(manifest),
        "since": _iso(since_ts) if since_ts is not None else None,
        "shard_size": shard_size,
        "batch_size": batch_size,
        "device": device,
        "preprocessed": preprocessed,
        "features": features,
        "frames_planned": len(todo),
        "shards_planned": [s for s, _ in shards],
        "frames_failed": 0,
    }
    run.update(
        root=str(Path(root).resolve()) if root is not None else run.get("root"),
        manifest_hash=mhash,
        manifest_frames=n_manifest,
        shard_size=shard_size,
        checkpoint=str(ckpt),
    )
    if not shards:
        # Nothing to do: leave _run.json untouched (its mtime tells workflows nothing changed).
        if fresh or lost:
            _write_run(out, run)
        summary.wall_s = time.perf_counter() - t_start
        return summary
    # Run-level checks before _run.json records this run: a refused run must leave nothing
    # that a corrected rerun would trip over.
    raw = store is None and not preprocessed  # a store's frames are preprocessed already
    if dark_dir is None and root is not None and raw and st.preprocess.dark_subtract:
        from pipeline.preprocess import find_dark_dir

        found = find_dark_dir(Path(root))
        dark_dir = str(found) if found is not None else None
    if dark_dir is None and raw and st.preprocess.dark_subtract:
        log.warning("no dark frames found (calib/ or --dark-dir): noise from the corners only")
    if dark_dir is not None and raw:
        from pipeline.preprocess import dark_coverage_note

        _check_dark_size(Path(dark_dir), st)
        if len(manifest) and (note := dark_coverage_note(dark_dir, manifest["time_utc"].min())):
            log.warning(note)
    _warn_preprocess_mismatch(meta, st, ckpt)

    local_device = device
    if client is None and scheduler is None:
        local_device = resolve_device(device)
    run["runs"].append(run_entry)
    _write_run(out, run)

    resources = None
    with contextlib.ExitStack() as stack:
        if client is None:
            from pipeline.cluster import dask_client

            if scheduler is None:
                n_default, resources = _default_workers(local_device)
                client = stack.enter_context(
                    dask_client(workers or n_default, 1, None, resources=resources)
                )
            else:
                client = stack.enter_context(dask_client(scheduler=scheduler))
        info = client.scheduler_info(n_workers=-1) if _accepts_n_workers(client) else None
        info = info or client.scheduler_info()
        wk = info.get("workers", {})
        if resources is None and device != "cpu":
            if any(w.get("resources", {}).get("GPU") for w in wk.values()):
                resources = {"GPU": 1}
        per_host = Counter(a.split("://")[-1].rsplit(":", 1)[0] for a in wk)
        settings = ShardSettings(
            checkpoint=str(ckpt),
            model_id=model_id,
            out_dir=str(out),
            station=st,
            device=local_device,
            batch_size=batch_size,
            dark_dir=str(dark_dir) if dark_dir else None,
            preprocessed=preprocessed,
            features=features,
            torch_threads=threads_per_worker,
            decode_threads=decode_threads,
            workers_per_host=dict(per_host),
            store=str(store.path) if store is not None else None,
        )
        n_slots = max(1, len(wk))
        retried = book.retried_keys()
        shard_frames = {s: df for s, df in shards}

        def tasks() -> Iterator[tuple[int, tuple, int]]:
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

        new_errors: list[pd.DataFrame] = []
        drop_errors: set[tuple[str, int]] = set()
        last_flush = [time.monotonic()]

        def flush(force: bool = False) -> None:
            # Throttled: rewriting _run.json and _errors.parquet per shard would be quadratic in
            # the archive size. Errors reach disk before the shards that reported them count as
            # done; a crash loses at most FLUSH_S of finished shards (their files are redone).
            if not force and time.monotonic() - last_flush[0] < FLUSH_S:
                return
            if new_errors or drop_errors:
                add = pd.concat(new_errors, ignore_index=True) if new_errors else book.table[:0]
                book.update(add, set(drop_errors))
                new_errors.clear()
                drop_errors.clear()
            _write_run(out, run)
            last_flush[0] = time.monotonic()

        def on_result(s: int, res: ShardResult) -> None:
            df = shard_frames.pop(s)
            if res.errors and summary.first_error is None:
                summary.first_error = f"{res.errors[0][0]}: {res.errors[0][3]}"
            if res.errors:
                new_errors.append(
                    pd.DataFrame(
                        [(p, f, STAGE, e, m) for p, f, e, m in res.errors],
                        columns=ERRORS_SCHEMA.names,
                    )
                )
            if retried:  # ShardFailed rows of an earlier run, now classified: forget them
                keys = set(zip(df["path"].astype(str), df["frame"].astype(int)))
                drop_errors.update(keys & retried)
                retried.difference_update(keys)
            run["shards"][f"{s:06d}"] = {
                "frames": res.n_frames,
                "predicted": res.n_predicted,
                "errors": len(res.errors),
                "first": _iso(df["time_utc"].iloc[0]),
                "last": _iso(df["time_utc"].iloc[-1]),
                "worker_pid": res.worker_pid,
            }
            flush()
            summary.shards_submitted += 1
            summary.frames_classified += res.n_predicted
            summary.frames_errors += len(res.errors)
            for c, n in res.class_counts.items():
                summary.class_counts[c] += n
            summary.model_loads[res.worker_pid] = max(
                res.model_loads, summary.model_loads.get(res.worker_pid, 0)
            )
            summary.t_decode_s += res.t_decode
            summary.t_model_s += res.t_model

        def on_error(s: int, exc: BaseException) -> None:
            df = shard_frames.pop(s)
            if summary.first_error is None:
                summary.first_error = f"shard {s:06d}: {type(exc).__name__}: {exc}"
            log.error("shard %06d failed after %d retries: %s", s, retries, exc)
            rows = pd.DataFrame(
                {
                    "path": df["path"].astype(str).to_numpy(),
                    "frame": df["frame"].astype(int).to_numpy(),
                    "stage": STAGE,
                    "error": SHARD_FAILED,
                    "message": f"shard {s:06d}: {type(exc).__name__}: {exc}"[:500],
                }
            )
            new_errors.append(rows)
            # This run's own count: shard numbers are reused by later runs, so rows of
            # _errors.parquet cannot tell which run's frames are missing (occurrence reads it).
            run_entry["frames_failed"] = run_entry.get("frames_failed", 0) + len(df)
            shard_path(out, s).unlink(missing_ok=True)
            summary.shards_submitted += 1
            summary.shards_failed += 1
            summary.frames_errors += len(df)
            flush()

        from pipeline.cluster import run_windowed

        # run_windowed's as_completed() binds to the *current* client's event loop: make that
        # ours (a caller inside `with Client(...)` would otherwise lend its loop, which breaks
        # when a worker dies and a result must be re-gathered).
        stack.enter_context(client.as_current())
        t_compute = time.perf_counter()
        try:
            run_windowed(
                client,
                classify_shard,
                tasks(),
                on_result=on_result,
                on_error=on_error,
                window=window or 2 * n_slots,
                total=len(todo),
                desc="classify",
                retries=retries,
                resources=resources,
            )
        finally:
            # Ctrl-C or a lost scheduler too: the shards finished so far count as done, so the
            # rerun does not classify them again.
            flush(force=True)
        summary.compute_s = time.perf_counter() - t_compute
    _clean_stale(out, {int(k) for k in run["shards"]})
    summary.wall_s = time.perf_counter() - t_start
    run_entry.update(
        finished=_iso(pd.Timestamp.now(tz="UTC")),
        frames_classified=summary.frames_classified,
        frames_errors=summary.frames_errors,
        wall_s=round(summary.wall_s, 3),
        compute_s=round(summary.compute_s, 3),
    )
    _write_run(out, run)
    return summary


def _station_and_manifest(
    source: str | os.PathLike, station: str | os.PathLike | StationConfig | None
) -> tuple[StationConfig, pd.DataFrame, pd.DataFrame]:
    """The station (given, else the archive's calib/station.yaml, else yrs), the manifest and
    the scan's error rows (files named like frames that are not classifiable frames)."""
    from pipeline.archive import load_manifest_and_errors
    from pipeline.config import resolve_station

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


def _store_info(source: str | os.PathLike) -> Any:
    """The StoreInfo when ``source`` is a frame store (pipeline.framestore), else None."""
    from pipeline import framestore

    return framestore.open_info(source) if framestore.is_store(source) else None


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
    from pipeline import framestore
    from pipeline.config import resolve_station

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
    errors = storage_read_errors(framestore.side_path(info.path, framestore.ERRORS_NAME))
    errors = errors.drop_duplicates(["path", "frame"]).reset_index(drop=True)
    return st, manifest, errors


def _check_dark_size(dark_dir: Path, st: StationConfig) -> None:
    """Dark frames of another camera size are a run-level mistake: one error, not one per frame."""
    from pipeline.imageio import read_frame
    from pipeline.preprocess import dark_frames

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
    from pipeline.checkpoint import preprocess_mismatch
    from pipeline.preprocess import calibration_from_station

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
    import inspect

    try:
        return "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def print_summary(summary: ClassifySummary, file: Any = None) -> None:
    """Print the end-of-run summary (stderr by default, so stdout stays clean for pipes)."""
    print(summary.text(), file=file or sys.stderr)
