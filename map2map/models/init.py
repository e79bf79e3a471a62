"""Weight initialization that keeps activations at unit scale through deep LeakyReLU nets.

PyTorch's default convolution init shrinks the signal by roughly a factor of
two to three per layer, so at the start of training the deep (downsampled)
path of a U-Net contributes almost nothing.  He initialization with the
LeakyReLU gain, and a fan-in that counts the taps really feeding one output
voxel (in_chan * kernel volume, divided by the stride volume for transposed
convolutions), keeps every level alive.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _fan_in(conv: nn.modules.conv._ConvNd) -> int:
    taps = math.prod(conv.kernel_size)
    if conv.transposed:
        return max(1, conv.in_channels * taps // (math.prod(conv.stride) * conv.groups))
    return conv.in_channels * taps // conv.groups


def init_weights(model: nn.Module, negative_slope: float = 0.2) -> None:
    """He-initialize every convolution of `model` for LeakyReLU(`negative_slope`), with zero biases."""
    gain = nn.init.calculate_gain("leaky_relu", negative_slope)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.conv._ConvNd):
                module.weight.normal_(0, gain / math.sqrt(_fan_in(module)))
                if module.bias is not None:
                    module.bias.zero_()
