"""index / retrieve round trip on a tiny synthetic labelled set with a random-weight checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import bounds
import numpy as np
import pandas as pd
import pytest
import torch
from builders import random_checkpoint

import pipeline.retrieval_eval as reval
import pipeline.retrieval_index as ri
import pipeline.retrieval_query as rq
from pipeline.archive import load_manifest, write_manifest
from pipeline.checkpoint import read_meta
from pipeline.classes import CLASSES
from pipeline.cli import main
from pipeline.config import dump_yaml, load_station, to_dict
from pipeline.errors import CheckpointError, FrameGeometryError, InputError
from pipeline.imageio import write_frame
from pipeline.models import to_model_input
from pipeline.output_folder import read_run_record
from pipeline.predictions import FEATURES_DIR, RUN_FILE, features_name, shard_path
from pipeline.retrieval import knn
from pipeline.retrieval_eval import evaluate_retrieval
from pipeline.retrieval_features import embed
from pipeline.retrieval_images import FrameLoader
from pipeline.retrieval_index import build_index, load_index
from pipeline.retrieval_query import model_for_index, query_items, retrieve
from pipeline.storage import ERRORS_SCHEMA, PREDICTIONS_SCHEMA, write_table

SIZE = 64


def _pattern(label: str, rng: np.random.Generator) -> np.ndarray:
    """A crude 16-bit raw frame whose structure depends on the class (enough to differ in FC7)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    c = SIZE / 2
    img = rng.normal(800, 40, (SIZE, SIZE)).astype(np.float32)
    if label == "arc":
        row = rng.uniform(0.35, 0.65) * SIZE
        img += 2500 * np.exp(-((yy - row) ** 2) / 8)
    elif label == "drapery":
        for col in rng.uniform(0.3, 0.7, 4) * SIZE:
            img += 1800 * np.exp(-((xx - col) ** 2) / 3)
    elif label == "radial":
        ang = np.arctan2(yy - c, xx - c)
        img += 1500 * (np.cos(8 * ang + rng.uniform(0, 6)) > 0.6)
    else:
        by, bx = rng.uniform(0.35, 0.65, 2) * SIZE
        img += 3000 * np.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / 30)
    return np.clip(img, 0, 65535).astype(np.uint16)


def _make_set(out: Path, n_per_class: int, seed: int, year: int) -> Path:
    """OUT/<class>/N<date>G<time>.png raw frames, labels.parquet and calib/station.yaml (64 px)."""

    rng = np.random.default_rng(seed)
    rows = []
    t0 = pd.Timestamp(f"{year}-12-22 03:00:00", tz="UTC")
    for ci, label in enumerate(CLASSES):
        for j in range(n_per_class):
            t = t0 + pd.Timedelta(seconds=10 * (ci * n_per_class + j))
            rel = f"{label}/N{t:%Y%m%d}G{t:%H%M%S}.png"
            (out / label).mkdir(parents=True, exist_ok=True)
            write_frame(out / rel, _pattern(label, rng))
            rows.append({"path": rel, "label": label, "time_utc": t, "winter": year})
    pd.DataFrame(rows).to_parquet(out / "labels.parquet")
    (out / "calib").mkdir(exist_ok=True)
    dump_yaml(load_station("yrs").scaled(SIZE), out / "calib" / "station.yaml")
    return out


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("retrieval")
    return {
        "index_set": _make_set(base / "later", 6, seed=3, year=2004),
        "query_set": _make_set(base / "y2003", 2, seed=4, year=2003),
        "base": base,
    }


def _checkpoint(out: Path, seed: int) -> Path:
    return random_checkpoint(out, seed=seed, input_size=SIZE)


#: Fixed random directions to compare 4096-d FC7 features along (a bound per projection costs
#: one backward pass, a bound per element 4096): features off by more than the bound fail along
#: a random direction with overwhelming probability.
_DIRECTIONS = np.random.default_rng(7).standard_normal((4, 4096))
#: float16 storage of a float32 feature: relative 2^-11 (normal range), absolute 2^-25 (half the
#: subnormal step), so along direction r at most |r| . (2^-11 |f16| / (1 - 2^-11) + 2^-25).
_U16 = 2.0**-11


def _model_inputs(idx, paths: list[str]):
    """The model inputs of index paths, preprocessed as a query of that index (as embed does)."""

    items, loaders = query_items(paths, idx, None)
    imgs = [
        ld(p, int(f), t)
        for ld, p, f, t in zip(loaders, items["path"], items["frame"], items["time_utc"])
    ]
    return to_model_input(np.stack(imgs), int(idx.meta["input_size"])).to(torch.float32)


