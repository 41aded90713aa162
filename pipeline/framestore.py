"""The frame store: an archive's frames decoded and preprocessed once, at a model's input size.

A study classifies one archive many times (each retrained model, each ablation, the retrieval
index), and decoding the 16-bit PNG frames (zlib) is most of a CPU pass. ``preprocess --format
zarr`` writes the frames once into a Zarr v3 store that xarray opens (``xr.open_zarr(STORE)``);
this module is its layout, the one place both the writer and the readers take it from.

- ``frames`` (item, y, x) float32 in [0, 1]: each frame preprocessed as classify-archive does
  (:func:`pipeline.preprocess.preprocess`, float32) and resized to ``input_size`` by
  :func:`pipeline.models.resize_frames`, the resize of ``to_model_input``. Chunks of
  FRAMES_PER_CHUNK frames, Blosc LZ4 with byte shuffle (smaller, and far faster to decompress
  than the PNG decode it replaces).
- coordinates along ``item``: ``time_utc`` (UTC; NaT where unknown), ``path`` (relative to the
  archive root, as in the manifest and in the predictions), ``frame`` (index in a multi-frame
  file), and for a labelled set ``label`` (and ``episode`` where the set has one).
- root attributes: ``aurora_framestore`` (the format), ``input_size``, ``committed`` (how many
  items are complete), ``station``, ``settings`` (the preprocessing), ``root``, ``source``,
  ``kind`` (archive, manifest or labelled).
- ``_aurora/``: a Zarr group holding the writer's side files (``errors.parquet``, its lock), so
  the root holds nothing zarr does not know but the run record ``_run.json`` of the output-folder
  protocol (docs/design.md, "Output folders"). Zarr skips it with a warning ("Object at
  _run.json is not recognized") when it walks the group; the writer here silences that.

Why float32 at the input size, not uint8: predictions from the store must equal those from the
PNG frames to 1e-5. Resized float32 frames do, exactly (``to_model_input`` then only
normalises: the same arithmetic on the same numbers). Quantising to uint8, at the input size or
at the crop size, moves the probabilities of a trained checkpoint far beyond that tolerance; so
the store pays four times the bytes of uint8 for predictions it need not qualify.

Appends and kills: each append (xarray ``to_zarr(append_dim="item")``) is followed by an update
of ``committed``. Readers here read only the first ``committed`` items, and the next writer cuts
whatever a killed append left beyond them (:func:`repair`) before it appends; the writer skips
the (path, frame) keys already in the store. So a killed write leaves the store readable up to
its last complete append, and a rerun adds exactly the frames that are missing.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np
import pandas as pd
import xarray as xr
import zarr
from zarr.codecs import BloscCodec

from pipeline.errors import InputError

FORMAT = 1
FORMAT_KEY = "aurora_framestore"
DIM = "item"
FRAMES = "frames"
#: coordinates every store has along ``item``, and those of a labelled set.
COORDS = ("time_utc", "path", "frame")
LABEL_COORDS = ("label", "episode")
#: frames per chunk: 13 MB of float32 at 227 px, one read per 64 frames.
FRAMES_PER_CHUNK = 64
#: items per chunk of a coordinate (appends rewrite the last one; a few bytes per item).
COORD_CHUNK = 4096
TIME_UNITS = "microseconds since 1970-01-01T00:00:00Z"
SIDE_GROUP = "_aurora"
ERRORS_NAME = "errors.parquet"
LOCK_NAME = ".preprocess.lock"
P = ParamSpec("P")
R = TypeVar("R")


def _quiet_about_run_record(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` without zarr's warning about the store root's ``_run.json`` (the run record of
    the output-folder protocol), which zarr reports as an object it does not know when it walks
    the group."""

    @functools.wraps(fn)
    def quiet(*args: P.args, **kwargs: P.kwargs) -> R:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r"Object at _run\.json is not recognized", category=UserWarning
            )
            return fn(*args, **kwargs)

    return quiet


