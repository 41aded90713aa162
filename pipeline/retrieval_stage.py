"""Retrieval I/O: build an FC7 index of an image set, query it, evaluate it, draw the Fig. 6 grid.

An index is one folder, whose only table is ``items.parquet`` (the other files start with ``_``,
so ``pd.read_parquet(INDEX)`` gives the items):

- ``_features.npy``: float16 (count, dim) FC7 features, opened as a memmap when searched;
- ``items.parquet``: one row per feature row: ``path`` (absolute), ``frame``, ``time_utc``,
  ``label`` (null where unknown);
- ``_index.json``: model_id, variant, checkpoint (absolute path), input_size, in_chans, dim,
  count, the station and dark-frame folder used to preprocess the frames, the source; written
  last, so a folder without it is an unfinished index;
- ``_errors.parquet`` when some frames could not be read (they are left out of the index).

Indexes of the earlier layout (``features.npy``, ``index.json``, ``errors.parquet``) are read as
they are; building into one replaces those files.

``index`` builds in a temporary folder beside OUT and moves the files in only when the index is
complete, so a failed or interrupted build leaves OUT as it was. ``--features-dir`` reuses
classify-archive's features only when its ``_run.json`` names the same model, archive root and
station settings. ``retrieve`` leaves out query frames that cannot be read and lists them in
OUT/errors.parquet.

The science (kNN, precision@k, AP) lives in :mod:`pipeline.retrieval`.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.classes import CLASS_COLOURS, CLASSES
from pipeline.config import StationConfig, resolve_station, to_dict
from pipeline.errors import (
    AuroraError,
    CheckpointError,
    FrameGeometryError,
    InputError,
)
from pipeline.retrieval import METRICS, knn, parse_ranks, resolve_device, retrieval_scores
from pipeline.storage import (
    ERRORS_SCHEMA,
    atomic_path,
    error_rows,
    install_outputs,
    refuse_foreign_out,
    write_table,
)

log = logging.getLogger(__name__)

INDEX_FORMAT = 1
FEATURES_FILE = "_features.npy"
ITEMS_FILE = "items.parquet"
META_FILE = "_index.json"
ERRORS_FILE = "_errors.parquet"
#: The index's files before its folder opened as a Parquet table: read, replaced when rebuilt.
LEGACY_FILES = {
    FEATURES_FILE: "features.npy",
    META_FILE: "index.json",
    ERRORS_FILE: "errors.parquet",
}
#: retrieve's own unreadable queries, beside neighbours.parquet.
QUERY_ERRORS_FILE = "errors.parquet"
PAPER_RANKS: tuple[int, ...] = (1, 3, 5, 8, 10, 15, 20)
#: Query rows drawn in retrieval.png at most (the tables hold every query).
FIGURE_MAX_ROWS = 16

#: items.parquet: what each feature row is.
ITEMS_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("frame", pa.int16()),
        ("time_utc", pa.timestamp("ns", tz="UTC")),
        ("label", pa.string()),
    ]
)

#: neighbours.parquet / .csv written by ``retrieve``.
NEIGHBOURS_SCHEMA = pa.schema(
    [
        ("query", pa.string()),
        ("query_label", pa.string()),
        ("rank", pa.int16()),
        ("path", pa.string()),
        ("frame", pa.int16()),
        ("time_utc", pa.timestamp("ns", tz="UTC")),
        ("distance", pa.float32()),
        ("label", pa.string()),
    ]
)


_FLOAT16_MAX = float(np.finfo(np.float16).max)


# ------------------------------------------------------------------------------ image sets
@dataclass
class ImageSet:
    """Frames to embed: items (path abs, frame, time_utc, label), their station and dark folder."""

    items: pd.DataFrame
    station: StationConfig
    dark_dir: Path | None
    kind: str  # "labelled" | "manifest" | "archive" | "folder" | "files"
    source: str
    #: the folder the items' ``relpath`` start from (archive, manifest root, labelled set); None
    #: for loose files and plain folders (whose frames classify-archive cannot have seen).
    root: Path | None = None


def _dark_dir(root: Path) -> Path | None:
    from pipeline.preprocess import find_dark_dir

    return find_dark_dir(root)


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
    from pipeline.archive import parse_time

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


def _resolve_station(
    root: Path | None, station: str | os.PathLike | StationConfig | None, fallback: Any = None
) -> StationConfig:
    """``station`` if given, else the set's calib/station.yaml, else ``fallback`` (index.json), else yrs."""
    return resolve_station(station, root, fallback)


