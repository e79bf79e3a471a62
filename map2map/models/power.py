"""Isotropic power spectrum of a batch of periodic fields, in torch: the original toolkit's `power`.

A batch interface to `map2map.analysis.binned_spectra`, the one
implementation of binned spectra (differentiable, so it can sit in a loss):

* x is (N, C, *spatial) with equal spatial axes of n voxels; the spectrum is
  summed over channels (so a vector field gives the spectrum of its
  components together, e.g. the displacement power) and averaged over the batch.
* P(k) = V |delta_k|^2 / N_cells^2 with delta_k the unnormalized DFT, and
  V = boxsize^ndim, or V = N_cells (i.e. P = |delta_k|^2 / N_cells) without
  a box size.
* Shells of |k| in units of the fundamental mode, as in `map2map.analysis`,
  reaching the corner of the grid (shells above n/2 are incomplete); the
  zero mode and empty shells are left out.  The returned k is the mean |k|
  of each shell's modes, times 2 pi / boxsize when a box size is given
  (h/Mpc for a box in Mpc/h); Nmodes counts modes of the full FFT.
* Sums run in the input's precision (use float64 input for exact analysis).
"""

from __future__ import annotations

import math

import torch

from map2map.analysis import binned_spectra


def power(x: torch.Tensor, boxsize: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (k, P, Nmodes) of the fields `x`, one entry per non-empty |k| shell (see the module doc)."""
    spatial = tuple(x.shape[2:])
    if not spatial or len(set(spatial)) != 1:
        raise ValueError(f"power needs equal spatial axes, got shape {tuple(x.shape)}")
    n, ndim = spatial[0], len(spatial)
    k, nmodes, (p,) = binned_spectra(x.reshape((-1,) + spatial))
    keep = nmodes > 0
    volume = n ** ndim if boxsize is None else boxsize ** ndim
    k = k[keep] if boxsize is None else k[keep] * (2 * math.pi / boxsize)
    return k, p[keep] * (volume / x.shape[0]), nmodes[keep].round().long()
