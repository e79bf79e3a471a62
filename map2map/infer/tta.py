"""Test-time augmentation: the model averaged over symmetries of the cube, one tile at a time.

Terms:

* a *mode* (`MODES`) names a set of elements of the cube group
  (`map2map.data.augment`): ``none`` the identity, ``flips`` the ``2**ndim``
  reflections of the axes (no permutation), ``all`` the whole group
  (``ndim! * 2**ndim`` elements).
* a *batch* is a tensor ``(B, C, *spatial)`` whose channels are stacked
  fields of ``chans`` channels each; a field with as many channels as there
  are spatial axes is a vector field and turns its components with space,
  exactly as training augmentation does (`augment.apply`).

`averaged` returns the mean over the mode's elements ``g`` of
``g^-1(forward(g x))``: the input is transformed, the output transformed
back.  The elements are taken one after another into one float32
accumulator, so memory does not grow with the number of elements.

Exactness of tiled inference.  The whole-box result for a mode is the mean
over ``g`` of ``g^-1(F(g P x))``, where ``P x`` is the box padded
periodically by the plan's pads (``numpy.pad(mode="wrap")``) and ``F`` the
model.  A tile's window is a sub-window of ``P x``; ``g`` maps it onto a
sub-window of ``g P x``, with the low and high pads swapped on reflected axes
and the window's axes permuted.  The stitched tiles equal the whole-box
result when

1. the model shrinks its (upsampled) input by the same number of voxels at
   both ends of every axis (`map2map.tiles.narrow_offsets` already requires
   this): then ``g^-1(F(g w))`` covers the same voxels as ``F(w)`` for a
   window ``w``, and the tile is narrowed by the same offsets with or
   without augmentation, whatever the pads (symmetric or not);
2. every box side is a multiple of the model's total stride: a reflected
   window starts, in ``g P x``, at ``box - origin - tile`` from its start,
   a multiple of the stride only then, and a strided model is equivariant
   only under shifts by multiples of its stride;
3. for ``all`` with a non-cubic window, the model accepts the window with
   its axes permuted and treats every axis alike (true of the package's
   models).

For a model of stride 1 condition 2 always holds.  Condition 1 is what
tiling assumes without augmentation too (`narrow_offsets` centres the output
and refuses an odd shrink); condition 2 is not enforced: on a box side
that is not a multiple of the stride each reflected pass is still the model
applied to the reflected periodic field, consistently over all tiles, only
at a phase no whole-box pass could have.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from map2map.data import augment
from map2map.errors import UserError

MODES = ("none", "flips", "all")


def elements(mode: str, ndim: int) -> tuple[augment.CubeElement, ...]:
    """The group elements of `mode` on `ndim` spatial axes, the identity first."""
    if mode not in MODES:
        raise UserError(f"--tta {mode!r}: expected one of {', '.join(MODES)}")
    group = augment.cube_group(ndim)
    if mode == "none":
        return group[:1]
    if mode == "flips":
        identity = tuple(range(ndim))
        return tuple(e for e in group if e.perm == identity)
    return group


def transform(x: torch.Tensor, element: augment.CubeElement, chans: Sequence[int]) -> torch.Tensor:
    """The batch `x` ``(B, C, *spatial)`` transformed by `element`, each of its stacked fields of `chans`
    channels by `augment.apply` (a field of ``ndim`` channels as a vector)."""
    ndim = x.dim() - 2
    if sum(chans) != x.shape[1]:
        raise ValueError(f"fields of {list(chans)} channels do not stack to the batch's {x.shape[1]}")
    spatial = tuple(x.shape[2 + p] for p in element.perm)
    out = torch.empty(tuple(x.shape[:2]) + spatial, dtype=x.dtype, device=x.device)
    for b in range(x.shape[0]):
        start = 0
        for c in chans:
            out[b, start:start + c] = augment.apply(x[b, start:start + c], element, vector=c == ndim)
            start += c
    return out


def averaged(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, mode: str,
             in_chans: Sequence[int], out_chans: Sequence[int]) -> torch.Tensor:
    """The float32 mean over the elements ``g`` of `mode` of ``g^-1(forward(g x))`` for a batch `x`
    (see the module docstring); mode ``none`` returns ``forward(x)`` itself."""
    group = elements(mode, x.dim() - 2)
    if len(group) == 1:
        return forward(x)
    acc = None
    for g in group[1:]:
        y = transform(forward(transform(x, g, in_chans)), augment.inverse(g), out_chans)
        acc = y.float() if acc is None else acc.add_(y)
        del y
    # the identity last: its output may be (a view of) x itself, which the loop above still read
    return acc.add_(forward(x)).div_(len(group))
