"""U-Net: two 2x levels of padding-free convolutions with concatenated skip connections.

Layout, for `width` w (channels in brackets) and input size n per axis:

    conv_l0 [w]   n - 4  ──────────────────────────── skip ─┐
      down_l0 [2w]   /2                                     │
      conv_l1 [2w]  - 4  ────────────── skip ─┐             │
        down_l1 [4w] /2                       │             │
        conv_c [4w] - 4                       │             │
        up_r1 [2w]  x2   ── concat (narrowed) ┘             │
      conv_r1 [2w]  - 4                                     │
      up_r0 [w]     x2   ── concat (narrowed) ──────────────┘
    conv_r0 [w]    - 4,  then a 1-voxel conv to out_chan

so the output is n - 40 voxels per axis (a pad of 20 each side), and n must be
a multiple of 4 (the total stride) for the levels to line up; otherwise the
narrowing of a skip connection raises ValueError.
"""

from __future__ import annotations

import torch
from torch import nn

from .bypass import resolve_bypass
from .conv import ConvBlock, conv_class
from .init import init_weights
from .narrow import narrow_like


class UNet(nn.Module):
    """U-Net with plain 'CACA' blocks (no normalization); see the module docstring.

    Convolutions are He-initialized (`init_weights`) so the deep level is not
    damped at the start of training.  Extra keyword arguments (e.g. the `scale_factor` every model receives) are ignored.
    """

    down_seq = "DA"
    up_seq = "UA"

    def __init__(self, in_chan: int, out_chan: int, bypass: bool | None = None, dim: int = 3,
                 width: int = 16, **kwargs) -> None:
        super().__init__()
        w = width
        self.bypass = resolve_bypass(bypass, in_chan, out_chan)
        self.conv_l0 = self.block(in_chan, w, dim)
        self.down_l0 = ConvBlock(w, 2 * w, seq=self.down_seq, dim=dim)
        self.conv_l1 = self.block(2 * w, 2 * w, dim)
        self.down_l1 = ConvBlock(2 * w, 4 * w, seq=self.down_seq, dim=dim)
        self.conv_c = self.block(4 * w, 4 * w, dim)
        self.up_r1 = ConvBlock(4 * w, 2 * w, seq=self.up_seq, dim=dim)
        self.conv_r1 = self.block(4 * w, 2 * w, dim)
        self.up_r0 = ConvBlock(2 * w, w, seq=self.up_seq, dim=dim)
        self.conv_r0 = self.block(2 * w, w, dim)
        self.conv_out = conv_class(dim)(w, out_chan, 1)
        init_weights(self)
        if self.bypass:  # the residual branch starts at zero: the untrained model is the identity map
            nn.init.zeros_(self.conv_out.weight)

    @staticmethod
    def block(in_chan: int, out_chan: int, dim: int) -> nn.Module:
        """The block at every level: two 3-voxel convolutions, each followed by an activation."""
        return ConvBlock(in_chan, out_chan, seq="CACA", dim=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0 = self.conv_l0(x)
        y1 = self.conv_l1(self.down_l0(y0))
        y = self.conv_c(self.down_l1(y1))
        y = self.up_r1(y)
        y = self.conv_r1(torch.cat([narrow_like(y1, y), y], dim=1))
        y = self.up_r0(y)
        y = self.conv_r0(torch.cat([narrow_like(y0, y), y], dim=1))
        y = self.conv_out(y)
        return y + narrow_like(x, y) if self.bypass else y
