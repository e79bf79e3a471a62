"""Flat LambdaCDM linear theory, and the displacement and velocity norms built on it.

Radiation is neglected, so ``H(a)^2 = H0^2 (omega_m a^-3 + 1 - omega_m)``.  The
linear growth factor then has the closed form (the growing mode of
``D ∝ H ∫_0^a da' / (a' H(a'))^3``)

    D(a) ∝ a 2F1(1/3, 1; 11/6; -a^3 (1 - omega_m) / omega_m),

normalised here to D(z=0) = 1.  Its logarithmic derivative follows exactly from
``d 2F1(a, b; c; x)/dx = (a b / c) 2F1(a+1, b+1; c+1; x)``.

Lengths are comoving Mpc/h, velocities peculiar km/s, and H in km/s/(Mpc/h),
so that H(z=0) = 100.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
from numpy.typing import ArrayLike
from scipy.special import hyp2f1

Field = TypeVar("Field", np.ndarray, torch.Tensor)

H0 = 100.0
"""Hubble constant in km/s/(Mpc/h)."""


def _scalar_or_array(v: np.ndarray) -> float | np.ndarray:
    """A 0-d result as a Python float, so scalar redshifts give scalars."""
    return float(v) if v.ndim == 0 else v


def _scale_factor(z: ArrayLike) -> np.ndarray:
    """Scale factor a = 1/(1+z), dimensionless."""
    return 1.0 / (1.0 + np.asarray(z, dtype=np.float64))


def _x(z: ArrayLike, omega_m: float) -> np.ndarray:
    """The hypergeometric argument -a^3 Omega_Lambda / omega_m at redshift z."""
    if not 0.0 < omega_m <= 1.0:
        raise ValueError(f"omega_m must be in (0, 1] for flat LambdaCDM, got {omega_m}")
    return -_scale_factor(z) ** 3 * (1.0 - omega_m) / omega_m


def _growth_unnormalised(z: ArrayLike, omega_m: float) -> np.ndarray:
    """a 2F1(1/3, 1; 11/6; x): D(a) normalised to D -> a deep in matter domination."""
    return _scale_factor(z) * hyp2f1(1 / 3, 1.0, 11 / 6, _x(z, omega_m))


def hubble(z: ArrayLike, omega_m: float = 0.31) -> float | np.ndarray:
    """Hubble rate H(z) in km/s/(Mpc/h), i.e. 100 E(z)."""
    zp1 = 1.0 + np.asarray(z, dtype=np.float64)
    return _scalar_or_array(H0 * np.sqrt(omega_m * zp1 ** 3 + 1.0 - omega_m))


def growth_factor(z: ArrayLike, omega_m: float = 0.31) -> float | np.ndarray:
    """Linear growth factor D(z), dimensionless, with D(0) = 1 (closed form, module docstring)."""
    return _scalar_or_array(_growth_unnormalised(z, omega_m) / _growth_unnormalised(0.0, omega_m))


def growth_rate(z: ArrayLike, omega_m: float = 0.31) -> float | np.ndarray:
    """Linear growth rate f = dln D / dln a, dimensionless, exact for flat LambdaCDM."""
    x = _x(z, omega_m)
    ratio = hyp2f1(4 / 3, 2.0, 17 / 6, x) / hyp2f1(1 / 3, 1.0, 11 / 6, x)
    return _scalar_or_array(1.0 + (6 / 11) * x * ratio)


def dis_scale(z: float, dis_std: float, omega_m: float) -> float:
    """Displacement scale dis_std D(z) in Mpc/h: a typical linear displacement at z."""
    return dis_std * growth_factor(float(z), omega_m)


def vel_scale(z: float, dis_std: float, omega_m: float) -> float:
    """Velocity scale in km/s matching `dis_scale` through Zel'dovich v = a H f psi, a = 1/(1+z)."""
    z = float(z)
    return dis_scale(z, dis_std, omega_m) * hubble(z, omega_m) * growth_rate(z, omega_m) / (1.0 + z)


def _rescale(x: Field, scale: float, undo: bool) -> Field:
    """Divide `x` by `scale` in place, or multiply with ``undo``; return `x`."""
    if undo:
        x *= scale
    else:
        x /= scale
    return x


def dis(x: Field, undo: bool = False, z: float = 0.0, dis_std: float = 6.0, omega_m: float = 0.31,
        **kwargs) -> Field:
    """Divide a displacement field in Mpc/h by dis_std D(z); ``undo`` multiplies. In place."""
    return _rescale(x, dis_scale(z, dis_std, omega_m), undo)


def vel(x: Field, undo: bool = False, z: float = 0.0, dis_std: float = 6.0, omega_m: float = 0.31,
        **kwargs) -> Field:
    """Divide a peculiar velocity in km/s by dis_std D(z) a H(z) f(z); ``undo`` multiplies. In place.

    A Zel'dovich displacement and its velocity normalise to the same field.
    """
    return _rescale(x, vel_scale(z, dis_std, omega_m), undo)
