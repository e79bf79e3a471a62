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
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from map2map import geometry, store
from map2map.data import augment
from map2map.data.batching import ItemBuffers
from map2map.data.fieldio import FieldStack, apply_norm, lookup_norms, undo_norms
from map2map.data.sampler import EpochItem
from map2map.data.windows import FieldSource, NpyField, ReadStats, ZarrField
from map2map.errors import UserError
from map2map.npyfile import glob_paired

__all__ = ["FieldDataset", "apply_norm", "undo_norms"]  # the norm helpers live in map2map.data.fieldio



def _open_store_fields(path: str, names: Sequence[str], cache_bytes: int) -> list[ZarrField]:
    st = store.open_store(path)
    for n in names:
        st.field(n)  # one-line error listing the fields the store has
    return [ZarrField(path, n, st.nsample, cache_bytes) for n in names]


class FieldDataset(Dataset):
    """Crops of input and target fields from a store (or .npy globs); see the module docstring."""

    def __init__(self, *, store: str | None = None, in_fields: Sequence[str] | None = None,
                 tgt_fields: Sequence[str] | None = None, in_patterns: Sequence[str] | None = None,
                 tgt_patterns: Sequence[str] | None = None, crop: int | Sequence[int] | None = None,
                 crop_start: int | Sequence[int] | None = None, crop_stop: int | Sequence[int] | None = None,
                 crop_step: int | Sequence[int] | None = None, in_pad: int | Sequence[int] = 0,
                 tgt_pad: int | Sequence[int] = 0, scale_factor: int = 1, augment: bool = False,
                 aug_shift: int | Sequence[int] | None = None, aug_add: float | None = None,
                 aug_mul: float | None = None, in_norms: Sequence[str] | None = None,
                 tgt_norms: Sequence[str] | None = None, callback_at: str | None = None, seed: int = 0,
                 cache_bytes: int = 64 * 2**20, **kwargs: Any) -> None:
        self.inputs, self.targets = self._sources(store, in_fields, tgt_fields, in_patterns, tgt_patterns,
                                                  cache_bytes)
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

    @staticmethod
    def _sources(store_path, in_fields, tgt_fields, in_patterns, tgt_patterns,
                 cache_bytes) -> tuple[list[FieldSource], list[FieldSource]]:
        if store_path is not None:
            if not in_fields:
                raise UserError("a store needs input field names (in_fields / --in)")
            names = list(in_fields) + list(tgt_fields or [])
            fields = _open_store_fields(store_path, names, cache_bytes)
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

    def anchor(self, idx: int) -> tuple[int, int, tuple[int, ...]]:
        if not 0 <= idx < len(self):
            raise IndexError(f"item {idx} out of range for {len(self)} items")
        sample, crop = divmod(idx, self.ncrop)
        return sample, crop, self.grid.anchor(crop)

    def __getitem__(self, key: int | EpochItem) -> dict[str, Any]:
        epoch, idx = (key.epoch, key.index) if isinstance(key, EpochItem) else (self.epoch, key)
        sample, _, anchor = self.anchor(idx)
        rng = np.random.default_rng([self.seed, epoch, idx])
        if self.aug_shift is not None:
            anchor = tuple(a + int(rng.integers(0, s)) if s > 0 else a for a, s in zip(anchor, self.aug_shift))
        element = augment.random_element(rng, self.ndim) if self.augment else None
        win = geometry.window(anchor, self.crop, self.in_pad)
        item: dict[str, Any] = {"input": self._read(self.in_stack, sample, win, element),
                                "sample": sample, "anchor": torch.tensor(anchor), "index": idx}
        if self.targets:
            s = self.scale_factor
            twin = geometry.window(tuple(a * s for a in anchor), tuple(c * s for c in self.crop), self.tgt_pad)
            item["target"] = self._read(self.tgt_stack, sample, twin, element)
        self._noise(item, rng)
        for key in ("input", "target"):
            if key in item:
                item[key] = torch.from_numpy(item[key])
        return item

    def _read(self, stack: FieldStack, sample: int, win, element: augment.CubeElement | None) -> np.ndarray:
        """Read, normalise and (if `element`) transform the stack's fields into one channel-stacked array
        that reuses the memory of items nothing references any more (see `map2map.data.batching`)."""
        out = self.item_buffers.current().empty(stack.shape(win, element), np.float32)
        return stack.read(sample, win, out, element)

    def _noise(self, item: dict[str, Any], rng: np.random.Generator) -> None:
        """The same additive / multiplicative draw for input and target."""
        for std, draw, op in ((self.aug_add, augment.add_noise, np.add), (self.aug_mul, augment.mul_noise, np.multiply)):
            if std is None:
                continue
            value = np.float32(draw(rng, std))
            for key in ("input", "target"):
                if key in item:
                    op(item[key], value, out=item[key])

