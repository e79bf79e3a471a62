"""`m2m synth`: physical example data, linear fields and their 1LPT / 2LPT displacements.

`run` takes a `SynthConfig` (the command line's options) and returns a
`SynthSummary`.  Everything is deterministic from a seed, needs no download,
and is written as channel-first float32 ``.npy`` files, exactly as users
bring their own data.

Units: lengths in Mpc/h, wavenumbers k in h/Mpc, power spectra in (Mpc/h)^3.
The cosmology (expansion, growth D1 and D2, the linear power spectrum) is
`map2map.cosmology`'s; this module adds the random fields and the LPT.

Physics and conventions
-----------------------
- Linear power ``P(k, z) = D(z)^2 P(k)`` from `map2map.cosmology.linear_power`.
- Lagrangian perturbation theory, particle at ``x = q + psi(q)``:
  ``psi = -D1 grad phi1 + D2 grad phi2`` with ``lap phi1 = delta_L(q)`` (the
  linear overdensity today, D = 1) and
  ``lap phi2 = sum_{i<j} (phi1_ii phi1_jj - phi1_ij^2)`` (the second invariant
  of the deformation tensor), and ``D2 = -(3/7) D1^2``
  (`map2map.cosmology.second_order_growth`).  So ``div psi1 = -D1 delta_L``
  (matter flows into overdensities) and ``div psi2 = D2 * source2``; for a
  spherical overdensity this gives the known second-order density
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
- Velocities (``velocity``): peculiar velocities [km/s] of the particles,
  ``v = a H f (psi1 + 2 psi2)`` (`map2map.cosmology.peculiar_velocity` of
  dpsi/dD, since psi1 grows as D and psi2 as D^2).
- Styled runs (``redshifts``, ``omega_m``): every realisation (seed, i) is
  written at every pair (redshift, Omega_m), with the same white noise, as
  its own sample directory; a style table (`style_table_path`) gives each
  sample directory, in sorted order, its ``Om`` and growth factor ``D``
  (D(z=0) = 1 for that Omega_m), for ``m2m convert --styles``.
- Super-resolution pairs (``sr``, `sr_linear_fields`): the low-resolution
  linear field is the one `linear_field` makes at N^3 from the sample's
  stream; the high-resolution one at (N F)^3 is the same continuous field
  wherever every integer frequency satisfies ``|n_i| <= (N - 1) // 2``
  (below the low-resolution Nyquist frequency), and has fresh modes of the
  same spectrum, from the next draws of the stream, everywhere else.  Same
  continuous field: the amplitude ``c_k = DFT[n] exp(-i k.h/2) / N_cells``
  per mode, h the cell side, is equal on both grids (the phase because a
  sample sits at its cell centre, half a cell from the DFT's origin).  Each
  grid then gets its own 2LPT.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from map2map import store
from map2map.cosmology import (Cosmology, eh_nowiggle_transfer, growth_factor, linear_power, peculiar_velocity,
                               second_order_growth, sigma_r, tophat_window)
from map2map.errors import UserError
from map2map.stage import Summary
from map2map.utils import durable
from map2map.utils.durable import atomic_write
from map2map.utils.locks import writer_lock

__all__ = [
    "Cosmology",
    "eh_nowiggle_transfer",
    "tophat_window",
    "linear_power",
    "sigma_r",
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
    "remove_earlier",
    "check_config",
    "check_resources",
    "SynthConfig",
    "SynthSummary",
    "run",
    "FIELDS",
    "CHANNELS",
    "field_names",
    "SR_FIELDS",
    "VELOCITY_FIELDS",
    "STYLE_NAMES",
    "style_table_path",
    "shared_modes",
    "centred_amplitudes",
    "sr_linear_fields",
    "sr_sample_fields",
]

#: field name -> what it holds; `run` writes ``<sample dir>/<name>.npy``.
FIELDS = {
    "dis_za": "Zel'dovich (1LPT) displacement psi1 [Mpc/h], shape (3, N, N, N)",
    "dis_2lpt": "2LPT displacement psi1 + psi2 [Mpc/h], shape (3, N, N, N)",
    "dens_za": "CIC overdensity n/nbar - 1 of the 1LPT particles, shape (1, N, N, N)",
    "dens_2lpt": "CIC overdensity n/nbar - 1 of the 2LPT particles, shape (1, N, N, N)",
}
#: field name -> what it holds, written with `velocity` besides `FIELDS`.
VELOCITY_FIELDS = {
    "vel_za": "Zel'dovich (1LPT) peculiar velocity a H f psi1 [km/s], shape (3, N, N, N)",
    "vel_2lpt": "2LPT peculiar velocity a H f (psi1 + 2 psi2) [km/s], shape (3, N, N, N)",
}
#: the style parameters of a styled run, in the columns of its style table.
STYLE_NAMES = ("Om", "D")
#: field name -> what it holds, for super-resolution pairs (``sr``: F, the grid refinement factor).
SR_FIELDS = {
    "dis_lr": "2LPT displacement [Mpc/h] on the low-resolution grid, shape (3, N, N, N)",
    "dis_hr": "2LPT displacement [Mpc/h] on the high-resolution grid, shape (3, N F, N F, N F)",
    "dens_lr": "CIC overdensity n/nbar - 1 of the low-resolution 2LPT particles, shape (1, N, N, N)",
    "dens_hr": "CIC overdensity n/nbar - 1 of the high-resolution 2LPT particles, shape (1, N F, N F, N F)",
}
#: field name -> its number of channels (the first axis of its arrays).
CHANNELS = {name: 1 if name.startswith("dens") else 3 for name in {**FIELDS, **VELOCITY_FIELDS, **SR_FIELDS}}


def field_names(density: bool, sr: int | None = None, velocity: bool = False) -> list[str]:
    """The fields `run` writes: the displacements, the densities with `density`, the velocities with
    `velocity` (`SR_FIELDS` instead with `sr`)."""
    names = {**FIELDS, **VELOCITY_FIELDS} if velocity else FIELDS
    return [name for name in (names if sr is None else SR_FIELDS) if density or not name.startswith("dens")]


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Everything `m2m synth` takes; field names are the command line's option names.

    Sample ``i`` goes to ``outdir/{prefix}{i:03d}/{name}.npy`` for the names
    in `FIELDS` (``dens_*`` only with `density`), or in `SR_FIELDS` with
    `sr` (the refinement factor F >= 2 of the high-resolution grid, whose
    side is ``ngrid * sr``).  `velocity` adds `VELOCITY_FIELDS`.  With
    `redshifts` (replacing `redshift`) or `omega_m` (replacing the
    cosmology's), every realisation is written at every (redshift, Omega_m)
    pair, sample directories numbered realisation-major, and the style table
    (`style_table_path`) is written too.  `cosmology` has no option
    on the command line (the defaults of `Cosmology`).  An existing
    non-empty `outdir` is written into only with `overwrite`, which first
    removes what an earlier run with the same `prefix` wrote there
    (`remove_earlier`).
    """

    outdir: str
    num_samples: int = 1
    ngrid: int = 32
    boxsize: float = 128.0
    seed: int = 0
    redshift: float = 0.0
    density: bool = False
    prefix: str = ""
    overwrite: bool = False
    cosmology: Cosmology = Cosmology()
    sr: int | None = None
    velocity: bool = False
    redshifts: tuple[float, ...] | None = None
    omega_m: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("redshifts", "omega_m"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value) if isinstance(value, (list, np.ndarray)) else (value,))

    @property
    def styled(self) -> bool:
        """Whether the run varies redshift or Omega_m and writes a style table."""
        return self.redshifts is not None or self.omega_m is not None

    def variants(self) -> list[tuple[float, Cosmology]]:
        """The (redshift, cosmology) pairs each realisation is written at, redshift-major."""
        zs = self.redshifts if self.redshifts is not None else (self.redshift,)
        oms = self.omega_m if self.omega_m is not None else (self.cosmology.omega_m,)
        return [(float(z), dataclasses.replace(self.cosmology, omega_m=float(om))) for z in zs for om in oms]

    @property
    def grids(self) -> tuple[int, ...]:
        """The grid sides of a sample: ``(ngrid,)``, or ``(ngrid, ngrid * sr)`` for super-resolution pairs."""
        return (self.ngrid,) if self.sr is None else (self.ngrid, self.ngrid * self.sr)


