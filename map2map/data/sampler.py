"""Epoch orderings of field crops for single-process and DDP training.

The dataset holds `nsample` samples (one per field file) with `ncrop` crops
each; item `idx` is crop `idx % ncrop` of sample `idx // ncrop`, and crop
anchors lie in C order on a grid of shape `crop_grid`.  Neighbouring crops
share halo data and storage shards, so visiting them one after another lets
the reader reuse chunks it has just decoded.

The ordering logic lives in pure numpy functions (`epoch_indices` and
helpers); `DistFieldSampler` only picks its rank's row.  Every rank draws the
same global ordering from `(seed, epoch)`, so no communication is needed.

An *epoch item* (`EpochItem`) is an item index together with the epoch it
is drawn for.  DataLoader workers that live across epochs
(``persistent_workers``) hold copies of the dataset made when they started,
so an epoch set on the main process's dataset never reaches them; the index
the sampler yields does.  With ``epoch_items=True`` the sampler yields epoch
items, and `map2map.data.fields.FieldDataset` draws an item's augmentation
from the epoch it carries.

Guarantees, for every mode:

* every rank yields exactly `nsample * ncrop // world_size` items per epoch,
  and no item is yielded by two ranks within one epoch;
* the remaining `nsample * ncrop % world_size` items are dropped.  When
  shuffling, which items are dropped is redrawn every epoch, so over epochs
  all data is seen; with `shuffle=False` the last items are dropped.

Modes:

* `shuffle=False`: the plain order 0..N-1, cut into contiguous blocks, rank r
  getting block r (with `div_data` the blocks are whole samples first, see
  below; `locality` and `div_shuffle_dist` are ignored).
* `div_data=False`, `locality=False`: one uniform permutation of all items,
  cut into contiguous blocks (the original toolkit's behaviour).
* `div_data=False`, `locality=True`: samples in random order, each sample's
  crops walked along a random serpentine (see `serpentine_variants`), the
  concatenation cut into contiguous blocks, so each rank sees runs of
  neighbouring crops.
* `div_data=True`: the samples are shuffled and dealt to ranks as whole
  files, `nsample // world_size` each, so a rank reads only its own files.
  The `nsample % world_size` leftover samples are not dropped (with more
  ranks than files that would leave ranks idle): their crops, walked in the
  same within-sample order, are concatenated and cut into `world_size`
  contiguous blocks, one per rank, appended after the rank's own files.  So
  a leftover file is read by at most a few ranks, each reading a contiguous
  (with locality: spatially connected) part of it.  Within a rank, files
  come one at a time when `div_shuffle_dist=0`; with `div_shuffle_dist=D`
  the crops of the rank's k-th file get sort keys k + u with u uniform in
  [0, D), so crops mix only with files fewer than D positions away and
  about D files are open at any moment (the original `--div-shuffle-dist`).
  The offsets of one file are sorted before they are given to its crops in
  walking order, so each file's own crops keep their (serpentine) order.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from map2map.errors import UserError

_U64 = 2**64


class EpochItem(NamedTuple):
    """An item index with the epoch it is drawn for (see the module docstring)."""

    epoch: int
    index: int


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator every rank uses for one epoch: a pure function of (seed, epoch)."""
    return np.random.default_rng(np.random.SeedSequence([seed % _U64, epoch % _U64]))


def serpentine(shape: Sequence[int]) -> np.ndarray:
    """Boustrophedon walk of a grid: (prod(shape), ndim) coordinates, each step moving one cell.

    Built recursively: the walk over the last axes is repeated for every index
    of the first axis, reversed on odd indices, so the end of one pass is next
    to the start of the following one.
    """
    if len(shape) == 0:
        return np.zeros((1, 0), dtype=np.int64)
    inner = serpentine(shape[1:])
    blocks = []
    for i in range(shape[0]):
        walk = inner if i % 2 == 0 else inner[::-1]
        head = np.full((len(walk), 1), i, dtype=np.int64)
        blocks.append(np.concatenate([head, walk], axis=1))
    return np.concatenate(blocks, axis=0)


def serpentine_variants(crop_grid: Sequence[int]) -> np.ndarray:
    """All serpentine walks of `crop_grid` as flat crop indices, shape (ndim! * 2**ndim, ncrop).

    One variant per choice of axis order (which axis is walked fastest) and
    per set of flipped axes (which corner the walk starts from).  Drawing one
    at random per sample and epoch keeps consecutive crops neighbours while
    the order still changes across epochs.
    """
    shape = tuple(int(n) for n in crop_grid)
    ndim = len(shape)
    variants = []
    for axes in itertools.permutations(range(ndim)):
        walk = serpentine([shape[a] for a in axes])
        coords = np.empty_like(walk)
        coords[:, list(axes)] = walk
        for flips in itertools.product((False, True), repeat=ndim):
            flipped = coords.copy()
            for a, flip in enumerate(flips):
                if flip:
                    flipped[:, a] = shape[a] - 1 - flipped[:, a]
            flat = np.ravel_multi_index(tuple(flipped.T), shape) if ndim else np.zeros(1, np.int64)
            variants.append(flat)
    return np.stack(variants).astype(np.int64)


