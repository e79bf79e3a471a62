"""How a model's downsampling constrains crops, steps and pads.

A model that downsamples by a total stride s is translation-equivariant only
for shifts that are multiples of s: two crops give consistent outputs, and
tiles stitch into the whole-box result, only if their origins differ by
multiples of s.  Its input size must also let every down level be undone by
its up level.  `total_stride`, `check_stride` and `required_pad` turn these
facts into numbers and clear errors.
"""

from __future__ import annotations

import copy
import math
from fractions import Fraction
from typing import Sequence

import torch
from torch import nn

from map2map.errors import UserError

from .build import forward, zero_style
from .resample import Resampler


class StrideError(UserError, ValueError):
    """A crop, step or pad that the model's stride does not allow."""


def _module_factor(module: nn.Module) -> Fraction:
    """How much `module` downsamples (2 for a stride-2 conv, 1/2 for a stride-2 transposed conv)."""
    if isinstance(module, Resampler):
        return 1 / Fraction(module.scale_factor).limit_denominator(1 << 16)
    stride = getattr(module, "stride", None)
    if stride is None or not isinstance(module, (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd,
                                                 nn.modules.pooling._AvgPoolNd)):
        return Fraction(1)
    stride = max(stride) if isinstance(stride, Sequence) else stride
    transposed = getattr(module, "transposed", False)
    return 1 / Fraction(stride) if transposed else Fraction(stride)


def total_stride(model: nn.Module) -> int:
    """The total downsampling stride of `model`: 4 for UNet/VNet, 1 for plain conv nets and G.

    An integer `model.total_stride` attribute is trusted.  Otherwise the
    modules are walked in registration order (assumed to be forward order),
    multiplying by each strided convolution or pooling stride, dividing by
    each transposed convolution stride (and by each `Resampler` factor); the
    largest running product, i.e. the downsampling at the deepest point, is
    the total stride.
    """
    declared = getattr(model, "total_stride", None)
    if isinstance(declared, int):
        return declared
    running, deepest = Fraction(1), Fraction(1)
    for module in model.modules():
        running *= _module_factor(module)
        deepest = max(deepest, running)
    return int(deepest)


def _nearest_multiples(value: int, stride: int) -> str:
    below = value // stride * stride
    return f"{below} or {below + stride}" if below > 0 else f"{stride}"


