"""The nightly workflow end to end on a tiny synthetic archive: only new frames are classified."""

import shutil

import pandas as pd
import pytest
from builders import random_checkpoint

from pipeline import synth
from pipeline.cli import cli
from pipeline.predictions import read_predictions, read_run
from pipeline.workflow import run_workflow


@pytest.fixture
def checkpoint(tmp_path):
    return random_checkpoint(tmp_path / "ckpt", input_size=64)


def test_nightly_classifies_only_new_frames(tmp_path, checkpoint):
    archive = tmp_path / "archive"
    synth.make_archive(archive, n=24, seed=3, winters=(2004,), size=64)
    out = tmp_path / "out"
    overrides = {
        "archive": str(archive),
        "out": str(out),
        "checkpoint": str(checkpoint),
        "station": str(archive / "calib" / "station.yaml"),
        "bins": "1h",
    }
    first = run_workflow("workflows/nightly.yaml", cli, overrides=overrides, echo=lambda s: None)
    assert first == {"scan": "ran", "classify": "ran", "occurrence": "ran"}
    assert len(read_predictions(out / "predictions")) == 24

    # The next night: frames of a later winter arrive in the archive.
    later = tmp_path / "later"
    synth.make_archive(later, n=10, seed=4, winters=(2005,), size=64)
    new = [p for p in later.rglob("N*.png") if "calib" not in p.parts]
    for p in new:
        dst = archive / p.relative_to(later)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dst)
        dst.touch()
    second = run_workflow("workflows/nightly.yaml", cli, overrides=overrides, echo=lambda s: None)
    assert second == {"scan": "ran", "classify": "ran", "occurrence": "ran"}
    pred = read_predictions(out / "predictions")
    assert len(pred) == 24 + len(new)
    assert not pred.duplicated(["path", "frame"]).any()
    runs = read_run(out / "predictions")["runs"]
    assert [r["frames_classified"] for r in runs] == [24, len(new)]
    occ = pd.read_parquet(out / "occurrence" / "occurrence.parquet")
    assert set(occ["winter"]) == {2004, 2005}

    # Nothing new: the third night does nothing.
    third = run_workflow("workflows/nightly.yaml", cli, overrides=overrides, echo=lambda s: None)
    assert set(third.values()) == {"skipped: up to date"}
