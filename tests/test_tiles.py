"""Property tests of `map2map.tiles` against brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from map2map import tiles as T

from strategies import regions, shapes, tile_plans


@given(tile_plans())
def test_tiles_cover_the_box_exactly_once(args):
    plan, stride, shard = args
    count = np.zeros(plan.box, dtype=int)
    for t in plan:
        count[tuple(slice(lo, hi) for lo, hi in plan.extent(t))] += 1
    assert (count == 1).all()
    out = np.zeros(plan.out_box, dtype=int)
    for t in plan:
        out[tuple(slice(lo, hi) for lo, hi in plan.out_region(t))] += 1
    assert (out == 1).all()


@given(tile_plans())
def test_each_tile_owns_whole_shards_and_no_shard_is_shared(args):
    plan, stride, shard = args
    T.check_tile(plan.tile, plan.box, stride, plan.scale, shard)  # the strategy draws valid tiles
    owner: dict[tuple, int] = {}
    for t in plan:
        region = plan.out_region(t)
        assert T.whole_shards(region, shard, plan.out_box)
        for s in T.shards_of(region, shard):
            assert s not in owner, f"shard {s} written by tiles {owner[s]} and {t}"
            owner[s] = t
    assert len(owner) == math.prod(-(-n // s) for n, s in zip(plan.out_box, shard))


@given(shapes(max_side=12), st.data())
def test_shards_of_and_whole_shards_match_brute_force(shape, data):
    shard = tuple(data.draw(st.integers(1, n)) for n in shape)
    region = data.draw(regions(shape))
    voxels = list(itertools.product(*(range(lo, hi) for lo, hi in region)))
    touched = sorted({tuple(v // s for v, s in zip(voxel, shard)) for voxel in voxels})
    assert T.shards_of(region, shard) == touched  # each once, in C order
    # whole: the touched shards, clipped at the array end, hold exactly the region's voxels
    covered = sum(math.prod(min((i + 1) * s, n) - i * s for i, s, n in zip(idx, shard, shape)) for idx in touched)
    assert T.whole_shards(region, shard, shape) == (bool(voxels) and covered == len(voxels))


@given(tile_plans())
def test_windows_are_full_size_stride_aligned_and_hold_tile_plus_halo(args):
    plan, stride, _ = args
    for t in plan:
        win = plan.window(t)
        assert tuple(hi - lo for lo, hi in win) == plan.window_shape
        for (wlo, whi), (lo, hi), (plo, phi), o in zip(win, plan.extent(t), plan.pad, plan.origin(t)):
            assert o % stride == 0 and wlo + plo == o  # same offset to the whole-box window, mod stride
            assert wlo <= lo - plo and hi + phi <= whi


@given(tile_plans())
def test_index_origin_round_trip_in_c_order(args):
    plan, _, _ = args
    origins = [plan.origin(t) for t in plan]
    assert origins == sorted(origins)
    assert len(set(origins)) == plan.ntiles
    with pytest.raises(IndexError):
        plan.index(plan.ntiles)


@given(st.integers(1, 8), st.integers(1, 4), st.integers(1, 64), st.integers(1, 200), st.integers(1, 300))
def test_tile_step_and_suggestions_are_valid(stride, scale, shard, value, box):
    step = T.tile_step(stride, scale, shard)
    assert step % stride == 0 and (step * scale) % shard == 0
    # it is the smallest such size
    assert all(v % stride or (v * scale) % shard for v in range(1, step))
    for v in T.suggest(value, step, box):
        assert v > 0 and v % step == 0


def test_check_tile_messages_suggest_valid_sizes():
    with pytest.raises(T.TileError, match=r"crop 30 on axis 0 must be a multiple of the model's total stride 4; "
                                          r"use e.g. 28 or 32"):
        T.check_tile((30, 32, 32), (64, 64, 64), 4, 1, (2, 32, 32))
    with pytest.raises(T.TileError, match=r"a multiple of the output shard 16; use e.g. 16 or 32"):
        T.check_tile((24,), (64,), 4, 1, (16,))
    with pytest.raises(T.TileError, match=r"larger than the box \(16 voxels\); e.g. 16"):
        T.check_tile((32,), (16,), 4, 1, (16,))
    T.check_tile((12, 12), (30, 30), 4, 2, (8, 24))  # 24 % 8 == 0, 24 % 24 == 0


@given(st.integers(1, 20), st.integers(0, 8), st.integers(1, 3), st.integers(0, 6))
def test_narrow_offsets_centre_symmetric_pads(tile, pad, scale, excess):
    out = tile * scale + 2 * excess
    # a model whose output shrinks the upsampled window evenly
    if scale * (tile + 2 * pad) - out < 0:
        return
    (off,) = T.narrow_offsets((tile,), ((pad, pad),), scale, (out,))
    assert off == excess  # narrow_like's centred offset


def test_narrow_offsets_errors():
    with pytest.raises(T.TileError, match="odd"):
        T.narrow_offsets((8,), ((2, 2),), 1, (9,))
    with pytest.raises(T.TileError, match="do not cover"):
        T.narrow_offsets((8,), ((2, 2),), 1, (4,))
    # asymmetric pads: output of a 3-conv (shrink 1 each side) on window [o-1, o+8+3)
    assert T.narrow_offsets((8,), ((1, 3),), 1, (10,)) == (0,)


def test_batches_and_out_chunk():
    assert T.batches(range(5), 2) == [[0, 1], [2, 3], [4]]
    assert T.choose_out_chunk((32, 32)) == (32, 32)
    assert T.choose_out_chunk((24, 128, 36)) == (24, 32, 18)
    assert T.choose_out_chunk((37, 4, 44)) == (37, 4, 22)
