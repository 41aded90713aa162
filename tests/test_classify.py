"""classify-archive on a 2-worker CPU LocalCluster with 64-px frames and a random-weight AlexNet."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

import bounds
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from builders import local_cluster, random_checkpoint, terminal_popen

from pipeline.archive import load_manifest, write_manifest
from pipeline.checkpoint import load_checkpoint
from pipeline.classes import CLASSES, PROB_COLUMNS
from pipeline.classify import (
    classify_archive,
    manifest_hash,
    parse_since,
    plan_shards,
    remaining_frames,
)
from pipeline.cli import main
from pipeline.config import load_station
from pipeline.errors import FrameReadError, InputError
from pipeline.imageio import read_frame, write_frame
from pipeline.mlt import ut_to_mlt
from pipeline.models import INPUT_MEAN, INPUT_STD, to_model_input
from pipeline.predictions import (
    SHARD_FAILED,
    read_errors,
    read_predictions,
    read_run,
    shard_files,
)
from pipeline.preprocess import calibration_from_station, dark_for_time, find_dark_dir, preprocess
from pipeline.storage import PREDICTIONS_SCHEMA, read_contract

SIZE = 64
N_GOOD = 34
#: archive-relative paths of the two bad frames (a truncated PNG and a 48x48 frame).
CORRUPT = "2004/20041201/N20041201G064000.png"
WRONG_SIZE = "2004/20041201/N20041201G071000.png"


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def station(tiny_station_path):
    return load_station(tiny_station_path)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """34 good raw 16-bit frames, 1 corrupt, 1 of the wrong size, and a dark frame in calib/."""
    root = tmp_path_factory.mktemp("classify_archive")
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    t0 = pd.Timestamp("2004-12-01T06:00:00")
    for i in range(N_GOOD + 2):
        t = t0 + pd.Timedelta(minutes=2 * i)
        rel = f"2004/{t:%Y%m%d}/N{t:%Y%m%d}G{t:%H%M%S}.png"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel == CORRUPT:
            path.write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(200))
            continue
        size = 48 if rel == WRONG_SIZE else SIZE
        img = rng.normal(300, 20, (size, size))
        for _ in range(rng.integers(1, 4)):  # a few bright blobs / arcs so the classes vary
            cy, cx, s = rng.uniform(10, 54), rng.uniform(10, 54), rng.uniform(2, 12)
            img += rng.uniform(500, 3500) * np.exp(
                -(
                    (yy[:size, :size] - cy) ** 2 / (s * rng.uniform(0.2, 3))
                    + (xx[:size, :size] - cx) ** 2 / s
                )
            )
        write_frame(path, np.clip(img, 0, 65535).astype(np.uint16))
    (root / "calib").mkdir()
    write_frame(root / "calib" / "dark_20041101.png", np.full((SIZE, SIZE), 280, np.uint16))
    return root


#: The sky levels of a labelled set, as train records them in a checkpoint's meta.json.
TRAIN_SKY = {"min": 0.05, "p01": 0.06, "p50": 0.2, "p99": 0.5, "max": 0.6}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    meta = {"sky_level": TRAIN_SKY}
    return random_checkpoint(tmp_path_factory.mktemp("ckpt_a"), seed=0, input_size=SIZE, meta=meta)


@pytest.fixture(scope="module")
def ckpt_b(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("ckpt_b"), seed=1, input_size=SIZE)


@pytest.fixture(scope="module")
def cluster():
    """A running 2-worker cluster, used through --scheduler like a SLURM or Kubernetes one."""
    with local_cluster(n_workers=2) as (lc, client):
        yield lc, client


def _reference(archive: Path, station, ckpt: Path) -> pd.DataFrame:
    """A plain in-process loop: read, preprocess, model on one frame at a time."""
    model, meta = load_checkpoint(ckpt)
    manifest = load_manifest(archive, station)
    dark_dir = find_dark_dir(archive)
    rows = []
    for r in manifest.itertuples():
        try:
            raw = read_frame(r.abspath, r.frame)
            dark = read_frame(dark_for_time(dark_dir, r.time_utc))
            x = preprocess(raw, calibration_from_station(station, dark=dark))
        except FrameReadError:  # FrameGeometryError is a FrameReadError
            continue
        with torch.inference_mode():
            inp = to_model_input(x[None].astype(np.float32), meta["input_size"])
            p = torch.softmax(model(inp), dim=1)[0].numpy()
            f = model.features(inp)[0].numpy()
        rows.append(
            {"path": r.path, "frame": r.frame, **dict(zip(PROB_COLUMNS, p)), "fc7": f, "x": inp[0]}
        )
    return pd.DataFrame(rows)


#: Fixed random directions to compare 4096-d FC7 features along: a bound per projection costs a
#: backward pass, a bound per element 4096 of them (minutes). A feature vector off by more than
#: the bound fails along a random direction with overwhelming probability.
_DIRECTIONS = np.random.default_rng(12).standard_normal((4, 4096))


def _exact(model, x: torch.Tensor, directions: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Float64 probabilities (and FC7 projections) of model inputs ``x``, with the bounds on any
    float32 computation's error (bounds.forward_error_bound: worst case and probabilistic).

    Each path normalises (and may resize) the frames itself: (v - 0.5) / 0.25 rounds once and a
    bilinear resize sums 4 terms, so its input is off by at most gamma_5 (|x| + 2).
    """
    r = torch.from_numpy(directions if directions is not None else np.zeros((0, 4096)))

    def logits_and_projections(m, t):
        f = m.features(t)  # the projections in float64 on either path: no rounding to bound
        return torch.cat([m.head(f), f @ r.T.to(f.dtype)], dim=1)

    e_in = bounds.gamma(5) * (x.double().abs() + 2)
    worst, prob = bounds.forward_error_bound(model, x, logits_and_projections, input_err=e_in)
    with torch.no_grad():
        zr = logits_and_projections(copy.deepcopy(model).double(), x.double())
    c = len(CLASSES)
    z = zr[:, :c]
    return {
        "p": torch.softmax(z, dim=1).numpy(),
        "p_worst": bounds.softmax_error(z, worst[:, :c]).numpy(),
        "p_prob": bounds.softmax_error(z, prob[:, :c]).numpy(),
        "proj": zr[:, c:].numpy(),
        "proj_worst": worst[:, c:].numpy(),
        "proj_prob": prob[:, c:].numpy(),
    }


