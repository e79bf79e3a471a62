"""Tile plans for whole-box inference: pure integers and shapes, no I/O, no torch.

A sample's box (``box`` voxels per axis on the input grid) is cut into tiles
of ``tile`` voxels whose origins are multiples of ``tile``; where ``tile``
does not divide the box the last tile along an axis is smaller, clipped at
the box edge.  Every tile is predicted from a window of the same size,
``tile + pad_lo + pad_hi``, starting ``pad_lo`` before the tile origin (a
clipped last tile reads the same full-size window and keeps only its part of
the output), so every forward pass has a shape the model accepts and every
window origin is the whole-box window origin shifted by a multiple of the
tile, which is a multiple of the model's total stride: the stitched result is
the model applied to the whole periodically padded box.

The output grid is ``scale`` times finer.  Tile ``t`` owns the output region
``scale * [origin, origin + size)``, which must be a union of whole output
shards (the partial shard at the array end counts as whole), so no two tiles,
and no two tasks, ever write into the same shard: concurrent writes into
different inner chunks of one shard corrupt it.  That holds exactly when
``tile * scale`` is a multiple of the output shard on every axis.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from map2map.errors import UserError

Shape = tuple[int, ...]
Interval = tuple[int, int]


class TileError(UserError, ValueError):
    """A tile size the model's stride or the output shards do not allow."""


