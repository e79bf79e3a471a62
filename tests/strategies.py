"""Hypothesis strategies shared by the property tests of the pure geometry, tile plans, the sampler and
the cube group.

Terms as in `map2map.geometry`: a *shape* is a tuple of voxel counts per axis; a *window* is one
half-open interval ``(lo, hi)`` per axis that may leave the box ``[0, n)`` on either side, by more than
the box, and a *region* one that stays inside it; a *pad* is one ``(lo, hi)`` pair per axis; a *crop
lattice* is the start/stop/step anchor grid of `geometry.crop_grid`.  Sizes stay small: the tests
compare against brute force and numpy.
"""

from __future__ import annotations

from typing import NamedTuple

from hypothesis import strategies as st

from map2map import geometry
from map2map.data.augment import CubeElement, cube_group
from map2map.tiles import TilePlan

Shape = tuple[int, ...]
Interval = tuple[int, int]


# --------------------------------------------------------------------------- shapes, windows, pads


def shapes(ndim: int | None = None, min_side: int = 1, max_side: int = 6, min_ndim: int = 1,
           max_ndim: int = 3) -> st.SearchStrategy[Shape]:
    """Shapes of `ndim` axes (None: `min_ndim` to `max_ndim`), each side from `min_side` to `max_side`."""
    lo, hi = (min_ndim, max_ndim) if ndim is None else (ndim, ndim)
    return st.lists(st.integers(min_side, max_side), min_size=lo, max_size=hi).map(tuple)


def per_side_pads(ndim: int, max_pad: int) -> st.SearchStrategy[list[int]]:
    """Pads in the per-side form ``lo0, hi0, lo1, hi1, ...`` of ``--in-pad``, each 0 to `max_pad`."""
    return st.lists(st.integers(0, max_pad), min_size=2 * ndim, max_size=2 * ndim)


def pads(ndim: int, max_pad: int) -> st.SearchStrategy[tuple[Interval, ...]]:
    """Per-axis ``(lo, hi)`` pads, each side 0 to `max_pad`."""
    return per_side_pads(ndim, max_pad).map(lambda values: geometry.parse_pad(values, ndim))


@st.composite
def windows(draw: st.DrawFn, shape: Shape, span: int = 15, max_len: int | None = None) -> tuple[Interval, ...]:
    """A window on a box of `shape`: per axis ``lo`` in ``[-span, span]`` and a length from 0 to
    `max_len` (None: at most the box side, a *short* window)."""
    win = []
    for n in shape:
        lo = draw(st.integers(-span, span))
        win.append((lo, lo + draw(st.integers(0, n if max_len is None else max_len))))
    return tuple(win)


@st.composite
def regions(draw: st.DrawFn, shape: Shape) -> tuple[Interval, ...]:
    """A region inside a box of `shape`: per axis ``0 <= lo <= hi <= n`` (possibly empty)."""
    out = []
    for n in shape:
        lo = draw(st.integers(0, n))
        out.append((lo, draw(st.integers(lo, n))))
    return tuple(out)


@st.composite
def shape_and_window(draw: st.DrawFn, max_n: int = 6, max_len: int | None = 20,
                     span: int = 15) -> tuple[Shape, tuple[Interval, ...]]:
    """A box of 1 to 3 axes (sides 1 to `max_n`) and a window on it (see `windows`)."""
    shape = draw(shapes(max_side=max_n))
    return shape, draw(windows(shape, span, max_len))


def shape_and_short_window(max_n: int = 8,
                           span: int = 20) -> st.SearchStrategy[tuple[Shape, tuple[Interval, ...]]]:
    """A box and a window no longer than the box on every axis."""
    return shape_and_window(max_n=max_n, max_len=None, span=span)


# --------------------------------------------------------------------------- crop lattices


class CropLattice(NamedTuple):
    """Arguments of `geometry.crop_grid`: field size, crop, and the anchor lattice start/stop/step."""

    size: Shape
    crop: Shape
    start: Shape
    stop: Shape
    step: Shape


@st.composite
def crop_lattices(draw: st.DrawFn, max_size: int = 12) -> CropLattice:
    """A field of 1 to 3 axes, a crop that fits, and a lattice that may start before the field and
    stop past it."""
    size = draw(shapes(max_side=max_size))
    crop = tuple(draw(st.integers(1, n)) for n in size)
    start = tuple(draw(st.integers(-3, 6)) for _ in size)
    stop = tuple(a + draw(st.integers(1, 12)) for a in start)
    step = tuple(draw(st.integers(1, 7)) for _ in size)
    return CropLattice(size, crop, start, stop, step)


# --------------------------------------------------------------------------- tile plans


class PlanCase(NamedTuple):
    """A tile plan with the model's total stride and the output shard it was drawn against."""

    plan: TilePlan
    stride: int
    shard: Shape


@st.composite
def tile_plans(draw: st.DrawFn, max_n: int = 24) -> PlanCase:
    """A plan whose tile is a multiple of the stride and whose output tile is a whole number of
    output shards, as `tiles.check_tile` requires."""
    ndim = draw(st.integers(1, 3))
    scale = draw(st.sampled_from([1, 1, 2, 3]))
    stride = draw(st.sampled_from([1, 2, 4]))
    box, tile, shard = [], [], []
    for _ in range(ndim):
        n = draw(st.integers(stride, max_n))
        t = draw(st.integers(1, n // stride)) * stride
        divisors = [v for v in range(1, t * scale + 1) if (t * scale) % v == 0]
        box.append(n)
        tile.append(t)
        shard.append(draw(st.sampled_from(divisors)))
    plan = TilePlan(tuple(box), tuple(tile), draw(pads(ndim, 6)), scale)
    return PlanCase(plan, stride, tuple(shard))


# --------------------------------------------------------------------------- sampler


crop_grids = shapes(max_side=5)
"""Crops per axis of one sample (the sampler's crop grid)."""

shuffle_dists = st.sampled_from([0, 0.5, 1, 2, 3.5])
"""Values of ``--div-shuffle-dist``."""


@st.composite
def sampler_configs(draw: st.DrawFn, shuffle: bool | None = None, div_data: bool | None = None) -> dict:
    """Keyword arguments of `sampler.epoch_indices`: sizes, world size, epoch, seed and flags
    (`shuffle` / `div_data` drawn when None)."""
    return dict(
        nsample=draw(st.integers(1, 6)),
        crop_grid=draw(crop_grids),
        world_size=draw(st.integers(1, 4)),
        epoch=draw(st.integers(0, 1000)),
        seed=draw(st.integers(0, 2**32)),
        shuffle=draw(st.booleans()) if shuffle is None else shuffle,
        div_data=draw(st.booleans()) if div_data is None else div_data,
        div_shuffle_dist=draw(shuffle_dists),
        locality=draw(st.booleans()),
    )


# --------------------------------------------------------------------------- cube group


def cube_elements(ndim: int) -> st.SearchStrategy[CubeElement]:
    """Elements of the symmetry group of the `ndim`-cube."""
    return st.sampled_from(cube_group(ndim))
