"""Flat LambdaCDM linear theory, written once: expansion, growth, and the linear matter power spectrum.

Small pure functions of numbers and numpy arrays (scalars in, Python floats
out), used by the cosmology norms (`map2map.data.norms.cosmology`) and the
example-data generator (`map2map.synth`).

Units: lengths comoving Mpc/h, wavenumbers k in h/Mpc, power spectra in
(Mpc/h)^3, velocities peculiar km/s, H in km/s/(Mpc/h) (so H(z=0) = `H0`);
growth factors and rates are dimensionless.

Radiation is neglected, so ``H(a)^2 = H0^2 (omega_m a^-3 + 1 - omega_m)``
with the scale factor ``a = 1 / (1 + z)``.  The linear growth factor is the
growing mode ``D ∝ H ∫_0^a da' / (a' H(a'))^3``, which has the closed form

    D(a) ∝ a 2F1(1/3, 1; 11/6; -a^3 (1 - omega_m) / omega_m),

normalised here to D(z=0) = 1.  Its logarithmic derivative follows exactly
from ``d 2F1(a, b; c; x)/dx = (a b / c) 2F1(a+1, b+1; c+1; x)``.  The
second-order (2LPT) growth is ``D2 = -(3/7) D1^2`` (the flat-LambdaCDM
``Omega_m(z)^(-1/143)`` factor, a sub-percent change, is omitted, so the
2LPT term scales exactly as D1^2).

Peculiar velocities of a displacement field psi(q) [Mpc/h], particle at
comoving ``x = q + psi``, are ``v = a dx/dt = a H dpsi/dln a``.  When psi
depends on time through the growth factor only (as in LPT, or an emulator
conditioned on D), ``dpsi/dln a = f D dpsi/dD`` with the growth rate
``f = dln D / dln a``, so ``v = a H f D dpsi/dD`` (`peculiar_velocity`).
With H in km/s/(Mpc/h) and psi in Mpc/h, v is in km/s and h cancels.  For
2LPT with ``D2 = -(3/7) D1^2`` this gives ``v = a H f (psi1 + 2 psi2)``.

The linear power is ``P(k, z) = D(z)^2 A k^n_s T(k)^2`` with the Eisenstein &
Hu (1998, ApJ 496, 605, eqs. 26-31) no-wiggle transfer function and ``A``
fixed so that the rms linear overdensity in top-hat spheres of 8 Mpc/h is
``sigma8`` at z = 0.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numpy.typing import ArrayLike
from scipy import integrate, optimize
from scipy.special import hyp2f1

from map2map.errors import UserError

__all__ = [
    "H0",
    "Cosmology",
    "scale_factor",
    "hubble",
    "growth_factor",
    "growth_rate",
    "second_order_growth",
    "velocity_factor",
    "peculiar_velocity",
    "redshift_of_growth",
    "eh_nowiggle_transfer",
    "tophat_window",
    "linear_power",
    "sigma_r",
]

H0 = 100.0
"""Hubble constant in km/s/(Mpc/h)."""


@dataclasses.dataclass(frozen=True)
class Cosmology:
    """Flat LambdaCDM parameters: density fractions today, h = H0 / (100 km/s/Mpc), CMB temperature [K]."""

    omega_m: float = 0.31
    omega_b: float = 0.049
    h: float = 0.677
    n_s: float = 0.967
    sigma8: float = 0.81
    T_cmb: float = 2.7255

    def __post_init__(self) -> None:
        if not 0 < self.omega_b < self.omega_m <= 1:
            raise UserError(f"omega_b={self.omega_b}, omega_m={self.omega_m}: expected 0 < omega_b < omega_m <= 1")
        for name in ("h", "sigma8", "T_cmb"):
            if not getattr(self, name) > 0:
                raise UserError(f"{name}={getattr(self, name)!r}: expected a positive number")


def _scalar_or_array(v: np.ndarray) -> float | np.ndarray:
    """A 0-d result as a Python float, so scalar redshifts give scalars."""
    return float(v) if v.ndim == 0 else v


# ------------------------------------------------------------- background

def _redshift(z: ArrayLike) -> np.ndarray:
    """`z` as float64, refused unless every value is > -1 (a positive scale factor)."""
    z = np.asarray(z, dtype=np.float64)
    if np.any(~(z > -1)):
        raise ValueError(f"redshift must be > -1, got {z}")
    return z


def scale_factor(z: ArrayLike) -> np.ndarray:
    """Scale factor a = 1 / (1 + z), dimensionless."""
    return 1.0 / (1.0 + _redshift(z))


def _hyp_arg(z: ArrayLike, omega_m: float) -> np.ndarray:
    """The hypergeometric argument -a^3 (1 - omega_m) / omega_m at redshift z."""
    if not 0.0 < omega_m <= 1.0:
        raise ValueError(f"omega_m must be in (0, 1] for flat LambdaCDM, got {omega_m}")
    return -scale_factor(z) ** 3 * (1.0 - omega_m) / omega_m


def hubble(z: ArrayLike, omega_m: float = 0.31) -> float | np.ndarray:
    """Hubble rate H(z) in km/s/(Mpc/h), i.e. `H0` E(z)."""
    zp1 = 1.0 + _redshift(z)
    return _scalar_or_array(H0 * np.sqrt(omega_m * zp1 ** 3 + 1.0 - omega_m))


# ----------------------------------------------------------------- growth

def _growth_unnormalised(z: ArrayLike, omega_m: float) -> np.ndarray:
    """a 2F1(1/3, 1; 11/6; x): D(a) normalised to D -> a deep in matter domination."""
    return scale_factor(z) * hyp2f1(1 / 3, 1.0, 11 / 6, _hyp_arg(z, omega_m))


def growth_factor(z: ArrayLike, omega_m: float = 0.31) -> float | np.ndarray:
    """Linear growth factor D(z), dimensionless, with D(0) = 1 (closed form, module docstring)."""
    return _scalar_or_array(_growth_unnormalised(z, omega_m) / _growth_unnormalised(0.0, omega_m))


def growth_rate(z: ArrayLike, omega_m: float = 0.31) -> float | np.ndarray:
    """Linear growth rate f = dln D / dln a, dimensionless, exact for flat LambdaCDM."""
    x = _hyp_arg(z, omega_m)
    ratio = hyp2f1(4 / 3, 2.0, 17 / 6, x) / hyp2f1(1 / 3, 1.0, 11 / 6, x)
    return _scalar_or_array(1.0 + (6 / 11) * x * ratio)


def second_order_growth(d1: ArrayLike) -> float | np.ndarray:
    """Second-order (2LPT) growth D2 = -(3/7) D1^2 for a linear growth D1, dimensionless."""
    return _scalar_or_array(-3 / 7 * np.asarray(d1, dtype=np.float64) ** 2)


# ------------------------------------------------------------- velocities

def velocity_factor(z: ArrayLike, omega_m: float = 0.31) -> float | np.ndarray:
    """a H(z) f(z) D(z) in km/s/(Mpc/h): the factor turning dpsi/dD [Mpc/h] into peculiar velocity [km/s].

    Exact for flat LambdaCDM without radiation: D and f are the closed forms
    of `growth_factor` and `growth_rate` (D(0) = 1), H = `H0` E(z), a = 1/(1+z).
    """
    return _scalar_or_array(np.asarray(scale_factor(z) * hubble(z, omega_m) * growth_rate(z, omega_m)
                                       * growth_factor(z, omega_m)))


def peculiar_velocity(dpsi_dD, z: float, omega_m: float = 0.31):
    """Peculiar velocity v = a H(z) f(z) D(z) dpsi/dD [km/s] from dpsi/dD [Mpc/h], the derivative of a
    displacement psi with respect to the linear growth factor D (normalised to D(z=0) = 1).

    `dpsi_dD` may be any array (numpy, torch) that a Python float multiplies;
    it is returned scaled by `velocity_factor` (z a scalar redshift).  psi in
    Mpc/h and H in km/s/(Mpc/h) make v km/s whatever h is (module docstring).
    """
    return float(velocity_factor(z, omega_m)) * dpsi_dD


def redshift_of_growth(d: float, omega_m: float = 0.31) -> float:
    """The redshift z at which `growth_factor` (D(0) = 1) equals `d`, for 0 < d < D(z = -0.99).

    Solved by Brent's method in ln(1 + z) to machine precision; D grows
    monotonically in a, so the root is unique.  A ValueError outside the range.
    """
    lo, hi = np.log(0.01), np.log(1e6)  # ln(1 + z) from z = -0.99 to 10^6
    g = lambda x: growth_factor(np.expm1(x), omega_m) - d  # noqa: E731
    if not (np.isfinite(d) and g(hi) < 0 < g(lo)):
        raise ValueError(f"growth factor {d!r} out of range for omega_m={omega_m}")
    return float(np.expm1(optimize.brentq(g, lo, hi, xtol=1e-14, rtol=4 * np.finfo(float).eps)))


# ------------------------------------------------------------ linear power

def eh_nowiggle_transfer(k: ArrayLike, cosmo: Cosmology | None = None) -> np.ndarray:
    """Eisenstein & Hu (1998) no-wiggle matter transfer function T(k), dimensionless, T -> 1 as k -> 0.

    k in h/Mpc.  The baryon suppression enters through the scale-dependent
    shape parameter Gamma_eff (EH98 eqs. 26, 28, 29-31).
    """
    c = Cosmology() if cosmo is None else cosmo
    k = np.asarray(k, dtype=float)
    theta = c.T_cmb / 2.7
    wm, wb, fb = c.omega_m * c.h ** 2, c.omega_b * c.h ** 2, c.omega_b / c.omega_m
    s = 44.5 * np.log(9.83 / wm) / np.sqrt(1 + 10 * wb ** 0.75)  # sound horizon [Mpc]
    alpha = 1 - 0.328 * np.log(431 * wm) * fb + 0.38 * np.log(22.3 * wm) * fb ** 2
    gamma = c.omega_m * c.h * (alpha + (1 - alpha) / (1 + (0.43 * k * c.h * s) ** 4))
    q = k * theta ** 2 / gamma
    l0 = np.log(2 * np.e + 1.8 * q)
    c0 = 14.2 + 731 / (1 + 62.5 * q)
    return l0 / (l0 + c0 * q ** 2)


def tophat_window(x: ArrayLike) -> np.ndarray:
    """Fourier transform of a unit-volume 3D top-hat, W(x) = 3 (sin x - x cos x) / x^3, x = k R (dimensionless)."""
    x = np.asarray(x, dtype=float)
    small = np.abs(x) < 1e-3
    xs = np.where(small, 1.0, x)
    return np.where(small, 1 - x ** 2 / 10, 3 * (np.sin(xs) - xs * np.cos(xs)) / xs ** 3)


def _sigma2_unnormalised(radius: float, cosmo: Cosmology) -> float:
    """sigma^2(R) of k^n_s T^2 (amplitude 1), R in Mpc/h: int dlnk k^3 P W^2 / (2 pi^2), by Simpson in ln k."""
    lnk = np.linspace(np.log(1e-5), np.log(1e2), 8193)
    k = np.exp(lnk)
    integrand = k ** 3 * k ** cosmo.n_s * eh_nowiggle_transfer(k, cosmo) ** 2
    integrand *= tophat_window(k * radius) ** 2 / (2 * np.pi ** 2)
    return float(integrate.simpson(integrand, x=lnk))


def _amplitude(cosmo: Cosmology) -> float:
    """Primordial amplitude A [(Mpc/h)^(3+n_s)] such that sigma(8 Mpc/h) = sigma8 at z = 0."""
    return cosmo.sigma8 ** 2 / _sigma2_unnormalised(8.0, cosmo)


def linear_power(k: ArrayLike, cosmo: Cosmology | None = None, redshift: float = 0.0) -> np.ndarray:
    """Linear matter power P(k, z) = D(z)^2 A k^n_s T(k)^2 [(Mpc/h)^3], k in h/Mpc."""
    c = Cosmology() if cosmo is None else cosmo
    k = np.asarray(k, dtype=float)
    d = growth_factor(redshift, c.omega_m)
    return d ** 2 * _amplitude(c) * k ** c.n_s * eh_nowiggle_transfer(k, c) ** 2


def sigma_r(radius: float, cosmo: Cosmology | None = None, redshift: float = 0.0) -> float:
    """rms linear overdensity (dimensionless) in top-hat spheres of `radius` [Mpc/h] at `redshift`."""
    c = Cosmology() if cosmo is None else cosmo
    return float(growth_factor(redshift, c.omega_m) * np.sqrt(_amplitude(c) * _sigma2_unnormalised(radius, c)))
