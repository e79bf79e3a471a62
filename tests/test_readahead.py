"""Read-ahead across items (`FieldDataset.follow`): which bytes are hinted for which keys, by which process.

The hints are recorded at the system call (``os.posix_fadvise(WILLNEED)``, by file and byte), also in
DataLoader workers (each appends to a file).  Oracles come from first principles: the items a process
is asked for by dealing the sampler's order out in batches, round-robin, to the loader's workers, and
the bytes of an item by listing the voxels of its windows and parsing each shard's index from the end
of its file.
"""

from __future__ import annotations

import functools
import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from conftest import save_fields
from map2map import convert
from map2map.data import shards
from map2map.data.batching import collate
from map2map.data.fields import FieldDataset
from map2map.data.sampler import DistFieldSampler, EpochItem, epoch_indices, worker_items
from map2map.errors import UserError

pytestmark = pytest.mark.skipif(not hasattr(os, "posix_fadvise") or not Path("/proc/self/fd").is_dir(),
                                reason="read-ahead hints need posix_fadvise; the recorder reads /proc/self/fd")

NSAMPLE, BOX, CROP, PAD, TPAD, CHUNK = 3, 12, 4, 1, 2, 2
FIELDS = {"x": 3, "y": 1}  # name -> channels; x is the input, y the target (same grid)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("ra")
    for i, (name, chans) in enumerate(FIELDS.items()):
        save_fields(tmp / "npy", name, (chans,) + (BOX,) * 3, NSAMPLE, seed=i + 3)
    path = str(tmp / "s.zarr")
    convert.run(convert.ConvertConfig(output=path, field=tuple(f"{n}={tmp}/npy/{n}_*.npy" for n in FIELDS),
                                      crop=[CROP], pad=PAD, chunk=[CHUNK], compressor="none", progress=False))
    return path


def dataset(store: str, **kw) -> FieldDataset:
    args = dict(store=store, in_fields=["x"], tgt_fields=["y"], crop=CROP, in_pad=PAD, tgt_pad=TPAD,
                cache_bytes=0)
    return FieldDataset(**(args | kw))


def window(anchor, pad) -> tuple[tuple[int, int], ...]:
    return tuple((a - pad, a + CROP + pad) for a in anchor)


