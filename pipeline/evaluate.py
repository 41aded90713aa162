"""Evaluation: per-class and average accuracy, confusion, time per image (paper Tables I-III)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline import framestore
from pipeline.checkpoint import load_checkpoint, warn_if_unfinished
from pipeline.classes import CLASS_LONG_NAMES, CLASSES
from pipeline.devices import device_name, resolve_device
from pipeline.errors import InputError
from pipeline.folds import DEFAULT_GROUP, bootstrap_intervals, groups_of
from pipeline.labelled import (
    CheckedCollate,
    CheckedFrames,
    StoreBatches,
    ToModelInput,
    load_labelled,
    load_labelled_store,
    open_labelled,
    unreadable_rows,
)
from pipeline.output_folder import OutputFolder
from pipeline.storage import atomic_path, replace_stage_errors, write_table

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- pure core


def _as_indices(y: Sequence[Any] | np.ndarray, classes: Sequence[str], what: str) -> np.ndarray:
    """Class names or indices -> int indices; anything else raises InputError naming the classes."""
    arr = np.asarray(y)
    if arr.dtype.kind in "iu":
        bad = (arr < 0) | (arr >= len(classes))
        if bad.any():
            raise InputError(
                f"{what}: class index {int(arr[bad][0])} outside 0..{len(classes) - 1}"
            )
        return arr.astype(np.int64)
    lookup = {c: i for i, c in enumerate(classes)}
    out = np.empty(len(arr), dtype=np.int64)
    for k, v in enumerate(arr):
        if v not in lookup:
            raise InputError(
                f"{what}: unknown class {str(v)!r}; allowed classes: {', '.join(classes)}"
            )
        out[k] = lookup[v]
    return out


def metrics_from_predictions(
    y_true: Sequence[Any] | np.ndarray,
    y_pred: Sequence[Any] | np.ndarray,
    classes: Sequence[str] = CLASSES,
) -> dict[str, Any]:
    """Per-class accuracy (correct / labelled of that class), average accuracy, confusion matrix.

    ``y_true``/``y_pred`` are class names or indices. Returns a dict with ``n``, ``correct``,
    ``average_accuracy`` (correct / all, the paper's definition), ``mean_class_accuracy``,
    ``per_class_accuracy`` and ``per_class_n`` (class -> value; NaN where a class has no frames),
    ``confusion`` (counts DataFrame, rows = true class, columns = predicted class) and
    ``confusion_normalised`` (rows sum to 1; NaN rows for absent classes).
    """
    classes = tuple(classes)
    t = _as_indices(y_true, classes, "y_true")
    p = _as_indices(y_pred, classes, "y_pred")
    if len(t) != len(p):
        raise InputError(f"y_true has {len(t)} entries but y_pred has {len(p)}")
    k = len(classes)
    counts = np.bincount(t * k + p, minlength=k * k).reshape(k, k)
    row = counts.sum(axis=1)
    diag = np.diag(counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(row > 0, diag / np.maximum(row, 1), np.nan)
        norm = np.where(row[:, None] > 0, counts / np.maximum(row[:, None], 1), np.nan)
    n = int(len(t))
    correct = int(diag.sum())
    present = per_class[~np.isnan(per_class)]
    confusion = pd.DataFrame(counts, index=pd.Index(classes, name="true"), columns=list(classes))
    return {
        "classes": list(classes),
        "n": n,
        "correct": correct,
        "average_accuracy": correct / n if n else math.nan,
        "mean_class_accuracy": float(present.mean()) if len(present) else math.nan,
        "per_class_accuracy": {c: float(per_class[i]) for i, c in enumerate(classes)},
        "per_class_n": {c: int(row[i]) for i, c in enumerate(classes)},
        "confusion": confusion,
        "confusion_normalised": pd.DataFrame(norm, index=confusion.index, columns=list(classes)),
    }


def confusion_table(confusion: pd.DataFrame) -> pd.DataFrame:
    """The confusion counts in the on-disk layout: column ``true`` + one count column per class."""
    out = confusion.reset_index()
    out = out.rename(columns={out.columns[0]: "true"})
    out["true"] = out["true"].astype(str)
    for c in confusion.columns:
        out[c] = out[c].astype("int64")
    return out


def read_confusion(path: str | os.PathLike, classes: Sequence[str] = CLASSES) -> pd.DataFrame:
    """Read confusion.parquet back into a counts DataFrame (rows = true class, in class order)."""
    df = pd.read_parquet(path)
    if "true" not in df.columns or any(c not in df.columns for c in classes):
        raise InputError(
            f"{path}: not a confusion table (needs columns true, {', '.join(classes)}); "
            "write one with `aurora-pipeline evaluate`"
        )
    df = df.set_index("true").reindex(list(classes)).fillna(0).astype("int64")
    df.index.name = "true"
    return df[list(classes)]


def _jsonable(x: Any) -> Any:
    """NaN -> None, numpy scalars -> Python, DataFrames -> nested lists."""
    if isinstance(x, pd.DataFrame):
        return [[_jsonable(v) for v in r] for r in x.to_numpy().tolist()]
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def metrics_to_json(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics dict as JSON-ready data (confusion matrices as row lists, NaN as null)."""
    return {k: _jsonable(v) for k, v in metrics.items()}


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def metrics_table(
    results: Mapping[str, Mapping[str, Any]], classes: Sequence[str] = CLASSES
) -> str:
    """A Markdown table in the layout of the paper's Tables I-III: one column per method.

    ``results`` maps a method name to a metrics dict (from metrics_from_predictions, optionally
    with a ``timing`` entry holding ``ms_per_image_batch1``).
    """
    names = list(results)
    lines = [
        "| Method | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for c in classes:
        label = CLASS_LONG_NAMES.get(c, c)
        vals = [_fmt(results[m]["per_class_accuracy"].get(c)) for m in names]
        lines.append(f"| {label} accuracy | " + " | ".join(vals) + " |")
    vals = [_fmt(results[m]["average_accuracy"]) for m in names]
    lines.append("| **Average accuracy** | " + " | ".join(vals) + " |")
    vals = [_fmt(results[m].get("mean_class_accuracy")) for m in names]
    lines.append("| **Mean per-class accuracy** | " + " | ".join(vals) + " |")
    if any("timing" in results[m] for m in names):
        for key, label in (
            ("ms_per_image_batch1", "Time cost, batch 1 (ms/image)"),
            ("ms_per_image_batch", "Time cost, batched (ms/image)"),
        ):
            vals = [_fmt(results[m].get("timing", {}).get(key), 2) for m in names]
            lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def confusion_markdown(metrics: Mapping[str, Any]) -> str:
    """The confusion matrix as Markdown: counts with the row-normalised share in brackets."""
    counts: pd.DataFrame = metrics["confusion"]
    norm: pd.DataFrame = metrics["confusion_normalised"]
    cols = list(counts.columns)
    lines = ["| true \\ predicted | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for c in counts.index:
        cells = [f"{counts.loc[c, k]} ({_fmt(norm.loc[c, k], 2)})" for k in cols]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def confusion_figure(
    confusion: pd.DataFrame, title: str | None = None, normalise: bool = True
) -> Any:
    """A confusion-matrix figure (rows = true class): colour = row share, text = count (share)."""
    counts = confusion.to_numpy()
    row = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(row > 0, counts / np.maximum(row, 1), np.nan)
    fig = Figure(figsize=(4.8, 4.2), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(
        share if normalise else counts, cmap="Blues", vmin=0, vmax=1 if normalise else None
    )
    labels = list(confusion.columns)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(confusion.index)), list(confusion.index))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            s = share[i, j]
            txt = f"{counts[i, j]}" + ("" if np.isnan(s) else f"\n{s:.2f}")
            dark = not np.isnan(s) and s > 0.6
            ax.text(
                j, i, txt, ha="center", va="center", fontsize=8, color="white" if dark else "black"
            )
    fig.colorbar(im, ax=ax, label="row share" if normalise else "count", shrink=0.8)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


# --------------------------------------------------------------------------- model side


def predict(
    model: Any, loader: Any, device: Any, desc: str = "evaluate"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``model`` over a DataLoader of (x, y): returns (y_true, y_pred, probabilities)."""
    model.eval()
    ys, ps, probs = [], [], []
    with torch.inference_mode():
        for x, y in tqdm(loader, desc=desc, unit="batch", leave=False):
            logits = model(x.to(device))
            pr = torch.softmax(logits.float(), dim=1)
            ys.append(y.numpy())
            ps.append(pr.argmax(1).cpu().numpy())
            probs.append(pr.cpu().numpy())
    if not ys:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, 0), np.float32)
    return np.concatenate(ys), np.concatenate(ps), np.concatenate(probs)


def time_per_image(
    model: Any,
    input_size: int,
    in_chans: int,
    batch_size: int,
    device: Any,
    min_seconds: float = 1.0,
    max_repeats: int = 50,
) -> float:
    """Milliseconds per image of the model's forward pass at ``batch_size`` (after a warm-up)."""
    model.eval()
    x = torch.rand(batch_size, in_chans, input_size, input_size, device=device)
    dev = torch.device(device)
    # synchronize the model's own GPU (the current device is cuda:0 whatever --device says)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        model(x)  # warm-up: allocator, kernels, lazy init
        sync()
        times = []
        start = time.perf_counter()
        while len(times) < max_repeats and (
            len(times) < 3 or time.perf_counter() - start < min_seconds
        ):
            t0 = time.perf_counter()
            model(x)
            sync()
            times.append(time.perf_counter() - t0)
    # The median resists other jobs on a shared machine.
    return float(np.median(times)) * 1000.0 / batch_size


#: What ``evaluate`` writes into OUT besides its run record (``errors.parquet`` only when
#: frames could not be read).
EVALUATION_FILES = (
    "metrics.json",
    "confusion.parquet",
    "metrics.md",
    "confusion.png",
    "predictions.parquet",
    "errors.parquet",
)


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    device: str = "auto",
    batch_size: int = 64,
    station: str | os.PathLike | None = None,
    num_workers: int = 0,
    timing: bool = True,
) -> dict[str, Any]:
    """Evaluate a checkpoint on a labelled set into OUT: metrics.json, confusion.parquet,
    metrics.md, confusion.png, predictions.parquet (and errors.parquet), then ``_run.json``.

    ``data``: a labelled set, or a frame store of one (``preprocess --format zarr``) at the
    checkpoint's input size. The outputs are staged and moved in together, the run record last.
    """
    record = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "data": str(Path(data).resolve()),
        "batch_size": batch_size,
        "station": None if station is None else str(station),
        "timing": timing,
    }
    with OutputFolder(out, "evaluate", record) as folder:
        dev = resolve_device(device)
        model, meta = _load_for_evaluation(checkpoint, data, dev)
        classes = tuple(meta.get("classes", CLASSES))
        df, loader = _evaluation_loader(data, meta, checkpoint, batch_size, station, num_workers)
        y_true, y_pred, probs, kept, bad = predict_checked(model, loader, dev)
        errors = unreadable_rows(df, bad, "evaluate")
        df = _readable_part(df, kept, errors, data, folder.path)
        result: dict[str, Any] = {
            "checkpoint": record["checkpoint"],
            "model_id": meta.get("model_id"),
            "variant": meta.get("variant"),
            "data": record["data"],
            **metrics_from_predictions(y_true, y_pred, classes),
            **episode_intervals(df, y_true, y_pred, len(classes)),
        }
        if timing:
            result["timing"] = _timing(model, meta, batch_size, dev)
        result["n_unreadable"] = len(errors)
        write_evaluation(
            result, folder.staging, predictions=_predictions_frame(df, y_pred, probs, classes)
        )
        _stage_errors(folder, errors)
        folder.install(EVALUATION_FILES, model_id=meta.get("model_id"), n=result["n"])
    return result


def _load_for_evaluation(
    checkpoint: str | os.PathLike, data: str | os.PathLike, dev: torch.device
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The checkpoint's model on ``dev`` in eval mode and its meta; warns when the checkpoint
    is unfinished or was trained on ``data`` itself."""
    model, meta = load_checkpoint(checkpoint, map_location="cpu")
    warn_if_unfinished(meta, checkpoint)
    if meta.get("data") and Path(str(meta["data"])).resolve() == Path(data).resolve():
        log.warning(
            "%s: is the labelled set %s was trained on (its validation frames too): these "
            "metrics overstate the accuracy on new data; evaluate on another winter",
            data,
            checkpoint,
        )
    return model.to(dev).eval(), meta


def _evaluation_loader(
    data: str | os.PathLike,
    meta: Mapping[str, Any],
    checkpoint: str | os.PathLike,
    batch_size: int,
    station: str | os.PathLike | None,
    num_workers: int,
) -> tuple[pd.DataFrame, Any]:
    """The frames of DATA and batches of (x, y, indices, errors) of them for predict_checked."""
    classes = tuple(meta.get("classes", CLASSES))
    input_size = int(meta["input_size"])
    if framestore.is_store(data):  # preprocessed once: read, not decoded
        framestore.check_input_size(framestore.open_info(data), input_size, checkpoint)
        df = load_labelled_store(data, classes=classes)
        return df, StoreBatches(data, df, input_size, batch_size, classes)
    df = load_labelled(data, classes=classes)
    ds = open_labelled(data, station=station, df=df)
    loader = DataLoader(
        CheckedFrames(ds),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=CheckedCollate(ToModelInput(input_size)),
    )
    return df, loader


def _readable_part(
    df: pd.DataFrame, kept: list[int], errors: pd.DataFrame, data: Any, out: Path
) -> pd.DataFrame:
    """The rows of ``df`` that were evaluated; warns about the unreadable ones, and none
    readable is an InputError."""
    if len(errors):
        log.warning(
            "%d of %d frames could not be read and are left out of the metrics (%s); "
            "they are listed in %s",
            len(errors),
            len(df),
            errors["message"].iloc[0],
            out / "errors.parquet",
        )
    if not kept:
        raise InputError(
            f"{data}: none of its {len(df)} frames could be read (first: "
            f"{errors['message'].iloc[0] if len(errors) else '?'}); check --station and the files"
        )
    return df.iloc[kept].reset_index(drop=True)


def _timing(
    model: torch.nn.Module, meta: Mapping[str, Any], batch_size: int, dev: torch.device
) -> dict[str, Any]:
    """The forward-pass time per image at batch 1 and at ``batch_size`` on ``dev``."""
    input_size = int(meta["input_size"])
    in_chans = int(meta.get("in_chans", 1))
    return {
        "device": device_name(dev),
        "what": "model forward pass only (no file reading or preprocessing), median",
        "input_size": input_size,
        "batch_size": batch_size,
        "ms_per_image_batch1": time_per_image(model, input_size, in_chans, 1, dev),
        "ms_per_image_batch": time_per_image(model, input_size, in_chans, batch_size, dev),
    }


def _stage_errors(folder: OutputFolder, errors: pd.DataFrame) -> None:
    """OUT's errors.parquet with this run's rows for ``evaluate``, staged for install (a copy
    keeps the file's time when its rows are unchanged; no rows at all: no file)."""
    old, staged = folder.path / "errors.parquet", folder.staging / "errors.parquet"
    if old.is_file():
        shutil.copy2(old, staged)
    replace_stage_errors(staged, errors, "evaluate")


def episode_intervals(
    df: pd.DataFrame, y_true: np.ndarray, y_pred: np.ndarray, n_classes: int
) -> dict[str, Any]:
    """95 % bootstrap intervals over episodes (else UT days) of a set's accuracies, if it has
    groups; frames 10 s apart are near-copies, so frames are not independent samples."""
    if DEFAULT_GROUP in df.columns and df[DEFAULT_GROUP].notna().all():
        column = DEFAULT_GROUP
    elif "time_utc" in df.columns and df["time_utc"].notna().all():
        column = "day"
    else:
        return {}
    groups = groups_of(df, column, "labels.parquet")
    if len(np.unique(groups)) < 2:
        return {}
    ci = bootstrap_intervals(y_true, y_pred, groups, n_classes)
    return {"interval_group": column, "n_groups": int(len(np.unique(groups))), "ci95": ci}


def is_imbalanced(per_class_n: Mapping[str, int]) -> bool:
    """Whether class counts differ by more than 10 % (the overall accuracy then hides a class)."""
    n = [v for v in per_class_n.values() if v]
    return bool(n) and max(n) > 1.1 * min(n)


def summary_line(res: Mapping[str, Any]) -> str:
    """The accuracies of an evaluation in one line, mean per-class first on an imbalanced set."""

    def with_ci(key: str) -> str:
        lo_hi = res.get("ci95", {}).get(key)
        if not lo_hi:
            return f"{res[key]:.3f}"
        what = "episodes" if res.get("interval_group") == "episode" else "days"
        return f"{res[key]:.3f} (95% {lo_hi[0]:.3f}-{lo_hi[1]:.3f} over {res['n_groups']} {what})"

    overall = f"overall accuracy {with_ci('average_accuracy')}"
    mean = f"mean per-class accuracy {with_ci('mean_class_accuracy')}"
    first = [mean, overall] if is_imbalanced(res["per_class_n"]) else [overall, mean]
    per = ", ".join(f"{c} {v:.3f}" for c, v in res["per_class_accuracy"].items() if v == v)
    return f"{first[0]}, {first[1]} on {res['n']} frames ({per})"


def predict_checked(
    model: Any, loader: Any, device: Any, desc: str = "evaluate"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int], list[tuple[int, str]]]:
    """``predict`` over CheckedFrames: also the indices evaluated and the (index, error) skipped."""
    model.eval()
    ys, ps, probs, kept, bad = [], [], [], [], []
    with torch.inference_mode():
        for x, y, idx, errs in tqdm(loader, desc=desc, unit="batch", leave=False):
            bad.extend(errs)
            if x is None:
                continue
            pr = torch.softmax(model(x.to(device)).float(), dim=1)
            ys.append(y.numpy())
            ps.append(pr.argmax(1).cpu().numpy())
            probs.append(pr.cpu().numpy())
            kept.extend(idx)
    if not ys:
        empty = np.empty(0, np.int64)
        return empty, empty, np.empty((0, 0), np.float32), kept, bad
    return np.concatenate(ys), np.concatenate(ps), np.concatenate(probs), kept, bad


def _predictions_frame(
    df: pd.DataFrame, y_pred: np.ndarray, probs: np.ndarray, classes: Sequence[str]
) -> pd.DataFrame:
    out = pd.DataFrame(
        {
            "path": df["path"].to_numpy(),
            "label": df["label"].to_numpy(),
            "predicted": [classes[i] for i in y_pred],
        }
    )
    for i, c in enumerate(classes):
        out[f"p_{c}"] = probs[:, i].astype(np.float32)
    return out


def write_evaluation(
    result: Mapping[str, Any], out: str | os.PathLike, predictions: pd.DataFrame | None = None
) -> Path:
    """Write metrics.json, confusion.parquet, metrics.md, confusion.png (+ predictions.parquet)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics_to_json(result), indent=2) + "\n")
    write_table(confusion_table(result["confusion"]), out / "confusion.parquet")
    if predictions is not None:
        write_table(predictions, out / "predictions.parquet")
    name = str(result.get("variant") or "model")
    md = [
        f"# Evaluation of {name}",
        "",
        f"Checkpoint `{result.get('checkpoint', '?')}` (model_id `{result.get('model_id')}`) on "
        f"`{result.get('data', '?')}`: {result['n']} frames, {result['correct']} correct"
        + (
            f"; {result['n_unreadable']} unreadable frames left out (errors.parquet)."
            if result.get("n_unreadable")
            else "."
        ),
        "",
        summary_line(result) + ".",
        "",
        metrics_table({name: result}),
        "Confusion matrix (rows = true class; count and row share):",
        "",
        confusion_markdown(result),
    ]
    if "timing" in result:
        t = result["timing"]
        md.append(
            f"Time per image: {t['ms_per_image_batch1']:.2f} ms at batch 1, "
            f"{t['ms_per_image_batch']:.2f} ms at batch {t['batch_size']} "
            f"({t['device']}; {t['what']}).\n"
        )
    with atomic_path(out / "metrics.md") as tmp:
        tmp.write_text("\n".join(md))
    fig = confusion_figure(
        result["confusion"], title=f"{name}: average accuracy {_fmt(result['average_accuracy'])}"
    )
    with atomic_path(out / "confusion.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return out
