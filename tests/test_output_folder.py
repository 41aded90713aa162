"""The output-folder protocol every stage follows (pipeline/output_folder.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.errors import InputError
from pipeline.output_folder import (
    RUN_RECORD,
    OutputFolder,
    interrupts_deferred,
    is_finished,
    read_run_record,
    refuse_foreign_out,
)


def test_install_moves_outputs_and_writes_the_record_last(tmp_path):
    out = tmp_path / "out"
    with OutputFolder(out, "evaluate", {"checkpoint": "ckpt", "n": 3}) as folder:
        (folder.staging / "metrics.md").write_text("table")
        (folder.staging / "sub").mkdir()
        (folder.staging / "sub" / "a.txt").write_text("a")
        folder.install(["metrics.md", "sub"], accuracy=0.5)
    record = json.loads((out / RUN_RECORD).read_text())
    assert record == {
        "command": "evaluate",
        "checkpoint": "ckpt",
        "n": 3,
        "accuracy": 0.5,
        "finished": True,
    }
    assert (out / "metrics.md").read_text() == "table"
    assert (out / "sub" / "a.txt").read_text() == "a"
    assert sorted(p.name for p in out.iterdir()) == [RUN_RECORD, "metrics.md", "sub"]


def test_a_stale_output_of_an_earlier_run_is_removed(tmp_path):
    out = tmp_path / "out"
    with OutputFolder(out, "occurrence") as folder:
        (folder.staging / "a.png").write_text("1")
        (folder.staging / "b.png").write_text("1")
        folder.install(["a.png", "b.png"])
    with OutputFolder(out, "occurrence") as folder:
        (folder.staging / "a.png").write_text("2")
        folder.install(["a.png", "b.png"])
    assert (out / "a.png").read_text() == "2"
    assert not (out / "b.png").exists()


@pytest.mark.parametrize(
    "plant, named",
    [
        (lambda d: (d / RUN_RECORD).write_text(json.dumps({"command": "train"})), "a checkpoint"),
        (lambda d: (d / "model.safetensors").write_bytes(b"x"), "a checkpoint"),
        (lambda d: (d / "labels.parquet").write_bytes(b"x"), "a labelled set"),
        (lambda d: (d / "manifest.parquet").write_bytes(b"x"), "an archive scan"),
    ],
)
def test_another_stages_folder_is_refused_and_left_as_it_was(tmp_path, plant, named):
    out = tmp_path / "other"
    out.mkdir()
    plant(out)
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    with pytest.raises(InputError) as err:
        with OutputFolder(out, "evaluate"):
            pass
    assert named in str(err.value) and "`evaluate`" in str(err.value)
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before


def test_a_file_given_as_out_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputError, match="is a file"):
        refuse_foreign_out(f, "index")


def test_owned_markers_pass(tmp_path):
    (tmp_path / "zarr.json").write_text("{}")
    with pytest.raises(InputError):
        refuse_foreign_out(tmp_path, "synth")
    refuse_foreign_out(tmp_path, "preprocess", owns=("zarr.json",))


def test_a_failed_run_removes_the_folder_it_created_and_only_that(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with OutputFolder(out, "index") as folder:
            (folder.staging / "half").write_text("x")
            folder.begin()
            raise RuntimeError("boom")
    assert not out.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(RuntimeError):
        with OutputFolder(kept, "index"):
            raise RuntimeError("boom")
    assert kept.is_dir()


def test_an_interrupted_rerun_leaves_no_record_claiming_completion(tmp_path):
    out = tmp_path / "out"
    with OutputFolder(out, "classify-archive", {"model": "m"}) as folder:
        folder.begin()
        (out / "shard-0").write_text("x")
        folder.finish(done=[0])
    assert is_finished(out, "classify-archive")
    with pytest.raises(KeyboardInterrupt):
        with OutputFolder(out, "classify-archive", {"model": "m"}) as folder:
            assert folder.same_settings()
            folder.begin()
            raise KeyboardInterrupt
    assert read_run_record(out)["finished"] is False
    assert (out / "shard-0").exists()  # a resumable run's outputs stay for the rerun


def test_partials_of_killed_writers_are_cleared(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".x.parquet.abc.part").write_text("half")
    (out / ".occurrence-1.part").mkdir()
    (out / "keep.txt").write_text("k")
    with OutputFolder(out, "occurrence"):
        pass
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_same_settings_compares_what_json_gives_back(tmp_path):
    with OutputFolder(tmp_path / "o", "cv", {"folds": 5, "variants": ("a", "b")}) as folder:
        folder.begin()
    with OutputFolder(tmp_path / "o", "cv", {"folds": 5, "variants": ("a", "b")}) as folder:
        assert folder.same_settings()
    with OutputFolder(tmp_path / "o", "cv", {"folds": 3, "variants": ("a", "b")}) as folder:
        assert not folder.same_settings()


def test_interrupts_are_deferred_during_the_swap():
    import os
    import signal

    # Python's own handler (importing dask_jobqueue.runner, as another test does, replaces it)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        done = []
        with pytest.raises(KeyboardInterrupt):
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                done.append(True)
        assert done == [True] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_failure_while_installing_leaves_no_record(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with OutputFolder(out, "occurrence") as folder:
        (folder.staging / "a.txt").write_text("1")
        folder.install(["a.txt"])
    real_replace = os.replace

    def failing(src, dst):
        if Path(dst).name == "b.txt":
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        with OutputFolder(out, "occurrence") as folder:
            (folder.staging / "a.txt").write_text("2")
            (folder.staging / "b.txt").write_text("2")
            folder.install(["a.txt", "b.txt"])
    assert read_run_record(out) is None  # half installed: no record says finished
