"""Labelled image sets (ImageFolder layout + labels.parquet): reading, checks, a torch Dataset."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from pipeline import framestore
from pipeline import preprocess as pp
from pipeline.classes import CLASSES
from pipeline.config import StationConfig, resolve_station, to_dict
from pipeline.errors import ConfigError, FrameReadError, InputError
from pipeline.imageio import read_frame
from pipeline.labels import LABELS_NAME, read_labels_table
from pipeline.models import to_model_input
from pipeline.storage import ERRORS_SCHEMA
from pipeline.winter import winter_of

#: Columns of the DataFrame returned by load_labelled.
LABELLED_COLUMNS: tuple[str, ...] = ("path", "label", "time_utc", "winter", "frame")


def load_labelled(root: str | os.PathLike, classes: Sequence[str] = CLASSES) -> pd.DataFrame:
    """ROOT/labels.parquet: absolute ``path``, ``label``, ``time_utc``, ``winter``, ``frame``."""
    root = Path(root).resolve()
    table = root / LABELS_NAME
    df = read_labels_table(root, required=("path", "label"))
    if len(df) == 0:
        raise InputError(f"{table}: no labelled frames")
    labels = df["label"].astype(str)
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        n_bad = int((~labels.isin(classes)).sum())
        raise InputError(
            f"{table}: unknown class {unknown[0]!r} ({n_bad} rows); allowed classes: "
            f"{', '.join(classes)}"
        )
    paths = [Path(p) if Path(p).is_absolute() else root / p for p in df["path"].astype(str)]
    absent = [p for p in paths if not p.is_file()]
    if absent:
        raise InputError(
            f"{table}: {len(absent)} listed frames do not exist, first {absent[0]}; "
            "paths are relative to the folder holding labels.parquet"
        )
    out = _labelled_frame(df, paths, labels)
    _refuse_repeated_frames(out, table, root)
    out.attrs["root"] = str(root)
    return out


def _labelled_frame(df: pd.DataFrame, paths: list[Path], labels: pd.Series) -> pd.DataFrame:
    """The LABELLED_COLUMNS of a labels table (time and winter filled where missing), then the
    table's other columns (an episode or another group, provenance), which travel with the frames.
    """
    if "time_utc" in df.columns:
        time_utc = pd.to_datetime(df["time_utc"], utc=True)
    else:
        time_utc = pd.Series(pd.NaT, index=df.index, dtype="datetime64[ns, UTC]")
    if "winter" in df.columns:
        winter = df["winter"].astype("Int64")
    elif time_utc.notna().all():
        winter = winter_of(time_utc)
    else:
        winter = pd.Series(pd.NA, index=df.index, dtype="Int64")
    frame = df["frame"].astype("int64") if "frame" in df.columns else 0
    out = pd.DataFrame(
        {
            "path": [str(p) for p in paths],
            "label": labels.to_numpy(),
            "time_utc": time_utc.to_numpy(),
            "winter": winter.to_numpy(),
            "frame": frame,
        }
    )
    out["time_utc"] = pd.to_datetime(out["time_utc"], utc=True)
    for c in df.columns:
        if c not in out.columns:
            out[c] = df[c].to_numpy()
    return out


def _refuse_repeated_frames(out: pd.DataFrame, table: Path, root: Path) -> None:
    """A frame listed twice would be counted twice in the metrics and could sit on both sides
    of a train/val split; with two labels it is a contradiction only the user can settle."""
    repeated = out.duplicated(["path", "frame"], keep=False)
    if not repeated.any():
        return
    rep = out[repeated]
    first = rep["path"].iloc[0]
    n_labels = rep.groupby(["path", "frame"])["label"].nunique()
    clash = int((n_labels > 1).sum())
    what = f", {clash} of them with different labels" if clash else ""
    raise InputError(
        f"{table}: {int(n_labels.size)} frames are listed more than once{what} (first "
        f"{Path(first).relative_to(root) if Path(first).is_relative_to(root) else first}); "
        "list each frame once with its one label"
    )


class FramePreprocessor:
    """Raw frame -> preprocessed float32 [0, 1] (crop, crop) with the station's dated darks."""

    def __init__(self, station: StationConfig, dark_dir: str | os.PathLike | None = None) -> None:
        self.station = station
        self.dark_dir = Path(dark_dir) if dark_dir is not None else None
        self._pp = pp
        self._calibs: dict[str | None, Any] = {}

    def calibration(self, time: pd.Timestamp | None) -> Any:
        """The Calibration for a frame taken at ``time`` (dark frame: latest one dated <= time)."""
        dark_path = None
        use_dark = self.station.preprocess.dark_subtract
        if use_dark and self.dark_dir is not None:
            # The same rule as the preprocess and classify stages (no time: the earliest dark).
            dark_path = self._pp.dark_for_time(self.dark_dir, time)
        key = None if dark_path is None else str(dark_path)
        if key not in self._calibs:
            dark = None if dark_path is None else read_frame(dark_path)
            try:
                self._calibs[key] = self._pp.calibration_from_station(
                    self.station, dark=dark, dtype="float32"
                )
            except ConfigError as exc:
                if dark_path is None:
                    raise
                raise ConfigError(
                    f"{dark_path}: {exc} (station {self.station.code}); if the set has its "
                    "own calib/station.yaml, leave out --station"
                ) from None
        return self._calibs[key]

    def __call__(self, path: str, frame: int = 0, time: pd.Timestamp | None = None) -> np.ndarray:
        raw = read_frame(path, frame)
        out = self._pp.preprocess(raw, self.calibration(time), source=str(path))
        return np.asarray(out, dtype=np.float32)

    @property
    def describe(self) -> dict[str, Any]:
        """Preprocessing parameters for checkpoint metadata."""
        return {
            "calibration": self.calibration(None).params(),
            "dark_dir": None if self.dark_dir is None else str(self.dark_dir),
            "dark": "latest calib/dark_<YYYYMMDD>.png on or before the frame's date",
            "station": to_dict(self.station),
        }


