"""The retrieval index: build one (``index``) from an image set and a checkpoint, open one.

An index is one folder, whose only table is ``items.parquet`` (the other files start with ``_``,
so ``pd.read_parquet(INDEX)`` gives the items):

- ``_features.npy``: float16 (count, dim) FC7 features, opened as a memmap when searched;
- ``items.parquet``: one row per feature row: ``path`` (absolute), ``frame``, ``time_utc``,
  ``label`` (null where unknown);
- ``_errors.parquet`` when some frames could not be read (they are left out of the index);
- ``_run.json``: the run record (docs/design.md, "Output folders"): command ``index``, format,
  model_id, variant, checkpoint (absolute path), input_size, in_chans, dim, count, the station
  and dark-frame folder used to preprocess the frames, the source; written last, so a folder
  whose record does not say ``finished`` is not an index.

``index`` writes the files into OUT's staging folder and moves them in only when the index is
complete, so a failed or interrupted build leaves OUT as it was. ``--features-dir`` reuses
classify-archive's features (:mod:`pipeline.retrieval_shards`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline import framestore
from pipeline.checkpoint import load_checkpoint
from pipeline.config import to_dict
from pipeline.errors import InputError
from pipeline.output_folder import (
    RUN_RECORD,
    OutputFolder,
    is_finished,
    read_run_record,
    refuse_foreign_out,
)
from pipeline.retrieval_features import embed, embed_store, feature_dim
from pipeline.retrieval_images import FrameLoader, ImageSet, open_image_set
from pipeline.retrieval_shards import Shard, feature_shards_for, fill_from_shards
from pipeline.storage import ERRORS_SCHEMA, empty_frame, write_table

log = logging.getLogger(__name__)

COMMAND = "index"
INDEX_FORMAT = 1
FEATURES_FILE = "_features.npy"
ITEMS_FILE = "items.parquet"
ERRORS_FILE = "_errors.parquet"
#: What ``index`` installs in OUT (its run record last); a name a run did not write goes.
INDEX_OUTPUTS = (FEATURES_FILE, ITEMS_FILE, ERRORS_FILE)

#: items.parquet: what each feature row is.
ITEMS_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("frame", pa.int16()),
        ("time_utc", pa.timestamp("ns", tz="UTC")),
        ("label", pa.string()),
    ]
)


@dataclass
class Index:
    """An opened index: features (float16 memmap), items and its run record."""

    path: Path
    features: np.ndarray
    items: pd.DataFrame
    meta: dict[str, Any]

    @property
    def labelled(self) -> bool:
        """Whether every item has a label (needed by --evaluate)."""
        return bool(len(self.items)) and bool(self.items["label"].notna().all())


def is_index(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds a finished index."""
    return is_finished(folder, COMMAND)


