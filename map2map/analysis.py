"""Power spectra, cross-correlation and transfer functions of gridded fields: P(k) written once.

`mode_shells` and `binned_spectra` are the one implementation of binned
spectra, in torch so that a spectrum can also sit in a loss (they are
differentiable; `map2map.models.power` is the original toolkit's batch
interface to them).  The statistics below take numpy arrays, torch tensors
and xarray DataArrays (eager or Dask-backed), converted to float64 at the
edge.

Conventions (all functions):

- A field is shaped ``(*spatial)`` (scalar) or ``(C, *spatial)`` (C components,
  e.g. a displacement with ``C == ndim``), with 2 or 3 spatial axes, on a
  periodic box of side ``boxsize`` [Mpc/h] along every axis.
- Fourier convention: the unnormalised DFT ``d_k = sum_x d(x) exp(-i k.x)`` as
  computed by ``numpy.fft.rfftn``.  The power of a mode is
  ``P(k) = V |d_k|^2 / N_cells^2`` with ``V = boxsize**ndim``, so P is in
  (Mpc/h)^ndim and ``sum_k P(k) / V`` over all modes equals the variance of
  the field (Parseval).  This matches the continuous convention
  ``<d(k) d*(k')> = (2 pi)^ndim delta_D(k - k') P(k)``.
- Vector fields: the spectra of the components are summed,
  ``P = sum_c P_cc`` and ``P_ab = sum_c P_{a_c b_c}``, i.e. the spectrum of the
  vector's dot product; this is what the training losses and the original
  toolkit compare for displacements and velocities.
- Binning: linear shells of width the fundamental mode ``k_f = 2 pi / boxsize``
  centred at integer multiples ``n k_f``; bin ``n`` holds the modes with
  ``(n - 1/2) k_f <= |k| < (n + 1/2) k_f``, for ``n = 1 .. nbins`` (the k = 0
  mean is never included).  The default ``nbins`` reaches the corner of the
  Fourier cube, ``round(|k_max| / k_f)``, so bins beyond the Nyquist
  wavenumber ``k_f N / 2`` are only partly filled; pass ``nbins=N // 2`` to stop
  at Nyquist.  The k of a bin is the mean |k| of its modes [h/Mpc];
  ``nmodes`` counts modes over the full Fourier space (the half space of
  ``rfftn`` is weighted 2 except on its self-conjugate planes).  Empty bins
  have ``nmodes == 0`` and NaN k and P.

Results: for numpy or torch inputs a :class:`Spectrum` ``(k, value, nmodes)``
of numpy arrays; for xarray inputs a DataArray with dims ``(sample, k)`` (or
``(k,)`` without a ``sample`` dim), coordinates ``k`` and ``nmodes``, and
Dask-backed inputs are computed one sample at a time.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch

from map2map.errors import UserError

__all__ = [
    "Shells",
    "mode_shells",
    "binned_spectra",
    "Spectrum",
    "power_spectrum",
    "cross_power",
    "correlation",
    "transfer",
    "fundamental_mode",
]


class Spectrum(NamedTuple):
    """A binned spectrum: bin wavenumber k [h/Mpc], the value per bin, and modes per bin."""

    k: np.ndarray
    value: np.ndarray
    nmodes: np.ndarray


def fundamental_mode(boxsize: float) -> float:
    """The fundamental wavenumber ``k_f = 2 pi / boxsize`` [h/Mpc] for boxsize in Mpc/h."""
    return 2 * np.pi / boxsize


# ---------------------------------------------------------------- input forms

def _is_dataarray(x: Any) -> bool:
    return type(x).__name__ == "DataArray" and hasattr(x, "dims") and hasattr(x, "isel")


def _to_numpy(x: Any) -> np.ndarray:
    """A float64 numpy copy/view of a numpy array or torch tensor (detached, on the CPU)."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.is_complex():
            raise UserError(f"expected a real field, got a complex tensor of dtype {t.dtype}")
        x = t.double().numpy()
    arr = np.asarray(x)
    if np.iscomplexobj(arr):
        raise UserError(f"expected a real field, got dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False)


def _tensor(arr: np.ndarray) -> torch.Tensor:
    """A torch view of `arr` for reading only (a read-only array, e.g. from Dask, is not copied)."""
    if arr.strides and min(arr.strides) < 0:
        arr = np.ascontiguousarray(arr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(arr)


def _channels(arr: np.ndarray, ndim: int | None) -> np.ndarray:
    """View `arr` as ``(C, *spatial)``; `ndim` (2 or 3) defaults to 3 when arr has >= 3 axes."""
    if ndim is None:
        ndim = 3 if arr.ndim >= 3 else 2
    if ndim not in (2, 3):
        raise UserError(f"ndim={ndim!r}: expected 2 or 3 spatial dimensions")
    if arr.ndim == ndim:
        return arr[None]
    if arr.ndim == ndim + 1:
        return arr
    raise UserError(f"field of shape {arr.shape}: expected (*spatial) or (channel, *spatial) "
                    f"with {ndim} spatial axes")


def _check_boxsize(boxsize: Any) -> float:
    try:
        value = float(boxsize)
    except (TypeError, ValueError):
        raise UserError(f"boxsize={boxsize!r}: expected a positive number (Mpc/h)") from None
    if not np.isfinite(value) or value <= 0:
        raise UserError(f"boxsize={boxsize!r}: expected a positive number (Mpc/h)")
    return value


# -------------------------------------------------------------------- binning

class Shells(NamedTuple):
    """The |k| bins of the rfftn modes of a grid (arrays shaped like the rfftn output, or broadcastable).

    `index`: bin of each mode, 1..nbins, 0 for modes outside the bins (the
    k = 0 mode and modes beyond `nbins`); `weight`: how many modes of the full
    Fourier space each stored mode stands for (2, or 1 on the self-conjugate
    planes); `nmag`: |k| in units of the fundamental mode k_f.
    """

    index: torch.Tensor
    weight: torch.Tensor
    nmag: torch.Tensor
    nbins: int


def mode_shells(shape: Sequence[int], nbins: int | None = None, *, dtype: torch.dtype = torch.float64,
                device: torch.device | str | None = None) -> Shells:
    """The `Shells` of the rfftn modes of a grid of `shape` (see the module docstring for the binning).

    Bin i holds the modes with ``i - 1/2 <= |k| / k_f < i + 1/2``; `nbins`
    defaults to the corner of the Fourier cube.  Frequencies are integers,
    so the bin of a mode does not depend on `dtype` (that of `nmag`).
    """
    shape = tuple(int(n) for n in shape)
    ndim = len(shape)
    n2 = torch.zeros((), dtype=torch.int64, device=device)
    for axis, n in enumerate(shape):
        freq = torch.arange(n // 2 + 1 if axis == ndim - 1 else n, device=device)
        freq = torch.where(freq > n // 2, freq - n, freq)
        n2 = n2 + (freq ** 2).reshape((-1,) + (1,) * (ndim - 1 - axis))
    nmag64 = n2.to(torch.float64).sqrt()
    if nbins is None:
        nbins = round(math.sqrt(sum((n // 2) ** 2 for n in shape)))
    index = torch.floor(nmag64 + 0.5).to(torch.int64)
    index = torch.where(index > nbins, torch.zeros_like(index), index)
    last = shape[-1]
    weight = torch.full((last // 2 + 1,), 2.0, dtype=dtype, device=device)
    weight[0] = 1.0
    if last % 2 == 0:
        weight[-1] = 1.0
    return Shells(index, weight, nmag64.to(dtype), int(nbins))


def _bin(values: torch.Tensor, shells: Shells) -> torch.Tensor:
    """Mode-weighted sums of `values` (rfftn-shaped) per bin 1..nbins (differentiable in `values`)."""
    index = shells.index.expand(values.shape).reshape(-1)
    sums = torch.zeros(shells.nbins + 1, dtype=values.dtype, device=values.device)
    return sums.index_add(0, index, (shells.weight * values).reshape(-1))[1:]


def binned_spectra(a: torch.Tensor, b: torch.Tensor | None = None, *,
                   nbins: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Binned auto (and cross) spectra of the components of `a` (and `b`), in box units.

    `a` and `b` are real tensors shaped ``(M, *spatial)``: M components on
    one periodic grid, whose spectra are summed.  Returns ``(k, nmodes,
    spectra)`` per bin 1..nbins: k is the mean |k| of the bin's modes in
    units of the fundamental mode k_f; nmodes counts modes of the full
    Fourier space; spectra is ``[P_aa]``, or ``[P_aa, P_bb, P_ab]`` with `b`,
    each in units of the box volume V (multiply by V for P, e.g. in
    (Mpc/h)^ndim; ``P_ab = V Re(a_k b_k^*) / N_cells^2``).  Empty bins have
    nmodes 0 and NaN k and spectra.  One component is transformed at a time;
    sums run in the input's precision and are differentiable in a and b.
    """
    spatial = tuple(a.shape[1:])
    shells = mode_shells(spatial, nbins, dtype=a.dtype, device=a.device)
    cells = math.prod(spatial)
    sums: list[torch.Tensor | float] = [0.0] * (1 if b is None else 3)
    for c in range(a.shape[0]):
        ak = torch.fft.rfftn(a[c])
        sums[0] = sums[0] + _bin(ak.real ** 2 + ak.imag ** 2, shells)
        if b is not None:
            bk = torch.fft.rfftn(b[c])
            sums[1] = sums[1] + _bin(bk.real ** 2 + bk.imag ** 2, shells)
            sums[2] = sums[2] + _bin(ak.real * bk.real + ak.imag * bk.imag, shells)
    nmodes = _bin(torch.ones_like(shells.nmag), shells)
    k = _bin(shells.nmag, shells) / nmodes
    return k, nmodes, [s / nmodes / cells ** 2 for s in sums]


def _spectra(a: np.ndarray, b: np.ndarray | None, boxsize: float, nbins: int | None,
             ndim: int | None) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Bin k [h/Mpc], nmodes and the binned spectra [P_aa] or [P_aa, P_bb, P_ab] [(Mpc/h)^ndim] of two fields."""
    a = _channels(_to_numpy(a), ndim)
    if b is not None:
        b = _channels(_to_numpy(b), a.ndim - 1)
        if b.shape != a.shape:
            raise UserError(f"fields of shapes {a.shape} and {b.shape}: expected the same shape")
    volume = boxsize ** (a.ndim - 1)
    with torch.no_grad():
        k, nmodes, spectra = binned_spectra(_tensor(a), None if b is None else _tensor(b), nbins=nbins)
    return (k.numpy() * fundamental_mode(boxsize), nmodes.numpy().astype(np.int64),
            [s.numpy() * volume for s in spectra])


# ---------------------------------------------------------------- statistics

def _ratio_sqrt(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sqrt(num / den)


def _corr(p: list[np.ndarray]) -> np.ndarray:
    paa, pbb, pab = p
    with np.errstate(invalid="ignore", divide="ignore"):
        return pab / np.sqrt(paa * pbb)


_STATS: dict[str, tuple[bool, Callable[[list[np.ndarray]], np.ndarray], str]] = {
    # name: (needs two fields, value from [P_aa(, P_bb, P_ab)], units)
    "power": (False, lambda p: p[0], "(Mpc/h)^ndim"),
    "cross_power": (True, lambda p: p[2], "(Mpc/h)^ndim"),
    "correlation": (True, _corr, "1"),
    "transfer": (True, lambda p: _ratio_sqrt(p[0], p[1]), "1"),
}


def _statistic(name: str, a: Any, b: Any, boxsize: Any, nbins: int | None, ndim: int | None):
    if _is_dataarray(a) or _is_dataarray(b):
        return _statistic_xarray(name, a, b, boxsize, nbins)
    if boxsize is None:
        raise UserError("boxsize is required for arrays and tensors (Mpc/h)")
    k, nmodes, p = _spectra(a, b, _check_boxsize(boxsize), nbins, ndim)
    return Spectrum(k, _STATS[name][1](p), nmodes)


def power_spectrum(field: Any, boxsize: float | None = None, *, nbins: int | None = None,
                   ndim: int | None = None):
    """Power spectrum P(k) [(Mpc/h)^ndim] of a field on a periodic box of side `boxsize` [Mpc/h].

    `field` is a numpy array, torch tensor or xarray DataArray shaped
    ``(*spatial)`` or ``(C, *spatial)`` (see the module docstring for the
    normalisation, binning and vector-field conventions).  `ndim` resolves
    a 3-axis array as a 2D vector field (``ndim=2``); by default arrays with
    3 or more axes are 3D.  Returns ``Spectrum(k, P, nmodes)`` or, for a
    DataArray, a DataArray over ``(sample, k)``.
    """
    return _statistic("power", field, None, boxsize, nbins, ndim)


def cross_power(a: Any, b: Any, boxsize: float | None = None, *, nbins: int | None = None,
                ndim: int | None = None):
    """Cross power P_ab(k) = V Re(a_k b_k^*) / N_cells^2 [(Mpc/h)^ndim], symmetric in a and b."""
    return _statistic("cross_power", a, b, boxsize, nbins, ndim)


def correlation(a: Any, b: Any, boxsize: float | None = None, *, nbins: int | None = None,
                ndim: int | None = None):
    """Cross-correlation coefficient r(k) = P_ab / sqrt(P_aa P_bb), in [-1, 1].

    1 - r^2 is the fraction of b's power per bin not explained by a linear
    (per-bin) response to a, the stochasticity of an emulator's prediction.
    """
    return _statistic("correlation", a, b, boxsize, nbins, ndim)


def transfer(pred: Any, true: Any, boxsize: float | None = None, *, nbins: int | None = None,
             ndim: int | None = None):
    """Transfer function T(k) = sqrt(P_pred / P_true): the amplitude ratio per bin (1 is perfect)."""
    return _statistic("transfer", pred, true, boxsize, nbins, ndim)


# -------------------------------------------------------------------- xarray

def _layout(da) -> tuple[str | None, list[str], list[str]]:
    """Split a DataArray's dims into (sample dim or None, channel dims, spatial dims).

    Channel dims are named ``channel`` or ``channel_*``; everything else
    besides ``sample`` is spatial.
    """
    sample = "sample" if "sample" in da.dims else None
    channel = [d for d in da.dims if d == "channel" or str(d).startswith("channel_")]
    spatial = [d for d in da.dims if d != sample and d not in channel]
    if len(channel) > 1 or len(spatial) not in (2, 3):
        raise UserError(f"DataArray dims {da.dims}: expected (sample?, channel?, 2 or 3 spatial dims)")
    return sample, channel, spatial


def _boxsize_of(da, spatial: Sequence[str]) -> float | None:
    """Box size from a ``boxsize``/``box_size`` attr, else from evenly spaced spatial coords.

    Cell-centre coordinates in box units (as `map2map.store` writes when the
    box size is known) give ``L = N * spacing``; coordinates whose ``units``
    attr says "box fraction" do not count.
    """
    for key in ("boxsize", "box_size"):
        if key in da.attrs:
            value = np.atleast_1d(np.asarray(da.attrs[key], dtype=float))
            if np.ptp(value) != 0:
                raise UserError(f"attr {key}={da.attrs[key]!r}: expected a cubic box")
            return float(value[0])
    sizes = []
    for d in spatial:
        if d not in da.coords or da.sizes[d] < 2 or "fraction" in str(da.coords[d].attrs.get("units", "")):
            return None  # no coordinate, or one in box fractions (a store written without a box size)
        c = np.asarray(da.coords[d].values, dtype=float)
        sizes.append(da.sizes[d] * (c[1] - c[0]))
    if not np.allclose(sizes, sizes[0], rtol=1e-6):
        raise UserError(f"box sizes from coordinates {sizes}: expected a cubic box")
    return float(sizes[0])


def _numpy_sample(da, sample: str | None, i: int, channel: list[str], spatial: list[str]) -> np.ndarray:
    """One sample as ``(C, *spatial)`` numpy, computing only that sample if Dask-backed."""
    one = da.isel({sample: i}) if sample is not None else da
    one = one.transpose(*channel, *spatial)
    values = np.asarray(one.compute().values)
    return values if channel else values[None]


def _statistic_xarray(name: str, a: Any, b: Any, boxsize: Any, nbins: int | None):
    import xarray as xr

    two = _STATS[name][0]
    if not _is_dataarray(a) or (two and not _is_dataarray(b)):
        raise UserError("expected xarray DataArrays for both fields (or arrays for both)")
    sample, channel, spatial = _layout(a)
    if two and (_layout(b) != (sample, channel, spatial) or b.shape != a.shape):
        raise UserError(f"DataArrays of dims {a.dims} {a.shape} and {b.dims} {b.shape}: expected the same")
    if boxsize is None:
        boxsize = _boxsize_of(a, spatial)
        if boxsize is None:
            raise UserError("no boxsize given and none in the DataArray's attrs (boxsize) or coords")
    boxsize = _check_boxsize(boxsize)
    nsamples = a.sizes[sample] if sample is not None else 1
    values, k, nmodes = [], None, None
    for i in range(nsamples):
        fa = _numpy_sample(a, sample, i, channel, spatial)
        fb = _numpy_sample(b, sample, i, channel, spatial) if two else None
        k, nmodes, p = _spectra(fa, fb, boxsize, nbins, len(spatial))
        values.append(_STATS[name][1](p))
    dims = ("sample", "k") if sample is not None else ("k",)
    data = np.stack(values) if sample is not None else values[0]
    coords = {"k": ("k", k, {"units": "h/Mpc"}), "nmodes": ("k", nmodes)}
    if sample is not None:  # keep per-sample coords, e.g. the source file of each sample
        coords.update({n: (sample, c.values) for n, c in a.coords.items() if c.dims == (sample,)})
    units = _STATS[name][2].replace("ndim", str(len(spatial)))
    return xr.DataArray(data, dims=dims, coords=coords, name=name,
                        attrs={"units": units, "boxsize": boxsize})