def tile_step(stride: int, scale: int, out_shard: int) -> int:
    """The smallest tile size (input voxels, one axis) that is a multiple of the model's total
    `stride` and whose output (`scale` times finer) is a multiple of `out_shard`."""
    if stride < 1 or scale < 1 or out_shard < 1:
        raise ValueError(f"stride {stride}, scale {scale} and shard {out_shard} must be positive")
    return math.lcm(stride, out_shard // math.gcd(out_shard, scale))


def suggest(value: int, step: int, limit: int | None = None) -> list[int]:
    """Valid sizes near `value`: the multiples of `step` just below and above (above only if
    at most `limit`, when given)."""
    below = value // step * step
    out = [below] if below > 0 else []
    above = below + step
    if limit is None or above <= limit or not out:
        out.append(above)
    return out


def check_tile(tile: Sequence[int], box: Sequence[int], stride: int, scale: int,
               out_shard: Sequence[int] | None = None) -> None:
    """Raise `TileError`, naming valid sizes, unless every tile size is positive, at most the box,
    a multiple of `stride`, and maps onto a multiple of the output shard (None: the output shard
    is the tile itself, so only the stride constrains it)."""
    shards = [None] * len(tile) if out_shard is None else list(out_shard)
    for d, (t, n, s) in enumerate(zip(tile, box, shards)):
        if t < 1:
            raise TileError(f"crop {t} on axis {d} must be positive")
        if s is not None and (s < 1 or s > n * scale):
            raise TileError(f"output shard {s} on axis {d} must be between 1 and the output grid {n * scale}")
        step = stride if s is None else tile_step(stride, scale, s)
        s = t * scale if s is None else s
        if t > n:
            best = n // step * step
            hint = f"e.g. {best}" if best else f"no multiple of {step} fits; use a larger box or smaller shards"
            raise TileError(f"crop {t} on axis {d} is larger than the box ({n} voxels); {hint}")
        if t % step:
            why = []
            if t % stride:
                why.append(f"a multiple of the model's total stride {stride}")
            if (t * scale) % s:
                why.append(f"{'times scale factor ' + str(scale) + ' ' if scale > 1 else ''}"
                           f"a multiple of the output shard {s}")
            raise TileError(f"crop {t} on axis {d} must be {' and '.join(why)}; "
                            f"use e.g. {' or '.join(map(str, suggest(t, step, n)))}")


def tile_work(box: Sequence[int], tile: Sequence[int], halo: Sequence[int]) -> int:
    """Input voxels all forward passes over the box compute: ``prod_d ceil(box_d / tile_d) * (tile_d +
    halo_d)``, with ``halo_d`` the window's extra voxels on axis d (low plus high pad); a clipped last tile
    still computes a full window."""
    return math.prod(-(-n // t) * (t + h) for n, t, h in zip(box, tile, halo))


def _side_candidates(n: int, step: int) -> list[int]:
    """Per axis, the sides that can be optimal: for each count k of tiles along the axis, the smallest
    multiple of `step` that covers `n` in k tiles (any other side with k tiles computes more); ascending."""
    sides = set()
    for k in range(1, n + 1):
        side = -(-(-(-n // k)) // step) * step
        if side <= n // step * step:
            sides.add(side)
        if side == step:
            break
    return sorted(sides)


def auto_tile(box: Sequence[int], step: Sequence[int], halo: Sequence[int], max_window: int) -> Shape | None:
    """The tile `--crop auto` chooses, or None if none fits.

    Terms: a *valid* tile has on every axis d a side that is a positive
    multiple of ``step[d]`` (`tile_step`: the model's stride and the output
    shard) and at most ``box[d]``; its *window* is ``prod_d (tile_d +
    halo_d)`` voxels, the input of one forward pass; its *work* is
    `tile_work`, the voxels all passes compute.  The tile is the valid one
    whose window is at most `max_window` voxels with the least work; among
    equal work the one keeping the most voxels per pass, then the
    (lexicographically) largest.  Least work, rather than the largest side,
    avoids a thin last tile that costs a full window (a box of 130 voxels is
    cheaper in two tiles of 68 than in one of 128 and a clipped one of 128).
    """
    if not (len(box) == len(step) == len(halo)):
        raise ValueError(f"box {tuple(box)}, step {tuple(step)} and halo {tuple(halo)} differ in dimensions")
    if any(s < 1 for s in step) or any(h < 0 for h in halo):
        raise ValueError(f"steps {tuple(step)} must be positive and halos {tuple(halo)} non-negative")
    cands = [_side_candidates(n, s) for n, s in zip(box, step)]
    if not all(cands):
        return None
    # the last axis, for a bound on its side: the best side up to each candidate, by (its work, -side)
    last_work = [tile_work(box[-1:], (t,), halo[-1:]) for t in cands[-1]]
    prefix: list[int] = []
    for i, w in enumerate(last_work):
        prefix.append(i if not prefix or (w, -cands[-1][i]) < (last_work[prefix[-1]], -cands[-1][prefix[-1]])
                      else prefix[-1])
    best: tuple | None = None
    for head in itertools.product(*cands[:-1]):
        head_window = math.prod(t + h for t, h in zip(head, halo))
        fits = bisect.bisect_right(cands[-1], max_window // head_window - halo[-1])  # sides with a window fitting
        if fits == 0:
            continue
        i = prefix[fits - 1]
        tile = tuple(head) + (cands[-1][i],)
        key = (tile_work(box[:-1], head, halo[:-1]) * last_work[i], -math.prod(tile), tuple(-v for v in tile))
        if best is None or key < best[0]:
            best = (key, tile)
    return None if best is None else best[1]


@dataclass(frozen=True)
class TilePlan:
    """Tiles of one sample's box; tiles are numbered in C order of their origins."""

    box: Shape
    tile: Shape
    pad: tuple[Interval, ...]
    scale: int = 1

    def __post_init__(self) -> None:
        if not (len(self.box) == len(self.tile) == len(self.pad)):
            raise ValueError(f"box {self.box}, tile {self.tile} and pad {self.pad} differ in dimensions")
        if any(t < 1 or t > n for t, n in zip(self.tile, self.box)):
            raise ValueError(f"tile {self.tile} must be between 1 and the box {self.box} on every axis")
        if self.scale < 1 or any(lo < 0 or hi < 0 for lo, hi in self.pad):
            raise ValueError(f"scale {self.scale} must be positive and pads {self.pad} non-negative")

    @property
    def ndim(self) -> int:
        return len(self.box)

    @property
    def counts(self) -> Shape:
        """Tiles along each axis."""
        return tuple(-(-n // t) for n, t in zip(self.box, self.tile))

    @property
    def ntiles(self) -> int:
        return math.prod(self.counts)

    @property
    def out_box(self) -> Shape:
        return tuple(n * self.scale for n in self.box)

    @property
    def window_shape(self) -> Shape:
        """Input voxels of every forward pass (the same for all tiles)."""
        return tuple(t + lo + hi for t, (lo, hi) in zip(self.tile, self.pad))

    def index(self, t: int) -> Shape:
        """Per-axis tile indices of tile number `t`."""
        if not 0 <= t < self.ntiles:
            raise IndexError(f"tile {t} out of range [0, {self.ntiles})")
        out = []
        for c in reversed(self.counts):
            t, i = divmod(t, c)
            out.append(i)
        return tuple(reversed(out))

    def origin(self, t: int) -> Shape:
        return tuple(i * s for i, s in zip(self.index(t), self.tile))

    def extent(self, t: int) -> tuple[Interval, ...]:
        """The tile's own voxels ``[lo, hi)`` per axis, inside the box (clipped at its edge)."""
        return tuple((o, min(o + s, n)) for o, s, n in zip(self.origin(t), self.tile, self.box))

    def size(self, t: int) -> Shape:
        return tuple(hi - lo for lo, hi in self.extent(t))

    def window(self, t: int) -> tuple[Interval, ...]:
        """The input window read for tile `t`: full size, may leave the box (periodic wrap)."""
        return tuple((o - lo, o + s + hi) for o, s, (lo, hi) in zip(self.origin(t), self.tile, self.pad))

    def out_region(self, t: int) -> tuple[Interval, ...]:
        """The output-grid region tile `t` writes."""
        return tuple((lo * self.scale, hi * self.scale) for lo, hi in self.extent(t))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.ntiles))


def shards_of(region: Sequence[Interval], shard: Sequence[int]) -> list[Shape]:
    """Indices of the shards of size `shard` that intersect `region` (inside the array)."""
    axes = [range(lo // s, (hi - 1) // s + 1) if hi > lo else range(0) for (lo, hi), s in zip(region, shard)]
    return list(itertools.product(*axes))


def whole_shards(region: Sequence[Interval], shard: Sequence[int], shape: Sequence[int]) -> bool:
    """Whether `region` is a union of whole shards of an array of `shape` (edge shards are clipped)."""
    return all(lo % s == 0 and (hi % s == 0 or hi == n) and 0 <= lo < hi <= n
               for (lo, hi), s, n in zip(region, shard, shape))


def narrow_offsets(tile: Sequence[int], pad: Sequence[Interval], scale: int,
                   out_shape: Sequence[int]) -> Shape:
    """Where a tile's output starts inside the model output of its window, per axis.

    A padding-free model shrinks its (upsampled) input evenly from both ends:
    the window ``[o - lo, o + tile + hi)`` gives output covering
    ``scale * [o - lo, o + tile + hi)`` less ``m`` voxels at each end, where
    ``2 m = scale * (tile + lo + hi) - out``.  The tile's output then starts
    ``scale * lo - m`` voxels into the model output; with symmetric pads that
    is the centred narrowing of `narrow_like`.  Raises `TileError` when the
    output is too small, or the shrink is odd (not symmetric).
    """
    offsets = []
    for d, (t, (lo, hi), out) in enumerate(zip(tile, pad, out_shape)):
        shrink = scale * (t + lo + hi) - out
        if shrink % 2:
            raise TileError(f"the model maps {t + lo + hi} input voxels on axis {d} to {out}: the "
                            f"shrink {shrink} is odd, so the output cannot be centred on the input")
        m = shrink // 2
        off = scale * lo - m
        if off < 0 or off + t * scale > out:
            raise TileError(f"the model maps a window of {t + lo + hi} voxels on axis {d} (crop {t}, pad "
                            f"{lo}+{hi}) to {out} voxels, which do not cover the crop's {t * scale}; "
                            "increase --in-pad (or use --in-pad auto)")
        offsets.append(off)
    return tuple(offsets)


def batches(tiles: Iterable[int], size: int) -> list[list[int]]:
    """Consecutive groups of at most `size` tiles (each task takes one group)."""
    if size < 1:
        raise ValueError(f"batch size must be positive, got {size}")
    tiles = list(tiles)
    return [tiles[i:i + size] for i in range(0, len(tiles), size)]


def choose_out_chunk(out_shard: Sequence[int], largest: int = 32) -> Shape:
    """Inner chunk of the output: the largest divisor of the output shard from 8 up to `largest`
    voxels, or the whole shard if there is none.

    Writing a 3 x 64^3 shard with zarr-python 3.1 took 117 ms with 8^3 inner
    chunks, 28 ms with 16^3, 14 ms with 32^3 and 11 ms with 64^3: the encoder
    works chunk by chunk.  Predictions are mostly read whole or in slices;
    32^3 keeps writes fast and a later halo read (a prediction fed to another
    model) from decoding much more than it needs.
    """
    out = []
    for s in out_shard:
        fits = [v for v in range(min(8, s), min(s, largest) + 1) if s % v == 0]
        out.append(max(fits) if fits else s)  # no divisor from 8 to `largest`: one chunk per shard
    return tuple(out)