class LabelledSet(Dataset):
    """Items (frame float32 (crop, crop) in [0, 1], class index); optional in-memory cache."""

    def __init__(
        self,
        df: pd.DataFrame,
        station: StationConfig,
        dark_dir: str | os.PathLike | None = None,
        cache: bool = False,
        classes: Sequence[str] = CLASSES,
    ) -> None:
        self.df = df.reset_index(drop=True)
        self.classes = tuple(classes)
        self.targets = np.array([self.classes.index(c) for c in self.df["label"]], dtype=np.int64)
        self.pre = FramePreprocessor(station, dark_dir)
        self.cache = cache
        self._cache: dict[int, np.ndarray] = {}
        frames = self.df["frame"] if "frame" in self.df.columns else [0] * len(self.df)
        times = self.df["time_utc"] if "time_utc" in self.df.columns else [None] * len(self.df)
        self._items = list(zip(self.df["path"].astype(str), (int(f) for f in frames), times))

    def __len__(self) -> int:
        return len(self.df)

    def frame(self, i: int) -> np.ndarray:
        """The preprocessed frame ``i``."""
        if self.cache and i in self._cache:
            return self._cache[i]
        path, frame, time = self._items[i]
        img = self.pre(path, frame, time)
        if self.cache:
            self._cache[i] = img
        return img

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.frame(int(i)), int(self.targets[i])

    def subset(self, keep: Sequence[int], cache: bool | None = None) -> LabelledSet:
        """The set of rows ``keep`` only (cached frames carried over unless ``cache`` is False)."""
        keep = [int(i) for i in keep]
        cache = self.cache if cache is None else cache
        sub = LabelledSet(
            self.df.iloc[keep], self.pre.station, self.pre.dark_dir, cache, self.classes
        )
        sub.pre = self.pre  # its calibrations are already built
        if cache:
            sub._cache = {n: self._cache[o] for n, o in enumerate(keep) if o in self._cache}
        return sub


def open_labelled(
    root: str | os.PathLike,
    station: str | os.PathLike | None = None,
    cache: bool = False,
    df: pd.DataFrame | None = None,
) -> LabelledSet:
    """A LabelledSet for the folder ROOT, with its own station/dark frames where it has them."""
    df = load_labelled(root) if df is None else df
    return LabelledSet(
        df, resolve_station(station, root), dark_dir=pp.find_dark_dir(Path(root)), cache=cache
    )


