"""Backbones split into trunk (conv layers), pool, neck (FC6-FC7) and the feature width.

Each constructor returns a :class:`Backbone` whose parts ``build.AuroraNet`` chains as
``neck(flatten(pool(trunk(x))))`` = the retrieval feature, followed by its own FC8 head.  The
first convolution takes ``in_chans`` channels (1 for grey frames), and ``map_key`` translates the
keys of the matching torchvision (or timm) ImageNet state dict onto ours, for ``--init-weights``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from pipeline.errors import ConfigError


@dataclass
class Backbone:
    """The parts of one backbone and how to load its ImageNet weights."""

    name: str
    trunk: nn.Module
    pool: nn.Module
    neck: nn.Module
    feature_dim: int
    #: torchvision/timm state-dict key -> our key (without the model prefix), or None to drop it.
    map_key: Callable[[str], str | None]
    #: our key of the first convolution's weight (RGB weights are summed onto grey there).
    first_conv: str


def _tv_features_classifier_map(key: str, last_fc: str) -> str | None:
    """Map torchvision ``features.*``/``classifier.*`` keys; drop the 1000-class FC8."""
    if key.startswith(last_fc):
        return None
    if key.startswith("features."):
        return "trunk." + key[len("features.") :]
    if key.startswith("classifier."):
        return "neck." + key[len("classifier.") :]
    return key  # unknown keys stay as they are, so the loader reports them as unexpected


def alexnet(in_chans: int = 1) -> Backbone:
    """torchvision AlexNet: 5 convs, adaptive pool to 6x6 (any input >= 64 px), FC6-FC7 (4096)."""
    tv = torchvision.models.alexnet(weights=None)
    tv.features[0] = nn.Conv2d(in_chans, 64, kernel_size=11, stride=4, padding=2)
    # classifier = [Dropout, FC6, ReLU, Dropout, FC7, ReLU, FC8]; the neck stops after FC7's ReLU.
    return _features_classifier("alexnet", tv)


def vgg16(in_chans: int = 1) -> Backbone:
    """torchvision VGG16: 13 convs, adaptive pool to 7x7, FC6-FC7 (4096)."""
    tv = torchvision.models.vgg16(weights=None)
    conv = nn.Conv2d(in_chans, 64, kernel_size=3, padding=1)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # as torchvision
    nn.init.zeros_(conv.bias)
    tv.features[0] = conv
    # classifier = [FC6, ReLU, Dropout, FC7, ReLU, Dropout, FC8].
    return _features_classifier("vgg16", tv)


def _features_classifier(name: str, tv: nn.Module) -> Backbone:
    """A torchvision features/avgpool/classifier net cut after FC7 (its first six layers)."""
    neck = nn.Sequential(*list(tv.classifier.children())[:6])
    return Backbone(
        name,
        tv.features,
        tv.avgpool,
        neck,
        4096,
        functools.partial(_tv_features_classifier_map, last_fc="classifier.6."),
        "trunk.0.weight",
    )


def _resnet_map(key: str) -> str | None:
    return None if key.startswith("fc.") else "trunk." + key


def resnet18(in_chans: int = 1) -> Backbone:
    """torchvision ResNet-18; its feature is the 512-d global-average-pooled vector (no FC7)."""
    tv = torchvision.models.resnet18(weights=None)
    conv = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    tv.conv1 = conv
    tv.fc = nn.Identity()  # the trunk then ends with avgpool + flatten: (B, 512)
    return Backbone(
        "resnet18", tv, nn.Identity(), nn.Identity(), 512, _resnet_map, "trunk.conv1.weight"
    )


def _timm_inception_map(key: str) -> str | None:
    if key.startswith("last_linear."):
        return None
    return "trunk.net." + key


class _MinSize(nn.Module):
    """Upsample inputs smaller than ``min_size`` (Inception-v4's valid convs need >= 75 px)."""

    def __init__(self, net: nn.Module, min_size: int) -> None:
        super().__init__()
        self.net = net
        self.min_size = min_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_size:
            x = F.interpolate(x, size=(self.min_size, self.min_size), mode="bilinear")
        return self.net(x)


def inception_v4(in_chans: int = 1) -> Backbone:
    """timm Inception-v4 (optional dependency); its feature is the 1536-d pooled vector."""
    try:
        import timm  # noqa: PLC0415 - optional dependency, only for this variant
    except ImportError:
        raise ConfigError(
            "variant 'inception-v4' needs timm, an optional dependency: "
            "pip install 'aurora-pipeline[baselines]'"
        ) from None
    net = timm.create_model("inception_v4", pretrained=False, num_classes=0, in_chans=in_chans)
    return Backbone(
        "inception-v4",
        _MinSize(net, 75),
        nn.Identity(),
        nn.Identity(),
        int(net.num_features),
        _timm_inception_map,
        "trunk.net.features.0.conv.weight",
    )


#: backbone name -> constructor(in_chans) -> Backbone
BACKBONES: dict[str, Callable[[int], Backbone]] = {
    "alexnet": alexnet,
    "vgg16": vgg16,
    "resnet18": resnet18,
    "inception-v4": inception_v4,
}
