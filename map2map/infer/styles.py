"""Styled models at inference: each sample's styles, and velocities from the derivative in D.

Terms:

* *styles of a run*: the physical values of the style parameters the
  checkpoint's model card names (`map2map.modelfit.ModelCard.style_names`),
  one row per sample, in the card's order.  By default each sample's own,
  from the input store (`map2map.data.styles.store_styles`); with
  ``--style Om=0.31,D=0.72`` the same values for every sample (every
  parameter of the model given, no other).  The model sees them through the
  card's style norm, as in training.  They do not change under the
  symmetries of ``--tta``, so each forward pass of the average gets the same.
* *velocity* (``--velocity``, the field `map2map.infer.specs.VEL_FIELD`):
  for a model that predicts a displacement psi conditioned on the growth
  factor D (a style named ``D``),

      v = a H(z) f(z) D dpsi/dD   [km/s]

  (`map2map.cosmology.peculiar_velocity`).  dpsi/dD comes from
  `map2map.models.velocity.displacement_and_derivative` (forward mode, in
  the same pass as the displacement), along the style D and, with
  ``--velocity-input scales`` (the default), along the input, taken to be
  proportional to D as the Zel'dovich displacement at D is; with
  ``--velocity-input fixed`` (an input that is the same at every D, e.g. the
  linear field at z = 0) along the style alone.  The model's output is in
  the units of the target norm, which must be a constant factor
  (`map2map.models.eulerian.dis_norm_of`), so undoing it scales the
  derivative by the same factor.  A sample's *velocity factor* is that
  factor times its a H f D (`map2map.models.velocity.velocity_factors`):
  the model's derivative times it is km/s.  The derivative of a tile is
  that of the whole-box pass narrowed to the tile (the jvp is a pass of the
  same convolutions), so stitching is exact for both outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from map2map.errors import UserError

VELOCITY_INPUTS = ("scales", "fixed")  # --velocity-input: the input proportional to D, or the same at every D


@dataclass(frozen=True)
class Styling:
    """The styles of a run (module docstring): parameter `names`, `values` (nsample rows), where they
    came from (`source`: "store" or the ``--style`` text), the card's style `norm`, and with
    ``--velocity`` each sample's velocity factor (else empty) and whether the input scales with D
    (`input_scales`, ``--velocity-input``)."""

    names: tuple[str, ...]
    values: tuple[tuple[float, ...], ...]
    source: str
    norm: Any
    vel_factors: tuple[float, ...] = ()
    input_scales: bool = True

    def settings(self) -> dict[str, Any]:
        """What the predictions depend on, for the resume settings hash."""
        out = {"style_source": self.source, "style_names": list(self.names),
               "style_values": [list(v) for v in self.values], "velocity": bool(self.vel_factors)}
        if self.vel_factors and not self.input_scales:  # only then: runs of the default keep their hash
            out["velocity_input"] = "fixed"
        return out


def _show(names) -> str:
    return ",".join(names)


def _from_store(path: str, names: tuple[str, ...], storage_options: Any = None) -> np.ndarray:
    """Each sample's values of parameters `names` in the input store `path` (module docstring)."""
    from map2map.data.styles import store_styles
    from map2map.store import open_store

    st = open_store(path, storage_options=storage_options)
    have = st.style_names
    fix = f"give every sample the same with --style {','.join(n + '=VALUE' for n in names)}"
    if not have:
        raise UserError(f"the checkpoint's model is styled ({_show(names)}) but store {path} has no styles; "
                        f"add them with m2m convert --styles TABLE.csv, or {fix}")
    missing = [n for n in names if n not in have]
    if missing:
        raise UserError(f"the checkpoint's model takes style parameters {_show(names)}, but store {path} has "
                        f"{_show(have)} (no {_show(missing)}); {fix}")
    return store_styles(path, names, required=True, storage_options=storage_options)[1]


