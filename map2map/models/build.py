"""Build a model by name, the same way for training and inference.

``Model(in_chan, out_chan, scale_factor=..., **kwargs)`` as the original
toolkit does, with `scale_factor` and ``dim`` passed when the class accepts
them (by name or through ``**kwargs``; ``dim`` only if the caller did not
set it), and ``style_size`` when the data have styles.  `forward` is the one
place that calls a model on a batch.

Terms:

* *named keywords* of a model or norm: the keyword parameters its signature
  names (`named_keywords`).  A signature with ``**kwargs`` takes any keyword,
  except in this package: its models and norms take ``**kwargs`` only to
  ignore what is meant for others, so only their named parameters count.
* *extra keywords*: the ``--misc-kwargs`` keys, passed to the model and to
  every norm.  A key is known when the model or one of the norms names it
  (or takes any keyword); an unknown key is a `UserError` (a typo such as
  ``widht`` must not train the default width).  A model that neither names a
  key nor takes any keyword is not given it (it is one for the norms).
* *styled* model: one whose ``style_size`` attribute is a positive integer
  (`style_size_of`; a DDP or compiled wrapper is looked through).  It is
  called as ``model(x, style)`` with `style` (batch, style_size); any other
  model as ``model(x)``.  `build_model` given ``style_size`` passes it to the
  class and sets the attribute on the model if the class did not.
"""

from __future__ import annotations

import inspect
import os
import traceback
import warnings
from typing import Any, Callable, Iterable, Mapping

from torch import nn

from map2map.errors import UserCodeError, UserError, user_code_error
from map2map.utils.imports import import_attr

PASSED = ("scale_factor", "dim", "style_size")  # keywords build_model itself passes, not the user's extra keywords


def _ours(obj: Any) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return module == "map2map" or module.startswith("map2map.")


def named_keywords(obj: Callable) -> frozenset[str] | None:
    """The keyword parameters the class or function `obj` names; None when it takes any keyword
    (``**kwargs`` outside this package, see the module docstring)."""
    try:
        params = list(inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):
        return None  # no signature to check against (e.g. a builtin): take its word for anything
    if any(p.kind == p.VAR_KEYWORD for p in params) and not _ours(obj):
        return None
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _accepts(cls: type, name: str) -> bool:
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind == p.VAR_KEYWORD for p in params)


def _norm_keywords(norms: Iterable[Callable | None]) -> tuple[set[str], bool, list[str]]:
    """(keywords the norms name, whether one takes any keyword, the norms' names)."""
    named: set[str] = set()
    anything = False
    names = []
    for norm in norms:
        if norm is None:
            continue
        label = f"{getattr(norm, '__module__', '').rsplit('.', 1)[-1]}.{getattr(norm, '__name__', norm)}"
        if label not in names:
            names.append(label)
        keys = named_keywords(norm)
        if keys is None:
            anything = True
        else:
            named |= keys - {"x", "undo"}
    return named, anything, names


def model_kwargs(cls: Callable, name: str, kwargs: Mapping[str, Any], norms: Iterable[Callable | None] = (),
                 option: str = "--misc-kwargs", strict: bool = True) -> dict[str, Any]:
    """The extra keywords (see the module docstring) model `cls` (called `name`) is given: all of
    `kwargs` if it takes any keyword, else those it names (never ``scale_factor``, which `build_model`
    passes itself); a `UserError` for a key neither the model nor any of `norms` takes, unless not
    `strict` (keywords a checkpoint's model card recorded, accepted when it was trained)."""
    own = named_keywords(cls)
    own_keys = None if own is None else own - {"in_chan", "out_chan"}
    norm_keys, norms_take_any, norm_names = _norm_keywords(norms)
    unknown = sorted(k for k in kwargs if k not in PASSED and own_keys is not None and k not in own_keys
                     and k not in norm_keys and not norms_take_any)
    if unknown and strict:
        takes = ", ".join(sorted(own_keys - set(PASSED))) or "none"
        also = f"; the norms {', '.join(norm_names)} take {', '.join(sorted(norm_keys)) or 'none'}" \
            if norm_names else ""
        keys = ", ".join(repr(k) for k in unknown)
        raise UserError(f"{option} key{'s' if len(unknown) > 1 else ''} {keys} unknown: model {name} takes "
                        f"{takes}{also}")
    return {k: v for k, v in kwargs.items()
            if k != "scale_factor" and (own_keys is None or k in own_keys or k in PASSED)}


def _where(exc: BaseException, cls: type) -> str:
    """' (raised at FILE:LINE)' for the innermost line of a model's own source file outside this package."""
    if _ours(cls):
        return ""
    try:
        source = os.path.realpath(inspect.getsourcefile(cls) or "")
    except TypeError:
        return ""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if os.path.realpath(f.filename) == source]
    return f" (raised at {source}:{frames[-1].lineno})" if frames else ""