def _assert_probabilities(p: np.ndarray, exact: dict[str, np.ndarray]) -> None:
    """float32 probabilities within their bounds of the float64 ones."""
    err = np.abs(np.asarray(p, np.float64) - exact["p"])
    # The rigorous worst-case bound (gamma_{fan_in+1} per layer) is ~6e-3 here: far above how
    # much this random model's probabilities vary between frames (~3e-4), so alone it could
    # not tell one frame's output from another's ...
    assert (err <= exact["p_worst"]).all()
    # ... the probabilistic bound (rounding errors as independent, Hoeffding at 4e-22) can:
    assert (err <= exact["p_prob"]).all(), f"{err.max()} > {exact['p_prob'].min()}"


def _assert_exactly_once(out: Path, archive: Path, station) -> pd.DataFrame:
    """Every manifest frame in exactly one of predictions and errors; returns the predictions."""
    manifest = load_manifest(archive, station)
    pred = read_predictions(out)
    err = read_errors(out)
    keys = [(p, int(f)) for p, f in zip(pred["path"], pred["frame"])]
    ekeys = [(p, int(f)) for p, f in zip(err["path"], err["frame"])]
    assert len(keys) == len(set(keys)), "a frame is in two shards"
    assert len(ekeys) == len(set(ekeys))
    assert not set(keys) & set(ekeys)
    assert sorted(keys + ekeys) == sorted(zip(manifest["path"], manifest["frame"].astype(int)))
    assert not list(out.rglob("*.part")), "a partial file was left behind"
    return pred


# ------------------------------------------------------------------------------ pure planning


def test_plan_and_remaining_are_deterministic_and_disjoint():
    t = pd.date_range("2004-12-01", periods=10, freq="10s", tz="UTC")
    m = pd.DataFrame({"path": [f"f{i}.png" for i in range(10)], "frame": 0, "time_utc": t})
    shuffled = m.sample(frac=1, random_state=0)
    assert manifest_hash(m) == manifest_hash(shuffled)
    assert manifest_hash(m) != manifest_hash(m.iloc[:9])
    left = remaining_frames(shuffled, m.iloc[[0, 3, 4]][["path", "frame"]])
    assert left["path"].tolist() == [f"f{i}.png" for i in (1, 2, 5, 6, 7, 8, 9)]
    shards = plan_shards(left, 3, first_shard=7)
    assert [s for s, _ in shards] == [7, 8, 9]
    assert [len(df) for _, df in shards] == [3, 3, 1]
    with pytest.raises(InputError, match="--since"):
        parse_since("yesterday-ish")
    assert parse_since("2004-12-01") == pd.Timestamp("2004-12-01", tz="UTC")


# ------------------------------------------------------------------------------ end to end


