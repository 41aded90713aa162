"""The frames a retrieval index or query is made of: image sets and the loader preprocessing them.

An image set is a labelled set (labels.parquet), a manifest (.parquet/.csv), an archive (a
folder whose file names carry times), a plain folder of images, a single image or a frame store
of ``preprocess --format zarr``. Its items are one row per frame: ``path`` (absolute),
``frame``, ``time_utc``, ``label`` (null where unknown) and ``relpath`` (the path classify-archive
names the frame by).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import framestore
from pipeline.archive import load_manifest, parse_time
from pipeline.config import StationConfig, resolve_station
from pipeline.errors import FrameGeometryError, InputError
from pipeline.imageio import read_frame
from pipeline.labelled import FramePreprocessor, load_labelled
from pipeline.output_folder import read_run_record
from pipeline.preprocess import find_dark_dir, preprocess

#: A station given as a name, a station.yaml or a config.
StationArg = str | os.PathLike | StationConfig | None


@dataclass
class ImageSet:
    """Frames to embed: items (path abs, frame, time_utc, label), their station and dark folder."""

    items: pd.DataFrame
    station: StationConfig
    dark_dir: Path | None
    kind: str  # "labelled" | "manifest" | "archive" | "folder" | "files" | "store"
    source: str
    #: the folder the items' ``relpath`` start from (archive, manifest root, labelled set); None
    #: for loose files and plain folders (whose frames classify-archive cannot have seen).
    root: Path | None = None


def open_image_set(
    source: str | os.PathLike,
    station: StationArg = None,
    station_fallback: Any = None,
    dark_dir: str | os.PathLike | None = None,
) -> ImageSet:
    """A labelled set (labels.parquet), a manifest (.parquet/.csv), an archive or an image folder.

    ``station``: the frames' station when given, else the set's calib/station.yaml, else
    ``station_fallback`` (the station an index or checkpoint records), else yrs. ``dark_dir``:
    the dark frames, else the set's own.
    """
    src = Path(source).resolve()
    dark = Path(dark_dir) if dark_dir else None
    if not src.exists():
        raise InputError(f"{src}: not found; give a labelled set, an archive, a manifest or images")
    if framestore.is_store(src):
        return _store_set(src, station)
    if src.is_dir() and (src / "labels.parquet").is_file():
        return _labelled_set(src, resolve_station(station, src, station_fallback), dark)
    if src.is_dir() and (read_run_record(src) or {}).get("command") == "index":
        raise InputError(f"{src}: is a retrieval index, not an image set; give the frames' folder")
    if src.is_file() and src.suffix.lower() in (".parquet", ".csv"):
        return _manifest_set(src, station, station_fallback, dark)
    if src.is_file():
        st = resolve_station(station, _set_root_of(src), station_fallback)
        items = _items_frame([str(src)], times=[_parse_time(src.name, st)])
        return ImageSet(items, st, dark or _near_dark_dir(src), "files", str(src))
    return _folder_set(src, resolve_station(station, src, station_fallback), dark)


def _labelled_set(src: Path, st: StationConfig, dark: Path | None) -> ImageSet:
    df = load_labelled(src)
    # relpath as classify-archive names a set's frames (relative to the set's folder).
    rel = [_relative_to(p, src) for p in df["path"].astype(str)]
    items = _items_frame(df["path"], df["frame"], df["time_utc"], df["label"], relpaths=rel)
    return ImageSet(items, st, dark or find_dark_dir(src), "labelled", str(src), src)


def _manifest_set(src: Path, station: StationArg, fallback: Any, dark: Path | None) -> ImageSet:
    man = load_manifest(src, resolve_station(station, None, fallback))
    root = Path(man.attrs.get("root", src.parent))
    st = resolve_station(station, root, fallback)
    items = _items_frame(
        man["abspath"], man.get("frame"), man.get("time_utc"), relpaths=man["path"]
    )
    items = _attach_truth(items, root)
    return ImageSet(items, st, dark or find_dark_dir(root), "manifest", str(src), root.resolve())


def _folder_set(src: Path, st: StationConfig, dark: Path | None) -> ImageSet:
    """An archive (file names carry times) or, when none does, a plain folder of images."""
    dd = dark or find_dark_dir(src)
    # The scan's manifest, time-sorted; files without a time are left out with a warning.
    man = load_manifest(src, st)
    if len(man):
        items = _items_frame(
            man["abspath"], man.get("frame"), man.get("time_utc"), relpaths=man["path"]
        )
        return ImageSet(_attach_truth(items, src), st, dd, "archive", str(src), src)
    files = _image_files(src, st)
    if not files:
        raise InputError(
            f"{src}: no images ({', '.join(st.extensions)}) found; "
            "give a labelled set, an archive, a manifest or a folder of images"
        )
    items = _items_frame([str(p) for p in files])
    return ImageSet(_attach_truth(items, src), st, dd, "folder", str(src))


def _store_set(src: Path, station: StationArg) -> ImageSet:
    """A frame store's items (``store_index`` added), with the station it was written for."""
    info = framestore.open_info(src)
    st = resolve_station(None, None, info.station)
    if station is not None and resolve_station(station).code != st.code:
        raise InputError(f"{src}: holds frames of station {st.code}; drop --station")
    got = framestore.read_items(src, info)
    root = Path(info.root) if info.root else src
    items = _items_frame(
        [str(root / p) for p in got["path"]],
        got["frame"],
        got["time_utc"],
        got["label"] if info.labelled else None,
        relpaths=got["path"],
    )
    if not info.labelled and info.root:
        items = _attach_truth(items, root)
    items["store_index"] = got["store_index"].to_numpy()
    return ImageSet(items, st, None, "store", str(src), root)


