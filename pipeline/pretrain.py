"""Self-supervised pre-training (SimCLR) on unlabelled frames, saved as a checkpoint of this
project that ``train --init-from`` and ``cv --init-from`` start from.

Two augmented views of every frame are pulled together and pushed away from the other frames
of the batch (NT-Xent loss, Chen et al. 2020) through a small projection head that is dropped
afterwards. Nothing is downloaded: the frames are the user's (an archive, a manifest or
labelled sets whose labels are ignored).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pipeline.archive import load_manifest
from pipeline.checkpoint import save_checkpoint
from pipeline.classes import CLASSES
from pipeline.config import dump_yaml, load_config, resolve_station, to_dict
from pipeline.devices import resolve_device
from pipeline.errors import ConfigError, FrameReadError, InputError
from pipeline.labelled import FramePreprocessor, load_labelled
from pipeline.labels import LABELS_NAME
from pipeline.models import VARIANTS, build_model, to_model_input
from pipeline.models.build import INPUT_MEAN, INPUT_STD
from pipeline.output_folder import OutputFolder
from pipeline.preprocess import find_dark_dir
from pipeline.storage import ERRORS_SCHEMA, atomic_path, write_table
from pipeline.train import AugmentConfig, augment_batch, kaiming_reinit, model_input_fill

log = logging.getLogger(__name__)

STATE_FILE = "pretrain_last.pt"
#: epochs after which a loss still at chance stops the run (it does not recover later).
CHANCE_EPOCHS = 3


@dataclass(frozen=True)
class PretrainConfig:
    """A SimCLR run: backbone variant, input size, schedule, temperature and augmentation."""

    variant: str = "alexnet"
    input_size: int = 96
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.005
    weight_decay: float = 1e-4
    temperature: float = 0.2
    proj_dim: int = 128
    seed: int = 0
    #: at most this many frames (a seeded draw), so a large archive costs a bounded time.
    max_frames: int = 20000
    station: str | None = None
    stn_loc_size: int = 48
    augment: AugmentConfig = field(
        default_factory=lambda: AugmentConfig(
            flip=True,
            flip_vertical=True,
            rotate_degrees=20,
            scale_jitter=0.3,
            gain=0.6,
            gamma=0.4,
            glow=0.08,
            noise=0.03,
            blur=0.3,
        )  # fmt: skip
    )

    def validate(self) -> None:
        if self.variant not in VARIANTS or "lsoftmax" in self.variant or "stn" in self.variant:
            plain = [v for v in VARIANTS if "lsoftmax" not in v and "stn" not in v]
            raise ValueError(
                f"variant {self.variant!r}: pre-train a plain backbone ({', '.join(plain)}); "
                "its weights start the STN and L-Softmax variants of the same backbone"
            )
        checks = [
            (self.input_size >= 64, "input_size must be >= 64"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 4, "batch_size must be >= 4 (negatives come from the batch)"),
            (self.lr > 0, "lr must be > 0"),
            (self.temperature > 0, "temperature must be > 0"),
            (self.max_frames >= 8, "max_frames must be >= 8"),
            (self.seed >= 0, "seed must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        self.augment.validate()


def load_pretrain_config(path: str | os.PathLike) -> PretrainConfig:
    """Load configs/pretrain/<name>.yaml (errors name the file, key and allowed values)."""
    return load_config(PretrainConfig, path)


# --------------------------------------------------------------------------- pure pieces


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss for two (B, D) batches of projections of the same B frames."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    n = z1.shape[0]
    sim.fill_diagonal_(float("-inf"))  # a view is not its own positive
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def projection_head(in_dim: int, out_dim: int) -> nn.Module:
    """The MLP between the backbone feature and the contrastive space (dropped after training)."""
    # Batch norm as in SimCLR's head: FC7 is all ReLU outputs with a large part common to every
    # frame, and without centring it every pair of frames looks alike (the loss stays at chance).
    return nn.Sequential(
        nn.Linear(in_dim, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Linear(512, out_dim)
    )


def stuck_at_chance(loss: float, batch_size: int) -> bool:
    """True when an epoch's mean NT-Xent loss is still at chance, ln(2B - 1): nothing learnt."""
    return loss >= 0.99 * math.log(2 * batch_size - 1)