def _assert_same_frame_features(model, x, f16_a: np.ndarray, f16_b: np.ndarray) -> None:
    """Two float16 FC7 embeddings of the same inputs x (other batches, so float32 differing in
    the last bits) agree along _DIRECTIONS within both float32 errors (bounds.forward_error_bound:
    the worst case, ~as large as the features themselves here, and the probabilistic one) plus
    both float16 roundings."""

    r = torch.from_numpy(_DIRECTIONS)
    worst, prob = bounds.forward_error_bound(model, x, lambda m, t: m.features(t) @ r.T.to(t.dtype))
    a, b = np.asarray(f16_a, np.float64), np.asarray(f16_b, np.float64)
    store = sum((_U16 * np.abs(f) / (1 - _U16) + 2.0**-25) @ np.abs(_DIRECTIONS).T for f in (a, b))
    err = np.abs((a - b) @ _DIRECTIONS.T)  # float64 products: exact to ~1e-13
    assert (err <= 2 * worst.numpy() + store).all()
    assert (err <= 2 * prob.numpy() + store).all(), (
        f"{err.max()} vs {(2 * prob.numpy() + store).min()}"
    )
    # ... and sharp: two different frames' features lie much further apart along them
    assert np.abs(a @ _DIRECTIONS.T).max() > 10 * (2 * prob.numpy() + store).max()


@pytest.fixture(scope="module")
def ckpt(sets: dict[str, Path]) -> Path:
    return _checkpoint(sets["base"] / "ckpt", seed=0)


@pytest.fixture(scope="module")
def index_dir(sets: dict[str, Path], ckpt: Path) -> Path:
    out = sets["base"] / "index"
    main(["index", "--checkpoint", str(ckpt), str(sets["index_set"]), "--out", str(out)])
    return out


def test_index_files(index_dir: Path, ckpt: Path, sets: dict[str, Path]):
    info = json.loads((index_dir / "_run.json").read_text())
    assert info["command"] == "index" and info["finished"] is True
    assert info["model_id"] == read_meta(ckpt)["model_id"]
    assert info["count"] == 24 and info["dim"] == 4096 and info["input_size"] == SIZE
    assert info["checkpoint"] == str(ckpt.resolve()) and info["labelled"]
    feats = np.load(index_dir / "_features.npy", mmap_mode="r")
    assert feats.dtype == np.float16 and feats.shape == (24, 4096)
    assert np.isfinite(np.asarray(feats, np.float32)).all() and np.asarray(feats).any()
    items = pd.read_parquet(index_dir / "items.parquet")
    assert list(items.columns) == ["path", "frame", "time_utc", "label"]
    assert items["label"].value_counts().to_dict() == {c: 6 for c in CLASSES}
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in items["path"])
    assert str(items["time_utc"].dtype) == "datetime64[ns, UTC]"
    idx = load_index(index_dir)
    assert isinstance(idx.features, np.memmap)
    # The folder is a Parquet table of its items: every other file starts with "_".
    pd.testing.assert_frame_equal(pd.read_parquet(index_dir), items)


def test_an_index_is_not_an_image_set(index_dir: Path, ckpt: Path, tmp_path: Path):
    with pytest.raises(InputError, match="is a retrieval index"):
        build_index(index_dir, ckpt, tmp_path / "i2")
    assert not (tmp_path / "i2").exists()


def test_retrieve_round_trip(index_dir: Path, sets: dict[str, Path], tmp_path: Path):
    items = pd.read_parquet(index_dir / "items.parquet")
    q_in = items["path"].iloc[[0, 13]].tolist()  # two indexed frames: they must find themselves
    q_out = sorted((sets["query_set"] / "radial").glob("*.png"))[0]
    out = tmp_path / "r"
    args = ["retrieve", "--index", str(index_dir), "--out", str(out), "--k", "10"]
    args += ["--ranks", "1,3,5,10"]
    for q in [*q_in, q_out]:
        args += ["--query", str(q)]
    main(args)
    t = pd.read_parquet(out / "neighbours.parquet")
    assert list(t.columns) == [
        "query",
        "query_label",
        "rank",
        "path",
        "frame",
        "time_utc",
        "distance",
        "label",
    ]
    assert len(t) == 3 * 10 and t["query"].nunique() == 3
    for q in q_in:
        first = t[(t["query"] == q) & (t["rank"] == 1)].iloc[0]
        # Itself first, at ~0, not exactly 0: CPU convolutions differ in the last bits with the
        # batch size (its features are checked along random directions in the test below).
        assert first["path"] == q
    for _, g in t.groupby("query"):
        assert (np.diff(g.sort_values("rank")["distance"].to_numpy()) >= 0).all()
    csv = pd.read_csv(out / "neighbours.csv")
    assert len(csv) == 30
    assert (out / "retrieval.png").stat().st_size > 5000
    # Query files inside a labelled set carry its label; neighbour labels come from the index.
    assert set(t["label"]) <= set(CLASSES)
    qlab = t.groupby("query", sort=False)["query_label"].first()
    assert qlab[str(q_out)] == "radial" and qlab[q_in[0]] == items["label"][0]