def load_index(index_dir: str | os.PathLike) -> Index:
    """Open INDEX_DIR; InputError naming the folder when it is not a complete index."""
    d = Path(index_dir)
    if not is_index(d):
        raise InputError(
            f"{d}: no {RUN_RECORD} of a finished `index` run; not a (finished) retrieval index, "
            "build one with `aurora-pipeline index --checkpoint CKPT SET --out DIR`"
        )
    meta = read_run_record(d) or {}
    if meta.get("format") != INDEX_FORMAT:
        raise InputError(
            f"{d / RUN_RECORD}: index format {meta.get('format')!r}, this version reads "
            f"{INDEX_FORMAT}; rebuild the index"
        )
    try:
        feats = np.load(d / FEATURES_FILE, mmap_mode="r")
        items = pd.read_parquet(d / ITEMS_FILE)
    except (OSError, ValueError) as exc:
        raise InputError(f"{d}: cannot read the index files ({exc}); rebuild the index") from None
    if feats.ndim != 2 or feats.shape[0] != len(items) or feats.shape[0] != meta.get("count"):
        raise InputError(
            f"{d}: {FEATURES_FILE} has shape {feats.shape}, {ITEMS_FILE} {len(items)} rows, "
            f"{RUN_RECORD} count {meta.get('count')}; the index is inconsistent, rebuild it"
        )
    return Index(d, feats, items, meta)


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

    Returns the run record. Everything that can be checked (OUT, the checkpoint, the set,
    ``features_dir``) is checked before anything is computed or written.
    """
    out = Path(out)
    refuse_foreign_out(out, COMMAND)
    model, meta = load_checkpoint(checkpoint, map_location="cpu")
    iset = open_image_set(source, station, _preprocess_station(meta), dark_dir)
    if iset.kind == "store":
        info = framestore.open_info(source)
        framestore.check_input_size(info, int(meta["input_size"]), checkpoint)
    items = iset.items.reset_index(drop=True)
    if len(items) == 0:
        raise InputError(f"{source}: no frames to index")
    shards = [] if features_dir is None else feature_shards_for(Path(features_dir), iset, meta)
    build = IndexBuild(iset, model, meta, Path(checkpoint), features_dir, batch_size, device)
    with _parents_made_for(out), OutputFolder(out, COMMAND) as folder:
        record = build.write(folder.staging, items, shards)
        folder.install(INDEX_OUTPUTS, **record)
    if record["n_errors"]:
        log.warning("%d frames could not be indexed, see %s", record["n_errors"], out / ERRORS_FILE)
    return record


def _preprocess_station(meta: dict[str, Any]) -> Any:
    pre = meta.get("preprocess") or {}
    return pre.get("station") if isinstance(pre, dict) else None


@contextlib.contextmanager
def _parents_made_for(out: Path) -> Iterator[None]:
    """Create the folders above OUT; a run that fails removes the ones it created."""
    made = []  # deepest first
    p = out.absolute().parent
    while not p.exists() and p != p.parent:
        made.append(p)
        p = p.parent
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(
            f"{out}: cannot create the index folder ({exc}); choose another --out"
        ) from None
    try:
        yield
    except BaseException:
        for d in made:
            try:
                d.rmdir()
            except OSError:
                break
        raise


@dataclass
class IndexBuild:
    """One ``index`` run: the set it embeds, the model, and how to run it."""

    iset: ImageSet
    model: Any
    meta: dict[str, Any]
    checkpoint: Path
    features_dir: str | os.PathLike | None
    batch_size: int
    device: str

    def write(self, work: Path, items: pd.DataFrame, shards: list[Shard]) -> dict[str, Any]:
        """Write a complete index (features, items, errors) into WORK; returns its run record."""
        feats_path = work / FEATURES_FILE
        dim = feature_dim(self.model, self.meta)
        ok, reused, errors = self._features(feats_path, dim, items, shards)
        items = items[ok].reset_index(drop=True)
        if len(items) == 0:
            raise InputError(
                f"{self.iset.source}: no frame could be read ({errors['message'].iloc[0]}); "
                "nothing indexed"
            )
        if not ok.all():
            _compact(feats_path, ok)  # failed frames leave the index
        write_table(items, work / ITEMS_FILE, ITEMS_SCHEMA)
        if len(errors):
            write_table(errors, work / ERRORS_FILE, ERRORS_SCHEMA)
        return self._record(items, dim, reused, len(errors))

    def _features(
        self, path: Path, dim: int, items: pd.DataFrame, shards: list[Shard]
    ) -> tuple[np.ndarray, int, pd.DataFrame]:
        """Features of ``items`` into the .npy at PATH: (ok mask, rows reused, errors table)."""
        n = len(items)
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
        found = np.zeros(n, bool)
        if shards:
            found = fill_from_shards(shards, items, mm)
            shards.clear()  # their (path, frame) tables: not to be held through the embedding
            log.info("%d of %d frames reuse features from %s", found.sum(), n, self.features_dir)
        ok, errors = found.copy(), empty_frame(ERRORS_SCHEMA)
        todo = np.flatnonzero(~found)
        if len(todo) and self.iset.kind == "store":
            rows = items["store_index"].to_numpy()[todo]
            embed_store(
                self.model,
                self.meta,
                self.iset.source,
                rows,
                mm,
                todo,
                self.batch_size,
                self.device,
            )
            ok[todo] = True
        elif len(todo):
            loader = FrameLoader(self.iset.station, self.iset.dark_dir)
            _, ok_todo, errors = embed(
                self.model,
                self.meta,
                items.iloc[todo],
                loader,
                self.batch_size,
                self.device,
                out=mm,
                out_rows=todo,
            )
            ok[todo[ok_todo]] = True
        mm.flush()
        del mm
        return ok, int(found.sum()), errors

    def _record(self, items: pd.DataFrame, dim: int, reused: int, n_errors: int) -> dict[str, Any]:
        meta, iset = self.meta, self.iset
        return {
            "format": INDEX_FORMAT,
            "model_id": meta.get("model_id"),
            "variant": meta.get("variant"),
            "checkpoint": str(self.checkpoint.resolve()),
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
            "features_dir": (
                None if self.features_dir is None else str(Path(self.features_dir).resolve())
            ),
            "n_errors": n_errors,
            "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }


def _compact(path: Path, ok: np.ndarray, block: int = 65536) -> None:
    """Rewrite the .npy at ``path`` keeping only rows where ``ok``, block by block (a memmap
    never loads whole)."""
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
