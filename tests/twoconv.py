"""A light user model, loaded the way users load their own (``--callback-at tests --model
twoconv.TwoConv``): a 3-voxel convolution to `width` channels, LeakyReLU, a 1-voxel convolution back, in
2D or 3D.  Its pad is 1 and it costs little per voxel, so tests and the inference benchmark that use it
exercise the I/O, stitching and scheduling around the model."""

from __future__ import annotations

from torch import nn


class TwoConv(nn.Module):
    def __init__(self, in_chan: int, out_chan: int, width: int = 8, dim: int = 3, **kwargs) -> None:
        super().__init__()
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[dim]
        self.net = nn.Sequential(conv(in_chan, width, 3), nn.LeakyReLU(0.2), conv(width, out_chan, 1))

    def forward(self, x):
        return self.net(x)