def test_query_features_match_index(index_dir: Path, ckpt: Path):
    """A query is preprocessed like the index: same file -> same features (up to float16 steps)."""

    idx = load_index(index_dir)
    model, meta = model_for_index(idx, None)
    q_items, loaders = query_items([idx.items["path"][5]], idx, None)
    f, ok, _ = embed(model, meta, q_items, loaders[0], strict=True)
    x = _model_inputs(idx, [idx.items["path"][5]])
    _assert_same_frame_features(model, x, f[:1], idx.features[5:6])
    # The nearest index row is itself, at a distance of float16 steps: its exact value (from
    # the two stored vectors) within the float32 kNN bound of what knn reports.

    d, i = knn(f.astype(np.float32), idx.features, 1, device="cpu")
    assert i[0, 0] == 5
    exact = np.linalg.norm(f[0].astype(np.float64) - idx.features[5].astype(np.float64))
    assert abs(d[0, 0] - exact) <= bounds.direct_euclidean_error(exact, 4096)
    assert isinstance(loaders[0], FrameLoader) and ok.all()


def test_wrong_size_query_is_refused(index_dir: Path, tmp_path: Path, capsys):
    bad = tmp_path / "big.png"
    write_frame(bad, np.zeros((80, 80), np.uint16))
    with pytest.raises(SystemExit) as exc:
        main(["retrieve", "--index", str(index_dir), "--query", str(bad), "--out", str(tmp_path)])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "big.png" in err and "80x80" in err and "64x64" in err


def test_index_from_another_model_is_refused(
    index_dir: Path, sets: dict[str, Path], tmp_path: Path, capsys
):
    other = _checkpoint(tmp_path / "other", seed=1)
    q = pd.read_parquet(index_dir / "items.parquet")["path"][0]
    args = ["retrieve", "--index", str(index_dir), "--query", q, "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--checkpoint", str(other)])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "model_id" in err and "rebuild the index" in err and "Traceback" not in err
    # The index's own checkpoint gone: a clear message naming --checkpoint.

    moved = tmp_path / "index_copy"
    moved.mkdir()
    for name in ("_features.npy", "items.parquet"):
        (moved / name).write_bytes((index_dir / name).read_bytes())
    info = json.loads((index_dir / "_run.json").read_text())
    info["checkpoint"] = str(tmp_path / "nowhere")
    (moved / "_run.json").write_text(json.dumps(info))

    with pytest.raises(CheckpointError, match="--checkpoint"):
        retrieve(moved, [q], tmp_path / "o2", figure=False)


def test_not_an_index_and_bad_ranks(index_dir: Path, tmp_path: Path, capsys):
    with pytest.raises(InputError, match="_run.json"):
        load_index(tmp_path)
    q = pd.read_parquet(index_dir / "items.parquet")["path"][0]
    with pytest.raises(InputError, match="--k"):
        retrieve(index_dir, [q], tmp_path / "o", k=5, ranks="1,10")
    with pytest.raises(InputError, match="integer"):
        retrieve(index_dir, [q], tmp_path / "o", ranks="1,a")
    with pytest.raises(SystemExit):
        main(["retrieve", "--index", str(index_dir), "--out", str(tmp_path)])
    assert "--query" in capsys.readouterr().err