def _items_frame(
    paths: Sequence[str],
    frames: Sequence[int] | None = None,
    times: Sequence[Any] | None = None,
    labels: Sequence[Any] | None = None,
    relpaths: Sequence[str] | None = None,
) -> pd.DataFrame:
    n = len(paths)
    label_col = (
        pd.Series([None] * n, dtype=object)
        if labels is None
        else pd.Series([None if pd.isna(v) else str(v) for v in labels], dtype=object)
    )
    return pd.DataFrame(
        {
            "path": [str(p) for p in paths],
            "frame": np.zeros(n, np.int64) if frames is None else np.asarray(frames, np.int64),
            "time_utc": pd.to_datetime(
                pd.Series([pd.NaT] * n if times is None else list(times)), utc=True
            ),
            "label": label_col,
            # The manifest's path (relative to the archive root), to match classify's shards.
            "relpath": [str(p) for p in (paths if relpaths is None else relpaths)],
        }
    )


def _parse_time(name: str, station: StationConfig) -> pd.Timestamp | None:
    stem = name
    for ext in (".gz", *station.extensions, ".pgm", ".npy"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
    try:
        return parse_time(stem, station.filename_pattern)
    except Exception:  # noqa: BLE001 - a name without a time is fine here: the time is optional
        return None


def _image_files(root: Path, station: StationConfig) -> list[Path]:
    exts = tuple(e.lower() for e in (*station.extensions, ".pgm", ".pgm.gz"))
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.name.lower().endswith(exts)
        and "calib" not in p.relative_to(root).parts
    )


def _relative_to(path: str, root: Path) -> str:
    """``path`` relative to ``root`` (POSIX separators) when it lies below it, else unchanged."""
    prefix = str(root).rstrip(os.sep) + os.sep
    return Path(path[len(prefix) :]).as_posix() if path.startswith(prefix) else path


def _attach_truth(items: pd.DataFrame, root: Path) -> pd.DataFrame:
    """Labels from ROOT/truth.parquet (synthetic archives know their classes), matched by path."""
    truth = root / "truth.parquet"
    if not truth.is_file():
        return items
    t = pd.read_parquet(truth)
    if not {"path", "label"} <= set(t.columns):
        return items
    lookup = {str((root / p).resolve()): lab for p, lab in zip(t["path"].astype(str), t["label"])}
    items = items.copy()
    items["label"] = [
        lookup.get(str(Path(p).resolve()), lab) for p, lab in zip(items["path"], items["label"])
    ]
    return items


def _set_root_of(path: Path, levels: int = 4) -> Path | None:
    """The nearest folder above ``path`` holding a calib/ folder (the set a frame belongs to)."""
    for parent in list(path.parents)[:levels]:
        if (parent / "calib").is_dir():
            return parent
    return None


def _near_dark_dir(path: Path) -> Path | None:
    root = _set_root_of(path)
    return find_dark_dir(root) if root is not None else None


class FrameLoader:
    """Path -> preprocessed float32 (crop, crop) frame, refusing frames of the wrong size."""

    def __init__(self, station: StationConfig, dark_dir: Path | None, what: str = "frame") -> None:
        self.station = station
        self.pre = FramePreprocessor(station, dark_dir)
        self.what = what

    def __call__(self, path: str, frame: int = 0, time: Any = None) -> np.ndarray:
        raw = read_frame(path, int(frame))
        s = self.station
        if raw.ndim != 2 or raw.shape not in ((s.raw_size, s.raw_size), (s.crop_size, s.crop_size)):
            raise FrameGeometryError(
                path,
                f"{self.what} is {'x'.join(map(str, raw.shape))} but station {s.code!r} expects "
                f"{s.raw_size}x{s.raw_size} raw or {s.crop_size}x{s.crop_size} preprocessed "
                "frames; use images of the indexed camera (or --station for another one)",
            )
        t = None if time is None or pd.isna(time) else time
        out = preprocess(raw, self.pre.calibration(t))
        return np.asarray(out, dtype=np.float32)


def index_loader(meta: dict[str, Any]) -> FrameLoader:
    """A loader that preprocesses frames as an index recorded it (its station and dark folder)."""
    dd = meta.get("dark_dir")
    return FrameLoader(resolve_station(None, None, meta.get("station")), Path(dd) if dd else None)
