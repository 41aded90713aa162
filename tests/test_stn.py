"""STN: identity at initialisation, full-resolution sampling, a learnable transform."""

from __future__ import annotations

import bounds
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
    # float32 grid coordinates are off by ~size * u pixel: bounds.resample_error (5e-4 at 227)
    assert ((out - x).abs() <= bounds.resample_error(x)).all()
    theta = stn.theta(x)
    # zero regression weights: theta = 0 + bias, exactly
    assert torch.equal(theta, torch.tensor(IDENTITY_THETA).view(1, 2, 3).expand(2, 2, 3))


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
    # A constant frame: the bilinear weights sum to 1 in exact arithmetic wherever they fall,
    # so only the sampler's own rounding is left (bounds.sample_error with an exact grid).
    tol = float(bounds.sample_error(x, 0.0, model.stn.fill))
    border = out[0, 0, :, :4]  # far left: outside the source frame after the zoom-out
    assert ((border - black[0, 0, 0, 0]).abs() <= tol).all()
    inside = out[0, 0, 32, 32]
    assert abs(float(inside) - float(x[0, 0, 0, 0])) <= tol


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
    # -x of the base grid lands on pixel centres again: the identity's bound
    assert ((stn(x) - torch.flip(x, dims=[-1])).abs() <= bounds.resample_error(x)).all()


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
    f64 = torch.float64
    g_err = bounds.grid_error(theta, f64)  # (3, 2): both grids within it of the exact one
    assert ((grid - ref).abs() <= 2 * g_err[:, None, None, :]).all()
    out = F.grid_sample(x, grid, align_corners=False)
    out_ref = F.grid_sample(x, ref, align_corners=False)
    tol = 2 * bounds.sample_error(x, 2 * float(g_err.max()), dtype=f64)
    assert ((out - out_ref).abs() <= tol).all()
    (g,) = torch.autograd.grad(out.sum(), theta)
    (g_ref,) = torch.autograd.grad(out_ref.sum(), theta)
    # d sum(out) / d theta sums dout/dgrid * [x, y, 1] (|.| <= 1) over the C H W samples, in
    # any order: gamma_{CHW} sum |dout/dgrid| per path. The grids' difference (and their
    # unnormalisation's rounding, 32u) moves each dout/dgrid_x (piecewise constant in x, linear
    # in y) by <= W/2 H/2 |dgrid| 4 max|x|: first order, like the model bounds.
    gg = grid.detach().requires_grad_(True)
    (dg,) = torch.autograd.grad(F.grid_sample(x, gg, align_corners=False).sum(), gg)
    n = x.shape[1] * h * w
    dgrid = 2 * float(g_err.max()) + 32 * bounds.unit_roundoff(f64)
    shift = n * (w / 2) * (h / 2) * 4 * float(x.abs().max()) * dgrid
    tol_g = 2 * bounds.gamma(n, f64) * dg.abs().sum(dim=(1, 2))[:, :, None] + shift
    assert ((g - g_ref).abs() <= tol_g).all()


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
    assert ((grid - ref).abs() <= 2 * bounds.grid_error(theta)[:, None, None, :]).all()


@pytest.mark.gpu
def test_identity_and_grid_on_cuda():
    torch.manual_seed(0)
    stn = SpatialTransformer(1).cuda()
    x = torch.rand(4, 1, 227, 227, device="cuda")
    tol = bounds.resample_error(x.cpu()).cuda()
    assert ((stn(x) - x).abs() <= tol).all()
    with torch.autocast("cuda", dtype=torch.bfloat16):  # grid and sampling stay float32
        assert ((stn(x).float() - x).abs() <= tol).all()
    theta = torch.randn(4, 2, 3, device="cuda")
    ref_grid = F.affine_grid(theta, [4, 1, 227, 227], align_corners=False)
    ref = F.grid_sample(x, ref_grid, align_corners=False)
    out = F.grid_sample(x, affine_grid(theta, 227, 227), align_corners=False)
    g_err = 2 * float(bounds.grid_error(theta.cpu()).max())
    assert ((out - ref).abs() <= 2 * bounds.sample_error(x.cpu(), g_err).cuda()).all()