def crop_orders(
    nsample: int, crop_grid: Sequence[int], rng: np.random.Generator | None, locality: bool
) -> np.ndarray:
    """Order of the crops within each sample, shape (nsample, ncrop), values local crop indices.

    `rng=None` means no shuffling (C order); otherwise a random serpentine per
    sample with `locality`, else an independent uniform permutation per sample.
    """
    ncrop = math.prod(crop_grid)
    if rng is None:
        return np.tile(np.arange(ncrop, dtype=np.int64), (nsample, 1))
    if locality:
        variants = serpentine_variants(crop_grid)
        return variants[rng.integers(0, len(variants), size=nsample)]
    return rng.permuted(np.tile(np.arange(ncrop, dtype=np.int64), (nsample, 1)), axis=1)


def sample_items(
    nsample: int, crop_grid: Sequence[int], rng: np.random.Generator | None, locality: bool
) -> np.ndarray:
    """Global item indices, one row per sample, rows in (shuffled) sample order, crops in walking order."""
    ncrop = math.prod(crop_grid)
    order = np.arange(nsample, dtype=np.int64) if rng is None else rng.permutation(nsample)
    within = crop_orders(nsample, crop_grid, rng, locality)
    return order[:, None] * ncrop + within


def interleave_files(
    items: np.ndarray, file_pos: np.ndarray, dist: float, rng: np.random.Generator
) -> np.ndarray:
    """Mix the crops of files fewer than `dist` positions apart, keeping each file's own crop order.

    `items` is in file order with `file_pos` its non-decreasing file position.
    Each crop gets key pos + u, u ~ U[0, dist); the offsets of a file are
    sorted before being assigned so the file's crops stay in walking order.
    """
    if dist <= 0 or len(items) == 0:
        return items
    offsets = rng.uniform(0.0, dist, size=len(items))
    offsets = offsets[np.lexsort((offsets, file_pos))]
    return items[np.argsort(file_pos + offsets, kind="stable")]


def split_blocks(seq: np.ndarray, world_size: int) -> np.ndarray:
    """Cut `seq` into `world_size` equal contiguous blocks, dropping the tail.

    Returns shape (world_size, len(seq) // world_size); row r is rank r's block.
    """
    per = len(seq) // world_size
    return seq[: per * world_size].reshape(world_size, per)


def _file_positions(items: np.ndarray, ncrop: int, start: int) -> np.ndarray:
    """Position of each item's file in a sequence where each file forms one contiguous run."""
    if len(items) == 0:
        return np.zeros(0, dtype=np.float64)
    files = items // ncrop
    changes = np.concatenate([[0], np.cumsum(files[1:] != files[:-1])])
    return (start + changes).astype(np.float64)


def divide_files(
    rows: np.ndarray, world_size: int, dist: float, rng: np.random.Generator | None
) -> np.ndarray:
    """`div_data` split: whole sample rows per rank, leftover samples' crops shared in blocks.

    `rows` is (nsample, ncrop) in dealing order.  Rank r owns rows
    r*k..(r+1)*k-1 (k = nsample // world_size), followed by its contiguous
    block of the leftover rows' crops; then files are interleaved within
    `dist` (no interleaving when `rng` is None).
    """
    nsample, ncrop = rows.shape
    per = nsample // world_size
    owned = rows[: per * world_size].reshape(world_size, per * ncrop)
    shared = split_blocks(rows[per * world_size :].reshape(-1), world_size)
    out = []
    for rank in range(world_size):
        items = np.concatenate([owned[rank], shared[rank]])
        if rng is not None:
            own_pos = np.repeat(np.arange(per, dtype=np.float64), ncrop)
            pos = np.concatenate([own_pos, _file_positions(shared[rank], ncrop, per)])
            items = interleave_files(items, pos, dist, rng)
        out.append(items)
    return np.stack(out) if out else np.zeros((0, 0), dtype=np.int64)


