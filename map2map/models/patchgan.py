"""The original toolkit's patch discriminators, `PatchGAN` and `PatchGAN42`.

A patch discriminator scores every patch of its input field: the output is a
field of logits (one channel by default), each seeing a cube of the input.

* `PatchGAN`: four padding-free `ConvBlock`s, 'CA' in_chan -> 32, 'CBA'
  32 -> 64, 'CBA' 64 -> 128, 'C' 128 -> out_chan: size n -> n - 8, each
  logit seeing 9 voxels per axis.
* `PatchGAN42`: three 4-voxel convolutions of stride 2 (64, 128, 256
  channels; batch norm after the last two; LeakyReLU(0.2)), then a 1-voxel
  convolution to out_chan; each strided convolution maps size n to
  (n - 4) // 2 + 1 per axis, so the output is about n / 8.

Parameter names and shapes are the original's; `dim` (2 for planar fields)
is our addition.
"""

from __future__ import annotations

import torch
from torch import nn

from .conv import ConvBlock, conv_class, norm_class


class PatchGAN(nn.Module):
    """The original's PatchGAN; see the module docstring. Extra keyword arguments are ignored."""

    min_side = 9  # voxels per side of the smallest input it scores (four 3-voxel convolutions, no padding)

    def __init__(self, in_chan: int, out_chan: int = 1, dim: int = 3, **kwargs) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            ConvBlock(in_chan, 32, seq="CA", dim=dim),
            ConvBlock(32, 64, seq="CBA", dim=dim),
            ConvBlock(64, 128, seq="CBA", dim=dim),
            ConvBlock(128, out_chan, seq="C", dim=dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class PatchGAN42(nn.Module):
    """The original's PatchGAN42; see the module docstring. Extra keyword arguments are ignored."""

    def __init__(self, in_chan: int, out_chan: int = 1, dim: int = 3, **kwargs) -> None:
        super().__init__()
        conv, norm = conv_class(dim), norm_class(dim)
        self.convs = nn.Sequential(
            conv(in_chan, 64, 4, stride=2),
            nn.LeakyReLU(0.2, True),
            conv(64, 128, 4, stride=2),
            norm(128),
            nn.LeakyReLU(0.2, True),
            conv(128, 256, 4, stride=2),
            norm(256),
            nn.LeakyReLU(0.2, True),
            conv(256, out_chan, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)
