"""Cross-validation by episode: train on k-1 folds of whole episodes, evaluate on the held-out one.

OUT/<variant>/fold-<k>/ holds the fold's training and test lists (labels.parquet with absolute
paths into DATA), the training run (ckpt/) and the evaluation (eval/); a fold whose eval/
``_run.json`` says finished is never retrained. OUT/cv.parquet (one row per variant and fold),
OUT/cv.md, OUT/cv.png and OUT/confusion_pooled.parquet summarise them. OUT is written in place
and resumable: its ``_run.json`` holds the plan, unfinished until the summary is written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.classes import CLASSES
from pipeline.config import resolve_station, to_dict
from pipeline.errors import InputError
from pipeline.evaluate import (
    confusion_markdown,
    confusion_table,
    evaluate_checkpoint,
    read_confusion,
)
from pipeline.folds import DEFAULT_GROUP, fold_warnings, group_folds, groups_of
from pipeline.labelled import load_labelled
from pipeline.output_folder import OutputFolder, is_finished
from pipeline.plots import cv_figure
from pipeline.storage import atomic_path, write_table
from pipeline.train import LAST_STATE, TrainConfig, train

log = logging.getLogger(__name__)

TABLE = "cv.parquet"


def fold_sets(
    df: pd.DataFrame, fold: np.ndarray, k: int, root: Path
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, test) label tables of fold ``k``, paths absolute so the tables live anywhere."""
    keep = [c for c in df.columns if c != "winter"]
    table = df[keep].copy()
    table["path"] = [str(Path(p).resolve()) for p in table["path"]]
    return table[fold != k].reset_index(drop=True), table[fold == k].reset_index(drop=True)


