"""`--crop auto`: the pure tile choice (`map2map.tiles.auto_tile`) against brute force, and the plan that uses
it (`map2map.infer.planning.make_plan`) with real models and a measured memory footprint."""

from __future__ import annotations

import itertools
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from map2map import tiles as T


def brute_force(box, step, halo, max_window):
    """Every valid tile, the least work first, then the most kept voxels, then the largest."""
    sides = [range(s, n + 1, s) for n, s in zip(box, step)]
    fitting = [t for t in itertools.product(*sides) if math.prod(v + h for v, h in zip(t, halo)) <= max_window]
    if not fitting:
        return None
    return min(fitting, key=lambda t: (T.tile_work(box, t, halo), -math.prod(t), tuple(-v for v in t)))


@st.composite
def problems(draw):
    ndim = draw(st.integers(1, 3))
    box = tuple(draw(st.integers(1, 40 if ndim < 3 else 20)) for _ in range(ndim))
    step = tuple(draw(st.integers(1, 8)) for _ in range(ndim))
    halo = tuple(draw(st.integers(0, 12)) for _ in range(ndim))
    full = math.prod(n + h for n, h in zip(box, halo))
    max_window = draw(st.integers(0, full + 5))
    return box, step, halo, max_window


@settings(max_examples=300, deadline=None)
@given(problems())
def test_auto_tile_matches_brute_force(args):
    box, step, halo, max_window = args
    got = T.auto_tile(box, step, halo, max_window)
    assert got == brute_force(box, step, halo, max_window)
    if got is not None:
        assert all(t % s == 0 and 0 < t <= n for t, s, n in zip(got, step, box))
        assert math.prod(t + h for t, h in zip(got, halo)) <= max_window


@given(st.integers(1, 300), st.integers(1, 8), st.integers(0, 100))
def test_a_budget_for_the_whole_box_takes_the_whole_box(n, step, halo):
    if n % step == 0:
        assert T.auto_tile((n, n), (step, step), (halo, halo), (n + halo) ** 2) == (n, n)


def test_least_work_rather_than_the_largest_side():
    # 130 voxels, stride 4, pads 48 + 48: one 128 tile and a clipped one compute 2 x 224 voxels, two 68 tiles 2 x 164
    assert T.auto_tile((130,), (4,), (96,), 224) == (68,)
    assert T.tile_work((130,), (68,), (96,)) < T.tile_work((130,), (128,), (96,))
    # a large cubic box: the tile divides it evenly when that costs nothing
    assert T.auto_tile((512,) * 3, (4,) * 3, (96,) * 3, 352 ** 3) == (256,) * 3
    # a smaller budget: 3 tiles along two axes (172, not the largest 204 that fits) and 2 along the third
    assert T.auto_tile((512,) * 3, (4,) * 3, (96,) * 3, 300 ** 3) == (256, 172, 172)
    assert T.auto_tile((8,), (16,), (0,), 10 ** 6) is None  # no multiple of the step fits the box
    assert T.auto_tile((64,), (4,), (40,), 40 + 3) is None  # the smallest window is over budget


# --- the plan: --crop auto with real models, budgets in GiB and the measured footprint ---------------------

import pytest  # noqa: E402
import torch  # noqa: E402

from map2map.errors import UserError  # noqa: E402
from map2map.infer import memory  # noqa: E402
from map2map.infer.inputs import Inputs  # noqa: E402
from map2map.infer.planning import make_plan  # noqa: E402
from map2map.infer.specs import InferConfig  # noqa: E402
from map2map.models.srsgan import G  # noqa: E402
from map2map.models.vnet import VNet  # noqa: E402


def _inputs(box, in_chans=(1,)):
    return Inputs([], [], list(in_chans), [], tuple(box), 1, None, None, [], "test", None)


def _opts(**kw):
    base = dict(load_state="unused", crop="auto", in_pad="auto", scale_factor=1, device="cpu", workers=1)
    base.update(kw)
    return InferConfig(**base)


def _real_need(model, in_chan, window, scale=1):
    """What a CPU forward pass of `window` holds at its peak, counted on a real pass, plus its input."""
    peak, _ = memory.probe_peak(model, in_chan, window, torch.device("cpu"))
    return peak + 4 * in_chan * math.prod(window)


