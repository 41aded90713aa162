"""Splits and intervals by group (episode or day): frames 10 s apart are near-copies, so the
independent samples of a labelled set are its episodes, never its frames."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from pipeline.errors import InputError

#: the group column of labels.parquet used where a config or command names none.
DEFAULT_GROUP = "episode"


def groups_of(df: pd.DataFrame, column: str, where: str) -> np.ndarray:
    """The group of every frame: ``column`` of the table, or the UT day for ``day``.

    A missing column is one InputError naming it and the columns the table has.
    """
    if column == "day" and column not in df.columns:
        if "time_utc" not in df.columns or df["time_utc"].isna().any():
            raise InputError(
                f"{where}: grouping by day needs the time of every frame (a time_utc column); "
                "add one or group by another column"
            )
        return pd.to_datetime(df["time_utc"], utc=True).dt.strftime("%Y%m%d").to_numpy()
    if column not in df.columns:
        raise InputError(
            f"{where}: no group column {column!r} (columns: {', '.join(map(str, df.columns))}); "
            f"add it, or choose another (e.g. day)"
        )
    g = df[column]
    if g.isna().any():
        raise InputError(f"{where}: {int(g.isna().sum())} frames have no {column!r}; fill it in")
    return g.astype(str).to_numpy()


def group_folds(
    labels: Sequence[Any] | np.ndarray, groups: Sequence[Any] | np.ndarray, k: int, seed: int
) -> np.ndarray:
    """Fold number (0..k-1) of every frame: whole groups per fold, each class spread evenly.

    scikit-learn's StratifiedGroupKFold (shuffled, seeded) keeps each group in one fold and
    balances the class shares of the folds; a class with fewer groups than folds is absent
    from some folds (said by :func:`fold_warnings`).
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    n_groups = len(np.unique(groups))
    if k < 2 or k > n_groups:
        raise InputError(f"{k} folds need between 2 and {n_groups} (the number of groups)")
    fold = np.full(len(labels), -1, dtype=np.int64)
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for i, (_, test) in enumerate(cv.split(np.zeros(len(labels)), labels, groups)):
        fold[test] = i
    return fold


def group_split(
    labels: Sequence[Any] | np.ndarray,
    groups: Sequence[Any] | np.ndarray,
    val_fraction: float,
    seed: int,
    balance: Literal["folds", "shares"] = "folds",
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) with whole groups on one side, seeded.

    ``folds``: val is one of ``round(1 / val_fraction)`` stratified group folds
    (:func:`group_folds`). ``shares``: whole groups are chosen so that every class has near
    ``val_fraction`` of its frames in val (:func:`_share_search`; for UT days, where a class's
    frames gather on a few days).
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    if balance == "folds":
        k = min(max(2, round(1 / val_fraction)), len(np.unique(groups)))
        fold = group_folds(labels, groups, k, seed)
        return np.flatnonzero(fold != 0), np.flatnonzero(fold == 0)
    _, group_of = np.unique(groups, return_inverse=True)
    _, class_of = np.unique(labels, return_inverse=True)
    per_group = np.zeros((group_of.max() + 1, class_of.max() + 1), dtype=np.float64)
    np.add.at(per_group, (group_of, class_of), 1)
    per_group /= per_group.sum(axis=0)  # each group's share of each class's frames
    is_val = _share_search(per_group, val_fraction, seed)[group_of]
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def _share_search(per_group: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Which groups go to val, given each group's share of each class (rows: groups).

    A local search from a seeded random order of groups: a group moves to the other side, or a
    val group and a train group swap, when that brings the classes' shares in val, summed over
    classes, closer to ``val_fraction``.
    """
    in_val = np.zeros(len(per_group), dtype=bool)
    have = np.zeros(per_group.shape[1])
    order = np.random.default_rng(seed).permutation(len(per_group))
    for _ in range(100):  # settles in a few passes
        moved = False
        for d in order:
            step = -per_group[d] if in_val[d] else per_group[d]
            if np.abs(have + step - val_fraction).sum() < np.abs(have - val_fraction).sum() - 1e-12:
                in_val[d] = not in_val[d]
                have = have + step
                moved = True
        # Then the best exchange of a val group with a train group, where one move cannot help.
        v, t = np.flatnonzero(in_val), np.flatnonzero(~in_val)
        best = (np.abs(have - val_fraction).sum() - 1e-12, -1, -1)
        rows = max(1, 4_000_000 // max(1, len(t) * per_group.shape[1]))  # bounded memory
        for s in range(0, len(v), rows):
            vs = v[s : s + rows]
            cand = have + per_group[t][None, :, :] - per_group[vs][:, None, :]
            cost = np.abs(cand - val_fraction).sum(axis=2)
            i, j = np.unravel_index(np.argmin(cost), cost.shape)
            if cost[i, j] < best[0]:
                best = (cost[i, j], vs[i], t[j])
        if best[1] >= 0:
            in_val[best[1]], in_val[best[2]] = False, True
            have = have - per_group[best[1]] + per_group[best[2]]
            moved = True
        if not moved:
            break
    return in_val


def fold_warnings(labels: np.ndarray, fold: np.ndarray) -> list[str]:
    """One line per class absent from a fold's test side (its accuracy there is undefined)."""
    out = []
    for c in sorted(set(labels.tolist())):
        missing = sorted(set(range(fold.max() + 1)) - set(fold[labels == c].tolist()))
        if missing:
            out.append(f"class {c} has no frame in fold(s) {', '.join(map(str, missing))}")
    return out


def class_accuracies(
    y_true: np.ndarray, y_pred: np.ndarray, n_classes: int
) -> tuple[float, float, np.ndarray]:
    """(overall accuracy, mean of the per-class accuracies present, per-class accuracies)."""
    per = np.full(n_classes, np.nan)
    for c in range(n_classes):
        m = y_true == c
        if m.any():
            per[c] = float((y_pred[m] == c).mean())
    overall = float((y_true == y_pred).mean()) if len(y_true) else np.nan
    present = per[~np.isnan(per)]
    return overall, float(present.mean()) if len(present) else np.nan, per


def bootstrap_intervals(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    groups: np.ndarray,
    n_classes: int,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of the overall and the mean per-class accuracy, groups resampled.

    Each replicate draws as many groups as there are, with replacement, and keeps all their
    frames: the spread is that of a new set of episodes, not of new frames of the same ones.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    _, g = np.unique(np.asarray(groups), return_inverse=True)
    n_g = int(g.max()) + 1 if len(g) else 0
    # Per group and class: frames and correct frames; a replicate is a weighted sum of groups.
    total = np.zeros((n_g, n_classes))
    right = np.zeros((n_g, n_classes))
    np.add.at(total, (g, y_true), 1)
    np.add.at(right, (g, y_true), (y_true == y_pred).astype(float))
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_g, np.full(n_g, 1.0 / n_g), size=n_boot)  # (n_boot, n_g)
    t, r = weights @ total, weights @ right
    with np.errstate(invalid="ignore", divide="ignore"):
        overall = r.sum(1) / t.sum(1)
        mean_class = np.nanmean(np.where(t > 0, r / t, np.nan), axis=1)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {
        "average_accuracy": tuple(float(v) for v in np.nanpercentile(overall, [lo, hi])),
        "mean_class_accuracy": tuple(float(v) for v in np.nanpercentile(mean_class, [lo, hi])),
    }