def test_local_cluster_matches_plain_loop_one_model_load_per_worker(
    archive, station, ckpt, tmp_path
):
    out = tmp_path / "pred"
    summary = classify_archive(
        archive,
        ckpt,
        out,
        station=station,
        workers=2,
        threads_per_worker=1,
        shard_size=6,
        batch_size=4,
        device="cpu",
        features=True,
    )
    pred = _assert_exactly_once(out, archive, station)
    assert summary.frames_classified == N_GOOD and summary.frames_errors == 2
    assert sum(summary.class_counts.values()) == N_GOOD
    # one model load per worker process, however many shards it ran
    assert summary.shards_submitted == 6 and 1 <= len(summary.model_loads) <= 2
    assert set(summary.model_loads.values()) == {1}

    ref = _reference(archive, station, ckpt)
    got = pred.merge(ref, on=["path", "frame"], suffixes=("", "_ref"))
    assert len(got) == N_GOOD
    # Workers (batches of 4, one thread) and the plain loop (one frame, the test's threads) are
    # two float32 computations: each is checked against the float64 model within its bound.
    exact = _exact(load_checkpoint(ckpt)[0], torch.stack(list(got["x"])), _DIRECTIONS)
    _assert_probabilities(got[list(PROB_COLUMNS)].to_numpy(), exact)
    _assert_probabilities(got[[f"{c}_ref" for c in PROB_COLUMNS]].to_numpy(), exact)
    # The bound is sharp enough that a frame's probabilities would not pass for another's.
    pairs = np.triu_indices(N_GOOD, 1)
    apart = np.abs(exact["p"][:, None] - exact["p"][None]).max(-1)[pairs]
    assert np.median(apart) > 2 * exact["p_prob"].max()
    # Labels: the float64 argmax wherever its top-2 margin exceeds the error bound (elsewhere
    # another kernel may break the near-tie the other way).
    top2 = np.sort(exact["p"], axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * exact["p_prob"].max(axis=1)
    assert clear.mean() > 0.5
    exact_label = np.asarray(CLASSES)[exact["p"].argmax(1)]
    assert (got["label"].astype(str).to_numpy() == exact_label)[clear].all()
    assert pq.read_schema(next(iter(shard_files(out).values()))).equals(
        PREDICTIONS_SCHEMA, check_metadata=False
    )
    np.testing.assert_allclose(pred["mlt"], ut_to_mlt(pred["time_utc"], station))
    assert (pred["model_id"] == json.loads((ckpt / "meta.json").read_text())["model_id"]).all()
    # sky level: each frame's mean model input in [0, 1] units, against float64 from the plain
    # loop's input. Each side's input is off by gamma_5 (|x| + 2) per pixel (see _exact); the
    # worker's float32 mean of S*S terms adds gamma_{S*S} mean|x|, its scale and shift gamma_2.
    x = torch.stack(list(got["x"])).double()
    exact_sky = (x[:, 0] * INPUT_STD + INPUT_MEAN).mean(dim=(1, 2)).numpy()
    amax, mean_abs = x.abs().amax(dim=(1, 2, 3)).numpy(), x.abs().mean(dim=(1, 2, 3)).numpy()
    tol = INPUT_STD * (2 * bounds.gamma(5) * (amax + 2) + bounds.gamma(SIZE * SIZE) * mean_abs)
    tol += bounds.gamma(2)
    assert (np.abs(got["sky_level"].to_numpy(np.float64) - exact_sky) <= tol).all()
    assert np.ptp(exact_sky) > 10 * tol.max()  # the frames differ: a swapped row would fail
    assert read_run(out)["train_sky_level"] == TRAIN_SKY  # for occurrence --min-sky model

    err = read_errors(out).set_index("path")
    assert set(err.index) == {CORRUPT, WRONG_SIZE}
    assert (err["stage"] == "classify").all()
    assert err.loc[CORRUPT, "error"] == "FrameReadError"
    assert (
        err.loc[WRONG_SIZE, "error"] == "FrameGeometryError"
        and "48x48" in err.loc[WRONG_SIZE, "message"]
    )

    # features: float16 FC7, the same rows in the same order as each shard's parquet file
    fc7 = {}
    for s, f in shard_files(out).items():
        feats = np.load(out / "_features" / f"shard-{s:06d}.npy")
        rows = pd.read_parquet(f, columns=["path"])
        assert feats.dtype == np.float16 and feats.shape == (len(rows), 4096)
        fc7.update(zip(rows["path"], feats))
    f16 = np.stack([fc7[p] for p in got["path"]]).astype(np.float64)
    assert (f16 >= 0).all()  # FC7 after its ReLU: exactly >= 0, and float16 keeps the sign
    # float16 storage: relative 2^-11 (normal range), absolute 2^-25 (half the subnormal step);
    # along direction r that is at most |r| . (2^-11 |f| / (1 - 2^-11) + 2^-25).
    store = (2.0**-11 * f16 / (1 - 2.0**-11) + 2.0**-25) @ np.abs(_DIRECTIONS).T
    for f, extra in ((f16, store), (np.stack(list(got["fc7"])).astype(np.float64), 0.0)):
        err = np.abs(f @ _DIRECTIONS.T - exact["proj"])  # float64 products: exact to 1e-13
        # worst case ~0.7 here (projections reach ~0.9): only the probabilistic bound is sharp.
        assert (err <= exact["proj_worst"] + extra).all()
        assert (err <= exact["proj_prob"] + extra).all(), f"{err.max()}"
    # ... and a frame's features would not pass for another's.
    apart = np.abs(exact["proj"][:, None] - exact["proj"][None]).max(-1)[pairs]
    assert np.median(apart) > 2 * (exact["proj_prob"] + store).max()


def test_cli_scheduler_then_rerun_does_no_new_work(
    archive, station, tiny_station_path, ckpt, cluster, tmp_path, capsys
):
    lc, _ = cluster
    out = tmp_path / "pred"
    args = [
        "classify-archive", str(archive), "--checkpoint", str(ckpt), "--out", str(out),
        "--scheduler", lc.scheduler_address, "--station", str(tiny_station_path),
        "--shard-size", "8", "--batch-size", "8", "--device", "cpu",
    ]  # fmt: skip
    main(args)
    assert f"classified {N_GOOD} frames, 2 in errors" in capsys.readouterr().err
    _assert_exactly_once(out, archive, station)
    run = read_run(out)
    assert run["command"] == "classify-archive" and run["finished"] is True
    assert run["shard_size"] == 8 and len(run["shards"]) == 5
    assert run["manifest_hash"] == manifest_hash(load_manifest(archive, station))
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}

    main(args)
    assert "nothing to do" in capsys.readouterr().err
    after = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    assert before == after, "a rerun with nothing to do rewrote files"
    assert len(read_run(out)["shards"]) == 5

    # A driver that died after a worker wrote shard 4 but before _run.json said so, and a
    # worker killed while writing: the rerun drops both leftovers and redoes only shard 4.
    run = read_run(out)
    lost = run["shards"].pop("000004")
    (out / "_run.json").write_text(json.dumps(run))
    (out / "shards" / ".shard-000002.parquet.x1y2.part").write_bytes(b"half a file")
    s = classify_archive(
        archive, ckpt, out, station=station, scheduler=lc.scheduler_address, shard_size=8
    )
    assert s.frames_planned == lost["predicted"] and s.frames_classified == lost["predicted"]
    assert sorted(shard_files(out)) == [0, 1, 2, 3, 4]  # the orphan went, its number reused
    _assert_exactly_once(out, archive, station)