def _requires(cls: type, name: str) -> bool:
    """Whether the signature of `cls` has a parameter `name` without a default."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False
    return name in params and params[name].default is inspect.Parameter.empty


def _style_kwargs(cls: type, name: str, style_size: int | None) -> dict[str, int]:
    """The ``style_size`` keyword for model `cls`, or a `UserError` when model and data disagree."""
    if style_size is None:
        if _requires(cls, "style_size"):
            raise UserError(f"model {name} is styled (it needs style_size) but the data have no styles; "
                            "use a store with styles (m2m convert --styles) or an unstyled model")
        return {}
    if isinstance(style_size, bool) or not isinstance(style_size, int) or style_size < 1:
        raise UserError(f"style_size must be a positive number of style parameters, got {style_size!r}")
    named = named_keywords(cls)
    if named is not None and "style_size" not in named:
        raise UserError(f"model {name} takes no style_size argument, so it cannot use {style_size} style "
                        "parameter(s); choose a styled model (e.g. StyledVNet) or train without --style")
    return {"style_size": style_size}


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = model._modules.get("module") if type(model).__name__ == "DistributedDataParallel" else None
        inner = inner if inner is not None else model._modules.get("_orig_mod")
        if inner is None:
            return model
        model = inner


def style_size_of(model: nn.Module) -> int | None:
    """The number of style parameters `model` takes (see *styled* in the module docstring), else None."""
    size = getattr(_unwrap(model), "style_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def forward(model: nn.Module, x, style=None):
    """`model` on the batch `x` (N, C, *spatial): ``model(x, style)`` for a styled model, with `style`
    (N, style_size) cast to the dtype of `x`, ``model(x)`` for any other; a one-line `UserError` for a
    style given to an unstyled model, missing for a styled one, or of the wrong shape."""
    size = style_size_of(model)
    what = type(_unwrap(model)).__name__
    if size is None:
        if style is not None:
            raise UserError(f"model {what} is not styled but was given styles; drop --style, or train a styled "
                            "model (e.g. StyledVNet)")
        return model(x)
    if style is None:
        raise UserError(f"model {what} is styled ({size} style parameters) but was given none; use a store "
                        "with styles, or give them with --style NAME=VALUE,...")
    if tuple(style.shape) != (x.shape[0], size):
        raise UserError(f"model {what} takes styles of shape (batch, {size}) = ({x.shape[0]}, {size}), got "
                        f"{tuple(style.shape)}; check --style against the model's style parameters")
    if style.dtype != x.dtype and x.dtype.is_floating_point:
        style = style.to(x.dtype)
    return model(x, style)


def zero_style(model: nn.Module, batch: int, device=None):
    """A zero style batch (`batch`, style_size) for a styled `model` (shape probes), None for any other."""
    import torch

    size = style_size_of(model)
    return None if size is None else torch.zeros(batch, size, device=device)


def build_model(name: str, in_chan: int, out_chan: int, *, scale_factor: int, ndim: int,
                kwargs: Mapping[str, Any] | None = None, callback_at: str | None = None,
                norms: Iterable[Callable | None] = (), option: str = "--misc-kwargs",
                style_size: int | None = None) -> nn.Module:
    """Look `name` up in `map2map.models` (then `callback_at`) and construct it; one-line errors.

    `kwargs` are the extra keywords, checked and filtered by `model_kwargs`
    against the model and `norms` (the norms they also go to); `option`
    names where they came from in errors.  `style_size` (the number of style
    parameters of the data, None without styles) is passed to a model that
    takes it; a model that needs it without styles, or styles for a model
    that takes none, is a `UserError`.
    """
    cls = import_attr(name, ["map2map.models"], callback_at, what="model")
    given = dict(kwargs or {})
    if "style_size" in given:
        raise UserError(f"{option} key 'style_size' is set from the data's styles; choose them with --style")
    if given.get("scale_factor", scale_factor) != scale_factor:
        raise UserError(f"model keyword scale_factor={given['scale_factor']} contradicts --scale-factor "
                        f"{scale_factor}; give it once, as --scale-factor")
    kwargs = model_kwargs(cls, name, given, norms, option)
    if _accepts(cls, "scale_factor"):
        kwargs["scale_factor"] = scale_factor
    elif scale_factor != 1:
        raise UserError(f"model {name} takes no scale_factor argument, so it cannot upsample by --scale-factor "
                        f"{scale_factor}")
    if "dim" not in kwargs and _accepts(cls, "dim"):
        kwargs["dim"] = ndim
    kwargs.update(_style_kwargs(cls, name, style_size))
    with warnings.catch_warnings(record=True) as caught:  # e.g. torch on zero-sized weights, if it then fails
        warnings.simplefilter("always")
        try:
            model = cls(in_chan, out_chan, **kwargs)
        except (TypeError, ValueError, ArithmeticError, RuntimeError) as exc:
            args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            mine = ", ".join(f"{k}={v!r}" for k, v in given.items() if k not in PASSED)
            check = f"; check {option} {mine}" if mine else ""
            found = user_code_error(exc)
            if found is not None:  # a user's model: named by file and line, as every error in user code
                raise UserCodeError(found.filename, found.lineno, found.exc_type,
                                    f"{found.detail} (building {name}({in_chan}, {out_chan}, {args}){check})") from None
            raise UserError(f"cannot build model {name}({in_chan}, {out_chan}, {args}): "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                            f"{_where(exc, cls)}{check}") from None
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if not isinstance(model, nn.Module):
        raise UserError(f"model {name} built a {type(model).__name__}, not a torch.nn.Module")
    if style_size is not None and style_size_of(model) is None:
        model.style_size = style_size  # a user's styled model that does not record it itself
    if style_size_of(model) not in (None, style_size):
        raise UserError(f"model {name} says it takes {style_size_of(model)} style parameters, built with "
                        f"style_size={style_size}")
    return model
