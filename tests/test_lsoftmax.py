"""L-Softmax: equals softmax cross-entropy at m = 1, psi(theta) vs acos, the lambda schedule."""

from __future__ import annotations

import math

import bounds
import pytest
import torch
import torch.nn.functional as F

from pipeline.models.lsoftmax import (
    DEFAULT_SCHEDULE,
    LambdaSchedule,
    LSoftmaxLinear,
    chebyshev_coefficients,
    chebyshev_cos_m,
    psi_from_cos,
)


def _psi_acos(cos: torch.Tensor, m: int) -> torch.Tensor:
    """psi(theta) straight from its definition, via theta = acos(cos) (float64 reference)."""
    theta = torch.acos(cos.double().clamp(-1, 1))
    k = torch.clamp(torch.floor(theta * m / math.pi), max=m - 1)
    return (-1.0) ** k * torch.cos(m * theta) - 2.0 * k


def _layer(m: int, d: int, c: int = 4, lam: float = 0.0, seed: int = 0) -> LSoftmaxLinear:
    torch.manual_seed(seed)
    layer = LSoftmaxLinear(d, c, margin=m, schedule=LambdaSchedule(base=lam, floor=lam))
    return layer.train()


@pytest.mark.parametrize("lam", [0.0, 15.0, 10000.0])
def test_m1_equals_cross_entropy(lam):
    layer = _layer(1, 32, lam=lam)
    x = torch.randn(64, 32) * 3
    y = torch.randint(0, 4, (64,))
    plain = F.linear(x, layer.weight)
    out = layer(x, y)
    # m = 1: the margin logit ||w|| ||x|| cos is the plain one up to rounding: (margin error +
    # the plain dot's gamma_D |w|.|x|) / (1 + lam), and the blend's 3 roundings (gamma_3).
    w = layer.weight.detach()[y]
    s = (x.abs() * w.abs()).sum(1)
    margin_err = bounds.lsoftmax_target_error(x, w, 1) + bounds.gamma(32) * s
    z = plain.detach().double().gather(1, y[:, None])[:, 0].abs()
    tol = margin_err / (1 + lam) + bounds.gamma(3) * 2 * (z + margin_err)
    diff = (out.detach().double() - plain.detach().double()).abs()
    assert (diff.gather(1, y[:, None])[:, 0] <= tol).all()
    assert torch.equal(diff.scatter(1, y[:, None], 0.0), torch.zeros_like(diff))  # untouched
    # cross-entropy = lse(z) - z_y moves by at most 2 max|dz|; each mean over 64 rows of a
    # C + 3-term computation rounds by gamma_{64+C+3} (|z_y| + lse) at most.
    lse = torch.logsumexp(plain.detach().double(), 1)
    ce_round = bounds.gamma(64 + 4 + 3) * (z + lse.abs()).max()
    loss = F.cross_entropy(out, y)
    assert abs(loss.item() - F.cross_entropy(plain, y).item()) <= 2 * tol.max() + 2 * ce_round


@pytest.mark.parametrize("m", [2, 3, 4])
def test_target_logit_matches_psi_from_acos(m):
    # Low dimension so that angles cover all of [0, pi], i.e. every interval k = 0..m-1.
    layer = _layer(m, 3, lam=0.0, seed=m)
    x = torch.randn(4000, 3)
    y = torch.randint(0, 4, (4000,))
    out = layer(x, y)
    w = layer.weight.detach()[y].double()
    xd = x.double()
    xn, wn = xd.norm(dim=1), w.norm(dim=1)
    cos = (xd * w).sum(1) / (xn * wn)
    expected = xn * wn * _psi_acos(cos, m)
    got = out.gather(1, y[:, None])[:, 0].double()
    # lam = 0: the target logit is the float32 margin logit (0 * plain + margin, / 1: exact)
    bound = bounds.lsoftmax_target_error(x, layer.weight.detach()[y], m)
    assert ((got - expected).abs() <= bound).all()
    # every interval k was exercised
    ks = torch.clamp(torch.floor(torch.acos(cos) * m / math.pi), max=m - 1)
    assert set(ks.long().tolist()) == set(range(m))
    # non-target logits stay plain
    plain = F.linear(x, layer.weight)
    mask = torch.ones_like(plain, dtype=torch.bool).scatter(1, y[:, None], False)
    assert torch.equal(out[mask], plain[mask])


def test_chebyshev_coefficients_are_t_m():
    assert chebyshev_coefficients(2) == (-1.0, 0.0, 2.0)
    assert chebyshev_coefficients(3) == (0.0, -3.0, 0.0, 4.0)
    assert chebyshev_coefficients(4) == (1.0, 0.0, -8.0, 0.0, 8.0)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6])
def test_chebyshev_and_psi_on_a_theta_grid(m):
    theta = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
    cos = torch.cos(theta)
    err = bounds.chebyshev_error(m)  # float64: ~1e-14 (m^2 u + Horner over sum |coef| ...)
    assert ((chebyshev_cos_m(cos, m) - torch.cos(m * theta)).abs() <= err).all()
    psi = psi_from_cos(cos, m)
    assert ((psi - _psi_acos(cos, m)).abs() <= 2 * err).all()  # acos adds its own ~err
    # psi is monotonically decreasing and psi <= cos (the margin only makes the target harder)
    assert (psi[1:] - psi[:-1] <= 2 * err).all()
    assert (psi <= cos + 2 * err).all()


