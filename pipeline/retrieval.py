"""Content-based retrieval (pure): exact k-nearest neighbours of FC7 features and retrieval metrics.

The searched set can be far larger than memory allows as float32 (ASI399K: 400k x 4096 float16 is
3.3 GB), so :func:`knn` walks the index in chunks: each chunk is converted to float32 on the fly,
its distances to a batch of queries come from one matrix product
(``||q||^2 - 2 q.x + ||x||^2``), and a running top-k is kept. Peak memory is bounded by
``chunk_size`` and ``query_batch``, not by the index size, and a ``numpy.memmap`` works as index.

Metrics: precision@k per query and per class, and average precision over the top-K list
(:func:`average_precision`, definition in its docstring).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from pipeline.devices import resolve_device

METRICS: tuple[str, ...] = ("euclidean", "cosine")

#: Rows of float32 a chunk may hold (64 Mi values = 256 MB); the chunk size follows from the dim.
_CHUNK_VALUES = 1 << 26


def default_chunk_size(dim: int) -> int:
    """Index rows per chunk so that one float32 chunk stays near 256 MB."""
    return max(1, _CHUNK_VALUES // max(1, int(dim)))


def _as_float32(block: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A (n, d) block as float32 on ``device``; float16 travels to the GPU before widening."""
    if isinstance(block, torch.Tensor):
        t = block
    else:
        arr = np.asarray(block)  # reads a memmap slice into memory
        if arr.dtype not in (np.float16, np.float32, np.float64):
            arr = arr.astype(np.float32)
        with warnings.catch_warnings():
            # A read-only memmap slice: torch warns about writes, and nothing here writes to it.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.to(device).to(torch.float32)


def _pairwise(q: torch.Tensor, q_sq: torch.Tensor, x: torch.Tensor, metric: str) -> torch.Tensor:
    """Distances (nq, nx) between prepared queries and an index chunk."""
    if metric == "cosine":
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return (1.0 - q @ x.T).clamp_(0.0, 2.0)
    x_sq = (x * x).sum(dim=1)
    # ||x||^2 - 2 q.x in one GEMM call, then + ||q||^2 in place: one (nq, nx) buffer, not three.
    d2 = torch.addmm(x_sq.unsqueeze(0), q, x.T, alpha=-2.0)
    return d2.add_(q_sq.unsqueeze(1)).clamp_(min=0.0).sqrt_()


