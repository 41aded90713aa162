"""classify-archive's FC7 feature shards (``--features``), reused by ``index --features-dir``.

Features are reused only when the predictions folder's ``_run.json`` names the index's model,
archive root and station settings; anything else is refused rather than silently recomputed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import to_dict
from pipeline.errors import CheckpointError, InputError
from pipeline.predictions import FEATURES_DIR, features_path, read_run, shard_files
from pipeline.retrieval_images import ImageSet

#: One shard: its rows (path, frame) and its features' .npy.
Shard = tuple[pd.DataFrame, Path]


def read_feature_shards(pred_dir: Path) -> tuple[dict[str, Any], list[Shard]]:
    """classify-archive output with --features: (_run.json, [(shard rows (path, frame), .npy)]).

    Every listed shard is opened here (the .npy as a memmap, header and size checked), so a
    damaged one is an InputError naming it before anything is computed.
    """
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
            shards.append(_open_shard(pred_dir, pq_path, npy))
    if not shards:
        raise InputError(
            f"{pred_dir}: no feature shards ({FEATURES_DIR}/shard-*.npy); rerun classify-archive "
            "with --features"
        )
    return run, shards


def _open_shard(pred_dir: Path, pq_path: Path, npy: Path) -> Shard:
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
    return table, npy


def _damaged_shard(pred_dir: Path, bad: Path, parquet: Path, npy: Path, why: str) -> InputError:
    return InputError(
        f"{bad}: damaged classify-archive shard ({why}); delete {parquet} and {npy}, then rerun "
        f"`aurora-pipeline classify-archive ... --features --out {pred_dir}` to redo that shard, "
        "or index without --features-dir"
    )


def feature_shards_for(pred_dir: Path, iset: ImageSet, meta: dict[str, Any]) -> list[Shard]:
    """The feature shards of PRED_DIR, if they were computed from ISET's frames by this model.

    Shards name frames relative to their archive root, so features are reused only when
    _run.json records the same archive root (and station settings) as ISET's: the same relative
    names in another archive are other frames. Anything else is refused, not silently recomputed:
    the user asked for these features.
    """
    run = read_run(pred_dir) or {}
    if not run:
        read_feature_shards(pred_dir)  # the error naming what --features-dir takes
    if run.get("model_id") != meta.get("model_id"):
        raise CheckpointError(
            f"{pred_dir}: features of model {run.get('model_id')} ({run.get('checkpoint')}), "
            f"not of the checkpoint's {meta.get('model_id')}; use the same checkpoint or drop "
            "--features-dir"
        )
    _refuse_other_frames(pred_dir, run, iset)
    return read_feature_shards(pred_dir)[1]


def _refuse_other_frames(pred_dir: Path, run: dict[str, Any], iset: ImageSet) -> None:
    """InputError unless the run's features are of ISET's archive, preprocessed as ISET's."""
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


def fill_from_shards(shards: list[Shard], items: pd.DataFrame, out: np.ndarray) -> np.ndarray:
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
