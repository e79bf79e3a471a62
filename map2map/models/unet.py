"""U-Net and V-Net: two 2x levels of padding-free blocks with concatenated skip connections.

The layout is the original toolkit's, for `width` w (channels in brackets;
the original has w = 64) and input size n per axis:

    conv_l0  'CACBA'   [w]    n - 4  ─────────────────────── narrow_by 16 ─┐
      down_l0  'DBA'   [w]    / 2                                          │
      conv_l1  'CBACBA' [w]   - 4  ──────────── narrow_by 4 ─┐             │
        down_l1 'DBA'  [w]    / 2                            │             │
        conv_c 'CBACBA' [w]   - 4                            │             │
        up_r1  'UBA'   [w]    x 2  ── concat [2w] ───────────┘             │
      conv_r1  'CBACBA' [w]   - 4                                          │
      up_r0    'UBA'   [w]    x 2  ── concat [2w] ─────────────────────────┘
    conv_r0    'CAC'   [out]  - 4

so the output is n - 40 voxels per axis (a pad of 20 each side), and n must
be a multiple of 4, the total stride, for the levels to line up (other sizes
fail in the concatenation).  With the global bypass on (by default exactly
when in_chan == out_chan) the input, narrowed by 20, is added to the output,
so the network learns the correction to its input.

`UNet` uses plain `ConvBlock`s at every level; `VNet` uses `ResBlock`s (a
1-voxel convolution skip around each level's block), which trains faster.
Parameter names and shapes are the original's, so its checkpoints load.

Our additions, as keywords: `width`; `dim` (2 for planar fields);
`identity_init`, which He-initialises the convolutions (`init_weights`) and
zeroes the output layers of ``conv_r0``, so that an untrained model with the
bypass is exactly the identity map.
"""

from __future__ import annotations

import torch
from torch import nn

from .bypass import resolve_bypass
from .conv import ConvBlock
from .init import init_weights
from .narrow import narrow_by

PAD = 20  # voxels each end of every axis that the layout consumes


class UNet(nn.Module):
    """The original's U-Net with plain blocks; see the module docstring. Extra keyword arguments (e.g. the
    `scale_factor` every model receives) are ignored."""

    def __init__(self, in_chan: int, out_chan: int, bypass: bool | None = None, dim: int = 3,
                 width: int = 64, identity_init: bool = False, **kwargs) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a whole number of channels, at least 1; got {width!r}")
        w = width
        self.bypass = resolve_bypass(bypass, in_chan, out_chan)
        self.conv_l0 = self.block(in_chan, w, "CACBA", dim)
        self.down_l0 = ConvBlock(w, seq="DBA", dim=dim)
        self.conv_l1 = self.block(w, w, "CBACBA", dim)
        self.down_l1 = ConvBlock(w, seq="DBA", dim=dim)
        self.conv_c = self.block(w, w, "CBACBA", dim)
        self.up_r1 = ConvBlock(w, seq="UBA", dim=dim)
        self.conv_r1 = self.block(2 * w, w, "CBACBA", dim)
        self.up_r0 = ConvBlock(w, seq="UBA", dim=dim)
        self.conv_r0 = self.block(2 * w, out_chan, "CAC", dim)
        if identity_init:
            init_weights(self, negative_slope=0.01)
            last = [self.conv_r0.convs[-1], getattr(self.conv_r0, "skip", None)]
            with torch.no_grad():
                for conv in filter(None, last):
                    conv.weight.zero_()
                    conv.bias.zero_()

    @staticmethod
    def block(in_chan: int, out_chan: int, seq: str, dim: int) -> nn.Module:
        """The block at each level: plain layers."""
        return ConvBlock(in_chan, out_chan, seq=seq, dim=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(n % 4 or n <= 2 * PAD for n in x.shape[2:]):
            raise ValueError(f"{type(self).__name__} needs every axis a multiple of 4 and larger than {2 * PAD}, "
                             f"got an input of shape {tuple(x.shape)}")
        y0 = self.conv_l0(x)
        y1 = self.conv_l1(self.down_l0(y0))
        y = self.up_r1(self.conv_c(self.down_l1(y1)))
        y = self.up_r0(self.conv_r1(torch.cat([narrow_by(y1, 4), y], dim=1)))
        y = self.conv_r0(torch.cat([narrow_by(y0, 16), y], dim=1))
        return y + narrow_by(x, PAD) if self.bypass else y