def test_evaluate(index_dir: Path, sets: dict[str, Path], tmp_path: Path):
    out = tmp_path / "eval"
    main(
        ["retrieve", "--evaluate", str(sets["query_set"]), "--index", str(index_dir)]
        + ["--out", str(out), "--k", "10", "--ranks", "1,3,5,8,10"]
    )
    res = json.loads((out / "retrieval_eval.json").read_text())
    assert res["n_queries"] == 8 and res["n_index"] == 24 and not res["self_matches_excluded"]
    scores = pd.DataFrame(res["scores"]).set_index("class")
    assert list(scores.index) == [*CLASSES, "all"]
    assert scores.loc["all", "n_queries"] == 8
    # Recompute P@k and the class rows from the neighbours table written beside.
    nb = pd.read_parquet(out / "eval_neighbours.parquet")
    hit = nb["label"] == nb["query_label"]
    for k in (1, 5, 10):
        p = hit[nb["rank"] <= k].groupby(nb["query"]).mean().mean()
        assert scores.loc["all", f"p@{k}"] == pytest.approx(p)
    for c in CLASSES:
        m = nb["query_label"] == c
        p = hit[m & (nb["rank"] <= 3)].groupby(nb["query"][m]).mean().mean()
        assert scores.loc[c, "p@3"] == pytest.approx(p)
    assert ((scores["map"] >= 0) & (scores["map"] <= 1)).all()
    md = (out / "retrieval_eval.md").read_text()
    assert "| all | 8 |" in md and "mAP@10" in md
    assert (out / "retrieval.png").is_file()


def test_evaluate_on_the_index_set_excludes_self(index_dir: Path, sets: dict[str, Path], tmp_path):
    res = evaluate_retrieval(index_dir, sets["index_set"], tmp_path, k=5, ranks=[1, 5])
    assert res["self_matches_excluded"] and res["k"] == 5
    nb = pd.read_parquet(tmp_path / "eval_neighbours.parquet")
    assert not (nb["query"] == nb["path"]).any()
    # Another index built with the same model serves as query set without recomputing.
    res2 = evaluate_retrieval(index_dir, index_dir, tmp_path / "b", k=5, ranks=[1, 5], figure=False)
    assert res2["scores"] == res["scores"]


def test_index_skips_unreadable_frames(sets: dict[str, Path], ckpt: Path, tmp_path: Path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    src = sorted((sets["index_set"] / "arc").glob("*.png"))[:3]
    for p in src:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "N20041222G999999.png").write_bytes(b"not a png")  # unreadable (and bad time)
    for j, p in enumerate(src):  # names without times: a plain folder, not an archive
        (folder / p.name).rename(folder / f"img{j}.png")
    copies = [folder / f"img{j}.png" for j in range(len(src))]
    info = build_index(
        folder, ckpt, tmp_path / "idx", station=sets["index_set"] / "calib" / "station.yaml"
    )
    assert info["count"] == 3 and info["n_errors"] == 1 and info["source_kind"] == "folder"
    idx = load_index(tmp_path / "idx")
    assert idx.items["label"].isna().all() and not idx.labelled
    errs = pd.read_parquet(tmp_path / "idx" / "_errors.parquet")
    assert errs["path"].str.endswith("G999999.png").all()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "idx"), idx.items)  # not the errors
    assert [Path(p).name for p in idx.items["path"]] == [p.name for p in copies]
    ref = load_index(sets["base"] / "index")
    pos = {p: i for i, p in enumerate(ref.items["path"])}
    rows = [pos[str(p.resolve())] for p in src]

    x = _model_inputs(ref, [str(p.resolve()) for p in src])
    model = model_for_index(ref, None)[0]
    _assert_same_frame_features(model, x, idx.features[: len(src)], ref.features[rows])


def _archive_and_features(
    ref,
    sets: dict[str, Path],
    ckpt: Path,
    base: Path,
    name: str = "archive",
) -> tuple[Path, Path, dict, np.ndarray]:
    """The index set as an archive (YRS layout, truth.parquet) and a classify-archive --features
    output for it holding the first 10 frames in two shards, marked (+1) so reuse is visible."""

    arch = base / name
    truth = []
    for p, lab in zip(ref.items["path"], ref.items["label"]):
        p = Path(p)
        rel = f"2004/{p.name[1:9]}/{p.name}"
        (arch / rel).parent.mkdir(parents=True, exist_ok=True)
        (arch / rel).write_bytes(p.read_bytes())
        truth.append({"path": rel, "label": lab})
    (arch / "calib").mkdir()
    (arch / "calib" / "station.yaml").write_bytes(
        (sets["index_set"] / "calib" / "station.yaml").read_bytes()
    )
    pd.DataFrame(truth).to_parquet(arch / "truth.parquet")
    pred = base / f"pred-{name}"
    features_dir = pred / FEATURES_DIR
    features_dir.mkdir(parents=True)
    marked = np.asarray(ref.features[:10], np.float32) + 1
    # What classify-archive records: the model, the archive root (resolved), the done shards.
    run = {
        "model_id": ref.meta["model_id"],
        "checkpoint": str(ckpt),
        "root": str(arch.resolve()),
        "shards": {},
    }
    for s, rows in enumerate([range(0, 6), range(6, 10)]):
        rows = list(rows)
        df = pd.DataFrame(
            {
                "path": [truth[r]["path"] for r in rows],
                "frame": 0,
                "time_utc": ref.items["time_utc"].iloc[rows].to_numpy(),
                "mlt": 9.0,
                "label": "arc",
                **{f"p_{c}": np.float32(0.25) for c in CLASSES},
                "model_id": ref.meta["model_id"],
            }
        )
        np.save(features_dir / features_name(s), marked[rows].astype(np.float16))
        write_table(df, shard_path(pred, s), PREDICTIONS_SCHEMA)
        run["shards"][f"{s:06d}"] = {"n": len(rows)}
    (pred / RUN_FILE).write_text(json.dumps(run))
    return arch, pred, run, marked