@dataclasses.dataclass
class SynthSummary(Summary):
    """What `run` wrote: the files of each field (sample 0, 1, ...), the parameter record, the time taken."""

    outdir: str
    paths: dict[str, list[str]]
    params: str
    seconds: float
    notes: list[str] = dataclasses.field(default_factory=list)
    style_table: str | None = None

    def lines(self) -> list[str]:
        counted = [f"{name}: {len(files)} file{'' if len(files) == 1 else 's'}, e.g. {files[0]}"
                   for name, files in self.paths.items()]
        if self.style_table is not None:
            counted.append(f"styles: {', '.join(STYLE_NAMES)} of every sample in {self.style_table} "
                           "(for m2m convert --styles)")
        return [f"note: {note}" for note in self.notes] + counted


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
    noise = rng.standard_normal((ngrid, ngrid, ngrid))
    return gaussian_field(noise, boxsize, lambda k: linear_power(k, cosmo, redshift))


Index = tuple[np.ndarray, ...]


def shared_modes(ngrid: int, factor: int) -> tuple[Index, Index, Index]:
    """The modes an ngrid^3 grid shares with its (ngrid factor)^3 refinement, in rfftn layout.

    Shared are the integer frequencies (cycles per box) with
    ``|n_i| <= (ngrid - 1) // 2`` on every axis.  Returns ``(lo, hi, freqs)``:
    `lo` and `hi` index the low- and high-resolution rfftn arrays (``np.ix_``
    tuples) so that ``a_lo[lo]`` and ``a_hi[hi]`` list the same frequencies
    in the same order, and `freqs` holds those integer frequencies per axis
    (sparse, broadcasting to the same shape).
    """
    m = (ngrid - 1) // 2
    full = np.concatenate([np.arange(0, m + 1), np.arange(-m, 0)])
    half = np.arange(0, m + 1)
    hi_n = ngrid * factor
    return (np.ix_(full % ngrid, full % ngrid, half), np.ix_(full % hi_n, full % hi_n, half),
            np.ix_(full, full, half))