class ToModelInput:
    """DataLoader collate: stack frames and apply models.to_model_input (picklable for workers)."""

    def __init__(self, input_size: int) -> None:
        self.input_size = input_size

    def __call__(self, batch: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        frames = np.stack([b[0] for b in batch]).astype(np.float32, copy=False)
        labels = torch.as_tensor([b[1] for b in batch], dtype=torch.long)
        return to_model_input(frames, self.input_size), labels


class CheckedFrames:
    """A labelled set whose unreadable frames come back as (None, label, index, error message)
    instead of raising: train and evaluate record them and go on (picklable for loader workers)."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[Any, int, int, str | None]:
        try:
            x, y = self.ds[i]
        except FrameReadError as exc:  # FrameGeometryError included
            return None, -1, int(i), f"{type(exc).__name__}: {exc}"
        return x, y, int(i), None


class CheckedCollate:
    """Collate of CheckedFrames items: (x, y) of the readable frames, their indices, the rest."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, batch: list) -> tuple[Any, Any, list[int], list[tuple[int, str]]]:
        ok = [b for b in batch if b[0] is not None]
        bad = [(b[2], b[3]) for b in batch if b[0] is None]
        x, y = self.inner([(b[0], b[1]) for b in ok]) if ok else (None, None)
        return x, y, [b[2] for b in ok], bad


def unreadable_rows(df: pd.DataFrame, bad: list[tuple[int, str]], stage: str) -> pd.DataFrame:
    """errors.parquet rows for the frames of ``df`` at the (index, message) pairs ``bad``."""
    rows = [
        {
            "path": str(df["path"].iloc[i]),
            "frame": int(df["frame"].iloc[i]) if "frame" in df.columns else 0,
            "stage": stage,
            "error": msg.split(":", 1)[0],
            "message": msg.split(": ", 1)[-1],
        }
        for i, msg in bad
    ]
    return pd.DataFrame(rows, columns=ERRORS_SCHEMA.names)


# ------------------------------------------------------------------------------ frame stores


def load_labelled_store(store: str | os.PathLike, classes: Sequence[str] = CLASSES) -> pd.DataFrame:
    """The items of a frame store of a labelled set, as :func:`load_labelled` gives a set's:
    absolute ``path``, ``label``, ``time_utc``, ``winter``, ``frame`` (``episode`` where it has
    one), plus ``store_index``."""
    info = framestore.open_info(store)
    if not info.labelled:
        raise InputError(
            f"{info.path}: a frame store without labels; write one of a labelled set with "
            "`aurora-pipeline preprocess LABELLED_SET --format zarr --out STORE`"
        )
    df = framestore.read_items(info.path, info)
    if len(df) == 0:
        raise InputError(f"{info.path}: the frame store holds no frames")
    unknown = sorted(set(df["label"]) - set(classes))
    if unknown:
        raise InputError(
            f"{info.path}: unknown class {unknown[0]!r}; allowed classes: {', '.join(classes)}"
        )
    root = Path(info.root) if info.root else info.path
    df["path"] = [str(root / p) for p in df["path"]]
    t = df["time_utc"]
    df["winter"] = winter_of(t) if t.notna().all() else pd.array([pd.NA] * len(df), "Int64")
    df.attrs["root"] = str(root)
    return df


class StoreBatches:
    """Batches of a frame store for ``evaluate.predict_checked``: (model input, class indices,
    item positions, no errors), read chunk by chunk in store order."""

    def __init__(
        self,
        store: str | os.PathLike,
        df: pd.DataFrame,
        input_size: int,
        batch_size: int,
        classes: Sequence[str] = CLASSES,
    ) -> None:
        self.store = store
        self.rows = df["store_index"].to_numpy(np.int64)
        self.targets = np.array([list(classes).index(c) for c in df["label"]], dtype=np.int64)
        self.input_size = input_size
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def __iter__(self):
        bs = self.batch_size
        buf = np.empty((bs, self.input_size, self.input_size), np.float32)
        for s in range(0, len(self.rows), bs):
            r = self.rows[s : s + bs]
            framestore.read_rows(self.store, r, buf)
            x = to_model_input(buf[: len(r)], self.input_size)
            idx = list(range(s, s + len(r)))
            yield x, torch.as_tensor(self.targets[s : s + len(r)]), idx, []
