"""Hand-made features and logistic regression, by the same episode folds as `aurora-pipeline cv`:
the baseline a CNN recipe has to beat on a labelled set. Usage:

    python scripts/feature_baseline.py LABELLED_DIR [--folds 5] [--group episode] [--seed 0]
        [--size 128] [--c 0.1] [--station NAME_OR_YAML] [--out FOLDS.parquet]
        [--checkpoint CKPT] [--fuse CV_OUT/VARIANT ... [--fuse-weight W]]

Each frame is preprocessed and resized exactly as the model sees it (``to_model_input``), then
described by ``pipeline.handcrafted.sky_features``; a class-balanced logistic regression
(scikit-learn, standardised features, L2 strength 1/C) is fitted on each fold's training
episodes. The folds are ``group_folds`` with the seed given (a train config's ``seed``,
default 0), so the rows pair with a `cv` run's. Prints the per-fold table and the summary
in the layout of `cv.md`; ``--out`` writes the per-fold rows in the columns of `cv.parquet`.

``--checkpoint CKPT`` is a linear probe instead: the features are a checkpoint's FC7 vector
(``model.features``, at the checkpoint's own input size), the usual measure of what a
self-supervised pre-training (`aurora-pipeline pretrain`) has learnt, with no fine-tuning.

``--fuse CV_OUT/VARIANT`` also scores the late fusion of the two models: on each held-out fold,
W times the log-probabilities of the CNN a `cv` run (same folds and seed) trained for that fold
(its ``fold-K/eval/predictions.parquet``) plus (1 - W) times the logistic regression's. Given
more than once, the CNN term is the mean over those runs (an ensemble of trainings; with
``--fuse-weight 1`` the ensemble alone).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from pipeline.checkpoint import load_checkpoint
from pipeline.classes import CLASSES
from pipeline.config import resolve_station
from pipeline.cv import cv_markdown, fold_row
from pipeline.errors import AuroraError, InputError
from pipeline.evaluate import confusion_markdown, metrics_from_predictions
from pipeline.folds import DEFAULT_GROUP, group_folds, groups_of
from pipeline.handcrafted import sky_features
from pipeline.labelled import LabelledSet, load_labelled
from pipeline.models import INPUT_MEAN, INPUT_STD, to_model_input
from pipeline.storage import write_table

VARIANT = "hand-made features + logistic regression"
FUSED = "{} fused with {} (weight {:g})"
PROBE = "linear probe on {}"
BATCH = 64


def frame_features(ds: LabelledSet, size: int) -> np.ndarray:
    """(N, F) features of every frame of ``ds``, as the model would see it at ``size`` px."""
    rows = []
    for i in tqdm(range(len(ds)), desc="features", unit="frame", leave=False):
        x = to_model_input(ds.frame(i)[None], size)[0, 0].numpy()
        rows.append(sky_features(x * INPUT_STD + INPUT_MEAN))
    return np.stack(rows)


def checkpoint_features(ds: LabelledSet, ckpt: Path) -> np.ndarray:
    """(N, D) FC7 features of every frame of ``ds`` from the checkpoint ``ckpt`` (safe load)."""
    model, meta = load_checkpoint(ckpt, classes=None)
    size, chans = int(meta["input_size"]), int(meta.get("in_chans", 1))
    rows = []
    with torch.inference_mode():
        for s in tqdm(range(0, len(ds), BATCH), desc="features", unit="batch", leave=False):
            frames = np.stack([ds.frame(i) for i in range(s, min(s + BATCH, len(ds)))])
            rows.append(model.features(to_model_input(frames, size, chans)).float().numpy())
    return np.concatenate(rows)


def cv_log_probs(cv_variant: Path, paths: Sequence[str], fold: np.ndarray) -> np.ndarray:
    """(N, C) log-probabilities of each frame from the `cv` model of the fold that held it out."""
    out = np.full((len(paths), len(CLASSES)), np.nan)
    where = {str(Path(p).resolve()): i for i, p in enumerate(paths)}
    if len(where) != len(paths):  # evaluate's predictions name a frame by its file alone
        raise InputError("--fuse needs one frame per file; this set has multi-frame files")
    for k in np.unique(fold):
        pred = cv_variant / f"fold-{k}" / "eval" / "predictions.parquet"
        if not pred.is_file():
            raise InputError(
                f"{pred}: no predictions of fold {k}; is {cv_variant} a finished cv variant "
                "folder (OUT/VARIANT) of the same folds and seed?"
            )
        table = pd.read_parquet(pred)
        missing = [c for c in ["path"] + [f"p_{c}" for c in CLASSES] if c not in table.columns]
        if missing:
            raise InputError(f"{pred}: lacks columns {missing}; not evaluate's predictions")
        rows = np.array([where.get(str(p), -1) for p in table["path"]])
        if (rows < 0).any() or not (fold[rows] == k).all() or len(rows) != (fold == k).sum():
            raise InputError(
                f"{pred}: its frames are not fold {k} of this set (another set, folds or seed?)"
            )
        probs = table[[f"p_{c}" for c in CLASSES]].to_numpy(np.float64)
        out[rows] = np.log(np.clip(probs, 1e-9, 1.0))
    return out


def fold_table(
    feats: np.ndarray,
    labels: np.ndarray,
    fold: np.ndarray,
    c: float,
    variant: str = VARIANT,
    fuse: tuple[np.ndarray, float] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-fold metrics of a logistic regression fitted on the other folds' frames (fused with
    ``fuse`` = (log-probabilities, weight) when given), and the pooled confusion matrix."""
    rows, pooled = [], None
    for k in np.unique(fold):
        train, test = fold != k, fold == k
        clf = make_pipeline(
            StandardScaler(),
            LogisticRegression(C=c, class_weight="balanced", max_iter=5000),
        )
        clf.fit(feats[train], labels[train])
        if fuse is None:
            predicted = clf.predict(feats[test])
        else:
            order = [list(clf.classes_).index(name) for name in CLASSES]
            lr = np.log(np.clip(clf.predict_proba(feats[test])[:, order], 1e-9, 1.0))
            logp, w = fuse
            predicted = np.array(CLASSES)[(w * logp[test] + (1 - w) * lr).argmax(1)]
        m = metrics_from_predictions(labels[test], predicted)
        rows.append(fold_row(variant, int(k), m, CLASSES))
        pooled = m["confusion"] if pooled is None else pooled + m["confusion"]
    return pd.DataFrame(rows), pooled


