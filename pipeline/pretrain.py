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

from pipeline.classes import CLASSES
from pipeline.config import dump_yaml, load_config, to_dict
from pipeline.errors import ConfigError, FrameReadError, InputError
from pipeline.storage import (
    ERRORS_SCHEMA,
    atomic_path,
    claim_run_record,
    finish_run_record,
    refuse_foreign_out,
    write_table,
)
from pipeline.train import AugmentConfig, augment_batch, kaiming_reinit, model_input_fill

log = logging.getLogger(__name__)

RUN_FILE = "pretrain.json"
STATE_FILE = "pretrain_last.pt"


@dataclass(frozen=True)
class PretrainConfig:
    """A SimCLR run: backbone variant, input size, schedule, temperature and augmentation."""

    variant: str = "alexnet"
    input_size: int = 96
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.05
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
        from pipeline.models import VARIANTS

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
    return nn.Sequential(nn.Linear(in_dim, 512), nn.ReLU(inplace=True), nn.Linear(512, out_dim))


# --------------------------------------------------------------------------- data


def _frames_of(source: Path, station: Any) -> tuple[pd.DataFrame, Any]:
    """(path, frame, time_utc) rows and a dark folder of a labelled set, archive or manifest."""
    from pipeline.archive import load_manifest
    from pipeline.labelled import load_labelled
    from pipeline.preprocess import find_dark_dir

    if source.is_dir() and (source / "labels.parquet").is_file():
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
    from tqdm.auto import tqdm

    from pipeline.labelled import FramePreprocessor
    from pipeline.models import to_model_input

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
    from pipeline.models.build import INPUT_MEAN, INPUT_STD

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
    """SimCLR on the frames of ``sources``; OUT becomes a checkpoint (resumed if interrupted)."""
    from tqdm.auto import tqdm

    from pipeline.checkpoint import save_checkpoint
    from pipeline.config import resolve_station
    from pipeline.devices import resolve_device
    from pipeline.models import build_model

    out = Path(out)
    refuse_foreign_out(out, (RUN_FILE, "model.safetensors"), "pretrain")
    record = {"config": to_dict(cfg), "sources": [str(Path(s).resolve()) for s in sources]}
    claim_run_record(out, RUN_FILE, record, "a pre-training with another config or other frames")
    dev = resolve_device(device)
    st = resolve_station(station, Path(sources[0]), cfg.station)
    x8, errors = load_frames(sources, cfg, st)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.variant, input_size=cfg.input_size, stn_loc_size=cfg.stn_loc_size)
    kaiming_reinit(model)
    head = projection_head(model.feature_dim, cfg.proj_dim)
    model.to(dev), head.to(dev)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = _resume(out / STATE_FILE, model, head, opt, gen)
    fill = model_input_fill(cfg.input_size)
    steps = max(1, len(x8) // cfg.batch_size)
    history = []
    for epoch in range(start, cfg.epochs):
        model.train(), head.train()
        order = torch.randperm(len(x8), generator=gen)
        total, t0 = 0.0, time.perf_counter()
        for i in tqdm(range(steps), desc=f"pretrain {epoch + 1}/{cfg.epochs}", leave=False):
            lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * (epoch * steps + i) / (cfg.epochs * steps)))
            for g in opt.param_groups:
                g["lr"] = lr
            x = _as_input(x8[order[i * cfg.batch_size : (i + 1) * cfg.batch_size]])
            v1 = augment_batch(x, cfg.augment, gen, fill).to(dev)
            v2 = augment_batch(x, cfg.augment, gen, fill).to(dev)
            loss = nt_xent(head(model.features(v1)), head(model.features(v2)), cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        if not math.isfinite(total):
            raise ConfigError(f"pre-training diverged in epoch {epoch + 1}; lower lr ({cfg.lr})")
        history.append({"epoch": epoch + 1, "loss": total / steps, "s": time.perf_counter() - t0})
        log.info("pretrain epoch %d/%d: loss %.3f", epoch + 1, cfg.epochs, total / steps)
        with atomic_path(out / STATE_FILE) as tmp:
            torch.save(_state(model, head, opt, epoch + 1, gen), tmp)
    meta = {
        "classes": list(CLASSES),
        "finished": True,
        "pretrain": {**record, "frames": len(x8), "unreadable": len(errors), "method": "simclr"},
        "train_config": to_dict(cfg),
    }
    save_checkpoint(out, model.cpu(), meta)
    dump_yaml(cfg, out / "config.yaml")
    if len(errors):
        write_table(errors, out / "errors.parquet", ERRORS_SCHEMA)
    finish_run_record(out, RUN_FILE, record, history=history)
    (out / STATE_FILE).unlink(missing_ok=True)
    return {"frames": len(x8), "unreadable": len(errors), "epochs": cfg.epochs, "out": str(out)}


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
