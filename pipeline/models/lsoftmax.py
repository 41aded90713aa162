"""Large-margin softmax (L-Softmax, Liu et al. 2016) as the paper uses it on FC8.

The target-class logit ``||W|| ||x|| cos(theta)`` is replaced during training by
``||W|| ||x|| psi(theta)`` with ``psi(theta) = (-1)^k cos(m theta) - 2k`` on
``[k pi/m, (k+1) pi/m]``, blended with the plain logit as
``(lambda * plain + margin) / (1 + lambda)`` (paper eq. 10).  ``cos(m theta)`` comes from the
Chebyshev expansion in ``cos(theta)``, so the forward pass needs no ``acos`` (whose gradient is
unbounded at +-1); ``k`` comes from comparing ``cos(theta)`` with the thresholds
``cos(j pi / m)``.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

#: Paper (section IV.A): lambda starts at 10000 and is floored at 15.  The decay law is Liu's
#: Caffe one, ``base * (1 + gamma * iteration) ** -power``; gamma/power are our choice (Liu's
#: CIFAR settings) and belong in the training config.
DEFAULT_SCHEDULE: dict[str, float] = {"base": 10000.0, "gamma": 0.12, "power": 1.0, "floor": 15.0}


class LambdaSchedule(nn.Module):
    """lambda(it) = max(floor, base * (1 + gamma * it) ** -power); the iteration is a buffer.

    Keeping the iteration count as a buffer puts it in the model's ``state_dict``, so a checkpoint
    (and ``--resume``) carries the schedule's state; the law's parameters are build arguments.
    A Python mirror of the count lets ``value`` and ``step()`` run without reading the buffer back
    from the GPU (a device sync per training step otherwise).
    """

    def __init__(
        self,
        base: float = DEFAULT_SCHEDULE["base"],
        gamma: float = DEFAULT_SCHEDULE["gamma"],
        power: float = DEFAULT_SCHEDULE["power"],
        floor: float = DEFAULT_SCHEDULE["floor"],
    ) -> None:
        super().__init__()
        if base < 0 or floor < 0 or gamma < 0 or power < 0:
            raise ValueError(
                f"lambda schedule parameters must be >= 0 (base={base}, gamma={gamma}, "
                f"power={power}, floor={floor})"
            )
        self.base = float(base)
        self.gamma = float(gamma)
        self.power = float(power)
        self.floor = float(floor)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64))
        self._count = 0  # mirror of ``iteration``

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        key = prefix + "iteration"
        if key in state_dict:
            self._count = int(state_dict[key])

    def value_at(self, iteration: int) -> float:
        """lambda after ``iteration`` optimiser steps."""
        decayed = self.base * (1.0 + self.gamma * iteration) ** (-self.power)
        return max(self.floor, decayed)

    @property
    def count(self) -> int:
        """Optimiser steps taken so far."""
        return self._count

    @property
    def value(self) -> float:
        """The current lambda."""
        return self.value_at(self._count)

    def step(self) -> float:
        """Advance by one optimiser step; returns the new lambda."""
        self._count += 1
        self.iteration.fill_(self._count)  # asynchronous on a GPU: no host sync
        return self.value

    def params(self) -> dict[str, float]:
        """The law's parameters (what a checkpoint needs to rebuild the schedule)."""
        return {"base": self.base, "gamma": self.gamma, "power": self.power, "floor": self.floor}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v:g}" for k, v in self.params().items()) + f", step={self._count}"


