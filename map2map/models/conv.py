"""Padding-free convolution blocks spelled as layer strings, in 2D or 3D, named as the original toolkit's.

A block's layers are spelled by a string `seq` of letters:

* 'C': convolution with `kernel_size` and `stride`, shrinking each axis by kernel_size - 1 (stride 1);
* 'D': convolution, kernel 2 and stride 2: halves each axis (which must be even);
* 'U': transposed convolution, kernel 2 and stride 2: exactly doubles each axis;
* 'B': batch normalization of the channels the layer before it gives;
* 'A': LeakyReLU activation.

Channels: the first convolution-like layer ('C', 'D', 'U') maps `in_chan` to
`mid_chan`, the last maps to `out_chan`, those in between keep `mid_chan`;
a single one maps `in_chan` straight to `out_chan`.  The layers live in a
`Sequential` named ``convs``, so a block's parameters are
``convs.{index of the letter}.weight`` and so on: the names the original
toolkit's checkpoints use.

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
LETTERS = "CDUBA"


def conv_class(dim: int) -> type[nn.Module]:
    """The plain convolution class for `dim` spatial axes."""
    if dim not in _CONV:
        raise ValueError(f"dim must be 1, 2 or 3, got {dim}")
    return _CONV[dim]


def norm_class(dim: int) -> type[nn.Module]:
    """The batch normalization class for `dim` spatial axes."""
    conv_class(dim)
    return _NORM[dim]


def check_seq(seq: str) -> None:
    """Raise ValueError for a layer string with letters other than C, D, U, B, A."""
    unknown = set(seq) - set(LETTERS)
    if unknown:
        raise ValueError(f"unknown layer letters {sorted(unknown)} in seq {seq!r}; use C, D, U, B, A")


def layer_channels(seq: str, in_chan: int, out_chan: int, mid_chan: int) -> list[tuple[int, int]]:
    """(input, output) channels of each letter of `seq`, by the channel rule of the module docstring;
    'B' and 'A' keep the channels of the layer before them."""
    n_conv = sum(letter in "CDU" for letter in seq)
    chans, chan, i_conv = [], in_chan, 0
    for letter in seq:
        if letter in "CDU":
            i_conv += 1
            new = out_chan if i_conv == n_conv else mid_chan
            chans.append((chan, new))
            chan = new
        else:
            chans.append((chan, chan))
    return chans


class ConvBlock(nn.Module):
    """The layers spelled by `seq` (see the module docstring), in ``self.convs``.

    `out_chan` defaults to `in_chan`, `mid_chan` to the larger of the two.
    Activations are ``LeakyReLU(negative_slope)``.
    """

    def __init__(self, in_chan: int, out_chan: int | None = None, mid_chan: int | None = None,
                 kernel_size: int = 3, stride: int = 1, seq: str = "CBA", dim: int = 3,
                 negative_slope: float = 0.01) -> None:
        super().__init__()
        check_seq(seq)
        out_chan = in_chan if out_chan is None else out_chan
        mid_chan = max(in_chan, out_chan) if mid_chan is None else mid_chan
        self.in_chan, self.out_chan, self.mid_chan = in_chan, out_chan, mid_chan
        conv, conv_t, norm = conv_class(dim), _CONV_T[dim], _NORM[dim]
        layers: list[nn.Module] = []
        for letter, (cin, cout) in zip(seq, layer_channels(seq, in_chan, out_chan, mid_chan)):
            if letter == "C":
                layers.append(conv(cin, cout, kernel_size, stride=stride))
            elif letter == "D":
                layers.append(conv(cin, cout, 2, stride=2))
            elif letter == "U":
                layers.append(conv_t(cin, cout, 2, stride=2))
            elif letter == "B":
                layers.append(norm(cin))
            else:
                layers.append(nn.LeakyReLU(negative_slope))
        self.convs = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class ResBlock(ConvBlock):
    """A residual block: the layers of `seq` plus a skip path added to their output.

    A trailing 'A' of `seq` is taken out of ``convs`` and applied after the
    sum (as ``act``).  The skip path (``skip``) is a 1-voxel convolution from
    `in_chan` to `out_chan` when `out_chan` is given, else the identity; it
    is narrowed to the size of the ``convs`` output (`narrow_like`).
    Resizing layers ('U', 'D') are not allowed: the skip could not match them.
    """

    def __init__(self, in_chan: int, out_chan: int | None = None, mid_chan: int | None = None,
                 kernel_size: int = 3, seq: str = "CBACBA", dim: int = 3,
                 negative_slope: float = 0.01) -> None:
        check_seq(seq)
        if set(seq) & set("UD"):
            raise ValueError(f"ResBlock seq {seq!r} cannot resize ('U' or 'D'); use ConvBlock")
        last_act = seq.endswith("A")
        super().__init__(in_chan, out_chan, mid_chan, kernel_size, seq=seq[:-1] if last_act else seq, dim=dim,
                         negative_slope=negative_slope)
        self.act = nn.LeakyReLU(negative_slope) if last_act else None
        self.skip = None if out_chan is None else conv_class(dim)(in_chan, out_chan, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.convs(x)
        y = y + narrow_like(x if self.skip is None else self.skip(x), y)
        return y if self.act is None else self.act(y)
