"""The super-resolution generator `G` of the original toolkit (StyleGAN2-like "H" blocks).

Channels of level b are ``chan_base >> b`` clipped to [chan_min, chan_max].
``block0`` lifts the input to chan(0) channels with a 1-voxel convolution;
then one `HBlock` per factor of 2 in `scale_factor`.  An H block carries two
fields: the features x and the output-resolution field y, which starts as the
model's input itself.  Per block:

* x: noise injection (`AddNoise`), linear upsampling by 2 (`Resampler`,
  which cuts the one clamped voxel at each end), a 3-voxel convolution
  chan(b) -> chan(b+1), LeakyReLU(0.2), noise injection, a 3-voxel
  convolution, LeakyReLU(0.2): size s -> 2s - 6;
* y: upsampled the same way (2s - 2), narrowed by 2 more voxels at each
  end (2s - 6), plus ``proj(x)`` (a 1-voxel convolution to out_chan and
  LeakyReLU(0.2)).

The model returns y: size s maps to 2s - 6 per block, and y is the input
linearly upsampled plus learned corrections, so `G` needs in_chan ==
out_chan.  With noise injection the output is random (also in eval mode)
unless the noise strengths are zero, as they are at initialisation.

Parameter names and shapes are the original's; `dim` (2 for planar fields)
is our addition.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .conv import conv_class
from .narrow import narrow_by
from .resample import Resampler


def n_blocks(scale_factor: float) -> int:
    """log2(scale_factor), which must be a non-negative integer."""
    blocks = math.log2(scale_factor) if scale_factor > 0 else -1.0
    if blocks < 0 or not blocks.is_integer():
        raise ValueError(f"G needs scale_factor a power of 2 (1, 2, 4, ...), got {scale_factor}")
    return int(blocks)


class AddNoise(nn.Module):
    """Noise injection: one N(0, 1) draw per voxel, shared by the channels, added with a learned per-channel
    strength ``std`` (initially 0); with `cat`, concatenated as one more channel instead."""

    def __init__(self, cat: bool, chan: int | None = None) -> None:
        super().__init__()
        self.cat = cat
        if not cat:
            self.std = nn.Parameter(torch.zeros([chan]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(x[:, :1])
        if self.cat:
            return torch.cat([x, noise], dim=1)
        return x + self.std.view((-1,) + (1,) * (x.dim() - 2)) * noise


class HBlock(nn.Module):
    """One factor-2 level of `G`; see the module docstring."""

    def __init__(self, prev_chan: int, next_chan: int, out_chan: int, cat_noise: bool, dim: int = 3) -> None:
        super().__init__()
        conv = conv_class(dim)
        extra = int(cat_noise)
        self.upsample = Resampler(dim, 2)
        self.conv = nn.Sequential(
            AddNoise(cat_noise, chan=prev_chan),
            self.upsample,
            conv(prev_chan + extra, next_chan, 3),
            nn.LeakyReLU(0.2, True),
            AddNoise(cat_noise, chan=next_chan),
            conv(next_chan + extra, next_chan, 3),
            nn.LeakyReLU(0.2, True),
        )
        self.proj = nn.Sequential(conv(next_chan, out_chan, 1), nn.LeakyReLU(0.2, True))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv(x)
        y = narrow_by(self.upsample(y), 2)
        return x, y + self.proj(x)


class G(nn.Module):
    """The original's super-resolution generator; see the module docstring. Extra kwargs are ignored."""

    def __init__(self, in_chan: int, out_chan: int, scale_factor: int = 16, chan_base: int = 512,
                 chan_min: int = 64, chan_max: int = 512, cat_noise: bool = False, dim: int = 3,
                 **kwargs) -> None:
        super().__init__()
        if in_chan != out_chan:
            raise ValueError(f"G adds its upsampled input to its output, so it needs in_chan == out_chan, "
                             f"got {in_chan} and {out_chan}")
        if not 1 <= chan_min <= chan_max:
            raise ValueError(f"G needs 1 <= chan_min <= chan_max, got chan_min {chan_min} and chan_max {chan_max}")
        self.scale_factor = scale_factor

        def chan(b: int) -> int:
            return min(max(chan_base >> b, chan_min), chan_max)

        self.block0 = nn.Sequential(conv_class(dim)(in_chan, chan(0), 1), nn.LeakyReLU(0.2, True))
        self.blocks = nn.ModuleList(HBlock(chan(b), chan(b + 1), out_chan, cat_noise, dim)
                                    for b in range(n_blocks(scale_factor)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        x = self.block0(x)
        for block in self.blocks:
            x, y = block(x, y)
        return y
