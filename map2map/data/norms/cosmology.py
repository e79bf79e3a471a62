"""Displacement and velocity norms built on flat LambdaCDM linear theory (`map2map.cosmology`).

A displacement is divided by a typical linear displacement ``dis_std D(z)``,
a velocity by the matching Zel'dovich velocity ``dis_std D(z) a H(z) f(z)``,
so that both normalise to the same field.  Lengths are comoving Mpc/h,
velocities peculiar km/s.  `growth_factor`, `growth_rate`, `hubble` and `H0`
are `map2map.cosmology`'s, importable from here too.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

from map2map.cosmology import H0, growth_factor, growth_rate, hubble

Field = TypeVar("Field", np.ndarray, torch.Tensor)

__all__ = ["H0", "growth_factor", "growth_rate", "hubble", "dis_scale", "vel_scale", "dis", "vel"]


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