def _comparable(df: pd.DataFrame) -> pd.DataFrame:
    """Predictions as any reader returns them, in one form: schema columns, sorted, plain types."""
    df = df[PREDICTIONS_SCHEMA.names].astype(
        {"path": str, "label": str, "model_id": str, "frame": "int64"}
    )
    df["time_utc"] = pd.to_datetime(df["time_utc"], utc=True).dt.as_unit("ns")
    return df.sort_values(["path", "frame"], ignore_index=True)


def test_the_predictions_folder_is_a_parquet_dataset_any_client_opens(
    archive, station, ckpt, cluster, tmp_path
):
    """pd.read_parquet(PRED_DIR) once failed on features/*.npy and errors.parquet. Now shards/
    holds only the shards and everything else in PRED_DIR starts with _ or ."""
    import dask.dataframe as dd
    import duckdb
    import polars as pl
    import pyarrow.dataset as ds

    out = tmp_path / "pred"
    kw = dict(station=station, scheduler=cluster[0].scheduler_address, shard_size=12)
    classify_archive(archive, ckpt, out, features=True, **kw)
    assert len(read_errors(out)) == 2 and len(list((out / "_features").glob("*.npy"))) == 3
    assert {p.name for p in out.iterdir()} == {
        "shards", "_features", "_errors.parquet", "_run.json", ".classify.lock"
    }  # fmt: skip
    want = _comparable(read_predictions(out))
    assert len(want) == N_GOOD
    data = out / "shards"
    got = {
        "pandas": pd.read_parquet(out),
        "pandas shards/": pd.read_parquet(data),
        "pyarrow.dataset": ds.dataset(out, format="parquet").to_table().to_pandas(),
        "pyarrow.dataset shards/": ds.dataset(data, format="parquet").to_table().to_pandas(),
        "dask shards/": dd.read_parquet(data).compute(),
        "duckdb shards/": duckdb.sql(f"SELECT * FROM read_parquet('{data}')").df(),
        "polars shards/": pl.scan_parquet(data).collect().to_pandas(),
    }
    for reader, df in got.items():
        pd.testing.assert_frame_equal(_comparable(df), want, check_dtype=False, obj=reader)

    # Each shard says what it holds, in key-value metadata any Parquet client reads.
    shard = next(iter(shard_files(out).values()))
    contract = read_contract(shard)
    model_id = json.loads((ckpt / "meta.json").read_text())["model_id"]
    assert contract["table"] == "predictions" and contract["classes"] == list(CLASSES)
    assert (contract["station"], contract["model_id"]) == (station.code, model_id)
    assert contract["mlt_method"] == station.mlt.method
    assert contract["units"]["mlt"] == "hours" and contract["units"]["p_arc"] == "1"
    assert set(contract["long_names"]) == set(PREDICTIONS_SCHEMA.names)
    kv = dict(duckdb.sql(f"SELECT key, value FROM parquet_kv_metadata('{shard}')").fetchall())
    assert kv[b"aurora:model_id"] == model_id.encode()


def test_other_checkpoint_refused_unless_overwrite(
    archive, station, tiny_station_path, ckpt, ckpt_b, cluster, tmp_path, capsys
):
    lc, _ = cluster
    out = tmp_path / "pred"
    kw = dict(station=station, scheduler=lc.scheduler_address, shard_size=12, device="cpu")
    classify_archive(archive, ckpt, out, **kw)
    with pytest.raises(InputError, match="refusing to mix models.*--overwrite"):
        classify_archive(archive, ckpt_b, out, **kw)
    with pytest.raises(SystemExit) as exc:
        main(["classify-archive", str(archive), "--checkpoint", str(ckpt_b), "--out", str(out),
              "--station", str(tiny_station_path),
              "--scheduler", lc.scheduler_address])  # fmt: skip
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "--overwrite" in err and "Traceback" not in err

    summary = classify_archive(archive, ckpt_b, out, overwrite=True, **kw)
    assert summary.frames_classified == N_GOOD and summary.already_done == 0
    pred = _assert_exactly_once(out, archive, station)
    model_b = json.loads((ckpt_b / "meta.json").read_text())["model_id"]
    assert set(pred["model_id"]) == {model_b} and read_run(out)["model_id"] == model_b


def test_since_appends_only_newer_frames(archive, station, ckpt, cluster, tmp_path):
    lc, _ = cluster
    out = tmp_path / "pred"
    manifest = load_manifest(archive, station)
    first = tmp_path / "first.parquet"
    write_manifest(manifest.iloc[:20], first, root=archive)  # yesterday's archive
    kw = dict(station=station, scheduler=lc.scheduler_address, shard_size=8, device="cpu")
    s1 = classify_archive(first, ckpt, out, **kw)
    assert s1.frames_planned == 20
    old = dict(shard_files(out))
    assert list(old) == [0, 1, 2]

    since = manifest["time_utc"].iloc[19]
    s2 = classify_archive(archive, ckpt, out, since=str(since), **kw)
    assert s2.frames_planned == len(manifest) - 20 and s2.already_done == 0
    new = {s: p for s, p in shard_files(out).items() if s not in old}
    assert min(new) == 3, "appended shards must be numbered after the existing ones"
    newer = pd.concat([pd.read_parquet(p) for p in new.values()])
    assert (newer["time_utc"] > since).all()
    _assert_exactly_once(out, archive, station)
    # a nightly rerun with the same --since does nothing new
    assert classify_archive(archive, ckpt, out, since=str(since), **kw).frames_planned == 0


