"""The derivative of a styled model's output with respect to one physical style parameter, by forward mode.

An emulator of displacements conditioned on the linear growth factor D
gives psi(D); its velocity needs dpsi/dD (`map2map.cosmology.peculiar_velocity`
turns that into km/s: v = a H(z) f(z) D dpsi/dD).  Terms:

* *style tangent*: the model sees its styles through a style norm
  (`map2map.data.styles.StyleNorm`), s = (D - shift) / scale, so a unit
  change of the physical D moves the D column of the style by 1 / scale
  (`style_tangent`).
* *input tangent*: how the input changes with D.  When the input is the
  linear (Zel'dovich) displacement at the same D, as for an emulator that
  maps ZA at D to the displacement at D, the input is proportional to D
  (also after a norm that is a constant factor), so its tangent is x / D
  (`linear_input_tangent`).  When the input does not depend on D (e.g. the
  linear field at a fixed time) there is none.  Leaving out the input
  tangent of an input that does scale with D gives only the partial
  derivative through the style, not the velocity.

`output_and_derivative` computes the output and the derivative along both
tangents in one forward-mode pass (`torch.func.jvp`), about the cost of two
forward passes, exact up to rounding (no finite difference step).
`displacement_and_derivative` is that for physical styles and a named D
parameter; `velocity_factors` gives each sample's a H f D, which turns the
derivative (once its target norm is undone, in Mpc/h) into km/s.

Call it on a model in eval mode: in training mode batch normalization would
use the batch's statistics, and the derivative would be that of the batch
statistics too.  The derivative is of the model's output as it comes out,
i.e. in the normalised units of its target; undoing a target norm that does
not depend on D (a constant factor) scales the derivative the same way.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from map2map.errors import UserError

from .build import forward, style_size_of


def style_tangent(style: torch.Tensor, index: int, norm=None) -> torch.Tensor:
    """The tangent of the normalised `style` (N, style_size) along physical parameter `index`: zeros with
    1 / scale (1 without a `norm`) in column `index`."""
    tangent = torch.zeros_like(style)
    tangent[:, index] = 1.0 if norm is None else 1.0 / norm.scale[index]
    return tangent


def linear_input_tangent(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The tangent x / D of an input `x` (N, C, *spatial) proportional to the physical growth factor `d`
    (one per sample, shape (N,)); see the module docstring."""
    d = torch.as_tensor(d, dtype=x.dtype, device=x.device).reshape(-1, *(1,) * (x.dim() - 1))
    if d.shape[0] != x.shape[0] or not bool((d > 0).all()):
        raise ValueError(f"need one positive growth factor per sample ({x.shape[0]}), got {d.flatten().tolist()}")
    return x / d


def output_and_derivative(model: nn.Module, x: torch.Tensor, style: torch.Tensor, index: int,
                          norm=None, x_tangent: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(`model`'s output on `x` with the normalised `style` (N, style_size), d output / d parameter
    `index` in physical units), by `torch.func.jvp` along `style_tangent` and `x_tangent`.

    `norm` is the `StyleNorm` `style` was normalised with (None: the
    derivative is with respect to the normalised value).  `x_tangent` is
    dx / dparameter (e.g. `linear_input_tangent`; None: the input does not
    change with it).  The style is cast to the dtype of `x`; the model must
    be styled (`map2map.models.build.forward`).  No autograd graph is kept
    (it runs under `torch.no_grad`; forward mode does not need one).
    """
    size = style_size_of(model)
    if size is not None and not 0 <= index < size:
        raise ValueError(f"style parameter index {index} is outside the model's {size} style parameters")
    style = style.to(x.dtype)
    s_tangent = style_tangent(style, index, norm)
    with torch.no_grad():
        if x_tangent is None:
            return torch.func.jvp(lambda s: forward(model, x, s), (style,), (s_tangent,))
        if x_tangent.shape != x.shape:
            raise ValueError(f"the input tangent has shape {tuple(x_tangent.shape)}, the input {tuple(x.shape)}")
        return torch.func.jvp(lambda xx, s: forward(model, xx, s), (x, style), (x_tangent.to(x.dtype), s_tangent))


def displacement_and_derivative(model: nn.Module, x: torch.Tensor, physical: torch.Tensor, norm,
                                input_scales: bool = True, name: str = "D",
                                option: str = "--velocity") -> tuple[torch.Tensor, torch.Tensor]:
    """(output, d output / dD) of styled `model` on `x` for the physical styles `physical` (N, nparam) in
    the order of `norm` (the model card's `StyleNorm`): normalises them, and differentiates along the
    style parameter `name` and, with `input_scales` (an input proportional to D, e.g. ZA at D), along
    `linear_input_tangent`.  A `UserError` (naming `option`) when the model has no style `name`."""
    index = norm.index(name, option)
    physical = torch.as_tensor(physical, dtype=x.dtype, device=x.device)
    tangent = linear_input_tangent(x, physical[:, index]) if input_scales else None
    return output_and_derivative(model, x, norm.apply(physical), index, norm, tangent)


def velocity_factors(physical: np.ndarray, names: Sequence[str], omega_m: float = 0.31, name: str = "D",
                     omega_m_name: str = "Om") -> np.ndarray:
    """a H(z) f(z) D per sample (float64, km/s per Mpc/h; `map2map.cosmology.velocity_factor`) at the
    redshift z where flat LambdaCDM has the sample's growth factor (style `name`, D(z=0) = 1), with the
    sample's Omega_m when a style `omega_m_name` exists, else `omega_m`."""
    from map2map.cosmology import redshift_of_growth, velocity_factor

    physical = np.asarray(physical, dtype=np.float64).reshape(-1, len(names))
    names = list(names)
    om = physical[:, names.index(omega_m_name)] if omega_m_name in names else np.full(len(physical), omega_m)
    d = physical[:, names.index(name)]
    out = []
    for di, oi in zip(d, om):
        try:
            z = redshift_of_growth(float(di), float(oi))
        except ValueError:
            raise UserError(f"style {name}={di:g} is no growth factor of flat LambdaCDM with Omega_m={oi:g} "
                            f"(D(z=0) = 1; a positive value below the far future's)") from None
        out.append(float(velocity_factor(z, float(oi))))
    return np.array(out)
