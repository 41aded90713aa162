"""The predictions folder contract (pipeline/predictions.py): names, run record, done shards."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from pipeline.classes import CLASSES
from pipeline.errors import InputError
from pipeline.output_folder import RUN_RECORD
from pipeline.predictions import (
    ERRORS_FILE,
    FEATURES_DIR,
    RUN_FILE,
    SHARDS_DIR,
    done_shard_files,
    errors_path,
    features_path,
    read_errors,
    read_predictions,
    read_run,
    remove_strays,
    shard_files,
    shard_path,
    unclassified_frames,
)
from pipeline.storage import ERRORS_SCHEMA, PREDICTIONS_SCHEMA, error_rows, write_table


def _shard(n: int, start: int) -> pd.DataFrame:
    t = pd.Timestamp("2004-12-01T06:00", tz="UTC") + pd.to_timedelta(start + np.arange(n), "min")
    df = pd.DataFrame(
        {
            "path": [f"f{start + i}.png" for i in range(n)],
            "frame": 0,
            "time_utc": t,
            "mlt": 9.0,
            "label": pd.Categorical(["arc"] * n, categories=list(CLASSES)),
            "model_id": "m",
        }
    )
    for c in CLASSES:
        df[f"p_{c}"] = np.float32(0.25)
    return df


def _record(out, shards, **extra) -> None:
    run = {
        "command": "classify-archive",
        "shards": {f"{s:06d}": {"frames": 10, "predicted": 10, "errors": 0} for s in shards},
        **extra,
    }
    (out / RUN_FILE).write_text(json.dumps(run))


@pytest.fixture()
def pred(tmp_path):
    """Shards 0 and 1 done; shard 2 a stray of a killed run; a half-written temporary file."""
    out = tmp_path / "pred"
    for s in range(3):
        write_table(_shard(10, 10 * s), shard_path(out, s), PREDICTIONS_SCHEMA)
        features_path(out, s).parent.mkdir(exist_ok=True)
        np.save(features_path(out, s), np.zeros((10, 4), np.float16))
    (out / SHARDS_DIR / ".shard-000003.parquet.x1.part").write_bytes(b"half a file")
    _record(out, [0, 1])
    return out


def test_the_names_of_the_folder(tmp_path):
    assert RUN_FILE == RUN_RECORD == "_run.json"
    assert shard_path(tmp_path, 7) == tmp_path / "shards" / "shard-000007.parquet"
    assert features_path(tmp_path, 7) == tmp_path / FEATURES_DIR / "shard-000007.npy"
    assert errors_path(tmp_path) == tmp_path / ERRORS_FILE == tmp_path / "_errors.parquet"


def test_only_the_shards_the_run_record_vouches_for_are_read(pred):
    assert sorted(shard_files(pred)) == [0, 1, 2]  # the stray is a file like the others
    assert done_shard_files(pred) == [shard_path(pred, 0), shard_path(pred, 1)]
    df = read_predictions(pred)
    assert df["path"].tolist() == [f"f{i}.png" for i in range(20)]
    assert read_predictions(pred, columns=["path"]).columns.tolist() == ["path"]


def test_a_folder_of_shard_files_without_a_record_counts_every_shard(pred):
    (pred / RUN_FILE).unlink()
    assert len(read_predictions(pred)) == 30
    assert len(read_predictions(pred / SHARDS_DIR)) == 30  # shards/ itself


def test_an_empty_folder_reads_as_no_predictions(tmp_path):
    df = read_predictions(tmp_path)
    assert df.empty and df.columns.tolist() == PREDICTIONS_SCHEMA.names
    assert read_errors(tmp_path).empty and read_run(tmp_path) is None


def test_remove_strays_removes_unvouched_shards_their_features_and_partials(pred):
    remove_strays(pred, {0, 1})
    assert sorted(shard_files(pred)) == [0, 1]
    assert not features_path(pred, 2).exists() and features_path(pred, 1).exists()
    assert not list(pred.rglob("*.part"))


def test_a_damaged_run_record_is_one_clear_error(pred):
    (pred / RUN_FILE).write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON.*--overwrite"):
        read_run(pred)
    (pred / RUN_FILE).write_text("[1, 2]")
    with pytest.raises(InputError, match="not a run record"):
        read_predictions(pred)


def test_errors_table(pred):
    rows = error_rows([("bad.png", 0)], "classify", "x", "FrameReadError")
    write_table(rows, errors_path(pred), ERRORS_SCHEMA)
    assert read_errors(pred)["path"].tolist() == ["bad.png"]


def _unfinished(pred, done, planned, **last) -> None:
    entry = {"frames_planned": planned, "frames_considered": planned + 5, "since": None}
    entry["shards_planned"] = list(range(planned // 10))
    _record(pred, done, runs=[entry | last], finished=False)


def test_unclassified_frames_of_the_last_run(pred):
    _unfinished(pred, [0, 1], planned=50)  # shards 2, 3 and 4 never finished
    assert unclassified_frames(pred) == (30, 55, None)
    _unfinished(pred, [0, 1], planned=50, frames_failed=10, since="2004-12-01")
    assert unclassified_frames(pred) == (20, 55, "2004-12-01")
    _unfinished(pred, [0, 1], planned=20, finished="2024-01-01T00:00:00+00:00")
    assert unclassified_frames(pred) == (0, 0, None)
    _record(pred, [0, 1])  # no runs recorded: nothing to go by
    assert unclassified_frames(pred) == (0, 0, None)
    assert unclassified_frames(pred / SHARDS_DIR / "shard-000000.parquet") == (0, 0, None)


def test_the_contract_module_does_not_load_the_classifier():
    code = (
        "import sys, pipeline.predictions; "
        "print([m for m in ('pipeline.classify', 'torch', 'distributed') if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