def test_failing_shards_are_recorded_then_retried_by_the_next_run(
    archive, station, ckpt, cluster, tmp_path
):
    lc, _ = cluster
    out = tmp_path / "pred"
    out.mkdir()
    (out / "_features").write_text("a file where the features folder should be")
    kw = dict(station=station, scheduler=lc.scheduler_address, shard_size=12, device="cpu")
    s1 = classify_archive(archive, ckpt, out, features=True, retries=1, **kw)
    assert s1.shards_failed == 3 and s1.frames_classified == 0
    err = read_errors(out)
    assert len(err) == N_GOOD + 2 and (err["error"] == SHARD_FAILED).all()
    assert json.loads((out / "_run.json").read_text())["runs"][-1]["frames_failed"] == N_GOOD + 2
    assert (
        "NotADirectoryError" in err["message"].iloc[0]
        or "FileExistsError" in err["message"].iloc[0]
    )
    _assert_exactly_once(out, archive, station)

    (out / "_features").unlink()
    s2 = classify_archive(archive, ckpt, out, features=True, **kw)
    assert s2.frames_classified == N_GOOD and s2.shards_failed == 0
    err = read_errors(out)
    assert set(err["path"]) == {CORRUPT, WRONG_SIZE} and SHARD_FAILED not in set(err["error"])
    _assert_exactly_once(out, archive, station)


def test_killed_worker_mid_run_still_every_frame_once(archive, station, ckpt, cluster, tmp_path):
    lc, client = cluster
    out = tmp_path / "pred"
    pids = client.run(os.getpid)
    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            if shard_files(out):  # the run is under way: kill a worker that holds a shard
                busy = [a for a, keys in client.processing().items() if keys and a in pids]
                pid = pids[(busy or list(pids))[0]]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.005)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    summary = classify_archive(
        archive, ckpt, out, station=station, scheduler=lc.scheduler_address,
        shard_size=2, batch_size=2, device="cpu",
    )  # fmt: skip
    th.join(5)
    assert killed, "the run ended before a worker could be killed"
    assert summary.shards_failed == 0 and summary.frames_classified == N_GOOD
    _assert_exactly_once(out, archive, station)
    assert len(read_run(out)["shards"]) == (N_GOOD + 2) // 2


def test_second_driver_on_the_same_folder_is_refused(tmp_path):
    import fcntl

    out = tmp_path / "pred"
    out.mkdir()
    with open(out / ".classify.lock", "w") as held:  # a run in progress holds the lock
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(InputError, match="another classify-archive run is writing here"):
            classify_archive(tmp_path, tmp_path / "no-checkpoint", out)
    # The lock file of a run that died holds no lock: the next run goes on.
    with pytest.raises(Exception, match="no checkpoint here"):
        classify_archive(tmp_path, tmp_path / "no-checkpoint", out)


def test_preprocessed_frames_pass_through(archive, station, ckpt, cluster, tmp_path):
    """--preprocessed: crop-size uint8 frames go to the model as x / 255; raw ones are refused."""
    lc, _ = cluster
    manifest = load_manifest(archive, station)
    rows = manifest[~manifest["path"].isin([CORRUPT, WRONG_SIZE])].iloc[:6]
    pre = tmp_path / "pre"
    crop = station.crop_size
    rng = np.random.default_rng(0)
    for r in rows.itertuples():
        (pre / r.path).parent.mkdir(parents=True, exist_ok=True)
        write_frame(pre / r.path, rng.integers(0, 256, (crop, crop), dtype=np.uint8))
    raw_rel = manifest["path"].iloc[-1]  # one raw frame among them: wrong for --preprocessed
    (pre / raw_rel).parent.mkdir(parents=True, exist_ok=True)
    (pre / raw_rel).write_bytes((archive / raw_rel).read_bytes())
    out = tmp_path / "pred"
    s = classify_archive(
        pre, ckpt, out, station=station, scheduler=lc.scheduler_address, preprocessed=True
    )
    assert s.frames_classified == 6 and s.frames_errors == 1
    err = read_errors(out)
    assert err["path"].tolist() == [raw_rel] and "--preprocessed" in err["message"].iloc[0]
    model, meta = load_checkpoint(ckpt)
    pred = read_predictions(out).set_index("path")
    # x / 255 (one rounding, u) then normalised: _exact's input error covers it.
    frames = np.stack(
        [read_frame(pre / r.path).astype(np.float32) / 255 for r in rows.itertuples()]
    )
    exact = _exact(model, to_model_input(frames, meta["input_size"]))
    _assert_probabilities(pred.loc[rows["path"], list(PROB_COLUMNS)].to_numpy(), exact)


@pytest.mark.gpu
def test_cuda_workers_agree_with_the_plain_cpu_loop(archive, station, ckpt, tmp_path):
    """The GPU path (pinned float32 buffers, resize on the GPU, bf16 autocast, several worker
    processes sharing the device) gives the CPU loop's classes and probabilities to bf16
    precision."""
    out = tmp_path / "pred"
    summary = classify_archive(
        archive, ckpt, out, station=station, workers=2, shard_size=6, batch_size=4, device="cuda"
    )
    pred = _assert_exactly_once(out, archive, station)
    assert summary.frames_classified == N_GOOD and set(summary.model_loads.values()) == {1}
    got = pred.merge(_reference(archive, station, ckpt), on=["path", "frame"], suffixes=("", "_r"))
    assert len(got) == N_GOOD
    probs = got[list(PROB_COLUMNS)].to_numpy()
    ref = got[[f"{c}_r" for c in PROB_COLUMNS]].to_numpy()
    # Not derived from a bound (issue #12): cuBLAS may round split-K partial sums of bf16 GEMMs
    # to bf16 (torch's allow_bf16_reduced_precision_reduction), with a split count it chooses,
    # so no gamma_n applies; 0.02 is ~5 bf16 steps (2^-8) of a probability.
    np.testing.assert_allclose(probs, ref, atol=0.02)  # bf16 keeps ~3 significant digits
    clear = np.sort(ref, axis=1)[:, -1] - np.sort(ref, axis=1)[:, -2] > 0.04
    assert (probs.argmax(1) == ref.argmax(1))[clear].all()