def side_path(store: str | os.PathLike, name: str) -> Path:
    """A side file of the store (errors.parquet, the lock) inside its ``_aurora`` group."""
    return Path(store) / SIDE_GROUP / name


@dataclass(frozen=True)
class StoreInfo:
    """The root attributes of a store: what it holds and how it was made."""

    path: Path
    input_size: int
    committed: int
    station: dict[str, Any]
    settings: dict[str, Any]
    root: str | None
    source: str
    kind: str
    #: the coordinates it carries along ``item`` (COORDS, plus LABEL_COORDS of a labelled set).
    coords: tuple[str, ...]

    @property
    def labelled(self) -> bool:
        """Whether every item has a class label (a store of a labelled set)."""
        return "label" in self.coords


def _open_group(store: str | os.PathLike, mode: str = "r") -> Any:
    return zarr.open_group(str(store), mode=mode, zarr_format=3)


def _read_attrs(store: Path) -> dict[str, Any] | None:
    """The root attributes when ``store`` is a frame store, else None (read from zarr.json)."""
    meta = store / "zarr.json"
    try:
        attrs = json.loads(meta.read_text()).get("attributes") or {}
    except (OSError, ValueError, AttributeError):
        return None
    return attrs if isinstance(attrs, dict) and FORMAT_KEY in attrs else None


