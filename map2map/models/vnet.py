"""V-Net: the U-Net layout with residual, batch-normalized blocks.

Same geometry as `UNet` (output n - 40 per axis, n a multiple of 4), but each
level is a `ResBlock('CBACBA')` and the strided down/up convolutions are
followed by batch normalization, which trains faster and deeper.
"""

from __future__ import annotations

from torch import nn

from .conv import ResBlock
from .unet import UNet


class VNet(UNet):
    """V-Net: `UNet` with residual batch-normalized blocks; extra keyword arguments are ignored."""

    down_seq = "DBA"
    up_seq = "UBA"

    @staticmethod
    def block(in_chan: int, out_chan: int, dim: int) -> nn.Module:
        """A residual block of two batch-normalized 3-voxel convolutions."""
        return ResBlock(in_chan, out_chan, seq="CBACBA", dim=dim)
