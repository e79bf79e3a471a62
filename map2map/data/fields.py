"""`FieldDataset`: crops of input and target fields with periodic halos, normalised and augmented.

Item ``idx`` is crop ``idx % ncrop`` of sample ``idx // ncrop``; crop anchors
run in C order over the start/stop/step lattice (the original toolkit's
order).  The input is the window ``[anchor - in_pad_lo, anchor + crop +
in_pad_hi)`` of every input field, read with periodic wrap and concatenated
along channels; the target is the same region on the target grid
(``scale_factor`` times finer) with ``tgt_pad``.  Then, in this order: norms
per field, a random element of the cube's symmetry group (the same for input
and target; vector fields turn their components with space), and additive /
multiplicative noise (the same draw for input and target).  Reading,
norms and channel stacking are `map2map.data.fieldio.FieldStack`, the layer
the inference worker reads through too.

Randomness is drawn from ``(seed, epoch, idx)``, so an item is the same
whichever worker or rank reads it, and a restarted run sees the same
augmentations.  The epoch is the one an item key carries (an `EpochItem`
from ``DistFieldSampler(..., epoch_items=True)``, which reaches DataLoader
workers that live across epochs), else the one `set_epoch` chose.
``aug_shift`` moves the anchor of one read only; the anchors themselves
never change (the original moved them in place, so crops drifted further
every epoch).

Read-ahead across items.  An item's *windows* (`item_windows`) are the input
and target windows its key reads.  Once the dataset knows the order its
process is asked for items in (`follow`: the sampler and the loader's batch
size), each item it reads first asks the kernel to read its own windows (if
not asked for already), then the windows of the items this process is asked
for next, in order, up to ``readahead`` bytes asked for ahead of the current
item (default `READAHEAD_ITEMS` items' stored bytes; 0: off).  A high-water
mark keeps every byte of an item's windows from being asked for twice (an
item the budget cuts short goes on from where it stopped, ahead or when it
is read), and nothing past the end of the process's part of the epoch is
hinted.  In a DataLoader worker the
items are the worker's own: the loader deals batches to its workers in turn
(`map2map.data.sampler.worker_items`).  Hints change which bytes the disk
reads when, never what an item holds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from map2map import geometry, store
from map2map.data import augment
from map2map.data.batching import ItemBuffers
from map2map.data.fieldio import FieldStack, apply_norm, lookup_norms, undo_norms
from map2map.data.sampler import EpochItem, worker_items
from map2map.data.windows import WINDOW_HINT_BYTES, FieldSource, NpyField, ReadStats, ZarrField, hint_window
from map2map.errors import UserError
from map2map.npyfile import glob_paired

__all__ = ["FieldDataset", "apply_norm", "undo_norms"]  # the norm helpers live in map2map.data.fieldio



READAHEAD_ITEMS = 2  # default read-ahead budget, in items' stored bytes


class ItemOrder(Protocol):
    """Which items a process is asked for in an epoch, in order (`map2map.data.sampler.DistFieldSampler`)."""

    def indices(self, epoch: int) -> np.ndarray: ...


class ItemWindows(NamedTuple):
    """What an item reads: `input` window of `sample` of the input fields, `target` window (None
    without targets) of the target fields."""

    sample: int
    input: tuple[geometry.Interval, ...]
    target: tuple[geometry.Interval, ...] | None


@dataclass
class ReadAhead:
    """One process's read-ahead through one epoch (see the module docstring).

    `items` are the item indices the process is asked for, in order, and
    `position` maps an item index to its place in `items` (-1: not this
    process's).  `current` is the place of the item being read.  The
    high-water mark is the first byte not hinted yet: byte `done` of part
    `part` of the item at place `next` (an item's *parts* are its windows of
    each input field, then of each target field; every place before `next` is
    hinted whole).  `ahead` holds the bytes asked for at each place after
    `current`, the read-ahead the budget bounds.
    """

    pid: int
    epoch: int
    items: np.ndarray
    position: np.ndarray
    current: int = -1
    next: int = 0
    part: int = 0
    done: int = 0
    ahead: dict[int, int] = field(default_factory=dict)

    def restart(self) -> None:
        """Forget what was hinted (the process is asked for an earlier item again)."""
        self.current, self.next, self.part, self.done = -1, 0, 0, 0
        self.ahead.clear()

    def advance(self, place: int) -> None:
        """Move the high-water mark to the start of the item at `place`."""
        self.next, self.part, self.done = place, 0, 0


def _open_store_fields(path: str, names: Sequence[str], cache_bytes: int,
                       storage_options: dict | None = None, copy_threads: int | None = None) -> list[ZarrField]:
    st = store.open_store(path, storage_options=storage_options)
    for n in names:
        st.field(n)  # one-line error listing the fields the store has
    return [ZarrField(st.path, n, st.nsample, cache_bytes, storage_options=storage_options, copy_threads=copy_threads)
            for n in names]


class FieldDataset(Dataset):
    """Crops of input and target fields from a store (or .npy globs); see the module docstring.

    `store` may be a URL (`map2map.storage`) opened with `storage_options`
    (fsspec keyword arguments), which the readers carry into DataLoader
    workers; a store in object storage is read by `map2map.data.remote`.
    `copy_threads`: threads each store field copies its chunks into an item
    with (`map2map.data.windows.ZarrField`); None: 1 in DataLoader worker
    processes, else the process's cores up to a few, since with no loader
    workers the cores idle while the main process assembles an item.
    """

    def __init__(self, *, store: str | None = None, in_fields: Sequence[str] | None = None,
                 tgt_fields: Sequence[str] | None = None, in_patterns: Sequence[str] | None = None,
                 tgt_patterns: Sequence[str] | None = None, crop: int | Sequence[int] | None = None,
                 crop_start: int | Sequence[int] | None = None, crop_stop: int | Sequence[int] | None = None,
                 crop_step: int | Sequence[int] | None = None, in_pad: int | Sequence[int] = 0,
                 tgt_pad: int | Sequence[int] = 0, scale_factor: int = 1, augment: bool = False,
                 aug_shift: int | Sequence[int] | None = None, aug_add: float | None = None,
                 aug_mul: float | None = None, in_norms: Sequence[str] | None = None,
                 tgt_norms: Sequence[str] | None = None, callback_at: str | None = None, seed: int = 0,
                 cache_bytes: int = 64 * 2**20, readahead: int | None = None,
                 styles: Sequence[str] | None = None, storage_options: dict | None = None,
                 copy_threads: int | None = None, **kwargs: Any) -> None:
        if copy_threads is not None and (isinstance(copy_threads, bool) or not isinstance(copy_threads, int)
                                         or copy_threads < 1):
            raise UserError(f"copy_threads must be a positive integer (None: chosen per process), got {copy_threads!r}")
        self.inputs, self.targets = self._sources(store, in_fields, tgt_fields, in_patterns, tgt_patterns,
                                                  cache_bytes, storage_options, copy_threads)
        self.nsample = self.inputs[0].shape[0]
        self.size = self._spatial(self.inputs, "input")
        self.ndim = len(self.size)
        if not isinstance(scale_factor, int) or scale_factor < 1:
            raise UserError(f"scale_factor must be a positive integer, got {scale_factor!r}")
        self.scale_factor = scale_factor
        if self.targets:
            tsize = self._spatial(self.targets, "target")
            if tsize != tuple(n * scale_factor for n in self.size):
                raise UserError(f"target grid {list(tsize)} is not scale_factor={scale_factor} times the "
                                f"input grid {list(self.size)}")
        opt = lambda v, name: None if v is None else geometry.as_tuple(v, self.ndim, name)  # noqa: E731
        try:
            self.crop = geometry.as_tuple(crop if crop is not None else self.size, self.ndim, "crop")
            self.aug_shift = opt(aug_shift, "aug_shift")
            self.grid = geometry.crop_grid(self.size, self.crop, opt(crop_start, "crop_start"),
                                           opt(crop_stop, "crop_stop"), opt(crop_step, "crop_step"))
            self.in_pad = geometry.parse_pad(in_pad, self.ndim, "in_pad")
            self.tgt_pad = geometry.parse_pad(tgt_pad, self.ndim, "tgt_pad")
        except ValueError as exc:
            raise UserError(str(exc)) from None
        self.augment = augment
        self.aug_add, self.aug_mul = aug_add, aug_mul
        self.in_norms = lookup_norms(in_norms, len(self.inputs), "in_norms", callback_at, kwargs)
        self.tgt_norms = lookup_norms(tgt_norms, len(self.targets), "tgt_norms", callback_at, kwargs)
        self.norm_kwargs = kwargs
        self.in_stack = FieldStack(self.inputs, self.in_norms, kwargs)
        self.tgt_stack = FieldStack(self.targets, self.tgt_norms, kwargs)
        self.item_buffers = ItemBuffers()
        self.seed = seed
        self.epoch = 0
        self.in_chan = [f.shape[1] for f in self.inputs]
        self.tgt_chan = [f.shape[1] for f in self.targets]
        if readahead is not None and (isinstance(readahead, bool) or not isinstance(readahead, int)
                                      or readahead < 0):
            raise UserError(f"readahead must be a number of bytes >= 0 (0 turns read-ahead off), got {readahead!r}")
        self.readahead = READAHEAD_ITEMS * self.item_nbytes if readahead is None else readahead
        self._order: ItemOrder | None = None
        self._batch_size = 1
        self._ahead: ReadAhead | None = None
        # styles: the physical values of the style parameters named (`map2map.data.styles`), one row per
        # sample; items carry their sample's row as "style"
        self.style_names: tuple[str, ...] = ()
        self.styles: np.ndarray | None = None
        if styles is not None:
            from map2map.data.styles import store_styles

            if store is None:
                raise UserError("styles are read from a store: give a store (--train-data) to train with styles")
            self.style_names, self.styles = store_styles(store, tuple(styles), "training with the styles", required=True,
                                                             storage_options=storage_options)

    @staticmethod
    def _sources(store_path, in_fields, tgt_fields, in_patterns, tgt_patterns, cache_bytes,
                 storage_options=None, copy_threads=None) -> tuple[list[FieldSource], list[FieldSource]]:
        if store_path is not None:
            if not in_fields:
                raise UserError("a store needs input field names (in_fields / --in)")
            names = list(in_fields) + list(tgt_fields or [])
            fields = _open_store_fields(store_path, names, cache_bytes, storage_options, copy_threads)
            return fields[:len(in_fields)], fields[len(in_fields):]
        if not in_patterns:
            raise UserError("give a store with in_fields, or in_patterns (.npy glob patterns)")
        inputs = [NpyField(paths) for paths in glob_paired(in_patterns, "input")]
        targets = [NpyField(paths) for paths in glob_paired(tgt_patterns, "target")] if tgt_patterns else []
        if targets and len(targets[0].paths) != len(inputs[0].paths):
            raise UserError(f"input patterns match {len(inputs[0].paths)} files but target patterns "
                            f"{len(targets[0].paths)}")
        return inputs, targets

    @staticmethod
    def _spatial(fields: Sequence[FieldSource], what: str) -> tuple[int, ...]:
        sizes = {tuple(f.shape[2:]) for f in fields}
        if len(sizes) > 1:
            raise UserError(f"{what} fields have different spatial sizes: {sorted(sizes)}")
        return sizes.pop()

    @property
    def ncrop(self) -> int:
        return self.grid.size

    @property
    def crop_counts(self) -> tuple[int, ...]:
        """Anchors per axis, for the locality-aware sampler."""
        return self.grid.counts

    def __len__(self) -> int:
        return self.nsample * self.ncrop

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentation draws of this epoch for plain integer keys (an `EpochItem` key carries
        its own epoch)."""
        self.epoch = epoch

    def read_stats(self) -> ReadStats:
        """Bytes decoded vs returned by this process's readers, over all fields."""
        return self.in_stack.read_stats() + self.tgt_stack.read_stats()

    @property
    def item_nbytes(self) -> int:
        """Stored bytes of one item's windows (input and target), the unit of the default read-ahead."""
        win = self._windows((0,) * self.ndim)
        return self.in_stack.nbytes(win[0]) + (self.tgt_stack.nbytes(win[1]) if self.targets else 0)

    def follow(self, order: ItemOrder | None, batch_size: int = 1) -> None:
        """Read ahead in `order` (None: stop): this process is asked for ``order.indices(epoch)`` in
        batches of `batch_size`, dealt to the DataLoader's workers in turn (see the module docstring).
        Call it before the loader starts its workers; they take a copy of the dataset."""
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        self._order, self._batch_size, self._ahead = order, batch_size, None

    def anchor(self, idx: int) -> tuple[int, int, tuple[int, ...]]:
        if not 0 <= idx < len(self):
            raise IndexError(f"item {idx} out of range for {len(self)} items")
        sample, crop = divmod(idx, self.ncrop)
        return sample, crop, self.grid.anchor(crop)

    def _key(self, key: int | EpochItem) -> tuple[int, int]:
        """(epoch, item index) of a key."""
        return (key.epoch, key.index) if isinstance(key, EpochItem) else (self.epoch, key)

    def _place(self, epoch: int, idx: int) -> tuple[int, tuple[int, ...], np.random.Generator]:
        """Sample, anchor (shifted by ``aug_shift``) and the item's generator, past the shift's draws."""
        sample, _, anchor = self.anchor(idx)
        rng = np.random.default_rng([self.seed, epoch, idx])
        if self.aug_shift is not None:
            anchor = tuple(a + int(rng.integers(0, s)) if s > 0 else a for a, s in zip(anchor, self.aug_shift))
        return sample, anchor, rng

    def _windows(self, anchor: tuple[int, ...]) -> tuple[tuple[geometry.Interval, ...], tuple[geometry.Interval, ...]]:
        """The input window and the target window of a crop at `anchor` (input grid)."""
        s = self.scale_factor
        return (geometry.window(anchor, self.crop, self.in_pad),
                geometry.window(tuple(a * s for a in anchor), tuple(c * s for c in self.crop), self.tgt_pad))

    def item_windows(self, key: int | EpochItem) -> ItemWindows:
        """The windows the item of `key` reads."""
        sample, anchor, _ = self._place(*self._key(key))
        win, twin = self._windows(anchor)
        return ItemWindows(sample, win, twin if self.targets else None)

    def __getitem__(self, key: int | EpochItem) -> dict[str, Any]:
        epoch, idx = self._key(key)
        sample, anchor, rng = self._place(epoch, idx)
        hinted = self._read_ahead(epoch, idx)
        element = augment.random_element(rng, self.ndim) if self.augment else None
        win, twin = self._windows(anchor)
        item: dict[str, Any] = {"input": self._read(self.in_stack, sample, win, element, hinted),
                                "sample": sample, "anchor": torch.tensor(anchor), "index": idx,
                                **({} if self.styles is None else {"style": torch.tensor(self.styles[sample])})}
        if self.targets:
            item["target"] = self._read(self.tgt_stack, sample, twin, element, hinted)
        self._noise(item, rng)
        for key in ("input", "target"):
            if key in item:
                item[key] = torch.from_numpy(item[key])
        return item

    def _parts(self, epoch: int, idx: int) -> tuple[int, list[tuple[FieldSource, tuple[geometry.Interval, ...]]]]:
        """Sample and parts (source, window) of item `idx`: every input field's window, then every target's."""
        sample, win, twin = self.item_windows(EpochItem(epoch, idx))
        return sample, [(f, win) for f in self.inputs] + [(f, twin) for f in self.targets]

    def _hint_on(self, ahead: ReadAhead, max_bytes: int | None, per_part: bool) -> int:
        """Hint from the high-water mark of `ahead` on through the item at place ``ahead.next``, at most
        `max_bytes` in all (or, with `per_part`, in each part), moving the mark; the bytes asked for.
        The mark reaches the next item only when this one is hinted whole."""
        sample, parts = self._parts(ahead.epoch, int(ahead.items[ahead.next]))
        asked = 0
        while ahead.part < len(parts):
            room = max_bytes if per_part or max_bytes is None else max_bytes - asked
            if room is not None and room <= 0:
                return asked
            source, win = parts[ahead.part]
            n = hint_window(source, sample, win, True, room, ahead.done, skip_cached=False)
            asked += n
            if room is not None and n >= room and not per_part:
                ahead.done += n  # cut by the budget: the rest of this part waits
                return asked
            ahead.part, ahead.done = ahead.part + 1, 0
        ahead.advance(ahead.next + 1)
        return asked

    def _schedule(self, epoch: int) -> ReadAhead | None:
        """This process's read-ahead state for `epoch`, made on first use in each process and epoch;
        None when read-ahead is off or no order is followed."""
        if self._order is None or self.readahead == 0:
            return None
        ahead = self._ahead
        if ahead is None or ahead.pid != os.getpid() or ahead.epoch != epoch:
            info = torch.utils.data.get_worker_info()
            worker, nworker = (0, 1) if info is None else (info.id, info.num_workers)
            items = worker_items(np.asarray(self._order.indices(epoch), dtype=np.int64), self._batch_size,
                                 worker, nworker)
            position = np.full(len(self), -1, dtype=np.int64)
            position[items] = np.arange(len(items))
            ahead = self._ahead = ReadAhead(os.getpid(), epoch, items, position)
        return ahead

    def _read_ahead(self, epoch: int, idx: int) -> bool:
        """Hint what is left of item `idx`'s own windows (each at most `WINDOW_HINT_BYTES`), then the next
        items' within the budget (see the module docstring); whether the item's reads may skip hints of
        their own (False: `idx` is not in this process's order, or read-ahead is off)."""
        ahead = self._schedule(epoch)
        pos = -1 if ahead is None else int(ahead.position[idx])
        if pos < 0:
            return False
        if pos <= ahead.current:
            ahead.restart()
        ahead.current = pos
        for place in [p for p in ahead.ahead if p <= pos]:
            del ahead.ahead[place]
        if ahead.next < pos:  # places skipped (not asked for in order): start at this one
            ahead.advance(pos)
        if ahead.next == pos:
            self._hint_on(ahead, WINDOW_HINT_BYTES, per_part=True)
        outstanding = sum(ahead.ahead.values())
        # no more items ahead than the budget holds at their stored size, and one more: items with
        # nothing to hint (.npy sources, chunks never written) cost no budget but would be walked
        last = min(len(ahead.items), pos + 1 + self.readahead // max(self.item_nbytes, 1) + 1)
        while ahead.next < last and outstanding < self.readahead:
            place = ahead.next
            asked = self._hint_on(ahead, self.readahead - outstanding, per_part=False)
            ahead.ahead[place] = ahead.ahead.get(place, 0) + asked
            outstanding += asked
        return True

    def _read(self, stack: FieldStack, sample: int, win, element: augment.CubeElement | None,
              hinted: bool = False) -> np.ndarray:
        """Read, normalise and (if `element`) transform the stack's fields into one channel-stacked array
        that reuses the memory of items nothing references any more (see `map2map.data.batching`);
        `hinted`: the window has been hinted already."""
        out = self.item_buffers.current().empty(stack.shape(win, element), np.float32)
        return stack.read(sample, win, out, element, hint=not hinted)

    def _noise(self, item: dict[str, Any], rng: np.random.Generator) -> None:
        """The same additive / multiplicative draw for input and target."""
        for std, draw, op in ((self.aug_add, augment.add_noise, np.add), (self.aug_mul, augment.mul_noise, np.multiply)):
            if std is None:
                continue
            value = np.float32(draw(rng, std))
            for key in ("input", "target"):
                if key in item:
                    op(item[key], value, out=item[key])

