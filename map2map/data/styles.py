"""Style parameters: choosing them by name, normalising them, and reading them from the command line.

A store's *styles* are per-sample numbers with names (``Om``, ``D``, ...;
`map2map.store.read_styles` gives the names and a (nsample, nparam) array).
Terms:

* *selection*: the parameters a model uses, by name and in the order given
  (``m2m train --style D,Om``; all of the store's, in its order, by default);
  `select_indices` turns it into column indices of the store's array.
* *style norm*: the affine map a model sees its styles through,
  ``normalised = (value - shift) / scale`` per parameter (`StyleNorm`).
  `fit_style_norm` takes it from the training store's values: the range of
  each parameter maps onto [-1, 1] (shift the midpoint, scale the half
  range), so values inside the simulated range stay within [-1, 1] and a
  value outside it (an extrapolation) is visibly beyond.  A parameter that
  is constant in the training data gets scale 1 (it maps to 0).
  The model card records it, so inference applies the very same map.
* *assignment*: ``--style Om=0.31,D=0.72`` at inference, one physical value
  per parameter for every sample (`parse_assignment`, `assigned_values`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from map2map.errors import UserError


def _show(names: Sequence[str]) -> str:
    return ",".join(names) if names else "none"


def parse_names(text: str, option: str = "--style") -> tuple[str, ...]:
    """Comma-separated parameter names (``Om,D``); a `UserError` for an empty or repeated name."""
    names = tuple(n.strip() for n in text.split(","))
    if any(not n for n in names):
        raise UserError(f"{option} {text!r} has an empty parameter name; give names separated by commas, e.g. Om,D")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"{option} {text!r} names {', '.join(repeated)} more than once")
    return names


def select_indices(available: Sequence[str], wanted: Sequence[str] | None,
                   option: str = "--style") -> tuple[int, ...]:
    """Column indices of the parameters `wanted`, in that order, among `available` (a store's names);
    all of them in order when `wanted` is None.  A `UserError` names unknown parameters and the store's."""
    available = tuple(available)
    if wanted is None:
        return tuple(range(len(available)))
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise UserError(f"{option} names {', '.join(unknown)}, not among the store's style parameters "
                        f"{_show(available)}")
    return tuple(available.index(n) for n in wanted)


def check_finite(names: Sequence[str], values: np.ndarray, where: str = "the styles") -> None:
    """A `UserError` naming the first parameter and sample of `values` (nsample, nparam) that is not finite."""
    bad = np.argwhere(~np.isfinite(np.asarray(values, dtype=np.float64)))
    if bad.size:
        sample, param = (int(i) for i in bad[0])
        raise UserError(f"{where} hold {values[sample, param]} for parameter {names[param]} of sample {sample}; "
                        "every style must be a finite number")


@dataclasses.dataclass(frozen=True)
class StyleNorm:
    """The affine map ``(value - shift) / scale`` of each named style parameter (module docstring)."""

    names: tuple[str, ...]
    shift: tuple[float, ...]
    scale: tuple[float, ...]

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.shift) == len(self.scale):
            raise ValueError(f"a style norm needs one shift and scale per name, got {len(self.names)} names, "
                             f"{len(self.shift)} shifts and {len(self.scale)} scales")
        if not all(math.isfinite(s) and s > 0 for s in self.scale) or \
                not all(math.isfinite(s) for s in self.shift):
            raise ValueError(f"a style norm needs finite shifts and positive finite scales, got "
                             f"shift {self.shift} and scale {self.scale}")

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str, option: str = "--velocity") -> int:
        """The position of parameter `name`; a `UserError` naming the parameters there are."""
        if name not in self.names:
            raise UserError(f"{option} needs a style parameter {name}, but the model's styles are "
                            f"{_show(self.names)}")
        return self.names.index(name)

    def _arrays(self, like: Any) -> tuple[Any, Any]:
        if isinstance(like, np.ndarray):
            return (np.asarray(self.shift, dtype=like.dtype), np.asarray(self.scale, dtype=like.dtype))
        import torch

        return (torch.tensor(self.shift, dtype=like.dtype, device=like.device),
                torch.tensor(self.scale, dtype=like.dtype, device=like.device))

    def apply(self, values):
        """`values` (..., nparam), a numpy array or torch tensor of physical values, normalised (a new one)."""
        shift, scale = self._arrays(values)
        return (values - shift) / scale

    def undo(self, normalised):
        """The physical values of `normalised` (..., nparam) (a new array or tensor)."""
        shift, scale = self._arrays(normalised)
        return normalised * scale + shift

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "shift": list(self.shift), "scale": list(self.scale)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StyleNorm":
        return cls(tuple(str(n) for n in d["names"]), tuple(float(v) for v in d["shift"]),
                   tuple(float(v) for v in d["scale"]))

    def describe(self) -> str:
        """One line: each parameter with the physical range mapped onto [-1, 1]."""
        return ", ".join(f"{n} [{c - s:.6g}, {c + s:.6g}]" for n, c, s in zip(self.names, self.shift, self.scale))