def open_image_set(
    source: str | os.PathLike,
    station: str | os.PathLike | StationConfig | None = None,
    station_fallback: Any = None,
    dark_dir: str | os.PathLike | None = None,
) -> ImageSet:
    """A labelled set (labels.parquet), a manifest (.parquet/.csv), an archive or a folder of images."""
    src = Path(source).resolve()
    if not src.exists():
        raise InputError(f"{src}: not found; give a labelled set, an archive, a manifest or images")
    from pipeline import framestore

    if framestore.is_store(src):
        return _store_set(src, station)
    if src.is_dir() and (src / "labels.parquet").is_file():
        from pipeline.labelled import load_labelled

        df = load_labelled(src)
        st = _resolve_station(src, station, station_fallback)
        # relpath as classify-archive names a set's frames (relative to the set's folder).
        rel = [_relative_to(p, src) for p in df["path"].astype(str)]
        items = _items_frame(df["path"], df["frame"], df["time_utc"], df["label"], relpaths=rel)
        dd = Path(dark_dir) if dark_dir else _dark_dir(src)
        return ImageSet(items, st, dd, "labelled", str(src), src)
    if src.is_dir() and _index_file(src, META_FILE).is_file():
        raise InputError(f"{src}: is a retrieval index, not an image set; give the frames' folder")
    if src.is_file() and src.suffix.lower() in (".parquet", ".csv"):
        from pipeline.archive import load_manifest

        st = _resolve_station(None, station, station_fallback)
        man = load_manifest(src, st)
        root = Path(man.attrs.get("root", src.parent))
        st = _resolve_station(root, station, station_fallback)
        items = _items_frame(
            man["abspath"], man.get("frame"), man.get("time_utc"), relpaths=man["path"]
        )
        items = _attach_truth(items, root)
        dd = Path(dark_dir) if dark_dir else _dark_dir(root)
        return ImageSet(items, st, dd, "manifest", str(src), root.resolve())
    if src.is_file():
        st = _resolve_station(_set_root_of(src), station, station_fallback)
        items = _items_frame([str(src)], times=[_parse_time(src.name, st)])
        dd = Path(dark_dir) if dark_dir else _near_dark_dir(src)
        return ImageSet(items, st, dd, "files", str(src))
    st = _resolve_station(src, station, station_fallback)
    dd = Path(dark_dir) if dark_dir else _dark_dir(src)
    from pipeline.archive import load_manifest

    # A folder whose file names carry times is an archive (the scan's manifest, time-sorted;
    # files without a time are left out with a warning); one without any is a plain folder.
    man = load_manifest(src, st)
    if len(man):
        items = _items_frame(
            man["abspath"], man.get("frame"), man.get("time_utc"), relpaths=man["path"]
        )
        return ImageSet(_attach_truth(items, src), st, dd, "archive", str(src), src)
    files = _image_files(src, st)
    if not files:
        raise InputError(
            f"{src}: no images ({', '.join(st.extensions)}) found; give a labelled set, an archive, "
            "a manifest or a folder of images"
        )
    items = _items_frame([str(p) for p in files])
    return ImageSet(_attach_truth(items, src), st, dd, "folder", str(src))


def _store_set(src: Path, station: Any) -> ImageSet:
    """A frame store's items (``store_index`` added), with the station it was written for."""
    from pipeline import framestore

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
    return _dark_dir(root) if root is not None else None


