"""Power spectra, cross-correlation and transfer functions of gridded fields.

Pure numerics on numpy arrays; torch tensors and xarray DataArrays (eager or
Dask-backed) are converted at the edge.

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

import functools
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from map2map.errors import UserError

__all__ = [
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
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        t = x.detach().cpu()
        if t.is_complex():
            raise UserError(f"expected a real field, got a complex tensor of dtype {t.dtype}")
        x = t.double().numpy()
    arr = np.asarray(x)
    if np.iscomplexobj(arr):
        raise UserError(f"expected a real field, got dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False)


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

@functools.lru_cache(maxsize=8)
def _shells(shape: tuple[int, ...], boxsize: float, nbins: int | None):
    """Bin index, half-space weight and |k| of every rfftn mode, and the bin count.

    Returns ``(index, weight, kmag, nbins)`` with arrays of the rfftn output
    shape; index 0 marks modes outside bins 1..nbins (it is discarded).
    """
    kf = fundamental_mode(boxsize)
    freqs = [np.fft.fftfreq(n, 1 / n) for n in shape[:-1]] + [np.fft.rfftfreq(shape[-1], 1 / shape[-1])]
    grids = np.meshgrid(*[f.astype(np.int64) for f in freqs], indexing="ij", sparse=True)
    n2 = sum(g * g for g in grids)
    nmag = np.sqrt(n2)
    if nbins is None:
        nbins = int(np.rint(np.sqrt(sum((n // 2) ** 2 for n in shape))))
    index = np.floor(nmag + 0.5).astype(np.int64)
    index[(index > nbins)] = 0
    weight = np.full(shape[-1] // 2 + 1, 2.0)
    weight[0] = 1.0
    if shape[-1] % 2 == 0:
        weight[-1] = 1.0
    weight = np.broadcast_to(weight, index.shape)
    return index, weight, nmag * kf, nbins


def _bin(values: np.ndarray, index: np.ndarray, weight: np.ndarray, nbins: int) -> np.ndarray:
    """Weighted sums of `values` (rfftn-shaped) per bin 1..nbins."""
    sums = np.bincount(index.ravel(), weights=(weight * values).ravel(), minlength=nbins + 1)
    return sums[1:nbins + 1]


def _spectra(a: np.ndarray, b: np.ndarray | None, boxsize: float, nbins: int | None,
             ndim: int | None) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Bin k, nmodes and the binned spectra [P_aa] or [P_aa, P_bb, P_ab] of two fields.

    Each component is transformed once; memory is one component's transform.
    """
    a = _channels(_to_numpy(a), ndim)
    if b is not None:
        b = _channels(_to_numpy(b), a.ndim - 1)
        if b.shape != a.shape:
            raise UserError(f"fields of shapes {a.shape} and {b.shape}: expected the same shape")
    spatial = a.shape[1:]
    axes = tuple(range(-len(spatial), 0))
    index, weight, kmag, nbins = _shells(spatial, boxsize, nbins)
    ncells = float(np.prod(spatial))
    norm = boxsize ** len(spatial) / ncells ** 2
    sums = [np.zeros(nbins) for _ in range(1 if b is None else 3)]
    for c in range(a.shape[0]):
        ak = np.fft.rfftn(a[c], axes=axes)
        sums[0] += _bin(ak.real ** 2 + ak.imag ** 2, index, weight, nbins)
        if b is not None:
            bk = np.fft.rfftn(b[c], axes=axes)
            sums[1] += _bin(bk.real ** 2 + bk.imag ** 2, index, weight, nbins)
            sums[2] += _bin(ak.real * bk.real + ak.imag * bk.imag, index, weight, nbins)
    nmodes = _bin(np.ones(index.shape), index, weight, nbins)
    with np.errstate(invalid="ignore", divide="ignore"):
        k = _bin(np.broadcast_to(kmag, index.shape), index, weight, nbins) / nmodes
        spectra = [s * norm / nmodes for s in sums]
    return k, nmodes.astype(np.int64), spectra


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