@functools.lru_cache(maxsize=None)
def part_bytes(store: str, name: str, sample: int, win: tuple) -> frozenset[tuple[str, int]]:
    """(shard file, byte) of every written inner chunk of field `name` holding a voxel of the periodic
    window `win` of `sample`, by listing the voxels and parsing the shard index."""
    arr = zarr.open_group(store, mode="r")[name]
    layout = shards.layout_of(arr)
    chunk, shard, per_shard = layout.chunk[2:], layout.shard[2:], layout.per_shard[2:]
    per_axis = [sorted({(v % n) // c for v in range(lo, hi)}) for (lo, hi), n, c in zip(win, arr.shape[2:], chunk)]
    found = set()
    for cidx in itertools.product(*per_axis):
        file = layout.file((sample, 0) + tuple(i * c // s for i, c, s in zip(cidx, chunk, shard)))
        if not file.exists():
            continue
        raw = file.read_bytes()
        index = np.frombuffer(raw[-layout.index_bytes:-4], dtype="<u8").reshape(layout.per_shard + (2,))
        offset, nbytes = (int(v) for v in index[(0, 0) + tuple(i % p for i, p in zip(cidx, per_shard))])
        if offset != 2**64 - 1:
            found.update((str(file), b) for b in range(offset, offset + nbytes))
    return frozenset(found)


def item_bytes(store: str, ds: FieldDataset, idx: int, epoch: int) -> list[set[tuple[str, int]]]:
    """The bytes of each part (input field, then target field) of item `idx`: its anchor from the crop
    lattice (no shift in these tests), its windows from the pads."""
    sample, crop = divmod(idx, ds.ncrop)
    anchor = np.unravel_index(crop, ds.crop_counts)
    anchor = [int(i) * CROP for i in anchor]
    return [part_bytes(store, "x", sample, window(anchor, PAD)), part_bytes(store, "y", sample, window(anchor, TPAD))]


def dealt(order: np.ndarray, batch: int, workers: int) -> list[list[int]]:
    """Oracle: the items each loader worker is asked for (batches dealt in turn; no workers: one list)."""
    batches = [list(order[i:i + batch]) for i in range(0, len(order), batch)]
    return [[int(i) for b in batches[w::max(workers, 1)] for i in b] for w in range(max(workers, 1))]


class Recorder:
    """Records every ``posix_fadvise(WILLNEED)`` as a line "worker file offset length" appended to `log`
    (worker -1: no DataLoader worker), from this process and the workers it forks."""

    def __init__(self, monkeypatch, log: Path) -> None:
        self.log = log
        real = os.posix_fadvise

        def fadvise(fd, offset, length, advice):
            if advice == os.POSIX_FADV_WILLNEED:
                info = torch.utils.data.get_worker_info()
                with open(log, "a") as f:
                    f.write(f"{-1 if info is None else info.id} {os.readlink(f'/proc/self/fd/{fd}')} "
                            f"{offset} {length}\n")
            real(fd, offset, length, advice)

        monkeypatch.setattr(os, "posix_fadvise", fadvise)

    def stream(self, worker: int | None = None) -> list[tuple[str, int]]:
        """Every hinted (file, byte), in order (of one worker if given)."""
        out = []
        if not self.log.exists():
            return out
        for line in self.log.read_text().splitlines():
            w, file, offset, length = line.split()
            if worker is None or int(w) == worker:
                out += [(file, b) for b in range(int(offset), int(offset) + int(length))]
        return out

    def total(self) -> int:
        """Bytes asked for so far (all processes)."""
        return sum(int(line.split()[3]) for line in self.log.read_text().splitlines()) if self.log.exists() else 0

    def clear(self) -> None:
        self.log.unlink(missing_ok=True)


def assert_items_in_order(stream: list[tuple[str, int]], parts: list[set]) -> None:
    """`stream` is the bytes of `parts` one after another, each part's bytes once (in any order within it)."""
    assert len(stream) == sum(len(p) for p in parts)
    at = 0
    for part in parts:
        assert set(stream[at:at + len(part)]) == part and len(set(stream[at:at + len(part)])) == len(part)
        at += len(part)


CASES = [  # world_size, rank, div_data, batch_size, workers, epoch_items
    (1, 0, False, 2, 2, True),
    (1, 0, False, 3, 0, False),
    (2, 1, True, 1, 0, True),
    (2, 0, True, 2, 2, True),
    (3, 2, False, 1, 2, True),
]


@pytest.mark.parametrize("world,rank,div_data,batch,workers,epoch_items", CASES)
def test_each_process_hints_its_own_items_once_in_order(store, tmp_path, monkeypatch, world, rank, div_data,
                                                        batch, workers, epoch_items):
    """With a budget larger than the epoch, every process (DDP rank, loader worker) hints, at its first
    item, the bytes of exactly the items it is asked for, each item once, in the order it is asked for
    them, and nothing after its last item."""
    rec = Recorder(monkeypatch, tmp_path / "log")
    ds = dataset(store, readahead=2**40)
    sampler = DistFieldSampler(ds.nsample, ds.crop_counts, div_data=div_data, div_shuffle_dist=1.5, seed=5,
                               rank=rank, world_size=world, epoch_items=epoch_items)
    sampler.set_epoch(1)
    ds.set_epoch(1)
    ds.follow(sampler, batch)
    loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=collate,
                        multiprocessing_context="fork" if workers else None)
    got = [int(i) for b in loader for i in b["index"]]
    order = epoch_indices(NSAMPLE, ds.crop_counts, world, epoch=1, seed=5, div_data=div_data,
                          div_shuffle_dist=1.5)[rank]
    assert got == list(order)
    for w, items in enumerate(dealt(order, batch, workers)):
        parts = [p for i in items for p in item_bytes(store, ds, i, 1)]
        assert_items_in_order(rec.stream(w if workers else -1), parts)


@pytest.mark.parametrize("budget", [700, 5000, "item", 0])
def test_budget_and_high_water_mark(store, tmp_path, monkeypatch, budget):
    """Item by item (no workers): after reading item k the bytes hinted ahead of it are exactly as many
    as the budget allows (all that is left of the epoch near its end), every item's bytes are hinted
    once and in order, cut anywhere, even inside one field's window; 0 hints each item's own windows only,
    as it is read."""
    rec = Recorder(monkeypatch, tmp_path / "log")
    ds = dataset(store, readahead=ds_budget(store, budget))
    sampler = DistFieldSampler(ds.nsample, ds.crop_counts, seed=2, epoch_items=True)
    ds.follow(sampler, 4)
    order = [int(i) for i in sampler.indices()]
    parts = [item_bytes(store, ds, i, 0) for i in order]
    sizes = [sum(len(p) for p in item) for item in parts]
    for k, idx in enumerate(order):
        ds[EpochItem(0, idx)]
        ahead = rec.total() - sum(sizes[:k + 1])  # every item up to k is hinted whole
        assert ahead == min(ds.readahead, sum(sizes[k + 1:]))
    assert_items_in_order(rec.stream(), [p for item in parts for p in item])


def ds_budget(store: str, budget) -> int:
    return dataset(store).item_nbytes if budget == "item" else budget


def test_default_budget_is_two_items_and_bad_budgets_are_named(store):
    ds = dataset(store)
    assert ds.item_nbytes == 4 * (3 * (CROP + 2 * PAD) ** 3 + (CROP + 2 * TPAD) ** 3)
    assert ds.readahead == 2 * ds.item_nbytes
    for bad in (-1, 1.5, True):
        with pytest.raises(UserError, match="readahead"):
            dataset(store, readahead=bad)


def test_items_outside_the_order_and_restarts(store, tmp_path, monkeypatch):
    """An item not in the followed order hints its own windows only; asking again from the start of the
    epoch hints the epoch again from there."""
    rec = Recorder(monkeypatch, tmp_path / "log")
    ds = dataset(store, readahead=2**40)
    mine = DistFieldSampler(ds.nsample, ds.crop_counts, seed=1, rank=0, world_size=2, epoch_items=True)
    other = DistFieldSampler(ds.nsample, ds.crop_counts, seed=1, rank=1, world_size=2, epoch_items=True)
    ds.follow(mine, 1)
    stranger = int(other.indices()[3])
    ds[EpochItem(0, stranger)]
    assert_items_in_order(rec.stream(), item_bytes(store, ds, stranger, 0))
    order = [int(i) for i in mine.indices()]
    for _ in range(2):
        rec.clear()
        ds[EpochItem(0, order[0])]
        assert_items_in_order(rec.stream(), [p for i in order for p in item_bytes(store, ds, i, 0)])


def test_items_are_bitwise_the_same_with_and_without_read_ahead(store):
    """Augmentation, shifts and noise on: read-ahead (0 workers and 2 workers) changes no bit of any item."""
    kw = dict(augment=True, aug_shift=3, aug_add=0.1, aug_mul=0.2, seed=4)
    off = dataset(store, readahead=0, **kw)
    on = dataset(store, readahead=1000, cache_bytes=2**14, **kw)
    sampler = DistFieldSampler(on.nsample, on.crop_counts, seed=9, epoch_items=True)
    sampler.set_epoch(2)
    on.follow(sampler, 2)
    keys = list(sampler)
    want = [off[k] for k in keys]
    for got in ([on[k] for k in keys],
                [item for b in DataLoader(on, batch_size=2, sampler=sampler, num_workers=2, collate_fn=collate,
                                          multiprocessing_context="fork")
                 for item in unbatch(b)]):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            for key in ("input", "target"):
                assert g[key].dtype == w[key].dtype and torch.equal(g[key].view(torch.int32),
                                                                    w[key].view(torch.int32))


def unbatch(batch: dict) -> list[dict]:
    return [{"input": x, "target": y} for x, y in zip(batch["input"], batch["target"])]


# --------------------------------------------------------------------------- the pure helpers


@given(n=st.integers(0, 40), batch=st.integers(1, 7), workers=st.integers(1, 5))
def test_worker_items_deal_batches_in_turn(n, batch, workers):
    order = np.random.default_rng(n).permutation(n)
    parts = [worker_items(order, batch, w, workers) for w in range(workers)]
    assert [list(p) for p in parts] == dealt(order, batch, workers)
    assert sorted(np.concatenate(parts).tolist()) == sorted(order.tolist())


@given(ranges=st.lists(st.builds(shards.ByteRange, st.sampled_from([(0,), (1,)]), st.integers(0, 64),
                                 st.integers(1, 16)), max_size=8), skip=st.integers(-3, 150))
def test_skip_ranges_drops_the_leading_bytes(ranges, skip):
    flat = lambda rs: [(r.shard, b) for r in rs for b in range(r.offset, r.offset + r.nbytes)]  # noqa: E731
    kept = shards.skip_ranges(ranges, skip)
    assert flat(kept) == flat(ranges)[max(skip, 0):] and all(r.nbytes > 0 for r in kept)


@pytest.mark.parametrize("mib", [None, 0.5, 0])
def test_train_loaders_follow_their_sampler_with_the_budget_of_readahead(store, mib):
    """`m2m train --readahead MiB` reaches the data set (None: two items), and each loader's data set reads
    ahead in its own sampler's order with the training batch size."""
    from map2map import train
    from map2map.utils.distenv import DistEnv

    cfg = train.TrainConfig(model="VNet", lr=1e-3, train_data=store, in_fields=("x",), tgt_fields=("y",),
                            crop=(CROP,), tgt_pad=(TPAD,), batch_size=2, loader_workers=0, readahead=mib)
    train.check_config(cfg)
    ds = train.make_dataset(cfg, "train", PAD, seed=0)
    assert ds.readahead == (2 * ds.item_nbytes if mib is None else int(mib * 2**20))
    _, sampler = train.make_loader(ds, cfg, DistEnv(), torch.device("cpu"), training=True)
    assert ds._order is sampler and ds._batch_size == 2


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_train_refuses_a_readahead_that_is_no_size(bad):
    from map2map import train

    with pytest.raises(UserError, match="--readahead must be MiB >= 0"):
        train.check_config(train.TrainConfig(model="VNet", lr=1e-3, readahead=bad))
