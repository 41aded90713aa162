"""STN: identity at initialisation, full-resolution sampling, a learnable transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.models import build_model, to_model_input
from pipeline.models.stn import IDENTITY_THETA, SpatialTransformer, affine_grid


@pytest.mark.parametrize(("chans", "h", "w"), [(1, 64, 64), (1, 227, 227), (3, 112, 80)])
def test_identity_at_init_returns_input(chans, h, w):
    torch.manual_seed(0)
    stn = SpatialTransformer(chans)
    x = torch.rand(2, chans, h, w)
    out = stn(x)
    assert out.shape == x.shape
    # float32 grid coordinates are off by ~size * 1e-7 pixel: interpolation error ~3e-5 at 227 px
    assert torch.allclose(out, x, atol=1e-4)
    theta = stn.theta(x)
    assert torch.allclose(theta, torch.tensor(IDENTITY_THETA).view(1, 2, 3).expand(2, 2, 3))


def test_zoom_out_and_shift_bring_in_black_sky_not_grey():
    """Areas from outside the frame take the model-input value of a black pixel (the mask)."""
    model = build_model("stn-alexnet", input_size=64)
    black = to_model_input(np.zeros((1, 64, 64), np.float32), 64)
    assert model.stn.fill == pytest.approx(float(black.flatten()[0]))
    with torch.no_grad():
        model.stn.regress.bias.copy_(
            torch.tensor([2.0, 0.0, 0.5, 0.0, 2.0, 0.0])
        )  # zoom out, shift
    frame = torch.full((1, 1, 64, 64), 0.7)
    x = to_model_input(frame, 64)
    with torch.no_grad():
        out = model.stn(x)
    border = out[0, 0, :, :4]  # far left: outside the source frame after the zoom-out
    assert torch.allclose(border, black[0, 0, 0, 0].expand_as(border), atol=1e-5)
    inside = out[0, 0, 32, 32]
    assert inside == pytest.approx(float(x[0, 0, 0, 0]), abs=1e-5)


def test_localisation_runs_on_downsampled_copy():
    stn = SpatialTransformer(1, loc_size=64)
    seen = []
    stn.localization.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    out = stn(torch.rand(1, 1, 227, 227))
    assert seen == [torch.Size([1, 1, 64, 64])]
    assert out.shape == (1, 1, 227, 227)  # sampled at full resolution


def test_sampler_applies_the_predicted_transform():
    stn = SpatialTransformer(1)
    with torch.no_grad():
        stn.regress.bias.copy_(torch.tensor([-1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))  # mirror x
    x = torch.rand(1, 1, 64, 64)
    assert torch.allclose(stn(x), torch.flip(x, dims=[-1]), atol=1e-5)


def test_gradients_reach_the_localisation_net():
    torch.manual_seed(0)
    stn = SpatialTransformer(1)
    x = torch.rand(2, 1, 64, 64)
    target = torch.roll(x, shifts=3, dims=-1)
    ((stn(x) - target) ** 2).mean().backward()
    assert stn.regress.weight.grad.abs().sum() > 0
    assert stn.regress.bias.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in stn.parameters() if p.grad is not None)


def test_small_cost():
    # The STN must stay a small add-on: parameters well under 1 % of AlexNet's ~57 M.
    n = sum(p.numel() for p in SpatialTransformer(1).parameters())
    assert n < 100_000
    with pytest.raises(ValueError):
        SpatialTransformer(1, loc_size=16)


@pytest.mark.parametrize(("h", "w"), [(64, 64), (227, 227), (50, 80)])
def test_affine_grid_matches_torch(h, w):
    torch.manual_seed(0)
    theta = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    x = torch.rand(3, 2, h, w, dtype=torch.float64)
    ref = F.affine_grid(theta, [3, 2, h, w], align_corners=False)
    grid = affine_grid(theta, h, w)
    assert grid.shape == ref.shape
    assert torch.allclose(grid, ref, atol=1e-12)
    out = F.grid_sample(x, grid, align_corners=False)
    out_ref = F.grid_sample(x, ref, align_corners=False)
    assert torch.allclose(out, out_ref, atol=1e-12)
    (g,) = torch.autograd.grad(out.sum(), theta)
    (g_ref,) = torch.autograd.grad(out_ref.sum(), theta)
    assert torch.allclose(g, g_ref, atol=1e-9)


def test_grid_cached_in_inference_mode_still_trains():
    stn = SpatialTransformer(1)
    x = torch.rand(2, 1, 97, 97)  # a size no other test uses: the cache starts empty for it
    with torch.inference_mode():
        stn(x)
    stn(x).sum().backward()
    assert stn.regress.bias.grad is not None


def test_affine_grid_stays_float32_under_autocast():
    theta = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grid = affine_grid(theta.bfloat16(), 227, 227)
    assert grid.dtype == torch.float32
    ref = F.affine_grid(theta, [1, 1, 227, 227], align_corners=False)
    assert torch.allclose(grid, ref, atol=1e-6)


@pytest.mark.gpu
def test_identity_and_grid_on_cuda():
    torch.manual_seed(0)
    stn = SpatialTransformer(1).cuda()
    x = torch.rand(4, 1, 227, 227, device="cuda")
    assert torch.allclose(stn(x), x, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.allclose(stn(x).float(), x, atol=1e-4)
    theta = torch.randn(4, 2, 3, device="cuda")
    ref_grid = F.affine_grid(theta, [4, 1, 227, 227], align_corners=False)
    ref = F.grid_sample(x, ref_grid, align_corners=False)
    out = F.grid_sample(x, affine_grid(theta, 227, 227), align_corners=False)
    assert torch.allclose(out, ref, atol=1e-4)
