"""Super-resolution generator: output `scale_factor` times finer than the input.

For input size n per axis and width w:

    head   'CA'      [w]   n - 2
    stage  'UACACA'  [w]   x2 then - 4        (one per factor of 2)
    tail   1-voxel conv to out_chan

so the output is 2n - 8 for scale_factor 2, 4n - 20 for 4, and in general
s * (n - 2) - 4 * (s - 1) = s * n - 6 s + 4 per axis.  With the bypass on
(in_chan == out_chan by default) the input, upsampled by `resample`, is added,
so the network learns the small-scale correction to linear interpolation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .bypass import resolve_bypass
from .conv import ConvBlock, conv_class
from .init import init_weights
from .narrow import narrow_like
from .resample import resample


def _n_stages(scale_factor: float) -> int:
    """log2(scale_factor), which must be a non-negative integer."""
    stages = math.log2(scale_factor) if scale_factor > 0 else -1.0
    if stages < 0 or not stages.is_integer():
        raise ValueError(f"G needs scale_factor a power of 2 (1, 2, 4, ...), got {scale_factor}")
    return int(stages)


class G(nn.Module):
    """Padding-free super-resolution generator; see the module docstring. Extra kwargs are ignored."""

    def __init__(self, in_chan: int, out_chan: int, scale_factor: float = 2, dim: int = 3,
                 width: int = 16, bypass: bool | None = None, **kwargs) -> None:
        super().__init__()
        self.scale_factor = scale_factor
        self.bypass = resolve_bypass(bypass, in_chan, out_chan)
        self.head = ConvBlock(in_chan, width, seq="CA", dim=dim)
        self.stages = nn.Sequential(*[ConvBlock(width, width, seq="UACACA", dim=dim)
                                      for _ in range(_n_stages(scale_factor))])
        self.tail = conv_class(dim)(width, out_chan, 1)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tail(self.stages(self.head(x)))
        return y + narrow_like(resample(x, self.scale_factor), y) if self.bypass else y