def test_station_preprocessing_other_than_training_is_warned(ckpt, station, caplog):
    import dataclasses
    import logging

    from pipeline.classify import _warn_preprocess_mismatch
    from pipeline.preprocess import calibration_from_station

    meta = {"preprocess": {"calibration": calibration_from_station(station).params()}}
    with caplog.at_level(logging.WARNING, logger="pipeline.classify"):
        _warn_preprocess_mismatch(meta, station, ckpt)
        assert not caplog.records
        other = dataclasses.replace(
            station, preprocess=dataclasses.replace(station.preprocess, rotate=True)
        )
        _warn_preprocess_mismatch(meta, other, ckpt)
    assert len(caplog.records) == 1 and "rotate_deg: trained None" in caplog.text


def _copy_archive(archive: Path, dest: Path, station_yaml: Path | None = None) -> Path:
    import shutil

    shutil.copytree(archive, dest)
    if station_yaml is not None:
        shutil.copy(station_yaml, dest / "calib" / "station.yaml")
    return dest


def test_station_comes_from_the_archive_and_a_wrong_one_is_one_error(
    archive, station, tiny_station_path, ckpt, cluster, tmp_path, capsys
):
    """No --station: the archive's calib/station.yaml (the README's rule). A station whose
    camera does not match the dark frames is one error before any work, not 36 frame errors."""
    lc, _ = cluster
    arch = _copy_archive(archive, tmp_path / "arch", tiny_station_path)
    common = ["--checkpoint", str(ckpt), "--scheduler", lc.scheduler_address, "--device", "cpu"]
    main(["classify-archive", str(arch), "--out", str(tmp_path / "p1"), *common])
    assert f"classified {N_GOOD} frames, 2 in errors" in capsys.readouterr().err
    assert read_run(tmp_path / "p1")["station_config"]["raw_size"] == SIZE
    with pytest.raises(SystemExit) as exc:
        main(["classify-archive", str(arch), "--out", str(tmp_path / "p2"), "--station", "yrs",
              *common])  # fmt: skip
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "dark frame is 64x64" in err and "--station" in err
    assert not (tmp_path / "p2").exists()  # nothing left that the corrected rerun trips over
    # the same output, another station or another archive: refused, not mixed
    with pytest.raises(InputError, match="holds predictions for station"):
        other = dataclasses.replace(station, code="thx")
        classify_archive(arch, ckpt, tmp_path / "p1", station=other, dark_dir=None,
                         scheduler=lc.scheduler_address)  # fmt: skip
    arch_b = _copy_archive(archive, tmp_path / "arch_b", tiny_station_path)
    with pytest.raises(InputError, match="holds predictions of the archive at"):
        classify_archive(arch_b, ckpt, tmp_path / "p1", scheduler=lc.scheduler_address)


def test_retry_errors_classifies_repaired_frames(
    archive, station, tiny_station_path, ckpt, cluster, tmp_path, capsys
):
    lc, _ = cluster
    arch = _copy_archive(archive, tmp_path / "arch", tiny_station_path)
    out = tmp_path / "pred"
    kw = dict(scheduler=lc.scheduler_address, shard_size=8, device="cpu")
    classify_archive(arch, ckpt, out, **kw)
    assert set(read_errors(out)["path"]) == {CORRUPT, WRONG_SIZE}
    write_frame(arch / CORRUPT, np.full((SIZE, SIZE), 900, np.uint16))  # the copy finished
    again = classify_archive(arch, ckpt, out, **kw)
    assert again.frames_planned == 0 and again.earlier_errors == 2
    assert "--retry-errors" in again.text()
    retried = classify_archive(arch, ckpt, out, retry_errors=True, **kw)
    assert retried.frames_planned == 2 and retried.frames_classified == 1
    assert set(read_errors(out)["path"]) == {WRONG_SIZE}
    pred = _assert_exactly_once(out, arch, station)
    assert (pred["path"] == CORRUPT).sum() == 1
    # only a frame that never reads is retried: the nightly run reports it and succeeds
    main(["classify-archive", str(arch), "--checkpoint", str(ckpt), "--out", str(out),
          "--scheduler", lc.scheduler_address, "--retry-errors"])  # fmt: skip
    assert "classified 0 frames, 1 in errors" in capsys.readouterr().err


