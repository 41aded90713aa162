"""FC7 features of frames, as a retrieval index stores them (float16, one row per frame)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from pipeline.cores import usable_cores
from pipeline.devices import resolve_device
from pipeline.errors import AuroraError, CheckpointError
from pipeline.framestore import read_rows
from pipeline.models import to_model_input
from pipeline.retrieval_images import FrameLoader
from pipeline.storage import ERRORS_SCHEMA, empty_frame, error_rows

_FLOAT16_MAX = float(np.finfo(np.float16).max)


class _ItemFrames:
    """The frames of ``items``, read and preprocessed by ``loader`` one at a time (thread-safe)."""

    def __init__(self, items: pd.DataFrame, loader: FrameLoader) -> None:
        n = len(items)
        self.loader = loader
        self.paths = items["path"].astype(str).tolist()
        self.frames = items["frame"].astype(int).tolist() if "frame" in items else [0] * n
        self.times = items["time_utc"].tolist() if "time_utc" in items else [None] * n

    def load(self, j: int) -> np.ndarray | AuroraError:
        """Frame ``j`` preprocessed, or the error that kept it from being read."""
        try:
            return self.loader(self.paths[j], self.frames[j], self.times[j])
        except AuroraError as exc:
            return exc


def embed(
    model: Any,
    meta: dict[str, Any],
    items: pd.DataFrame,
    loader: FrameLoader,
    batch_size: int = 64,
    device: str = "auto",
    strict: bool = False,
    desc: str = "features",
    out: np.ndarray | None = None,
    out_rows: np.ndarray | None = None,
    stage: str = "index",
    failures: list[AuroraError] | None = None,
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """FC7 features of ``items``: (features float16 (n_ok, dim), ok mask (n,), errors table).

    Frames that cannot be read go to the errors table with ``stage`` (``strict``: raise instead),
    their exceptions to ``failures`` when given. With ``out`` (a float16 array, e.g. a memmap)
    features are written there, item j to row ``out_rows[j]`` (default j), and the returned
    array is ``out`` itself (failed rows untouched).
    """
    dev = resolve_device(device)
    model = model.to(dev).eval()
    frames = _ItemFrames(items, loader)
    n = len(items)
    ok = np.zeros(n, bool)
    errors: list[pd.DataFrame] = []
    feats: list[np.ndarray] = []
    failed = [] if failures is None else failures
    bar = tqdm(total=n, desc=desc, unit="frame", disable=n < 2 * batch_size)
    # Decoding and preprocessing (PIL, zlib, numpy release the GIL) overlap in a few threads.
    threads = max(1, min(4, usable_cores() - 1))
    with torch.inference_mode(), ThreadPoolExecutor(threads) as pool:
        for s in range(0, n, batch_size):
            span = range(s, min(n, s + batch_size))
            batch, rows = [], []
            for j, img in zip(span, pool.map(frames.load, span)):
                if not isinstance(img, AuroraError):
                    batch.append(img)
                    rows.append(j)
                elif strict:
                    raise img
                else:
                    errors.append(error_rows([(frames.paths[j], frames.frames[j])], stage, img))
                    failed.append(img)
            if batch:
                f16 = _fc7(model, meta, np.stack(batch), dev, frames.paths[rows[0]])
                if out is not None:
                    out[rows if out_rows is None else out_rows[rows]] = f16
                else:
                    feats.append(f16)
                ok[rows] = True
            bar.update(len(span))
    bar.close()
    err = pd.concat(errors, ignore_index=True) if errors else empty_frame(ERRORS_SCHEMA)
    if out is not None:
        return out, ok, err
    dim = int(getattr(model, "feature_dim", 0) or 0)
    return (np.concatenate(feats) if feats else np.zeros((0, dim), np.float16)), ok, err


def embed_store(
    model: Any,
    meta: dict[str, Any],
    store: str | os.PathLike,
    rows: np.ndarray,
    out: np.ndarray,
    out_rows: np.ndarray,
    batch_size: int = 64,
    device: str = "auto",
) -> None:
    """FC7 features of the frames at store indices ``rows`` into ``out[out_rows]``, read from
    the frame store in batches of consecutive items (whole chunks, no decoding)."""
    dev = resolve_device(device)
    model = model.to(dev).eval()
    size = int(meta["input_size"])
    buf = np.empty((batch_size, size, size), np.float32)
    n = len(rows)
    with torch.inference_mode():
        for s in tqdm(range(0, n, batch_size), desc="features", unit="batch", disable=n < 128):
            r = np.asarray(rows[s : s + batch_size], dtype=np.int64)
            read_rows(store, r, buf)
            out[out_rows[s : s + len(r)]] = _fc7(model, meta, buf[: len(r)], dev, str(store))


def _fc7(model: Any, meta: dict[str, Any], frames: np.ndarray, dev: Any, first: str) -> np.ndarray:
    """FC7 features (float16) of preprocessed frames; a broken model is an error naming it."""
    x = to_model_input(frames, int(meta["input_size"]), int(meta.get("in_chans", 1))).to(dev)
    f = model.features(x).float().cpu().numpy()
    if not np.isfinite(f).all():
        raise CheckpointError(
            f"model {meta.get('model_id')} gives non-finite features for {first}; the "
            "checkpoint looks broken (retrain it)"
        )
    # float16 keeps the index small; FC7 activations are far below its range, clip guards
    # against an odd model rather than turning features into inf.
    return np.clip(f, -_FLOAT16_MAX, _FLOAT16_MAX).astype(np.float16)


def feature_dim(model: Any, meta: dict[str, Any]) -> int:
    """The length of the model's FC7 vector (asked of the model when it does not say)."""
    dim = getattr(model, "feature_dim", None)
    if dim:
        return int(dim)
    s = int(meta["input_size"])
    with torch.inference_mode():
        x = to_model_input(np.zeros((1, s, s), np.float32), s, int(meta.get("in_chans", 1)))
        return int(model.eval().features(x).shape[1])
