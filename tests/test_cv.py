"""Episode cross-validation on a tiny synthetic set: folds, resumption, summary outputs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest

from pipeline import cv
from pipeline.cli import main
from pipeline.cv import cross_validate, cv_markdown, fold_sets
from pipeline.errors import InputError
from pipeline.folds import group_folds
from pipeline.labelled import load_labelled
from pipeline.output_folder import is_finished, read_run_record
from pipeline.train import TrainConfig

CFG = TrainConfig(
    variant="alexnet",
    input_size=64,
    epochs=1,
    batch_size=8,
    val_batch_size=8,
    lr=0.002,
    scratch_init="kaiming",
    cache_frames=True,
    patience=0,
    val_fraction=0.0,
    balance="sampler",
)


def test_fold_sets_keep_episodes_on_one_side(episodes_set):
    df = load_labelled(episodes_set)
    fold = group_folds(df["label"].to_numpy(), df["episode"].to_numpy(), 3, 0)
    for k in range(3):
        train, test = fold_sets(df, fold, k, episodes_set)
        assert not set(train["episode"]) & set(test["episode"])
        assert len(train) + len(test) == len(df)
        assert all(Path(p).is_absolute() for p in train["path"])


def test_cv_runs_resumes_and_summarises(episodes_set, tmp_path):
    out = tmp_path / "cv"
    table = cross_validate(CFG, episodes_set, out, folds=3)
    assert list(table["fold"]) == [0, 1, 2] and table["n"].sum() == 80
    assert {"mean_class_accuracy", "acc_hotspot"} <= set(table.columns)
    for name in ("cv.parquet", "cv.md", "cv.png", "confusion_pooled.parquet", "_run.json"):
        assert (out / name).is_file(), name
    assert is_finished(out, "cv") and read_run_record(out)["folds"] == 3
    pooled = pd.read_parquet(out / "confusion_pooled.parquet")
    assert int(pooled[["arc", "drapery", "radial", "hotspot"]].to_numpy().sum()) == 80
    assert "Mean per-class accuracy" in (out / "cv.md").read_text()
    assert not (out / "alexnet/fold-0/ckpt/model.safetensors").exists()  # weights dropped
    # A finished fold is not retrained: a rerun reads its metrics and rewrites the summary only.
    marker = out / "alexnet/fold-1/eval/metrics.json"
    before = marker.stat().st_mtime_ns
    again = cross_validate(CFG, episodes_set, out, folds=3)
    assert marker.stat().st_mtime_ns == before
    pd.testing.assert_frame_equal(again, table)
    # Interrupted while rewriting the summary: the record no longer claims a finished run.
    with pytest.MonkeyPatch.context() as m:
        m.setattr(cv, "write_summary", _interrupted)
        with pytest.raises(KeyboardInterrupt):
            cross_validate(CFG, episodes_set, out, folds=3)
    assert read_run_record(out)["finished"] is False
    cross_validate(CFG, episodes_set, out, folds=3)
    assert is_finished(out, "cv")


def _interrupted(*a, **k):
    raise KeyboardInterrupt


def test_an_interrupted_cv_in_a_new_folder_leaves_no_record(episodes_set, tmp_path, monkeypatch):
    monkeypatch.setattr(cv, "run_fold", _interrupted)
    with pytest.raises(KeyboardInterrupt):
        cross_validate(CFG, episodes_set, tmp_path / "cv", folds=2)
    assert not (tmp_path / "cv").exists()


@pytest.mark.parametrize(
    "plant, named",
    [
        (lambda d: (d / "_run.json").write_text('{"command": "train"}'), "a checkpoint"),
        (lambda d: (d / "model.safetensors").write_bytes(b"x"), "a checkpoint"),
    ],
)
def test_cv_refuses_another_stages_out_and_leaves_it(episodes_set, tmp_path, plant, named):
    out = tmp_path / "other"
    out.mkdir()
    plant(out)
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    with pytest.raises(InputError, match=named) as err:
        cross_validate(CFG, episodes_set, out, folds=2)
    assert str(out) in str(err.value)
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before


def test_cv_refuses_another_split_in_the_same_folder(episodes_set, tmp_path):
    out = tmp_path / "cv"
    cross_validate(CFG, episodes_set, out, folds=2)
    with pytest.raises(InputError, match="another --out"):
        cross_validate(CFG, episodes_set, out, folds=3)
    with pytest.raises(InputError, match="another config"):  # finished folds of another recipe
        cross_validate(dataclasses.replace(CFG, lr=0.01), episodes_set, out, folds=2)


def test_cv_split_over_jobs_by_fold_then_summarised(episodes_set, tmp_path):
    """--fold runs one fold and writes no summary; a run without it reuses that fold."""
    out = tmp_path / "cv"
    part = cross_validate(CFG, episodes_set, out, folds=3, only_folds=[2])
    assert list(part["fold"]) == [2]
    assert (out / "alexnet/fold-2/eval/metrics.json").is_file()
    assert not (out / "alexnet/fold-0").exists() and not (out / "cv.md").exists()
    assert not is_finished(out, "cv")
    marker = out / "alexnet/fold-2/eval/metrics.json"
    before = marker.stat().st_mtime_ns
    table = cross_validate(CFG, episodes_set, out, folds=3)
    assert list(table["fold"]) == [0, 1, 2] and is_finished(out, "cv")
    assert marker.stat().st_mtime_ns == before  # the job's fold was not retrained
    pd.testing.assert_series_equal(
        table.loc[table["fold"] == 2].iloc[0], part.iloc[0], check_names=False
    )
    with pytest.raises(InputError, match=r"^--fold 3: there are 3 folds, numbered 0 to 2$"):
        cross_validate(CFG, episodes_set, out, folds=3, only_folds=[3])


def test_cv_cli_fold_out_of_range_is_one_line(episodes_set, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("variant: alexnet\ninput_size: 64\nepochs: 1\n")
    args = ["cv", "--config", str(cfg), "--data", str(episodes_set), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--folds", "3", "--fold", "1", "--fold", "5"])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and err.count("\n") == 1
    assert "--fold 5: there are 3 folds, numbered 0 to 2" in err
    assert not (tmp_path / "o").exists()


def test_cv_without_the_group_column_is_one_line(tiny_labelled, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("variant: alexnet\ninput_size: 64\nepochs: 1\n")
    args = ["cv", "--config", str(cfg), "--data", str(tiny_labelled), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 1 and err.count("\n") == 1
    assert "no group column 'episode' (columns: path, label" in err


def test_cv_markdown_has_mean_and_spread():
    table = pd.DataFrame(
        {
            "variant": ["a", "a"],
            "fold": [0, 1],
            "n": [10, 10],
            "average_accuracy": [0.8, 0.6],
            "mean_class_accuracy": [0.7, 0.5],
            **{f"acc_{c}": [1.0, 0.5] for c in ("arc", "drapery", "radial", "hotspot")},
        }
    )
    md = cv_markdown(table, ("arc", "drapery", "radial", "hotspot"))
    assert "| **Mean per-class accuracy** | 0.600 ± 0.141 |" in md
