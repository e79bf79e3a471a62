"""Padding-free convolution blocks, in 2D or 3D.

A block is spelled as a string of layer letters:

* 'C': convolution with `kernel_size` and `stride`, shrinking each axis by kernel_size - 1 (stride 1);
* 'U': transposed convolution, kernel 2 and stride 2: exactly doubles each axis;
* 'D': convolution, kernel 2 and stride 2: halves each axis (which must be even);
* 'B': batch normalization;
* 'A': LeakyReLU activation.

No layer pads, so a block never mixes in values that are not in its input;
the caller pads its input (periodically, or with real neighbours) instead.
"""

from __future__ import annotations

import torch
from torch import nn

from .narrow import narrow_like

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def conv_class(dim: int) -> type[nn.Module]:
    """The plain convolution class for `dim` spatial axes."""
    if dim not in _CONV:
        raise ValueError(f"dim must be 1, 2 or 3, got {dim}")
    return _CONV[dim]


class ConvBlock(nn.Sequential):
    """A sequence of layers spelled by `seq` (see the module docstring).

    The first convolution-like layer ('C', 'U', 'D') maps `in_chan` to
    `mid_chan` channels, the last maps to `out_chan`, and any in between keep
    `mid_chan`; a single one maps `in_chan` straight to `out_chan`.
    `out_chan` defaults to `in_chan`, `mid_chan` to the larger of the two.
    """

    def __init__(self, in_chan: int, out_chan: int | None = None, mid_chan: int | None = None,
                 kernel_size: int = 3, stride: int = 1, seq: str = "CBA", dim: int = 3,
                 negative_slope: float = 0.2) -> None:
        out_chan = in_chan if out_chan is None else out_chan
        mid_chan = max(in_chan, out_chan) if mid_chan is None else mid_chan
        unknown = set(seq) - set("CUDBA")
        if unknown:
            raise ValueError(f"unknown layer letters {sorted(unknown)} in seq {seq!r}; use C, U, D, B, A")
        n_conv = sum(letter in "CUD" for letter in seq)
        chan, layers, i_conv = in_chan, [], 0
        for letter in seq:
            if letter in "CUD":
                i_conv += 1
                new = out_chan if i_conv == n_conv else mid_chan
                layers.append(self._conv(letter, chan, new, kernel_size, stride, dim))
                chan = new
            elif letter == "B":
                layers.append(_NORM[dim](chan))
            else:
                layers.append(nn.LeakyReLU(negative_slope))
        super().__init__(*layers)

    @staticmethod
    def _conv(letter: str, in_chan: int, out_chan: int, kernel_size: int, stride: int, dim: int) -> nn.Module:
        if letter == "U":
            return _CONV_T[dim](in_chan, out_chan, 2, stride=2)
        if letter == "D":
            return conv_class(dim)(in_chan, out_chan, 2, stride=2)
        return conv_class(dim)(in_chan, out_chan, kernel_size, stride=stride)


class ResBlock(nn.Module):
    """A residual block: `ConvBlock(seq)` plus a skip connection narrowed to its output.

    The skip is the identity, or a 1-voxel convolution when the channel count
    changes.  A trailing 'A' in `seq` is applied after the sum, as usual for
    residual blocks.  Resizing layers ('U', 'D') are not allowed: the skip
    could not match them.
    """

    def __init__(self, in_chan: int, out_chan: int | None = None, mid_chan: int | None = None,
                 kernel_size: int = 3, seq: str = "CBACBA", dim: int = 3,
                 negative_slope: float = 0.2) -> None:
        super().__init__()
        if set(seq) & set("UD"):
            raise ValueError(f"ResBlock seq {seq!r} cannot resize ('U' or 'D'); use ConvBlock")
        out_chan = in_chan if out_chan is None else out_chan
        body = seq[:-1] if seq.endswith("A") else seq
        self.body = ConvBlock(in_chan, out_chan, mid_chan, kernel_size, seq=body, dim=dim,
                              negative_slope=negative_slope)
        self.skip = nn.Identity() if in_chan == out_chan else conv_class(dim)(in_chan, out_chan, 1)
        self.act = nn.LeakyReLU(negative_slope) if seq.endswith("A") else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return self.act(y + narrow_like(self.skip(x), y))