def _write_set(table: pd.DataFrame, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_table(table, folder / "labels.parquet")


def fold_row(variant: str, k: int, metrics: dict[str, Any], classes: Sequence[str]) -> dict:
    """One row of the per-fold table (cv.parquet) from a fold's evaluation metrics."""
    row = {
        "variant": variant,
        "fold": k,
        "n": metrics["n"],
        "average_accuracy": metrics["average_accuracy"],
        "mean_class_accuracy": metrics["mean_class_accuracy"],
    }
    for c in classes:
        v = metrics["per_class_accuracy"].get(c)
        row[f"acc_{c}"] = np.nan if v is None else v
    return row


def run_fold(
    cfg: TrainConfig,
    train_set: pd.DataFrame,
    test_set: pd.DataFrame,
    folder: Path,
    station: Any,
    init_from: str | os.PathLike | None,
    device: str,
    keep_checkpoint: bool,
) -> dict[str, Any]:
    """Train and evaluate one fold in ``folder`` (resumed when interrupted); its metrics."""
    done = folder / "eval" / "metrics.json"
    if is_finished(folder / "eval", "evaluate"):
        return json.loads(done.read_text())
    _write_set(train_set, folder / "train")
    _write_set(test_set, folder / "test")
    ckpt = folder / "ckpt"
    resume = (ckpt / LAST_STATE).is_file()
    train(
        cfg,
        folder / "train",
        ckpt,
        resume=resume,
        overwrite=not resume,
        device=device,
        station=station,
        init_from=init_from,
        config_source=f"cv fold {folder.name}",
    )
    evaluate_checkpoint(
        ckpt, folder / "test", folder / "eval", device=device, station=station, timing=False
    )
    if not keep_checkpoint:
        for name in ("model.safetensors", LAST_STATE):
            (ckpt / name).unlink(missing_ok=True)
    return json.loads(done.read_text())


def cross_validate(
    cfg: TrainConfig,
    data: str | os.PathLike,
    out: str | os.PathLike,
    folds: int = 5,
    group: str = DEFAULT_GROUP,
    variants: Sequence[str] | None = None,
    init_from: str | os.PathLike | None = None,
    device: str = "auto",
    station: str | os.PathLike | None = None,
    keep_checkpoints: bool = False,
    classes: Sequence[str] = CLASSES,
    only_folds: Sequence[int] | None = None,
) -> pd.DataFrame:
    """``folds``-fold cross-validation of each variant on DATA by ``group``; the per-fold table.

    ``only_folds`` runs those folds only (to split the work over jobs): the summary is written,
    and the run recorded as finished, once a run covers every fold."""
    ks = _fold_selection(only_folds, folds)
    data = Path(data).resolve()
    df = load_labelled(data, classes=classes)
    groups = groups_of(df, group, f"{data}/labels.parquet")
    fold = group_folds(df["label"].to_numpy(), groups, folds, cfg.seed)
    for line in fold_warnings(df["label"].to_numpy(), fold):
        log.warning("%s: %s: its accuracy is left out of that fold's mean", data, line)
    plan = {
        "data": str(data),
        "folds": folds,
        "group": group,
        "seed": cfg.seed,
        "init_from": None if init_from is None else str(Path(init_from).resolve()),
        "config": to_dict(cfg),
        "fold_of": dict(zip(map(str, groups), map(int, fold))),
    }
    with OutputFolder(out, "cv", plan) as cv_out:
        if cv_out.previous() is not None and not cv_out.same_settings():
            raise InputError(
                f"{cv_out.path}: holds a cross-validation of another config, data, folds, group, "
                "seed or --init-from (finished folds are reused only for the same); choose "
                "another --out"
            )
        cv_out.begin()
        stn = resolve_station(station, data, cfg.station)
        rows = []
        for variant in variants or [cfg.variant]:
            vcfg = dataclasses.replace(cfg, variant=variant)
            vcfg.validate()
            for k in ks:
                train_set, test_set = fold_sets(df, fold, k, data)
                log.info("cv: %s fold %d/%d (%d train, %d test frames)", variant, k + 1, folds,
                         len(train_set), len(test_set))  # fmt: skip
                m = run_fold(
                    vcfg, train_set, test_set, cv_out.path / variant / f"fold-{k}", stn,
                    init_from, device, keep_checkpoints,
                )  # fmt: skip
                rows.append(fold_row(variant, k, m, classes))
        table = pd.DataFrame(rows)
        if len(ks) < folds:
            log.info("cv: ran fold(s) %s of %d; run cv again without --fold into %s for the "
                     "summary (finished folds are reused)", ", ".join(map(str, ks)), folds,
                     cv_out.path)  # fmt: skip
            return table
        write_summary(table, cv_out.path, classes, plan)
        cv_out.finish()
    return table


def _fold_selection(only_folds: Sequence[int] | None, folds: int) -> list[int]:
    """The folds to run: all, or the ones asked for (each checked against the fold count)."""
    if not only_folds:
        return list(range(folds))
    bad = [k for k in only_folds if not 0 <= int(k) < folds]
    if bad:
        raise InputError(f"--fold {bad[0]}: there are {folds} folds, numbered 0 to {folds - 1}")
    return sorted({int(k) for k in only_folds})


def summary_frame(table: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Mean and standard deviation over folds of every accuracy, one row per variant."""
    cols = ["average_accuracy", "mean_class_accuracy"] + [f"acc_{c}" for c in classes]
    g = table.groupby("variant", sort=False)[cols]
    mean, std = g.mean(), g.std(ddof=1)
    out = mean.add_suffix("_mean").join(std.add_suffix("_std"))
    return out.reset_index()


def cv_markdown(table: pd.DataFrame, classes: Sequence[str]) -> str:
    """The paper's Table I layout: one column per variant, mean +- sd over folds per class."""
    summary = summary_frame(table, classes).set_index("variant")
    names = list(summary.index)
    lines = ["| Method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]

    def cell(v: str, key: str) -> str:
        m, s = summary.loc[v, f"{key}_mean"], summary.loc[v, f"{key}_std"]
        return "n/a" if pd.isna(m) else f"{m:.3f} ± {0 if pd.isna(s) else s:.3f}"

    for c in classes:
        lines.append(f"| {c} accuracy | " + " | ".join(cell(v, f"acc_{c}") for v in names) + " |")
    for key, label in (
        ("mean_class_accuracy", "**Mean per-class accuracy**"),
        ("average_accuracy", "Overall accuracy"),
    ):
        lines.append(f"| {label} | " + " | ".join(cell(v, key) for v in names) + " |")
    return "\n".join(lines) + "\n"


def pooled_confusion(out: Path, variant: str, folds: int) -> pd.DataFrame:
    """The sum over folds of a variant's test confusion matrices."""
    mats = [read_confusion(out / variant / f"fold-{k}" / "eval" / "confusion.parquet")
            for k in range(folds)]  # fmt: skip
    return sum(mats[1:], mats[0])


def write_summary(
    table: pd.DataFrame, out: Path, classes: Sequence[str], plan: dict[str, Any]
) -> None:
    """cv.parquet, cv.md, cv.png and confusion_pooled.parquet."""
    write_table(table, out / TABLE)
    md = [
        f"# {plan['folds']}-fold cross-validation by {plan['group']}",
        "",
        f"Data `{plan['data']}`; seed {plan['seed']}; init from `{plan['init_from']}`. Mean ± "
        "standard deviation over folds of the accuracy on each held-out fold.",
        "",
        cv_markdown(table, classes),
    ]
    pooled = []
    for variant in table["variant"].unique():
        conf = pooled_confusion(out, variant, plan["folds"])
        pooled.append(confusion_table(conf).assign(variant=variant))
        norm = conf.div(conf.sum(axis=1).replace(0, np.nan), axis=0)
        md += [
            f"Pooled confusion of {variant} (rows = true class; count and row share):",
            "",
            confusion_markdown({"confusion": conf, "confusion_normalised": norm}),
        ]
    write_table(pd.concat(pooled, ignore_index=True), out / "confusion_pooled.parquet")
    with atomic_path(out / "cv.md") as tmp:
        tmp.write_text("\n".join(md))
    fig = cv_figure(table, classes)
    with atomic_path(out / "cv.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
