"""Rounding-error bounds that the tests' tolerances are derived from (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed., ch. 2-3), so that no tolerance is tuned to one CPU,
BLAS kernel, thread count or summation order.

u is the unit roundoff of a dtype (2^-24 for float32) and gamma_n = n u / (1 - n u). A sum or dot
product of n terms computed in *any* order (any blocking, SIMD width, FMA use or thread split)
satisfies |fl(a.b) - a.b| <= gamma_n |a|.|b| (Higham eq. 3.5), and a matrix product
|fl(A B) - A B| <= gamma_k |A| |B| elementwise for inner dimension k. Float64 references are
treated as exact: their own error (gamma_n with u = 2^-53) is 2^-29 times the float32 bound.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}


def unit_roundoff(dtype=torch.float32) -> float:
    """u of a torch or numpy floating dtype (round to nearest)."""
    if not isinstance(dtype, torch.dtype):
        numpy_to_torch = {np.float64: torch.float64, np.float32: torch.float32}
        dtype = {**numpy_to_torch, np.float16: torch.float16}[np.dtype(dtype).type]
    return _UNIT_ROUNDOFF[dtype]


def gamma(n: int, dtype=torch.float32) -> float:
    """gamma_n = n u / (1 - n u): the relative error bound of a length-n sum or dot product."""
    nu = n * unit_roundoff(dtype)
    if nu >= 1:
        raise ValueError(f"gamma_{n} undefined for {dtype}: n u = {nu} >= 1")
    return nu / (1 - nu)


def matmul_bound(a: np.ndarray, b: np.ndarray, dtype=torch.float32) -> np.ndarray:
    """gamma_k |a| @ |b|: the elementwise error bound of a float matrix product (k = inner dim)."""
    a64, b64 = np.abs(np.asarray(a, np.float64)), np.abs(np.asarray(b, np.float64))
    return gamma(a64.shape[-1], dtype) * (a64 @ b64)


def sqrt_error(d_ref: np.ndarray, err: np.ndarray) -> np.ndarray:
    """Bound on |sqrt(a) - sqrt(b)| for b = d_ref**2 >= 0 and |a - b| <= err (a clamped at 0).

    |sqrt(a) - sqrt(b)| = |a - b| / (sqrt(a) + sqrt(b)) <= min(sqrt(|a - b|), |a - b| / sqrt(b)).
    """
    d_ref = np.asarray(d_ref, np.float64)
    err = np.asarray(err, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(d_ref > 0, err / np.where(d_ref > 0, d_ref, 1.0), np.inf)
    return np.minimum(np.sqrt(err), rel)


# ------------------------------------------------------------------------------ kNN distances


def sq_distance_error(q: np.ndarray, x: np.ndarray, dtype=torch.float32) -> np.ndarray:
    """(Q, N) bound on the error of d2 = ||x||^2 - 2 q.x + ||q||^2 computed in ``dtype``.

    The three terms are dot products of length dim and the two additions make it one sum of
    dim + 2 rounded steps: |err| <= gamma_{dim+2} (||q||^2 + ||x||^2 + 2 |q|.|x|).
    """
    q64, x64 = np.abs(np.asarray(q, np.float64)), np.abs(np.asarray(x, np.float64))
    mag = (q64**2).sum(1)[:, None] + (x64**2).sum(1)[None, :] + 2 * q64 @ x64.T
    return gamma(q64.shape[1] + 2, dtype) * mag


def euclidean_error(q: np.ndarray, x: np.ndarray, d_ref: np.ndarray, dtype=torch.float32):
    """(Q, N) bound on |sqrt(fl(d2)) - d_ref| for the matrix-product form (kNN's selection step).

    The squared-distance error through :func:`sqrt_error`; the rounded sqrt adds u times the
    result, at most u (d + that error).
    """
    u = unit_roundoff(dtype)
    err = sqrt_error(d_ref, sq_distance_error(q, x, dtype))
    return err * (1 + u) + u * np.asarray(d_ref, np.float64)


def direct_euclidean_error(d_ref: np.ndarray, dim: int, dtype=torch.float32) -> np.ndarray:
    """Bound on ||fl(x - q)|| vs the exact distance: each difference rounds once (relative u),
    the sum of dim squares adds gamma_dim, the sqrt halves the relative error and rounds once:
    relative gamma_{dim+3} (kNN's refine step). An exact duplicate comes out exactly 0.
    """
    return gamma(dim + 3, dtype) * np.asarray(d_ref, np.float64)


def cosine_error(dim: int, dtype=torch.float32) -> float:
    """Bound on the error of 1 - q.x / (||q|| ||x||) computed by normalising both then a dot.

    Each normalised vector is off by relative gamma_{dim+2} (sum of squares gamma_dim, sqrt u,
    division u), the dot of unit vectors by gamma_dim |q^|.|x^| <= gamma_dim (Cauchy-Schwarz),
    and 1 - c rounds once: |err| <= 2 gamma_{dim+2} + gamma_dim + u <= gamma_{3 dim + 5}.
    """
    return gamma(3 * dim + 5, dtype)


def assert_knn_valid(
    got_i: np.ndarray,
    got_d: np.ndarray,
    d_ref: np.ndarray,
    select_err: np.ndarray,
    dist_err: np.ndarray,
) -> None:
    """kNN results against a float64 distance matrix, robust to near-ties and nothing else.

    ``d_ref`` (Q, N) exact distances; ``select_err`` (Q, N) bounds the error of the distances the
    top-k was selected on, ``dist_err`` (Q, N) that of the distances returned (and sorted on).
    The j-th smallest computed distance is within max(select_err) of the j-th smallest exact one
    (order statistics are 1-Lipschitz in the max norm), so the exact distance of the j-th returned
    index is within 2 max(select_err) + 2 max(dist_err) of the j-th sorted exact distance: an
    index may differ from the reference only inside a near-tie, and a wrong neighbour (further by
    more than the bound) fails. Returned distances must be within ``dist_err`` of the exact ones.
    """
    got_i = np.asarray(got_i)
    k = got_i.shape[1]
    for r in range(got_i.shape[0]):
        assert len(set(got_i[r].tolist())) == k, f"query {r}: repeated index {got_i[r]}"
    exact = np.take_along_axis(d_ref, got_i, axis=1)
    want = np.sort(d_ref, axis=1)[:, :k]
    tol = 2 * select_err.max(axis=1, keepdims=True) + 2 * dist_err.max(axis=1, keepdims=True)
    bad = np.abs(exact - want) > tol
    assert not bad.any(), (
        f"neighbours outside the rounding bound at {np.argwhere(bad)[:5].tolist()}: "
        f"exact {exact[bad][:5]} vs sorted {want[bad][:5]} "
        f"(tol {np.broadcast_to(tol, bad.shape)[bad][:5]})"
    )
    err = np.abs(np.asarray(got_d, np.float64) - exact)
    limit = np.take_along_axis(dist_err, got_i, axis=1)
    assert (err <= limit).all(), f"distances off by {err.max()} > bound {limit[err > limit][:5]}"


# ------------------------------------------------------------------------------ model outputs

#: Leaf modules that round nothing: their outputs are copies, selections or sign tests.
_EXACT = (nn.ReLU, nn.MaxPool2d, nn.Dropout, nn.Flatten, nn.Identity)

#: Hoeffding's lambda for the probabilistic bounds: a bound fails with probability at most
#: 2 exp(-lambda^2 / 2) = 4e-22 per output under the model of independent rounding errors.
LAMBDA = 10.0


def _is_lsoftmax(mod: nn.Module) -> bool:
    """The L-Softmax head: not a leaf (its schedule is a submodule); plain F.linear at inference."""
    from pipeline.models.lsoftmax import LSoftmaxLinear

    return isinstance(mod, LSoftmaxLinear)


def _is_residual_block(mod: nn.Module) -> bool:
    """torchvision ResNet blocks: their forward adds the shortcut outside any leaf module."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    return isinstance(mod, (BasicBlock, Bottleneck))


def _conv_fan_in(mod: nn.Conv2d) -> int:
    return (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)


def _local_error(mod: nn.Module, inp: torch.Tensor, out: torch.Tensor, u: float, dtype):
    """(n, s): ``mod`` run in ``dtype`` on an exact input rounds n times per output element, each
    rounding at most u s (so its output is off by at most gamma_n s), or None if it is exact."""
    if isinstance(mod, _EXACT):
        return None
    if type(mod).__name__ == "FrameStretch":
        # its per-frame quantile is detached, so an input error's effect through it would be
        # missed by the gradients: not covered, rather than silently too small
        raise NotImplementedError("forward_error_bound: no bound for FrameStretch (input_norm)")
    a = inp.detach().abs()
    with torch.no_grad():
        if isinstance(mod, nn.Conv2d):
            # y_j = sum_i w_i x_i + b: fan_in + 1 terms, every partial sum <= (|W| |x| + |b|)_j.
            b = mod.bias.abs() if mod.bias is not None else None
            return _conv_fan_in(mod) + 1, mod._conv_forward(a, mod.weight.abs(), b)
        if isinstance(mod, nn.Linear):
            b = mod.bias.abs() if mod.bias is not None else None
            return mod.in_features + 1, F.linear(a, mod.weight.abs(), b)
        if _is_lsoftmax(mod):
            if mod.training:
                raise ValueError("forward_error_bound: an L-Softmax head in training mode")
            return mod.in_features, F.linear(a, mod.weight.abs())
        if isinstance(mod, nn.BatchNorm2d) and not mod.training:
            # eval: x * scale + shift, scale = w / sqrt(var + eps) (3 roundings), shift = b - mean
            # * scale (2 more): <= 6 roundings of at most |x| |scale| + |b| + |mean scale|.
            scale = (mod.weight / torch.sqrt(mod.running_var + mod.eps)).abs()[:, None, None]
            shift = (mod.bias.abs() + (mod.running_mean * scale[:, 0, 0]).abs())[:, None, None]
            return 6, a * scale + shift
        if _is_residual_block(mod):
            return 1, out.detach().abs()  # relu(branch + identity): the addition rounds once
        if isinstance(mod, nn.AdaptiveAvgPool2d):
            # a mean of at most n = (ceil(H/h)+1)(ceil(W/w)+1) values:
            # n + 1 roundings of <= mean|x|.
            size = mod.output_size
            oh, ow = size if isinstance(size, tuple) else (size, size)
            oh, ow = oh or a.shape[-2], ow or a.shape[-1]
            n = (-(-a.shape[-2] // oh) + 1) * (-(-a.shape[-1] // ow) + 1)
            return n + 1, F.adaptive_avg_pool2d(a, size) * n
    # any other leaf: at least the rounding of its stored output (first order).
    return 1, out.detach().abs()


def forward_error_bound(
    model: nn.Module,
    x: torch.Tensor,
    fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    input_err: torch.Tensor | float | None = None,
    dtype=torch.float32,
    lam: float = LAMBDA,
    chunk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order bounds on |fn(model, x) in ``dtype`` - fn(model, x) exact| per output element:
    (worst case, probabilistic), both from one set of float64 gradients.

    Worst case: each Conv2d/Linear output y_j = sum_i w_i x_i + b computed in
    ``dtype`` equals an exact one with weights perturbed by at most gamma_{fan_in+1} |w|, so y_j
    is off by at most e_j = gamma_{fan_in+1} (|W| |x| + |b|)_j; other rounding leaves add u |y|
    (storage rounding); ``input_err`` (absolute, broadcast to x) is error already in the input.
    These reach an output z_k through dz_k/dy_j:
        |dz_k| <= sum_layers sum_j |dz_k/dy_j| e_j + sum_i |dz_k/dx_i| input_err_i.
    Probabilistic: the same first-order error is a sum over every single
    rounding r of c_r delta_r with |delta_r| <= u and |c_r| <= |dz_k/dy_j| s_j (a dot product of
    n terms rounds n times, each partial sum at most s_j = (|W||x|+|b|)_j). With the rounding
    errors independent and mean zero (Higham & Mary, SIAM J. Sci. Comput. 41, 2019), Hoeffding
    gives |dz_k| <= lam u sqrt(sum_layers sum_j n_j (dz_k/dy_j)^2 s_j^2 + input terms) except
    with probability 2 exp(-lam^2 / 2): the sqrt(n) of a random walk instead of n, per sum.

    Gradients come from a float64 copy of the model (one batched backward pass per ``chunk``
    output columns; samples must not interact, i.e. no batch statistics). The ReLU kinks make it
    first order: a pre-activation within its error of 0 can switch, which continuous random test
    data reach with a probability of the order of the bound itself.
    """
    fn = fn or (lambda m, t: m(t))
    u = unit_roundoff(dtype)
    m64 = copy.deepcopy(model).double()
    for mod in m64.modules():
        if isinstance(mod, nn.ReLU):
            mod.inplace = False  # each recorded output must stay the layer's own tensor
    outs: list[torch.Tensor] = []
    terms: list[torch.Tensor] = []

    def hook(mod, inp, out):
        if not (isinstance(out, torch.Tensor) and out.is_floating_point() and inp):
            return
        local = _local_error(mod, inp[0], out, u, dtype)
        if local is None:
            return
        n, s = local
        outs.append(out)
        # worst case: gamma_n s; probabilistic: the sum of squares of the n roundings' bounds.
        terms.append((gamma(n, dtype) * s, n * (u * s) ** 2))

    handles = [
        m.register_forward_hook(hook)
        for m in m64.modules()
        if not list(m.children()) or _is_residual_block(m) or _is_lsoftmax(m)
    ]
    try:
        with torch.enable_grad():
            x64 = x.detach().double().requires_grad_(True)
            z = fn(m64, x64)
            zf = z.reshape(z.shape[0], -1)
            e_in = torch.zeros_like(x64)
            if input_err is not None:
                e_in = torch.broadcast_to(
                    torch.as_tensor(input_err, dtype=torch.float64), x64.shape
                )
            inputs = [x64, *outs]
            weights = [(e_in, e_in**2), *terms]
            worst = torch.zeros(zf.shape, dtype=torch.float64)
            squares = torch.zeros(zf.shape, dtype=torch.float64)
            for c0 in range(0, zf.shape[1], chunk):
                cols = torch.arange(c0, min(c0 + chunk, zf.shape[1]))
                eye = torch.zeros((len(cols), *zf.shape), dtype=torch.float64)
                eye[torch.arange(len(cols)), :, cols] = 1.0
                grads = torch.autograd.grad(
                    zf,
                    inputs,
                    grad_outputs=eye,
                    is_grads_batched=True,
                    retain_graph=True,
                    allow_unused=True,
                )
                for g, (w_abs, w_sq) in zip(grads, weights):
                    if g is None:
                        continue
                    shape = (len(cols), g.shape[1], -1)
                    worst[:, cols] += (g.abs() * w_abs).reshape(shape).sum(-1).T
                    squares[:, cols] += (g**2 * w_sq).reshape(shape).sum(-1).T
    finally:
        for h in handles:
            h.remove()
    return worst.reshape(z.shape), (lam * torch.sqrt(squares)).reshape(z.shape)


def softmax_error(logits: torch.Tensor, logit_err: torch.Tensor, dtype=torch.float32):
    """Bound on |softmax(z~) in ``dtype`` - softmax(z)| for |z~ - z| <= logit_err (per row).

    dp_i = p_i (dz_i - sum_j p_j dz_j), so |dp_i| <= 2 p_i (1 - p_i) |dz|_inf <= |dz|_inf / 2,
    used as |dz|_inf; computing it rounds z_i - max (relative u, amplified by exp to u |z_i -
    max|), exp (Sleef/libm: < 1 ulp), the sum of C terms and the division: relative
    gamma_{C+3} + u spread(z).
    """
    z = logits.double()
    p = torch.softmax(z, dim=1)
    spread = (z.max(1, keepdim=True).values - z.min(1, keepdim=True).values).abs()
    own = (gamma(z.shape[1] + 3, dtype) + unit_roundoff(dtype) * spread) * p
    return logit_err.double().amax(dim=1, keepdim=True) + own


def grid_error(theta: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(N, 2) bound on a normalised sampling grid theta @ [x, y, 1] per output coordinate.

    The base coordinates (2i + 1) / W - 1 round twice (<= 3u, being <= 1 in magnitude), the
    3-term product with theta adds gamma_3: |err| <= gamma_6 sum_j |theta_ij|.
    """
    return gamma(6, dtype) * theta.detach().double().abs().sum(-1)


def sample_error(x: torch.Tensor, grid_err: float, fill: float = 0.0, dtype=torch.float32):
    """Bound on |bilinear grid_sample(x - fill) + fill| moved by a grid off by ``grid_err``
    (normalised units), plus its own rounding, per sample (N, 1, 1, 1).

    grid_sample unnormalises ((g + 1) W - 1) / 2 (align_corners=False): g's error becomes
    grid_err max(H, W) / 2 pixels, and its own 4 roundings add <= 8 u max(H, W) (generously).
    A coordinate off by c pixels moves each factor of a bilinear weight by c, so the value by
    at most 2c (one per axis) times the largest difference of neighbours, <= 2 max|x - fill|:
    4 c max|x - fill|. The weights (2 subtractions, a product: 3u each, summing to 1 in exact
    arithmetic) and the 4-term sum round by gamma_16 max|x - fill|; - fill and + fill by
    u (|x - fill| + |fill|) each.
    """
    u = unit_roundoff(dtype)
    h, w = x.shape[-2:]
    c = grid_err * max(h, w) / 2 + 8 * u * max(h, w)
    vmax = (x.double() - fill).abs().amax(dim=tuple(range(1, x.ndim)), keepdim=True)
    return 4 * c * vmax + gamma(16, dtype) * vmax + 2 * u * (vmax + abs(fill))


def resample_error(x: torch.Tensor, fill: float = 0.0, dtype=torch.float32) -> torch.Tensor:
    """Bound on |STN(x) - x| at the identity transform or a mirror (affine_grid + grid_sample).

    The localisation net's last layer has zero weights, so theta is its bias exactly; the grid
    is the base grid, off by 3u (grid_error with sum |theta| = 1), where the exact sampling
    points are the pixel centres: the output is x exactly, up to sample_error.
    """
    return sample_error(x, 3 * unit_roundoff(dtype), fill, dtype)


# ------------------------------------------------------------------------------ L-Softmax


def chebyshev_error(m: int, dtype=torch.float64) -> float:
    """Bound on |psi_from_cos(fl(cos t), m) - psi(t)| (and chebyshev_cos_m vs cos(m t)) on [0, pi].

    cos t itself rounds (u), and |d T_m / dc| <= m^2 on [-1, 1] (Markov), so that moves psi by
    m^2 u; Horner in c^2 over the coefficients of T_m rounds at most 2m + 2 times on partial sums
    bounded by sum |coef| = |T_m(i)|; -2k and the sign add u |psi| <= (2m - 1) u; a reference
    cos(m t) rounds m t (u m pi, amplified by |sin| <= 1) and itself (u).
    """
    from pipeline.models.lsoftmax import chebyshev_coefficients

    u = unit_roundoff(dtype)
    coef = sum(abs(c) for c in chebyshev_coefficients(m))
    return m * m * u + gamma(2 * m + 2, dtype) * coef + (2 * m - 1) * u + u * m * math.pi + u


def lsoftmax_target_error(
    x: torch.Tensor, w: torch.Tensor, m: int, input_rel: float = 0.0, eps: float = 1e-12
) -> torch.Tensor:
    """(B,) bound on |LSoftmaxLinear.margin_logits in float32 - ||w|| ||x|| psi(theta) exact|.

    Rows x (B, D) and their target weights w (B, D), S = |x|.|w|, N = ||x|| ||w||, g = gamma_{D+2}:
    the dot product is off by gamma_D S, each norm (sum of squares, + eps, sqrt) by relative
    g + eps / (2 ||.||^2); so cos by gamma_D S / N + 2 g + 2 u (division, product of norms).
    ``input_rel``: x arrives with each element off by at most that relative amount (float16
    input: 2^-11), which moves cos by input_rel (S / N + 1) and ||x|| by input_rel.
    psi is m^2-Lipschitz in cos (continuous, |T_m'| <= m^2), its own evaluation rounds
    (chebyshev_error), |psi| <= 2m - 1, and N psi rounds twice more.
    """
    x, w = x.detach().double(), w.detach().double()
    d = x.shape[1]
    u = unit_roundoff(torch.float32)
    s = (x.abs() * w.abs()).sum(1)
    xn2, wn2 = (x * x).sum(1), (w * w).sum(1)
    n = torch.sqrt(xn2 * wn2)
    g = gamma(d + 2)
    norm_rel = 2 * g + eps / (2 * xn2.clamp_min(eps)) + eps / (2 * wn2.clamp_min(eps))
    cos_err = gamma(d) * s / n + norm_rel + 2 * u + input_rel * (s / n + 1)
    psi_err = m * m * cos_err + chebyshev_error(m, torch.float32)
    return n * (psi_err + (norm_rel + input_rel + 2 * u) * (2 * m - 1))
