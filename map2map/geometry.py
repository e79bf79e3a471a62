"""Pure geometry of crops, windows, periodic wrap and chunk layouts.

Everything here is plain integer arithmetic on tuples: no I/O, no numpy
arrays of data, no torch.  All positions are in voxels of the grid they refer
to.  A *window* along one axis is a half-open interval ``[lo, hi)`` that may
leave the box ``[0, n)``; on a periodic box it stands for the voxels
``lo % n, (lo + 1) % n, ..., (hi - 1) % n``.

The reader splits every window into box-aligned *pieces*: maximal runs that
stay inside one period of the box.  A window no longer than the box gives at
most two pieces per axis, so a 3D read is at most eight plain slices of the
stored array; a pad larger than the box wraps again and simply gives more
pieces.
"""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass
from typing import Iterator, Sequence

Shape = tuple[int, ...]
Interval = tuple[int, int]


def as_tuple(value: int | Sequence[int], ndim: int, name: str = "value") -> Shape:
    """Broadcast one int, or check a sequence of `ndim` ints, to a tuple."""
    if isinstance(value, numbers.Integral):
        return (int(value),) * ndim
    out = tuple(int(v) for v in value)
    if len(out) == 1:
        return out * ndim
    if len(out) != ndim:
        raise ValueError(f"{name} needs 1 or {ndim} values, got {len(out)}: {list(out)}")
    return out


def parse_pad(pad: int | Sequence[int], ndim: int, name: str = "pad") -> tuple[Interval, ...]:
    """Per-axis (low, high) pads from one int, one per axis, or one per side.

    The per-side form lists ``2 * ndim`` values as ``lo0, hi0, lo1, hi1, ...``,
    the original toolkit's ``--in-pad`` / ``--tgt-pad`` convention.
    """
    values = [int(pad)] if isinstance(pad, numbers.Integral) else [int(p) for p in pad]
    if any(p < 0 for p in values):
        raise ValueError(f"{name} must not be negative, got {values}")
    if len(values) == 1:
        return ((values[0], values[0]),) * ndim
    if len(values) == ndim:
        return tuple((p, p) for p in values)
    if len(values) == 2 * ndim:
        return tuple((values[2 * d], values[2 * d + 1]) for d in range(ndim))
    raise ValueError(f"{name} needs 1, {ndim} or {2 * ndim} values, got {len(values)}: {values}")


def scale_pad(pad: tuple[Interval, ...], factor: int) -> tuple[Interval, ...]:
    """Pads of a grid `factor` times finer; equally a window's region on that grid (both are one
    interval per axis)."""
    return tuple((lo * factor, hi * factor) for lo, hi in pad)


@dataclass(frozen=True)
class CropGrid:
    """Crop anchors on a start/stop/step lattice, enumerated in C order.

    Anchor `i` along axis `d` is ``start[d] + i * step[d]`` for all such values
    below ``stop[d]``, as the original toolkit lays out its crops.
    """

    start: Shape
    stop: Shape
    step: Shape

    @property
    def counts(self) -> Shape:
        """Number of anchors along each axis."""
        return tuple(len(range(a, b, s)) for a, b, s in zip(self.start, self.stop, self.step))

    @property
    def size(self) -> int:
        return math.prod(self.counts)

    def anchor(self, index: int) -> Shape:
        """The `index`-th anchor in C order."""
        if not 0 <= index < self.size:
            raise IndexError(f"crop {index} out of range [0, {self.size})")
        out = []
        for count, start, step in zip(reversed(self.counts), reversed(self.start), reversed(self.step)):
            index, i = divmod(index, count)
            out.append(start + i * step)
        return tuple(reversed(out))

    def anchors(self) -> Iterator[Shape]:
        axes = [range(a, b, s) for a, b, s in zip(self.start, self.stop, self.step)]
        return itertools.product(*axes)


def crop_grid(size: Shape, crop: Shape, start: Shape | None = None, stop: Shape | None = None,
              step: Shape | None = None) -> CropGrid:
    """Validate crop settings against a field of spatial `size` and return the anchor lattice.

    Defaults follow the original toolkit: start 0, stop = size, step = crop.
    """
    ndim = len(size)
    start = (0,) * ndim if start is None else start
    stop = size if stop is None else stop
    step = crop if step is None else step
    for name, val in (("crop", crop), ("crop_step", step)):
        if any(v <= 0 for v in val):
            raise ValueError(f"{name} must be positive, got {list(val)}")
    if any(c > n for c, n in zip(crop, size)):
        raise ValueError(f"crop {list(crop)} is larger than the field {list(size)}")
    if any(b <= a for a, b in zip(start, stop)):
        raise ValueError(f"crop_stop {list(stop)} must exceed crop_start {list(start)} on every axis")
    return CropGrid(tuple(start), tuple(stop), tuple(step))


def window(anchor: Shape, crop: Shape, pad: tuple[Interval, ...]) -> tuple[Interval, ...]:
    """The window ``[anchor - pad_lo, anchor + crop + pad_hi)`` on every axis."""
    return tuple((a - lo, a + c + hi) for a, c, (lo, hi) in zip(anchor, crop, pad))


