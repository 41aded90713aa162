"""Spatial transformer (Jaderberg et al. 2015) in front of the backbone, as in the paper's Fig. 2.

Localisation net: two conv layers, a max-pool, a fully connected layer and a regression layer to
the six affine parameters, initialised to the identity transform; then ``F.affine_grid`` and
bilinear ``F.grid_sample`` (``align_corners=False``, so the identity reproduces the input exactly).
The localisation net looks at a copy down-sampled to ``loc_size`` pixels (the transform is a
global, low-frequency quantity), while the sampler works on the full-resolution input: this keeps
its cost a small fraction of AlexNet's (paper: +22 %).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Identity affine transform [[1, 0, 0], [0, 1, 0]] flattened.
IDENTITY_THETA = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


class SpatialTransformer(nn.Module):
    """STN: x (B, C, H, W) -> x warped by a learned affine transform, same shape."""

    def __init__(
        self, in_chans: int = 1, loc_size: int = 64, hidden: int = 64, fill: float = 0.0
    ) -> None:
        super().__init__()
        if loc_size < 32:
            raise ValueError(f"STN loc_size must be >= 32 px, got {loc_size}")
        self.in_chans = int(in_chans)
        self.loc_size = int(loc_size)
        # The input value of a black sky pixel: what a shift or zoom-out brings in from outside
        # the frame. Zero padding would be mid-grey after normalisation, a border no frame has.
        self.fill = float(fill)
        self.localization = nn.Sequential(
            nn.Conv2d(in_chans, 8, kernel_size=7, stride=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 16, kernel_size=5, stride=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, stride=2),
        )
        with torch.no_grad():
            n_flat = self.localization(torch.zeros(1, in_chans, loc_size, loc_size)).numel()
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(n_flat, hidden), nn.ReLU(inplace=True))
        self.regress = nn.Linear(hidden, 6)
        # Identity at start: the backbone first sees the untouched image, the STN learns departures.
        nn.init.zeros_(self.regress.weight)
        with torch.no_grad():
            self.regress.bias.copy_(torch.tensor(IDENTITY_THETA))

    def theta(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, 2, 3) affine parameters predicted for ``x``."""
        small = x
        if x.shape[-2:] != (self.loc_size, self.loc_size):
            small = F.interpolate(
                x, size=(self.loc_size, self.loc_size), mode="bilinear", align_corners=False
            )
        return self.regress(self.fc(self.localization(small))).view(-1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Warp ``x`` by its predicted affine transform at full resolution."""
        grid = affine_grid(self.theta(x), x.shape[-2], x.shape[-1]).to(x.dtype)
        if not self.fill:
            return F.grid_sample(
                x, grid, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        out = F.grid_sample(
            x - self.fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        return out + self.fill


def _base_grid(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(3, H*W) rows x, y, 1 of the output pixel centres in [-1, 1] (align_corners=False)."""
    xs = (torch.arange(w, device=device, dtype=dtype) * 2 + 1) / w - 1
    ys = (torch.arange(h, device=device, dtype=dtype) * 2 + 1) / h - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1), torch.ones_like(gx).reshape(-1)])


def affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``F.affine_grid(theta, (N, C, h, w), align_corners=False)`` as one matrix product.

    torch's version fills an (N, H, W, 3) base grid and runs a batched product with K = 3 on
    every call; here (N*2, 3) @ (3, H*W) is one plain matmul on a base grid that is built once
    per size and device (it is a constant), and the result is a (N, H, W, 2) strided view.
    """
    theta = theta.float() if theta.dtype in (torch.float16, torch.bfloat16) else theta
    key = (h, w, theta.device, theta.dtype)
    base = _BASE_GRIDS.get(key)
    if base is None:
        # Built outside inference mode: an inference tensor could not be reused under autograd.
        with torch.inference_mode(False), torch.no_grad():
            base = _BASE_GRIDS[key] = _base_grid(h, w, theta.device, theta.dtype)
    n = theta.shape[0]
    # Coordinates in half precision would be off by ~1 pixel at 227 px: keep autocast out.
    with torch.autocast(theta.device.type, enabled=False):
        grid = theta @ base
    return grid.view(n, 2, h, w).permute(0, 2, 3, 1)


#: Cached base grids, keyed by (h, w, device, dtype): a few per process (one per input size).
_BASE_GRIDS: dict[tuple, torch.Tensor] = {}
