"""Radial edge channels (pipeline/models/radial.py) and the models that use them."""

from __future__ import annotations

import pytest
import torch

from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.errors import ConfigError
from pipeline.models import build_model
from pipeline.models.radial import RadialEdges
from pipeline.train import load_train_config

SIZE = 65


def _polar(size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    c = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    y, x = torch.meshgrid(c, c, indexing="ij")
    return torch.sqrt(x * x + y * y), torch.atan2(y, x)


def _energy(out: torch.Tensor, channel: int, keep: torch.Tensor) -> float:
    return float((out[0, channel][keep] ** 2).sum())


def test_a_ring_shows_in_the_radial_channel_and_rays_in_the_tangential():
    """A ring about the centre (an arc-like band across the radius) has its edges along the
    radius; rays from the centre (a radial corona) have theirs across it."""
    r, theta = _polar()
    # Away from the centre and the corners, where the 3x3 stencil sees a smooth field: Sobel's
    # error there is O(h^2) of the slope and mostly along it, so the wrong channel holds well
    # under 1 % of the energy (the image of a swapped channel would hold ~100 %).
    keep = (r > 8) & (r < 28)
    ring = torch.exp(-(((r - 18) / 4) ** 2))[None, None]
    rays = (0.5 + 0.5 * torch.cos(6 * theta))[None, None]
    for field, right, wrong in ((ring, 1, 2), (rays, 2, 1)):
        out = RadialEdges()(field)
        assert _energy(out, wrong, keep) < 0.01 * _energy(out, right, keep)
    assert torch.equal(RadialEdges()(ring)[:, :1], ring)  # channel 0 is the frame itself


def test_the_radial_channels_turn_with_the_sky():
    """Turning the frame by 90 degrees turns the two gradient maps with it, values unchanged:
    they are about the radius, not the frame's axes."""
    torch.manual_seed(0)
    x = torch.rand(2, 1, 32, 32)
    out = RadialEdges()(x)
    turned = RadialEdges()(torch.rot90(x, 1, dims=(2, 3)))
    # The two paths differ only in summation order: each channel value is at most 20 float32
    # roundings (9 products and 8 additions in the convolution, 2 products and 1 addition in
    # the projection) of partial sums below 3 (gradient <= 2 per axis, |u| = 1), per path;
    # a swapped or unrotated field would be off by O(1).
    bound = 2 * 20 * 3 * 2.0**-24
    torch.testing.assert_close(turned, torch.rot90(out, 1, dims=(2, 3)), atol=bound, rtol=0)


def test_a_model_with_radial_edges_saves_loads_and_refuses_bad_settings(tmp_path):
    torch.manual_seed(0)
    model = build_model("stn-lsoftmax-alexnet", input_size=64, input_features="radial_edges")
    model.eval()
    assert model.trunk[0].in_channels == 3 and model.stn.in_chans == 1
    x = torch.rand(2, 1, 64, 64)
    save_checkpoint(tmp_path / "ck", model)
    loaded, meta = load_checkpoint(tmp_path / "ck")
    assert meta["build"]["input_features"] == "radial_edges"
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    # a grey model loads as before, without the layer
    assert build_model("alexnet", input_size=64).edges is None
    with pytest.raises(ConfigError, match="input_features"):
        build_model("alexnet", input_features="polar")
    with pytest.raises(ConfigError, match="grey frames only"):
        build_model("alexnet", in_chans=3, input_features="radial_edges")


def test_the_train_config_takes_input_features(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("variant: alexnet\ninput_features: radial_edges\n")
    assert load_train_config(path).input_features == "radial_edges"
    path.write_text("variant: alexnet\ninput_features: sobel\n")
    with pytest.raises(ConfigError, match="input_features"):
        load_train_config(path)
