"""``retrieve --evaluate``: precision@k and mAP@k per class of a labelled query set.

OUT (docs/design.md, "Output folders") gets ``retrieval_eval.json`` and ``.md`` (the scores),
``eval_neighbours.parquet``/``.csv``, ``retrieval.png`` (the first query of each class, as the
paper's Fig. 6) and ``_run.json``; unreadable query frames are listed in ``errors.parquet``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.classes import CLASSES
from pipeline.errors import CheckpointError, InputError
from pipeline.output_folder import OutputFolder, write_json
from pipeline.retrieval import drop_self, retrieval_scores
from pipeline.retrieval_figure import figure_title, index_frames, item_frame, retrieval_figure
from pipeline.retrieval_images import FrameLoader, open_image_set
from pipeline.retrieval_index import Index, is_index, load_index
from pipeline.retrieval_query import (
    COMMAND,
    FIGURE_FILE,
    RETRIEVE_OUTPUTS,
    embed_queries,
    model_for_index,
    neighbours_table,
    open_for_queries,
    search,
    write_neighbours,
    write_query_errors,
)
from pipeline.storage import ERRORS_SCHEMA, empty_frame

MAP_DEFINITION = (
    "AP@K = sum_i P@i * rel_i / min(R, K), R = frames of the query's class in the index"
)


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
    idx, ranks = open_for_queries(index_dir, out, k, ranks, metric)
    if not idx.labelled:
        raise InputError(
            f"{idx.path}: the index has frames without labels "
            f"(built from {idx.meta.get('source')}); "
            "--evaluate needs an index of a labelled set (labels.parquet or truth.parquet)"
        )
    q = QuerySet.open(Path(query_set), idx, checkpoint, station, batch_size, device)
    self_index = _self_positions(q.items, idx.items)
    overlap = bool((self_index >= 0).any())
    kk = min(k + (1 if overlap else 0), len(idx.items))
    d, i = search(idx, q.features, kk, metric, device)
    if overlap:
        d, i = drop_self(d, i, self_index, k)
    ranks = [r for r in ranks if r <= i.shape[1]]
    scores = retrieval_scores(
        idx.items["label"].to_numpy(dtype=object)[i],
        q.items["label"].to_numpy(dtype=object),
        ranks,
        index_labels=idx.items["label"].to_numpy(dtype=object),
        classes=CLASSES,
        self_in_index=self_index >= 0,
    )
    result = _result(idx, q, scores, metric, int(i.shape[1]), ranks, overlap)
    settings = {
        key: result[key] for key in ("index", "queries", "model_id", "metric", "k", "ranks")
    }
    with OutputFolder(out, COMMAND, {"mode": "evaluate", **settings}) as folder:
        write_neighbours(
            neighbours_table(q.items, idx.items, d, i), folder.staging, "eval_neighbours"
        )
        write_query_errors(q.errors, q.n_given, folder)
        write_json(folder.staging / "retrieval_eval.json", result)
        (folder.staging / "retrieval_eval.md").write_text(scores_markdown(scores, result))
        if figure:
            # One query per class (the first of each), as in the paper's Fig. 6.
            labels = q.items["label"].to_numpy()
            first = [int(np.flatnonzero(labels == c)[0]) for c in CLASSES if (labels == c).any()]
            shown = q.items.iloc[first].reset_index(drop=True)
            path, title = folder.staging / FIGURE_FILE, figure_title(idx, metric)
            retrieval_figure(q.frames(first), shown, idx, i[first], d[first], ranks, path, title)
        folder.install(
            RETRIEVE_OUTPUTS, n_queries=result["n_queries"], n_unreadable=result["n_unreadable"]
        )
    return result


@dataclass
class QuerySet:
    """The labelled queries of an evaluation: items, their FC7 features, what could not be read."""

    items: pd.DataFrame
    features: np.ndarray
    model_id: Any
    path: Path
    n_given: int
    errors: pd.DataFrame
    #: the query set when it is an index (its frames shown as indexed), else the frames' loader
    index: Index | None = None
    loader: FrameLoader | None = None

    @classmethod
    def open(
        cls,
        path: Path,
        idx: Index,
        checkpoint: str | os.PathLike | None,
        station: str | os.PathLike | None,
        batch_size: int,
        device: str,
    ) -> QuerySet:
        """The queries of PATH (a labelled set, or an index built with ``idx``'s model)."""
        if is_index(path):
            q = cls._of_index(path, idx)
        else:
            model, meta = model_for_index(idx, checkpoint)
            iset = open_image_set(path, station, idx.meta.get("station"))
            loader = FrameLoader(iset.station, iset.dark_dir, what="query image")
            n = len(iset.items)
            f, ok, errs = embed_queries(
                model, meta, iset.items, [loader] * n, batch_size, device, "evaluate"
            )
            items = iset.items[ok].reset_index(drop=True)
            q = cls(items, f, meta.get("model_id"), path, n, errs, loader=loader)
        if len(q.items) == 0 or q.items["label"].isna().any():
            raise InputError(f"{path}: --evaluate needs a labelled query set (labels.parquet)")
        return q

    @classmethod
    def _of_index(cls, path: Path, idx: Index) -> QuerySet:
        qidx = load_index(path)
        if qidx.meta.get("model_id") != idx.meta.get("model_id"):
            raise CheckpointError(
                f"{path}: query index model_id {qidx.meta.get('model_id')} differs from "
                f"{idx.path}'s {idx.meta.get('model_id')}; build both with one checkpoint"
            )
        feats, n = np.asarray(qidx.features), len(qidx.items)
        errs = empty_frame(ERRORS_SCHEMA)
        return cls(qidx.items, feats, qidx.meta.get("model_id"), path, n, errs, index=qidx)

    def frames(self, rows: Sequence[int]) -> list[np.ndarray | None]:
        """The query frames at ``rows`` to show (None where unreadable)."""
        if self.loader is None:
            return index_frames(self.index, rows) if self.index is not None else []
        return [item_frame(self.loader, self.items, r) for r in rows]


def _result(
    idx: Index,
    q: QuerySet,
    scores: pd.DataFrame,
    metric: str,
    k: int,
    ranks: list[int],
    overlap: bool,
) -> dict[str, Any]:
    """The evaluation as retrieval_eval.json holds it."""
    return {
        "index": str(idx.path.resolve()),
        "index_source": idx.meta.get("source"),
        "queries": str(q.path.resolve()),
        "model_id": q.model_id,
        "variant": idx.meta.get("variant"),
        "metric": metric,
        "k": k,
        "ranks": ranks,
        "self_matches_excluded": overlap,
        "map_definition": MAP_DEFINITION,
        "n_queries": int(len(q.items)),
        "n_unreadable": int(len(q.errors)),
        "n_index": int(len(idx.items)),
        # NaN (a class without queries) becomes null: strict JSON readers reject NaN.
        "scores": [
            {c: (None if isinstance(v, float) and np.isnan(v) else v) for c, v in row.items()}
            for row in scores.to_dict(orient="records")
        ],
    }


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
