"""Style-conditioned (modulated) convolutions and the styled V-Net, in 2D or 3D.

A *style* is a vector of `style_size` numbers per sample (e.g. cosmological
parameters), given to every layer as a tensor of shape (N, style_size) next to
the field.  Terms:

* *modulation*: a layer turns the style of sample n into one *scale* per input
  channel, ``scale = style[n] @ style_weight.T + style_bias``, and multiplies
  its convolution weight by it along the input-channel axis;
* *demodulation*: the modulated weight is then divided, separately for every
  output channel, by the square root of its sum of squares over the input
  channel and kernel axes (plus `DEMOD_EPS`), so the style changes the mix of
  input channels but not the scale of the output (on by default, as in the
  original; ``demodulate=False`` keeps the modulated weight as it is, so a
  style can scale a layer's output, e.g. by the growth factor);
* *kind* of a modulated convolution, spelled with the letters of the layer
  strings of `map2map.models.conv`: 'C' a k-voxel convolution of stride 1
  (k = 1 for the skip path of a residual block), 'D' a 2-voxel convolution of
  stride 2 (halves each axis), 'U' a 2-voxel transposed convolution of stride 2
  (doubles each axis; its weight is laid out (in, out, kernel...) as torch's).

Each sample gets its own weight; a batch is computed as one grouped
convolution (the batch folded into the channel axis, one group per sample), so
every sample of a batch gets exactly what it would get alone.

Blocks follow the layer strings and channel rule of `map2map.models.conv`,
with every layer called as ``layer(x, style)`` (batch normalization and
activations ignore the style).  `StyledVNet` is the original toolkit's
styled-emulator V-Net: the same layout, narrowing and bypass as its `VNet`,
with these blocks, so its checkpoints load parameter for parameter.
`StyledG` is the styled counterpart of the super-resolution generator
`map2map.models.srsgan.G`: the same levels, sizes and channel rule, every
convolution modulated.

*Style init* (``style_init`` of both models): ``"uniform"`` (the default,
the original's) draws each modulation's style weight as torch's default
linear layer, so at the start every style gives the network other weights,
by up to the whole of each scale; ``"zero"`` starts every style weight at 0
(`zero_style_weights`): the network starts as one unstyled network for every
style and takes on the dependence on the style that training asks for.  A
style the target barely depends on (D, when the input is already the
Zel'dovich displacement at D) then leaves little spurious dependence behind,
which matters for derivatives in the style such as velocities.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .bypass import resolve_bypass
from .conv import check_seq, layer_channels
from .narrow import narrow_by, narrow_like
from .resample import Resampler
from .srsgan import AddNoise, n_blocks

DEMOD_EPS = 1e-8  # added to the sum of squares before the square root of the demodulation
KINDS = "CDU"
STYLE_INITS = ("uniform", "zero")  # see "style init" in the module docstring

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def zero_style_weights(module: nn.Module) -> None:
    """Set the style weight of every `ConvStyled` in `module` to 0, so that each modulation's scale is its
    style bias for every style ("zero" style init, module docstring)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, ConvStyled):
                m.style_weight.zero_()


def apply_style_init(module: nn.Module, style_init: str) -> None:
    """The style init `style_init` (one of `STYLE_INITS`) for a freshly built `module`; ValueError for others."""
    if style_init not in STYLE_INITS:
        raise ValueError(f"style_init must be one of {', '.join(STYLE_INITS)}, got {style_init!r}")
    if style_init == "zero":
        zero_style_weights(module)


def check_style(style: torch.Tensor, batch: int, style_size: int) -> None:
    """Raise ValueError unless `style` has the shape (`batch`, `style_size`)."""
    shape = tuple(style.shape)
    if shape != (batch, style_size):
        raise ValueError(f"style must have shape (batch, style_size) = ({batch}, {style_size}), got {shape}")