@functools.cache
def chebyshev_coefficients(m: int) -> tuple[float, ...]:
    """Coefficients of cos(m theta) as a polynomial in c = cos(theta), lowest power first.

    From the expansion sum_n (-1)^n C(m, 2n) c^(m-2n) s^(2n) with s^2 = 1 - c^2 (so these are
    the coefficients of the Chebyshev polynomial T_m; e.g. m = 3 gives 4c^3 - 3c).
    """
    coef = [0.0] * (m + 1)
    for n in range(m // 2 + 1):
        outer = (-1) ** n * math.comb(m, 2 * n)
        for i in range(n + 1):  # (1 - c^2)^n = sum_i C(n, i) (-c^2)^i
            coef[m - 2 * n + 2 * i] += outer * math.comb(n, i) * (-1) ** i
    return tuple(float(c) for c in coef)


def chebyshev_cos_m(cos: torch.Tensor, m: int) -> torch.Tensor:
    """cos(m theta) from cos(theta) through the Chebyshev expansion (Horner in cos^2)."""
    coef = chebyshev_coefficients(m)
    # only powers of m's parity are non-zero: T_m(c) = c^(m mod 2) * P(c^2)
    powers = coef[m % 2 :: 2]
    c2 = cos * cos
    acc = c2 * powers[-1] + powers[-2] if len(powers) > 1 else torch.full_like(cos, powers[-1])
    for a in reversed(powers[:-2]):
        acc = acc * c2 + a
    return acc * cos if m % 2 else acc


def interval_index(cos: torch.Tensor, m: int) -> torch.Tensor:
    """k with theta in [k pi/m, (k+1) pi/m], from comparing cos(theta) with cos(j pi/m), j < m."""
    if m == 1:
        return torch.zeros_like(cos)
    # ascending thresholds cos((m-1) pi/m) < ... < cos(pi/m); bucketize counts those < cos, so
    # k = #{j : cos <= cos(j pi/m)} = (m - 1) - bucketize.  psi is continuous at the thresholds.
    key = (m, cos.device, cos.dtype)
    thresholds = _THRESHOLDS.get(key)
    if thresholds is None:  # made once per device: no host-to-device copy per training step
        with torch.inference_mode(False), torch.no_grad():
            values = [math.cos(j * math.pi / m) for j in range(m - 1, 0, -1)]
            thresholds = _THRESHOLDS[key] = torch.tensor(values, dtype=cos.dtype).to(cos.device)
    below = torch.bucketize(cos.detach(), thresholds)
    return (m - 1 - below).to(cos.dtype)


#: Cached interval thresholds, keyed by (m, device, dtype).
_THRESHOLDS: dict[tuple, torch.Tensor] = {}


def psi_from_cos(cos: torch.Tensor, m: int) -> torch.Tensor:
    """psi(theta) = (-1)^k cos(m theta) - 2k, with k found by threshold comparison (no acos)."""
    if m == 1:
        return cos
    k = interval_index(cos, m)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    return sign * chebyshev_cos_m(cos, m) - 2.0 * k


class LSoftmaxLinear(nn.Module):
    """Bias-free FC layer whose target logit gets the large angular margin while training.

    ``forward(x, target)`` returns logits for ``F.cross_entropy``: with a target and in training
    mode the target column is ``(lambda * plain + margin) / (1 + lambda)``; in eval mode or with
    ``target=None`` the plain logits ``x @ W.T`` (what inference and the classifier use).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        margin: int = 3,
        schedule: LambdaSchedule | dict | None = None,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        if int(margin) != margin or margin < 1:
            raise ValueError(f"L-Softmax margin m must be a positive integer, got {margin!r}")
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.margin = int(margin)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        if schedule is None:
            schedule = LambdaSchedule()
        elif isinstance(schedule, dict):
            schedule = LambdaSchedule(**schedule)
        self.schedule = schedule
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # same as nn.Linear

    @property
    def lam(self) -> float:
        """The current blending factor lambda."""
        return self.schedule.value

    def step(self) -> float:
        """Advance the lambda schedule by one optimiser step; returns the new lambda."""
        return self.schedule.step()

    def margin_logits(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The pure margin logit ||W_y|| ||x|| psi(theta_y) per sample (no blending), float32+."""
        dtype = torch.promote_types(x.dtype, torch.float32)  # autocast may hand us fp16
        xf = x.to(dtype)
        w = self.weight.to(dtype)[target]  # (B, D)
        dot = (xf * w).sum(dim=1)
        # sqrt(s + eps) instead of norm(): finite gradient at zero-norm features or weights.
        x_norm = torch.sqrt((xf * xf).sum(dim=1) + self.eps)
        w_norm = torch.sqrt((w * w).sum(dim=1) + self.eps)
        cos = (dot / (x_norm * w_norm)).clamp(-1.0, 1.0)
        return x_norm * w_norm * psi_from_cos(cos, self.margin)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Plain logits, or (in training with a target) logits with the blended margin target."""
        plain = F.linear(x, self.weight)
        if target is None or not self.training:
            return plain
        target = target.long()
        margin = self.margin_logits(x, target)
        lam = self.lam
        target_plain = plain.gather(1, target[:, None])[:, 0].to(margin.dtype)
        blended = (lam * target_plain + margin) / (1.0 + lam)
        return plain.scatter(1, target[:, None], blended[:, None].to(plain.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, m={self.margin}"
