"""The variant registry, ``build_model`` and ``to_model_input`` (the one input transform).

A model is ``[STN] -> trunk -> pool -> neck (FC6, FC7) -> head (FC8: Linear or L-Softmax)``;
``model.features(x)`` is the neck's output (FC7 after its ReLU, 4096-d for AlexNet/VGG16; the
512-d pooled vector for ResNet-18, 1536-d for Inception-v4; ``model.feature_dim`` says which) and
``model(x, target=None)`` the FC8 logits.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import CheckpointError, ConfigError, InputError
from pipeline.models.backbones import BACKBONES, Backbone
from pipeline.models.lsoftmax import DEFAULT_SCHEDULE, LambdaSchedule, LSoftmaxLinear
from pipeline.models.radial import RadialEdges
from pipeline.models.stn import SpatialTransformer
from pipeline.models.weights import read_state_dict

#: variant -> (backbone, with STN, with L-Softmax): the paper's ablation and its baselines.
_REGISTRY: dict[str, tuple[str, bool, bool]] = {
    "alexnet": ("alexnet", False, False),
    "stn-alexnet": ("alexnet", True, False),
    "lsoftmax-alexnet": ("alexnet", False, True),
    "stn-lsoftmax-alexnet": ("alexnet", True, True),
    "vgg16": ("vgg16", False, False),
    "inception-v4": ("inception-v4", False, False),
    "resnet18": ("resnet18", False, False),
}

#: Every variant ``build_model`` knows, in the order of the paper's tables.
VARIANTS: tuple[str, ...] = tuple(_REGISTRY)

#: Smallest input side every backbone handles (AlexNet's trunk reaches 1x1 there).
MIN_INPUT_SIZE = 64

#: Input normalisation after resizing: (x - INPUT_MEAN) / INPUT_STD for x in [0, 1].  Preprocessed
#: frames are stretched to [0, 1] with most pixels dark, so a fixed 0.5/0.25 centres them roughly
#: and keeps values O(1); being fixed (not data statistics) it needs no fitting and never drifts.
INPUT_MEAN = 0.5
INPUT_STD = 0.25
#: The model-input value of a black (masked) pixel: padding for the STN and augmentation.
INPUT_BLACK = (0.0 - INPUT_MEAN) / INPUT_STD


def model_input_params(input_size: int) -> dict[str, Any]:
    """What :func:`to_model_input` does, for a checkpoint's ``meta.json``."""
    return {
        "input_size": int(input_size),
        "resize": "bilinear",
        "antialias": False,
        "align_corners": False,
        "mean": INPUT_MEAN,
        "std": INPUT_STD,
    }


def to_model_input(
    batch: np.ndarray | torch.Tensor, input_size: int, in_chans: int = 1
) -> torch.Tensor:
    """(B, H, W) frames in [0, 1] (float, or uint8/uint16 scaled by their maximum) -> (B, C, S, S).

    Resizes bilinearly (no antialias) to ``input_size`` and normalises with INPUT_MEAN/INPUT_STD.
    The one place this transform lives: train, evaluate, classify and retrieval all call it.
    """
    if isinstance(batch, np.ndarray):
        if batch.dtype.kind in "ui":
            scale = float(np.iinfo(batch.dtype).max)
            batch = batch.astype(np.float32) / scale
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
    elif isinstance(batch, torch.Tensor):
        x = batch
        if not x.is_floating_point():
            scale = float(torch.iinfo(x.dtype).max)
            x = x.float() / scale
        x = x.float()
    else:
        raise InputError(f"model input must be a numpy array or torch tensor, got {type(batch)}")
    if x.ndim == 3:
        x = x[:, None]
    elif not (x.ndim == 4 and x.shape[1] == 1):
        raise InputError(
            f"model input must be a (B, H, W) or (B, 1, H, W) batch of grey frames, "
            f"got shape {tuple(x.shape)}"
        )
    x = resize_frames(x, input_size)
    x = (x - INPUT_MEAN) / INPUT_STD
    if in_chans != 1:
        x = x.expand(-1, in_chans, -1, -1)
    return x.contiguous()


def sky_level(x: torch.Tensor) -> torch.Tensor:
    """(B, C, S, S) model input -> (B,) sky level: each frame's mean brightness in [0, 1] units,
    as the model sees it (preprocessed, masked corners counted as black, resized).

    The one measure of how bright a frame is that train records for its labelled set and
    classify-archive for every frame, so that occurrence can leave out frames darker than any
    the model learnt from (``--min-sky``).
    """
    return x[:, 0].float().mean(dim=(1, 2)) * INPUT_STD + INPUT_MEAN


