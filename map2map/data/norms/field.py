"""Norms for scalar fields such as the density contrast."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

Field = TypeVar("Field", np.ndarray, torch.Tensor)


def log1p(x: Field, undo: bool = False, eps: float = 1e-3, **kwargs) -> Field:
    """Map an overdensity delta to log(1 + delta + eps); ``undo`` maps back. In place.

    `eps` (in units of the mean density) keeps empty cells (delta = -1) finite,
    at log(eps) (about -6.9 for the default) instead of -inf.
    """
    if isinstance(x, torch.Tensor):
        return x.expm1_().sub_(eps) if undo else x.add_(eps).log1p_()
    if undo:
        np.expm1(x, out=x)
        x -= eps
    else:
        x += eps
        np.log1p(x, out=x)
    return x
