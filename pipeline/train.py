"""Training: config, stratified split, augmentation, the SGD loop with early stopping and resume."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, WeightedRandomSampler
from tqdm.auto import tqdm

from pipeline.checkpoint import init_from_checkpoint, save_checkpoint
from pipeline.classes import CLASSES
from pipeline.config import dump_yaml, load_config, resolve_station, station_path, to_dict
from pipeline.devices import resolve_device
from pipeline.errors import CheckpointError, ConfigError, InputError
from pipeline.evaluate import metrics_from_predictions, metrics_to_json, predict
from pipeline.folds import group_split, groups_of
from pipeline.labelled import (  # noqa: F401  (re-exported: the contract names train.load_labelled)
    CheckedFrames,
    LabelledSet,
    ToModelInput,
    load_labelled,
    open_labelled,
    unreadable_rows,
)
from pipeline.models import VARIANTS, build_model, load_init_weights, sky_level, to_model_input
from pipeline.models.build import INPUT_BLACK, INPUT_MEAN, INPUT_STD
from pipeline.output_folder import RUN_RECORD, OutputFolder
from pipeline.preprocess import find_dark_dir
from pipeline.storage import ERRORS_SCHEMA, atomic_path, write_table

log = logging.getLogger(__name__)

#: The resumable state of the last finished epoch, beside the best checkpoint.
LAST_STATE = "last.pt"


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class LambdaScheduleConfig:
    """L-Softmax blending factor: lambda = max(floor, base * (1 + gamma * step) ** -power)."""

    base: float = 10000.0
    gamma: float = 0.12
    power: float = 1.0
    floor: float = 15.0

    def validate(self) -> None:
        for name in ("base", "gamma", "power", "floor"):
            if getattr(self, name) < 0:
                raise ValueError(f"lsoftmax.schedule.{name} must be >= 0")


@dataclass(frozen=True)
class LSoftmaxConfig:
    """Margin m (paper's best: 3) and the lambda schedule; used by the *lsoftmax* variants only."""

    m: int = 3
    schedule: LambdaScheduleConfig = field(default_factory=LambdaScheduleConfig)

    def validate(self) -> None:
        if self.m < 1:
            raise ValueError(f"lsoftmax.m must be a positive integer, got {self.m}")


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (applied batch-wise to the model input)."""

    #: random rotation by any angle. Off by default: dayside arcs and draperies lie roughly
    #: along geomagnetic east-west, a fixed direction in a station's frames, which rotation
    #: hides from the classifier; switch on for small sets where it helps (demo.yaml).
    rotate: bool = False
    #: random mirror image (Caffe's AlexNet mirror; an arc's east-west alignment survives it).
    flip: bool = True
    #: zoom factor drawn log-uniformly in [1/(1+j), 1+j]; 0 switches it off.
    scale_jitter: float = 0.1
    #: also mirror top-bottom (independently of ``flip``), half of the time.
    flip_vertical: bool = False
    #: rotation by a uniform angle within +-this many degrees (``rotate`` turns any angle).
    rotate_degrees: float = 0.0
    #: photometric jitter, on the [0, 1] frame inside the sky circle: gain drawn log-uniformly
    #: in [1/(1+g), 1+g], gamma likewise, a uniform background glow up to ``glow``, Gaussian
    #: noise of sd up to ``noise``, and a 3x3 blur with probability ``blur``. Real frames vary
    #: in brightness and contrast with the season, cloud and the camera far more than in shape.
    gain: float = 0.0
    gamma: float = 0.0
    glow: float = 0.0
    noise: float = 0.0
    blur: float = 0.0

    def validate(self) -> None:
        if not 0 <= self.scale_jitter <= 0.5:
            raise ValueError(f"augment.scale_jitter must be within 0..0.5, got {self.scale_jitter}")
        for name in ("gain", "gamma"):
            if not 0 <= getattr(self, name) <= 2:
                raise ValueError(f"augment.{name} must be within 0..2, got {getattr(self, name)}")
        for name in ("glow", "noise", "blur"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"augment.{name} must be within 0..1, got {getattr(self, name)}")
        if not 0 <= self.rotate_degrees <= 180:
            raise ValueError(
                f"augment.rotate_degrees must be within 0..180, got {self.rotate_degrees}"
            )

    @property
    def photometric(self) -> bool:
        """Whether any brightness, contrast or noise jitter is on."""
        return any((self.gain, self.gamma, self.glow, self.noise, self.blur))


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (written beside the checkpoint as config.yaml)."""

    variant: str = "stn-lsoftmax-alexnet"
    input_size: int = 227
    epochs: int = 30
    batch_size: int = 64
    val_batch_size: int = 16
    lr: float = 3e-5
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_epochs: int = 0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lsoftmax: LSoftmaxConfig = field(default_factory=LSoftmaxConfig)
    val_fraction: float = 0.2
    #: how frames are drawn for validation: one by one at random within each class ("frame",
    #: the paper's 4:1), or whole UT days ("day"): frames 10 s apart are near-copies, so a
    #: frame split puts a neighbour of almost every validation frame into training.
    split_by: Literal["frame", "day", "episode"] = "frame"
    #: the labels.parquet column that names each frame's group for ``split_by: episode``.
    group_column: str = "episode"
    #: "sampler": draw training frames with probability 1 / (frames of their class), so that
    #: a rare class is seen as often as a common one.
    balance: Literal["none", "sampler"] = "none"
    #: the validation metric that picks the kept epoch; on an imbalanced set the overall
    #: accuracy rewards ignoring a rare class, the mean of the per-class accuracies does not.
    select_on: Literal["average_accuracy", "mean_class_accuracy"] = "average_accuracy"
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    #: stop after this many epochs without a better validation accuracy (0 = never).
    patience: int = 10
    #: mixed precision and torch.compile: GPU only (ignored with a warning on CPU).
    amp: bool = False
    compile: bool = False
    num_workers: int = 0
    #: keep preprocessed frames in memory across epochs (small sets only: 4 bytes/pixel).
    cache_frames: bool = False
    #: station for preprocessing when the set has no calib/station.yaml and no --station is given.
    station: str | None = None
    #: weights when training without --init-weights: the backbone's own ("default") or He
    #: (Kaiming) normal for every conv/FC of trunk and neck ("kaiming"; the STN and head keep
    #: theirs). He init keeps the signal at scale through a deep plain network trained from
    #: scratch, where the default init lets it shrink layer by layer (use a short lr warm-up).
    scratch_init: Literal["default", "kaiming"] = "default"
    #: side of the down-sampled copy the STN's localisation net looks at (output keeps full size).
    stn_loc_size: int = 64
    #: the STN's learning rate as a share of ``lr``. At the full rate the localisation net can
    #: move its sampling grid off the frame within the first steps; the warped input is then
    #: constant, no gradient brings the grid back and the loss stays at ln 4.
    stn_lr_scale: float = 1.0
    #: "frame": the model stretches each frame by its own 99th percentile before its first
    #: layer (models.build.FrameStretch), so brightness differences between nights matter less.
    input_norm: Literal["fixed", "frame"] = "fixed"
    #: "radial_edges": the first layer also sees the frame's gradient along and across the
    #: sky's radius (models.radial.RadialEdges), the cue that tells rays from bands.
    input_features: Literal["grey", "radial_edges"] = "grey"

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(
                f"variant {self.variant!r} is not allowed; allowed values: {', '.join(VARIANTS)}"
            )
        checks = [
            (self.input_size >= 64, f"input_size must be >= 64, got {self.input_size}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 2, f"batch_size must be >= 2, got {self.batch_size}"),
            (self.val_batch_size >= 1, f"val_batch_size must be >= 1, got {self.val_batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 <= self.momentum < 1, f"momentum must be within [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (
                0 <= self.val_fraction < 1,
                f"val_fraction must be within [0, 1) (0: no validation, keep the last epoch), "
                f"got {self.val_fraction}",
            ),
            (self.patience >= 0, f"patience must be >= 0, got {self.patience}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (self.stn_loc_size >= 32, f"stn_loc_size must be >= 32, got {self.stn_loc_size}"),
            (self.stn_lr_scale > 0, f"stn_lr_scale must be > 0, got {self.stn_lr_scale}"),
            (self.seed >= 0, f"seed must be a non-negative integer, got {self.seed}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.station is not None:  # checked here, even if a set's own station wins later
            try:
                station_path(self.station)
            except ConfigError as exc:
                raise ValueError(f"station: {exc}") from None

    @property
    def uses_lsoftmax(self) -> bool:
        """Whether the variant trains with the L-Softmax loss."""
        return "lsoftmax" in self.variant


def load_train_config(path: str | os.PathLike) -> TrainConfig:
    """Load configs/train/<name>.yaml (errors name the file, key and allowed values)."""
    return load_config(TrainConfig, path)


# --------------------------------------------------------------------------- pure pieces


def stratified_split(
    labels: Sequence[str] | np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) with ``val_fraction`` of every class in val (4:1 at 0.2), seeded."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * val_fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)  # every class on both sides when possible
        else:
            n_val = 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def lr_at(cfg: TrainConfig, epoch: float) -> float:
    """Learning rate at (fractional) epoch ``epoch``: linear warm-up, then constant or cosine.

    Called per optimiser step with ``epoch + step / steps_per_epoch``, so the warm-up ramps over
    steps: from scratch, the first full-size steps are what blows a plain AlexNet up.
    """
    if cfg.warmup_epochs and epoch < cfg.warmup_epochs:
        return cfg.lr * max(epoch, 1e-3) / cfg.warmup_epochs
    if cfg.lr_schedule == "cosine":
        span = max(1, cfg.epochs - cfg.warmup_epochs)
        t = min(1.0, (epoch - cfg.warmup_epochs) / span)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t))
    return cfg.lr


def param_groups(model: torch.nn.Module, stn_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """Optimiser parameter groups: the STN's at ``stn_lr_scale`` times the rate, the rest at 1.

    One group where the model has no STN or the scale is 1, so that such runs (and their
    resume states) are what they were before the option existed.
    """
    stn = getattr(model, "stn", None)
    if stn is None or stn_lr_scale == 1.0:
        return [{"params": list(model.parameters()), "lr_scale": 1.0}]
    stn_ids = {id(p) for p in stn.parameters()}
    rest = [p for p in model.parameters() if id(p) not in stn_ids]
    # the rest first: the history's "lr" is group 0's, the base rate
    return [
        {"params": rest, "lr_scale": 1.0},
        {"params": list(stn.parameters()), "lr_scale": stn_lr_scale},
    ]


def _uniform(b: int, generator: torch.Generator, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(b, generator=generator)


def _log_uniform(b: int, generator: torch.Generator, spread: float) -> torch.Tensor:
    r = math.log1p(spread)
    return torch.exp(_uniform(b, generator, -r, r))


def photometric_batch(
    x: torch.Tensor, aug: AugmentConfig, generator: torch.Generator, fill: float
) -> torch.Tensor:
    """Gain, gamma, glow, noise and blur jitter of a (B, C, S, S) model-input batch.

    Applied to the [0, 1] frame inside the sky circle (pixels at ``fill``, the masked black,
    stay black), then normalised back; random draws come from ``generator`` (on the CPU).
    """
    if not aug.photometric:
        return x
    b = x.shape[0]
    sky = (x > fill + 1e-6).to(x.dtype)
    v = (x * INPUT_STD + INPUT_MEAN).clamp(0, 1)
    shape = (b, 1, 1, 1)
    gain = _log_uniform(b, generator, aug.gain).view(shape).to(x)
    gamma = _log_uniform(b, generator, aug.gamma).view(shape).to(x)
    v = v.pow(gamma) * gain + _uniform(b, generator, 0, aug.glow).view(shape).to(x)
    if aug.noise:
        sd = _uniform(b, generator, 0, aug.noise).view(shape)
        v = v + (torch.randn(x.shape, generator=generator) * sd).to(x)
    if aug.blur:
        pick = (torch.rand(b, generator=generator) < aug.blur).view(shape).to(x)
        blurred = F.avg_pool2d(F.pad(v, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        v = pick * blurred + (1 - pick) * v
    v = v.clamp(0, 1) * sky
    return (v - INPUT_MEAN) / INPUT_STD


def augment_batch(
    x: torch.Tensor, aug: AugmentConfig, generator: torch.Generator, fill: float = 0.0
) -> torch.Tensor:
    """Random rotation, mirrors and zoom of a (B, C, S, S) batch about its centre, then the
    photometric jitter (:func:`photometric_batch`).

    Areas brought in from outside the frame get ``fill`` (the model-input value of a masked,
    black pixel), so the fisheye mask stays what the network sees at inference.
    """
    b = x.shape[0]
    x = photometric_batch(x, aug, generator, fill)
    if not (aug.rotate or aug.rotate_degrees or aug.flip or aug.flip_vertical):
        if aug.scale_jitter <= 0:
            return x
    if aug.rotate:
        angle = torch.rand(b, generator=generator) * (2 * math.pi)
    else:
        r = math.radians(aug.rotate_degrees)
        angle = _uniform(b, generator, -r, r) if r else torch.zeros(b)

    def mirror(on: bool) -> torch.Tensor:
        return (
            torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
            if on
            else torch.ones(b)
        )

    mx, my = mirror(aug.flip), mirror(aug.flip_vertical)
    scale = _log_uniform(b, generator, aug.scale_jitter) if aug.scale_jitter > 0 else torch.ones(b)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = cos * mx
    theta[:, 0, 1] = -sin * my
    theta[:, 1, 0] = sin * mx
    theta[:, 1, 1] = cos * my
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + fill


def model_input_fill(input_size: int) -> float:
    """The model-input value of a black (masked) pixel, for padding after augmentation."""
    return INPUT_BLACK


# --------------------------------------------------------------------------- model


def build_for_config(cfg: TrainConfig, classes: Sequence[str] = CLASSES) -> torch.nn.Module:
    """The model of ``cfg`` (L-Softmax margin and lambda schedule where the variant has one)."""
    return build_model(
        cfg.variant,
        num_classes=len(classes),
        in_chans=1,
        input_size=cfg.input_size,
        lsoftmax_m=cfg.lsoftmax.m,
        lambda_schedule=to_dict(cfg.lsoftmax.schedule),
        stn_loc_size=cfg.stn_loc_size,
        input_norm=cfg.input_norm,
        input_features=cfg.input_features,
    )


def kaiming_reinit(model: torch.nn.Module) -> int:
    """He-normal (fan-in, ReLU) weights and zero biases for the trunk and neck convs/FCs."""
    n = 0
    for part in (getattr(model, "trunk", None), getattr(model, "neck", None)):
        if part is None:
            continue
        for mod in part.modules():
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(mod.weight, mode="fan_in", nonlinearity="relu")
                if mod.bias is not None:
                    torch.nn.init.zeros_(mod.bias)
                n += 1
    return n


def _lsoftmax_layer(model: torch.nn.Module) -> Any:
    return getattr(model, "lsoftmax", None)


def _current_lambda(model: torch.nn.Module) -> float | None:
    layer = _lsoftmax_layer(model)
    return None if layer is None else float(layer.lam)


# --------------------------------------------------------------------------- loop


@dataclass
class _RunState:
    """What --resume needs besides model and optimiser."""

    epoch: int = 0  # epochs finished
    best_acc: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped: bool = False
    history: list[dict[str, float]] = field(default_factory=list)


#: Settings a resumed run may change: how long and how it runs, not what it learns.
_RESUMABLE_CHANGES = ("epochs", "patience", "num_workers", "cache_frames")


def split_for_config(
    cfg: TrainConfig, labels: np.ndarray, groups: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) by ``cfg.split_by``; no val frames at ``val_fraction: 0``."""
    if cfg.val_fraction == 0:
        return np.arange(len(labels)), np.empty(0, dtype=np.int64)
    if cfg.split_by == "episode":
        return group_split(labels, groups, cfg.val_fraction, cfg.seed)
    if cfg.split_by == "day":
        return group_split(labels, groups, cfg.val_fraction, cfg.seed, balance="shares")
    return stratified_split(labels, cfg.val_fraction, cfg.seed)


def _split_groups(cfg: TrainConfig, df: pd.DataFrame, data: Path) -> np.ndarray | None:
    """The group of every frame for a day or episode split (None for a frame split)."""
    if cfg.split_by == "day":
        return _ut_days(df, data)
    if cfg.split_by == "episode" and cfg.val_fraction > 0:
        return groups_of(df, cfg.group_column, f"{data}/labels.parquet")
    return None


def balanced_sampler(labels: np.ndarray, generator: torch.Generator, balance: str) -> Any:
    """A sampler drawing each class equally often (with replacement), or None."""
    if balance != "sampler":
        return None
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    weights = torch.as_tensor(1.0 / counts[inverse], dtype=torch.double)
    return WeightedRandomSampler(weights, len(labels), replacement=True, generator=generator)


def _config_fingerprint(cfg: TrainConfig) -> str:
    d = to_dict(cfg)
    for key in _RESUMABLE_CHANGES:
        d.pop(key, None)
    if d.get("split_by") == "frame":  # runs recorded before split_by existed split by frame
        d.pop("split_by")
    return json.dumps(d, sort_keys=True)


def _load_last(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt or unsafe file: the user's to fix
        raise CheckpointError(
            f"{path}: cannot load the training state safely ({str(exc).splitlines()[0]}); "
            "delete it and train without --resume"
        ) from None
    if not isinstance(state, dict) or state.get("format") != "aurora-train-state-1":
        raise CheckpointError(f"{path}: not a training state written by `aurora-pipeline train`")
    return state


def _ut_days(df: pd.DataFrame, data: Path) -> np.ndarray:
    """The UT date of every frame (split_by: day); frames without a time are an InputError."""
    t = pd.to_datetime(df["time_utc"], utc=True) if "time_utc" in df.columns else None
    if t is None or t.isna().any():
        n = len(df) if t is None else int(t.isna().sum())
        raise InputError(
            f"{data}/labels.parquet: split_by: day needs the time of every frame, {n} have none; "
            "add a time_utc column or use split_by: frame"
        )
    return t.dt.strftime("%Y-%m-%d").to_numpy()


class _ReadCheckCollate:
    """Collate of CheckedFrames items that keeps what the read check needs: the readable
    frames' indices and sky levels (no pixels), and the errors (picklable for workers)."""

    def __init__(self, input_size: int) -> None:
        self.input_size = input_size

    def __call__(self, batch: list) -> tuple[list[int], np.ndarray, list[tuple[int, str]]]:
        good = [b for b in batch if b[0] is not None]
        sky = np.zeros(0, np.float32)
        if good:
            frames = np.stack([b[0] for b in good]).astype(np.float32, copy=False)
            sky = sky_level(to_model_input(frames, self.input_size)).numpy()
        return [b[2] for b in good], sky, [(b[2], b[3]) for b in batch if b[0] is None]


def _readable_frames(
    ds: LabelledSet, num_workers: int, batch_size: int, input_size: int
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Read every frame once: the indices of the readable ones and their sky levels (in index
    order), errors rows for the rest.

    One damaged file must not stop training at some epoch, and the split is drawn from the
    frames that can be read. With ``num_workers`` the frames are read without the in-memory
    cache (each loader worker would fill, then drop, a copy of it).
    """
    probe = ds.subset(range(len(ds)), cache=False) if num_workers and ds.cache else ds
    loader = DataLoader(
        CheckedFrames(probe),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_ReadCheckCollate(input_size),
    )
    kept: list[int] = []
    skies: list[np.ndarray] = [np.zeros(0, np.float32)]
    bad: list[tuple[int, str]] = []
    for ok, sky, errs in tqdm(loader, desc="reading frames", unit="batch", leave=False):
        kept.extend(ok)
        skies.append(sky)
        bad.extend(errs)
    order = np.argsort(np.asarray(kept, dtype=np.int64), kind="stable")
    readable = np.asarray(kept, dtype=np.int64)[order]
    return readable, np.concatenate(skies)[order], unreadable_rows(ds.df, bad, "train")


def sky_level_summary(levels: np.ndarray) -> dict[str, float]:
    """A checkpoint's record of its labelled frames' sky levels: min, 1st, 50th and 99th
    percentile, max (``occurrence --min-sky model`` uses the min)."""
    q = np.percentile(np.asarray(levels, dtype=np.float64), [0, 1, 50, 99, 100])
    return {k: round(float(v), 6) for k, v in zip(("min", "p01", "p50", "p99", "max"), q)}


def _recorded_roles(out: Path, df: pd.DataFrame, root: Path) -> np.ndarray:
    """The train/val/unreadable role of every row of ``df`` in OUT/split.parquet (--resume)."""
    path = out / "split.parquet"
    try:
        split = pd.read_parquet(path)
        frames = split["frame"] if "frame" in split.columns else pd.Series(0, index=split.index)
        recorded = dict(zip(zip(split["path"], frames.astype(int)), split["split"].astype(str)))
    except Exception:  # noqa: BLE001 - missing or damaged: cannot resume the same split
        raise InputError(
            f"{path}: missing or unreadable, so the run's train/val split is unknown; "
            "train afresh (without --resume)"
        ) from None
    rel = [os.path.relpath(p, root) for p in df["path"]]
    roles = [recorded.get((r, int(f))) for r, f in zip(rel, df["frame"])]
    if any(r not in ("train", "val", "unreadable") for r in roles) or len(recorded) != len(df):
        raise InputError(
            f"{path}: does not list the frames of {root} (another labelled set); "
            "train afresh (without --resume)"
        )
    return np.asarray(roles, dtype=object)


def _data_fingerprint(df: pd.DataFrame, root: Path) -> str:
    rel = [os.path.relpath(p, root) for p in df["path"]]
    return json.dumps(sorted(zip(rel, df["label"].tolist())))


#: What ``train`` writes into OUT besides its run record (atomic writes' ``.*.part`` files are
#: cleared by OutputFolder).
_RUN_FILES = frozenset(
    {
        "config.yaml",
        "split.parquet",
        "meta.json",
        "model.safetensors",
        LAST_STATE,
        "history.json",
        "errors.parquet",
    }
)

#: Marker files of output_folder.FOLDER_MARKERS that a training run writes itself.
TRAIN_OWNS = ("model.safetensors", LAST_STATE)


def _recorded_run(out: Path) -> tuple[str, str] | None:
    """(config fingerprint, data fingerprint) of the training run in ``out``, None if unknown.

    ``config.yaml`` and ``split.parquet`` are written when a run starts, so they name the latest
    run even if it stopped before its first epoch; ``last.pt`` (what --resume reads) is the
    fallback when they are missing or unreadable.
    """
    try:
        cfg = load_train_config(out / "config.yaml")
        split = pq.read_table(out / "split.parquet", columns=["path", "label"]).to_pandas()
        data = json.dumps(sorted(zip(split["path"].tolist(), split["label"].tolist())))
        return _config_fingerprint(cfg), data
    except Exception:  # noqa: BLE001 - missing or damaged: try the training state instead
        pass
    if (out / LAST_STATE).is_file():
        try:
            saved = _load_last(out / LAST_STATE)
            return str(saved["config"]), str(saved["data"])
        except Exception:  # noqa: BLE001 - unreadable: the run is unknown
            return None
    return None


def _check_out_folder(
    out: Path, cfg: TrainConfig, data_fingerprint: str, overwrite: bool = False
) -> None:
    """Refuse (InputError) an OUT that holds anything but an earlier run of this same training.

    Allowed without --resume: an empty folder, or one holding only the files of a run with the
    same config (up to the settings --resume may change, see _RESUMABLE_CHANGES) on the same
    labelled set; that run, finished or not, is then trained afresh. Anything else (another
    variant or config, another data set, a raw archive) would be overwritten or mixed with
    model files. Another stage's output was refused before, by OutputFolder.
    """
    names = [p.name for p in out.iterdir() if p.name != RUN_RECORD]
    if not names:
        return
    foreign = sorted(n for n in names if n not in _RUN_FILES)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise InputError(
            f"--out {out} is not empty ({len(foreign)} entries not written by `train`, e.g. "
            f"{shown}); choose another --out (an empty or new folder)"
        )
    recorded = _recorded_run(out)
    if overwrite or recorded == (_config_fingerprint(cfg), data_fingerprint):
        return
    what = "with another config or labelled set" if recorded else "that cannot be identified"
    raise InputError(
        f"--out {out} is not empty: it holds a training run {what} "
        f"({', '.join(sorted(names))}); pass --resume to continue it, --overwrite to replace "
        "it, or choose another --out"
    )


def _record_progress(out: Path, epochs_done: int, epochs_planned: int, finished: bool) -> None:
    """Note in the checkpoint's meta.json how far training got (the weights stay as they are)."""
    path = out / "meta.json"
    if not path.is_file():
        return
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):  # damaged: the next better epoch writes it anew
        log.warning("%s: unreadable; training progress not recorded in it", path)
        return
    update = {"epochs_done": epochs_done, "epochs_planned": epochs_planned, "finished": finished}
    if all(meta.get(k) == v for k, v in update.items()):
        return
    meta.update(update)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")


def _train_one_epoch(
    model: torch.nn.Module,
    step_model: torch.nn.Module,
    loader: DataLoader,
    opt: torch.optim.Optimizer,
    cfg: TrainConfig,
    device: torch.device,
    aug_gen: torch.Generator,
    fill: float,
    amp: dict[str, Any] | None,
    epoch: int,
    desc: str,
) -> dict[str, float]:
    model.train()
    layer = _lsoftmax_layer(model)
    n = 0
    # Running sums stay on the device; the host reads them only for the progress bar.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    t0 = time.perf_counter()
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True)
    steps = max(1, len(loader))
    for i, (x, y) in enumerate(bar):
        lr = lr_at(cfg, epoch + (i + 1) / steps)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        # Augment on the training device: on a GPU the rotation resampling would bind the step
        # to the CPU. The random draws stay on the CPU generator (deterministic).
        x = augment_batch(x.to(device, non_blocking=True), cfg.augment, aug_gen, fill)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, **amp) if amp else contextlib.nullcontext():
            logits = step_model(x, y) if layer is not None else step_model(x)
            loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if layer is not None:
            layer.step()  # lambda decays per optimiser step (Liu et al.)
        b = y.shape[0]
        n += b
        loss_sum += loss.detach() * b
        # The margin logits make the target look worse than it is; accuracy from the argmax
        # of the blended logits is still a fair running indicator of training progress.
        correct += (logits.detach().argmax(1) == y).sum()
        if i % 5 == 0 or i == steps - 1:
            post = {"loss": f"{float(loss_sum) / n:.3f}", "acc": f"{int(correct) / n:.3f}"}
            if layer is not None:
                post["lambda"] = f"{layer.lam:.1f}"
            bar.set_postfix(post, refresh=False)
    bar.close()
    dt = time.perf_counter() - t0
    train_loss = float(loss_sum) / max(n, 1)
    if not math.isfinite(train_loss):
        raise ConfigError(
            f"training diverged in epoch {epoch + 1} (loss {train_loss}); lower lr "
            f"(now {cfg.lr}) or add warmup_epochs in the training config"
        )
    return {
        "lr": opt.param_groups[0]["lr"],
        "train_loss": train_loss,
        "train_acc": int(correct) / max(n, 1),
        "train_images_per_s": n / dt if dt > 0 else float("nan"),
    }


def _validate(
    model: torch.nn.Module, loader: DataLoader, device: torch.device, classes: Sequence[str]
) -> tuple[float, dict[str, Any]]:
    y_true, y_pred, probs = predict(model, loader, device, desc="validate")
    eps = 1e-12
    loss = float(-np.log(probs[np.arange(len(y_true)), y_true] + eps).mean()) if len(y_true) else 0
    return loss, metrics_from_predictions(y_true, y_pred, classes)


def _amp_settings(cfg: TrainConfig, device: torch.device) -> dict[str, Any] | None:
    if not cfg.amp:
        return None
    if device.type != "cuda":
        log.warning("amp: mixed precision is a GPU option; training in float32 on %s", device)
        return None
    # bfloat16 needs no loss scaling; the L-Softmax layer computes its margin in float32 anyway.
    if torch.cuda.is_bf16_supported():
        return {"dtype": torch.bfloat16}
    log.warning("amp: this GPU has no bfloat16; training in float32")
    return None


# --------------------------------------------------------------------------- data and split


@dataclass
class _Frames:
    """The labelled set of a run: every labelled frame, the readable ones and their split."""

    root: Path
    labelled: pd.DataFrame  # every frame of labels.parquet
    ds: LabelledSet  # the readable frames
    readable: np.ndarray  # their rows in ``labelled``
    unreadable: pd.DataFrame  # errors.parquet rows of the others
    train_idx: np.ndarray  # rows of ``ds``
    val_idx: np.ndarray
    sky: np.ndarray  # sky level of each frame of ``ds`` (models.sky_level)

    def split_table(self) -> pd.DataFrame:
        """split.parquet: every labelled frame (the unreadable ones too) and its role."""
        role = np.full(len(self.labelled), "unreadable", dtype=object)
        role[self.readable[self.train_idx]] = "train"
        role[self.readable[self.val_idx]] = "val"
        return pd.DataFrame(
            {
                "path": [os.path.relpath(p, self.root) for p in self.labelled["path"]],
                "frame": self.labelled["frame"].to_numpy(dtype=np.int64),
                "label": self.labelled["label"].to_numpy(),
                "split": role,
            }
        )


def _load_training_set(data: Path, classes: Sequence[str]) -> pd.DataFrame:
    """DATA's labelled frames; fewer than two classes is an InputError."""
    df = load_labelled(data, classes=classes)
    present = set(df["label"])
    if len(present) < 2:
        raise InputError(
            f"{data}/labels.parquet: training needs at least two classes, got {present}"
        )
    return df


def _check_run(
    out: Path,
    cfg: TrainConfig,
    df: pd.DataFrame,
    data: Path,
    fingerprint: str,
    resume: bool,
    overwrite: bool,
) -> tuple[dict[str, Any] | None, np.ndarray | None]:
    """(saved training state, recorded split roles) for --resume, else (None, None) once OUT
    is found to hold nothing but this same run. Checked before the frames are read: a wrong
    --out fails in seconds, not minutes."""
    if not resume:
        _check_out_folder(out, cfg, fingerprint, overwrite)
        return None, None
    last_path = out / LAST_STATE
    if not last_path.is_file():
        raise InputError(f"{last_path}: nothing to resume; train without --resume first")
    saved = _load_last(last_path)
    if saved["config"] != _config_fingerprint(cfg):
        raise ConfigError(
            f"{last_path}: was written with another training config; resume with the "
            f"config in {out / 'config.yaml'} or train into another --out"
        )
    if saved["data"] != fingerprint:
        raise InputError(f"{last_path}: was trained on another labelled set than {data}")
    # The run's own split: drawn again, it would move frames between train and val
    # whenever a file has become readable or unreadable since.
    return saved, _recorded_roles(out, df, data)


def _readable_set(
    cfg: TrainConfig, data: Path, ds: LabelledSet, classes: Sequence[str], out: Path
) -> tuple[LabelledSet, np.ndarray, np.ndarray, pd.DataFrame]:
    """(the set of readable frames, their rows, their sky levels, errors rows of the others),
    with warnings."""
    readable, sky, unreadable = _readable_frames(
        ds, cfg.num_workers, cfg.val_batch_size, cfg.input_size
    )
    if len(readable) == 0:
        raise InputError(
            f"{data}: none of its {len(ds)} frames could be read (first: "
            f"{unreadable['message'].iloc[0]}); check --station and the files"
        )
    n_labelled = len(ds)
    if len(unreadable):
        ds = ds.subset(readable)
    present = set(ds.df["label"])
    if len(present) < 2:
        raise InputError(
            f"{data}: training needs at least two classes among its readable frames, got {present}"
        )
    if len(unreadable):
        log.warning(
            "%d of %d frames could not be read and are left out of training (%s); "
            "they are listed in %s",
            len(unreadable),
            n_labelled,
            unreadable["message"].iloc[0],
            out / "errors.parquet",
        )
    absent = [c for c in classes if c not in present]
    if absent:
        log.warning(
            "%s: no readable frame of class(es) %s: the model will learn nothing of them and "
            "never predict them",
            data,
            ", ".join(absent),
        )
    return ds, readable, sky, unreadable


def _split_indices(
    cfg: TrainConfig,
    data: Path,
    labels: np.ndarray,
    groups: np.ndarray | None,
    recorded: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) rows of the readable frames: the recorded split of a resumed run (whose
    ``recorded`` roles are those of the readable frames), else one drawn by the config."""
    if recorded is not None:
        back = int((recorded == "unreadable").sum())
        if back:
            log.warning(
                "%d frames that were unreadable when this run started can be read now; they "
                "stay out of it (train afresh to use them)",
                back,
            )
        train_idx, val_idx = np.flatnonzero(recorded == "train"), np.flatnonzero(recorded == "val")
    else:
        train_idx, val_idx = split_for_config(cfg, labels, groups)
    if (len(val_idx) == 0 and cfg.val_fraction > 0) or len(train_idx) == 0:
        raise InputError(
            f"{data}: too few frames{'' if cfg.split_by == 'frame' else ' or groups'} for a "
            f"validation split of {cfg.val_fraction}"
        )
    one_sided = sorted(set(labels) - (set(labels[val_idx]) & set(labels[train_idx])))
    if one_sided and len(val_idx):
        log.warning(
            "%s: class(es) %s only on one side of the train/val split (%d train, %d val "
            "frames); the validation accuracy says nothing about them",
            data,
            ", ".join(one_sided),
            len(train_idx),
            len(val_idx),
        )
    return train_idx, val_idx


def _frames_of_run(
    cfg: TrainConfig,
    data: Path,
    df: pd.DataFrame,
    station: str | os.PathLike | None,
    recorded: np.ndarray | None,
    classes: Sequence[str],
    out: Path,
) -> _Frames:
    """Read DATA's frames once and split the readable ones (as recorded, when resuming)."""
    groups = _split_groups(cfg, df, data)
    # Station: --station, else the set's own calib/station.yaml, else the config's, else yrs.
    stn = resolve_station(station, data, cfg.station)
    ds = LabelledSet(df, stn, dark_dir=find_dark_dir(data), cache=cfg.cache_frames)
    ds, readable, sky, unreadable = _readable_set(cfg, data, ds, classes, out)
    train_idx, val_idx = _split_indices(
        cfg,
        data,
        ds.df["label"].to_numpy(),
        None if groups is None else groups[readable],
        None if recorded is None else recorded[readable],
    )
    return _Frames(data, df, ds, readable, unreadable, train_idx, val_idx, sky)


def _clear_run(out: Path) -> None:
    """Remove the files of the training run in OUT (--overwrite, once the new run can start)."""
    for name in _RUN_FILES:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _write_run_files(out: Path, cfg: TrainConfig, frames: _Frames) -> None:
    """config.yaml, split.parquet and errors.parquet (train's own: rewritten whole)."""
    dump_yaml(cfg, out / "config.yaml")
    write_table(frames.split_table(), out / "split.parquet")
    if len(frames.unreadable):
        write_table(frames.unreadable, out / "errors.parquet", ERRORS_SCHEMA)
    else:
        (out / "errors.parquet").unlink(missing_ok=True)


def _loaders(
    cfg: TrainConfig, frames: _Frames, dev: torch.device, generator: torch.Generator
) -> tuple[DataLoader, DataLoader]:
    """(training loader, validation loader) of the split."""
    collate = ToModelInput(cfg.input_size)
    train_ds = Subset(frames.ds, frames.train_idx.tolist())
    val_ds = Subset(frames.ds, frames.val_idx.tolist())
    labels = frames.ds.df["label"].to_numpy()[frames.train_idx]
    sampler = balanced_sampler(labels, generator, cfg.balance)
    train_loader = DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=cfg.num_workers,
        collate_fn=collate,
        # BatchNorm cannot train on a last batch of one frame.
        drop_last=len(train_ds) % cfg.batch_size == 1,
        pin_memory=dev.type == "cuda",
        persistent_workers=cfg.num_workers > 0,
    )
    val_loader = DataLoader(
        val_ds,
        batch_size=cfg.val_batch_size,
        shuffle=False,
        num_workers=cfg.num_workers,
        collate_fn=collate,
    )
    return train_loader, val_loader


# --------------------------------------------------------------------------- state and fit


def _initial_model(
    cfg: TrainConfig,
    classes: Sequence[str],
    init_from: str | os.PathLike | None,
    init_weights: str | os.PathLike | None,
    resuming: bool,
    out: Path,
) -> torch.nn.Module:
    """The model of ``cfg``, seeded, started from ``init_from``/``init_weights`` or as from
    scratch (a resumed run's weights are loaded later over it)."""
    torch.manual_seed(cfg.seed)
    model = build_for_config(cfg, classes)
    if init_from is not None and not resuming:
        if cfg.scratch_init == "kaiming":
            kaiming_reinit(model)  # parts the checkpoint lacks (a new head) start as from scratch
        parts = init_from_checkpoint(model, init_from)
        log.info("%s: initialised %s from %s", out, ", ".join(parts), init_from)
    elif init_weights is not None:
        load_init_weights(model, init_weights)
    elif cfg.scratch_init == "kaiming":
        kaiming_reinit(model)
    return model


class _Trainer:
    """Model, optimiser, random generators and progress of one run; fits and saves it."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: torch.nn.Module,
        dev: torch.device,
        out: Path,
        classes: Sequence[str],
        provenance: dict[str, Any],
    ) -> None:
        self.cfg, self.dev, self.out, self.classes = cfg, dev, out, tuple(classes)
        self.provenance = provenance  # the checkpoint meta.json's part that every epoch shares
        self.model = model.to(dev)
        self.opt = torch.optim.SGD(
            param_groups(model, cfg.stn_lr_scale),
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )
        self.loader_gen = torch.Generator().manual_seed(cfg.seed)
        self.aug_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.st = _RunState()
        self.step_model: torch.nn.Module = model
        if cfg.compile:
            if dev.type == "cuda":
                self.step_model = torch.compile(model)  # type: ignore[assignment]
            else:
                log.warning("compile: torch.compile is a GPU option here; running eagerly on CPU")
        self.amp = _amp_settings(cfg, dev)
        self.fill = model_input_fill(cfg.input_size)

    def restore(self, saved: dict[str, Any]) -> None:
        """Continue from the training state of last.pt."""
        self.model.load_state_dict(saved["model"])
        self.opt.load_state_dict(saved["optimizer"])
        self.st = _RunState(
            epoch=int(saved["epoch"]),
            best_acc=float(saved["best_acc"]),
            best_epoch=int(saved["best_epoch"]),
            bad_epochs=int(saved["bad_epochs"]),
            stopped=bool(saved["stopped"]),
            history=json.loads(saved["history"]),
        )
        torch.set_rng_state(saved["torch_rng"])
        self.loader_gen.set_state(saved["loader_rng"])
        self.aug_gen.set_state(saved["aug_rng"])
        log.info("resuming %s after epoch %d", self.out, self.st.epoch)

    @property
    def done(self) -> bool:
        """Whether the run has stopped early or run every planned epoch."""
        return self.st.stopped or self.st.epoch >= self.cfg.epochs

    def fit(self, train_loader: DataLoader, val_loader: DataLoader, fingerprint: str) -> None:
        """Run the remaining epochs: the best checkpoint, last.pt and history.json after each."""
        cfg, st = self.cfg, self.st
        with_val = len(val_loader.dataset) > 0  # type: ignore[arg-type]
        for epoch in range(st.epoch, cfg.epochs):
            if st.stopped:
                break
            row, val = self._epoch(epoch, train_loader, val_loader)
            st.history.append(row)
            st.epoch = epoch + 1
            # Without validation frames every epoch is the best so far: the last one is kept.
            score = val[cfg.select_on] if with_val else float(st.epoch)
            if score > st.best_acc:
                st.best_acc, st.best_epoch, st.bad_epochs = score, st.epoch, 0
                self._save_best(val, row["val_loss"])
            else:
                st.bad_epochs += 1
                if cfg.patience and st.bad_epochs >= cfg.patience:
                    st.stopped = True
                    log.info("early stop after epoch %d (best %d)", st.epoch, st.best_epoch)
            self._save_last(fingerprint)
            _record_progress(self.out, st.epoch, cfg.epochs, self.done)
            with atomic_path(self.out / "history.json") as tmp:
                tmp.write_text(json.dumps(st.history, indent=1) + "\n")

    def _epoch(
        self, epoch: int, train_loader: DataLoader, val_loader: DataLoader
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """Train one epoch and validate: the history row and the validation metrics."""
        cfg = self.cfg
        row: dict[str, float] = {"epoch": epoch + 1}
        t_epoch = time.perf_counter()
        row.update(
            _train_one_epoch(
                self.model,
                self.step_model,
                train_loader,
                self.opt,
                cfg,
                self.dev,
                self.aug_gen,
                self.fill,
                self.amp,
                epoch,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
            )
        )
        val_loss, val = _validate(self.model, val_loader, self.dev, self.classes)
        row.update({"val_loss": val_loss, "val_acc": val["average_accuracy"]})
        row["val_mean_class_acc"] = val["mean_class_accuracy"]
        row["epoch_s"] = time.perf_counter() - t_epoch
        lam = _current_lambda(self.model)
        if lam is not None:
            row["lambda"] = lam
        msg = (
            f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.3f} "
            f"train acc {row['train_acc']:.3f} val acc {row['val_acc']:.3f} "
            f"(mean per-class {row['val_mean_class_acc']:.3f})"
        )
        log.info(msg + (f" lambda {lam:.1f}" if lam is not None else ""))
        return row, val

    def _save_best(self, val: dict[str, Any], val_loss: float) -> None:
        """The checkpoint of this epoch (model.safetensors + meta.json)."""
        metrics = {k: v for k, v in metrics_to_json(val).items() if k != "confusion_normalised"}
        metrics.update({"epoch": self.st.epoch, "val_loss": val_loss, "split": "val"})
        meta = {
            **self.provenance,
            "metrics": metrics,
            # How far training got (evaluate and classify-archive warn if unfinished);
            # updated after every epoch by _record_progress.
            "epochs_done": self.st.epoch,
            "epochs_planned": self.cfg.epochs,
            "finished": self.st.epoch >= self.cfg.epochs,
        }
        save_checkpoint(self.out, self.model, meta)

    def _save_last(self, data_fingerprint: str) -> None:
        """last.pt: tensors, numbers and strings only, so it loads with weights_only=True."""
        st = self.st
        state = {
            "format": "aurora-train-state-1",
            "config": _config_fingerprint(self.cfg),
            "data": data_fingerprint,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "epoch": st.epoch,
            "best_acc": st.best_acc,
            "best_epoch": st.best_epoch,
            "bad_epochs": st.bad_epochs,
            "stopped": st.stopped,
            "history": json.dumps(st.history),
            "torch_rng": torch.get_rng_state(),
            "loader_rng": self.loader_gen.get_state(),
            "aug_rng": self.aug_gen.get_state(),
        }
        with atomic_path(self.out / LAST_STATE) as tmp:
            torch.save(state, tmp)


# --------------------------------------------------------------------------- train


def train(
    cfg: TrainConfig,
    data: str | os.PathLike,
    out: str | os.PathLike,
    resume: bool = False,
    init_weights: str | os.PathLike | None = None,
    device: str = "auto",
    station: str | os.PathLike | None = None,
    config_source: str | None = None,
    classes: Sequence[str] = CLASSES,
    overwrite: bool = False,
    init_from: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` on the labelled set DATA; best checkpoint + config.yaml + last.pt in OUT.

    OUT is written in place and resumable: its ``_run.json`` says unfinished from the start of
    the run and finished after the last epoch. ``overwrite``: replace another training run in
    OUT (other files there are still refused). ``init_from``: start from the weights of
    another checkpoint of this project (a pretrain or a model trained on other frames);
    ``init_weights``: from a torchvision ImageNet file.
    """
    data = Path(data).resolve()
    init = {
        "init_weights": None if init_weights is None else str(init_weights),
        "init_from": None if init_from is None else str(Path(init_from).resolve()),
    }
    record = {"variant": cfg.variant, "data": str(data), "config": config_source, **init}
    with OutputFolder(out, "train", record, owns=TRAIN_OWNS) as folder:
        out = folder.path
        dev = resolve_device(device)
        df = _load_training_set(data, classes)
        fingerprint = _data_fingerprint(df, data)
        saved, recorded = _check_run(out, cfg, df, data, fingerprint, resume, overwrite)
        frames = _frames_of_run(cfg, data, df, station, recorded, classes, out)
        if overwrite and not resume:
            _clear_run(out)  # only now that the new run can start
        folder.begin(epochs=cfg.epochs)
        model = _initial_model(cfg, classes, init_from, init_weights, saved is not None, out)
        provenance = {
            "variant": cfg.variant,
            "classes": list(classes),
            "input_size": cfg.input_size,
            "in_chans": 1,
            "preprocess": frames.ds.pre.describe,
            "train_config": to_dict(cfg),
            "train_config_source": config_source,
            **init,
            "data": str(data),
            # How bright the frames it learnt from were: occurrence --min-sky model leaves out
            # archive frames darker than all of them (the model never saw such a sky).
            "sky_level": sky_level_summary(frames.sky[frames.train_idx]),
        }
        trainer = _Trainer(cfg, model, dev, out, classes, provenance)
        if saved is not None:
            trainer.restore(saved)
        elif (out / LAST_STATE).exists():
            log.warning(
                "%s holds an earlier run; starting afresh (use --resume to continue it)", out
            )
        _write_run_files(out, cfg, frames)
        result = _fit_run(trainer, frames, resume, fingerprint)
        result["device"] = str(dev)
        folder.finish(epochs=cfg.epochs, **_record_of(result))
    return result


def _fit_run(trainer: _Trainer, frames: _Frames, resume: bool, fingerprint: str) -> dict[str, Any]:
    """Fit the remaining epochs of the run; the summary ``train`` returns."""
    cfg, st, out = trainer.cfg, trainer.st, trainer.out
    resumed_at = st.epoch if resume else None
    if trainer.done:
        log.info("%s: training already finished (epoch %d); nothing to do", out, st.epoch)
        if resume:
            _record_progress(out, st.epoch, cfg.epochs, finished=True)
    elif resume:
        # More epochs than before: the checkpoint is unfinished again until they are run.
        _record_progress(out, st.epoch, cfg.epochs, finished=False)
    trainer.fit(*_loaders(cfg, frames, trainer.dev, trainer.loader_gen), fingerprint)
    with_val = len(frames.val_idx) > 0
    return {
        "out": str(out),
        "resumed_at_epoch": resumed_at,
        "epochs_run": st.epoch,
        "best_epoch": st.best_epoch,
        "best_val_accuracy": st.best_acc if with_val else math.nan,
        "selected_on": cfg.select_on if with_val else "last epoch (no validation)",
        "early_stopped": st.stopped,
        "history": st.history,
        "n_train": int(len(frames.train_idx)),
        "n_val": int(len(frames.val_idx)),
    }


def _record_of(result: dict[str, Any]) -> dict[str, Any]:
    """The summary numbers of a run for its _run.json (no history; NaN as null)."""
    keys = ("epochs_run", "best_epoch", "best_val_accuracy", "early_stopped", "n_train", "n_val")
    return {k: None if result[k] != result[k] else result[k] for k in keys}
