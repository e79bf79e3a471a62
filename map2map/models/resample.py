"""Linear up- and downsampling of (N, C, *spatial) fields, with the edge effects cut away.

`torch.nn.functional.interpolate` (align_corners=False) places output voxel j
of an axis at input coordinate x_j = (j + 1/2) / s - 1/2 for a scale factor s.
Where x_j falls outside [0, n - 1] the interpolation clamps to the edge voxel,
i.e. the value depends on a neighbour the input does not have.  With a
periodic or padded input those voxels are wrong, so `resample` removes them:

* upsampling (s > 1): ceil((s - 1) / 2) voxels from each end of every axis,
  e.g. 1 for s = 2 or 3, 2 for s = 4 or 5, 4 for s = 8;
* downsampling (s <= 1): none, every output voxel has both neighbours.

Every axis length times s must be an integer, which keeps x_j symmetric about
the centre of the axis, so the same number goes from both ends.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .narrow import narrow_by

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def resample_edge(scale_factor: float) -> int:
    """Number of output voxels at each end of an axis that `resample` narrows away."""
    return math.ceil((scale_factor - 1) / 2) if scale_factor > 1 else 0


def resample(x: torch.Tensor, scale_factor: float, narrow: bool = True) -> torch.Tensor:
    """Resample `x` by `scale_factor` with (bi/tri)linear interpolation.

    The output has n * scale_factor voxels per axis, less
    `resample_edge(scale_factor)` at each end when `narrow` is true.
    """
    ndim = x.dim() - 2
    if ndim not in _MODES:
        raise ValueError(f"resample needs 1 to 3 spatial axes, got a tensor of shape {tuple(x.shape)}")
    if scale_factor <= 0:
        raise ValueError(f"scale_factor must be positive, got {scale_factor}")
    for n in x.shape[2:]:
        if not float(n * scale_factor).is_integer():
            raise ValueError(f"axis length {n} times scale_factor {scale_factor} is not an integer")
    x = F.interpolate(x, scale_factor=scale_factor, mode=_MODES[ndim], align_corners=False)
    return narrow_by(x, resample_edge(scale_factor)) if narrow else x


class Resampler(nn.Module):
    """Module form of `resample` for `ndim` spatial axes (the original toolkit's signature), so a model can
    hold a resampling step (and `total_stride` can see it)."""

    def __init__(self, ndim: int, scale_factor: float, narrow: bool = True) -> None:
        super().__init__()
        if ndim not in _MODES:
            raise ValueError(f"Resampler needs ndim 1, 2 or 3, got {ndim}")
        self.ndim = ndim
        self.scale_factor = scale_factor
        self.narrow = narrow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() - 2 != self.ndim:
            raise ValueError(f"Resampler for {self.ndim} spatial axes got a tensor of shape {tuple(x.shape)}")
        return resample(x, self.scale_factor, self.narrow)

    def extra_repr(self) -> str:
        return f"ndim={self.ndim}, scale_factor={self.scale_factor}, narrow={self.narrow}"