def test_index_of_archive_reuses_classify_feature_shards(
    index_dir: Path, sets: dict[str, Path], ckpt: Path, tmp_path: Path
):
    """An archive (YRS layout, truth.parquet) indexed with --features-dir copies shard features."""

    ref = load_index(index_dir)
    arch, pred, run, marked = _archive_and_features(ref, sets, ckpt, tmp_path)
    # The station classify-archive used, as it records it: the same settings pass.
    run["station"] = "yrs"
    run["station_config"] = to_dict(load_station(arch / "calib" / "station.yaml"))
    (pred / RUN_FILE).write_text(json.dumps(run, default=str))

    info = build_index(arch, ckpt, tmp_path / "idx", features_dir=pred)
    assert info["source_kind"] == "archive" and info["count"] == 24
    assert info["features_reused"] == 10 and info["labelled"]
    idx = load_index(tmp_path / "idx")
    by_name = {Path(p).name: i for i, p in enumerate(idx.items["path"])}
    order = [by_name[Path(p).name] for p in ref.items["path"]]
    # The reused rows are copies of the shards' float16 features, bit for bit ...
    np.testing.assert_array_equal(idx.features[order[:10]], marked.astype(np.float16))
    # ... and the rest are computed afresh: the same frames' features within their bounds.

    x = _model_inputs(ref, list(ref.items["path"][10:]))
    model = model_for_index(ref, None)[0]
    _assert_same_frame_features(model, x, idx.features[order[10:]], ref.features[10:])
    for j, p in enumerate(ref.items["path"]):
        assert idx.items["label"][by_name[Path(p).name]] == ref.items["label"][j]
    # Shards of another model are refused.
    run["model_id"] = "0" * 16
    (pred / RUN_FILE).write_text(json.dumps(run))

    with pytest.raises(CheckpointError, match="features of model"):
        build_index(arch, ckpt, tmp_path / "idx2", features_dir=pred)
    assert not (tmp_path / "idx2").exists()


def test_real_yrs_frames(shared_data: Path, ckpt: Path, tmp_path: Path):
    """Real preprocessed 440x440 YRS JPEGs pass through; a real THEMIS frame is refused."""

    yrs = shared_data / "yrs"
    info = build_index(yrs, ckpt, tmp_path / "idx")
    assert info["count"] == 5 and info["source_kind"] == "archive"  # figures/, eraseMap skipped
    q = yrs / "N20041112G031108.jpg"
    t = retrieve(tmp_path / "idx", [q], tmp_path / "out", k=5, ranks=[1, 5])
    assert Path(t["path"].iloc[0]).resolve() == q.resolve()  # itself first
    assert t["time_utc"].iloc[0] == pd.Timestamp("2004-11-12 03:11:08", tz="UTC")
    themis = shared_data / "themis" / "20140310_0605_gill_themis19_full.pgm"
    with pytest.raises(FrameGeometryError, match="0605_gill_themis19_full.pgm.*256x256"):
        retrieve(tmp_path / "idx", [themis], tmp_path / "out2", k=5, ranks=[1])


def test_retrieve_cosine(index_dir: Path, tmp_path: Path):
    q = pd.read_parquet(index_dir / "items.parquet")["path"][7]
    t = retrieve(index_dir, [q], tmp_path, k=3, ranks=[1, 3], metric="cosine", figure=False)
    # Itself first. Its cosine distance: float16 steps of ~2^-11 relative move the direction by
    # <= 2 * 2^-11 (1 - cos <= that^2 / 2 = 2e-7; the float32 embeddings differ far less, see
    # test_query_features_match_index), plus the float32 kNN arithmetic's bound (7e-4).
    assert t["path"].iloc[0] == q
    assert t["distance"].iloc[0] <= (2 * 2.0**-11) ** 2 / 2 + bounds.cosine_error(4096)
    assert (t["distance"] <= 2).all()
    assert json.loads((tmp_path / "_run.json").read_text())["metric"] == "cosine"


