"""V-Net: the `UNet` layout with residual blocks (see `map2map.models.unet`)."""

from __future__ import annotations

from torch import nn

from .conv import ResBlock
from .unet import UNet


class VNet(UNet):
    """The original's V-Net: `UNet` with a `ResBlock` at every level. Extra keyword arguments are ignored."""

    @staticmethod
    def block(in_chan: int, out_chan: int, seq: str, dim: int) -> nn.Module:
        """The block at each level: residual, with a 1-voxel convolution skip."""
        return ResBlock(in_chan, out_chan, seq=seq, dim=dim)