def fit_style_norm(names: Sequence[str], values: np.ndarray) -> StyleNorm:
    """The style norm of the training styles `values` (nsample, nparam), one column per name in `names`:
    each parameter's [min, max] onto [-1, 1]; scale 1 for a constant parameter (module docstring)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != len(names) or values.shape[0] == 0:
        raise UserError(f"styles must be (nsample >= 1, {len(names)}) for parameters {_show(names)}, got "
                        f"shape {values.shape}")
    check_finite(names, values)
    lo, hi = values.min(axis=0), values.max(axis=0)
    half = (hi - lo) / 2
    scale = np.where(half > 0, half, 1.0)
    return StyleNorm(tuple(str(n) for n in names), tuple(float(v) for v in (lo + hi) / 2),
                     tuple(float(v) for v in scale))


def store_styles(path, wanted: Sequence[str] | None = None, option: str = "--style",
                 required: bool = False, storage_options: dict | None = None
                 ) -> tuple[tuple[str, ...], np.ndarray] | None:
    """The selected style parameters of store `path` (a local path or URL, opened with `storage_options`)
    (names, float32 values (nsample, nparam) in the order of `wanted`; all by default), checked finite;
    None for a store without styles unless `wanted` names some or `required` (a styled model), which
    are a `UserError`."""
    from map2map.store import read_styles

    found = read_styles(path, storage_options)
    if found is None:
        if wanted is not None or required:
            need = f"{option} {','.join(wanted)}" if wanted is not None else "a styled model"
            raise UserError(f"store {path} has no style parameters, but {need} needs them; add them with "
                            "m2m convert --styles TABLE.csv")
        return None
    names, values = found
    index = select_indices(names, wanted, option)
    names, values = tuple(names[i] for i in index), np.ascontiguousarray(values[:, list(index)])
    check_finite(names, values, f"the styles of store {path}")
    return names, values


def norm_from_store(path, wanted: Sequence[str] | None = None, option: str = "--style",
                    storage_options: dict | None = None) -> StyleNorm | None:
    """The style norm (`fit_style_norm`) of the selected styles of training store `path` (opened with
    `storage_options`); None without styles (see `store_styles`)."""
    found = store_styles(path, wanted, option, storage_options=storage_options)
    return None if found is None else fit_style_norm(*found)


def parse_assignment(text: str, option: str = "--style") -> dict[str, float]:
    """``Om=0.31,D=0.72`` as {name: value}; a `UserError` for a malformed, repeated or non-finite entry."""
    out: dict[str, float] = {}
    for item in text.split(","):
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or not name:
            raise UserError(f"{option} {text!r}: {item!r} is not NAME=VALUE; write e.g. Om=0.31,D=0.72")
        if name in out:
            raise UserError(f"{option} {text!r} gives {name} more than once")
        from map2map.store import style_number

        out[name] = style_number(value, f"{option} {text!r}, {name}")
    return out


def assigned_values(assignment: Mapping[str, float], names: Sequence[str], option: str = "--style") -> np.ndarray:
    """The physical values (float32, one per parameter of `names`, in that order) an assignment gives;
    a `UserError` for a parameter it misses or one the model does not take."""
    unknown = [n for n in assignment if n not in names]
    missing = [n for n in names if n not in assignment]
    if unknown or missing:
        problem = (f"names {', '.join(unknown)}, not a style parameter of the model" if unknown
                   else f"misses {', '.join(missing)}")
        raise UserError(f"{option} {problem}; the model's style parameters are {_show(names)}: give "
                        f"{','.join(f'{n}=VALUE' for n in names)}")
    return np.asarray([assignment[n] for n in names], dtype=np.float32)