def test_evaluate_json_is_strict_when_a_class_has_no_queries(
    index_dir: Path, sets: dict[str, Path], tmp_path: Path
):
    qs = tmp_path / "arcs"
    (qs / "calib").mkdir(parents=True)
    (qs / "calib" / "station.yaml").write_bytes(
        (sets["query_set"] / "calib" / "station.yaml").read_bytes()
    )
    lab = pd.read_parquet(sets["query_set"] / "labels.parquet")
    lab = lab[lab["label"] == "arc"].copy()
    lab["path"] = [str(sets["query_set"] / p) for p in lab["path"]]
    lab.to_parquet(qs / "labels.parquet")
    evaluate_retrieval(index_dir, qs, tmp_path / "out", k=5, ranks=[1, 5], figure=False)

    def no_nan(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token}")

    res = json.loads((tmp_path / "out" / "retrieval_eval.json").read_text(), parse_constant=no_nan)
    rows = {r["class"]: r for r in res["scores"]}
    assert rows["drapery"]["n_queries"] == 0 and rows["drapery"]["p@1"] is None
    assert rows["arc"]["n_queries"] == 2 and rows["all"]["p@5"] == rows["arc"]["p@5"]
    assert "n/a" in (tmp_path / "out" / "retrieval_eval.md").read_text()


def test_lone_query_uses_the_index_dark_frames(tiny_labelled: Path, ckpt: Path, tmp_path: Path):
    """A query copied from its set (no calib/ beside it) is preprocessed with the index's darks."""

    info = build_index(tiny_labelled, ckpt, tmp_path / "idx")
    assert info["dark_dir"] is not None and info["source_kind"] == "labelled"
    idx = load_index(tmp_path / "idx")
    src = Path(idx.items["path"][3])
    lone = tmp_path / "lone" / src.name
    lone.parent.mkdir()
    lone.write_bytes(src.read_bytes())
    t = retrieve(tmp_path / "idx", [lone], tmp_path / "out", k=3, ranks=[1, 3], figure=False)
    assert t["path"].iloc[0] == str(src)  # itself first: its dark frames were found


