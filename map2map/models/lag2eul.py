"""Lagrangian to Eulerian: paint displaced particles onto the grid with cloud-in-cell weights.

One particle sits at every voxel centre (the Lagrangian lattice) and moves by
its displacement; its value (mass 1 by default) is shared among the 2^ndim
voxels nearest its new position in proportion to the overlap of a voxel-sized
cloud (CIC), on the periodic grid of the same size.  With val = 1 the result
is the density in particles per voxel, mean 1.  Built from torch ops
(`scatter_add`), so it is differentiable in the displacement and values, e.g.
to train a displacement emulator on the density it implies.

Units: the painted displacement in voxels is dis * dis_norm, further times
meshsize / boxsize when `boxsize` is given (dis in the box's length unit;
meshsize defaults to the first axis length of `dis`; set it when `dis` is a
crop of a larger box).  `dis_norm` undoes a normalization of the stored field.
"""

from __future__ import annotations

import itertools

import torch


def _lattice(spatial: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(ndim, *spatial) voxel indices, i.e. the Lagrangian positions in voxel units."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in spatial]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def _corner(lower: torch.Tensor, frac: torch.Tensor, corner: tuple[int, ...],
            spatial: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat periodic voxel index (N, cells) and CIC weight (N, cells) of one of the 2^ndim corners."""
    index = torch.zeros_like(lower[:, 0])
    weight = torch.ones_like(frac[:, 0])
    for axis, (up, n) in enumerate(zip(corner, spatial)):
        index = index * n + (lower[:, axis] + up) % n
        weight = weight * (frac[:, axis] if up else 1 - frac[:, axis])
    return index.flatten(1), weight.flatten(1)


def lag2eul(dis: torch.Tensor, val: float | torch.Tensor = 1.0, dis_norm: float = 1.0,
            boxsize: float | None = None, meshsize: int | None = None) -> torch.Tensor:
    """CIC-paint particles displaced by `dis` (N, ndim, *spatial) onto their periodic grid.

    `val` is a number, or per-particle values of shape (N, C, *spatial) (or
    broadcastable to it); the result is (N, C, *spatial), with C = 1 for a number.
    """
    batch, ndim, spatial = dis.shape[0], dis.shape[1], tuple(dis.shape[2:])
    if ndim != len(spatial):
        raise ValueError(f"displacement needs one component per spatial axis, got shape {tuple(dis.shape)}")
    scale = dis_norm * ((meshsize or spatial[0]) / boxsize if boxsize is not None else 1.0)
    pos = _lattice(spatial, dis.device, dis.dtype) + dis * scale
    lower = pos.floor()
    frac = pos - lower
    lower = lower.long()
    val = torch.as_tensor(val, dtype=dis.dtype, device=dis.device)
    val = val.reshape((1,) * (2 + ndim)) if val.dim() == 0 else val
    val = val.expand((batch, val.shape[1]) + spatial).flatten(2)
    out = torch.zeros_like(val)
    for corner in itertools.product((0, 1), repeat=ndim):
        index, weight = _corner(lower, frac, corner, spatial)
        out = out.scatter_add(2, index.unsqueeze(1).expand_as(val), val * weight.unsqueeze(1))
    return out.reshape((batch, val.shape[1]) + spatial)