def resolve_styles(opts, card, nsample: int, out_chan: int, ndim: int) -> Styling | None:
    """The styles of the run `opts` (an `InferConfig` filled from the card) for the checkpoint's `card`
    (None: no card), over `nsample` samples; None for an unstyled model.  One-line `UserError`s for
    ``--style`` or ``--velocity`` with an unstyled model, a store without the model's styles, a
    malformed or incomplete ``--style``, and ``--velocity`` without a style D or on an output that is
    not a displacement (`out_chan` channels on `ndim` axes), and ``--velocity-input fixed`` without
    ``--velocity``."""
    input_scales = opts.velocity_input == VELOCITY_INPUTS[0]
    if opts.velocity_input not in VELOCITY_INPUTS:
        raise UserError(f"--velocity-input {opts.velocity_input}: choose scales (the input is proportional to "
                        "D) or fixed (the input is the same at every D)")
    if not input_scales and not opts.velocity:
        raise UserError("--velocity-input fixed: it says how the velocity is differentiated; add --velocity, "
                        "or drop it")
    names = tuple(card.style_names) if card is not None else ()
    if not names:
        for given, option in ((opts.style is not None, "--style"), (opts.velocity, "--velocity")):
            if given:
                raise UserError(f"{option}: the checkpoint's model takes no styles (its model card names no "
                                "style parameters); drop it, or use a checkpoint of a styled model (e.g. "
                                "StyledVNet trained on a store with styles)")
        return None
    from map2map.data.styles import assigned_values, parse_assignment

    norm = card.style_norm
    if opts.style is not None:
        one = assigned_values(parse_assignment(opts.style), names)
        values, source = np.repeat(one[None], nsample, axis=0), opts.style
    elif not opts.data:
        raise UserError(f"the checkpoint's model is styled ({_show(names)}) and .npy inputs carry no styles; "
                        f"give them with --style {','.join(n + '=VALUE' for n in names)}")
    else:
        values, source = _from_store(opts.data, names, opts.storage_options), "store"
    factors: tuple[float, ...] = ()
    if opts.velocity:
        norm.index("D", "--velocity")
        scale = velocity_scale(opts, out_chan, ndim)
        factors = tuple(float(f) * scale for f in _factors(values, names))
    rows = tuple(tuple(float(v) for v in row) for row in np.asarray(values, dtype=np.float32))
    return Styling(names, rows, source, norm, factors, input_scales)


def _factors(values: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    from map2map.models.velocity import velocity_factors

    return velocity_factors(values, names)


def velocity_scale(opts, out_chan: int, ndim: int) -> float:
    """The factor undoing the target norm multiplies a displacement by (`dis_norm_of`); a `UserError`
    when the model's output is not one displacement field or its norm is not a constant factor."""
    from map2map.data.fieldio import lookup_norms
    from map2map.models.eulerian import dis_norm_of

    if out_chan != ndim:
        raise UserError(f"--velocity needs a model that predicts a displacement ({ndim} channels on {ndim} "
                        f"axes), but it predicts {out_chan} channels")
    norms = lookup_norms(opts.tgt_norms, len(opts.tgt_norms or ()) or 1, "--tgt-norms", opts.callback_at)
    if len(norms) > 1:
        raise UserError(f"--velocity needs one displacement target field, but --tgt-norms names {len(norms)}")
    try:
        return dis_norm_of(norms[0], opts.norm_kwargs, "the target norm")
    except UserError:
        raise UserError(f"--velocity needs a displacement target whose norm is a constant factor, but "
                        f"--tgt-norms {_show(opts.tgt_norms)} is not one; use a scaling norm such as "
                        "cosmology.dis, or none") from None


def forward_for(model, job, sample: int, batch: int, device, amp: Callable) -> Callable:
    """The forward pass of batches of `batch` tiles of `sample` for `tta.averaged`: the model with the
    sample's normalised styles (its output; with ``--velocity`` the output and d output / dD
    concatenated along channels), each pass under the autocast context `amp()`."""
    import torch

    from map2map.models.build import forward

    if not job.styles:
        def plain(x):
            with amp():
                return forward(model, x)
        return plain
    physical = torch.tensor(job.styles[sample], dtype=torch.float32, device=device).expand(batch, -1)
    if not job.vel_field:
        normalised = job.style_norm.apply(physical)

        def styled(x):
            with amp():
                return forward(model, x, normalised)
        return styled
    from map2map.models.velocity import displacement_and_derivative

    def with_derivative(x):
        with amp():
            out, dout = displacement_and_derivative(model, x, physical, job.style_norm,
                                                    input_scales=job.vel_input_scales)
        return torch.cat([out, dout], dim=1)
    return with_derivative