def _leftovers(folder: Path) -> list[str]:
    """Temporary build folders or part files a run left in FOLDER."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_features_of_another_archive_are_refused(
    index_dir: Path, sets: dict[str, Path], ckpt: Path, tmp_path: Path, capsys
):
    """Same relative names in another archive are other frames: their features are not reused."""

    arch, pred, run, _ = _archive_and_features(load_index(index_dir), sets, ckpt, tmp_path, "a")
    other = tmp_path / "b"
    shutil.copytree(arch, other)
    st = load_station(other / "calib" / "station.yaml")
    manifest = tmp_path / "b.parquet"
    write_manifest(load_manifest(other, st), manifest, other)
    out = tmp_path / "work" / "idx"
    with pytest.raises(SystemExit) as exc:
        main(["index", "--checkpoint", str(ckpt), str(manifest), "--features-dir", str(pred)]
             + ["--out", str(out)])  # fmt: skip
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(arch.resolve()) in err and "--features-dir" in err
    assert not (tmp_path / "work").exists()
    # A run that did not record its archive is not trusted either.
    del run["root"]
    (pred / RUN_FILE).write_text(json.dumps(run))
    with pytest.raises(InputError, match="not recorded"):
        build_index(arch, ckpt, out, features_dir=pred)
    # The right archive, but features preprocessed for another station's settings.
    run["root"] = str(arch.resolve())
    run["station"], run["station_config"] = "yrs", to_dict(load_station("yrs"))
    (pred / RUN_FILE).write_text(json.dumps(run))
    with pytest.raises(InputError, match="--station"):
        build_index(arch, ckpt, out, features_dir=pred)
    assert not out.exists() and not (tmp_path / "work").exists()


def test_damaged_feature_shard_is_an_input_error(
    index_dir: Path, sets: dict[str, Path], ckpt: Path, tmp_path: Path, capsys
):
    arch, pred, _, _ = _archive_and_features(load_index(index_dir), sets, ckpt, tmp_path)
    shard = pred / "_features" / "shard-000000.npy"
    with open(shard, "r+b") as fh:
        fh.truncate(1000)
    out = tmp_path / "idx"
    with pytest.raises(SystemExit) as exc:
        main(["index", "--checkpoint", str(ckpt), str(arch), "--features-dir", str(pred)]
             + ["--out", str(out)])  # fmt: skip
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "shard-000000.npy" in err
    assert "classify-archive" in err and "--features-dir" in err and f"--out {pred}`" in err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_failed_index_build_leaves_nothing_and_keeps_the_old_index(
    index_dir: Path, sets: dict[str, Path], ckpt: Path, tmp_path: Path, monkeypatch
):
    # No frame of the 64-px set fits the full-size yrs camera: nothing indexed, nothing left.
    with pytest.raises(InputError, match="no frame could be read"):
        ri.build_index(sets["index_set"], ckpt, tmp_path / "new" / "idx", station="yrs")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="choose another --out"):
        ri.build_index(sets["index_set"], ckpt, tmp_path / "file" / "idx")
    (tmp_path / "file").unlink()
    # The same failure, and Ctrl-C halfway, into an existing index: it stays as it was.
    old = tmp_path / "old"
    shutil.copytree(index_dir, old)
    (old / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    with pytest.raises(InputError, match="no frame could be read"):
        ri.build_index(sets["index_set"], ckpt, old, station="yrs")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ri, "embed", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ri.build_index(sets["index_set"], ckpt, old)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert _leftovers(tmp_path) == [] and ri.load_index(old).meta["count"] == 24
    # A finished rebuild replaces the index files (a stale _errors.parquet goes), others stay.
    (old / "_errors.parquet").write_bytes(b"stale")
    info = ri.build_index(sets["query_set"], ckpt, old)
    assert info["count"] == 8 and ri.load_index(old).meta["count"] == 8
    assert sorted(p.name for p in old.iterdir()) == [
        "_features.npy",
        "_run.json",
        "items.parquet",
        "notes.txt",
    ]


def test_unreadable_queries_are_skipped_and_recorded(
    index_dir: Path, sets: dict[str, Path], tmp_path: Path, capsys, caplog
):
    good = sorted((sets["query_set"] / "arc").glob("*.png"))
    qdir = tmp_path / "q"
    qdir.mkdir()
    for p in good:
        shutil.copy(p, qdir / p.name)
    bad = qdir / "N20031222G040000.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "out"
    main(["retrieve", "--index", str(index_dir), "--query", str(qdir), "--out", str(out)]
         + ["--k", "3", "--ranks", "1,3"])  # fmt: skip
    t = pd.read_parquet(out / "neighbours.parquet")
    assert t["query"].nunique() == 2 and bad.name not in "".join(t["query"])
    errs = pd.read_parquet(out / "errors.parquet")
    assert list(errs.columns) == ERRORS_SCHEMA.names
    assert errs["path"].tolist() == [str(bad)] and errs["stage"].tolist() == ["retrieve"]
    assert "1 of 3 query frames could not be read" in caplog.text
    assert json.loads((out / "_run.json").read_text())["n_unreadable"] == 1
    # A clean rerun into the same folder drops the stale table; none readable is an error.
    retrieve(index_dir, good, out, k=3, ranks=[1], figure=False)
    assert not (out / "errors.parquet").exists()
    bad2 = qdir / "N20031222G040010.png"
    bad2.write_bytes(b"")
    with pytest.raises(InputError, match="none of the 2 query frames"):
        retrieve(index_dir, [bad, bad2], tmp_path / "none", k=3, ranks=[1])
    assert not (tmp_path / "none").exists()
    # --evaluate: the unreadable frame of a labelled set is left out and recorded as well.
    qs = tmp_path / "qs"
    shutil.copytree(sets["query_set"], qs)
    broken = sorted((qs / "radial").glob("*.png"))[0]
    broken.write_bytes(b"not a png")
    res = evaluate_retrieval(index_dir, qs, tmp_path / "ev", k=5, ranks=[1, 5], figure=False)
    assert res["n_queries"] == 7 and res["n_unreadable"] == 1
    errs = pd.read_parquet(tmp_path / "ev" / "errors.parquet")
    assert errs["path"].tolist() == [str(broken)] and errs["stage"].tolist() == ["evaluate"]


def test_default_ranks_are_clipped_to_k(index_dir: Path, sets: dict[str, Path], tmp_path: Path):
    q = pd.read_parquet(index_dir / "items.parquet")["path"][0]
    main(["retrieve", "--index", str(index_dir), "--query", q, "--k", "5"]
         + ["--out", str(tmp_path / "a")])  # fmt: skip
    assert json.loads((tmp_path / "a" / "_run.json").read_text())["ranks"] == [1, 3, 5]
    retrieve(index_dir, [q], tmp_path / "b", k=2, figure=False)
    assert json.loads((tmp_path / "b" / "_run.json").read_text())["ranks"] == [1]
    # --evaluate into --query's folder: it then holds the evaluation's outputs only.
    res = evaluate_retrieval(index_dir, sets["query_set"], tmp_path / "a", k=4, figure=False)
    assert res["ranks"] == [1, 3]
    assert json.loads((tmp_path / "a" / "_run.json").read_text())["mode"] == "evaluate"
    assert not (tmp_path / "a" / "neighbours.parquet").exists()
    assert not (tmp_path / "a" / "retrieval.png").exists()
    with pytest.raises(InputError, match="--ranks asks for rank 8 but --k is 5"):
        retrieve(index_dir, [q], tmp_path / "d", k=5, ranks="1,8")
    with pytest.raises(InputError, match="--ranks asks for rank 8 but --k is 5"):  # given: kept
        retrieve(index_dir, [q], tmp_path / "e", k=5, ranks="1,3,5,8,10,15,20")


def test_rebuild_into_an_index_on_another_filesystem(
    index_dir: Path, sets: dict[str, Path], ckpt: Path, tmp_path: Path
):
    """--out a link to a folder on another disk: the rebuild must not rename across devices."""

    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's temp folder")
    elsewhere = Path(tempfile.mkdtemp(dir=shm))
    try:
        target = elsewhere / "idx"
        shutil.copytree(index_dir, target)
        link = tmp_path / "idx"
        link.symlink_to(target)
        build_index(sets["index_set"], ckpt, link)
        assert load_index(link).meta["count"] == load_index(index_dir).meta["count"]
        assert not [p for p in target.iterdir() if p.name.startswith(".")]
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)


def _foreign_folders(base: Path) -> list[Path]:
    """A folder holding train's run record and one holding a checkpoint file."""
    by_record, by_marker = base / "train-out", base / "ckpt-out"
    by_record.mkdir()
    (by_record / "_run.json").write_text(json.dumps({"command": "train", "finished": True}))
    by_marker.mkdir()
    (by_marker / "model.safetensors").write_bytes(b"weights")
    return [by_record, by_marker]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("stage", ["index", "retrieve", "evaluate"])
