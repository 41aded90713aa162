"""The frame store: written once by ``preprocess --format zarr``, read by classify-archive,
evaluate and index in place of the frames, with the same predictions (issue 16)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
import zarr
from builders import local_cluster, random_checkpoint
from test_classify import _assert_probabilities, _exact

from pipeline import framestore, store_writer
from pipeline.archive import load_manifest, write_manifest
from pipeline.checkpoint import load_checkpoint
from pipeline.classes import PROB_COLUMNS
from pipeline.classify import ShardSettings, classify_archive, decode_frame
from pipeline.cli import main
from pipeline.config import load_station
from pipeline.errors import InputError
from pipeline.evaluate import evaluate_checkpoint
from pipeline.models import resize_frames, to_model_input
from pipeline.predictions import read_predictions
from pipeline.preprocess_stage import run_preprocess
from pipeline.retrieval_index import build_index, load_index

SIZE = 64
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    """One 1-worker cluster for the module: preprocess connects by address, classify by client."""
    with local_cluster(n_workers=1) as (lc, client):
        yield lc.scheduler_address, client


def _checkpoint(out: Path, input_size: int = SIZE) -> Path:
    return random_checkpoint(out, input_size=input_size)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def store(tiny_archive, tmp_path_factory, cluster) -> Path:
    out = tmp_path_factory.mktemp("stores") / "archive.zarr"
    s = run_preprocess(tiny_archive, out, fmt="zarr", input_size=SIZE, scheduler=cluster[0])
    assert s.written == 60 and s.failed == 0, s.line()
    return out


def _small_archive(tiny_archive: Path, dst: Path, n: int) -> Path:
    """The first ``n`` frames of the tiny archive (and its calib/) copied to ``dst``."""
    station = load_station(tiny_archive / "calib" / "station.yaml")
    for rel in load_manifest(tiny_archive, station)["path"][:n]:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tiny_archive / rel, dst / rel)
    shutil.copytree(tiny_archive / "calib", dst / "calib")
    return dst


def test_store_holds_what_classify_computes_from_the_frames(tiny_archive, store, cluster):
    station = load_station(tiny_archive / "calib" / "station.yaml")
    manifest = load_manifest(tiny_archive, station)
    info = framestore.open_info(store)
    assert info.committed == 60 and info.input_size == SIZE and info.station["code"] == "yrs"
    items = framestore.read_items(store)
    assert items["path"].tolist() == manifest["path"].tolist()
    assert items["frame"].tolist() == manifest["frame"].tolist()
    assert (items["time_utc"] == pd.to_datetime(manifest["time_utc"], utc=True)).all()

    settings = ShardSettings("", "", "", station, dark_dir=str(tiny_archive / "calib"))
    for i in (0, 31, 59):
        r = manifest.iloc[i]
        crop = decode_frame(r["abspath"], int(r["frame"]), r["time_utc"], settings)
        want = resize_frames(torch.from_numpy(crop)[None, None], SIZE)[0, 0].numpy()
        np.testing.assert_array_equal(framestore.read_frames(store, i, i + 1)[0], want)

    with warnings.catch_warnings():  # zarr names the run record an object it does not know
        warnings.filterwarnings("ignore", message=r"Object at _run\.json", category=UserWarning)
        ds = xr.open_zarr(store, consolidated=False)  # what the field opens it with
    assert ds["frames"].dims == ("item", "y", "x") and ds["frames"].shape == (60, SIZE, SIZE)
    assert ds["frames"].encoding["chunks"][0] == framestore.FRAMES_PER_CHUNK
    assert list(ds["path"].values) == manifest["path"].tolist()
    assert ds.attrs["committed"] == 60
    again = run_preprocess(tiny_archive, store, fmt="zarr", input_size=SIZE, scheduler=cluster[0])
    assert again.written == 0 and again.up_to_date == 60


def test_the_nightly_run_appends_only_new_frames_and_bad_ones_are_recorded(
    tiny_archive, tmp_path, cluster, capsys
):
    root = _small_archive(tiny_archive, tmp_path / "arch", 20)
    station = load_station(root / "calib" / "station.yaml")
    manifest = load_manifest(root, station)
    write_manifest(manifest.iloc[:12], tmp_path / "first.parquet", root=root)
    out = tmp_path / "s.zarr"
    args = ["--out", str(out), "--format", "zarr", "--input-size", str(SIZE)]
    main(["preprocess", str(tmp_path / "first.parquet"), *args, "--scheduler", cluster[0]])
    assert (
        capsys.readouterr()
        .out.strip()
        .splitlines()[-1]
        .startswith("preprocess: 12 frames, 12 written")
    )
    bad = manifest["path"].iloc[15]
    (root / bad).write_bytes(b"\x89PNG\r\n\x1a\n truncated")

    s = run_preprocess(root, out, fmt="zarr", scheduler=cluster[0])  # the store's input size
    assert (s.written, s.up_to_date, s.failed) == (7, 12, 1)
    assert "_aurora/errors.parquet" in s.line()
    items = framestore.read_items(out)
    want = [p for p in manifest["path"] if p != bad]
    assert items["path"].tolist() == want  # in time order, each frame once
    errors = pd.read_parquet(framestore.side_path(out, framestore.ERRORS_NAME))
    assert errors.loc[errors["stage"] == "preprocess", "path"].tolist() == [bad]
    s = run_preprocess(root, out, fmt="zarr", input_size=SIZE, scheduler=cluster[0])
    assert (s.written, s.known_errors) == (0, 1)  # the unchanged bad file is not tried again

    with pytest.raises(InputError, match="holds 64 px frames.*--input-size 64"):
        run_preprocess(root, out, fmt="zarr", input_size=96, scheduler=cluster[0])
    with pytest.raises(InputError, match="is a frame store"):
        run_preprocess(root, out, fmt="png", scheduler=cluster[0])


def test_a_write_killed_between_append_and_commit_resumes_exactly(tiny_archive, tmp_path, cluster):
    out = tmp_path / "killed.zarr"
    # The worst moment: the second append's data is written, its commit is not.
    script = textwrap.dedent(
        f"""
        import os, signal
        from pipeline import framestore, store_writer
        from pipeline.preprocess_stage import run_preprocess

        store_writer.APPEND_FRAMES = 16
        commit, calls = framestore._commit, []

        def dying_commit(store, n):
            calls.append(n)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            commit(store, n)

        framestore._commit = dying_commit
        run_preprocess({str(tiny_archive)!r}, {str(out)!r}, fmt="zarr", input_size={SIZE},
                       scheduler={cluster[0]!r}, chunk_size=8)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=120
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]

    assert zarr.open_array(str(out / "frames"), mode="r").shape[0] == 32  # uncommitted data
    assert framestore.open_info(out).committed == 16
    assert len(framestore.read_items(out)) == 16  # readable up to its last commit
    assert json.loads((out / "_run.json").read_text())["finished"] is False

    s = run_preprocess(tiny_archive, out, fmt="zarr", input_size=SIZE, scheduler=cluster[0])
    assert (s.written, s.up_to_date, s.failed) == (44, 16, 0)
    record = json.loads((out / "_run.json").read_text())
    assert record["command"] == "preprocess" and record["format"] == "zarr"
    assert record["finished"] is True
    clean = tmp_path / "clean.zarr"
    run_preprocess(tiny_archive, clean, fmt="zarr", input_size=SIZE, scheduler=cluster[0])
    a, b = framestore.read_items(out), framestore.read_items(clean)
    pd.testing.assert_frame_equal(a, b)
    np.testing.assert_array_equal(
        framestore.read_frames(out, 0, 60), framestore.read_frames(clean, 0, 60)
    )


