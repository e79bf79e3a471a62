"""Properties of the epoch orderings in `map2map.data.sampler`, checked against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from map2map.data.sampler import (
    DistFieldSampler,
    epoch_indices,
    serpentine_variants,
)
from map2map.errors import UserError

from strategies import crop_grids, sampler_configs


def run(cfg: dict, **override) -> np.ndarray:
    """`epoch_indices` for a config dict, with some arguments replaced."""
    c = {**cfg, **override}
    return epoch_indices(c.pop("nsample"), c.pop("crop_grid"), c.pop("world_size"), **c)


def total(cfg: dict) -> int:
    return cfg["nsample"] * math.prod(cfg["crop_grid"])


def manhattan(a: int, b: int, grid: tuple[int, ...]) -> int:
    """Grid distance between two local crop indices."""
    return int(sum(abs(x - y) for x, y in zip(np.unravel_index(a, grid), np.unravel_index(b, grid))))


def same_sample_steps(seq: np.ndarray, ncrop: int) -> list[tuple[int, int]]:
    """(crop, next crop) pairs of consecutive items of the same sample in `seq`'s per-sample subsequences."""
    pairs = []
    for s in np.unique(seq // ncrop):
        crops = seq[seq // ncrop == s] % ncrop
        pairs += list(zip(crops[:-1].tolist(), crops[1:].tolist()))
    return pairs


def max_open_files(seq: np.ndarray, ncrop: int) -> int:
    """Largest number of files started but not finished at any step of `seq`."""
    files = seq // ncrop
    first = {f: i for i, f in reversed(list(enumerate(files.tolist())))}
    last = {f: i for i, f in enumerate(files.tolist())}
    return max((sum(first[f] <= t <= last[f] for f in first) for t in range(len(seq))), default=0)


@given(sampler_configs())
def test_ranks_partition_items(cfg: dict) -> None:
    rows = run(cfg)
    per = total(cfg) // cfg["world_size"]
    assert rows.shape == (cfg["world_size"], per)
    flat = rows.reshape(-1)
    assert len(np.unique(flat)) == len(flat) == cfg["world_size"] * per
    assert flat.min(initial=0) >= 0 and flat.max(initial=0) < max(total(cfg), 1)


@given(sampler_configs())
def test_sampler_yields_its_row(cfg: dict) -> None:
    if total(cfg) < cfg["world_size"]:
        return
    rows = run(cfg)
    args = {k: v for k, v in cfg.items() if k not in ("nsample", "crop_grid", "world_size", "epoch")}
    for rank in range(cfg["world_size"]):
        s = DistFieldSampler(
            cfg["nsample"], cfg["crop_grid"], rank=rank, world_size=cfg["world_size"], **args
        )
        s.set_epoch(cfg["epoch"])
        out = list(s)
        assert out == rows[rank].tolist()
        assert len(out) == len(s) == total(cfg) // cfg["world_size"]
        assert all(isinstance(i, int) for i in out)


@given(sampler_configs())
def test_deterministic_for_seed_and_epoch(cfg: dict) -> None:
    np.testing.assert_array_equal(run(cfg), run(cfg))


@given(sampler_configs(shuffle=True))
def test_reshuffles_across_epochs(cfg: dict) -> None:
    if cfg["world_size"] * (total(cfg) // cfg["world_size"]) < 2:
        return
    orders = {run(cfg, epoch=e).tobytes() for e in range(40)}
    assert len(orders) > 1


@given(sampler_configs(shuffle=True), st.integers(0, 2**32))
def test_seed_changes_order_for_large_sizes(cfg: dict, other: int) -> None:
    if other == cfg["seed"] or total(cfg) < 24:
        return
    seeds = [cfg["seed"], other] + [other + k for k in range(1, 6)]
    assert len({run(cfg, seed=s).tobytes() for s in seeds}) > 1


@given(sampler_configs(div_data=True))
def test_div_data_gives_whole_files_to_ranks(cfg: dict) -> None:
    rows = run(cfg)
    ncrop, world = math.prod(cfg["crop_grid"]), cfg["world_size"]
    owners: dict[int, set[int]] = {}
    for rank, row in enumerate(rows):
        for s in (row // ncrop).tolist():
            owners.setdefault(s, set()).add(rank)
    shared = [s for s, r in owners.items() if len(r) > 1]
    assert len(shared) <= cfg["nsample"] % world
    for rank, row in enumerate(rows):
        whole = [s for s in np.unique(row // ncrop) if np.sum(row // ncrop == s) == ncrop]
        assert len(whole) >= cfg["nsample"] // world
    if cfg["nsample"] % world == 0:
        assert not shared


@given(sampler_configs(div_data=True), st.sampled_from([0, 0.5, 1]))
def test_div_data_visits_files_one_at_a_time(cfg: dict, dist: float) -> None:
    for row in run(cfg, div_shuffle_dist=dist):
        files = row // math.prod(cfg["crop_grid"])
        changes = int(np.sum(files[1:] != files[:-1]))
        assert changes <= max(len(np.unique(files)) - 1, 0)


@given(sampler_configs(div_data=True, shuffle=True))
def test_div_shuffle_dist_bounds_open_files(cfg: dict) -> None:
    bound = max(1, math.ceil(cfg["div_shuffle_dist"]))
    for row in run(cfg):
        assert max_open_files(row, math.prod(cfg["crop_grid"])) <= bound


def test_div_shuffle_dist_mixes_files() -> None:
    cfg = dict(nsample=8, crop_grid=(4, 4), world_size=1, seed=3, div_data=True, locality=False)
    row = run(cfg, div_shuffle_dist=4)[0]
    files = row // 16
    assert np.sum(files[1:] != files[:-1]) > 7
    assert max_open_files(row, 16) > 1


@given(sampler_configs(shuffle=True))
def test_locality_steps_are_grid_neighbours(cfg: dict) -> None:
    cfg["locality"] = True
    grid, ncrop = cfg["crop_grid"], math.prod(cfg["crop_grid"])
    for row in run(cfg):
        assert all(manhattan(a, b, grid) == 1 for a, b in same_sample_steps(row, ncrop))


def mean_step(cfg: dict) -> float:
    grid, ncrop = cfg["crop_grid"], math.prod(cfg["crop_grid"])
    steps = [manhattan(a, b, grid) for row in run(cfg) for a, b in same_sample_steps(row, ncrop)]
    return float(np.mean(steps))


@pytest.mark.parametrize("div_data", [False, True])
def test_locality_beats_uniform_shuffle(div_data: bool) -> None:
    cfg = dict(nsample=3, crop_grid=(5, 5, 5), world_size=2, epoch=7, seed=11, div_data=div_data)
    assert mean_step({**cfg, "locality": True}) == 1.0
    assert mean_step({**cfg, "locality": False}) > 3.0


@given(crop_grids)
def test_serpentines_are_hamiltonian_paths(grid: tuple[int, ...]) -> None:
    ncrop = math.prod(grid)
    variants = serpentine_variants(grid)
    assert variants.shape == (math.factorial(len(grid)) * 2 ** len(grid), ncrop)
    for walk in variants:
        assert sorted(walk.tolist()) == list(range(ncrop))
        assert all(manhattan(a, b, grid) == 1 for a, b in zip(walk[:-1], walk[1:]))


@given(sampler_configs(shuffle=False))
def test_no_shuffle_is_plain_order_in_blocks(cfg: dict) -> None:
    world, n = cfg["world_size"], total(cfg)
    rows = run(cfg)
    ncrop, per = math.prod(cfg["crop_grid"]), cfg["nsample"] // world
    if not cfg["div_data"] or cfg["nsample"] % world == 0:
        np.testing.assert_array_equal(rows.reshape(-1), np.arange(world * (n // world)))
    else:
        start, share = world * per * ncrop, (cfg["nsample"] % world) * ncrop // world
        for rank, row in enumerate(rows):
            owned = np.arange(rank * per * ncrop, (rank + 1) * per * ncrop)
            leftover = np.arange(start + rank * share, start + (rank + 1) * share)
            np.testing.assert_array_equal(row, np.concatenate([owned, leftover]))
    assert run(cfg, epoch=cfg["epoch"] + 1).tobytes() == rows.tobytes()


@pytest.mark.parametrize("div_data", [False, True])
def test_dropped_items_change_across_epochs(div_data: bool) -> None:
    cfg = dict(nsample=3, crop_grid=(2,), world_size=4, seed=5, div_data=div_data)
    dropped = set()
    for e in range(20):
        kept = set(run(cfg, epoch=e).reshape(-1).tolist())
        assert len(kept) == 4
        dropped |= set(range(6)) - kept
    assert len(dropped) > 2


def test_defaults_without_distributed() -> None:
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    s = DistFieldSampler(3, (2, 3))
    assert (s.rank, s.world_size) == (0, 1)
    assert sorted(s) == list(range(18)) and len(s) == 18


def test_set_epoch_changes_order_reproducibly() -> None:
    a, b = DistFieldSampler(4, (3, 3), seed=1), DistFieldSampler(4, (3, 3), seed=1)
    first = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != first


def test_int_crop_grid_accepted() -> None:
    assert sorted(DistFieldSampler(2, 4, shuffle=False)) == list(range(8))


class _Range(torch.utils.data.Dataset):
    """Dataset whose item i is i."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def test_works_as_dataloader_sampler() -> None:
    s = DistFieldSampler(5, (2, 2), div_data=True, div_shuffle_dist=2, rank=1, world_size=3, seed=2)
    loader = torch.utils.data.DataLoader(_Range(20), batch_size=3, sampler=s)
    got = torch.cat(list(loader)).tolist()
    assert got == list(s) and len(got) == len(s) == 6


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(nsample=1, crop_grid=(1,), world_size=2, rank=0),
        dict(nsample=0, crop_grid=(2,), world_size=1, rank=0),
        dict(nsample=2, crop_grid=(0, 2), world_size=1, rank=0),
        dict(nsample=2, crop_grid=(2,), world_size=2, rank=2),
        dict(nsample=2, crop_grid=(2,), world_size=1, rank=0, div_shuffle_dist=-1),
    ],
)
def test_bad_arguments_raise_user_error(kwargs: dict) -> None:
    with pytest.raises(UserError):
        DistFieldSampler(kwargs.pop("nsample"), kwargs.pop("crop_grid"), **kwargs)