def test_another_stages_out_is_refused(
    stage: str, index_dir: Path, sets: dict[str, Path], ckpt: Path, tmp_path: Path
):
    q = pd.read_parquet(index_dir / "items.parquet")["path"][0]
    run = {
        "index": lambda out: build_index(sets["query_set"], ckpt, out),
        "retrieve": lambda out: retrieve(index_dir, [q], out, k=3, figure=False),
        "evaluate": lambda out: evaluate_retrieval(index_dir, sets["query_set"], out, k=3),
    }[stage]
    for out in _foreign_folders(tmp_path):
        before = _snapshot(out)
        with pytest.raises(InputError, match="give `(index|retrieve)` a folder of its own") as e:
            run(out)
        assert str(out) in str(e.value)
        assert _snapshot(out) == before


def test_an_interrupted_index_build_leaves_no_finished_record(
    sets: dict[str, Path], ckpt: Path, tmp_path: Path, monkeypatch
):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ri, "write_table", interrupted)  # after the features, before the record
    with pytest.raises(KeyboardInterrupt):
        ri.build_index(sets["query_set"], ckpt, tmp_path / "idx")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_retrieve_leaves_no_finished_record(
    index_dir: Path, sets: dict[str, Path], tmp_path: Path, monkeypatch
):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    q = pd.read_parquet(index_dir / "items.parquet")["path"][0]
    monkeypatch.setattr(rq, "retrieval_figure", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rq.retrieve(index_dir, [q], tmp_path / "fresh", k=3)
    assert not (tmp_path / "fresh").exists()
    # Over a finished run: the earlier outputs and their record stay as they were.
    done = tmp_path / "done"
    rq.retrieve(index_dir, [q], done, k=3, figure=False)
    before = _snapshot(done)
    with pytest.raises(KeyboardInterrupt):
        rq.retrieve(index_dir, [q], done, k=5)
    monkeypatch.setattr(reval, "retrieval_figure", interrupted)
    with pytest.raises(KeyboardInterrupt):
        reval.evaluate_retrieval(index_dir, sets["query_set"], done, k=3)
    assert _snapshot(done) == before and read_run_record(done)["k"] == 3
