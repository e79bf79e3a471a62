"""The training loss in Lagrangian (displacement) space, Eulerian (density) space, or both (``--loss``).

Terms:

* *Lagrangian loss* L_lag: the criterion (e.g. MSE) of the output against
  the target, as training has always computed it.
* *Eulerian loss* L_eul: the criterion of the densities the output and the
  target displacements imply.  Each is painted with cloud-in-cell
  (`map2map.models.lag2eul`): the particles of the whole window (the crop
  plus the target pad) move by their displacement and are painted onto the
  window's grid as if it were periodic, and the density is then compared
  inside the crop only (the window narrowed by the target pad), where the
  wrap-around of particles leaving the window does not reach as long as
  they move less than the pad.  With no target pad the whole crop is
  compared, wrapped onto itself.
* *displacement channels*: the first ndim channels of the output and the
  target, a displacement whose value times `dis_norm` is in the box's length
  unit; with `boxsize` and `meshsize` (the box's side in that unit and in
  voxels) a voxel is boxsize / meshsize long, without them the displacement
  times `dis_norm` is in voxels.
* ``--loss``: ``lag`` is L_lag alone (the default, unchanged behaviour);
  ``eul`` is L_eul alone; ``lag_eul`` is log(L_lag^3 L_eul) (computed as
  3 log L_lag + log L_eul), or L_lag + W L_eul with ``--eul-weight W``.

`LagEulLoss` returns every term it computed (`LossTerms`), so training can
log both.  `dis_norm_of` finds `dis_norm` from the target's norm.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

import torch
from torch import nn

from map2map.errors import UserError

from .lag2eul import lag2eul

LOSSES = ("lag", "eul", "lag_eul")


def check_loss(loss: str, eul_weight: float | None = None) -> None:
    """A one-line `UserError` for an unknown ``--loss`` or an ``--eul-weight`` it does not use."""
    if loss not in LOSSES:
        raise UserError(f"--loss {loss!r} is not one of {', '.join(LOSSES)}")
    if eul_weight is not None and loss != "lag_eul":
        raise UserError(f"--eul-weight {eul_weight} weighs the Eulerian term of --loss lag_eul only, "
                        f"not --loss {loss}")
    if eul_weight is not None and not eul_weight >= 0:
        raise UserError(f"--eul-weight must be a number >= 0, got {eul_weight}")


def dis_norm_of(norm: Callable | None, kwargs: Mapping[str, Any] | None = None, name: str = "the target norm") -> float:
    """The factor by which undoing `norm` (a field norm called ``norm(x, undo=True, **kwargs)``, in place
    or returning the result; None: no norm) multiplies a displacement, i.e. `dis_norm`; a `UserError` for
    a norm that is not a scaling (the Eulerian loss needs the displacement's units)."""
    if norm is None:
        return 1.0
    from map2map.data.fieldio import apply_norm

    x = np.array([1.0, 2.0, -3.0])
    apply_norm(norm, x, undo=True, **dict(kwargs or {}))
    factor = float(x[0])
    if not (np.isfinite(factor) and factor > 0 and np.allclose(x, factor * np.array([1.0, 2.0, -3.0]), rtol=1e-9)):
        raise UserError(f"the Eulerian loss needs a displacement in known units, but {name} is not a positive "
                        f"scaling (undoing it maps 1, 2, -3 to {', '.join(f'{v:.4g}' for v in x)}); use a "
                        "scaling norm such as cosmology.dis, or none")
    return factor


def _pairs(margin: int | Sequence[int] | Sequence[tuple[int, int]], ndim: int) -> list[tuple[int, int]]:
    if isinstance(margin, int):
        return [(margin, margin)] * ndim
    pairs = [(m, m) if isinstance(m, int) else (int(m[0]), int(m[1])) for m in margin]
    if len(pairs) != ndim:
        raise ValueError(f"a margin needs one entry per spatial axis ({ndim}), got {list(margin)}")
    return pairs


def eulerian_density(dis: torch.Tensor, margin: int | Sequence = 0, dis_norm: float | torch.Tensor = 1.0,
                     boxsize: float | None = None, meshsize: int | None = None) -> torch.Tensor:
    """The density (N, 1, *inner) the displacement `dis` (N, ndim, *window) implies, inside the window
    narrowed by `margin` per side (an int, one per axis, or (low, high) pairs; see the module
    docstring), in particles per voxel (mean 1 over the window).  Computed in float32 or wider."""
    if (boxsize is None) != (meshsize is None):
        raise ValueError("give boxsize and meshsize together (the box's side in length units and in voxels)")
    ndim = dis.dim() - 2
    if dis.shape[1] != ndim:
        raise ValueError(f"a displacement has one channel per spatial axis, got shape {tuple(dis.shape)}")
    if not dis.dtype.is_floating_point or dis.dtype.itemsize < 4:
        dis = dis.float()
    rho = lag2eul(dis, dis_norm=dis_norm, boxsize=boxsize, meshsize=meshsize)
    for axis, (lo, hi) in enumerate(_pairs(margin, ndim)):
        size = rho.shape[2 + axis]
        if lo < 0 or hi < 0 or lo + hi >= size:
            raise ValueError(f"margin {(lo, hi)} leaves nothing of axis {axis} of size {size}")
        rho = rho.narrow(2 + axis, lo, size - lo - hi)
    return rho


@dataclasses.dataclass
class LossTerms:
    """The loss to minimise and the terms it is made of (None where `LagEulLoss` did not compute one)."""

    total: torch.Tensor
    lag: torch.Tensor
    eul: torch.Tensor | None


def combine(loss: str, lag: torch.Tensor, eul: torch.Tensor | None, eul_weight: float | None = None) -> torch.Tensor:
    """The ``--loss`` of the terms (module docstring)."""
    if loss == "lag":
        return lag
    if loss == "eul":
        return eul
    if eul_weight is None:
        return 3 * torch.log(lag) + torch.log(eul)
    return lag + eul_weight * eul


class LagEulLoss(nn.Module):
    """``--loss`` on an output and target of the same shape: ``forward(out, tgt) -> LossTerms``.

    `criterion` compares two tensors (e.g. ``nn.MSELoss()``); `margin` is
    the target pad (int, per axis, or (low, high) pairs) by which the
    window exceeds the crop; `dis_norm`, `boxsize` and `meshsize` give the
    displacement's units (module docstring).  L_lag is always computed (it
    is cheap), L_eul only for ``eul`` and ``lag_eul``.
    """

    def __init__(self, criterion: nn.Module, loss: str = "lag", eul_weight: float | None = None,
                 margin: int | Sequence = 0, dis_norm: float = 1.0, boxsize: float | None = None,
                 meshsize: int | None = None) -> None:
        super().__init__()
        check_loss(loss, eul_weight)
        if (boxsize is None) != (meshsize is None):
            raise UserError(f"the Eulerian loss needs the box size and its mesh size together, got boxsize "
                            f"{boxsize} and meshsize {meshsize}")
        self.criterion, self.loss, self.eul_weight = criterion, loss, eul_weight
        self.margin, self.dis_norm, self.boxsize, self.meshsize = margin, dis_norm, boxsize, meshsize

    def density(self, dis: torch.Tensor) -> torch.Tensor:
        """The density inside the crop of the displacement channels of `dis` (N, C >= ndim, *window)."""
        ndim = dis.dim() - 2
        if dis.shape[1] < ndim:
            raise UserError(f"--loss {self.loss} paints a displacement of {ndim} channels, but the output has "
                            f"{dis.shape[1]}; train on a displacement target")
        return eulerian_density(dis[:, :ndim], self.margin, self.dis_norm, self.boxsize, self.meshsize)

    def forward(self, out: torch.Tensor, tgt: torch.Tensor) -> LossTerms:
        lag = self.criterion(out, tgt)
        eul = None
        if self.loss != "lag":
            eul = self.criterion(self.density(out), self.density(tgt))
        return LossTerms(combine(self.loss, lag, eul, self.eul_weight), lag, eul)