# ------------------------------------------------------------------------------ features
class FrameLoader:
    """Path -> preprocessed float32 (crop, crop) frame, refusing frames of the wrong size."""

    def __init__(self, station: StationConfig, dark_dir: Path | None, what: str = "frame") -> None:
        from pipeline.labelled import FramePreprocessor

        self.station = station
        self.pre = FramePreprocessor(station, dark_dir)
        self.what = what

    def __call__(self, path: str, frame: int = 0, time: Any = None) -> np.ndarray:
        from pipeline.imageio import read_frame
        from pipeline.preprocess import preprocess

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
    their exceptions to ``failures`` when given. With ``out``
    (a float16 array, e.g. a memmap) features are written there, item j to row ``out_rows[j]``
    (default j), and the returned array is ``out`` itself (failed rows untouched).
    """
    import torch
    from tqdm.auto import tqdm

    dev = resolve_device(device)
    model = model.to(dev).eval()
    n = len(items)
    ok = np.zeros(n, bool)
    errors = []
    feats: list[np.ndarray] = []
    paths = items["path"].astype(str).tolist()
    frames = items["frame"].astype(int).tolist() if "frame" in items else [0] * n
    times = items["time_utc"].tolist() if "time_utc" in items else [None] * n
    bar = tqdm(total=n, desc=desc, unit="frame", disable=n < 2 * batch_size)

    def load(j: int) -> np.ndarray | AuroraError:
        try:
            return loader(paths[j], frames[j], times[j])
        except AuroraError as exc:
            return exc

    # Decoding and preprocessing (PIL, zlib, numpy release the GIL) overlap in a few threads.
    threads = max(1, min(4, (os.cpu_count() or 2) - 1))
    with torch.inference_mode(), ThreadPoolExecutor(threads) as pool:
        for s in range(0, n, batch_size):
            batch, rows = [], []
            span = range(s, min(n, s + batch_size))
            for j, img in zip(span, pool.map(load, span)):
                if isinstance(img, AuroraError):
                    if strict:
                        raise img
                    errors.append(error_rows([(paths[j], frames[j])], stage, img))
                    if failures is not None:
                        failures.append(img)
                else:
                    batch.append(img)
                    rows.append(j)
            if batch:
                f16 = _fc7(model, meta, np.stack(batch), dev, paths[rows[0]])
                if out is not None:
                    out[rows if out_rows is None else out_rows[rows]] = f16
                else:
                    feats.append(f16)
                ok[rows] = True
            bar.update(min(n, s + batch_size) - s)
    bar.close()
    err = (
        pd.concat(errors, ignore_index=True)
        if errors
        else pd.DataFrame(columns=ERRORS_SCHEMA.names)
    )
    if out is not None:
        return out, ok, err
    dim = int(getattr(model, "feature_dim", 0) or 0)
    arr = np.concatenate(feats) if feats else np.zeros((0, dim), np.float16)
    return arr, ok, err


def _fc7(model: Any, meta: dict[str, Any], frames: np.ndarray, dev: Any, first: str) -> np.ndarray:
    """FC7 features (float16) of preprocessed frames; a broken model is an error naming it."""
    from pipeline.models import to_model_input

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
    import torch
    from tqdm.auto import tqdm

    from pipeline.framestore import read_rows

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


# ------------------------------------------------------------------------------ index
@dataclass
class Index:
    """An opened index: features (float16 memmap), items and index.json."""

    path: Path
    features: np.ndarray
    items: pd.DataFrame
    meta: dict[str, Any]

    @property
    def labelled(self) -> bool:
        """Whether every item has a label (needed by --evaluate)."""
        return bool(len(self.items)) and bool(self.items["label"].notna().all())


def _index_file(index_dir: Path, name: str) -> Path:
    """An index file by its name, or by its earlier name in an index of the earlier layout."""
    old = index_dir / LEGACY_FILES[name]
    return old if old.is_file() and not (index_dir / name).exists() else index_dir / name


def load_index(index_dir: str | os.PathLike) -> Index:
    """Open INDEX_DIR; InputError naming the folder when it is not a complete index."""
    d = Path(index_dir)
    meta_path = _index_file(d, META_FILE)
    if not meta_path.is_file():
        raise InputError(
            f"{d}: no {META_FILE}; not a (finished) retrieval index, build one with "
            "`aurora-pipeline index --checkpoint CKPT SET --out DIR`"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{meta_path}: not valid JSON ({exc}); rebuild the index") from None
    if meta.get("format") != INDEX_FORMAT:
        raise InputError(
            f"{meta_path}: index format {meta.get('format')!r}, this version reads "
            f"{INDEX_FORMAT}; rebuild the index"
        )
    try:
        feats = np.load(_index_file(d, FEATURES_FILE), mmap_mode="r")
        items = pd.read_parquet(d / ITEMS_FILE)
    except (OSError, ValueError) as exc:
        raise InputError(f"{d}: cannot read the index files ({exc}); rebuild the index") from None
    if feats.ndim != 2 or feats.shape[0] != len(items) or feats.shape[0] != meta.get("count"):
        raise InputError(
            f"{d}: {FEATURES_FILE} has shape {feats.shape}, {ITEMS_FILE} {len(items)} rows, "
            f"{META_FILE} count {meta.get('count')}; the index is inconsistent, rebuild it"
        )
    return Index(d, feats, items, meta)


def _load_model(checkpoint: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    from pipeline.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint, map_location="cpu")


def _preprocess_station(meta: dict[str, Any]) -> Any:
    pre = meta.get("preprocess") or {}
    return pre.get("station") if isinstance(pre, dict) else None


def build_index(
    source: str | os.PathLike,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    features_dir: str | os.PathLike | None = None,
    station: str | os.PathLike | None = None,
    dark_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str = "auto",
) -> dict[str, Any]:
    """Embed every frame of SOURCE with the checkpoint's FC7 and write the index folder OUT.

    The index is built in a temporary folder beside OUT and moved in only when complete: a run
    that fails or is interrupted leaves OUT as it was (an earlier index stays usable).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file; --out takes the folder to write the index to")
    refuse_foreign_out(out, (META_FILE, LEGACY_FILES[META_FILE]), "index")
    model, meta = _load_model(checkpoint)
    iset = open_image_set(source, station, _preprocess_station(meta), dark_dir)
    if iset.kind == "store":
        from pipeline import framestore

        framestore.check_input_size(
            framestore.open_info(source), int(meta["input_size"]), checkpoint
        )
    items = iset.items.reset_index(drop=True)
    if len(items) == 0:
        raise InputError(f"{source}: no frames to index")
    shards: list[tuple[pd.DataFrame, Path]] = []
    if features_dir is not None:
        # Checked before anything is computed or written: a wrong folder fails at once.
        shards = _feature_shards_for(Path(features_dir), iset, meta)
    made = _missing_parents(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(
            f"{out}: cannot create the index folder ({exc}); choose another --out"
        ) from None
    if out.is_dir():
        # Inside OUT: the renames into it then never cross a filesystem (OUT may be a mount
        # point or a link to another disk), and a read-only parent does not matter.
        work = Path(tempfile.mkdtemp(prefix=".index.", suffix=".building", dir=out))
    else:
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".building", dir=out.parent))
    done = False
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(work, 0o777 & ~umask)  # mkdtemp makes 0700; the index gets the usual mode
        info = _build_into(
            work, iset, items, model, meta, checkpoint, features_dir, shards, batch_size, device
        )
        _install(work, out)
        done = True
        if info["n_errors"]:
            log.warning(
                "%d frames could not be indexed, see %s", info["n_errors"], out / ERRORS_FILE
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not done:
            for d in made:  # folders this run created for --out, deepest first
                try:
                    d.rmdir()
                except OSError:
                    break
    return info


def _missing_parents(out: Path) -> list[Path]:
    """The folders above ``out`` that do not exist yet, deepest first."""
    missing = []
    p = out.absolute().parent
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


def _build_into(
    work: Path,
    iset: ImageSet,
    items: pd.DataFrame,
    model: Any,
    meta: dict[str, Any],
    checkpoint: str | os.PathLike,
    features_dir: str | os.PathLike | None,
    shards: list[tuple[pd.DataFrame, Path]],
    batch_size: int,
    device: str,
) -> dict[str, Any]:
    """Write a complete index (features, items, errors, index.json) into the empty folder WORK."""
    loader = FrameLoader(iset.station, iset.dark_dir)
    dim = _feature_dim(model, meta)
    n = len(items)
    found = np.zeros(n, bool)
    errors = pd.DataFrame(columns=ERRORS_SCHEMA.names)
    feats_path = work / FEATURES_FILE
    mm = np.lib.format.open_memmap(feats_path, mode="w+", dtype=np.float16, shape=(n, dim))
    if shards:
        found = _fill_from_shards(shards, items, mm)
        shards.clear()  # their (path, frame) tables: not to be held through the embedding
        log.info("%d of %d frames reuse features from %s", found.sum(), n, features_dir)
    ok = found.copy()
    todo = np.flatnonzero(~found)
    if len(todo) and iset.kind == "store":
        rows = items["store_index"].to_numpy()[todo]
        embed_store(model, meta, iset.source, rows, mm, todo, batch_size, device)
        ok[todo] = True
    elif len(todo):
        _, ok_todo, errors = embed(
            model, meta, items.iloc[todo], loader, batch_size, device, out=mm, out_rows=todo
        )
        ok[todo[ok_todo]] = True
    mm.flush()
    del mm
    reused = int(found.sum())
    items = items[ok].reset_index(drop=True)
    if len(items) == 0:
        raise InputError(
            f"{iset.source}: no frame could be read ({errors['message'].iloc[0]}); nothing indexed"
        )
    if not ok.all():
        # Failed frames leave the index; compact in blocks so a memmap never loads whole.
        _compact(feats_path, ok)
    write_table(items, work / ITEMS_FILE, ITEMS_SCHEMA)
    if len(errors):
        write_table(errors, work / ERRORS_FILE, ERRORS_SCHEMA)
    info = {
        "format": INDEX_FORMAT,
        "model_id": meta.get("model_id"),
        "variant": meta.get("variant"),
        "checkpoint": str(Path(checkpoint).resolve()),
        "input_size": int(meta["input_size"]),
        "in_chans": int(meta.get("in_chans", 1)),
        "dim": dim,
        "count": int(len(items)),
        "dtype": "float16",
        "source": iset.source,
        "source_kind": iset.kind,
        "labelled": bool(items["label"].notna().all()),
        "station": to_dict(iset.station),
        "dark_dir": None if iset.dark_dir is None else str(Path(iset.dark_dir).resolve()),
        "features_reused": reused,
        "features_dir": None if features_dir is None else str(Path(features_dir).resolve()),
        "n_errors": int(len(errors)),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    _write_json(info, work / META_FILE)
    return info


def _install(work: Path, out: Path) -> None:
    """Move the finished index in WORK to OUT; _index.json last, so OUT never looks finished early.

    A new OUT is one rename; an existing one gets the files (anything else in it stays, but the
    files of an index of the earlier layout go first, its index.json the very first).
    """
    if not out.exists():
        os.rename(work, out)
        return
    legacy = [LEGACY_FILES[n] for n in (META_FILE, FEATURES_FILE, ERRORS_FILE)]
    install_outputs(work, out, (*legacy, FEATURES_FILE, ITEMS_FILE, ERRORS_FILE), META_FILE)


def _feature_dim(model: Any, meta: dict[str, Any]) -> int:
    dim = getattr(model, "feature_dim", None)
    if dim:
        return int(dim)
    import torch

    from pipeline.models import to_model_input

    s = int(meta["input_size"])
    with torch.inference_mode():
        x = to_model_input(np.zeros((1, s, s), np.float32), s, int(meta.get("in_chans", 1)))
        return int(model.eval().features(x).shape[1])


def _compact(path: Path, ok: np.ndarray, block: int = 65536) -> None:
    """Rewrite the .npy at ``path`` keeping only rows where ``ok`` (block by block)."""
    src = np.load(path, mmap_mode="r")
    tmp = path.with_name(path.name + ".compact")
    dst = np.lib.format.open_memmap(
        tmp, mode="w+", dtype=src.dtype, shape=(int(ok.sum()), src.shape[1])
    )
    w = 0
    for s in range(0, len(src), block):
        rows = np.asarray(src[s : s + block])[ok[s : s + block]]
        dst[w : w + len(rows)] = rows
        w += len(rows)
    dst.flush()
    del dst, src
    os.replace(tmp, path)


def _write_json(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def read_feature_shards(pred_dir: Path) -> tuple[dict[str, Any], list[tuple[pd.DataFrame, Path]]]:
    """classify-archive output with --features: (_run.json, [(shard rows (path, frame), .npy)]).

    Every listed shard is opened here (the .npy as a memmap, header and size checked), so a
    damaged one is an InputError naming it before anything is computed.
    """
    from pipeline.classify import FEATURES_DIR, features_path, read_run, shard_files

    run = read_run(pred_dir)
    if run is None:
        raise InputError(
            f"{pred_dir}: no _run.json; --features-dir takes the --out folder of "
            "`aurora-pipeline classify-archive --features`"
        )
    done = {int(k) for k in run.get("shards", {})}
    shards = []
    for s, pq_path in shard_files(pred_dir).items():
        npy = features_path(pred_dir, s)
        if s in done and npy.is_file():
            try:
                table = pd.read_parquet(pq_path, columns=["path", "frame"])
            except (OSError, ValueError) as exc:
                raise _damaged_shard(pred_dir, pq_path, pq_path, npy, str(exc)) from None
            try:
                feats = np.load(npy, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise _damaged_shard(pred_dir, npy, pq_path, npy, str(exc)) from None
            if feats.ndim != 2 or feats.shape[0] != len(table):
                why = f"shape {feats.shape}, its shard has {len(table)} rows"
                raise _damaged_shard(pred_dir, npy, pq_path, npy, why)
            shards.append((table, npy))
    if not shards:
        raise InputError(
            f"{pred_dir}: no feature shards ({FEATURES_DIR}/shard-*.npy); rerun classify-archive "
            "with --features"
        )
    return run, shards


def _damaged_shard(pred_dir: Path, bad: Path, parquet: Path, npy: Path, why: str) -> InputError:
    return InputError(
        f"{bad}: damaged classify-archive shard ({why}); delete {parquet} and {npy}, then rerun "
        f"`aurora-pipeline classify-archive ... --features --out {pred_dir}` to redo that shard, "
        "or index without --features-dir"
    )


def _feature_shards_for(
    pred_dir: Path, iset: ImageSet, meta: dict[str, Any]
) -> list[tuple[pd.DataFrame, Path]]:
    """The feature shards of PRED_DIR, if they were computed from ISET's frames by this model.

    Shards name frames relative to their archive root, so features are reused only when
    _run.json records the same archive root (and station settings) as ISET's: the same relative
    names in another archive are other frames. Anything else is refused, not silently recomputed:
    the user asked for these features.
    """
    from pipeline.classify import read_run

    run = read_run(pred_dir) or {}
    if not run:
        read_feature_shards(pred_dir)  # the error naming what --features-dir takes
    if run.get("model_id") != meta.get("model_id"):
        raise CheckpointError(
            f"{pred_dir}: features of model {run.get('model_id')} ({run.get('checkpoint')}), "
            f"not of the checkpoint's {meta.get('model_id')}; use the same checkpoint or drop "
            "--features-dir"
        )
    if iset.root is None:
        raise InputError(
            f"{pred_dir}: --features-dir reuses classify-archive features of an archive, but "
            f"{iset.source} is a {'folder of images' if iset.kind == 'folder' else 'single file'};"
            " index the archive (or its manifest) or drop --features-dir"
        )
    run_root = run.get("root")
    here = Path(iset.root).resolve()
    if not run_root or Path(run_root).resolve() != here:
        raise InputError(
            f"{pred_dir}: its features are of the archive at {run_root or '(not recorded)'}, "
            f"not {here} (frames are matched by their path in the archive, so another archive's "
            "features would be taken for these frames); give the classify-archive --features "
            "output of this archive, or drop --features-dir to compute the features"
        )
    theirs = run.get("station_config")
    ours = json.loads(json.dumps(to_dict(iset.station), default=str))
    if theirs is not None and theirs != ours:
        keys = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise InputError(
            f"{pred_dir}: its features were computed with station {run.get('station')} settings "
            f"that differ from this index's ({iset.station.code}; {', '.join(keys)}); pass the "
            "--station classify-archive used, or drop --features-dir"
        )
    return read_feature_shards(pred_dir)[1]


def _fill_from_shards(
    shards: list[tuple[pd.DataFrame, Path]], items: pd.DataFrame, out: np.ndarray
) -> np.ndarray:
    """Copy classify-archive's features of ``items`` into ``out``; returns which rows were found."""
    # Predictions hold manifest paths (relative to the archive root); items hold both forms.
    where: dict[tuple[str, int], int] = {}
    rel = items["relpath"] if "relpath" in items else items["path"]
    for j, (p, rp, f) in enumerate(zip(items["path"], rel, items["frame"])):
        where.setdefault((str(rp), int(f)), j)
        where.setdefault((str(p), int(f)), j)
    found = np.zeros(len(items), bool)
    for table, npy in shards:
        feats = np.load(npy, mmap_mode="r")
        if feats.shape[1] != out.shape[1]:
            raise InputError(
                f"{npy}: {feats.shape[1]} features per frame, the model has {out.shape[1]}; "
                "rerun classify-archive --features with this checkpoint or drop --features-dir"
            )
        src, dst = [], []
        for i, (p, f) in enumerate(zip(table["path"].astype(str), table["frame"])):
            j = where.get((p, int(f)))
            if j is not None and not found[j]:
                src.append(i)
                dst.append(j)
        if src:
            out[np.asarray(dst)] = np.asarray(feats[np.asarray(src)])
            found[np.asarray(dst)] = True
    return found


# ------------------------------------------------------------------------------ queries
def _model_for_index(
    idx: Index, checkpoint: str | os.PathLike | None
) -> tuple[Any, dict[str, Any]]:
    """The index's model (its checkpoint, or the one given); refuses one with another model_id."""
    ckpt = checkpoint or idx.meta.get("checkpoint")
    if checkpoint is None and (ckpt is None or not Path(ckpt).exists()):
        raise CheckpointError(
            f"{_index_file(idx.path, META_FILE)}: the index's checkpoint {ckpt} no longer exists; pass "
            "--checkpoint with the checkpoint the index was built with"
        )
    model, meta = _load_model(ckpt)
    if meta.get("model_id") != idx.meta.get("model_id"):
        raise CheckpointError(
            f"{ckpt}: model_id {meta.get('model_id')} differs from the index's "
            f"{idx.meta.get('model_id')} ({idx.path}); query features would not be comparable: "
            "use the index's checkpoint or rebuild the index with this one"
        )
    return model, meta


def _query_items(
    queries: Sequence[str | os.PathLike], idx: Index, station: str | os.PathLike | None
) -> tuple[pd.DataFrame, list[FrameLoader]]:
    """Items for the query paths (files, folders or labelled sets) and a loader per item."""
    frames, loaders = [], []
    for q in queries:
        iset = open_image_set(q, station, idx.meta.get("station"))
        dark_dir = iset.dark_dir
        if (
            dark_dir is None
            and idx.meta.get("dark_dir")
            and to_dict(iset.station) == idx.meta.get("station")
        ):
            # A lone query of the indexed camera: the index's dark frames (chosen by date).
            dark_dir = Path(idx.meta["dark_dir"])
        loader = FrameLoader(iset.station, dark_dir, what="query image")
        frames.append(iset.items)
        loaders.extend([loader] * len(iset.items))
    if not frames:
        raise InputError("no query images given; use --query IMAGE (repeatable) or --evaluate SET")
    items = pd.concat(frames, ignore_index=True)
    return _known_labels(items), loaders


def _known_labels(items: pd.DataFrame) -> pd.DataFrame:
    """Fill missing query labels from the labels.parquet of the set a query file lies in."""
    from pipeline.labelled import load_labelled

    items = items.copy()
    sets: dict[Path, dict[str, str]] = {}
    for j in np.flatnonzero(items["label"].isna().to_numpy()):
        path = Path(items["path"].iloc[j]).resolve()
        for parent in list(path.parents)[:3]:
            if (parent / "labels.parquet").is_file():
                if parent not in sets:
                    try:
                        df = load_labelled(parent)
                        sets[parent] = dict(zip(df["path"].astype(str), df["label"]))
                    except AuroraError:
                        sets[parent] = {}
                label = sets[parent].get(str(path))
                if label is not None:
                    items.iloc[j, items.columns.get_loc("label")] = label
                break
    return items


def _embed_each(
    model: Any,
    meta: dict[str, Any],
    items: pd.DataFrame,
    loaders: Sequence[FrameLoader],
    batch_size: int,
    device: str,
    stage: str = "retrieve",
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Query features of the readable items: (features (n_ok, dim), ok mask (n,), errors table).

    Frames that cannot be read are left out (the errors table names them); when none can be
    read, the error itself (one query) or an InputError with the first one (several) is raised.
    """
    feats, oks, errs = [], [], []
    failures: list[AuroraError] = []
    start = 0
    # Consecutive items share a loader (one per query argument): embed each run in one go.
    for j in range(1, len(items) + 1):
        if j == len(items) or loaders[j] is not loaders[start]:
            f, ok, err = embed(
                model,
                meta,
                items.iloc[start:j],
                loaders[start],
                batch_size,
                device,
                desc="query features",
                stage=stage,
                failures=failures,
            )
            feats.append(f)
            oks.append(ok)
            if len(err):
                errs.append(err)
            start = j
    ok = np.concatenate(oks) if oks else np.zeros(0, bool)
    if len(ok) and not ok.any():
        if len(ok) == 1:
            raise failures[0]
        raise InputError(
            f"none of the {len(ok)} query frames could be read, the first: {failures[0]}"
        )
    errors = (
        pd.concat(errs, ignore_index=True) if errs else pd.DataFrame(columns=ERRORS_SCHEMA.names)
    )
    return np.concatenate(feats), ok, errors


def _record_query_errors(errors: pd.DataFrame, n: int, out: Path, stage: str) -> None:
    """This run's unreadable queries in OUT/errors.parquet (an earlier run's rows of the stage go)."""
    from pipeline.storage import replace_stage_errors

    replace_stage_errors(out / QUERY_ERRORS_FILE, errors, stage)
    if len(errors):
        log.warning(
            "%d of %d query frames could not be read and are left out (see %s); the first: %s",
            len(errors),
            n,
            out / QUERY_ERRORS_FILE,
            errors["message"].iloc[0],
        )


def neighbours_table(
    q_items: pd.DataFrame, idx_items: pd.DataFrame, distances: np.ndarray, indices: np.ndarray
) -> pd.DataFrame:
    """Long table: one row per (query, rank) with the neighbour's path, time, distance, label."""
    nq, k = indices.shape
    flat = indices.reshape(-1)
    nb = idx_items.iloc[flat].reset_index(drop=True)
    return pd.DataFrame(
        {
            "query": np.repeat(q_items["path"].astype(str).to_numpy(), k),
            "query_label": np.repeat(q_items["label"].to_numpy(dtype=object), k),
            "rank": np.tile(np.arange(1, k + 1), nq),
            "path": nb["path"].astype(str).to_numpy(),
            "frame": nb["frame"].to_numpy(),
            "time_utc": nb["time_utc"].to_numpy(),
            "distance": distances.reshape(-1).astype(np.float32),
            "label": nb["label"].to_numpy(dtype=object),
        }
    )


def _write_neighbours(table: pd.DataFrame, out: Path, stem: str = "neighbours") -> None:
    write_table(table, out / f"{stem}.parquet", NEIGHBOURS_SCHEMA)
    with atomic_path(out / f"{stem}.csv") as tmp:
        table.to_csv(tmp, index=False)


def _ranks_for(ranks: str | Sequence[int] | None, k: int) -> list[int]:
    """The ranks to show: given ones as they are, the default (None: the paper's) up to ``k``."""
    if ranks is None:
        return [r for r in PAPER_RANKS if r <= k]
    return _parse_ranks(ranks)


def _check_ranks(ranks: Sequence[int], k: int, count: int) -> list[int]:
    big = [r for r in ranks if r > k]
    if big:
        raise InputError(
            f"--ranks asks for rank {big[0]} but --k is {k}; raise --k or lower --ranks"
        )
    usable = [r for r in ranks if r <= count]
    if not usable:
        raise InputError(f"the index holds {count} frames, fewer than every rank in {list(ranks)}")
    if len(usable) < len(ranks):
        log.warning("the index holds %d frames: ranks above it are left out", count)
    return usable


def retrieve(
    index_dir: str | os.PathLike,
    queries: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    k: int = 20,
    ranks: str | Sequence[int] | None = None,
    checkpoint: str | os.PathLike | None = None,
    station: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str = "auto",
    figure: bool = True,
    metric: str = "euclidean",
) -> pd.DataFrame:
    """Nearest index frames of each query image: neighbours.parquet/.csv and retrieval.png in OUT.

    The figure shows the first FIGURE_MAX_ROWS queries; the table holds them all.
    """
    _check_metric(metric)
    refuse_foreign_out(Path(out), (), "retrieve")
    ranks = _ranks_for(ranks, k)
    idx = load_index(index_dir)
    ranks = _check_ranks(ranks, k, len(idx.items))
    model, meta = _model_for_index(idx, checkpoint)
    q_items, loaders = _query_items(queries, idx, station)
    n_given = len(q_items)
    qf, ok, errors = _embed_each(model, meta, q_items, loaders, batch_size, device, "retrieve")
    if not ok.all():
        q_items = q_items[ok].reset_index(drop=True)
        loaders = [ld for ld, good in zip(loaders, ok) if good]
    d, i = knn(qf, idx.features, k, metric=metric, device=device, progress=len(idx.items) > 100_000)
    table = neighbours_table(q_items, idx.items, d, i)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_neighbours(table, out)
    _record_query_errors(errors, n_given, out, "retrieve")
    if figure:
        m = min(len(q_items), FIGURE_MAX_ROWS)
        if m < len(q_items):
            log.warning("figure shows the first %d of %d queries", m, len(q_items))
        shown = q_items.iloc[:m].reset_index(drop=True)
        query_frames = [_try_load(ld, p, f, t) for ld, p, f, t in _iter_items(shown, loaders[:m])]
        retrieval_figure(
            query_frames,
            shown,
            idx,
            i[:m],
            d[:m],
            ranks,
            out / "retrieval.png",
            _title(idx, metric),
        )
    _write_json(
        {
            "index": str(Path(index_dir).resolve()),
            "model_id": meta.get("model_id"),
            "queries": [str(q) for q in q_items["path"]],
            "n_unreadable": int(len(errors)),
            "k": k,
            "ranks": ranks,
            "metric": metric,
        },
        out / "retrieve.json",
    )
    return table


def _parse_ranks(ranks: str | Sequence[int]) -> list[int]:
    try:
        return parse_ranks(ranks)
    except ValueError as exc:
        raise InputError(f"--ranks: {exc}") from None


def _try_load(loader: FrameLoader, path: str, frame: int, time: Any) -> np.ndarray | None:
    """A query frame for the figure; None (drawn as missing) if it became unreadable since."""
    try:
        return loader(path, frame, time)
    except AuroraError as exc:
        log.warning("cannot show %s: %s", path, exc)
        return None


def _iter_items(items: pd.DataFrame, loaders: Sequence[FrameLoader]) -> Iterable[tuple]:
    for ld, p, f, t in zip(loaders, items["path"], items["frame"], items["time_utc"]):
        yield ld, str(p), int(f), t


def _title(idx: Index, metric: str = "euclidean") -> str:
    return (
        f"FC7 retrieval ({idx.meta.get('variant')}, model {str(idx.meta.get('model_id'))[:12]}, "
        f"{metric}), {idx.meta.get('count')} frames indexed"
    )


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise InputError(f"--metric {metric!r}: allowed {', '.join(METRICS)}")


# ------------------------------------------------------------------------------ evaluation
def evaluate_retrieval(
    index_dir: str | os.PathLike,
    query_set: str | os.PathLike,
    out: str | os.PathLike,
    k: int = 20,
    ranks: str | Sequence[int] | None = None,
    checkpoint: str | os.PathLike | None = None,
    station: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str = "auto",
    figure: bool = True,
    metric: str = "euclidean",
) -> dict[str, Any]:
    """Precision at ``ranks`` and mAP@k per class of a labelled query set (Markdown + JSON in OUT).

    QUERY_SET is a labelled set (features computed with the index's model) or another index
    built with the same model. Queries that are also index items do not retrieve themselves.
    The figure retrieval.png shows the first query of each class (the paper's Fig. 6).
    """
    _check_metric(metric)
    refuse_foreign_out(Path(out), (), "retrieve")
    ranks = _ranks_for(ranks, k)
    idx = load_index(index_dir)
    if not idx.labelled:
        raise InputError(
            f"{idx.path}: the index has frames without labels (built from {idx.meta.get('source')}); "
            "--evaluate needs an index of a labelled set (labels.parquet or truth.parquet)"
        )
    ranks = _check_ranks(ranks, k, len(idx.items))
    qpath = Path(query_set)
    loaders: list[FrameLoader] | None = None
    errs = pd.DataFrame(columns=ERRORS_SCHEMA.names)
    n_given = 0
    if _index_file(qpath, META_FILE).is_file():
        qidx = load_index(qpath)
        if qidx.meta.get("model_id") != idx.meta.get("model_id"):
            raise CheckpointError(
                f"{qpath}: query index model_id {qidx.meta.get('model_id')} differs from "
                f"{idx.path}'s {idx.meta.get('model_id')}; build both with one checkpoint"
            )
        q_items, qf, model_id = qidx.items, np.asarray(qidx.features), qidx.meta.get("model_id")
        n_given = len(q_items)
    else:
        model, meta = _model_for_index(idx, checkpoint)
        iset = open_image_set(qpath, station, idx.meta.get("station"))
        q_items = iset.items
        n_given = len(q_items)
        loader = FrameLoader(iset.station, iset.dark_dir, what="query image")
        qf, ok, errs = _embed_each(
            model, meta, q_items, [loader] * n_given, batch_size, device, "evaluate"
        )
        q_items = q_items[ok].reset_index(drop=True)
        loaders = [loader] * len(q_items)
        model_id = meta.get("model_id")
    if len(q_items) == 0 or q_items["label"].isna().any():
        raise InputError(f"{qpath}: --evaluate needs a labelled query set (labels.parquet)")
    self_index = _self_positions(q_items, idx.items)
    overlap = bool((self_index >= 0).any())
    kk = min(k + (1 if overlap else 0), len(idx.items))
    d, i = knn(
        qf, idx.features, kk, metric=metric, device=device, progress=len(idx.items) > 100_000
    )
    if overlap:
        from pipeline.retrieval import drop_self

        d, i = drop_self(d, i, self_index, k)
    ranks = [r for r in ranks if r <= i.shape[1]]
    neigh_labels = idx.items["label"].to_numpy(dtype=object)[i]
    scores = retrieval_scores(
        neigh_labels,
        q_items["label"].to_numpy(dtype=object),
        ranks,
        index_labels=idx.items["label"].to_numpy(dtype=object),
        classes=CLASSES,
        self_in_index=self_index >= 0,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_neighbours(neighbours_table(q_items, idx.items, d, i), out, "eval_neighbours")
    _record_query_errors(errs, n_given, out, "evaluate")
    result = {
        "index": str(idx.path.resolve()),
        "index_source": idx.meta.get("source"),
        "queries": str(qpath.resolve()),
        "model_id": model_id,
        "variant": idx.meta.get("variant"),
        "metric": metric,
        "k": int(i.shape[1]),
        "ranks": ranks,
        "self_matches_excluded": overlap,
        "map_definition": (
            "AP@K = sum_i P@i * rel_i / min(R, K), R = frames of the query's class in the index"
        ),
        "n_queries": int(len(q_items)),
        "n_unreadable": int(len(errs)),
        "n_index": int(len(idx.items)),
        # NaN (a class without queries) becomes null: strict JSON readers reject NaN.
        "scores": [
            {c: (None if isinstance(v, float) and np.isnan(v) else v) for c, v in row.items()}
            for row in scores.to_dict(orient="records")
        ],
    }
    _write_json(result, out / "retrieval_eval.json")
    with atomic_path(out / "retrieval_eval.md") as tmp:
        tmp.write_text(scores_markdown(scores, result))
    if figure:
        # One query per class (the first of each), as in the paper's Fig. 6.
        first = [
            int(np.flatnonzero(q_items["label"].to_numpy() == c)[0])
            for c in CLASSES
            if (q_items["label"] == c).any()
        ]
        if loaders is None:
            frames = [_display_frame(qidx, r) for r in first]
        else:
            frames = [
                _try_load(
                    loaders[r],
                    str(q_items["path"][r]),
                    int(q_items["frame"][r]),
                    q_items["time_utc"][r],
                )
                for r in first
            ]
        retrieval_figure(
            frames,
            q_items.iloc[first].reset_index(drop=True),
            idx,
            i[first],
            d[first],
            ranks,
            out / "retrieval.png",
            title=_title(idx, metric),
        )
    return result


def _self_positions(q_items: pd.DataFrame, idx_items: pd.DataFrame) -> np.ndarray:
    """Index row of each query (same path and frame), -1 where it is not in the index."""
    where = {
        (str(p), int(f)): j for j, (p, f) in enumerate(zip(idx_items["path"], idx_items["frame"]))
    }
    return np.array(
        [where.get((str(p), int(f)), -1) for p, f in zip(q_items["path"], q_items["frame"])],
        np.int64,
    )


def scores_markdown(scores: pd.DataFrame, info: dict[str, Any]) -> str:
    """The evaluation as a Markdown table (one row per class and ``all``)."""
    cols = [c for c in scores.columns if c.startswith("p@")]
    head = ["class", "queries", *[f"P@{c[2:]}" for c in cols], f"mAP@{info['k']}"]
    lines = [
        f"# Retrieval evaluation (FC7, {info['metric']} distance)",
        "",
        f"Index `{info['index']}` ({info['n_index']} frames), queries `{info['queries']}` "
        f"({info['n_queries']} frames), model `{info['model_id']}` ({info['variant']}).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for _, row in scores.iterrows():
        vals = [f"{row[c]:.3f}" if pd.notna(row[c]) else "n/a" for c in [*cols, "map"]]
        lines.append(f"| {row['class']} | {int(row['n_queries'])} | " + " | ".join(vals) + " |")
    lines += [
        "",
        f"P@k: share of the top k neighbours with the query's class. {info['map_definition']}.",
    ]
    if info.get("self_matches_excluded"):
        lines.append("Queries that are index frames do not count themselves as neighbours.")
    if info.get("n_unreadable"):
        lines.append(
            f"{info['n_unreadable']} query frames could not be read and are left out "
            "(errors.parquet)."
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ figure
def _display_frame(idx: Index, row: int) -> np.ndarray | None:
    """Index item ``row`` preprocessed as when indexed; None when its file is gone or unreadable."""
    loader = getattr(idx, "_loader", None)
    if loader is None:
        st = _resolve_station(None, None, idx.meta.get("station"))
        dd = idx.meta.get("dark_dir")
        loader = FrameLoader(st, Path(dd) if dd else None)
        idx._loader = loader  # type: ignore[attr-defined]
    it = idx.items.iloc[row]
    try:
        return loader(str(it["path"]), int(it["frame"]), it["time_utc"])
    except AuroraError as exc:
        log.warning("cannot show %s: %s", it["path"], exc)
        return None


def retrieval_grid(
    query_frames: Sequence[np.ndarray | None],
    query_labels: Sequence[str | None],
    neighbour_frames: Sequence[Sequence[np.ndarray | None]],
    neighbour_labels: Sequence[Sequence[str | None]],
    ranks: Sequence[int],
    distances: np.ndarray | None = None,
    row_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Any:
    """Fig. 6-style grid: queries in the first column, neighbours at ``ranks`` after; a Figure.

    Borders take the class colour where a label is known (red arc, green drapery, yellow radial,
    blue hotspot); a neighbour whose class differs from its query's gets a dashed border.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    nrow, ncol = len(query_frames), 1 + len(ranks)
    fig, axes = plt.subplots(
        nrow, ncol, figsize=(1.6 * ncol, 1.6 * nrow + 0.6), squeeze=False, constrained_layout=True
    )

    def panel(ax: Any, img: np.ndarray | None, label: str | None, dashed: bool = False) -> None:
        if img is None:
            ax.text(0.5, 0.5, "missing", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.imshow(img, cmap="gray", vmin=0.0, vmax=max(1.0, float(np.max(img))))
        ax.set_xticks([])
        ax.set_yticks([])
        colour = CLASS_COLOURS.get(label or "", "0.6")
        for sp in ax.spines.values():
            sp.set_edgecolor(colour)
            sp.set_linewidth(3.5 if label else 0.8)
            sp.set_linestyle("--" if dashed else "-")

    for r in range(nrow):
        ql = query_labels[r]
        panel(axes[r, 0], query_frames[r], ql)
        if row_names is not None:
            axes[r, 0].set_ylabel(row_names[r], fontsize=6)
        for c in range(len(ranks)):
            ax = axes[r, c + 1]
            nl = neighbour_labels[r][c]
            panel(ax, neighbour_frames[r][c], nl, dashed=bool(ql and nl and nl != ql))
            if distances is not None:
                ax.set_xlabel(f"d={distances[r][c]:.3g}", fontsize=6)
    axes[0, 0].set_title("query", fontsize=8)
    for c, rank in enumerate(ranks):
        axes[0, c + 1].set_title(f"rank {rank}", fontsize=8)
    handles = [
        Line2D([], [], color=CLASS_COLOURS[c], lw=3, label=c)
        for c in CLASSES
        if c in set(query_labels) | {x for row in neighbour_labels for x in row}
    ]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    return fig


def retrieval_figure(
    query_frames: Sequence[np.ndarray | None],
    q_items: pd.DataFrame,
    idx: Index,
    indices: np.ndarray,
    distances: np.ndarray,
    ranks: Sequence[int],
    path: Path,
    title: str | None = None,
) -> Path:
    """Draw :func:`retrieval_grid` for queries and their neighbours and save it atomically."""
    import matplotlib.pyplot as plt

    cols = [r - 1 for r in ranks]
    n_frames = [
        [_display_frame(idx, int(indices[q, c])) for c in cols] for q in range(len(indices))
    ]
    labels = idx.items["label"].to_numpy(dtype=object)
    n_labels = [[_lab(labels[int(indices[q, c])]) for c in cols] for q in range(len(indices))]
    fig = retrieval_grid(
        query_frames,
        [_lab(v) for v in q_items["label"]],
        n_frames,
        n_labels,
        ranks,
        distances=distances[:, cols],
        row_names=[Path(p).name for p in q_items["path"]],
        title=title,
    )
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def _lab(v: Any) -> str | None:
    return None if v is None or pd.isna(v) else str(v)
