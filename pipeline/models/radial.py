"""Radial edge channels: a frame's brightness gradient split along and across the sky's radius.

A radial corona is rays that converge on the (magnetic) zenith, an arc is a band across the
sky: what tells them apart is how edges lie relative to the radius at the place they are, a
cue a convolution (the same filter everywhere) can only learn through its later, position-aware
layers. This fixed, parameter-free layer hands it over: channel 0 is the frame, channel 1 the
gradient along the radius (edges of bands lying across it), channel 2 the gradient across it
(edges of rays lying along it), about the frame's centre, the zenith after preprocessing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Sobel kernels sum |w| = 8 per axis: dividing by 8 gives the per-pixel slope; doubling it
#: again puts a typical ray's edge in the model's O(1) input range (inputs are (x - 0.5) / 0.25).
SOBEL_SCALE = 2.0 / 8.0


def _unit_fields(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(2, 2, H, W): the radial unit vector (ux, uy) and the tangential (-uy, ux) per pixel."""
    c = (torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2) / (size / 2)
    y, x = torch.meshgrid(c, c, indexing="ij")
    r = torch.sqrt(x * x + y * y).clamp_min(1e-6)
    ux, uy = x / r, y / r
    return torch.stack([torch.stack([ux, uy]), torch.stack([-uy, ux])])


class RadialEdges(nn.Module):
    """x (B, 1, H, W) -> (B, 3, H, W): the frame, its radial and its tangential gradient."""

    def __init__(self) -> None:
        super().__init__()
        gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        kernels = torch.stack([gx, gx.T]).unsqueeze(1) * SOBEL_SCALE
        self.register_buffer("sobel", kernels, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"radial edges need square frames, got {tuple(x.shape[-2:])}")
        grad = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self.sobel.to(x.dtype))
        fields = _unit_fields(x.shape[-1], x.dtype, x.device)
        radial = (grad * fields[0]).sum(1, keepdim=True)
        tangential = (grad * fields[1]).sum(1, keepdim=True)
        return torch.cat([x, radial, tangential], dim=1)