def epoch_indices(
    nsample: int,
    crop_grid: Sequence[int],
    world_size: int,
    *,
    epoch: int = 0,
    seed: int = 0,
    shuffle: bool = True,
    div_data: bool = False,
    div_shuffle_dist: float = 0,
    locality: bool = True,
) -> np.ndarray:
    """Item indices of every rank for one epoch, shape (world_size, nsample * ncrop // world_size).

    Row r is what rank r yields, in order.  See the module docstring for the
    modes; the result depends only on the arguments, so ranks agree without
    communicating.
    """
    rng = epoch_rng(seed, epoch) if shuffle else None
    if div_data:
        rows = sample_items(nsample, crop_grid, rng, locality)
        return divide_files(rows, world_size, div_shuffle_dist, rng)
    total = nsample * math.prod(crop_grid)
    if rng is None:
        seq = np.arange(total, dtype=np.int64)
    elif locality:
        seq = sample_items(nsample, crop_grid, rng, locality).reshape(-1)
    else:
        seq = rng.permutation(total)
    return split_blocks(seq, world_size)


def worker_items(indices: np.ndarray, batch_size: int, worker: int, num_workers: int) -> np.ndarray:
    """The part of `indices` (one process's items of an epoch, in order) that DataLoader worker `worker`
    of `num_workers` is asked for, in order.

    A DataLoader cuts the order into batches of `batch_size` (the last may be
    short) and deals them to its workers in turn, batch k to worker
    ``k % num_workers`` (torch's default ``in_order=True``; the deal starts
    again at worker 0 every epoch, also with persistent workers).  With no
    workers (``num_workers`` 1 here) the process is asked for all of them.
    """
    if batch_size < 1 or num_workers < 1 or not 0 <= worker < num_workers:
        raise ValueError(f"need batch_size >= 1 and 0 <= worker < num_workers, got {batch_size}, "
                         f"{worker}, {num_workers}")
    batch = np.arange(len(indices)) // batch_size
    return np.asarray(indices)[batch % num_workers == worker]


def _dist_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Fill in rank / world size from torch.distributed when initialized, else 0 / 1."""
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialized else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialized else 0
    return rank, world_size


def _check_args(nsample: int, crop_grid: tuple[int, ...], dist: float, rank: int, world_size: int) -> None:
    """Reject arguments that would give an empty or ill-defined ordering."""
    if nsample < 1:
        raise UserError(f"number of samples must be >= 1, got {nsample}")
    if any(n < 1 for n in crop_grid):
        raise UserError(f"crop grid sizes must be >= 1, got {crop_grid}")
    if dist < 0:
        raise UserError(f"div_shuffle_dist must be >= 0, got {dist}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    if nsample * math.prod(crop_grid) < world_size:
        raise UserError(
            f"{nsample * math.prod(crop_grid)} items cannot be split among {world_size} ranks"
        )


class DistFieldSampler(Sampler[int]):
    """Sampler over (sample, crop) items: disjoint across DDP ranks, reshuffled every epoch.

    Keeps the original `--div-data` / `--div-shuffle-dist` meaning and, with
    `locality`, walks crops so consecutive ones are grid neighbours.  Call
    `set_epoch` before each epoch, as with `DistributedSampler`.  Each rank
    yields `nsample * ncrop // world_size` items; the remainder is dropped
    (different items each epoch when shuffling, the last ones otherwise).
    It yields plain indices, or with `epoch_items` the same indices as
    `EpochItem` (epoch, index) pairs (see the module docstring).
    """

    def __init__(
        self,
        nsample: int,
        crop_grid: Sequence[int] | int,
        *,
        shuffle: bool = True,
        div_data: bool = False,
        div_shuffle_dist: float = 0,
        locality: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        epoch_items: bool = False,
    ) -> None:
        grid = (int(crop_grid),) if isinstance(crop_grid, int) else tuple(int(n) for n in crop_grid)
        rank, world_size = _dist_rank_world(rank, world_size)
        _check_args(nsample, grid, div_shuffle_dist, rank, world_size)
        self.nsample, self.crop_grid, self.ncrop = nsample, grid, math.prod(grid)
        self.shuffle, self.div_data, self.locality = shuffle, div_data, locality
        self.div_shuffle_dist, self.seed = div_shuffle_dist, seed
        self.rank, self.world_size = rank, world_size
        self.epoch_items = epoch_items
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose ordering the next iteration yields."""
        self.epoch = epoch

    def indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's items for `epoch` (default: the one `set_epoch` chose), in yield order."""
        rows = epoch_indices(
            self.nsample, self.crop_grid, self.world_size, epoch=self.epoch if epoch is None else epoch,
            seed=self.seed,
            shuffle=self.shuffle, div_data=self.div_data,
            div_shuffle_dist=self.div_shuffle_dist, locality=self.locality,
        )
        return rows[self.rank]

    def __iter__(self) -> Iterator[int] | Iterator[EpochItem]:
        indices = self.indices().tolist()
        if self.epoch_items:
            return iter([EpochItem(self.epoch, i) for i in indices])
        return iter(indices)

    def __len__(self) -> int:
        return self.nsample * self.ncrop // self.world_size
