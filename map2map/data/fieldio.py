"""Field I/O shared by the training dataset and the inference worker: read, normalise, stack.

Terms.  A *source* (`map2map.data.windows.FieldSource`) is one stored field
shaped ``(sample, channel, *spatial)``: an array of a store or a list of .npy
files.  A *norm* is a function ``f(x, undo=False, **kwargs)`` acting on an
array in place (or returning the result), ``undo=True`` being its inverse;
norms are looked up by dotted name (``cosmology.dis``) in
`map2map.data.norms` or the user's ``--callback-at`` directory, and ``""``,
``"none"`` or ``"None"`` means none.  A *stack* (`FieldStack`) is a list of
sources read together: their channels concatenated in the order given, each
source normalised by its own norm, all with the same keyword arguments.

`FieldStack.read` fills a preallocated array with a window of every source
(periodic wrap, see `map2map.data.windows.read_window`), in place, and can
write it through a symmetry element of the cube (training augmentation)
without another pass over the data.  `undo_norms` inverts the norms of a
channel-stacked array (predictions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from map2map import geometry
from map2map.data import augment
from map2map.data.windows import FieldSource, ReadStats, read_window
from map2map.errors import UserError
from map2map.utils.imports import check_call, import_attr

Norm = Callable[..., Any]
NO_NORM = ("", "none", "None")


def lookup_norms(names: Sequence[str] | None, nfields: int, what: str,
                 callback_at: str | None = None, kwargs: Mapping[str, Any] | None = None) -> list[Norm | None]:
    """The norm of each of `nfields` fields (None: no norm); no `names` means no norms at all.

    `what` names the option in errors (e.g. ``in_norms``); a count other than
    `nfields` or an unknown name is a `UserError`.  With `kwargs` (the norm
    arguments), each norm's signature is checked to take ``norm(x, undo=...,
    **kwargs)`` now, so a user's norm with the wrong parameters is named (file
    and line) before any work, not from inside a worker.
    """
    if not names:
        return [None] * nfields
    if len(names) != nfields:
        raise UserError(f"{what} lists {len(names)} norms for {nfields} fields; give one per field")
    norms = [None if n in NO_NORM else import_attr(n, ["map2map.data.norms"], callback_at, what="norm")
             for n in names]
    if kwargs is not None:
        for name, norm in zip(names, norms):
            if norm is not None:
                check_call(norm, name, "norm", None, undo=False, **kwargs)
    return norms


def apply_norm(norm: Norm, x, undo: bool = False, **kwargs: Any) -> None:
    """Run `norm` on `x` in place, also for user norms that return a new array instead."""
    res = norm(x, undo=undo, **kwargs)
    if res is not None and res is not x:
        x[...] = res


def undo_norms(x, norm_names: Sequence[str] | None, chans: Sequence[int], callback_at: str | None = None,
               channel_axis: int = 0, **kwargs: Any):
    """Invert per-field norms, in place, on an array whose axis `channel_axis` stacks fields of
    `chans` channels each (e.g. predictions); returns `x`."""
    start = 0
    for c, norm in zip(chans, lookup_norms(norm_names, len(chans), "tgt_norms", callback_at)):
        if norm is not None:
            apply_norm(norm, x[(slice(None),) * channel_axis + (slice(start, start + c),)], undo=True, **kwargs)
        start += c
    return x


@dataclass
class FieldStack:
    """Sources read together: channels stacked in order, each source normalised by its norm (see the
    module docstring).  `norms` has one entry per source (None: left as stored)."""

    sources: Sequence[FieldSource]
    norms: Sequence[Norm | None]
    norm_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.norms) != len(self.sources):
            raise ValueError(f"{len(self.norms)} norms for {len(self.sources)} sources")

    @property
    def chans(self) -> list[int]:
        """Channels of each source."""
        return [s.shape[1] for s in self.sources]

    def shape(self, win: tuple[geometry.Interval, ...],
              element: augment.CubeElement | None = None) -> tuple[int, ...]:
        """The shape `read` fills: (all channels, *window shape), axes permuted by `element`."""
        shape = geometry.window_shape(win)
        if element is not None:
            shape = tuple(shape[p] for p in element.perm)
        return (sum(self.chans),) + shape

    def read(self, sample: int, win: tuple[geometry.Interval, ...], out: np.ndarray,
             element: augment.CubeElement | None = None, hint: bool = True) -> np.ndarray:
        """Fill `out` (shaped `shape(win, element)`) with the window `win` of `sample` of every source,
        normalised, transformed by `element` if given (a source with as many channels as the window
        has axes is a vector field and turns its components too); returns `out`.  Each source's window
        is hinted before it is copied (`read_window`) unless `hint` is False."""
        if out.shape != self.shape(win, element):
            raise ValueError(f"out has shape {out.shape}, the stack needs {self.shape(win, element)}")
        start = 0
        for source, c, norm in zip(self.sources, self.chans, self.norms):
            part = out[start:start + c]
            if element is None:
                read_window(source, sample, win, part, hint=hint)
            else:
                view = augment.inverse_view(part, element)
                read_window(source, sample, win, channels=augment.component_targets(view, element, c == len(win)),
                            hint=hint)
            if norm is not None:
                apply_norm(norm, part, **self.norm_kwargs)
            start += c
        return out

    def nbytes(self, win: tuple[geometry.Interval, ...]) -> int:
        """Stored bytes of the window `win` of every source (what `read` hands out, before any cast)."""
        voxels = math.prod(geometry.window_shape(win))
        return sum(s.shape[1] * voxels * np.dtype(s.dtype).itemsize for s in self.sources)

    def read_stats(self) -> ReadStats:
        """Bytes decoded vs returned by this process's sources."""
        total = ReadStats()
        for s in self.sources:
            total = total + s.stats
        return total