def is_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a frame store (a folder whose zarr.json names this format)."""
    p = Path(path)
    return p.is_dir() and _read_attrs(p) is not None


def open_info(store: str | os.PathLike) -> StoreInfo:
    """The StoreInfo of STORE; InputError naming the folder when it is not a frame store."""
    p = Path(store).resolve()
    attrs = _read_attrs(p)
    if attrs is None:
        raise InputError(
            f"{p}: not a frame store (no zarr.json with {FORMAT_KEY}); write one with "
            "`aurora-pipeline preprocess ARCHIVE --format zarr --out STORE`"
        )
    if attrs.get(FORMAT_KEY) != FORMAT:
        raise InputError(
            f"{p}: frame store format {attrs.get(FORMAT_KEY)!r}, this version reads {FORMAT}; "
            "write the store again with `aurora-pipeline preprocess --format zarr`"
        )
    return StoreInfo(
        path=p,
        input_size=int(attrs["input_size"]),
        committed=int(attrs.get("committed", 0)),
        station=dict(attrs.get("station") or {}),
        settings=dict(attrs.get("settings") or {}),
        root=attrs.get("root"),
        source=str(attrs.get("source", "")),
        kind=str(attrs.get("kind", "archive")),
        coords=tuple(attrs.get("coords") or COORDS),
    )


def check_input_size(info: StoreInfo, input_size: int, checkpoint: str | os.PathLike) -> None:
    """One clear error when a model's input size is not the store's."""
    if int(input_size) != info.input_size:
        raise InputError(
            f"{checkpoint}: the model takes {int(input_size)} px frames but the frame store "
            f"{info.path} holds {info.input_size} px frames; classify the archive itself, or write "
            f"a store for this model with `aurora-pipeline preprocess ARCHIVE --format zarr "
            f"--input-size {int(input_size)} --out NEW_STORE`"
        )


# ------------------------------------------------------------------------------ reading


def read_items(store: str | os.PathLike, info: StoreInfo | None = None) -> pd.DataFrame:
    """The coordinates of the complete items: ``store_index``, ``time_utc``, ``path``, ``frame``
    (and ``label``, ``episode`` of a labelled set), in store order."""
    info = info or open_info(store)
    n = info.committed
    cols: dict[str, Any] = {"store_index": np.arange(n, dtype=np.int64)}
    if n == 0:
        return pd.DataFrame(
            {
                **cols,
                "time_utc": pd.Series([], dtype="datetime64[ns, UTC]"),
                "path": pd.Series([], dtype=object),
                "frame": np.zeros(0, np.int64),
                **{c: pd.Series([], dtype=object) for c in info.coords if c in LABEL_COORDS},
            }
        )
    g = _open_group(info.path)
    for name in info.coords:
        arr = g[name]
        raw = np.asarray(arr[:n])
        if name == "time_utc":
            cols[name] = pd.to_datetime(
                _decode_times(raw, dict(arr.attrs), arr.fill_value), utc=True
            )
        elif name == "frame":
            cols[name] = raw.astype(np.int64)
        else:
            cols[name] = raw.astype(object).astype(str)
    return pd.DataFrame(cols)


def _decode_times(raw: np.ndarray, attrs: dict[str, Any], fill: Any) -> np.ndarray:
    """Times as xarray encoded them (CF units, its fill value for NaT), decoded by xarray."""
    attrs = {k: v for k, v in attrs.items() if k in ("units", "calendar")}
    if fill is not None:
        attrs["_FillValue"] = np.asarray(fill, dtype=raw.dtype).item()
    ds = xr.decode_cf(xr.Dataset({"t": (DIM, raw, attrs)}))
    return ds["t"].to_numpy()


_ARRAYS: dict[str, tuple[int, Any]] = {}
_ARRAYS_LOCK = threading.Lock()


def _frames_array(store: str | os.PathLike, need: int) -> Any:
    """The store's ``frames`` array, opened once per process and again when its metadata
    changed (an append, or a store written anew at the same path)."""
    path = os.fspath(Path(store).resolve())
    try:
        stamp = os.stat(f"{path}/{FRAMES}/zarr.json").st_mtime_ns
    except OSError:
        raise InputError(f"{path}: the frame store holds no frames array") from None
    with _ARRAYS_LOCK:
        hit = _ARRAYS.get(path)
        if hit is None or hit[0] != stamp or hit[1].shape[0] < need:
            arr = zarr.open_array(f"{path}/{FRAMES}", mode="r", zarr_format=3)
            hit = _ARRAYS[path] = (stamp, arr)
        return hit[1]


def read_frames(store: str | os.PathLike, start: int, stop: int) -> np.ndarray:
    """Frames ``start:stop`` of the store, float32 (n, S, S) in [0, 1]."""
    return np.asarray(_frames_array(store, stop)[start:stop], dtype=np.float32)


def runs(rows: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """(position in ``rows``, first store index, count) of each run of consecutive indices."""
    rows = np.asarray(rows, dtype=np.int64)
    if not len(rows):
        return
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(rows)]])
    for a, b in zip(starts, ends):
        yield int(a), int(rows[a]), int(b - a)


def read_rows(store: str | os.PathLike, rows: np.ndarray, out: np.ndarray) -> None:
    """Frames at store indices ``rows`` into ``out[: len(rows)]``, one read per run of
    consecutive indices (whole chunks, not single frames, come off the disk)."""
    for pos, first, count in runs(rows):
        out[pos : pos + count] = read_frames(store, first, first + count)


# ------------------------------------------------------------------------------ writing


def create(store: str | os.PathLike, attrs: dict[str, Any]) -> None:
    """A new, empty store: its root attributes (committed 0) and the ``_aurora`` side group."""
    root = zarr.create_group(
        str(store),
        zarr_format=3,
        attributes={FORMAT_KEY: FORMAT, **_jsonable(attrs), "committed": 0},
    )
    root.create_group(SIDE_GROUP, attributes={"what": "aurora-pipeline side files, not frames"})


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


@_quiet_about_run_record
def repair(store: str | os.PathLike) -> int:
    """Cut what a killed append left beyond ``committed`` (and zarr's partial files); returns
    ``committed``. The writer calls it before it appends; readers never need it."""
    p = Path(store)
    g = _open_group(p, mode="r+")
    n = int(g.attrs.get("committed", 0))
    for name, arr in g.arrays():
        dims = arr.metadata.dimension_names or ()
        if not dims or dims[0] != DIM or arr.shape[0] == n:
            continue
        if arr.shape[0] < n:
            raise InputError(
                f"{p}: {name} holds {arr.shape[0]} items but {n} are recorded as complete; "
                "the store is damaged, write it again into a new --out"
            )
        arr.resize((n, *arr.shape[1:]))
    for folder in (p, *(q for q in p.iterdir() if q.is_dir())):
        for partial in folder.glob("*.partial"):
            with contextlib.suppress(OSError):
                partial.unlink()
    return n


def _dataset(frames: np.ndarray, items: pd.DataFrame, coords: tuple[str, ...]) -> Any:
    t = pd.to_datetime(items["time_utc"], utc=True)
    values: dict[str, Any] = {
        "time_utc": (DIM, t.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy("datetime64[ns]")),
        "path": (DIM, np.asarray(items["path"].astype(str), dtype=object)),
        "frame": (DIM, np.asarray(items["frame"], dtype=np.int16)),
    }
    for c in coords:
        if c in LABEL_COORDS:
            values[c] = (DIM, np.asarray(items[c].astype(str), dtype=object))
    frames_attrs = {
        "long_name": "preprocessed frame at the model input size",
        "units": "1",
        "valid_range": [0.0, 1.0],
    }
    ds = xr.Dataset(
        {FRAMES: ((DIM, "y", "x"), np.asarray(frames, dtype=np.float32), frames_attrs)},
        coords=values,
    )
    ds["time_utc"].attrs["long_name"] = "frame time (UTC)"
    ds["path"].attrs["long_name"] = "frame file relative to the archive root"
    ds["frame"].attrs["long_name"] = "index of the frame in its file (0 for single frames)"
    return ds


def _encoding(coords: tuple[str, ...], size: int) -> dict[str, dict[str, Any]]:
    enc: dict[str, dict[str, Any]] = {
        FRAMES: {
            "chunks": (FRAMES_PER_CHUNK, size, size),
            "compressors": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
        },
        "time_utc": {"units": TIME_UNITS, "dtype": "int64", "chunks": (COORD_CHUNK,)},
    }
    for c in coords:
        enc.setdefault(c, {"chunks": (COORD_CHUNK,)})
    return enc


@_quiet_about_run_record
def append(store: str | os.PathLike, frames: np.ndarray, items: pd.DataFrame) -> int:
    """Append ``frames`` (n, S, S) float32 with their ``items`` (time_utc, path, frame and the
    store's label columns), then commit them; returns the new ``committed``.

    The root attributes go back unchanged with the data (xarray rewrites them on append), and
    ``committed`` moves only after the whole append is written; what an append that failed
    half-way left is cut first, so appending again after an error is safe.
    """
    if len(frames) != len(items):
        raise ValueError(f"{len(frames)} frames but {len(items)} items")
    if not len(frames):
        return open_info(store).committed
    repair(store)  # an append that raised half-way (Ctrl-C) must not shift this one
    g = _open_group(store, mode="r+")
    attrs = g.attrs.asdict()
    n0 = int(attrs.get("committed", 0))
    coords = tuple(attrs.get("coords") or COORDS)
    size = int(attrs["input_size"])
    if frames.shape[1:] != (size, size):
        raise ValueError(f"frames are {frames.shape[1:]} but the store holds {size}x{size}")
    ds = _dataset(frames, items, coords)
    ds.attrs = attrs
    if FRAMES in g:
        ds.to_zarr(str(store), mode="a", append_dim=DIM, consolidated=False, zarr_format=3)
    else:
        ds.to_zarr(
            str(store),
            mode="a",
            encoding=_encoding(coords, size),
            consolidated=False,
            zarr_format=3,
        )
    n = n0 + len(frames)
    _commit(store, n)
    return n


def _commit(store: str | os.PathLike, n: int) -> None:
    """Record the first ``n`` items as complete (one atomic rewrite of the root zarr.json)."""
    _open_group(store, mode="r+").attrs.update({"committed": int(n)})