def test_a_run_where_every_frame_fails_exits_with_an_error(
    tiny_station_path, ckpt, cluster, tmp_path, capsys
):
    lc, _ = cluster
    arch = tmp_path / "bad"
    (arch / "2004" / "20041201").mkdir(parents=True)
    for i in range(3):
        (arch / "2004" / "20041201" / f"N20041201G06{i}000.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit) as exc:
        main(["classify-archive", str(arch), "--checkpoint", str(ckpt), "--out",
              str(tmp_path / "p"), "--station", str(tiny_station_path), "--scheduler",
              lc.scheduler_address, "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err
    assert exc.value.code == 1
    assert "error: no frame could be classified: all 3" in err and "N20041201G060000" in err
    assert len(read_errors(tmp_path / "p")) == 3


def test_a_table_without_frames_is_refused_not_nothing_to_do(ckpt, tmp_path):
    table = tmp_path / "errors.parquet"
    pd.DataFrame({"path": ["a.png"], "frame": [0], "stage": ["scan"]}).to_parquet(table)
    with pytest.raises(InputError, match="no frames to classify"):
        classify_archive(table, ckpt, tmp_path / "p", device="cpu")
    assert not (tmp_path / "p").exists()


def test_ctrl_c_stops_classify_archive_cleanly(archive, ckpt, tiny_station_path, tmp_path, capsys):
    """A terminal's Ctrl-C mid-run (to the whole process group): exit 130 before the work is
    done, no traceback and no worker killed by its nanny; the rerun finishes every frame once."""
    import os
    import signal
    import sys
    import time

    big = tmp_path / "big"
    (big / "calib").mkdir(parents=True)
    os.link(archive / "calib" / "dark_20041101.png", big / "calib" / "dark_20041101.png")
    bad = (CORRUPT, WRONG_SIZE)
    good = sorted(
        p for p in archive.rglob("N*.png") if p.relative_to(archive).as_posix() not in bad
    )
    t0 = pd.Timestamp("2004-12-02T06:00:00")
    for i in range(300):  # hard links: a long run from a few real files
        t = t0 + pd.Timedelta(seconds=10 * i)
        dst = big / f"2004/{t:%Y%m%d}/N{t:%Y%m%d}G{t:%H%M%S}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(good[i % len(good)], dst)
    out = tmp_path / "pred"
    cmd = [sys.executable, "-m", "pipeline", "classify-archive", str(big), "--checkpoint",
           str(ckpt), "--out", str(out), "--station", str(tiny_station_path), "--workers", "2",
           "--threads-per-worker", "1", "--shard-size", "8", "--batch-size", "8"]  # fmt: skip
    proc = terminal_popen(cmd)
    deadline = time.monotonic() + 120
    while not list(out.glob("shards/shard-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.1)  # classifying has started
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)  # a generous wait, not a timing assertion
    text = err.decode(errors="replace")
    assert proc.returncode == 130, text[-2000:]
    assert "Traceback" not in text and "still alive" not in text, text[-2000:]
    done = json.loads((out / "_run.json").read_text())["shards"]
    assert all((out / "shards" / f"shard-{k}.parquet").is_file() for k in done)
    main(cmd[3:])  # the rerun (in-process) finishes the archive
    n_done = sum(v["frames"] for v in done.values())
    assert f"{n_done} already done" in "".join(capsys.readouterr())
    # It stopped without draining the queue: the frame count says so, not the (load-dependent)
    # clock; a Ctrl-C that waited for all the work would have done all 300.
    assert n_done < 300
    pred = read_predictions(out)
    keys = list(zip(pred["path"], pred["frame"]))
    assert len(keys) == len(set(keys)) == 300


def test_out_may_not_be_the_archive_or_a_checkpoint(archive, station, ckpt, tmp_path):
    for out, what in ((archive, "is the archive itself"), (ckpt, "holds a checkpoint")):
        with pytest.raises(InputError, match=what):
            classify_archive(archive, ckpt, out, station=station, workers=1)
    assert not (archive / "_run.json").exists() and not (ckpt / "_run.json").exists()


def test_shards_finished_before_an_interrupt_count_as_done(
    archive, station, ckpt, cluster, tmp_path, monkeypatch
):
    """_run.json is rewritten at most every FLUSH_S; on Ctrl-C it is written at once, so the
    shards finished so far are not classified again by the rerun."""
    import pipeline.cluster as cluster_mod

    lc, _ = cluster
    real = cluster_mod.run_windowed

    def interrupted(*a, on_result, **k):
        seen = []

        def wrapped(s, res):
            on_result(s, res)
            seen.append(s)
            if len(seen) == 2:
                raise KeyboardInterrupt

        return real(*a, on_result=wrapped, **k)

    monkeypatch.setattr(cluster_mod, "run_windowed", interrupted)
    monkeypatch.setattr("pipeline.classify.FLUSH_S", 3600.0)  # no periodic flush in between
    out = tmp_path / "pred"
    kw = dict(station=station, scheduler=lc.scheduler_address, shard_size=8, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        classify_archive(archive, ckpt, out, **kw)
    run = json.loads((out / "_run.json").read_text())
    assert len(run["shards"]) == 2 and run["finished"] is False
    assert "finished" not in run["runs"][-1]
    monkeypatch.setattr(cluster_mod, "run_windowed", real)
    again = classify_archive(archive, ckpt, out, **kw)
    assert again.already_done == 16
    assert read_run(out)["finished"] is True
    _assert_exactly_once(out, archive, station)


def test_an_interrupted_rerun_unmarks_the_finished_run(
    archive, station, ckpt, cluster, tmp_path, monkeypatch
):
    """A rerun with new frames marks the folder unfinished before it writes a shard: Ctrl-C
    then leaves finished: false (not the earlier run's true), and the next run finishes it."""
    import pipeline.cluster as cluster_mod

    lc, _ = cluster
    out = tmp_path / "pred"
    manifest = load_manifest(archive, station)
    first = tmp_path / "first.parquet"
    write_manifest(manifest.iloc[:20], first, root=archive)
    kw = dict(station=station, scheduler=lc.scheduler_address, shard_size=8, device="cpu")
    classify_archive(first, ckpt, out, **kw)
    assert read_run(out)["finished"] is True

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    real = cluster_mod.run_windowed
    monkeypatch.setattr(cluster_mod, "run_windowed", interrupted)
    with pytest.raises(KeyboardInterrupt):
        classify_archive(archive, ckpt, out, **kw)
    run = read_run(out)
    assert run["finished"] is False and len(run["runs"]) == 2
    monkeypatch.setattr(cluster_mod, "run_windowed", real)
    again = classify_archive(archive, ckpt, out, **kw)
    assert again.already_done == 20 and read_run(out)["finished"] is True
    _assert_exactly_once(out, archive, station)


@pytest.mark.parametrize(
    "plant, named",
    [
        (lambda d: (d / "_run.json").write_text(json.dumps({"command": "train"})), "checkpoint"),
        (lambda d: (d / "model.safetensors").write_bytes(b"x"), "a checkpoint"),
        (lambda d: (d / "_run.json").write_text(json.dumps({"command": "occurrence"})), "occ"),
    ],
)
def test_an_out_holding_another_stages_output_is_refused_as_it_was(
    archive, ckpt, tmp_path, plant, named
):
    out = tmp_path / "other"
    out.mkdir()
    plant(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(InputError, match=str(out)) as err:
        classify_archive(archive, ckpt, out, workers=1)
    assert named in str(err.value) and "`classify-archive`" in str(err.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no lock file either


# ------------------------------------------------------------------------------ the bad-frame zoo


def _plant_zoo(root: Path) -> dict[str, str]:
    """Copy the good archive, plant every kind of bad file a station's copy holds; their names."""
    import shutil

    day = root / "2004" / "20041202"
    day.mkdir(parents=True)
    rng = np.random.default_rng(9)
    good_path = root / "2004/20041201/N20041201G060000.png"
    good = read_frame(good_path)
    assert good.shape == (SIZE, SIZE)
    t = iter(pd.date_range("2004-12-02T06:00:00", periods=20, freq="1min"))
    name = lambda: f"N{next(t):%Y%m%d}G{next(t):%H%M%S}.png"  # noqa: E731
    planted = {}
    for kind in ["zero", "truncated", "text", "garbage", "link", "wrong", "rgb", "zeros", "sat"]:
        planted[kind] = day / name()
    planted["zero"].write_bytes(b"")
    png = good_path.read_bytes()
    planted["truncated"].write_bytes(png[: len(png) // 2])
    planted["text"].write_text("this is not an image\n")
    planted["garbage"].write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(500))
    planted["link"].symlink_to(day / "N20041202G999999.png")  # dangling
    write_frame(planted["wrong"], np.full((SIZE + 8, SIZE + 8), 500, np.uint16))
    from PIL import Image

    Image.fromarray(np.stack([good.astype(np.uint8)] * 3, axis=-1)).save(planted["rgb"])
    write_frame(planted["zeros"], np.zeros_like(good))
    write_frame(planted["sat"], np.full_like(good, 65535))
    (day / name()).mkdir()  # a folder named like a frame
    planted["dir"] = sorted(p for p in day.iterdir() if p.is_dir())[0]
    planted["bad_time"] = day / "N20041202G106001.png"  # minute 60
    shutil.copy(planted["sat"], planted["bad_time"])
    if os.geteuid() != 0:  # root reads everything: the unreadable case needs another user
        planted["unreadable"] = day / name()
        shutil.copy(planted["sat"], planted["unreadable"])
        planted["unreadable"].chmod(0)
    return {k: p.relative_to(root).as_posix() for k, p in planted.items()}


@pytest.mark.parametrize("source", ["archive", "manifest"])
def test_bad_frame_zoo_every_file_lands_once(archive, station, ckpt, cluster, tmp_path, source):
    import shutil

    from pipeline.archive import scan_to_files

    root = tmp_path / "zoo"
    shutil.copytree(archive, root)
    zoo = _plant_zoo(root)
    planted = set(zoo.values())
    src = root
    if source == "manifest":
        src = tmp_path / "manifest.parquet"
        scan_to_files(root, station, src)
    summary = classify_archive(
        src, ckpt, tmp_path / "pred", station=station, scheduler=cluster[0].scheduler_address
    )
    pred, err = read_predictions(tmp_path / "pred"), read_errors(tmp_path / "pred")
    keys = list(pred["path"]) + list(err["path"])
    assert len(keys) == len(set(keys)), "a file is in both tables or twice in one"
    looks_like_frame = {
        p.relative_to(root).as_posix()
        for p in root.rglob("N*.png")
        if "calib" not in p.parts and (p.is_file() or p.is_dir() or p.is_symlink())
    }
    assert planted <= looks_like_frame
    assert set(keys) == looks_like_frame
    scan_rows = err[err["stage"] == "scan"]
    by_reason = dict(zip(scan_rows["path"], scan_rows["error"]))
    assert by_reason[zoo["bad_time"]] == "NoTimestamp"
    assert by_reason[zoo["link"]] == "BrokenLink"
    assert by_reason[zoo["dir"]] == "IsADirectoryError"
    if "unreadable" in zoo:
        assert by_reason[zoo["unreadable"]] == "PermissionError"
    assert summary.scan_errors == len(scan_rows)
    # Flat frames are frames; an 8-bit RGB frame is converted to grey, then refused as 8-bit.
    assert {zoo["zeros"], zoo["sat"]} <= set(pred["path"])
    bad = {zoo[k] for k in ("zero", "truncated", "text", "garbage", "wrong", "rgb")}
    assert bad <= set(err.loc[err["stage"] == "classify", "path"])
    # A rerun neither duplicates nor drops a frame, and does no new work.
    again = classify_archive(
        src, ckpt, tmp_path / "pred", station=station, scheduler=cluster[0].scheduler_address
    )
    assert again.frames_planned == 0
    err2 = read_errors(tmp_path / "pred")
    assert sorted(err2["path"]) == sorted(err["path"])
