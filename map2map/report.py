"""How good is a prediction? Spectra, T(k) and r(k) against the truth, next to a trivial baseline.

Used by `m2m demo` on the held-out box; works on any pair of stores with
the same grid.  k is in h/Mpc, P in (Mpc/h)^3; vector fields sum their
component spectra (see `map2map.analysis`).
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

    def mean_r(self, name: str) -> float:
        """Mode-weighted mean r(k) over the bins with k <= k_max."""
        sel = self.k <= self.k_max
        return float(np.average(self.correlation[name][sel], weights=self.nmodes[sel]))


def compare(true: np.ndarray, candidates: dict[str, np.ndarray], boxsize: float) -> Comparison:
    """P(k), T(k) = sqrt(P/P_true) and r(k) of every candidate against `true`, up to half Nyquist.

    Fields are (C, *spatial) arrays on a cubic grid of side `boxsize` [Mpc/h].
    """
    n = true.shape[-1]
    nbins = n // 2
    ref = analysis.power_spectrum(true, boxsize, nbins=nbins)
    k_nyq = np.pi * n / boxsize
    power, transfer, corr = {}, {}, {}
    for name, field in candidates.items():
        power[name] = analysis.power_spectrum(field, boxsize, nbins=nbins).value
        transfer[name] = analysis.transfer(field, true, boxsize, nbins=nbins).value
        corr[name] = analysis.correlation(field, true, boxsize, nbins=nbins).value
    return Comparison(ref.k, ref.nmodes, ref.value, power, transfer, corr, k_max=k_nyq / 2)


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
    """Whether `model` beats `baseline` on mean r(k) up to half Nyquist, said plainly."""
    rm, rb = cmp.mean_r(model), cmp.mean_r(baseline)
    beat = rm > rb
    text = (f"mean r(k) for k <= {cmp.k_max:.3f} h/Mpc (half Nyquist): {model} {rm:.5f}, {baseline} {rb:.5f} "
            f"(1 - r: {1 - rm:.2e} vs {1 - rb:.2e}); the model "
            + ("BEATS the trivial baseline" if beat else "does NOT beat the trivial baseline"))
    return beat, text


def markdown(cmp: Comparison, verdict_text: str, figure_paths: list[Path], meta: dict[str, Any]) -> str:
    lines = ["# map2map demo report", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", verdict_text, "", table(cmp), ""]
    lines += [f"![{p.stem}]({p.name})" for p in figure_paths]
    return "\n".join(lines) + "\n"
