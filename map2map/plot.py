"""Matplotlib figures of field slices and spectra, drawn off screen.

Figures are built with `matplotlib.figure.Figure` directly (no pyplot, no
global state), so they work in threads, in training loops (TensorBoard's
``add_figure``) and in notebooks alike; save them with ``fig.savefig``
(Agg).  Inputs are numpy arrays, torch tensors or xarray DataArrays.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from map2map.errors import UserError

__all__ = ["take_slice", "plot_slices", "plot_spectra", "plot_transfer_correlation"]


def _numpy(x: Any) -> np.ndarray:
    """A float numpy array from a numpy array, torch tensor or DataArray."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(getattr(x, "values", x), dtype=float)


def take_slice(field: Any, axis: int = -1, index: int | None = None, channel: int = 0) -> np.ndarray:
    """A 2D image from a field shaped (*spatial) or (C, *spatial) with 2 or 3 spatial axes.

    3D fields are cut at `index` (default: the middle) along spatial `axis`;
    vector fields show component `channel`.  A 3-axis array is read as a 3D
    scalar field; pass one component of a 2D vector field.
    """
    arr = _numpy(field)
    if arr.ndim == 4:
        arr = arr[channel]
    if arr.ndim == 3:
        n = arr.shape[axis]
        arr = np.take(arr, n // 2 if index is None else index, axis=axis)
    if arr.ndim != 2:
        raise UserError(f"field of shape {np.shape(field)}: expected 2 or 3 spatial axes, optionally channel first")
    return arr


def plot_slices(fields: Mapping[str, Any], axis: int = -1, index: int | None = None, *, channel: int = 0,
                residual: tuple[str, str] | None = None, cmap: str = "viridis",
                panel_size: float = 3.0) -> Figure:
    """A row of slices, one per field, on one shared colour scale, plus an optional residual panel.

    All `fields` are taken to be the same quantity (e.g. input, prediction,
    target), hence one colour scale.  ``residual=(a, b)`` adds a panel of
    ``fields[a] - fields[b]`` on its own symmetric diverging scale.
    """
    if not fields:
        raise UserError("plot_slices needs at least one field")
    images = {name: take_slice(f, axis, index, channel) for name, f in fields.items()}
    if residual is not None:
        a, b = residual
        if a not in images or b not in images:
            raise UserError(f"residual={residual!r}: expected two of {list(images)}")
        images[f"{a} - {b}"] = images[a] - images[b]
    fig = Figure(figsize=(panel_size * len(images), panel_size * 1.1), layout="constrained")
    axes = fig.subplots(1, len(images), squeeze=False)[0]
    shared = [im for name, im in images.items() if name in fields]
    norm = Normalize(min(im.min() for im in shared), max(im.max() for im in shared))
    for ax, (name, im) in zip(axes, images.items()):
        if name in fields:
            mappable = ax.imshow(im.T, origin="lower", norm=norm, cmap=cmap)
        else:
            vmax = np.abs(im).max() or 1.0
            mappable = ax.imshow(im.T, origin="lower", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
            fig.colorbar(mappable, ax=ax, shrink=0.8)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(axes[0].images[0], ax=list(axes[:len(fields)]), shrink=0.8)
    return fig


def _curve(ax, k: np.ndarray, values: Any, label: str) -> None:
    """Plot one curve, or for (sample, k) values the mean with a +-1 std band."""
    v = _numpy(values)
    if v.ndim == 2:
        mean, std = np.nanmean(v, axis=0), np.nanstd(v, axis=0)
        (line,) = ax.plot(k, mean, label=label)
        ax.fill_between(k, mean - std, mean + std, color=line.get_color(), alpha=0.25, lw=0)
    else:
        ax.plot(k, v, label=label)


def plot_spectra(k: Any, curves: Mapping[str, Any], *, ylabel: str = r"$P(k)$ [$(h^{-1}\mathrm{Mpc})^3$]",
                 loglog: bool = True, figsize: Sequence[float] = (5.0, 4.0)) -> Figure:
    """Power spectra against k [h/Mpc], one curve per entry (values (k,) or (sample, k))."""
    k = _numpy(k)
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.subplots()
    for label, values in curves.items():
        _curve(ax, k, values, label)
    if loglog:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel(r"$k$ [$h\,\mathrm{Mpc}^{-1}$]")
    ax.set_ylabel(ylabel)
    ax.legend()
    return fig


def plot_transfer_correlation(k: Any, transfer: Mapping[str, Any], correlation: Mapping[str, Any], *,
                              stochasticity: bool = False,
                              figsize: Sequence[float] = (5.0, 6.0)) -> Figure:
    """Two stacked panels against k [h/Mpc]: T(k) (ideal 1) and r(k) (ideal 1).

    With ``stochasticity=True`` the lower panel shows 1 - r^2 on a log axis,
    which resolves r close to 1.
    """
    k = _numpy(k)
    fig = Figure(figsize=figsize, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    for label, t in transfer.items():
        _curve(top, k, t, label)
    for label, r in correlation.items():
        _curve(bottom, k, 1 - _numpy(r) ** 2 if stochasticity else r, label)
    top.axhline(1, color="k", lw=0.5)
    top.set_ylabel(r"$T(k)=\sqrt{P_\mathrm{pred}/P_\mathrm{true}}$")
    if stochasticity:
        bottom.set_yscale("log")
        bottom.set_ylabel(r"$1-r(k)^2$")
    else:
        bottom.axhline(1, color="k", lw=0.5)
        bottom.set_ylabel(r"$r(k)=P_{ab}/\sqrt{P_{aa}P_{bb}}$")
    bottom.set_xscale("log")
    bottom.set_xlabel(r"$k$ [$h\,\mathrm{Mpc}^{-1}$]")
    for ax in (top, bottom):
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return fig