def split_periodic(lo: int, hi: int, n: int) -> list[tuple[int, int, int]]:
    """Split the periodic interval [lo, hi) on a box of size n into box-aligned pieces.

    Returns ``(src_lo, src_hi, dst_lo)`` triples: voxels ``src_lo:src_hi`` of
    the box go to ``dst_lo:dst_lo + (src_hi - src_lo)`` of the window.  Pieces
    are maximal, so an interval no longer than the box gives at most two.
    """
    if hi < lo or n <= 0:
        raise ValueError(f"bad interval [{lo}, {hi}) on a box of {n}")
    pieces = []
    pos = lo
    while pos < hi:
        src_lo = pos % n
        length = min(n - src_lo, hi - pos)
        pieces.append((src_lo, src_lo + length, pos - lo))
        pos += length
    return pieces


def split_bounded(lo: int, hi: int, n: int) -> list[tuple[int, int, int]]:
    """Like `split_periodic` for a non-periodic box: the window must lie inside it."""
    if lo < 0 or hi > n or hi < lo:
        raise ValueError(f"window [{lo}, {hi}) leaves the non-periodic box [0, {n})")
    return [(lo, hi, 0)] if hi > lo else []


Piece = tuple[tuple[slice, ...], tuple[slice, ...]]


def window_pieces(win: tuple[Interval, ...], shape: Shape, periodic: bool = True) -> list[Piece]:
    """All (source slices, destination slices) that assemble `win` from a box of `shape`.

    The product over axes of the per-axis pieces: at most ``2 ** ndim`` plain
    slices when every window side is at most the box size.
    """
    split = split_periodic if periodic else split_bounded
    per_axis = [split(lo, hi, n) for (lo, hi), n in zip(win, shape)]
    pieces = []
    for combo in itertools.product(*per_axis):
        src = tuple(slice(a, b) for a, b, _ in combo)
        dst = tuple(slice(d, d + b - a) for a, b, d in combo)
        pieces.append((src, dst))
    return pieces


def window_shape(win: tuple[Interval, ...]) -> Shape:
    return tuple(hi - lo for lo, hi in win)


def chunk_range(lo: int, hi: int, chunk: int) -> range:
    """Indices of the chunks of size `chunk` that intersect [lo, hi) (inside the box)."""
    if hi <= lo:
        return range(0)
    return range(lo // chunk, (hi - 1) // chunk + 1)


def decoded_voxels(win: tuple[Interval, ...], shape: Shape, chunks: Shape) -> int:
    """Voxels decoded to read `win` when every intersecting chunk is decoded whole (once per read)."""
    total = 0
    for src, _ in window_pieces(win, shape):
        per_axis = []
        for s, c, n in zip(src, chunks, shape):
            r = chunk_range(s.start, s.stop, c)
            per_axis.append(sum(min((i + 1) * c, n) - i * c for i in r))
        total += math.prod(per_axis)
    return total


def read_amplification(crop: int, pad: int, chunk: int, anchor: int = 0, ndim: int = 3) -> float:
    """Decoded / returned voxels for a cubic crop + pad window on a large box, chunks of `chunk`."""
    lo, hi = anchor - pad, anchor + crop + pad
    decoded = (math.ceil(hi / chunk) - math.floor(lo / chunk)) * chunk
    return (decoded / (hi - lo)) ** ndim


def choose_inner_chunk(crop: int, pad: int, max_amplification: float = 1.5, min_chunk: int = 8,
                       ndim: int = 3) -> int:
    """The largest divisor of `crop` (at least `min_chunk`) whose read amplification is acceptable.

    Amplification is measured for windows anchored on the crop grid.  Larger
    inner chunks are read faster per byte by zarr-python; smaller ones waste
    less of a halo read.  Falls back to the smallest allowed divisor.
    """
    divisors = [d for d in range(1, crop + 1) if crop % d == 0]
    allowed = [d for d in divisors if d >= min(min_chunk, crop)]
    for d in sorted(allowed, reverse=True):
        if read_amplification(crop, pad, d, 0, ndim) <= max_amplification:
            return d
    return min(allowed)


def scale_shape(shape: Shape, num: int, den: int = 1, what: str = "shape") -> Shape:
    """``shape * num / den`` per axis, refusing fractional results."""
    out = []
    for s in shape:
        if (s * num) % den:
            raise ValueError(f"{what} {list(shape)} cannot be scaled by {num}/{den} to whole voxels")
        out.append(s * num // den)
    return tuple(out)


def grid_ratio(size: Shape, ref: Shape) -> tuple[int, int]:
    """The common ratio ``num/den`` of grid `size` to grid `ref` (same on every axis), reduced."""
    ratios = {(s // math.gcd(s, r), r // math.gcd(s, r)) for s, r in zip(size, ref)}
    if len(ratios) != 1:
        raise ValueError(f"grid {list(size)} is not a uniform rescaling of {list(ref)}")
    return ratios.pop()