def report(table: pd.DataFrame, pooled: pd.DataFrame) -> str:
    """Markdown: the per-fold rows, the mean +- sd summary and the pooled confusion."""
    cols = ["n", "average_accuracy", "mean_class_accuracy"] + [f"acc_{c}" for c in CLASSES]
    lines = ["| fold | " + " | ".join(cols) + " |", "|---:|" + "---:|" * len(cols)]
    for _, r in table.iterrows():
        cells = [str(int(r["n"]))] + [f"{r[c]:.3f}" for c in cols[1:]]
        lines.append(f"| {int(r['fold'])} | " + " | ".join(cells) + " |")
    norm = pooled.div(pooled.sum(axis=1).replace(0, np.nan), axis=0)
    conf = confusion_markdown({"confusion": pooled, "confusion_normalised": norm})
    return "\n".join(lines) + "\n\n" + cv_markdown(table, CLASSES) + "\n" + conf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("labelled", type=Path)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--group", default=DEFAULT_GROUP)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--c", type=float, default=0.1)
    ap.add_argument("--station", default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--checkpoint", type=Path, default=None, help="linear probe on its FC7")
    ap.add_argument("--fuse", type=Path, action="append", help="a cv run's OUT/VARIANT folder")
    ap.add_argument("--fuse-weight", type=float, default=0.5, help="the CNN's share, 0..1")
    a = ap.parse_args()
    if not a.c > 0:  # checked before minutes of feature extraction, not by sklearn after them
        sys.exit(f"feature_baseline: --c must be > 0 (the inverse L2 strength), got {a.c}")
    if not 0 <= a.fuse_weight <= 1:
        sys.exit(f"feature_baseline: --fuse-weight must be within 0..1, got {a.fuse_weight}")
    try:  # a wrong folder, column or frame is one line, not a traceback
        df = load_labelled(a.labelled)
        groups = groups_of(df, a.group, f"{a.labelled}/labels.parquet")
        labels = df["label"].astype(str).to_numpy()
        fold = group_folds(labels, groups, a.folds, a.seed)
        # the cv run is read before the minutes of feature extraction, so a wrong one fails fast
        fuse = None
        if a.fuse:
            runs = [cv_log_probs(run, df["path"].tolist(), fold) for run in a.fuse]
            fuse = (np.mean(runs, axis=0), a.fuse_weight)
        ds = LabelledSet(df, resolve_station(a.station, a.labelled))
        if a.checkpoint is None:
            feats, variant = frame_features(ds, a.size), VARIANT
        else:
            feats, variant = checkpoint_features(ds, a.checkpoint), PROBE.format(a.checkpoint.name)
        if a.fuse:
            names = " + ".join(run.name for run in a.fuse)
            variant = FUSED.format(variant, names, a.fuse_weight)
        table, pooled = fold_table(feats, labels, fold, a.c, variant, fuse)
    except AuroraError as exc:
        sys.exit(f"feature_baseline: {exc}")
    print(report(table, pooled))
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        write_table(table, a.out)


if __name__ == "__main__":
    main()
