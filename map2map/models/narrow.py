"""Symmetric cropping of (N, C, *spatial) tensors.

Padding-free convolutions shrink their inputs, so tensors that meet (skip
connections, outputs and targets) differ in size by a margin on each side.
These helpers remove that margin evenly from both ends of every spatial axis,
which keeps the voxel centres of the two tensors aligned.
"""

from __future__ import annotations

from typing import Sequence

import torch


def narrow_by(a: torch.Tensor, c: int) -> torch.Tensor:
    """Remove `c` voxels from both ends of every spatial axis (axes 2 onward) of `a`."""
    if c < 0:
        raise ValueError(f"cannot narrow by a negative number of voxels ({c})")
    for axis in range(2, a.dim()):
        size = a.shape[axis]
        if 2 * c > size:
            raise ValueError(f"cannot narrow axis {axis} of size {size} by {c} on each side")
        a = a.narrow(axis, c, size - 2 * c)
    return a


def narrow_like(a: torch.Tensor, b: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Narrow `a` to the spatial shape of `b` (a tensor, or the spatial shape itself).

    Each axis of `a` must be at least as large as `b`'s.  The excess goes
    equally from both ends; when it is odd, the extra voxel goes from the
    high end (as in the original toolkit), which shifts the voxel centres by
    half a voxel, so callers that need them aligned check for an even excess.
    """
    shape = tuple(b.shape[2:]) if isinstance(b, torch.Tensor) else tuple(b)
    if len(shape) != a.dim() - 2:
        raise ValueError(f"cannot narrow spatial shape {tuple(a.shape[2:])} to {shape}: "
                         "different number of spatial axes")
    for axis, want in enumerate(shape, start=2):
        diff = a.shape[axis] - want
        if diff < 0:
            raise ValueError(f"cannot narrow axis {axis} of size {a.shape[axis]} to the larger size {want}")
        a = a.narrow(axis, diff // 2, want)
    return a


def narrow_cast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Narrow all `tensors` to their smallest common spatial shape (the per-axis minimum)."""
    shape = [min(t.shape[axis] for t in tensors) for axis in range(2, tensors[0].dim())]
    return tuple(narrow_like(t, shape) for t in tensors)
