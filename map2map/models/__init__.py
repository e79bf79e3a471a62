"""Models and the tensor tools around them, looked up by name (e.g. `--model VNet`).

Every model is built as `Model(in_chan, out_chan, **kwargs)` and always
receives `scale_factor` as a keyword, which models that do not resample
ignore.  No convolution pads: outputs are smaller than inputs, and
`required_pad` says by how much to pad the input.

The names the original toolkit exported from here, where this package has
them, import unchanged (``from map2map.models import VNet, narrow_by``).
"""

from .build import build_model, forward, style_size_of
from .adversarial import (DiceLoss, InstanceNoise, WDistLoss, add_spectral_norm, grad_penalty_reg,
                          rm_spectral_norm, wgan_grad_penalty)
from .bypass import resolve_bypass
from .conv import ConvBlock, ResBlock
from .init import init_weights
from .lag2eul import lag2eul
from .narrow import narrow_by, narrow_cast, narrow_like
from .patchgan import PatchGAN, PatchGAN42
from .power import power
from .resample import Resampler, resample, resample_edge
from .srsgan import G
from .eulerian import LagEulLoss
from .styled import ConvStyled, ConvStyledBlock, ResStyledBlock, StyledG, StyledVNet
from .stride import StrideError, check_stride, required_pad, total_stride
from .unet import UNet
from .vnet import VNet

__all__ = [
    "ConvBlock", "G", "PatchGAN", "PatchGAN42", "build_model", "ResBlock", "Resampler", "StrideError", "UNet", "VNet",
    "ConvStyled", "ConvStyledBlock", "ResStyledBlock", "StyledG", "StyledVNet", "forward", "style_size_of",
    "LagEulLoss",
    "check_stride", "init_weights", "lag2eul", "narrow_by", "narrow_cast", "narrow_like", "power",
    "required_pad", "resample", "resample_edge", "resolve_bypass", "total_stride",
    "DiceLoss", "InstanceNoise", "WDistLoss", "add_spectral_norm", "grad_penalty_reg", "rm_spectral_norm",
    "wgan_grad_penalty",
]