def centred_amplitudes(field_k: np.ndarray, freqs: tuple[np.ndarray, ...], ngrid: int) -> np.ndarray:
    """Fourier amplitudes c_k of the continuous periodic field sampled at the cell centres of an ngrid^3 grid.

    `field_k` holds rfftn coefficients at the integer frequencies `freqs`
    (from `shared_modes`); ``c_k = field_k exp(-i pi sum_i n_i / ngrid) / ngrid^3``,
    dimensionless like the field, and independent of the grid it is sampled on.
    """
    phase = np.exp(-1j * np.pi * sum(f for f in freqs) / ngrid)
    return field_k * phase / float(ngrid) ** 3


def sr_linear_fields(ngrid: int, factor: int, boxsize: float, rng: np.random.Generator, redshift: float = 0.0,
                     cosmo: Cosmology | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Linear overdensities (low, high resolution) of one box: (N, N, N) and (N F, N F, N F), float64.

    The low-resolution field is `linear_field` of `rng`; the high-resolution
    one is the same continuous field on the shared modes (`shared_modes`,
    equal `centred_amplitudes`) and gets fresh modes of the same spectrum,
    coloured from the next (N F)^3 draws of `rng`, everywhere else (module
    docstring).
    """
    low = linear_field(ngrid, boxsize, rng, redshift, cosmo)
    hi_n = ngrid * factor
    noise = rng.standard_normal((hi_n,) * 3)
    high_k = np.fft.rfftn(gaussian_field(noise, boxsize, lambda k: linear_power(k, cosmo, redshift)))
    del noise
    lo_index, hi_index, freqs = shared_modes(ngrid, factor)
    amplitude = centred_amplitudes(np.fft.rfftn(low)[lo_index], freqs, ngrid)
    high_k[hi_index] = amplitude / centred_amplitudes(np.ones(1), freqs, hi_n)
    return low, np.fft.irfftn(high_k, s=(hi_n,) * 3, axes=(0, 1, 2))


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

def sample_fields(rng: np.random.Generator, ngrid: int, boxsize: float, redshift: float,
                  cosmo: Cosmology, density: bool, velocity: bool = False) -> dict[str, np.ndarray]:
    """All fields of one sample as channel-first float32 arrays, keyed by `FIELDS` (and `VELOCITY_FIELDS`) names."""
    delta = linear_field(ngrid, boxsize, rng, redshift, cosmo)
    psi1 = za_displacement(delta, boxsize)
    psi2 = lpt2_correction(delta, boxsize)
    psi = psi1 + psi2
    out = {"dis_za": psi1, "dis_2lpt": psi}
    if velocity:
        d1 = growth_factor(redshift, cosmo.omega_m)
        out["vel_za"] = peculiar_velocity(psi1 / d1, redshift, cosmo.omega_m)
        out["vel_2lpt"] = peculiar_velocity((psi1 + 2 * psi2) / d1, redshift, cosmo.omega_m)
    del psi2
    if density:
        out["dens_za"] = density_from_displacement(psi1, boxsize)[None]
        out["dens_2lpt"] = density_from_displacement(psi, boxsize)[None]
    return {name: a.astype(np.float32) for name, a in out.items()}


def sr_sample_fields(rng: np.random.Generator, ngrid: int, factor: int, boxsize: float, redshift: float,
                     cosmo: Cosmology, density: bool) -> dict[str, np.ndarray]:
    """A super-resolution pair's fields as channel-first float32 arrays, keyed by `SR_FIELDS` names.

    2LPT displacements (and CIC overdensities with `density`) of the linear
    fields of `sr_linear_fields`, each on its own grid.
    """
    out = {}
    for tag, delta in zip(("lr", "hr"), sr_linear_fields(ngrid, factor, boxsize, rng, redshift, cosmo)):
        psi = za_displacement(delta, boxsize) + lpt2_correction(delta, boxsize)
        del delta
        out[f"dis_{tag}"] = psi.astype(np.float32)
        if density:
            out[f"dens_{tag}"] = density_from_displacement(psi, boxsize)[None].astype(np.float32)
    return out


# Peak bytes of memory per voxel while one sample is made (`sample_fields`), without and with densities:
# measured with tracemalloc at several grid sizes (it does not depend on the size), plus a tenth for margin.
PEAK_BYTES_PER_VOXEL = {False: 120, True: 256}


def check_config(config: SynthConfig) -> None:
    """Refuse options out of range (a one-line `UserError` naming the option); `check_resources` checks sizes."""
    for name, low in (("num_samples", 1), ("ngrid", 2), ("seed", 0)):
        value = getattr(config, name)
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise UserError(f"--{name.replace('_', '-')} {value!r}: expected a whole number >= {low}")
    if config.sr is not None:
        value = config.sr
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 2:
            raise UserError(f"--sr {value!r}: expected a whole refinement factor >= 2 of the high-resolution "
                            "grid (e.g. 2 for a 2x finer target)")
    boxsize, redshift = config.boxsize, config.redshift
    if not (isinstance(boxsize, (int, float)) and np.isfinite(boxsize) and boxsize > 0):
        raise UserError(f"--boxsize {boxsize!r}: expected a finite positive box side (Mpc/h)")
    if not (isinstance(redshift, (int, float)) and np.isfinite(redshift) and redshift > -1):
        raise UserError(f"--redshift {redshift!r}: expected a finite number > -1")
    if not isinstance(config.cosmology, Cosmology):
        raise UserError(f"cosmology={config.cosmology!r}: expected a map2map.cosmology.Cosmology")
    _check_styled(config)
    prefix = config.prefix
    if not isinstance(prefix, str) or any(sep in prefix for sep in {"/", os.sep, os.altsep or "/", "\0"}):
        raise UserError(f"--prefix {prefix!r}: a prefix of sample directory names may not contain '/' (nor "
                        "leave the output directory); give the directory as OUTDIR instead")


def _check_styled(config: SynthConfig) -> None:
    """Refuse bad ``--redshifts`` / ``--omega-m`` lists and options they do not combine with."""
    for option, values in (("--redshifts", config.redshifts), ("--omega-m", config.omega_m)):
        if values is None:
            continue
        if not values:
            raise UserError(f"{option}: give at least one value")
        if len(set(values)) != len(values):
            raise UserError(f"{option} {','.join(map(str, values))}: a value is given twice; each must differ")
        for v in values:
            if not (isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and np.isfinite(v)):
                raise UserError(f"{option} {v!r}: expected finite numbers")
    if config.redshifts is not None:
        if config.redshift != 0.0:
            raise UserError("--redshift and --redshifts exclude each other: give the redshifts as one list")
        for z in config.redshifts:
            if not z > -1:
                raise UserError(f"--redshifts {z!r}: expected redshifts > -1")
    if config.omega_m is not None:
        ob = config.cosmology.omega_b
        for om in config.omega_m:
            if not ob < om <= 1:
                raise UserError(f"--omega-m {om!r}: expected Omega_m above Omega_b = {ob} and at most 1 "
                                "(flat LambdaCDM)")
    if config.sr is not None and (config.styled or config.velocity):
        raise UserError("--sr writes super-resolution pairs at one redshift and cosmology, without velocities; "
                        "leave out --redshifts, --omega-m and --velocity")


def available_memory() -> int | None:
    """Bytes of memory this process may still take: MemAvailable, less if a cgroup limit is lower (Linux)."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            limits += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        limits = []  # no such file (not Linux) or not in the expected form: unknown
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f1, open(usage_file) as f2:
                limit, usage = f1.read().strip(), int(f2.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit():
            limits.append(max(0, int(limit) - usage))
    return min(limits) if limits else None


def _size(nbytes: float) -> str:
    """`nbytes` in binary units, e.g. ``1.5 GiB``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    power = 0
    while nbytes >= 1024 and power < len(units) - 1:
        nbytes /= 1024
        power += 1
    return f"{nbytes:.3g} {units[power]}"


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path):
        path = path.parent
    return path


def check_resources(config: SynthConfig) -> None:
    """Refuse a run that cannot fit: one sample's peak memory, or all the files on the disk."""
    grids = config.grids
    need = PEAK_BYTES_PER_VOXEL[bool(config.density)] * sum(n ** 3 for n in grids)
    have = available_memory()
    what = f"--ngrid {config.ngrid}" + (f" --sr {config.sr}" if config.sr is not None else "")
    if have is not None and need > have:
        raise UserError(f"{what}: making one sample needs about {_size(need)} of memory, "
                        f"{_size(have)} is available; use a smaller --ngrid")
    names = field_names(config.density, config.sr, config.velocity)
    per_sample = sum(CHANNELS[name] * (grids[-1] if name.endswith("_hr") else grids[0]) ** 3 for name in names)
    count = config.num_samples * len(config.variants())
    files = count * per_sample * np.dtype(np.float32).itemsize
    free = shutil.disk_usage(_nearest_existing(Path(config.outdir))).free
    if files > free:
        raise UserError(f"{config.outdir}: {count} samples of {' and '.join(f'{n}^3' for n in grids)} need about "
                        f"{_size(files)} on disk, {_size(free)} is free; use fewer or smaller samples")


def params_path(outdir: str | os.PathLike, prefix: str = "") -> Path:
    """Where `run` writes the JSON record of its parameters (and of the files it writes)."""
    return Path(outdir) / f"{prefix}synth.json"


def style_table_path(outdir: str | os.PathLike, prefix: str = "") -> Path:
    """Where a styled `run` writes its style table: CSV, header `STYLE_NAMES`, one row per sample directory."""
    return Path(outdir) / f"{prefix}styles.csv"


def _written_by(record: dict) -> list[Path]:
    """The files a record says its run wrote (or was about to write), relative to the output directory."""
    names = record.get("fields", {})
    return [Path(s["dir"]) / f"{name}.npy" for s in record.get("samples", []) for name in names
            if isinstance(s, dict) and isinstance(s.get("dir"), str)]


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("generator") == "map2map.synth" else None


def remove_earlier(outdir: Path, prefix: str) -> int:
    """Delete what an earlier `run` into `outdir` with `prefix` wrote, per its record; returns the files removed.

    Only the files the record names (and the temporaries of them a killed
    run left), then their sample directories if that left them empty, then
    the record itself: never any other file.  A sample directory named in
    the record must be a plain name inside `outdir`.
    """
    record_path = params_path(outdir, prefix)
    record = _read_record(record_path)
    if record is None:
        return 0
    removed = 0
    dirs = []
    for rel in _written_by(record):
        if rel.parent.name != str(rel.parent) or rel.parent.name in ("", ".", ".."):
            continue  # not a plain sample directory name: not ours to touch
        target = outdir / rel
        dirs.append(target.parent)
        if target.is_file() and not target.is_symlink():
            target.unlink()
            removed += 1
        if target.parent.is_dir():
            for leftover in target.parent.iterdir():
                if leftover.name.startswith(f"{durable.TMP_PREFIX}{rel.name}."):
                    leftover.unlink()
    for d in dict.fromkeys(dirs):
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    table = record.get("style_table")
    if table == style_table_path("", prefix).name:  # only the name a styled run with this prefix writes
        target = outdir / table
        if target.is_file() and not target.is_symlink():
            target.unlink()
            removed += 1
    record_path.unlink()
    return removed


def _check_outdir(config: SynthConfig, *, emptiness: bool) -> None:
    """The output directory: creatable, a directory, and (`emptiness`) empty unless `overwrite`."""
    outdir = Path(config.outdir)
    store.check_output_path(outdir, option="OUTDIR")
    if os.path.lexists(outdir) and not outdir.is_dir():
        raise UserError(f"OUTDIR {outdir} exists and is not a directory; choose another path")
    if emptiness and outdir.is_dir() and any(outdir.iterdir()) and not config.overwrite:
        earlier = _read_record(params_path(outdir, config.prefix))
        what = ("an earlier m2m synth's files" if earlier is not None else "files m2m synth did not write")
        raise UserError(f"OUTDIR {outdir} is not empty (it holds {what}); pass --overwrite to replace what "
                        "m2m synth wrote there before (other files are kept), or choose an empty directory")


def run(config: SynthConfig) -> SynthSummary:
    """Write `config.num_samples` simulated samples of 1LPT and 2LPT displacements (and densities) as .npy.

    Everything is checked first (options, the output directory, memory and
    disk space).  Every file is written atomically and durably
    (`map2map.utils.durable`).  Sample i's random stream is
    ``numpy.random.default_rng(SeedSequence([seed, i]))``, so each sample is
    reproducible on its own and independent of the number of samples.  The
    record of the parameters and files (`params_path(outdir, prefix)`) is
    written first, marked incomplete, and rewritten complete last: so a
    later ``--overwrite`` removes exactly what this run wrote, even if it
    was killed.  If the run fails, what it wrote is removed again.  The
    output directory is written under its writer lock
    (`map2map.utils.locks`); a file this run would write that no earlier
    run's record lists is refused, never replaced.
    """
    t0 = time.perf_counter()
    check_config(config)
    _check_outdir(config, emptiness=False)
    check_resources(config)
    with writer_lock(config.outdir, "m2m synth") as lock:
        _check_outdir(config, emptiness=True)
        summary = _write(config)
    summary.notes[:0] = [lock.note] if lock.note else []
    summary.seconds = time.perf_counter() - t0
    return summary


def _write(config: SynthConfig) -> SynthSummary:
    """`run`'s work, once everything is checked and the output directory locked."""
    t0 = time.perf_counter()
    c = config.cosmology
    outdir = Path(config.outdir)
    nsamples, seed = config.num_samples, config.seed
    boxsize, redshift = float(config.boxsize), float(config.redshift)
    variants = config.variants()
    width = max(3, len(str(nsamples * len(variants) - 1)))
    names = field_names(config.density, config.sr, config.velocity)
    samples = []
    for i in range(nsamples):
        for z, cv in variants:
            sample = {"dir": f"{config.prefix}{len(samples):0{width}d}", "seed_sequence": [seed, i]}
            if config.styled:
                sample.update(redshift=z, omega_m=cv.omega_m, growth_D1=growth_factor(z, cv.omega_m))
            samples.append(sample)
    d1 = growth_factor(redshift, c.omega_m)
    record = {
        "generator": "map2map.synth", "complete": False, "ngrid": config.ngrid, "boxsize": boxsize, "seed": seed,
        "redshift": redshift, "cosmology": dataclasses.asdict(c), "growth_D1": d1,
        "growth_D2": second_order_growth(d1), "sigma8_at_z": c.sigma8 * d1, "units": "Mpc/h, h/Mpc, km/s",
        "fields": {name: {**FIELDS, **VELOCITY_FIELDS, **SR_FIELDS}[name] for name in names}, "samples": samples,
    }
    table = style_table_path(outdir, config.prefix) if config.styled else None
    if config.styled:
        for key in ("redshift", "growth_D1", "growth_D2", "sigma8_at_z"):
            del record[key]  # per sample instead
        record.update(redshifts=[z for z, _ in variants[::len(config.omega_m or (0,))]],
                      omega_m=list(config.omega_m or (c.omega_m,)), style_table=table.name,
                      style_names=list(STYLE_NAMES))
    if config.sr is not None:
        record.update(sr=config.sr, ngrid_hr=config.ngrid * config.sr,
                      shared_modes=f"every |n_i| <= {(config.ngrid - 1) // 2} (integer frequencies of the box)")
    earlier = _read_record(params_path(outdir, config.prefix)) if config.overwrite else None
    ours = (set(_written_by(earlier)) | {params_path("", config.prefix)}) if earlier is not None else set()
    if os.path.lexists(params_path(outdir, config.prefix)) and not ours:
        raise UserError(f"OUTDIR {outdir} already holds {params_path('', config.prefix)}, which is no record of "
                        "m2m synth; move it away or choose another directory")
    if table is not None and os.path.lexists(table) and (earlier is None or earlier.get("style_table") != table.name):
        raise UserError(f"OUTDIR {outdir} already holds {table.name}, which no earlier m2m synth there wrote; "
                        "move it away or choose another directory")
    for rel in _written_by(record):
        for part in (rel.parent, rel):
            if os.path.lexists(outdir / part) and part not in ours and (part == rel or not (outdir / part).is_dir()):
                raise UserError(f"OUTDIR {outdir} already holds {part}, which no earlier m2m synth there wrote "
                                "(no synth.json lists it); move it away or choose another directory")
    if earlier is not None:
        remove_earlier(outdir, config.prefix)
    created = not outdir.exists()
    outdir.mkdir(parents=True, exist_ok=True)
    params = params_path(outdir, config.prefix)
    paths: dict[str, list[str]] = {}
    try:
        atomic_write(params, json.dumps(record, indent=2) + "\n")
        for sample, (z, cv) in zip(samples, variants * nsamples):
            rng = np.random.default_rng(np.random.SeedSequence(sample["seed_sequence"]))
            sample_dir = outdir / sample["dir"]
            sample_dir.mkdir(exist_ok=True)
            if config.sr is None:
                arrays = sample_fields(rng, config.ngrid, boxsize, z, cv, config.density, config.velocity)
            else:
                arrays = sr_sample_fields(rng, config.ngrid, config.sr, boxsize, redshift, c, config.density)
            for name, array in arrays.items():
                path = atomic_write(sample_dir / f"{name}.npy", lambda f, a=array: np.save(f, a))
                paths.setdefault(name, []).append(str(path))
        if table is not None:
            rows = [",".join(STYLE_NAMES)] + [f"{s['omega_m']!r},{s['growth_D1']!r}" for s in samples]
            atomic_write(table, "\n".join(rows) + "\n")
        atomic_write(params, json.dumps(dict(record, complete=True), indent=2) + "\n")
    except BaseException:
        remove_earlier(outdir, config.prefix)
        if created and not any(outdir.iterdir()):
            outdir.rmdir()
        raise
    return SynthSummary(str(outdir), paths, str(params), time.perf_counter() - t0,
                        style_table=str(table) if table is not None else None)
