"""How good is a prediction? Spectra, T(k) and r(k) against the truth, next to a trivial baseline.

Used by `m2m demo` on the held-out box; the candidates and the truth share
one grid (a coarser field is brought onto the truth's grid first, e.g. by
`interpolate`).  k is in h/Mpc, P in (Mpc/h)^3; vector fields sum their
component spectra (see `map2map.analysis`).  The *band* of a comparison is
the range of k its means and verdict are taken over: ``k <= k_max``, or
``k_min < k <= k_max`` when `k_min` is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from map2map import analysis


@dataclass
class Comparison:
    """Spectral comparison of candidate fields with a true field, on shared k bins."""

    k: np.ndarray
    nmodes: np.ndarray
    p_true: np.ndarray
    power: dict[str, np.ndarray]
    transfer: dict[str, np.ndarray]
    correlation: dict[str, np.ndarray]
    k_max: float
    k_min: float | None = None
    band: str = "half Nyquist"

    def _band(self) -> np.ndarray:
        sel = self.k <= self.k_max
        return sel if self.k_min is None else sel & (self.k > self.k_min)

    def mean_r(self, name: str) -> float:
        """Mode-weighted mean r(k) over the bins of the band."""
        sel = self._band()
        return float(np.average(self.correlation[name][sel], weights=self.nmodes[sel]))

    def mean_t(self, name: str) -> float:
        """Mode-weighted mean T(k) over the bins of the band."""
        sel = self._band()
        return float(np.average(self.transfer[name][sel], weights=self.nmodes[sel]))

    def band_text(self) -> str:
        """The band in words, e.g. ``k <= 0.393 h/Mpc (half Nyquist)``."""
        lo = "" if self.k_min is None else f"{self.k_min:.3f} < "
        return f"{lo}k <= {self.k_max:.3f} h/Mpc ({self.band})"


def nyquist(n: int, boxsize: float) -> float:
    """The Nyquist wave number [h/Mpc] of a grid of `n` cells per side `boxsize` [Mpc/h]."""
    return float(np.pi * n / boxsize)


def compare(true: np.ndarray, candidates: dict[str, np.ndarray], boxsize: float, *, k_min: float | None = None,
            k_max: float | None = None, band: str = "half Nyquist") -> Comparison:
    """P(k), T(k) = sqrt(P/P_true) and r(k) of every candidate against `true`, in bins up to the grid's Nyquist.

    Fields are (C, *spatial) arrays on a cubic grid of side `boxsize` [Mpc/h],
    all on `true`'s grid.  The band (`Comparison`) runs to `k_max`, by
    default half the Nyquist wave number, and is named `band`.
    """
    n = true.shape[-1]
    nbins = n // 2
    ref = analysis.power_spectrum(true, boxsize, nbins=nbins)
    k_nyq = nyquist(n, boxsize)
    power, transfer, corr = {}, {}, {}
    for name, field in candidates.items():
        power[name] = analysis.power_spectrum(field, boxsize, nbins=nbins).value
        transfer[name] = analysis.transfer(field, true, boxsize, nbins=nbins).value
        corr[name] = analysis.correlation(field, true, boxsize, nbins=nbins).value
    return Comparison(ref.k, ref.nmodes, ref.value, power, transfer, corr, k_max=k_nyq / 2 if k_max is None else k_max,
                      k_min=k_min, band=band)


def interpolate(field: np.ndarray, factor: int) -> np.ndarray:
    """A periodic (C, *spatial) field of cell-centred samples, linearly interpolated onto the grid `factor`
    times finer per axis (bilinear in 2D, trilinear in 3D): a fine cell's value is the linear interpolation
    of the coarse cells' values at its centre, wrapping around the box's faces."""
    import torch
    import torch.nn.functional as F

    ndim = field.ndim - 1
    x = torch.from_numpy(np.ascontiguousarray(field))[None]
    x = F.pad(x, (1, 1) * ndim, mode="circular")  # one coarse cell of each neighbour, for the edge cells
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[ndim]
    y = F.interpolate(x, scale_factor=factor, mode=mode, align_corners=False)[0]
    # padded coarse index p sits at coarse index p - 1, so fine index j of the padded result is fine j - factor
    return y[(slice(None),) + (slice(factor, -factor),) * ndim].numpy()


def table(cmp: Comparison, every: int = 1) -> str:
    """A markdown table of T(k) and r(k) per candidate, for bins up to k_max."""
    names = list(cmp.power)
    head = "| k [h/Mpc] | " + " | ".join(f"T {n} | r {n}" for n in names) + " |"
    rule = "|" + "---|" * (1 + 2 * len(names))
    rows = [head, rule]
    for i in range(0, len(cmp.k), every):
        if cmp.k[i] > cmp.k_max:
            break
        cells = " | ".join(f"{cmp.transfer[n][i]:.4f} | {cmp.correlation[n][i]:.5f}" for n in names)
        rows.append(f"| {cmp.k[i]:.4f} | {cells} |")
    return "\n".join(rows)


def figures(cmp: Comparison, fields: dict[str, np.ndarray], outdir: Path) -> list[Path]:
    """Spectra, T(k)/r(k) and slice figures as PNG files in `outdir`."""
    from map2map import plot

    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    curves = {"true": cmp.p_true, **cmp.power}
    fig = plot.plot_spectra(cmp.k, curves)
    paths.append(outdir / "spectra.png")
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    fig = plot.plot_transfer_correlation(cmp.k, cmp.transfer, cmp.correlation)
    paths.append(outdir / "transfer_correlation.png")
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    names = list(fields)
    fig = plot.plot_slices(fields, residual=(names[1], names[2]) if len(names) >= 3 else None)
    paths.append(outdir / "slices.png")
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    return paths


def verdict(cmp: Comparison, model: str, baseline: str) -> tuple[bool, str]:
    """Whether `model` beats `baseline` on mean r(k) over the band, said plainly."""
    rm, rb = cmp.mean_r(model), cmp.mean_r(baseline)
    beat = rm > rb
    text = (f"mean r(k) for {cmp.band_text()}: {model} {rm:.5f}, {baseline} {rb:.5f} "
            f"(1 - r: {1 - rm:.2e} vs {1 - rb:.2e}); the model "
            + ("BEATS the trivial baseline" if beat else "does NOT beat the trivial baseline"))
    return beat, text


def markdown(cmp: Comparison, verdict_text: str, figure_paths: list[Path], meta: dict[str, Any],
             title: str = "map2map demo report") -> str:
    lines = [f"# {title}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", verdict_text, "", table(cmp), ""]
    lines += [f"![{p.stem}]({p.name})" for p in figure_paths]
    return "\n".join(lines) + "\n"
