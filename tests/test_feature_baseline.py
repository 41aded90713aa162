"""scripts/feature_baseline.py: hand-made features + logistic regression by episode folds."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from builders import random_checkpoint

from pipeline.classes import CLASSES
from pipeline.errors import InputError
from pipeline.folds import group_folds
from pipeline.labelled import load_labelled

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "feature_baseline.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240)


def test_folds_pair_with_cv_and_rows_have_cv_columns(episodes_set, tmp_path):
    out = tmp_path / "folds.parquet"
    r = _run(str(episodes_set), "--folds", "3", "--size", "64", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "**Mean per-class accuracy**" in r.stdout and "true \\ predicted" in r.stdout
    table = pd.read_parquet(out)
    cols = ["variant", "fold", "n", "average_accuracy", "mean_class_accuracy"]
    assert list(table.columns) == cols + [f"acc_{c}" for c in CLASSES]
    df = load_labelled(episodes_set)
    fold = group_folds(df["label"].to_numpy(), df["episode"].to_numpy(), 3, 0)
    assert table["n"].tolist() == [int((fold == k).sum()) for k in range(3)]
    # the synthetic classes differ in brightness and form: a linear model on the features finds
    # them far above the 0.25 of chance on held-out episodes
    assert table["mean_class_accuracy"].mean() > 0.5


def test_a_set_without_the_group_column_is_one_line(tiny_labelled):
    r = _run(str(tiny_labelled), "--folds", "3", "--size", "64")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "episode" in lines[0] and "Traceback" not in r.stderr


def test_a_bad_regularisation_is_one_line_before_any_work(episodes_set):
    r = _run(str(episodes_set), "--c", "0")
    assert r.returncode == 1
    assert r.stderr.strip() == (
        "feature_baseline: --c must be > 0 (the inverse L2 strength), got 0.0"
    )


def test_a_checkpoint_is_probed_on_its_own_features(episodes_set, tmp_path):
    ckpt = random_checkpoint(tmp_path / "ckpt", input_size=64)
    out = tmp_path / "probe.parquet"
    r = _run(str(episodes_set), "--folds", "3", "--checkpoint", str(ckpt), "--out", str(out))
    assert r.returncode == 0, r.stderr
    table = pd.read_parquet(out)
    assert set(table["variant"]) == {"linear probe on ckpt"}
    assert table["n"].sum() == len(load_labelled(episodes_set))
    # even untrained FC7 features keep the synthetic classes' brightness and layout apart: a probe
    # that read the wrong frames or mislaid the labels would sit at the 0.25 of chance
    assert table["mean_class_accuracy"].mean() > 0.3


def test_a_missing_checkpoint_is_one_line_naming_it(episodes_set, tmp_path):
    r = _run(str(episodes_set), "--checkpoint", str(tmp_path / "nope"))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope" in lines[0] and "Traceback" not in r.stderr


def _fake_cv(
    episodes_set: Path, root: Path, folds: int, truth_prob: float, next_prob: float = 0.1
) -> Path:
    """A cv variant folder whose fold models give the true class probability ``truth_prob``,
    the class after it (in CLASSES order) ``next_prob`` and the others 0.1."""
    df = load_labelled(episodes_set)
    fold = group_folds(df["label"].to_numpy(), df["episode"].to_numpy(), folds, 0)
    after = {c: CLASSES[(i + 1) % len(CLASSES)] for i, c in enumerate(CLASSES)}
    for k in range(folds):
        part = df[fold == k]
        table = pd.DataFrame({"path": [str(Path(p).resolve()) for p in part["path"]]})
        for c in CLASSES:
            table[f"p_{c}"] = [
                truth_prob if lab == c else next_prob if after[lab] == c else 0.1
                for lab in part["label"]
            ]
        (root / f"fold-{k}" / "eval").mkdir(parents=True)
        table.to_parquet(root / f"fold-{k}" / "eval" / "predictions.parquet")
    return root


def test_fusion_follows_its_weight(episodes_set, tmp_path):
    cv_dir = _fake_cv(episodes_set, tmp_path / "cv" / "stn", 3, truth_prob=0.7)
    plain, cnn_only, lr_only = (tmp_path / f"{n}.parquet" for n in ("plain", "cnn", "lr"))
    args = [str(episodes_set), "--folds", "3", "--size", "64"]
    assert _run(*args, "--out", str(plain)).returncode == 0
    for weight, out in (("1", cnn_only), ("0", lr_only)):
        r = _run(*args, "--fuse", str(cv_dir), "--fuse-weight", weight, "--out", str(out))
        assert r.returncode == 0, r.stderr
    # weight 1 is the (here always right) CNN alone; weight 0 the logistic regression alone
    assert (pd.read_parquet(cnn_only)["mean_class_accuracy"] == 1.0).all()
    lr, base = pd.read_parquet(lr_only), pd.read_parquet(plain)
    assert lr["mean_class_accuracy"].tolist() == base["mean_class_accuracy"].tolist()
    assert set(lr["variant"]) == {"hand-made features + logistic regression fused with stn "
                                  "(weight 0)"}  # fmt: skip


def test_fusion_with_a_cv_of_other_folds_is_one_line(episodes_set, tmp_path):
    cv_dir = _fake_cv(episodes_set, tmp_path / "cv" / "stn", 2, truth_prob=0.7)
    r = _run(str(episodes_set), "--folds", "3", "--size", "64", "--fuse", str(cv_dir))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "fold" in lines[0] and "Traceback" not in r.stderr


def test_fusion_refuses_a_set_of_multi_frame_files(tmp_path):
    spec = importlib.util.spec_from_file_location("feature_baseline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    paths = [str(tmp_path / "a.h5"), str(tmp_path / "a.h5"), str(tmp_path / "b.h5")]
    with pytest.raises(InputError, match="one frame per file"):
        module.cv_log_probs(tmp_path, paths, np.array([0, 0, 1]))


def test_several_cv_runs_fuse_as_their_mean(episodes_set, tmp_path):
    right = _fake_cv(episodes_set, tmp_path / "a" / "right", 3, truth_prob=0.7)
    # alone always wrong (the next class at 0.6), but less sure than the other run is right
    wrong = _fake_cv(episodes_set, tmp_path / "b" / "wrong", 3, truth_prob=0.3, next_prob=0.6)
    outs = {n: tmp_path / f"{n}.parquet" for n in ("wrong", "both")}
    args = [str(episodes_set), "--folds", "3", "--size", "64", "--fuse-weight", "1"]
    r = _run(*args, "--fuse", str(wrong), "--out", str(outs["wrong"]))
    assert r.returncode == 0, r.stderr
    r = _run(*args, "--fuse", str(right), "--fuse", str(wrong), "--out", str(outs["both"]))
    assert r.returncode == 0, r.stderr
    assert (pd.read_parquet(outs["wrong"])["mean_class_accuracy"] == 0.0).all()
    # mean log-probability: truth (ln 0.7 + ln 0.3) / 2 = -0.78 beats (ln 0.1 + ln 0.6) / 2 = -1.41
    both = pd.read_parquet(outs["both"])
    assert (both["mean_class_accuracy"] == 1.0).all()
    assert "fused with right + wrong (weight 1)" in both["variant"].iloc[0]


def test_fusion_refuses_predictions_without_probabilities(tmp_path):
    spec = importlib.util.spec_from_file_location("feature_baseline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "fold-0" / "eval").mkdir(parents=True)
    pd.DataFrame({"path": ["a.png"]}).to_parquet(
        tmp_path / "fold-0" / "eval" / "predictions.parquet"
    )
    with pytest.raises(InputError, match="lacks columns"):
        module.cv_log_probs(tmp_path, ["a.png"], np.array([0]))
