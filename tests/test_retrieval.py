"""Exact kNN against a brute-force numpy reference, and the retrieval metrics on hand-made lists."""

from __future__ import annotations

import bounds
import numpy as np
import pytest

from pipeline.retrieval import (
    average_precision,
    drop_self,
    knn,
    parse_ranks,
    precision_at_k,
    relevance,
    retrieval_scores,
)


def _exact(q: np.ndarray, x: np.ndarray, metric: str) -> np.ndarray:
    """(Q, N) float64 distances of the float32 inputs: the reference every bound is about."""
    q = q.astype(np.float64)
    x = x.astype(np.float64)
    if metric == "cosine":
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        return 1.0 - qn @ xn.T
    return np.linalg.norm(q[:, None, :] - x[None, :, :], axis=2)


def _errors(
    q: np.ndarray, x: np.ndarray, d_ref: np.ndarray, metric: str, refine: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(selection, returned-distance) error bounds of knn's float32 distances, (Q, N) each."""
    if metric == "cosine":  # both steps normalise then take a dot product
        e = np.full(d_ref.shape, bounds.cosine_error(q.shape[1]))
        return e, e
    select = bounds.euclidean_error(q, x, d_ref)  # ||x||^2 - 2 q.x + ||q||^2, then sqrt
    if not refine:
        return select, select
    return select, bounds.direct_euclidean_error(d_ref, q.shape[1])  # ||x - q||


@pytest.fixture(scope="module")
def feats() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    # Mixed offsets so that norms differ (the ||x||^2 term matters).
    x = rng.normal(size=(300, 64)) + rng.normal(size=(300, 1)) * 2
    q = rng.normal(size=(17, 64)) + rng.normal(size=(17, 1)) * 2
    return q.astype(np.float32), x.astype(np.float32)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_knn_matches_numpy_reference(feats, metric):
    q, x = feats
    d_ref = _exact(q, x, metric)
    d, i = knn(q, x, 10, metric=metric, device="cpu")
    assert d.shape == (17, 10) and d.dtype == np.float32 and i.dtype == np.int64
    select, dist = _errors(q, x, d_ref, metric)
    # Indices may differ from the float64 order only inside a near-tie (bounds.assert_knn_valid).
    bounds.assert_knn_valid(i, d, d_ref, select, dist)
    assert (np.diff(d, axis=1) >= 0).all()  # sorted: an exact property of the sort, no rounding
    # The bound is sharp enough to catch a wrong neighbour: consecutive exact distances are
    # typically (median) further apart than the tolerance assert_knn_valid allows.
    gaps = np.diff(np.sort(d_ref, axis=1)[:, :11], axis=1)
    assert 2 * (select.max() + dist.max()) < np.median(gaps)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("chunk,qbatch", [(7, 3), (64, 5), (299, 1000), (1, 17)])
def test_chunked_and_unchunked_agree(feats, metric, chunk, qbatch):
    q, x = feats
    d_ref = _exact(q, x, metric)
    select, dist = _errors(q, x, d_ref, metric)
    d0, i0 = knn(q, x, 12, metric=metric, chunk_size=10_000, device="cpu")
    d1, i1 = knn(q, x, 12, metric=metric, chunk_size=chunk, query_batch=qbatch, device="cpu")
    # Other shapes may take other GEMM kernels: each run is checked against the exact distances.
    bounds.assert_knn_valid(i0, d0, d_ref, select, dist)
    bounds.assert_knn_valid(i1, d1, d_ref, select, dist)
    same = i1 == i0  # the same neighbour: both distances within its bound of the exact one
    lim = 2 * np.take_along_axis(dist, i0, axis=1)
    assert (np.abs(d1.astype(np.float64) - d0)[same] <= lim[same]).all()


def test_unrefined_distances_are_close_and_duplicates_are_zero(feats):
    q, x = feats
    x10 = x * 10  # float32, as knn gets it; the reference widens these very values
    d_raw, i_raw = knn(x10[:5], x10, 3, chunk_size=50, refine=False, device="cpu")
    d, i = knn(x10[:5], x10, 3, chunk_size=50, device="cpu")
    d_ref = _exact(x10[:5], x10, "euclidean")
    select, dist = _errors(x10[:5], x10, d_ref, "euclidean")
    bounds.assert_knn_valid(i, d, d_ref, select, dist)
    bounds.assert_knn_valid(i_raw, d_raw, d_ref, select, select)
    # Self (exact distance 0) is further from the runner-up than twice the bound: rank 1 is self.
    assert (np.sort(d_ref, axis=1)[:, 1] > 4 * select.max(axis=1)).all()
    np.testing.assert_array_equal(i[:, 0], np.arange(5))
    assert np.all(d[:, 0] == 0.0)  # refined: x - x is exactly 0 in any arithmetic
    np.testing.assert_array_equal(i_raw[:, 0], np.arange(5))
    # unrefined: |d2 error| <= gamma_66 (2||x||^2 + 2|x|.|x|) = gamma_66 4||x||^2, d <= its sqrt
    self_bound = np.sqrt(bounds.gamma(64 + 2) * 4 * (x10.astype(np.float64) ** 2).sum(1)[:5])
    assert np.all(d_raw[:, 0] <= self_bound)
    # ... and far below the distance to any other row (the bound is meaningful here).
    assert np.all(self_bound < 0.05 * np.sort(d_ref, axis=1)[:, 1])


def test_ties_break_by_index_across_chunks():
    # Index rows 0..9 form five duplicated pairs placed so that ties straddle chunk edges.
    # Every coordinate is 0 or 1: all sums are small integers, exact in float32 on any kernel,
    # so the ties are exact and the distances exactly 1 (and sqrt(2) rounded once).
    base = np.eye(5, 8, dtype=np.float32)
    x = np.concatenate([base, base])  # row j and j + 5 are identical
    q = np.zeros((1, 8), np.float32)  # every row is at distance 1
    for chunk in (1, 3, 4, 10):
        d, i = knn(q, x, 7, chunk_size=chunk, device="cpu")
        np.testing.assert_array_equal(i[0], np.arange(7))
        np.testing.assert_array_equal(d[0], 1.0)
    q2 = base[2:3]  # rows 2 and 7 at distance 0, the rest at sqrt(2)
    d, i = knn(q2, x, 4, chunk_size=3, device="cpu")
    np.testing.assert_array_equal(i[0], [2, 7, 0, 1])
    np.testing.assert_array_equal(d[0], np.float32([0, 0, np.sqrt(2), np.sqrt(2)]))


def test_float16_memmap_index(tmp_path, feats):
    q, x = feats
    path = tmp_path / "features.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=x.shape)
    mm[:] = x
    mm.flush()
    del mm
    index = np.load(path, mmap_mode="r")
    assert isinstance(index, np.memmap) and index.dtype == np.float16
    d, i = knn(q, index, 5, chunk_size=32, device="cpu")
    x16 = np.asarray(index).astype(np.float32)  # float16 widens to float32 exactly
    d_ref = _exact(q, x16, "euclidean")
    bounds.assert_knn_valid(i, d, d_ref, *_errors(q, x16, d_ref, "euclidean"))


def test_k_larger_than_index_and_bad_arguments(feats):
    q, x = feats
    d, i = knn(q[:2], x[:4], 10, device="cpu")
    assert d.shape == (2, 4)
    assert sorted(i[0].tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="metric"):
        knn(q, x, 3, metric="manhattan")
    with pytest.raises(ValueError, match="features"):
        knn(q[:, :5], x, 3)


def test_drop_self():
    d = np.array([[0.0, 1.0, 2.0], [0.5, 0.7, 0.9]], np.float32)
    i = np.array([[4, 2, 3], [1, 2, 3]])
    d2, i2 = drop_self(d, i, np.array([4, 9]), k=2)
    np.testing.assert_array_equal(i2, [[2, 3], [1, 2]])
    np.testing.assert_allclose(d2, [[1.0, 2.0], [0.5, 0.7]])


def test_precision_at_k_hand_made():
    neigh = np.array(
        [
            ["arc", "arc", "radial", "arc", "hotspot"],
            ["radial", "drapery", "drapery", None, "drapery"],
        ],
        dtype=object,
    )
    p = precision_at_k(neigh, ["arc", "drapery"], [1, 3, 5])
    np.testing.assert_allclose(p, [[1.0, 2 / 3, 3 / 5], [0.0, 2 / 3, 3 / 5]])
    with pytest.raises(ValueError, match="outside"):
        precision_at_k(neigh, ["arc", "drapery"], [6])


def test_average_precision_hand_made():
    rel = np.array(
        [
            [1, 0, 1, 0],  # hits at 1 and 3: (1 + 2/3) / 2
            [0, 1, 1, 0],  # hits at 2 and 3: (1/2 + 2/3) / 2
            [0, 0, 0, 0],
            [1, 1, 1, 1],
        ],
        dtype=bool,
    )
    ap = average_precision(rel)
    np.testing.assert_allclose(ap, [(1 + 2 / 3) / 2, (1 / 2 + 2 / 3) / 2, 0.0, 1.0])
    # Known relevant counts: 10 in the set, K = 4 -> normaliser 4; 3 in the set -> 3.
    ap2 = average_precision(rel, n_relevant=[10, 3, 5, 10])
    np.testing.assert_allclose(ap2, [(1 + 2 / 3) / 4, (1 / 2 + 2 / 3) / 3, 0.0, 1.0])


def test_retrieval_scores_per_class_and_all():
    neigh = np.array(
        [["arc", "arc"], ["arc", "radial"], ["radial", "radial"], ["arc", "radial"]], dtype=object
    )
    ql = ["arc", "arc", "radial", "radial"]
    rel = relevance(neigh, ql)
    assert rel.tolist() == [[True, True], [True, False], [True, True], [False, True]]
    t = retrieval_scores(neigh, ql, [1, 2], classes=["arc", "drapery", "radial"])
    assert t["class"].tolist() == ["arc", "drapery", "radial", "all"]
    row = t.set_index("class")
    assert row.loc["arc", "p@1"] == 1.0 and row.loc["arc", "p@2"] == 0.75
    assert row.loc["radial", "p@1"] == 0.5
    assert np.isnan(row.loc["drapery", "p@1"]) and row.loc["drapery", "n_queries"] == 0
    assert row.loc["all", "n_queries"] == 4
    np.testing.assert_allclose(row.loc["all", "p@2"], 0.75)
    # AP over hits: arc queries 1 and 1, radial 1 and 1/2.
    np.testing.assert_allclose(row.loc["radial", "map"], 0.75)
    np.testing.assert_allclose(row.loc["all", "map"], 0.875)


def test_map_normaliser_leaves_out_the_query_itself():
    """A hotspot query whose class has 3 items in the index, itself one of them: both others
    ranked first is a perfect list (AP 1), not 2/3 of one."""
    index_labels = ["hotspot"] * 3 + ["arc"] * 5
    neigh = np.array([["hotspot", "hotspot", "arc", "arc"]], dtype=object)  # self dropped
    kept = retrieval_scores(neigh, ["hotspot"], [1], index_labels=index_labels)
    fixed = retrieval_scores(
        neigh, ["hotspot"], [1], index_labels=index_labels, self_in_index=[True]
    )
    assert kept.set_index("class").loc["all", "map"] == pytest.approx(2 / 3)
    assert fixed.set_index("class").loc["all", "map"] == pytest.approx(1.0)


def test_parse_ranks():
    assert parse_ranks("20, 1,3,3") == [1, 3, 20]
    with pytest.raises(ValueError, match="integer"):
        parse_ranks("1,x")
    with pytest.raises(ValueError, match=">= 1"):
        parse_ranks("0,1")


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_knn_on_cuda_matches_cpu(feats, metric):
    q, x = feats
    x16 = x.astype(np.float16)
    d0, i0 = knn(q, x16, 10, metric=metric, chunk_size=64, device="cpu")
    d1, i1 = knn(q, x16, 10, metric=metric, chunk_size=64, device="cuda")
    # Both against the exact distances (float32 GEMMs: TF32 is off by default in torch).
    d_ref = _exact(q, x16.astype(np.float32), metric)
    select, dist = _errors(q, x16.astype(np.float32), d_ref, metric)
    bounds.assert_knn_valid(i0, d0, d_ref, select, dist)
    bounds.assert_knn_valid(i1, d1, d_ref, select, dist)
