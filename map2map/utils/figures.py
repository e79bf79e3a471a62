"""What training shows in TensorBoard each epoch: slices of the fields and power spectra.

Slices are colour-mapped straight into RGB arrays (no figure layout to
compute, so logging them costs milliseconds): the middle slice along the last
spatial axis of one item's input, output, target, and output - target.
Output and target share one colour scale, the input has its own, and the
difference a symmetric diverging one.  The power spectrum is a matplotlib
`Figure` (no pyplot state) for `SummaryWriter.add_figure`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from map2map.models import power
from map2map.plot import take_slice


def colorize(im: np.ndarray, vmin: float, vmax: float, cmap: str = "viridis", min_size: int = 128) -> np.ndarray:
    """An (H, W, 3) uint8 image of the 2D array `im` (axis 0 rightwards, axis 1 upwards), upscaled by
    whole pixels to at least `min_size` on its longer side."""
    scale = (vmax - vmin) or 1.0
    rgb = colormaps[cmap](np.clip((im - vmin) / scale, 0.0, 1.0), bytes=True)[..., :3]
    rgb = np.ascontiguousarray(np.swapaxes(rgb, 0, 1)[::-1])
    rep = max(1, math.ceil(min_size / max(rgb.shape[:2])))
    return np.repeat(np.repeat(rgb, rep, axis=0), rep, axis=1)


def slice_images(input: torch.Tensor, output: torch.Tensor, target: torch.Tensor,
                 channel: int = 0) -> dict[str, np.ndarray]:
    """{"input", "output", "target", "difference"} -> (H, W, 3) uint8 images of one item's middle slices.

    Tensors are (C, *spatial) with 2 or 3 spatial axes; component `channel`
    (clipped to each tensor's channels) is shown.
    """
    def cut(x: torch.Tensor) -> np.ndarray:
        return take_slice(x.detach().float().cpu(), channel=min(channel, x.shape[0] - 1))

    x, y, t = cut(input), cut(output), cut(target)
    d = y - t if y.shape == t.shape else np.zeros_like(y)
    lo, hi = min(y.min(), t.min()), max(y.max(), t.max())
    vmax = float(np.abs(d).max())
    return {"input": colorize(x, float(x.min()), float(x.max())), "output": colorize(y, lo, hi),
            "target": colorize(t, lo, hi), "difference": colorize(d, -vmax, vmax, cmap="RdBu_r")}


def spectra_figure(output: torch.Tensor, target: torch.Tensor, boxsize: float | None = None) -> Figure | None:
    """P(k) of output and target (N, C, *spatial), channels summed; None for non-cubic or tiny crops.

    `boxsize` is the physical side of the crop (k in h/Mpc); without it k is
    in units of the crop's fundamental mode.
    """
    spatial = tuple(output.shape[2:])
    if len(set(spatial)) != 1 or spatial[0] < 4 or tuple(target.shape[2:]) != spatial:
        return None
    fig = Figure(figsize=(4.5, 3.5))
    ax = fig.subplots()
    fig.subplots_adjust(left=0.18, right=0.97, bottom=0.15, top=0.95)  # fixed: constrained layout is slow
    nyquist = spatial[0] // 2 * (1.0 if boxsize is None else 2 * math.pi / boxsize)
    for name, x in (("output", output), ("target", target)):
        k, p, _ = power(x.detach().double().cpu(), boxsize)
        keep = k <= nyquist * (1 + 1e-9)  # shells beyond Nyquist are incomplete
        ax.loglog(k[keep].numpy(), p[keep].numpy(), label=name)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("k [fundamental modes of the crop]" if boxsize is None else r"$k$ [$h\,\mathrm{Mpc}^{-1}$]")
    ax.set_ylabel("P(k)" if boxsize is None else r"$P(k)$ [$(h^{-1}\mathrm{Mpc})^3$]")
    ax.legend()
    return fig