def resize_frames(x: torch.Tensor, input_size: int) -> torch.Tensor:
    """(B, 1, H, W) float frames -> (B, 1, S, S): bilinear, no antialias; unchanged at S already.

    The resize of :func:`to_model_input`, on its own: the frame store (pipeline.framestore)
    holds frames resized by it, so reading them back and resizing here agree bit for bit.
    """
    if input_size < MIN_INPUT_SIZE:
        raise ConfigError(f"input_size must be >= {MIN_INPUT_SIZE} px, got {input_size}")
    if tuple(x.shape[-2:]) == (input_size, input_size):
        return x
    return F.interpolate(
        x, size=(input_size, input_size), mode="bilinear", align_corners=False, antialias=False
    )


#: how a model scales each frame's brightness before its first layer: "fixed" (the input
#: transform alone) or "frame" (each frame divided by its own 99th percentile).
INPUT_NORMS = ("fixed", "frame")

#: what the backbone's first layer sees: "grey" (the frame) or "radial_edges" (the frame and its
#: gradient along and across the sky's radius, models.radial.RadialEdges; grey frames only).
INPUT_FEATURES = ("grey", "radial_edges")


class FrameStretch(nn.Module):
    """Divide each frame by its own 99th-percentile brightness (in [0, 1] units), clipped.

    Real frames differ between episodes by several times in brightness (season, cloud, camera
    gain) while the morphology is what matters; inside the model, the same stretch applies in
    training and in every stage that classifies. Parameter-free; black stays black.
    """

    def __init__(self, quantile: float = 0.99, floor: float = 0.05) -> None:
        super().__init__()
        self.quantile, self.floor = quantile, floor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x * INPUT_STD + INPUT_MEAN
        top = torch.quantile(v.detach().flatten(1).float(), self.quantile, dim=1)
        top = top.clamp_min(self.floor).to(v.dtype).view(-1, *([1] * (v.ndim - 1)))
        return ((v / top).clamp(0, 1) - INPUT_MEAN) / INPUT_STD


class AuroraNet(nn.Module):
    """[STN] + backbone + FC8 head; ``features`` gives the retrieval feature, ``forward`` logits."""

    def __init__(
        self,
        variant: str,
        backbone: Backbone,
        head: nn.Module,
        stn: SpatialTransformer | None = None,
        input_norm: str = "fixed",
        input_features: str = "grey",
    ) -> None:
        super().__init__()
        self.input_norm = FrameStretch() if input_norm == "frame" else None
        self.edges = RadialEdges() if input_features == "radial_edges" else None
        self.variant = variant
        self.backbone_name = backbone.name
        self.feature_dim = backbone.feature_dim
        self.stn = stn
        self.trunk = backbone.trunk
        self.pool = backbone.pool
        self.neck = backbone.neck
        self.head = head
        self._backbone = backbone  # key mapping for ImageNet init (plain attribute, not a module)
        self.build_kwargs: dict[str, Any] = {}

    @property
    def lsoftmax(self) -> LSoftmaxLinear | None:
        """The L-Softmax head (its ``step()`` advances lambda), or None for a plain softmax."""
        return self.head if isinstance(self.head, LSoftmaxLinear) else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The retrieval feature: FC7 (B, 4096) for AlexNet/VGG16, (B, feature_dim) in general."""
        if self.input_norm is not None:
            x = self.input_norm(x)
        if self.stn is not None:
            x = self.stn(x)
        if self.edges is not None:
            x = self.edges(x)
        x = self.pool(self.trunk(x))
        return self.neck(torch.flatten(x, 1))

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, num_classes); with L-Softmax, margin logits when training with a target."""
        f = self.features(x)
        if isinstance(self.head, LSoftmaxLinear):
            return self.head(f, target)
        return self.head(f)


def _schedule_kwargs(lambda_schedule: dict | None) -> dict[str, float]:
    params = dict(DEFAULT_SCHEDULE)
    for key, value in (lambda_schedule or {}).items():
        if key not in DEFAULT_SCHEDULE:
            raise ConfigError(
                f"unknown lambda schedule key {key!r}; allowed: {', '.join(DEFAULT_SCHEDULE)}"
            )
        params[key] = float(value)
    return params