# --------------------------------------------------------------------------- data


def _frames_of(source: Path, station: Any) -> tuple[pd.DataFrame, Any]:
    """(path, frame, time_utc) rows and a dark folder of a labelled set, archive or manifest."""
    if source.is_dir() and (source / LABELS_NAME).is_file():
        df = load_labelled(source)
        return df[["path", "frame", "time_utc"]], find_dark_dir(source)
    df = load_manifest(source, station)
    root = Path(df.attrs.get("root", source))
    out = df[["abspath", "frame", "time_utc"]].rename(columns={"abspath": "path"})
    return out, find_dark_dir(root)


def load_frames(
    sources: Sequence[str | os.PathLike], cfg: PretrainConfig, station: Any
) -> tuple[torch.Tensor, pd.DataFrame]:
    """Every readable frame of ``sources`` at the input size, uint8 (N, 1, S, S); errors rows."""
    parts = []
    for src in sources:
        df, dark_dir = _frames_of(Path(src), station)
        parts.append(df.assign(dark=str(dark_dir) if dark_dir else ""))
    rows = pd.concat(parts, ignore_index=True)
    if len(rows) > cfg.max_frames:
        pick = np.sort(np.random.default_rng(cfg.seed).choice(len(rows), cfg.max_frames, False))
        rows = rows.iloc[pick].reset_index(drop=True)
    readers: dict[str, FramePreprocessor] = {}
    frames, errors = [], []
    for r in tqdm(rows.itertuples(index=False), total=len(rows), desc="reading", unit="frame"):
        pre = readers.setdefault(r.dark, FramePreprocessor(station, r.dark or None))
        try:
            img = pre(r.path, int(r.frame), r.time_utc)
        except FrameReadError as exc:
            errors.append((r.path, int(r.frame), "pretrain", type(exc).__name__, str(exc)))
            continue
        x = to_model_input(img[None], cfg.input_size)  # the transform inference uses
        frames.append(((x * 0.25 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8))
    if not frames:
        raise InputError(f"{', '.join(map(str, sources))}: no readable frame to pre-train on")
    return torch.cat(frames), pd.DataFrame(errors, columns=ERRORS_SCHEMA.names)


# --------------------------------------------------------------------------- driver


def _as_input(x8: torch.Tensor) -> torch.Tensor:
    return (x8.float() / 255 - INPUT_MEAN) / INPUT_STD


def _state(model: nn.Module, head: nn.Module, opt: Any, epoch: int, gen: torch.Generator) -> dict:
    return {
        "model": model.state_dict(),
        "head": head.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": torch.tensor(epoch),
        "rng": gen.get_state(),
    }


def pretrain(
    cfg: PretrainConfig,
    sources: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    device: str = "auto",
    station: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """SimCLR on the frames of ``sources``; OUT becomes a checkpoint (resumed if interrupted).

    OUT is written in place: its ``_run.json`` holds the config and the sources, unfinished
    until the checkpoint is saved; an interrupted run of the same record resumes from
    ``pretrain_last.pt``.
    """
    record = {"config": to_dict(cfg), "sources": [str(Path(s).resolve()) for s in sources]}
    with OutputFolder(out, "pretrain", record, owns=("model.safetensors",)) as folder:
        out = folder.path
        if folder.previous() is not None and not folder.same_settings():
            raise InputError(
                f"{out}: holds a pre-training with another config or other frames; "
                "choose another --out"
            )
        folder.begin()
        dev = resolve_device(device)
        st = resolve_station(station, Path(sources[0]), cfg.station)
        x8, errors = load_frames(sources, cfg, st)
        run = _Pretraining(cfg, dev)
        start = _resume(out / STATE_FILE, run.model, run.head, run.opt, run.gen)
        history = []
        for epoch in range(start, cfg.epochs):
            history.append(run.epoch(x8, epoch))
            if epoch >= CHANCE_EPOCHS - 1 and stuck_at_chance(history[-1]["loss"], cfg.batch_size):
                raise ConfigError(
                    f"{out}: pre-training learnt nothing in {epoch + 1} epochs (loss "
                    f"{history[-1]['loss']:.3f}, chance ln(2B-1) = "
                    f"{math.log(2 * cfg.batch_size - 1):.3f}); lower lr ({cfg.lr}) and rerun "
                    "into a new --out"
                )
            with atomic_path(out / STATE_FILE) as tmp:
                torch.save(_state(run.model, run.head, run.opt, epoch + 1, run.gen), tmp)
        meta = {
            "classes": list(CLASSES),
            "finished": True,
            "pretrain": {
                **record,
                "frames": len(x8),
                "unreadable": len(errors),
                "method": "simclr",
            },
            "train_config": to_dict(cfg),
        }
        save_checkpoint(out, run.model.cpu(), meta)
        dump_yaml(cfg, out / "config.yaml")
        if len(errors):
            write_table(errors, out / "errors.parquet", ERRORS_SCHEMA)
        folder.finish(history=history)
        (out / STATE_FILE).unlink(missing_ok=True)
    return {"frames": len(x8), "unreadable": len(errors), "epochs": cfg.epochs, "out": str(out)}


class _Pretraining:
    """The backbone, its projection head, the optimiser and the random generator of a run."""

    def __init__(self, cfg: PretrainConfig, dev: torch.device) -> None:
        self.cfg, self.dev = cfg, dev
        torch.manual_seed(cfg.seed)
        self.model = build_model(
            cfg.variant, input_size=cfg.input_size, stn_loc_size=cfg.stn_loc_size
        )
        kaiming_reinit(self.model)
        self.head = projection_head(self.model.feature_dim, cfg.proj_dim)
        self.model.to(dev), self.head.to(dev)
        params = list(self.model.parameters()) + list(self.head.parameters())
        self.opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.fill = model_input_fill(cfg.input_size)

    def epoch(self, x8: torch.Tensor, epoch: int) -> dict[str, float]:
        """One epoch over the frames ``x8`` (cosine learning rate per step); its history row."""
        cfg = self.cfg
        steps = max(1, len(x8) // cfg.batch_size)
        self.model.train(), self.head.train()
        # No dropout: two views with independent FC6/FC7 masks differ more than the augmentations
        # make them, and SimCLR's backbones have none.
        for m in self.model.modules():
            if isinstance(m, nn.Dropout):
                m.eval()
        order = torch.randperm(len(x8), generator=self.gen)
        total, t0 = 0.0, time.perf_counter()
        for i in tqdm(range(steps), desc=f"pretrain {epoch + 1}/{cfg.epochs}", leave=False):
            lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * (epoch * steps + i) / (cfg.epochs * steps)))
            for g in self.opt.param_groups:
                g["lr"] = lr
            x = _as_input(x8[order[i * cfg.batch_size : (i + 1) * cfg.batch_size]])
            v1 = augment_batch(x, cfg.augment, self.gen, self.fill).to(self.dev)
            v2 = augment_batch(x, cfg.augment, self.gen, self.fill).to(self.dev)
            z1, z2 = self.head(self.model.features(v1)), self.head(self.model.features(v2))
            loss = nt_xent(z1, z2, cfg.temperature)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += float(loss.detach())
        if not math.isfinite(total):
            raise ConfigError(f"pre-training diverged in epoch {epoch + 1}; lower lr ({cfg.lr})")
        log.info("pretrain epoch %d/%d: loss %.3f", epoch + 1, cfg.epochs, total / steps)
        return {"epoch": epoch + 1, "loss": total / steps, "s": time.perf_counter() - t0}


def _resume(path: Path, model: nn.Module, head: nn.Module, opt: Any, gen: Any) -> int:
    """The epoch to start from: 0, or where an interrupted run of the same record stopped."""
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    head.load_state_dict(state["head"])
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["rng"])
    log.info("%s: resuming pre-training after epoch %d", path.parent, int(state["epoch"]))
    return int(state["epoch"])