def check_stride(crop: int | Sequence[int], step: int | Sequence[int] | None, stride: int) -> None:
    """Raise `StrideError` unless every crop size and crop step is a multiple of `stride`.

    `step` None means the crops tile the field (step = crop).  The message
    names the offending value and the nearest multiples that would work.
    """
    crops = [crop] if isinstance(crop, int) else list(crop)
    steps = crops if step is None else ([step] if isinstance(step, int) else list(step))
    for name, values in (("crop", crops), ("crop step", steps)):
        for value in values:
            if value % stride:
                raise StrideError(f"{name} {value} is not a multiple of the model's total stride {stride}; "
                                  f"use e.g. {_nearest_multiples(value, stride)}")


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` on the 'meta' device (shapes only), made without copying any parameter data."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


ShapeMemo = dict  # (in_chan, spatial input shape) -> spatial output shape or None, of real passes of one model


def _forward_shape(model: nn.Module, in_chan: int, shape: Sequence[int],
                   memo: ShapeMemo | None = None) -> tuple[int, ...] | None:
    """Spatial output shape of one pass of `model` (eval, no grad) on zeros of spatial `shape` on its
    device (with a zero style for a styled model, `map2map.models.build.forward`), or None if the model
    rejects that size.  With `memo` (of this `model` only), a shape found before is not run again."""
    key = (in_chan, tuple(shape))
    if memo is not None and key in memo:
        return memo[key]
    out = _run_shape(model, in_chan, shape)
    if memo is not None:
        memo[key] = out
    return out


def _run_shape(model: nn.Module, in_chan: int, shape: Sequence[int]) -> tuple[int, ...] | None:
    device = next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.zeros((1, in_chan, *shape), device=device)
            return tuple(forward(model, x, zero_style(model, 1, device)).shape[2:])
    except (RuntimeError, ValueError, NotImplementedError):
        return None
    finally:
        model.train(was_training)


REAL_PASS_FLOPS = 4e9  # most estimated operations of the real passes a probe runs instead of 'meta' ones


def _real_cost(model: nn.Module, shape: Sequence[int]) -> float:
    """Estimated operations of a real pass of `model` over spatial `shape`: 2 x parameters x input voxels
    (each weight used once per voxel, as in a convolution); infinite off the CPU."""
    if next(model.parameters(), torch.empty(0)).device.type != "cpu":
        return math.inf
    return 2.0 * sum(p.numel() for p in model.parameters()) * math.prod(shape)


def _cheap(model: nn.Module, shape: Sequence[int]) -> bool:
    """Whether a real pass of `model` over spatial `shape` costs about as little as a 'meta' one
    (`_real_cost` at most `REAL_PASS_FLOPS`).  The first 'meta' pass of a process imports parts of torch
    that take seconds; a small model's real pass on the CPU takes a fraction of that."""
    return _real_cost(model, shape) <= REAL_PASS_FLOPS


def _shape_probe(model: nn.Module) -> nn.Module | None:
    """A shape-only 'meta' copy of `model`, or None for a model that cannot be copied there."""
    try:
        return meta_copy(model)
    except (RuntimeError, TypeError, NotImplementedError):
        return None


def output_shape(model: nn.Module, in_chan: int, shape: Sequence[int],
                 memo: ShapeMemo | None = None) -> tuple[int, ...] | None:
    """The spatial output shape of `model` for an input of spatial `shape`, or None if it rejects it.

    This is the one output-shape probe of the package (training, inference
    and the pad search use it).  The pass runs on a 'meta' copy of the model
    (shapes only, no arithmetic, no parameter data), in eval mode without
    gradients; a model with an operation that has no meta support, and a
    small one on the CPU (`_cheap`), gets a real pass on zeros instead.
    `model`'s training mode is left as it was.  A `memo` of `model`'s real
    passes (shared with `required_pad` while one plan is made) saves
    running a shape again.
    """
    if _cheap(model, shape) or (memo is not None and (in_chan, tuple(shape)) in memo):
        out = _forward_shape(model, in_chan, shape, memo)
        if out is not None:
            return out
    probe = _shape_probe(model)
    out = _forward_shape(probe, in_chan, shape) if probe is not None else None
    return out if out is not None else _forward_shape(model, in_chan, shape, memo)


def _covers(out: int | None, target: int) -> bool:
    return out is not None and out >= target and (out - target) % 2 == 0


def _search(model: nn.Module, in_chan: int, crop: int, dim: int, target: int,
            pads: range, memo: ShapeMemo | None = None) -> tuple[int | None, bool]:
    """The smallest pad of `pads` whose output covers `target`, and whether any pass ran at all."""
    ran = False
    for pad in pads:
        out = _forward_shape(model, in_chan, (crop + 2 * pad,) * dim, memo)
        ran = ran or out is not None
        if _covers(out[0] if out else None, target):
            return pad, True
    return None, ran


def _find_pad(model: nn.Module, in_chan: int, crop: int, dim: int, target: int, max_pad: int,
              memo: ShapeMemo | None = None) -> int | None:
    """Search the first pads with real passes while their total cost stays within `REAL_PASS_FLOPS` (a
    small model on the CPU), the rest on a shape-only 'meta' copy of `model`; if no meta pass runs at all
    (an operation without meta support), search the rest again with real passes."""
    small, cost = 0, 0.0
    while small <= max_pad:
        cost += _real_cost(model, (crop + 2 * small,) * dim)
        if cost > REAL_PASS_FLOPS:
            break
        small += 1
    pad = _search(model, in_chan, crop, dim, target, range(small), memo)[0]
    if pad is not None or small > max_pad:
        return pad
    rest = range(small, max_pad + 1)
    probe = _shape_probe(model)
    if probe is not None:
        pad, meta_ran = _search(probe, in_chan, crop, dim, target, rest)
        if meta_ran:
            return pad
    return _search(model, in_chan, crop, dim, target, rest, memo)[0]


def required_pad(model: nn.Module, in_chan: int, crop: int, dim: int, scale_factor: float = 1,
                 tgt_pad: int = 0, max_pad: int = 128, memo: ShapeMemo | None = None) -> int:
    """The smallest pad p such that `model` maps an input of crop + 2p voxels per axis
    onto at least crop * scale_factor + 2 * tgt_pad voxels, with an even excess
    (so the output narrows symmetrically onto the target).

    Sizes the model rejects (e.g. levels that do not line up) are skipped.
    Shapes are found by forward passes on zero inputs under `torch.no_grad`
    in eval mode, on a copy of the model on the 'meta' device: shapes only, no
    arithmetic, so even a large super-resolution model costs nothing.  The
    first pads of a small model on the CPU are tried with real passes, within
    `REAL_PASS_FLOPS` in all (`_find_pad`); if the meta copy cannot run, the
    passes are real (slow for large models).
    `model` is left in the training mode it had; `memo` keeps the real passes
    (see `output_shape`).  Raises `StrideError` if no p up to `max_pad` works.
    """
    target = crop * scale_factor + 2 * tgt_pad
    if not float(target).is_integer():
        raise StrideError(f"crop {crop} times scale_factor {scale_factor} is not a whole number of voxels")
    target = int(target)
    pad = _find_pad(model, in_chan, crop, dim, target, max_pad, memo)
    if pad is None:
        raise StrideError(f"no pad up to {max_pad} lets the model map a crop of {crop} onto "
                          f"{target} output voxels per axis; check the crop, scale factor and model")
    return pad
