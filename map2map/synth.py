"""Physical example data: linear fields and their 1LPT / 2LPT displacements.

Everything is deterministic from a seed, needs no download, and is written as
channel-first float32 ``.npy`` files, exactly as users bring their own data.

Units: lengths in Mpc/h, wavenumbers k in h/Mpc, power spectra in (Mpc/h)^3.

Physics and conventions
-----------------------
- Linear power ``P(k) = A k^n_s T(k)^2`` with the Eisenstein & Hu (1998,
  ApJ 496, 605, eqs. 26-31) no-wiggle transfer function, ``A`` fixed so that
  the rms linear overdensity in top-hat spheres of 8 Mpc/h is ``sigma8`` at
  z = 0.  Linear growth ``D(z)`` of flat LCDM (radiation neglected) from the
  growth integral, ``D(0) = 1``; ``P(k, z) = D(z)^2 P(k)``.
- Lagrangian perturbation theory, particle at ``x = q + psi(q)``:
  ``psi = -D1 grad phi1 + D2 grad phi2`` with ``lap phi1 = delta_L(q)`` (the
  linear overdensity today, D = 1) and
  ``lap phi2 = sum_{i<j} (phi1_ii phi1_jj - phi1_ij^2)`` (the second invariant
  of the deformation tensor), and ``D2 = -(3/7) D1^2`` (the flat-LCDM
  ``Omega_m(z)^(-1/143)`` factor, a < 1 % change, is omitted so the 2LPT
  term scales exactly as D1^2).  So ``div psi1 = -D1 delta_L`` (matter flows
  into overdensities) and ``div psi2 = D2 * source2``; for a spherical
  overdensity this gives the known second-order density
  ``delta_2 = (17/21) delta_1^2``.  The functions below take the linear
  field at the target redshift, ``delta = D1 delta_L``, which absorbs D1.
- Fourier convention: ``numpy.fft`` (unnormalised forward DFT).  A Gaussian
  field is white noise ``w(x) ~ N(0, 1)`` per cell, transformed and multiplied
  by ``sqrt(P(k) / V_cell)`` with ``V_cell = (L/N)^3``, so that
  ``<|delta_k|^2> = N_cells^2 P(k) / V`` — the normalisation under which
  `map2map.analysis.power_spectrum` measures P(k).  The k = 0 mode and the
  Nyquist planes are set to zero, so every spectral derivative is exact and
  real.
- Displacements are shaped ``(3, N, N, N)``; component ``i`` is along array
  axis ``i``.  Particle ``(i, j, l)`` starts at the cell centre
  ``q = ((i, j, l) + 1/2) L / N``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy import integrate

from map2map.errors import UserError

__all__ = [
    "Cosmology",
    "eh_nowiggle_transfer",
    "tophat_window",
    "linear_power",
    "sigma_r",
    "growth_factor",
    "second_order_growth",
    "wavevectors",
    "gaussian_field",
    "linear_field",
    "za_displacement",
    "second_order_source",
    "lpt2_correction",
    "cic_paint",
    "density_from_displacement",
    "sample_fields",
    "params_path",
    "synthesize",
    "FIELDS",
]

#: field name -> what it holds; `synthesize` writes ``<sample dir>/<name>.npy``.
FIELDS = {
    "dis_za": "Zel'dovich (1LPT) displacement psi1 [Mpc/h], shape (3, N, N, N)",
    "dis_2lpt": "2LPT displacement psi1 + psi2 [Mpc/h], shape (3, N, N, N)",
    "dens_za": "CIC overdensity n/nbar - 1 of the 1LPT particles, shape (1, N, N, N)",
    "dens_2lpt": "CIC overdensity n/nbar - 1 of the 2LPT particles, shape (1, N, N, N)",
}


@dataclasses.dataclass(frozen=True)
class Cosmology:
    """Flat LCDM parameters: density fractions today, h = H0 / (100 km/s/Mpc), CMB temperature [K]."""

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


def _cosmology(cosmo: Cosmology | None) -> Cosmology:
    return Cosmology() if cosmo is None else cosmo


# ------------------------------------------------------------ power spectrum

def eh_nowiggle_transfer(k: np.ndarray, cosmo: Cosmology | None = None) -> np.ndarray:
    """Eisenstein & Hu (1998) no-wiggle matter transfer function T(k), T -> 1 as k -> 0.

    k in h/Mpc.  The baryon suppression enters through the scale-dependent
    shape parameter Gamma_eff (EH98 eqs. 26, 28, 29-31).
    """
    c = _cosmology(cosmo)
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


def tophat_window(x: np.ndarray) -> np.ndarray:
    """Fourier transform of a unit-volume 3D top-hat, W(x) = 3 (sin x - x cos x) / x^3, x = k R."""
    x = np.asarray(x, dtype=float)
    small = np.abs(x) < 1e-3
    xs = np.where(small, 1.0, x)
    return np.where(small, 1 - x ** 2 / 10, 3 * (np.sin(xs) - xs * np.cos(xs)) / xs ** 3)


def _sigma2_unnormalised(radius: float, cosmo: Cosmology) -> float:
    """sigma^2(R) of k^n_s T^2 (amplitude 1): int dlnk k^3 P W^2 / (2 pi^2), by Simpson in ln k."""
    lnk = np.linspace(np.log(1e-5), np.log(1e2), 8193)
    k = np.exp(lnk)
    integrand = k ** 3 * k ** cosmo.n_s * eh_nowiggle_transfer(k, cosmo) ** 2
    integrand *= tophat_window(k * radius) ** 2 / (2 * np.pi ** 2)
    return float(integrate.simpson(integrand, x=lnk))


@functools.lru_cache(maxsize=32)
def _amplitude(cosmo: Cosmology) -> float:
    """Primordial amplitude A [(Mpc/h)^(3+n_s)] such that sigma(8 Mpc/h) = sigma8 at z = 0."""
    return cosmo.sigma8 ** 2 / _sigma2_unnormalised(8.0, cosmo)


def linear_power(k: np.ndarray, cosmo: Cosmology | None = None, redshift: float = 0.0) -> np.ndarray:
    """Linear matter power P(k, z) = D(z)^2 A k^n_s T(k)^2 [(Mpc/h)^3], k in h/Mpc."""
    c = _cosmology(cosmo)
    k = np.asarray(k, dtype=float)
    d = growth_factor(redshift, c)
    return d ** 2 * _amplitude(c) * k ** c.n_s * eh_nowiggle_transfer(k, c) ** 2


def sigma_r(radius: float, cosmo: Cosmology | None = None, redshift: float = 0.0) -> float:
    """rms linear overdensity in top-hat spheres of `radius` [Mpc/h] at `redshift`."""
    c = _cosmology(cosmo)
    return float(growth_factor(redshift, c) * np.sqrt(_amplitude(c) * _sigma2_unnormalised(radius, c)))


# -------------------------------------------------------------------- growth

def _growth_unnormalised(a: float, omega_m: float) -> float:
    """D(a) proportional to E(a) int_0^a da' / (a' E(a'))^3, with E = H / H0 of flat LCDM."""
    def e(x: float) -> float:
        return np.sqrt(omega_m / x ** 3 + 1 - omega_m)

    integral, _ = integrate.quad(lambda x: 1 / (x * e(x)) ** 3, 0, a, epsabs=0, epsrel=1e-11)
    return e(a) * integral


def growth_factor(redshift: float, cosmo: Cosmology | None = None) -> float:
    """Linear growth factor D(z) of flat LCDM, normalised to D(0) = 1 (dimensionless)."""
    c = _cosmology(cosmo)
    if not redshift > -1:
        raise UserError(f"redshift={redshift!r}: expected a number > -1")
    a = 1 / (1 + redshift)
    return _growth_unnormalised(a, c.omega_m) / _growth_unnormalised(1.0, c.omega_m)


def second_order_growth(d1: float) -> float:
    """Second-order growth D2 = -(3/7) D1^2 (Omega_m^(-1/143) factor omitted)."""
    return -3 / 7 * d1 ** 2


# ----------------------------------------------------------- Gaussian field

def wavevectors(ngrid: int, boxsize: float) -> list[np.ndarray]:
    """Sparse rfftn-layout wavevector components k_i [h/Mpc] of an ngrid^3 box of side boxsize [Mpc/h]."""
    kf = 2 * np.pi / boxsize
    full = np.fft.fftfreq(ngrid, 1 / ngrid) * kf
    half = np.fft.rfftfreq(ngrid, 1 / ngrid) * kf
    return np.meshgrid(full, full, half, indexing="ij", sparse=True)


def _nyquist_mask(ngrid: int) -> np.ndarray:
    """True for rfftn modes off the Nyquist planes (all modes for odd ngrid)."""
    n = [np.fft.fftfreq(ngrid, 1 / ngrid), np.fft.fftfreq(ngrid, 1 / ngrid), np.fft.rfftfreq(ngrid, 1 / ngrid)]
    grids = np.meshgrid(*n, indexing="ij", sparse=True)
    keep = np.ones((ngrid, ngrid, ngrid // 2 + 1), dtype=bool)
    if ngrid % 2 == 0:
        for g in grids:
            keep &= np.abs(g) != ngrid // 2
    return keep


def gaussian_field(noise: np.ndarray, boxsize: float, power: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Colour unit white noise (N^3, real space) into a field with power spectrum `power`.

    `power` is a callable P(k) [(Mpc/h)^3] of k [h/Mpc].  Returns
    ``irfftn(rfftn(noise) * sqrt(P(k) / V_cell))`` with the mean and the
    Nyquist planes zeroed (see the module docstring).
    """
    n = noise.shape[0]
    if noise.shape != (n, n, n):
        raise UserError(f"noise of shape {noise.shape}: expected a cubic (N, N, N) grid")
    k = np.sqrt(sum(ki ** 2 for ki in wavevectors(n, boxsize)))
    amp = np.zeros_like(k)
    nonzero = k > 0
    amp[nonzero] = np.sqrt(power(k[nonzero]) / (boxsize / n) ** 3)
    delta_k = np.fft.rfftn(noise) * amp * _nyquist_mask(n)
    return np.fft.irfftn(delta_k, s=noise.shape, axes=(0, 1, 2))


def linear_field(ngrid: int, boxsize: float, rng: np.random.Generator, redshift: float = 0.0,
                 cosmo: Cosmology | None = None) -> np.ndarray:
    """Linear overdensity delta_L(x, z) (dimensionless, float64, (N, N, N)) from `rng` white noise."""
    c = _cosmology(cosmo)
    noise = rng.standard_normal((ngrid, ngrid, ngrid))
    return gaussian_field(noise, boxsize, lambda k: linear_power(k, c, redshift))


# ------------------------------------------------------------------------ LPT

def _inverse_laplacian_k(field_k: np.ndarray, k2: np.ndarray) -> np.ndarray:
    """phi_k = -field_k / k^2 (so lap phi = field), with the k = 0 mode set to zero."""
    out = np.zeros_like(field_k)
    np.divide(-field_k, k2, out=out, where=k2 > 0)
    return out


def _gradient_k(ngrid: int, boxsize: float) -> list[np.ndarray]:
    """Wavevector components for odd (first) derivatives, zero on the Nyquist plane of each axis."""
    ks = wavevectors(ngrid, boxsize)
    if ngrid % 2 == 0:
        kny = np.pi * ngrid / boxsize
        ks = [np.where(np.isclose(np.abs(k), kny), 0.0, k) for k in ks]
    return ks


def _grad_of_potential(phi_k: np.ndarray, ngrid: int, boxsize: float) -> np.ndarray:
    """grad phi (3, N, N, N) in real space from phi_k in rfftn layout."""
    shape = (ngrid,) * 3
    return np.stack([np.fft.irfftn(1j * ki * phi_k, s=shape, axes=(0, 1, 2)) for ki in _gradient_k(ngrid, boxsize)])


def za_displacement(delta: np.ndarray, boxsize: float) -> np.ndarray:
    """Zel'dovich displacement psi1 = -grad lap^-1 delta [Mpc/h], (3, N, N, N) float64.

    In Fourier space psi1_k = i k delta_k / k^2; div psi1 = -delta.  `delta`
    is the linear overdensity at the target redshift.
    """
    n = delta.shape[0]
    k2 = sum(ki ** 2 for ki in wavevectors(n, boxsize))
    phi_k = _inverse_laplacian_k(np.fft.rfftn(delta), k2)
    return -_grad_of_potential(phi_k, n, boxsize)


def second_order_source(delta: np.ndarray, boxsize: float) -> np.ndarray:
    """source2 = sum_{i<j} (phi_ii phi_jj - phi_ij^2) with lap phi = delta (dimensionless, (N, N, N)).

    Second derivatives phi_ij = irfftn(k_i k_j delta_k / k^2).
    """
    n = delta.shape[0]
    shape = (n,) * 3
    ks, kodd = wavevectors(n, boxsize), _gradient_k(n, boxsize)
    k2 = sum(ki ** 2 for ki in ks)
    phi_k = _inverse_laplacian_k(np.fft.rfftn(delta), k2)
    diag = [np.fft.irfftn(-ki * ki * phi_k, s=shape, axes=(0, 1, 2)) for ki in ks]
    source = diag[0] * diag[1] + diag[0] * diag[2] + diag[1] * diag[2]
    for i, j in ((0, 1), (0, 2), (1, 2)):
        source -= np.fft.irfftn(-kodd[i] * kodd[j] * phi_k, s=shape, axes=(0, 1, 2)) ** 2
    return source


def lpt2_correction(delta: np.ndarray, boxsize: float) -> np.ndarray:
    """2LPT displacement psi2 = D2 grad phi2 [Mpc/h], (3, N, N, N) float64.

    `delta` = D1 delta_L is the linear overdensity at the target redshift, so
    the source built from it carries D1^2 and ``psi2 = -(3/7) grad lap^-1
    source2(delta)``, i.e. ``div psi2 = -(3/7) source2(delta)``.
    """
    n = delta.shape[0]
    k2 = sum(ki ** 2 for ki in wavevectors(n, boxsize))
    phi2_k = _inverse_laplacian_k(np.fft.rfftn(second_order_source(delta, boxsize)), k2)
    return second_order_growth(1.0) * _grad_of_potential(phi2_k, n, boxsize)


# ---------------------------------------------------------------- densities

def cic_paint(positions: np.ndarray, ngrid: int, boxsize: float) -> np.ndarray:
    """Cloud-in-cell mass assignment of unit-mass particles on a periodic ngrid^3 grid.

    `positions` (3, M) [Mpc/h]; cell (i, j, l) is centred at ((i, j, l) + 1/2)
    L / N.  Returns particle counts per cell (float64, (N, N, N)); the total
    equals M exactly up to rounding.
    """
    cell = boxsize / ngrid
    g = np.asarray(positions, dtype=float).reshape(3, -1) / cell - 0.5
    i0 = np.floor(g)
    frac = g - i0
    i0 = i0.astype(np.int64)
    counts = np.zeros(ngrid ** 3)
    for corner in np.ndindex(2, 2, 2):
        idx = np.zeros(g.shape[1], dtype=np.int64)
        weight = np.ones(g.shape[1])
        for axis, c in enumerate(corner):
            idx = idx * ngrid + (i0[axis] + c) % ngrid
            weight *= frac[axis] if c else 1 - frac[axis]
        counts += np.bincount(idx, weights=weight, minlength=ngrid ** 3)
    return counts.reshape((ngrid,) * 3)


def density_from_displacement(displacement: np.ndarray, boxsize: float) -> np.ndarray:
    """Overdensity n / nbar - 1 (float64, (N, N, N)) of one particle per cell moved by `displacement` [Mpc/h]."""
    n = displacement.shape[1]
    q = (np.arange(n) + 0.5) * boxsize / n
    grid = np.stack(np.meshgrid(q, q, q, indexing="ij"))
    return cic_paint(grid + displacement, n, boxsize) - 1.0


# ------------------------------------------------------------------- writing

def _save_atomic(path: Path, array: np.ndarray) -> None:
    """Write `array` as .npy to a temporary name in the same directory, then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json_atomic(path: Path, obj: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def sample_fields(rng: np.random.Generator, ngrid: int, boxsize: float, redshift: float,
                  cosmo: Cosmology, density: bool) -> dict[str, np.ndarray]:
    """All fields of one sample as channel-first float32 arrays, keyed by `FIELDS` names."""
    delta = linear_field(ngrid, boxsize, rng, redshift, cosmo)
    psi1 = za_displacement(delta, boxsize)
    psi = psi1 + lpt2_correction(delta, boxsize)
    out = {"dis_za": psi1, "dis_2lpt": psi}
    if density:
        out["dens_za"] = density_from_displacement(psi1, boxsize)[None]
        out["dens_2lpt"] = density_from_displacement(psi, boxsize)[None]
    return {name: a.astype(np.float32) for name, a in out.items()}


def _check_args(nsamples: Any, ngrid: Any, boxsize: Any, seed: Any, redshift: Any) -> None:
    for name, value, low in (("nsamples", nsamples, 1), ("ngrid", ngrid, 2), ("seed", seed, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise UserError(f"{name}={value!r}: expected an integer >= {low}")
    if not (isinstance(boxsize, (int, float)) and np.isfinite(boxsize) and boxsize > 0):
        raise UserError(f"boxsize={boxsize!r}: expected a positive number (Mpc/h)")
    if not (isinstance(redshift, (int, float)) and np.isfinite(redshift) and redshift > -1):
        raise UserError(f"redshift={redshift!r}: expected a number > -1")


def params_path(outdir: str | os.PathLike, prefix: str = "") -> Path:
    """Where `synthesize` writes the JSON record of its parameters."""
    return Path(outdir) / f"{prefix}synth.json"


def synthesize(outdir: str | os.PathLike, *, nsamples: int = 1, ngrid: int = 32, boxsize: float = 128.0,
               seed: int = 0, redshift: float = 0.0, density: bool = False, prefix: str = "",
               **cosmo: float) -> dict[str, list[Path]]:
    """Write `nsamples` simulated samples of 1LPT and 2LPT displacements (and densities) as .npy.

    Sample ``i`` goes to ``outdir/{prefix}{i:03d}/{name}.npy`` for the names in
    `FIELDS` (``dens_*`` only with ``density=True``), channel-first float32,
    written atomically.  Its random stream is
    ``numpy.random.default_rng(SeedSequence([seed, i]))``, so each sample is
    reproducible on its own and independent of `nsamples`.  ``**cosmo`` are
    `Cosmology` fields.  The parameters go to `params_path(outdir, prefix)`,
    written last.  Returns ``{name: [path of sample 0, 1, ...]}``.
    """
    _check_args(nsamples, ngrid, boxsize, seed, redshift)
    unknown = set(cosmo) - {f.name for f in dataclasses.fields(Cosmology)}
    if unknown:
        raise UserError(f"unknown cosmological parameter(s) {sorted(unknown)}: expected "
                        f"{[f.name for f in dataclasses.fields(Cosmology)]}")
    c = Cosmology(**cosmo)
    outdir = Path(outdir)
    width = max(3, len(str(nsamples - 1)))
    paths: dict[str, list[Path]] = {}
    samples = []
    for i in range(nsamples):
        rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
        sample_dir = outdir / f"{prefix}{i:0{width}d}"
        sample_dir.mkdir(parents=True, exist_ok=True)
        for name, array in sample_fields(rng, ngrid, float(boxsize), float(redshift), c, density).items():
            path = sample_dir / f"{name}.npy"
            _save_atomic(path, array)
            paths.setdefault(name, []).append(path)
        samples.append({"dir": sample_dir.name, "seed_sequence": [seed, i]})
    d1 = growth_factor(redshift, c)
    record = {
        "generator": "map2map.synth", "ngrid": ngrid, "boxsize": float(boxsize), "seed": seed,
        "redshift": float(redshift), "cosmology": dataclasses.asdict(c), "growth_D1": d1,
        "growth_D2": second_order_growth(d1), "sigma8_at_z": c.sigma8 * d1, "units": "Mpc/h, h/Mpc",
        "fields": {name: FIELDS[name] for name in paths}, "samples": samples,
    }
    _write_json_atomic(params_path(outdir, prefix), record)
    return paths