def build_model(
    variant: str,
    num_classes: int = 4,
    in_chans: int = 1,
    input_size: int = 227,
    lsoftmax_m: int = 3,
    lambda_schedule: dict | None = None,
    stn_loc_size: int = 64,
    init_weights: str | os.PathLike | None = None,
    stn_fill: float = INPUT_BLACK,
    input_norm: str = "fixed",
    input_features: str = "grey",
) -> AuroraNet:
    """Build a registry variant; ``init_weights`` is an optional local torchvision ImageNet file.

    ``lambda_schedule`` holds the L-Softmax decay law's base, gamma, power and floor (defaults:
    ``lsoftmax.DEFAULT_SCHEDULE``).  ``input_size`` is recorded (for the checkpoint and
    :func:`to_model_input`); the network itself accepts any size >= 64 px. ``stn_fill`` is
    what the STN brings in from outside the frame (black sky; checkpoints from before it was
    recorded were trained with 0.0, and load with it).
    """
    if variant not in _REGISTRY:
        raise ConfigError(f"unknown model variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    if int(input_size) < MIN_INPUT_SIZE:
        raise ConfigError(f"input_size must be >= {MIN_INPUT_SIZE} px, got {input_size}")
    if input_norm not in INPUT_NORMS:
        raise ConfigError(f"input_norm must be one of {', '.join(INPUT_NORMS)}, got {input_norm!r}")
    if in_chans not in (1, 3):
        raise ConfigError(f"in_chans must be 1 (grey) or 3, got {in_chans}")
    if input_features not in INPUT_FEATURES or (input_features != "grey" and in_chans != 1):
        raise ConfigError(
            f"input_features must be one of {', '.join(INPUT_FEATURES)} (radial_edges for grey "
            f"frames only), got {input_features!r} with in_chans {in_chans}"
        )
    if int(lsoftmax_m) != lsoftmax_m or lsoftmax_m < 1:
        raise ConfigError(f"lsoftmax_m must be a positive integer, got {lsoftmax_m!r}")
    backbone_name, with_stn, with_lsoftmax = _REGISTRY[variant]
    schedule = _schedule_kwargs(lambda_schedule)
    backbone = BACKBONES[backbone_name](3 if input_features == "radial_edges" else in_chans)
    if with_lsoftmax:
        head: nn.Module = LSoftmaxLinear(
            backbone.feature_dim, num_classes, int(lsoftmax_m), LambdaSchedule(**schedule)
        )
    else:
        head = nn.Linear(backbone.feature_dim, num_classes)
    stn = SpatialTransformer(in_chans, loc_size=stn_loc_size, fill=stn_fill) if with_stn else None
    model = AuroraNet(variant, backbone, head, stn, input_norm, input_features)
    model.build_kwargs = {
        "num_classes": int(num_classes),
        "in_chans": int(in_chans),
        "input_size": int(input_size),
        "lsoftmax_m": int(lsoftmax_m),
        "lambda_schedule": schedule,
        "stn_loc_size": int(stn_loc_size),
        "stn_fill": float(stn_fill),
        "input_norm": input_norm,
        "input_features": input_features,
    }
    if init_weights is not None:
        load_init_weights(model, init_weights)
    return model


def load_init_weights(model: AuroraNet, path: str | os.PathLike) -> list[str]:
    """Load a local torchvision/timm ImageNet state dict into the backbone; returns the keys set.

    The 1000-class FC8 is dropped (the head stays freshly initialised) and, for grey models, the
    RGB kernels of the first convolution are summed over their input channels, so a grey image
    gives the response the RGB network gives to that image replicated on three channels.
    """
    state = read_state_dict(path, what="init weights")
    ours = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        new = model._backbone.map_key(key)
        if new is None:
            continue
        if new not in ours:
            unexpected.append(key)
            continue
        if new == model._backbone.first_conv and value.shape[1] != ours[new].shape[1]:
            if ours[new].shape[1] == 1 and value.shape[1] == 3:
                value = value.sum(dim=1, keepdim=True)
        if value.shape != ours[new].shape:
            unexpected.append(f"{key} {tuple(value.shape)} vs {tuple(ours[new].shape)}")
            continue
        mapped[new] = value
    backbone_keys = [k for k in ours if k.startswith(("trunk.", "neck."))]
    missing = [
        k for k in backbone_keys if k not in mapped and not k.endswith("num_batches_tracked")
    ]
    if unexpected or missing:
        raise CheckpointError(
            f"{path}: not torchvision {model.backbone_name} weights "
            f"(unexpected/mismatched: {unexpected[:3]}, missing: {missing[:3]})"
        )
    model.load_state_dict(mapped, strict=False)
    return sorted(mapped)
