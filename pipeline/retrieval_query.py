"""``retrieve --query``: the nearest index frames of query images.

OUT (docs/design.md, "Output folders") gets the neighbours table (``neighbours.parquet`` and
``.csv``), the Fig. 6-style grid ``retrieval.png`` and ``_run.json`` (the index, model_id,
the queries, k, ranks, metric). Query frames that cannot be read are left out and listed in
``errors.parquet``. ``retrieve --evaluate`` (:mod:`pipeline.retrieval_eval`) writes the same
kind of folder, with the helpers shared here.

The science (kNN, precision@k, AP) lives in :mod:`pipeline.retrieval`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.checkpoint import load_checkpoint
from pipeline.config import to_dict
from pipeline.errors import AuroraError, CheckpointError, InputError
from pipeline.labelled import load_labelled
from pipeline.output_folder import RUN_RECORD, OutputFolder, refuse_foreign_out
from pipeline.retrieval import METRICS, knn, parse_ranks
from pipeline.retrieval_features import embed
from pipeline.retrieval_figure import figure_title, item_frame, retrieval_figure
from pipeline.retrieval_images import FrameLoader, open_image_set
from pipeline.retrieval_index import Index, load_index
from pipeline.storage import ERRORS_SCHEMA, atomic_path, empty_frame, write_table

log = logging.getLogger(__name__)

COMMAND = "retrieve"
#: The unreadable queries of a run.
QUERY_ERRORS_FILE = "errors.parquet"
FIGURE_FILE = "retrieval.png"
#: What a ``retrieve`` run (--query or --evaluate) installs; a name the run did not write goes,
#: so OUT holds one run's outputs.
RETRIEVE_OUTPUTS = (
    "neighbours.parquet",
    "neighbours.csv",
    "eval_neighbours.parquet",
    "eval_neighbours.csv",
    "retrieval_eval.json",
    "retrieval_eval.md",
    FIGURE_FILE,
    QUERY_ERRORS_FILE,
)
PAPER_RANKS: tuple[int, ...] = (1, 3, 5, 8, 10, 15, 20)
#: Query rows drawn in retrieval.png at most (the tables hold every query).
FIGURE_MAX_ROWS = 16

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
    idx, ranks = open_for_queries(index_dir, out, k, ranks, metric)
    model, meta = model_for_index(idx, checkpoint)
    q_items, loaders = query_items(queries, idx, station)
    n_given = len(q_items)
    qf, ok, errors = embed_queries(model, meta, q_items, loaders, batch_size, device, COMMAND)
    q_items = q_items[ok].reset_index(drop=True)
    loaders = [ld for ld, good in zip(loaders, ok) if good]
    d, i = search(idx, qf, k, metric, device)
    table = neighbours_table(q_items, idx.items, d, i)
    record = {
        "mode": "query",
        "index": str(Path(index_dir).resolve()),
        "model_id": meta.get("model_id"),
        "queries": [str(q) for q in q_items["path"]],
        "k": k,
        "ranks": ranks,
        "metric": metric,
    }
    with OutputFolder(out, COMMAND, record) as folder:
        write_neighbours(table, folder.staging)
        write_query_errors(errors, n_given, folder)
        if figure:
            m = min(len(q_items), FIGURE_MAX_ROWS)
            if m < len(q_items):
                log.warning("figure shows the first %d of %d queries", m, len(q_items))
            shown = q_items.iloc[:m].reset_index(drop=True)
            frames = [item_frame(ld, shown, r) for r, ld in enumerate(loaders[:m])]
            path = folder.staging / FIGURE_FILE
            retrieval_figure(
                frames, shown, idx, i[:m], d[:m], ranks, path, figure_title(idx, metric)
            )
        folder.install(RETRIEVE_OUTPUTS, n_unreadable=int(len(errors)))
    return table


def open_for_queries(
    index_dir: str | os.PathLike,
    out: str | os.PathLike,
    k: int,
    ranks: str | Sequence[int] | None,
    metric: str,
) -> tuple[Index, list[int]]:
    """Check a ``retrieve`` run's settings and OUT, open its index: (index, the ranks to show)."""
    if metric not in METRICS:
        raise InputError(f"--metric {metric!r}: allowed {', '.join(METRICS)}")
    refuse_foreign_out(Path(out), COMMAND)
    if ranks is None:  # the paper's, up to k
        wanted = [r for r in PAPER_RANKS if r <= k]
    else:
        try:
            wanted = parse_ranks(ranks)
        except ValueError as exc:
            raise InputError(f"--ranks: {exc}") from None
    idx = load_index(index_dir)
    return idx, _usable_ranks(wanted, k, len(idx.items))


def _usable_ranks(ranks: Sequence[int], k: int, count: int) -> list[int]:
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


def model_for_index(idx: Index, checkpoint: str | os.PathLike | None) -> tuple[Any, dict[str, Any]]:
    """The index's model (its checkpoint, or the one given); refuses one with another model_id."""
    ckpt = checkpoint or idx.meta.get("checkpoint")
    if checkpoint is None and (ckpt is None or not Path(ckpt).exists()):
        raise CheckpointError(
            f"{idx.path / RUN_RECORD}: the index's checkpoint {ckpt} no longer exists; pass "
            "--checkpoint with the checkpoint the index was built with"
        )
    model, meta = load_checkpoint(ckpt, map_location="cpu")
    if meta.get("model_id") != idx.meta.get("model_id"):
        raise CheckpointError(
            f"{ckpt}: model_id {meta.get('model_id')} differs from the index's "
            f"{idx.meta.get('model_id')} ({idx.path}); query features would not be comparable: "
            "use the index's checkpoint or rebuild the index with this one"
        )
    return model, meta


def query_items(
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


def embed_queries(
    model: Any,
    meta: dict[str, Any],
    items: pd.DataFrame,
    loaders: Sequence[FrameLoader],
    batch_size: int,
    device: str,
    stage: str = COMMAND,
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
    errors = pd.concat(errs, ignore_index=True) if errs else empty_frame(ERRORS_SCHEMA)
    return np.concatenate(feats), ok, errors


def search(
    idx: Index, features: np.ndarray, k: int, metric: str, device: str
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest index rows of each feature row: (distances, indices), both (n, k)."""
    return knn(
        features, idx.features, k, metric=metric, device=device, progress=len(idx.items) > 100_000
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


def write_neighbours(table: pd.DataFrame, folder: Path, stem: str = "neighbours") -> None:
    """The neighbours table as FOLDER/STEM.parquet and .csv."""
    write_table(table, folder / f"{stem}.parquet", NEIGHBOURS_SCHEMA)
    with atomic_path(folder / f"{stem}.csv") as tmp:
        table.to_csv(tmp, index=False)


def write_query_errors(errors: pd.DataFrame, n: int, folder: OutputFolder) -> None:
    """The run's unreadable queries (of ``n``) into the staged errors.parquet, with a warning."""
    if not len(errors):
        return
    write_table(errors, folder.staging / QUERY_ERRORS_FILE, ERRORS_SCHEMA)
    log.warning(
        "%d of %d query frames could not be read and are left out (see %s); the first: %s",
        len(errors),
        n,
        folder.path / QUERY_ERRORS_FILE,
        errors["message"].iloc[0],
    )
