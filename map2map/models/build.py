"""Build a model by name, the same way for training and inference.

``Model(in_chan, out_chan, scale_factor=..., **kwargs)`` as the original
toolkit does (`scale_factor` always passed), plus ``dim`` when the class
accepts it (by name or through ``**kwargs``) and the caller did not set it.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

from torch import nn

from map2map.errors import UserError
from map2map.utils.imports import import_attr


def _accepts(cls: type, name: str) -> bool:
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind == p.VAR_KEYWORD for p in params)


def build_model(name: str, in_chan: int, out_chan: int, *, scale_factor: int, ndim: int,
                kwargs: Mapping[str, Any] | None = None, callback_at: str | None = None) -> nn.Module:
    """Look `name` up in `map2map.models` (then `callback_at`) and construct it; one-line errors."""
    cls = import_attr(name, ["map2map.models"], callback_at, what="model")
    kwargs = dict(kwargs or {})
    if kwargs.get("scale_factor", scale_factor) != scale_factor:
        raise UserError(f"model keyword scale_factor={kwargs['scale_factor']} contradicts --scale-factor "
                        f"{scale_factor}; give it once, as --scale-factor")
    kwargs["scale_factor"] = scale_factor
    if "dim" not in kwargs and _accepts(cls, "dim"):
        kwargs["dim"] = ndim
    try:
        model = cls(in_chan, out_chan, **kwargs)
    except (TypeError, ValueError) as exc:
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise UserError(f"cannot build model {name}({in_chan}, {out_chan}, {args}): {exc}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model {name} built a {type(model).__name__}, not a torch.nn.Module")
    return model