def test_blend_with_lambda():
    lam = 7.0
    layer = _layer(3, 8, lam=lam)
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    plain = F.linear(x, layer.weight).gather(1, y[:, None])[:, 0]
    margin = layer.margin_logits(x, y)
    got = layer(x, y).gather(1, y[:, None])[:, 0]
    # the same formula on the same float32 inputs: 3 roundings on each side, gamma_3 each
    want = (lam * plain + margin) / (1 + lam)
    tol = 2 * bounds.gamma(3) * (lam * plain.abs() + margin.abs()) / (1 + lam)
    assert ((got - want).abs() <= tol).all()
    # ... and the blend moves the target logit by far more than that (the margin is real)
    assert ((got - plain).abs().max() > 100 * tol.max()).item()


def test_inference_returns_plain_logits():
    layer = _layer(3, 8, lam=0.0)
    x, y = torch.randn(5, 8), torch.randint(0, 4, (5,))
    plain = F.linear(x, layer.weight)
    assert torch.equal(layer(x), plain)  # no target
    layer.eval()
    assert torch.equal(layer(x, y), plain)  # eval mode ignores the target


def test_lambda_schedule_values():
    s = LambdaSchedule(**DEFAULT_SCHEDULE)
    assert s.value == 10000.0
    assert s.value_at(1) == pytest.approx(10000 / 1.12)
    assert s.value_at(100) == pytest.approx(10000 / 13.0)
    assert s.value_at(10**6) == 15.0  # floored
    s2 = LambdaSchedule(base=1000, gamma=0.5, power=2.0, floor=0.0)
    assert s2.value_at(2) == pytest.approx(1000 / 4.0)
    values = [s.step() for _ in range(5)]
    assert values == sorted(values, reverse=True)
    assert int(s.iteration) == 5 and s.count == 5
    # the schedule's state travels with the layer's state_dict
    layer = LSoftmaxLinear(4, 4, 3, s)
    sd = layer.state_dict()
    assert int(sd["schedule.iteration"]) == 5
    fresh = LSoftmaxLinear(4, 4, 3)
    fresh.load_state_dict(sd)
    assert fresh.lam == pytest.approx(s.value_at(5))
    layer.step()
    assert layer.lam == pytest.approx(s.value_at(6))
    with pytest.raises(ValueError):
        LambdaSchedule(base=-1)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_gradients_finite_including_degenerate_inputs(m):
    layer = _layer(m, 6, lam=0.0)
    with torch.no_grad():
        layer.weight[2].zero_()  # a zero-norm weight row
    x = torch.randn(8, 6)
    x[0] = 0.0  # zero-norm feature
    x[1] = layer.weight[1].detach() * 2.0  # theta = 0 exactly (cos = 1)
    x[3] = -layer.weight[3].detach()  # theta = pi (cos = -1)
    x.requires_grad_(True)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    loss = F.cross_entropy(layer(x, y), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.weight.grad).all()
    assert layer.weight.grad.abs().sum() > 0


def test_half_precision_input_is_computed_in_float32():
    layer = _layer(3, 8, lam=0.0)
    x, y = torch.randn(4, 8), torch.randint(0, 4, (4,))
    margin = layer.margin_logits(x.half(), y)
    assert margin.dtype == torch.float32
    # x.half() rounds each element by 2^-11 relative; both results also carry float32 error.
    w = layer.weight.detach()[y]
    tol = bounds.lsoftmax_target_error(x, w, 3, input_rel=2.0**-11)
    tol = tol + bounds.lsoftmax_target_error(x, w, 3)
    assert ((margin - layer.margin_logits(x, y)).detach().double().abs() <= tol).all()


def test_invalid_margin():
    with pytest.raises(ValueError, match="positive integer"):
        LSoftmaxLinear(4, 4, margin=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_on_cuda_is_finite_and_close(dtype):
    layer = _layer(3, 64, lam=0.0).cuda()
    x = (torch.randn(32, 64) * 4).cuda().requires_grad_(True)
    y = torch.randint(0, 4, (32,)).cuda()
    with torch.autocast("cuda", dtype=dtype):
        out = layer(x, y)
        loss = F.cross_entropy(out.float(), y)
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()
    ref = layer(x.detach(), y).gather(1, y[:, None])
    got = out.float().gather(1, y[:, None])
    # Autocast leaves the margin logit in float32 (lam = 0: it is the target logit) and only
    # rounds it to ``dtype`` when scattered into the half-precision logits: u |ref|, plus the
    # float32 errors of both computations (the GPU's and the reference's).
    w = layer.weight.detach()[y]
    f32 = bounds.lsoftmax_target_error(x.detach().cpu(), w.cpu(), 3).cuda()[:, None]
    tol = bounds.unit_roundoff(dtype) * ref.abs() + 2 * f32
    assert ((got - ref).abs() <= tol).all()
