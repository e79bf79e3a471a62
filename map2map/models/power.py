"""Isotropic power spectrum of a batch of periodic fields, in torch (so it can sit in a loss).

Conventions:

* x is (N, C, *spatial) with equal spatial axes of n voxels; the spectrum is
  summed over channels (so a vector field gives the spectrum of its
  components together, e.g. the displacement power) and averaged over the batch.
* delta_k is the unnormalized DFT (`torch.fft.rfftn`), and
  P(k) = V |delta_k|^2 / N_cells^2, with V = boxsize^ndim, or V = N_cells
  (i.e. P = |delta_k|^2 / N_cells) without a box size.
* Modes are binned by |k| in units of the fundamental mode to the nearest
  integer: shell i holds i - 1/2 <= |k| < i + 1/2.  The zero mode (shell 0)
  and empty shells are left out; shells reach the corner of the grid, so
  shells above n/2 are incomplete.  The returned k is the mean |k| of each
  shell's modes, times 2 pi / boxsize when a box size is given (h/Mpc for a
  box in Mpc/h).
* The real FFT stores half the modes: each stored mode stands for itself and
  its conjugate twin, so it counts twice, except in the last-axis planes
  k = 0 and, for even n, k = n/2 (Nyquist), which hold their own twins and
  count once.  Nmodes counts modes of the full FFT.
* Sums run in the input's precision (use float64 input for exact analysis);
  everything is differentiable in x.
"""

from __future__ import annotations

import math

import torch


def _mode_grid(n: int, ndim: int, dtype: torch.dtype,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """|k| (fundamental units) and the half-space multiplicity of every rfftn mode of an n^ndim grid."""
    freqs = [torch.fft.fftfreq(n, 1 / n, dtype=dtype, device=device)] * (ndim - 1)
    last = torch.fft.rfftfreq(n, 1 / n, dtype=dtype, device=device)
    grids = torch.meshgrid(*freqs, last, indexing="ij")
    kmag = torch.stack(grids).square().sum(dim=0).sqrt()
    self_twin = (last == 0) | ((n % 2 == 0) & (last == n // 2))
    weight = (2 - self_twin.to(dtype)).expand_as(kmag)
    return kmag, weight


def power(x: torch.Tensor, boxsize: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (k, P, Nmodes) of the fields `x`, one entry per non-empty |k| shell (see the module doc)."""
    spatial = tuple(x.shape[2:])
    if not spatial or len(set(spatial)) != 1:
        raise ValueError(f"power needs equal spatial axes, got shape {tuple(x.shape)}")
    n, ndim = spatial[0], len(spatial)
    xk = torch.fft.rfftn(x, dim=tuple(range(2, x.dim())))
    pk = xk.abs().square().sum(dim=1).mean(dim=0)
    kmag, weight = _mode_grid(n, ndim, pk.dtype, x.device)
    shell = (kmag + 0.5).floor().long().flatten()
    zeros = torch.zeros(int(shell.max()) + 1, dtype=pk.dtype, device=x.device)
    weight = weight.flatten()
    nmodes = zeros.index_add(0, shell, weight)
    keep = nmodes > 0
    keep[0] = False
    nmodes = nmodes[keep]
    k = zeros.index_add(0, shell, weight * kmag.flatten())[keep] / nmodes
    p = zeros.index_add(0, shell, weight * pk.flatten())[keep] / nmodes
    cells = n ** ndim
    volume = cells if boxsize is None else boxsize ** ndim
    if boxsize is not None:
        k = k * (2 * math.pi / boxsize)
    return k, p * (volume / cells ** 2), nmodes.round().long()
