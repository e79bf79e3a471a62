"""The symmetry group of the cube (square in 2D) acting on gridded fields.

A field is an array shaped ``(C, *spatial)`` with ``ndim`` spatial axes, either
a numpy array or a torch tensor; the same functions handle both.

A group element ``CubeElement(perm, flips)`` acts as follows:

* output spatial axis ``i`` is input spatial axis ``perm[i]``;
* after permuting, output axis ``i`` is reversed if ``flips[i]``.

In coordinates centred on the box, ``r_j = j - (n - 1) / 2``, this reads
``y(r) = x(M r)`` with the signed permutation matrix ``M[perm[i], i] = ±1``
(``-1`` where ``flips[i]``).  A vector field (``C == ndim``, ``vector=True``)
must also turn its components with space: output component ``i`` is input
component ``perm[i]``, negated if ``flips[i]``, i.e. ``y(r) = M^T x(M r)``.
With this rule transforming a field equals transforming space: the gradient of
a transformed scalar field is the transformed gradient.

The action needs no cubic box: non-cubic grids (and input/target pairs at
different resolutions) are permuted and flipped alike, output axis ``i``
having the length of input axis ``perm[i]``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeVar

import numpy as np
import torch

Field = TypeVar("Field", np.ndarray, torch.Tensor)


@dataclass(frozen=True)
class CubeElement:
    """A signed axis permutation: see the module docstring for how it acts."""

    perm: tuple[int, ...]
    flips: tuple[bool, ...]

    def __post_init__(self) -> None:
        if sorted(self.perm) != list(range(len(self.perm))):
            raise ValueError(f"perm {self.perm} is not a permutation of 0..{len(self.perm) - 1}")
        if len(self.flips) != len(self.perm):
            raise ValueError(f"flips {self.flips} must have one entry per axis of perm {self.perm}")

    @property
    def ndim(self) -> int:
        """Number of spatial axes the element acts on."""
        return len(self.perm)


@lru_cache(maxsize=None)
def cube_group(ndim: int) -> tuple[CubeElement, ...]:
    """All ``ndim! * 2**ndim`` elements (48 in 3D, 8 in 2D), the identity first."""
    return tuple(
        CubeElement(perm, flips)
        for perm in itertools.permutations(range(ndim))
        for flips in itertools.product((False, True), repeat=ndim)
    )


def random_element(rng: np.random.Generator, ndim: int) -> CubeElement:
    """One element drawn uniformly from the group, using one draw of `rng`."""
    group = cube_group(ndim)
    return group[int(rng.integers(len(group)))]


def inverse(element: CubeElement) -> CubeElement:
    """The element undoing `element`: ``apply(apply(x, e), inverse(e)) == x``."""
    perm = [0] * element.ndim
    flips = [False] * element.ndim
    for i, (p, f) in enumerate(zip(element.perm, element.flips)):
        perm[p] = i
        flips[p] = f
    return CubeElement(tuple(perm), tuple(flips))


def compose(a: CubeElement, b: CubeElement) -> CubeElement:
    """``a`` after ``b``: ``apply(x, compose(a, b)) == apply(apply(x, b), a)``."""
    if a.ndim != b.ndim:
        raise ValueError(f"cannot compose elements of {a.ndim} and {b.ndim} axes")
    perm = tuple(b.perm[p] for p in a.perm)
    flips = tuple(fa != b.flips[p] for p, fa in zip(a.perm, a.flips))
    return CubeElement(perm, flips)


def _spatial_view(x: Field, element: CubeElement) -> Field:
    """`x` with spatial axes permuted and flipped (a view for numpy, torch copies on flip)."""
    axes = (0,) + tuple(1 + p for p in element.perm)
    flipped = tuple(1 + i for i, f in enumerate(element.flips) if f)
    if isinstance(x, torch.Tensor):
        y = x.permute(axes)
        return torch.flip(y, flipped) if flipped else y
    y = x.transpose(axes)
    return np.flip(y, flipped) if flipped else y


def _empty_like(x: Field, shape: tuple[int, ...]) -> Field:
    """A new contiguous array of `shape` with the dtype (and device) of `x`."""
    if isinstance(x, torch.Tensor):
        return torch.empty(shape, dtype=x.dtype, device=x.device)
    return np.empty(shape, dtype=x.dtype)


def apply(x: Field, element: CubeElement, vector: bool = False) -> Field:
    """A transformed contiguous copy of the field `x` shaped ``(C, *spatial)``.

    With ``vector=True`` the channels are the ``ndim`` components of a vector
    field and turn with space; otherwise each channel is a scalar field.
    """
    if x.ndim != 1 + element.ndim:
        raise ValueError(f"field of shape {tuple(x.shape)} needs {element.ndim} spatial axes after the channel axis")
    if vector and x.shape[0] != element.ndim:
        raise ValueError(f"vector field needs {element.ndim} channels, got shape {tuple(x.shape)}")
    y = _spatial_view(x, element)
    out = _empty_like(x, tuple(y.shape))
    if not vector:
        out[...] = y
        return out
    for i, (p, f) in enumerate(zip(element.perm, element.flips)):
        out[i] = y[p]
        if f:
            out[i] *= -1
    return out


def inverse_view(y: np.ndarray, element: CubeElement) -> np.ndarray:
    """A view of the (to be) transformed array `y` laid out like the untransformed field.

    Writing a field ``x`` into this view fills `y` with the spatial part of
    ``apply(x, element)``, so a reader can write straight into the augmented
    layout instead of reading first and copying through a transposition.
    Vector components are then turned with `turn_components`.
    """
    flipped = tuple(1 + i for i, f in enumerate(element.flips) if f)
    view = np.flip(y, flipped) if flipped else y
    return view.transpose(np.argsort((0,) + tuple(1 + p for p in element.perm)))


def component_targets(view: np.ndarray, element: CubeElement, vector: bool) -> list[tuple[np.ndarray, bool]]:
    """Where each stored channel goes in `view` (from `inverse_view`), and whether it is negated.

    Scalar channels stay in place.  Vector component ``perm[i]`` becomes
    output component ``i``, negated if ``flips[i]``, as `apply` does.
    """
    if not vector:
        return [(view[c], False) for c in range(view.shape[0])]
    targets: list[tuple[np.ndarray, bool]] = [None] * view.shape[0]  # type: ignore[list-item]
    for i, (p, f) in enumerate(zip(element.perm, element.flips)):
        targets[p] = (view[i], f)
    return targets


def add_noise(rng: np.random.Generator, std: float) -> float:
    """An additive offset drawn from N(0, std), to add to input and target alike."""
    return float(rng.normal(0.0, std))


def mul_noise(rng: np.random.Generator, std: float) -> float:
    """A log-normal factor exp(N(0, std)), to multiply input and target alike."""
    return float(np.exp(rng.normal(0.0, std)))