@pytest.mark.parametrize("gib", [0.004, 0.02])
def test_auto_crop_fits_the_budget_and_shards_follow_the_tile(gib):
    torch.manual_seed(0)
    model = VNet(1, 1, width=4, dim=3).eval()
    box = (64, 48, 40)
    pl = make_plan(model, _opts(tile_memory=gib), _inputs(box))
    tile, window = pl.plan.tile, pl.plan.window_shape
    T.check_tile(tile, box, 4, 1, pl.out_shard)
    assert pl.out_shard == tile  # the shards follow the tile: every tile owns whole shards
    for t in pl.plan:
        assert T.whole_shards(pl.plan.out_region(t), pl.out_shard, pl.plan.out_box)
    assert tile != box  # the budget is what limits the tile here
    assert _real_need(model, 1, window) <= gib * memory.GIB
    factor = T.tile_work(box, tile, [lo + hi for lo, hi in pl.plan.pad]) / math.prod(box)
    assert pl.note.startswith(f"--crop auto: tile {list(tile)} (window {list(window)}), computing {factor:.2f}x")
    assert f"of {gib:.2f} GiB (--tile-memory {gib:g} GiB" in pl.note


def test_auto_crop_with_super_resolution_and_given_shards():
    model = G(2, 2, scale_factor=2, chan_base=8, chan_min=4, chan_max=8, dim=2).eval()
    box = (48, 36)
    pl = make_plan(model, _opts(scale_factor=2, out_shard=(24, 24), tile_memory=1e-4), _inputs(box, (2,)))
    tile = pl.plan.tile
    assert all((t * 2) % 24 == 0 for t in tile) and pl.out_shard == (24, 24)
    for t in pl.plan:
        assert T.whole_shards(pl.plan.out_region(t), pl.out_shard, pl.plan.out_box)
    assert _real_need(model, 2, pl.plan.window_shape) <= 1e-4 * memory.GIB
    # a budget for everything: the whole box in one tile
    assert make_plan(model, _opts(scale_factor=2, tile_memory=1.0), _inputs(box, (2,))).plan.tile == box


def test_auto_crop_errors():
    model = VNet(1, 1, width=4, dim=3).eval()
    with pytest.raises(UserError, match=r"--crop auto: the smallest tile \[4, 4, 4\] needs about .* GiB per "
                                        r"forward pass, more than the budget of 0.00 GiB \(--tile-memory 1e-06 GiB"):
        make_plan(model, _opts(tile_memory=1e-6), _inputs((16, 16, 16)))
    with pytest.raises(UserError, match=r"--crop auto: no tile fits the box \[16, 16, 2\]"):
        make_plan(model, _opts(tile_memory=1.0), _inputs((16, 16, 2)))
    with pytest.raises(UserError, match=r"--tile-memory -1: expected a positive number of GiB"):
        make_plan(model, _opts(tile_memory=-1), _inputs((16, 16, 16)))
    with pytest.raises(UserError, match=r"--crop 'big': expected 'auto' or integers"):
        make_plan(model, _opts(crop="big"), _inputs((16, 16, 16)))


def test_default_budget_is_a_share_of_the_available_memory():
    model = VNet(1, 1, width=4, dim=3).eval()
    pl = make_plan(model, _opts(), _inputs((32, 32, 32)))
    assert pl.plan.tile == (32, 32, 32)  # a small box fits any machine's memory
    assert f"{memory.CPU_SHARE:g} of the" in pl.note and "GiB of memory available" in pl.note


def test_the_cpu_count_equals_a_real_pass_and_bounds_smaller_windows():
    """The meta count at a window is the real pass's count there; per voxel it grows with the window."""
    model = VNet(1, 1, width=4, dim=3).eval()
    from map2map.models.stride import meta_copy

    meta = meta_copy(model)
    real = memory.probe_peak(model, 1, (48, 44, 52), torch.device("cpu"))
    assert memory.probe_peak(meta, 1, (48, 44, 52), torch.device("meta")) == real
    small = memory.probe_peak(meta, 1, (44, 44, 44), torch.device("meta"))[0] / 44 ** 3
    large = memory.probe_peak(meta, 1, (88, 88, 88), torch.device("meta"))[0] / 88 ** 3
    assert small < large