class ConvStyled(nn.Module):
    """A modulated convolution of kind 'C', 'D' or 'U', demodulated unless `demodulate` is False (see the
    module docstring).

    `kernel_size` is the kernel of a 'C' convolution (3 unless given); 'D'
    and 'U' always use 2.  Parameters: ``style_weight`` (in_chan,
    style_size), ``style_bias`` (in_chan), ``weight`` (out_chan, in_chan,
    kernel...) or for 'U' (in_chan, out_chan, kernel...), ``bias``
    (out_chan).  The weight and bias are drawn as torch's default
    convolution (uniform within 1/sqrt(fan-in), fan-in = in_chan times the
    kernel volume), the style weight as torch's default linear layer, and
    the style bias starts at 1 (modulation starts near the identity).
    """

    def __init__(self, style_size: int, in_chan: int, out_chan: int, kind: str = "C",
                 kernel_size: int | None = None, dim: int = 3, demodulate: bool = True) -> None:
        super().__init__()
        if dim not in _CONV_FN:
            raise ValueError(f"dim must be 1, 2 or 3, got {dim}")
        if kind not in KINDS or len(kind) != 1:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if kind in "DU" and kernel_size not in (None, 2):
            raise ValueError(f"a {kind!r} convolution has kernel 2, got kernel_size={kernel_size}")
        kernel_size = (3 if kind == "C" else 2) if kernel_size is None else kernel_size
        self.style_size, self.in_chan, self.out_chan = style_size, in_chan, out_chan
        self.kind, self.kernel_size, self.dim, self.demodulate = kind, kernel_size, dim, bool(demodulate)
        self.stride = 1 if kind == "C" else 2
        shape = (in_chan, out_chan) if kind == "U" else (out_chan, in_chan)
        self.style_weight = nn.Parameter(torch.empty(in_chan, style_size))
        self.style_bias = nn.Parameter(torch.empty(in_chan))
        self.weight = nn.Parameter(torch.empty(*shape, *(kernel_size,) * dim))
        self.bias = nn.Parameter(torch.empty(out_chan))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the parameters afresh (see the class docstring)."""
        conv_bound = 1 / math.sqrt(self.in_chan * self.kernel_size ** self.dim)
        style_bound = 1 / math.sqrt(self.style_size)
        with torch.no_grad():
            self.style_weight.uniform_(-style_bound, style_bound)
            self.style_bias.fill_(1)
            self.weight.uniform_(-conv_bound, conv_bound)
            self.bias.uniform_(-conv_bound, conv_bound)

    def extra_repr(self) -> str:
        return (f"style_size={self.style_size}, {self.in_chan}, {self.out_chan}, kind={self.kind!r}, "
                f"kernel_size={self.kernel_size}, dim={self.dim}" + ("" if self.demodulate else ", demodulate=False"))

    def sample_weights(self, style: torch.Tensor) -> torch.Tensor:
        """The modulated (and, with `demodulate`, demodulated) weight of every sample of `style`
        (N, style_size): shape (N, *weight.shape)."""
        scale = F.linear(style, self.style_weight, self.style_bias)  # (N, in_chan)
        in_axis = 1 if self.kind == "U" else 2  # the input-channel axis of the per-sample weights
        shape = [scale.shape[0], 1, 1, *(1,) * self.dim]
        shape[in_axis] = self.in_chan
        w = self.weight * scale.reshape(shape)
        if not self.demodulate:
            return w
        fan_in_axes = (in_axis, *range(3, w.dim()))
        return w * torch.rsqrt(w.square().sum(dim=fan_in_axes, keepdim=True) + DEMOD_EPS)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        check_style(style, n, self.style_size)
        w = self.sample_weights(style)
        w = w.reshape(n * w.shape[1], *w.shape[2:])  # the samples become groups
        x = x.reshape(1, n * x.shape[1], *x.shape[2:])
        conv = _CONV_T_FN[self.dim] if self.kind == "U" else _CONV_FN[self.dim]
        y = conv(x, w, stride=self.stride, groups=n)
        y = y.reshape(n, self.out_chan, *y.shape[2:])
        return y + self.bias.reshape(1, -1, *(1,) * self.dim)


class BatchNormStyled(nn.modules.batchnorm._BatchNorm):
    """Batch normalization of `num_features` channels over `dim` spatial axes; ``forward(x, style)``
    ignores the style.  Parameters and buffers are those of ``nn.BatchNorm{dim}d``."""

    def __init__(self, num_features: int, dim: int = 3, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.dim = dim

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != self.dim + 2:
            raise ValueError(f"expected a {self.dim + 2}D input (N, C, {self.dim} spatial axes), "
                             f"got {input.dim()}D")

    def forward(self, x: torch.Tensor, style: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


class LeakyReLUStyled(nn.LeakyReLU):
    """LeakyReLU (slope 0.01 unless given); ``forward(x, style)`` ignores the style."""

    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__(negative_slope)

    def forward(self, x: torch.Tensor, style: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


class ConvStyledBlock(nn.Module):
    """The layers spelled by `seq` (see `map2map.models.conv`), modulated by a style of `style_size`.

    'C', 'D' and 'U' are `ConvStyled` of that kind, 'B' is `BatchNormStyled`,
    'A' is `LeakyReLUStyled`; they live in the ``ModuleList`` ``convs`` and
    are called in order as ``layer(x, style)``.  `out_chan` defaults to
    `in_chan`, `mid_chan` to the larger of the two; `demodulate` is given to
    every `ConvStyled`.
    """

    def __init__(self, style_size: int, in_chan: int, out_chan: int | None = None,
                 mid_chan: int | None = None, seq: str = "CBA", dim: int = 3, demodulate: bool = True) -> None:
        super().__init__()
        check_seq(seq)
        out_chan = in_chan if out_chan is None else out_chan
        mid_chan = max(in_chan, out_chan) if mid_chan is None else mid_chan
        self.style_size, self.in_chan, self.out_chan, self.mid_chan = style_size, in_chan, out_chan, mid_chan
        layers: list[nn.Module] = []
        for letter, (cin, cout) in zip(seq, layer_channels(seq, in_chan, out_chan, mid_chan)):
            if letter in KINDS:
                layers.append(ConvStyled(style_size, cin, cout, kind=letter, dim=dim, demodulate=demodulate))
            elif letter == "B":
                layers.append(BatchNormStyled(cin, dim=dim))
            else:
                layers.append(LeakyReLUStyled())
        self.convs = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        check_style(style, x.shape[0], self.style_size)
        for layer in self.convs:
            x = layer(x, style)
        return x


class ResStyledBlock(ConvStyledBlock):
    """A residual `ConvStyledBlock`: its ``convs`` plus a modulated skip path.

    A trailing 'A' of `seq` is taken out of ``convs`` and applied after the
    sum (as ``act``).  The skip path ``skip`` is always a 1-voxel
    `ConvStyled` from `in_chan` to `out_chan`, applied to the input narrowed
    to the size of the ``convs`` output (`narrow_like`: one more voxel from
    the high end when the difference is odd).  Resizing layers ('U', 'D')
    are not allowed: the skip could not match them.
    """

    def __init__(self, style_size: int, in_chan: int, out_chan: int | None = None,
                 mid_chan: int | None = None, seq: str = "CBACBA", dim: int = 3, demodulate: bool = True) -> None:
        check_seq(seq)
        if set(seq) & set("UD"):
            raise ValueError(f"ResStyledBlock seq {seq!r} cannot resize ('U' or 'D'); use ConvStyledBlock")
        last_act = seq.endswith("A")
        super().__init__(style_size, in_chan, out_chan, mid_chan, seq=seq[:-1] if last_act else seq, dim=dim,
                         demodulate=demodulate)
        self.act = LeakyReLUStyled() if last_act else None
        self.skip = ConvStyled(style_size, in_chan, self.out_chan, kind="C", kernel_size=1, dim=dim,
                               demodulate=demodulate)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        y = super().forward(x, style)
        y = y + self.skip(narrow_like(x, y), style)  # the skip is pointwise: narrowing first is the same
        return y if self.act is None else self.act(y, style)


class StyledVNet(nn.Module):
    """The original toolkit's styled V-Net, called as ``model(x, style)`` with `style` (N, `style_size`).

    Layout (w = `width`): ``conv_l0`` residual 'CACBA' (in_chan -> w),
    ``down_l0`` 'DBA', ``conv_l1`` residual 'CBACBA', ``down_l1`` 'DBA',
    ``conv_c`` residual 'CBACBA', ``up_r1`` 'UBA', then the ``conv_l1``
    output narrowed to it is concatenated in front, ``conv_r1`` residual
    'CBACBA' (2w -> w), ``up_r0`` 'UBA', the ``conv_l0`` output narrowed
    and concatenated in front, ``conv_r0`` residual 'CAC' (2w -> out_chan).
    An input of n + 2 * `PAD` voxels per axis gives n, for n a positive
    multiple of `total_stride`.  With the bypass (by default exactly when
    in_chan == out_chan) the input narrowed to the output is added to it.
    The default `width` is the original's; extra keyword arguments (e.g.
    `scale_factor`) are ignored.

    Three options leave the original's layout or start (all off by default,
    so its checkpoints load parameter for parameter):

    * ``demodulate=False``: no convolution is demodulated, so the style can
      scale what a layer passes on;
    * ``style_bypass=True`` (needs the bypass): the input is added to the
      output scaled per channel by an affine map of the style,
      ``style @ bypass_weight.T + bypass_bias``, starting at the plain bypass
      (weight 0, bias 1).  Where the target grows with a style parameter (a
      displacement with the growth factor D), the network then needs to learn
      only the correction to the scaled input;
    * ``style_init="zero"``: every modulation starts independent of the style
      (module docstring).
    """

    PAD = 20  # voxels the model removes from each end of every axis
    total_stride = 4  # the downsampling of the deepest level; trusted by `map2map.models.stride.total_stride`

    def __init__(self, in_chan: int, out_chan: int, style_size: int, bypass: bool | None = None,
                 dim: int = 3, width: int = 64, demodulate: bool = True, style_bypass: bool = False,
                 style_init: str = "uniform", **kwargs) -> None:
        super().__init__()
        w, m = width, {"dim": dim, "demodulate": demodulate}
        self.style_size, self.dim = style_size, dim
        self.bypass = resolve_bypass(bypass, in_chan, out_chan)
        if style_bypass and not self.bypass:
            raise ValueError("style_bypass scales the bypass, so it needs the bypass (in_chan == out_chan)")
        self.conv_l0 = ResStyledBlock(style_size, in_chan, w, seq="CACBA", **m)
        self.down_l0 = ConvStyledBlock(style_size, w, seq="DBA", **m)
        self.conv_l1 = ResStyledBlock(style_size, w, w, seq="CBACBA", **m)
        self.down_l1 = ConvStyledBlock(style_size, w, seq="DBA", **m)
        self.conv_c = ResStyledBlock(style_size, w, w, seq="CBACBA", **m)
        self.up_r1 = ConvStyledBlock(style_size, w, seq="UBA", **m)
        self.conv_r1 = ResStyledBlock(style_size, 2 * w, w, seq="CBACBA", **m)
        self.up_r0 = ConvStyledBlock(style_size, w, seq="UBA", **m)
        self.conv_r0 = ResStyledBlock(style_size, 2 * w, out_chan, seq="CAC", **m)
        if style_bypass:
            self.bypass_weight = nn.Parameter(torch.zeros(out_chan, style_size))
            self.bypass_bias = nn.Parameter(torch.ones(out_chan))
        else:
            self.bypass_weight = self.bypass_bias = None
        apply_style_init(self, style_init)

    def check_input(self, x: torch.Tensor, style: torch.Tensor) -> None:
        """Raise ValueError unless `x` is (N, C, spatial...) with every spatial size 2 * PAD plus a
        positive multiple of `total_stride`, and `style` is (N, style_size)."""
        if x.dim() != self.dim + 2:
            raise ValueError(f"expected an input of {self.dim} spatial axes (N, C, ...), got shape {tuple(x.shape)}")
        check_style(style, x.shape[0], self.style_size)
        for size in x.shape[2:]:
            n = size - 2 * self.PAD
            if n <= 0 or n % self.total_stride:
                raise ValueError(f"StyledVNet needs every spatial size to be {2 * self.PAD} plus a positive "
                                 f"multiple of {self.total_stride}, got {tuple(x.shape[2:])}")

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        self.check_input(x, style)
        y0 = self.conv_l0(x, style)
        y1 = self.conv_l1(self.down_l0(y0, style), style)
        y = self.conv_c(self.down_l1(y1, style), style)
        y = self.up_r1(y, style)
        y = self.conv_r1(torch.cat([narrow_by(y1, 4), y], dim=1), style)
        y = self.up_r0(y, style)
        y = self.conv_r0(torch.cat([narrow_by(y0, 16), y], dim=1), style)
        if not self.bypass:
            return y
        x = narrow_by(x, self.PAD)
        if self.bypass_weight is not None:
            x = x * F.linear(style, self.bypass_weight, self.bypass_bias).reshape(*style.shape[:1], -1,
                                                                                   *(1,) * self.dim)
        return y + x


class HBlockStyled(nn.Module):
    """One factor-2 level of `StyledG`: `map2map.models.srsgan.HBlock` with modulated convolutions
    (``conv1``, ``conv2`` 3-voxel, ``proj`` 1-voxel), noise injection only with `noise`."""

    def __init__(self, style_size: int, prev_chan: int, next_chan: int, out_chan: int, noise: bool,
                 dim: int = 3, demodulate: bool = True) -> None:
        super().__init__()
        self.upsample = Resampler(dim, 2)
        self.noise1 = AddNoise(False, chan=prev_chan) if noise else None
        self.conv1 = ConvStyled(style_size, prev_chan, next_chan, dim=dim, demodulate=demodulate)
        self.noise2 = AddNoise(False, chan=next_chan) if noise else None
        self.conv2 = ConvStyled(style_size, next_chan, next_chan, dim=dim, demodulate=demodulate)
        self.proj = ConvStyled(style_size, next_chan, out_chan, kernel_size=1, dim=dim, demodulate=demodulate)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor, y: torch.Tensor, style: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.upsample(x if self.noise1 is None else self.noise1(x))
        x = self.act(self.conv1(x, style))
        x = self.act(self.conv2(x if self.noise2 is None else self.noise2(x), style))
        y = narrow_by(self.upsample(y), 2)
        return x, y + self.act(self.proj(x, style))


class StyledG(nn.Module):
    """The styled super-resolution generator, called as ``model(x, style)`` with `style` (N, `style_size`).

    As `map2map.models.srsgan.G` (whose module docstring gives the layout):
    ``block0`` a 1-voxel modulated convolution in_chan -> chan(0) and
    LeakyReLU(0.2), then one `HBlockStyled` per factor of 2 of
    `scale_factor`, each mapping s voxels per axis to 2s - 6; channels of
    level b are ``chan_base >> b`` clipped to [chan_min, chan_max].  The
    output is the input linearly upsampled plus learned corrections, so
    in_chan must equal out_chan.  Without `noise` (the default) the output
    is a deterministic function of input and style (as velocities by
    differentiation need); with it, noise is injected as in `G`.
    ``demodulate=False`` leaves every convolution undemodulated and
    ``style_init="zero"`` starts every modulation independent of the style
    (see `StyledVNet`).
    """

    total_stride = 1  # no downsampling; trusted by `map2map.models.stride.total_stride`

    def __init__(self, in_chan: int, out_chan: int, style_size: int, scale_factor: int = 16,
                 chan_base: int = 512, chan_min: int = 64, chan_max: int = 512, noise: bool = False,
                 dim: int = 3, demodulate: bool = True, style_init: str = "uniform", **kwargs) -> None:
        super().__init__()
        if in_chan != out_chan:
            raise ValueError(f"StyledG adds its upsampled input to its output, so it needs in_chan == out_chan, "
                             f"got {in_chan} and {out_chan}")
        if not 1 <= chan_min <= chan_max:
            raise ValueError(f"StyledG needs 1 <= chan_min <= chan_max, got chan_min {chan_min} and chan_max "
                             f"{chan_max}")
        self.style_size, self.scale_factor, self.dim = style_size, scale_factor, dim

        def chan(b: int) -> int:
            return min(max(chan_base >> b, chan_min), chan_max)

        self.block0 = ConvStyled(style_size, in_chan, chan(0), kernel_size=1, dim=dim, demodulate=demodulate)
        self.act = nn.LeakyReLU(0.2)
        self.blocks = nn.ModuleList(HBlockStyled(style_size, chan(b), chan(b + 1), out_chan, noise, dim, demodulate)
                                    for b in range(n_blocks(scale_factor)))
        apply_style_init(self, style_init)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.dim + 2:
            raise ValueError(f"expected an input of {self.dim} spatial axes (N, C, ...), got shape {tuple(x.shape)}")
        check_style(style, x.shape[0], self.style_size)
        y = x
        x = self.act(self.block0(x, style))
        for block in self.blocks:
            x, y = block(x, y, style)
        return y