def _select(d: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest of each row of ``d`` with ties broken by the smaller index.

    ``idx`` (same shape) must increase along each row among equal distances for the tie rule to
    hold, which is how candidates are laid out (kept best first, then the chunk in index order).
    """
    k = min(k, d.shape[1])
    vals, pos = torch.topk(d, k, dim=1, largest=False, sorted=True)
    # topk picks arbitrarily among values tied with the k-th one; rows where such ties cross the
    # cut are redone with a stable full sort (rare: duplicate frames give equal distances).
    kth = vals[:, -1:]
    crowded = (d <= kth).sum(dim=1) > k
    if bool(crowded.any()):
        rows = crowded.nonzero().squeeze(1)
        order = torch.sort(d[rows], dim=1, stable=True).indices[:, :k]
        pos[rows] = order
        vals[rows] = torch.gather(d[rows], 1, order)
    out_idx = torch.gather(idx, 1, pos)
    # Within the top k, equal distances must also come in index order (topk does not promise it).
    key = torch.sort(out_idx, dim=1, stable=True)
    vals_i = torch.gather(vals, 1, key.indices)
    order = torch.sort(vals_i, dim=1, stable=True).indices
    return torch.gather(vals_i, 1, order), torch.gather(key.values, 1, order)


def knn(
    queries: np.ndarray | torch.Tensor,
    index: np.ndarray | torch.Tensor,
    k: int,
    metric: str = "euclidean",
    chunk_size: int | None = None,
    query_batch: int = 1024,
    device: str | torch.device | None = "auto",
    refine: bool = True,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest index rows of each query: (distances float32 (Q, k), indices int64 (Q, k)).

    ``metric`` "euclidean" (L2 distance) or "cosine" (1 - cosine similarity). ``index`` may be a
    float16 ``numpy.memmap``; it is read chunk by chunk (``chunk_size`` rows, default about 256 MB
    of float32) and never held whole. Results are sorted by distance, ties by index. With
    ``refine`` the final distances are recomputed directly from the selected rows, so that an
    exact duplicate reports 0 (the matrix-product form loses digits near zero). ``k`` larger
    than the index returns as many columns as there are index rows.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if queries.ndim != 2 or index.ndim != 2:
        raise ValueError(
            f"queries and index must be 2-D, got {tuple(queries.shape)} and {tuple(index.shape)}"
        )
    nq, dim = queries.shape
    n, dim_x = index.shape
    if dim != dim_x:
        raise ValueError(f"queries have {dim} features but the index has {dim_x}")
    k = min(k, n)
    if nq == 0 or n == 0:
        return np.zeros((nq, k), np.float32), np.zeros((nq, k), np.int64)
    dev = resolve_device(device)
    chunk = int(chunk_size or default_chunk_size(dim))
    if chunk < 1 or query_batch < 1:
        raise ValueError("chunk_size and query_batch must be >= 1")

    out_d = np.empty((nq, k), np.float32)
    out_i = np.empty((nq, k), np.int64)
    starts = range(0, n, chunk)
    bar = None
    if progress:
        bar = tqdm(total=n * ((nq + query_batch - 1) // query_batch), desc="knn", unit="row")
    with torch.inference_mode():
        for q0 in range(0, nq, query_batch):
            q = _as_float32(queries[q0 : q0 + query_batch], dev)
            if metric == "cosine":
                q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
            q_sq = (q * q).sum(dim=1)
            best_d = torch.empty((q.shape[0], 0), device=dev)
            best_i = torch.empty((q.shape[0], 0), dtype=torch.int64, device=dev)
            for s in starts:
                x = _as_float32(index[s : s + chunk], dev)
                d = _pairwise(q, q_sq, x, metric)
                ids = torch.arange(s, s + x.shape[0], device=dev).expand(q.shape[0], -1)
                # Kept best first: their indices are all below this chunk's, so the stable
                # tie rule in _select still means "smaller index first".
                best_d, best_i = _select(
                    torch.cat([best_d, d], dim=1), torch.cat([best_i, ids], dim=1), k
                )
                if bar is not None:
                    bar.update(x.shape[0])
            if refine:
                best_d, best_i = _refine(q, index, best_i, metric, dev)
            out_d[q0 : q0 + q.shape[0]] = best_d.cpu().numpy()
            out_i[q0 : q0 + q.shape[0]] = best_i.cpu().numpy()
    if bar is not None:
        bar.close()
    return out_d, out_i


def _refine(
    q: torch.Tensor,
    index: np.ndarray | torch.Tensor,
    best_i: torch.Tensor,
    metric: str,
    dev: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute the selected distances directly (q - x), then re-sort (ties by index)."""
    flat = best_i.reshape(-1).cpu().numpy()
    uniq, inv = np.unique(flat, return_inverse=True)  # sorted reads are kinder to a memmap
    if isinstance(index, torch.Tensor):
        rows = index[torch.from_numpy(uniq).to(index.device)]
    else:
        rows = index[uniq]
    x = _as_float32(rows, dev)[torch.from_numpy(inv.reshape(-1)).to(dev)]
    x = x.reshape(best_i.shape[0], best_i.shape[1], -1)
    if metric == "cosine":
        x = x / x.norm(dim=2, keepdim=True).clamp_min(1e-12)
        d = (1.0 - (x * q[:, None, :]).sum(dim=2)).clamp_(0.0, 2.0)
    else:
        d = (x - q[:, None, :]).norm(dim=2)
    key = torch.sort(best_i, dim=1, stable=True)
    d = torch.gather(d, 1, key.indices)
    order = torch.sort(d, dim=1, stable=True).indices
    return torch.gather(d, 1, order), torch.gather(key.values, 1, order)


def drop_self(
    distances: np.ndarray, indices: np.ndarray, self_index: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own index row (``self_index[q]``, -1 = none) and keep k columns.

    For searching a set with queries that are part of it: ask :func:`knn` for k + 1 neighbours.
    """
    self_index = np.asarray(self_index).reshape(-1, 1)
    keep = indices != self_index
    # Rows without their self among the results drop their last column instead.
    missing = keep.all(axis=1)
    keep[missing, -1] = False
    n_keep = min(k, indices.shape[1] - 1)
    d = distances[keep].reshape(len(indices), -1)[:, :n_keep]
    i = indices[keep].reshape(len(indices), -1)[:, :n_keep]
    return d, i


# ------------------------------------------------------------------------------ metrics
def relevance(neighbour_labels: np.ndarray, query_labels: Sequence[object]) -> np.ndarray:
    """Boolean (Q, K): neighbour j of query q has the query's label (missing labels never match)."""
    nl = np.asarray(neighbour_labels, dtype=object)
    ql = np.asarray(query_labels, dtype=object).reshape(-1, 1)
    if nl.ndim != 2 or nl.shape[0] != ql.shape[0]:
        raise ValueError(
            f"neighbour_labels must be (Q, K) with Q = {ql.shape[0]}, got {np.shape(nl)}"
        )
    known = pd.notna(nl) & pd.notna(ql)
    return (nl == ql) & known


def precision_at_k(
    neighbour_labels: np.ndarray, query_labels: Sequence[object], ks: Sequence[int]
) -> np.ndarray:
    """Per-query precision at each k of ``ks``: (Q, len(ks)).

    Precision at k is the share of the top k with the query's label. A k beyond the number of
    neighbours K is an error (the list was cut too short).
    """
    rel = relevance(neighbour_labels, query_labels)
    big = [k for k in ks if k < 1 or k > rel.shape[1]]
    if big:
        raise ValueError(f"ranks {big} outside 1..{rel.shape[1]} (neighbours retrieved)")
    csum = np.cumsum(rel, axis=1)
    return np.stack([csum[:, k - 1] / k for k in ks], axis=1).astype(np.float64)


def average_precision(relevant: np.ndarray, n_relevant: Sequence[int] | None = None) -> np.ndarray:
    """Average precision of each ranked list over its top K: (Q,) in [0, 1].

    AP@K = (1 / R_K) * sum_{i=1..K} P@i * rel_i, where rel_i says whether rank i is relevant and
    P@i is the precision of the top i. The normaliser R_K is ``min(n_relevant[q], K)`` when the
    number of relevant items in the searched set is known (a perfect top-K list then scores 1
    even when the set holds more than K relevant items), else the number of relevant items
    retrieved in the top K. A query with R_K = 0 scores 0.
    """
    rel = np.asarray(relevant, dtype=bool)
    if rel.ndim != 2:
        raise ValueError(f"relevant must be (Q, K), got shape {rel.shape}")
    nq, k = rel.shape
    ranks = np.arange(1, k + 1)
    prec = np.cumsum(rel, axis=1) / ranks
    total = (prec * rel).sum(axis=1)
    if n_relevant is None:
        norm = rel.sum(axis=1).astype(np.float64)
    else:
        norm = np.minimum(np.asarray(n_relevant, dtype=np.float64).reshape(nq), k)
    out = np.zeros(nq, np.float64)
    ok = norm > 0
    out[ok] = total[ok] / norm[ok]
    return out


def retrieval_scores(
    neighbour_labels: np.ndarray,
    query_labels: Sequence[object],
    ks: Sequence[int],
    index_labels: Sequence[object] | None = None,
    classes: Sequence[str] | None = None,
    self_in_index: Sequence[bool] | None = None,
) -> pd.DataFrame:
    """Precision@k and mAP per query class plus an ``all`` row (mean over every query).

    Columns: ``class``, ``n_queries``, ``p@<k>`` for each k, ``map``. With ``index_labels`` the
    AP normaliser counts the relevant items of the whole searched set (see
    :func:`average_precision`), less the query itself where ``self_in_index`` says it is in the
    index (its self-match was dropped from the list, so it cannot be retrieved). Classes listed
    in ``classes`` without queries get NaN rows.
    """
    ql = np.asarray(query_labels, dtype=object)
    rel = relevance(neighbour_labels, ql)
    p = precision_at_k(neighbour_labels, ql, ks)
    n_rel = None
    if index_labels is not None:
        counts = pd.Series(np.asarray(index_labels, dtype=object)).value_counts(dropna=True)
        n_rel = np.array([counts.get(lab, 0) if pd.notna(lab) else 0 for lab in ql])
        if self_in_index is not None:
            n_rel = np.maximum(n_rel - np.asarray(self_in_index, dtype=int), 0)
    ap = average_precision(rel, n_rel)
    names = list(classes) if classes is not None else sorted({c for c in ql if pd.notna(c)})
    rows = []
    for name in [*names, "all"]:
        m = np.ones(len(ql), bool) if name == "all" else (ql == name)
        row: dict[str, object] = {"class": name, "n_queries": int(m.sum())}
        for j, k in enumerate(ks):
            row[f"p@{k}"] = float(p[m, j].mean()) if m.any() else float("nan")
        row["map"] = float(ap[m].mean()) if m.any() else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def parse_ranks(text: str | Sequence[int]) -> list[int]:
    """``"1,3,5"`` -> [1, 3, 5] (sorted, unique, each >= 1); ValueError names the bad item."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = set()
    for item in items:
        s = str(item).strip()
        if not s:
            continue
        try:
            r = int(s)
        except ValueError:
            raise ValueError(f"rank {s!r} is not an integer (e.g. 1,3,5,8,10,15,20)") from None
        if r < 1:
            raise ValueError(f"rank {r} must be >= 1")
        out.add(r)
    if not out:
        raise ValueError("no ranks given (e.g. 1,3,5,8,10,15,20)")
    return sorted(out)