def test_predictions_from_the_store_equal_those_from_the_frames(
    tiny_archive, store, ckpt, tmp_path, cluster
):
    client = cluster[1]
    kw = {"client": client, "shard_size": 24, "batch_size": 16, "device": "cpu"}
    png = classify_archive(tiny_archive, ckpt, tmp_path / "png", **kw)
    zs = classify_archive(store, ckpt, tmp_path / "store", **kw)
    assert png.frames_classified == zs.frames_classified == 60
    a = read_predictions(tmp_path / "png").sort_values(["path", "frame"], ignore_index=True)
    b = read_predictions(tmp_path / "store").sort_values(["path", "frame"], ignore_index=True)
    assert a["path"].tolist() == b["path"].tolist()
    # Two float32 runs: each against the float64 model on the store's frames (the same model
    # inputs as the PNG path's, up to the resize's rounding that _exact allows) within the
    # derived bounds; labels equal where the float64 top-2 margin exceeds the bound.

    model, meta = load_checkpoint(ckpt)
    items = framestore.read_items(store)
    frames = framestore.read_frames(store, 0, len(items))
    pos = {(p, int(f)): i for i, (p, f) in enumerate(zip(items["path"], items["frame"]))}
    rows = [pos[(p, int(f))] for p, f in zip(a["path"], a["frame"])]
    exact = _exact(model, to_model_input(frames[rows], int(meta["input_size"])))
    probs = list(PROB_COLUMNS)
    _assert_probabilities(a[probs].to_numpy(), exact)
    _assert_probabilities(b[probs].to_numpy(), exact)
    top2 = np.sort(exact["p"], axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * exact["p_prob"].max(axis=1)
    assert (a["label"] == b["label"])[clear].all() and (a["time_utc"] == b["time_utc"]).all()
    np.testing.assert_allclose(a["mlt"], b["mlt"])
    again = classify_archive(store, ckpt, tmp_path / "store", **kw)
    assert again.frames_planned == 0  # resumable like an archive run


def test_a_model_of_another_input_size_is_refused(store, tmp_path, cluster):
    ckpt96 = _checkpoint(tmp_path / "ckpt96", input_size=96)
    with pytest.raises(InputError, match=r"takes 96 px frames but the frame store .* holds 64 px"):
        classify_archive(store, ckpt96, tmp_path / "pred", client=cluster[1], device="cpu")
    assert not (tmp_path / "pred").exists()
    with pytest.raises(InputError, match="--input-size 96"):
        build_index(store, ckpt96, tmp_path / "index", device="cpu")


def test_evaluate_and_index_read_a_labelled_store(tiny_labelled, ckpt, tmp_path, cluster):
    out = tmp_path / "labelled.zarr"
    s = run_preprocess(tiny_labelled, out, fmt="zarr", input_size=SIZE, scheduler=cluster[0])
    assert s.written == 80 and framestore.open_info(out).labelled
    labels = pd.read_parquet(tiny_labelled / "labels.parquet")
    assert sorted(framestore.read_items(out)["label"]) == sorted(labels["label"])

    kw = {"device": "cpu", "timing": False, "batch_size": 16}
    ra = evaluate_checkpoint(ckpt, tiny_labelled, tmp_path / "ev_png", **kw)
    rb = evaluate_checkpoint(ckpt, out, tmp_path / "ev_store", **kw)
    assert (ra["n"], ra["correct"]) == (rb["n"], rb["correct"]) == (80, rb["correct"])
    pa = pd.read_parquet(tmp_path / "ev_png" / "predictions.parquet").sort_values("path")
    pb = pd.read_parquet(tmp_path / "ev_store" / "predictions.parquet").sort_values("path")
    assert pa["path"].tolist() == pb["path"].tolist()
    cols = [c for c in pa.columns if c.startswith("p_")]
    assert np.abs(pa[cols].to_numpy() - pb[cols].to_numpy()).max() <= 1e-5

    build_index(tiny_labelled, ckpt, tmp_path / "ix_png", device="cpu")
    build_index(out, ckpt, tmp_path / "ix_store", device="cpu")
    ia, ib = load_index(tmp_path / "ix_png"), load_index(tmp_path / "ix_store")
    oa, ob = np.argsort(ia.items["path"].to_numpy()), np.argsort(ib.items["path"].to_numpy())
    assert ia.items["path"].to_numpy()[oa].tolist() == ib.items["path"].to_numpy()[ob].tolist()
    assert ib.labelled and ib.meta["source_kind"] == "store"
    np.testing.assert_array_equal(ia.features[oa], ib.features[ob])


def test_an_interrupted_store_write_never_claims_to_have_finished(
    tiny_archive, store, tmp_path, cluster, monkeypatch
):
    """A rerun over a finished store that is interrupted leaves its record unfinished."""
    out = tmp_path / "store"
    shutil.copytree(store, out)
    assert json.loads((out / "_run.json").read_text())["finished"] is True
    framestore._commit(out, framestore.open_info(out).committed - 1)  # one frame to do again

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_writer, "run_chunks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_preprocess(tiny_archive, out, fmt="zarr", input_size=SIZE, scheduler=cluster[0])
    assert json.loads((out / "_run.json").read_text())["finished"] is False
