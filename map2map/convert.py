"""`m2m convert`: stream .npy fields into a crop-aligned Zarr store.

`run` takes a `ConvertConfig` (the command line's options) and returns a
`ConvertSummary`.  Files of each ``--field NAME=PATTERN`` are sorted by path,
and sample i pairs the i-th file of every field (`map2map.npyfile.glob_paired`).
Every name and header is checked before the output is touched.  Data then
flows in *units*: shard-aligned blocks of one sample, read plane by plane
through memory maps, converted to the stored dtype, checked for values
that are not finite once stored (NaN/Inf, or too large for the dtype) and
written as whole shards.  A *task* is what one worker process does with one
opening of the array: a unit, or a run of small units of one file up to
about UNIT_BYTES together.  No unit holds more than a few shards, so memory
does not grow with the field.

Safety: a new store is marked complete only after its last byte is written;
``--overwrite`` builds the new store beside the old one and swaps them at
the end (`map2map.store.staged_path`, `map2map.store.swap_in`); ``--append``
grows the arrays but moves the completion mark (the number of complete
samples, with the consolidated metadata readers use) only when every new
sample is written, so an interrupted append leaves the earlier samples
readable.  Every writer holds the output's writer lock
(`map2map.utils.locks`) from its first look at the store to its last
write, so two conversions into one store never interleave; an append
takes the layout it does not name (crop, pad, chunk, ...) from the store.

Object storage: OUTPUT may be a URL (``s3://bucket/train.zarr``,
``file://...``; `map2map.storage`), opened with ``--storage-options JSON``,
which the worker processes get too (``memory://`` lives in one process, so
it is written without workers).  Every task writes whole shards, and each
shard is one object, encoded in memory and written by one PUT without
reading it first (`map2map.store.ShardObjects`); the completion mark comes
after the last of them.  An incomplete store there (an interrupted run's) is
deleted and converted again, ``--append`` works as on disk, but a complete
store is never replaced: object storage has no rename, so ``--overwrite``
is refused (`map2map.store.staged_path`) and the fix is a new URL.  No
writer lock is taken on object storage (there is no file to lock): running
two conversions into one URL at once is the user's to avoid, and the
summary says so.

Styles (per-sample parameters, `map2map.store.read_styles`) come from
``--styles TABLE`` (a CSV file: a header of parameter names, then one row
per sample in the sorted file order) or ``--style-pattern GLOB`` with
``--style-names`` (one text file of whitespace-separated numbers per
sample, its files sorted and paired with the samples like a field's).  They
are read and checked with the fields, before the output is touched, and
written into the store being built (or grown), so they are complete
exactly when the fields are.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import zarr
from tqdm import tqdm

from map2map import geometry, npyfile, storage, store
from map2map.errors import UserError
from map2map.utils.progress import advance
from map2map.stage import Summary
from map2map.utils.locks import writer_lock

MAX_CHANNELS = 16
UNIT_BYTES = 32 * 2**20
IN_PROCESS_SCHEMES = frozenset({"memory"})  # file systems that live in one process: written without workers


@dataclass(frozen=True)
class ConvertConfig:
    """Everything `m2m convert` takes; field names are the command line's option names.

    `field` holds the ``NAME=PATTERN`` strings of ``--field``.  `crop`, `pad`
    and `chunk` are in voxels of the first field's grid.  Layout options left
    None (`crop`, `pad`, `chunk`, `shard_mult`, `dtype`, `compressor`) take
    the defaults `plan_layouts` describes for a new store, and the store's
    own values with `append`.
    """

    output: str
    field: tuple[str, ...]
    crop: tuple[int, ...] | None = None
    pad: int | None = None
    boxsize: float | None = None
    overwrite: bool = False
    append: bool = False
    chunk: tuple[int, ...] | None = None
    shard_mult: int | None = None
    dtype: str | None = None
    compressor: str | None = None
    allow_nonfinite: bool = False
    clamp_crop: bool = False
    workers: int = 2
    progress: bool = True
    styles: str | None = None
    style_pattern: str | None = None
    style_names: tuple[str, ...] | None = None
    storage_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.storage_options, str):  # the JSON text of --storage-options
            object.__setattr__(self, "storage_options", storage.parse_options(self.storage_options))
        if isinstance(self.field, str):  # one spec given bare
            object.__setattr__(self, "field", (self.field,))
        if isinstance(self.style_names, str):  # "Om,D" given bare
            object.__setattr__(self, "style_names", tuple(v.strip() for v in self.style_names.split(",")))
        elif self.style_names is not None:
            object.__setattr__(self, "style_names", tuple(self.style_names))
        for name in ("field", "crop", "chunk"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, int)):
                object.__setattr__(self, name, tuple(value))


DTYPES = ("float32", "float64")
COMPRESSORS = ("none", "zstd", "blosc")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_config(config: ConvertConfig) -> None:
    """Refuse options that are wrong whatever the files hold: a one-line `UserError` naming the option."""
    if config.overwrite and config.append:
        raise UserError("--overwrite and --append exclude each other")
    if not config.output:
        raise UserError("OUTPUT is empty; give the path of the store to write")
    box = config.boxsize
    if box is not None and not (isinstance(box, (int, float, np.number)) and not isinstance(box, bool)
                                and math.isfinite(box) and box > 0):
        raise UserError(f"--boxsize {box}: expected a finite positive box side length (e.g. 1000 for Mpc/h)")
    if not _is_int(config.workers) or config.workers < 1:
        raise UserError(f"--workers {config.workers}: expected a number of processes of at least 1")
    if config.shard_mult is not None and (not _is_int(config.shard_mult) or config.shard_mult < 1):
        raise UserError(f"--shard-mult {config.shard_mult}: expected a whole number of crops of at least 1")
    if config.pad is not None and (not _is_int(config.pad) or config.pad < 0):
        raise UserError(f"--pad {config.pad}: expected a whole number of voxels, 0 or more")
    for option, value in (("--crop", config.crop), ("--chunk", config.chunk)):
        values = (value,) if isinstance(value, int) else value
        if values is not None and (not values or not all(_is_int(v) and v > 0 for v in values)):
            raise UserError(f"{option} {list(values)}: expected positive whole numbers of voxels")
    if config.dtype is not None and config.dtype not in DTYPES:
        raise UserError(f"--dtype {config.dtype!r}: expected one of {', '.join(DTYPES)}")
    if config.compressor is not None and config.compressor not in COMPRESSORS:
        raise UserError(f"--compressor {config.compressor!r}: expected one of {', '.join(COMPRESSORS)}")
    if config.styles is not None and config.style_pattern is not None:
        raise UserError("--styles and --style-pattern exclude each other: give the styles one way")
    if config.style_pattern is not None and config.style_names is None:
        raise UserError(f"--style-pattern {config.style_pattern!r} needs --style-names naming the numbers of each "
                        "file in order, e.g. --style-names Om,D")
    if config.style_names is not None and config.style_pattern is None:
        raise UserError("--style-names names the numbers of --style-pattern's files; give --style-pattern too "
                        "(a --styles table names its columns in its header)")
    if config.style_names is not None:
        store.check_style_names(config.style_names, "--style-names")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


@dataclass
class ConvertSummary(Summary):
    """What a conversion wrote: the store, its sample count, the field layouts and how long it took.

    `nsample` counts every sample of the store (after an append, old and
    new); `appended` is the number added by ``--append`` (None otherwise).
    `layouts` has one dict per field (`map2map.store.FieldLayout` as plain
    data); `bytes_written` counts field data in the stored dtype.
    """

    output: str
    nsample: int
    appended: int | None
    layouts: list[dict[str, Any]]
    notes: list[str]
    bytes_written: int
    seconds: float
    styles: list[str] = dataclasses.field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"note: {note}" for note in self.notes]
        for lay in self.layouts:
            out.append(f"{lay['name']}: {lay['channels']} x {tuple(lay['spatial'])}, shard {tuple(lay['shard'])}, "
                       f"inner chunk {tuple(lay['chunk'])}, {lay['dtype']}")
        if self.styles:
            out.append(f"styles: {', '.join(self.styles)} (float32, one row per sample)")
        verb = "wrote" if self.appended is None else f"appended {_plural(self.appended, 'sample')}, now"
        out.append(f"{self.output}: {verb} {_plural(self.nsample, 'sample')}, complete")
        return out


@dataclass
class FieldInput:
    """One ``--field``: its name, pattern and the checked headers of its files."""

    name: str
    pattern: str
    headers: list[npyfile.NpyHeader]

    @property
    def channels(self) -> int:
        return self.headers[0].shape[0]

    @property
    def spatial(self) -> tuple[int, ...]:
        return self.headers[0].shape[1:]


def parse_field(spec: str) -> tuple[str, str]:
    """Split ``NAME=PATTERN``; the name must be one a store can hold (`map2map.store.check_field_name`)."""
    name, sep, pattern = spec.partition("=")
    if not sep or not pattern:
        raise UserError(f"--field {spec!r}: expected NAME=PATTERN, e.g. disp='sims/*/dis.npy'")
    store.check_field_name(name, "--field")
    return name, pattern


def _looks_channel_last(shape: tuple[int, ...]) -> bool:
    """A cube of voxels followed by a short axis, e.g. (64, 64, 64, 3): channels last."""
    return len(shape) == 4 and shape[-1] <= 4 < shape[0] and shape[0] == shape[1] == shape[2]


def _check_shape(header: npyfile.NpyHeader) -> None:
    shape = header.shape
    if len(shape) not in (3, 4):
        raise UserError(f"{header.path} has shape {shape}: expected channel-first (C, X, Y) or (C, X, Y, Z)")
    if 0 in shape:
        what = "no channels" if shape[0] == 0 else "an empty axis"
        raise UserError(f"{header.path} has shape {shape}, with {what}: expected at least one channel "
                        "and one voxel per axis")
    if shape[0] > MAX_CHANNELS or _looks_channel_last(shape):
        hint = (" it looks channel-last: move the channel axis first (np.moveaxis(a, -1, 0))"
                if shape[-1] <= MAX_CHANNELS else
                " a scalar field needs a leading channel axis of 1 (a[None])")
        raise UserError(f"{header.path} has shape {shape} with {shape[0]} channels on its first axis;{hint}")


def check_grids(fields: Sequence[FieldInput]) -> None:
    """Refuse grids that are not whole multiples of each other, whatever the order of the fields.

    Every pair of fields must have the same number of axes, and the larger
    grid must be the smaller one times the same whole number on every axis
    (a target ``scale_factor`` times finer than its input, or equal).
    """
    ndims = {len(f.spatial) for f in fields}
    if len(ndims) > 1:
        raise UserError("fields mix 2D and 3D grids: " + ", ".join(f"{f.name}: {f.spatial}" for f in fields))
    ordered = sorted(fields, key=lambda f: (math.prod(f.spatial), f.spatial, f.name))
    for i, small in enumerate(ordered):
        for large in ordered[i + 1:]:
            whole = all(n % m == 0 for n, m in zip(large.spatial, small.spatial))
            if not whole or len({n // m for n, m in zip(large.spatial, small.spatial)}) != 1:
                raise UserError(f"--field {small.name} has grid {list(small.spatial)} and --field {large.name} "
                                f"grid {list(large.spatial)}: a larger grid must be the smaller one times one "
                                "whole number on every axis (e.g. 32 and 64 for 2x super-resolution)")


def gather(specs: Sequence[str]) -> list[FieldInput]:
    """Check every name, expand and pair the patterns, check every header and that the grids agree."""
    named: list[tuple[str, str]] = []
    for spec in specs:
        name, pattern = parse_field(spec)
        if any(n == name for n, _ in named):
            raise UserError(f"--field {name!r} is given twice; every field needs its own name")
        named.append((name, pattern))
    if not named:
        raise UserError("--field: give at least one NAME=PATTERN")
    paired = npyfile.glob_paired([p for _, p in named], "--field")
    fields: list[FieldInput] = []
    for (name, pattern), paths in zip(named, paired):
        headers = [npyfile.inspect(p) for p in paths]
        for h in headers:
            _check_shape(h)
            if h.shape != headers[0].shape:
                raise UserError(f"--field {name}: {h.path} has shape {h.shape} but "
                                f"{headers[0].path} has {headers[0].shape}")
        fields.append(FieldInput(name, pattern, headers))
    check_grids(fields)
    return fields


@dataclass(frozen=True)
class StyleInput:
    """The styles of the new samples: parameter names, values (nsample, nparam) and the files they came from."""

    names: tuple[str, ...]
    values: np.ndarray
    sources: tuple[str, ...]


def _read_text(path: str, option: str) -> str:
    try:
        with open(os.path.expanduser(path), newline="") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{option} {path}: cannot read it ({exc.__class__.__name__}: {exc})") from None


def read_style_table(path: str) -> tuple[tuple[str, ...], np.ndarray]:
    """Read a ``--styles`` CSV table: a header of parameter names, then one row of numbers per sample.

    Blank lines are skipped and spaces around a value are ignored.  Returns
    the names and the values (float64, (rows, names)); a `UserError` naming
    the line and column of a bad value.
    """
    lines = _read_text(path, "--styles").splitlines()
    rows = [(i, [v.strip() for v in row]) for i, row in enumerate(csv.reader(lines), 1) if any(v.strip() for v in row)]
    if not rows:
        raise UserError(f"--styles {path} is empty; expected a header of parameter names (e.g. Om,D) and one "
                        "row per sample")
    names = store.check_style_names(rows[0][1], f"--styles {path} header")
    values = np.empty((len(rows) - 1, len(names)))
    for r, (line, row) in enumerate(rows[1:]):
        if len(row) != len(names):
            raise UserError(f"--styles {path} line {line}: {len(row)} values, but the header names {len(names)} "
                            f"parameters ({', '.join(names)})")
        for c, (name, text) in enumerate(zip(names, row)):
            values[r, c] = store.style_number(text, f"--styles {path} line {line}, column {name}")
    return names, values


def read_style_files(pattern: str, names: tuple[str, ...]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Read ``--style-pattern``'s files (sorted by path): each holds ``len(names)`` whitespace-separated numbers.

    Returns the values (float64, (files, names)) and the files' absolute paths.
    """
    (paths,) = npyfile.glob_paired([pattern], "--style-pattern")
    values = np.empty((len(paths), len(names)))
    for i, path in enumerate(paths):
        words = _read_text(path, "--style-pattern file").split()
        if len(words) != len(names):
            raise UserError(f"--style-pattern file {path} holds {len(words)} numbers, but --style-names names "
                            f"{len(names)} ({', '.join(names)})")
        for c, (name, text) in enumerate(zip(names, words)):
            values[i, c] = store.style_number(text, f"--style-pattern file {path}, parameter {name}")
    return values, tuple(paths)


def gather_styles(config: ConvertConfig, nsample: int) -> StyleInput | None:
    """The styles the options give for `nsample` new samples (None without style options), checked."""
    if config.styles is not None:
        names, values = read_style_table(config.styles)
        sources: tuple[str, ...] = (os.path.abspath(os.path.expanduser(config.styles)),)
        what = f"--styles {config.styles} has {len(values)} rows"
    elif config.style_pattern is not None:
        assert config.style_names is not None  # check_config
        names = store.check_style_names(config.style_names, "--style-names")
        values, sources = read_style_files(config.style_pattern, names)
        what = f"--style-pattern {config.style_pattern!r} matches {len(values)} files"
    else:
        return None
    if len(values) != nsample:
        raise UserError(f"{what} but --field gives {nsample} samples; give one row of styles per sample, in the "
                        "sorted order of the field files")
    return StyleInput(names, values, sources)


def _shape_option(value: int | Sequence[int], ndim: int, option: str) -> tuple[int, ...]:
    try:
        return geometry.as_tuple(value, ndim, option)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def default_pad(crop: Sequence[int]) -> int:
    """The halo pad assumed when ``--pad`` is not given: 3/8 of the smallest crop side, at least 1."""
    return max(1, 3 * min(crop) // 8)


def _default_chunk(crop: int, pad: int, ndim: int, step: int) -> int:
    """`geometry.choose_inner_chunk`, moved to a multiple of `step` (so coarser grids get whole chunks).

    The smallest divisor of `crop` that is a multiple of `step` and at least
    the chosen chunk, else the largest such divisor; the chosen chunk itself
    when there is none (`plan_layouts` then names the field it cannot scale to).
    """
    chosen = geometry.choose_inner_chunk(crop, pad, ndim=ndim)
    fits = [d for d in range(step, crop + 1, step) if crop % d == 0]
    if chosen % step == 0 or not fits:
        return chosen
    larger = [d for d in fits if d >= chosen]
    return min(larger) if larger else max(fits)


@dataclass(frozen=True)
class Plan:
    """The layout of a conversion: crop, pad and shard multiple (reference grid voxels), each field's layout.

    `notes` say what was decided that the user did not ask for exactly
    (a crop clamped to the grid).
    """

    crop: tuple[int, ...]
    pad: int
    shard_mult: int
    layouts: list[store.FieldLayout]
    notes: tuple[str, ...] = ()


def plan_layouts(fields: list[FieldInput], config: ConvertConfig) -> Plan:
    """Chunking for every field: shards = crop (times `shard_mult`), inner chunks chosen for the halo.

    Crop, pad and chunk are in voxels of the first field's grid; a field on a
    grid `r` times finer (or coarser) gets them scaled by `r`, so crop windows
    of input and target cover the same shards.  The default crop is the grid,
    up to 128 voxels per axis; a crop larger than the grid is refused unless
    `clamp_crop` asks for the grid instead (said in a note).  The default pad
    is `default_pad`, the default inner chunk the one `_default_chunk` picks,
    the default shard multiple 1.  Shards larger than a grid (a large shard
    multiple) end at the grid.
    """
    ref = fields[0].spatial
    ndim = len(ref)
    notes: list[str] = []
    crop = _shape_option(config.crop if config.crop else [min(128, n) for n in ref], ndim, "--crop")
    if any(c <= 0 for c in crop):
        raise UserError(f"--crop {list(crop)} must be positive")
    if any(c > n for c, n in zip(crop, ref)):
        clamped = tuple(min(c, n) for c, n in zip(crop, ref))
        if not config.clamp_crop:
            raise UserError(f"--crop {list(crop)} is larger than the grid {list(ref)} of --field {fields[0].name}; "
                            f"give a crop of at most the grid, or pass --clamp-crop to crop {list(clamped)}")
        notes.append(f"--crop {list(crop)} clamped to the grid of {fields[0].name}: {list(clamped)}")
        crop = clamped
    shard_mult = 1 if config.shard_mult is None else config.shard_mult
    if shard_mult < 1:
        raise UserError(f"--shard-mult {shard_mult} must be at least 1")
    pad = config.pad if config.pad is not None else default_pad(crop)
    if pad < 0:
        raise UserError(f"--pad {pad} must not be negative")
    dens = [geometry.grid_ratio(f.spatial, ref)[1] for f in fields]
    if config.chunk:
        chunk = _shape_option(config.chunk, ndim, "--chunk")
        if any(c <= 0 for c in chunk):
            raise UserError(f"--chunk {list(chunk)} must be positive")
    else:
        step = math.lcm(*dens)
        chunk = tuple(_default_chunk(c, pad, ndim, step) for c in crop)
    shard = tuple(c * shard_mult for c in crop)
    if any(s % c for s, c in zip(shard, chunk)):
        raise UserError(f"--chunk {list(chunk)} must divide the shard {list(shard)} (crop x shard multiple)")
    dtype = config.dtype or DTYPES[0]
    compressor = config.compressor or COMPRESSORS[0]
    layouts = []
    for f in fields:
        try:
            num, den = geometry.grid_ratio(f.spatial, ref)
            f_shard = geometry.scale_shape(shard, num, den, "shard")
            f_chunk = geometry.scale_shape(chunk, num, den, "chunk")
        except ValueError as exc:
            raise UserError(f"--field {f.name} (grid {list(f.spatial)}): {exc}; --crop, --chunk and --shard-mult "
                            f"are in voxels of the first field's grid {list(ref)}") from None
        f_shard = tuple(min(s, n) for s, n in zip(f_shard, f.spatial))
        f_chunk = tuple(min(c, s) for c, s in zip(f_chunk, f_shard))
        if any(s % c for s, c in zip(f_shard, f_chunk)):
            f_chunk = f_shard
        layouts.append(store.FieldLayout(f.name, f.channels, f.spatial, f_shard, f_chunk, dtype, compressor))
    return Plan(crop, pad, shard_mult, layouts, tuple(notes))


def units(layout: store.FieldLayout, itemsize: int) -> list[tuple[slice, ...]]:
    """Shard-aligned spatial regions of one sample, each at most about UNIT_BYTES.

    Whole shards only, so no two units ever write into the same shard.
    """
    shard_bytes = layout.channels * math.prod(layout.shard) * itemsize
    along_last = max(1, UNIT_BYTES // shard_bytes)
    steps = list(layout.shard)
    steps[-1] = layout.shard[-1] * along_last
    axes = [range(0, n, s) for n, s in zip(layout.spatial, steps)]
    out = []
    for starts in np.ndindex(*[len(a) for a in axes]):
        out.append(tuple(slice(a[i], min(a[i] + s, n)) for a, i, s, n in zip(axes, starts, steps, layout.spatial)))
    return out


def _region_bytes(header: npyfile.NpyHeader, region: tuple[slice, ...], itemsize: int) -> int:
    return header.shape[0] * math.prod(s.stop - s.start for s in region) * itemsize


@dataclass(frozen=True)
class _Task:
    """Units of one source file that one worker writes in a row: the array is opened once for them."""

    field: str
    header: npyfile.NpyHeader
    sample: int
    regions: tuple[tuple[slice, ...], ...]
    nbytes: int


def _tasks(fields: list[FieldInput], layouts: list[store.FieldLayout], first_sample: int,
           itemsize: int) -> Iterator[_Task]:
    """Every unit of every file, in file order, small ones grouped into tasks of at most about UNIT_BYTES."""
    for i in range(len(fields[0].headers)):
        for f, lay in zip(fields, layouts):
            header = f.headers[i]
            group: list[tuple[slice, ...]] = []
            nbytes = 0
            for region in units(lay, itemsize):
                size = _region_bytes(header, region, itemsize)
                if group and nbytes + size > UNIT_BYTES:
                    yield _Task(f.name, header, first_sample + i, tuple(group), nbytes)
                    group, nbytes = [], 0
                group.append(region)
                nbytes += size
            if group:
                yield _Task(f.name, header, first_sample + i, tuple(group), nbytes)


@dataclass(frozen=True)
class _Bad:
    """Values of one source file that would not be stored finite: NaN/Inf in the file, or too large for the dtype."""

    nonfinite: int = 0
    overflow: int = 0

    def __bool__(self) -> bool:
        return bool(self.nonfinite or self.overflow)

    def __add__(self, other: "_Bad") -> "_Bad":
        return _Bad(self.nonfinite + other.nonfinite, self.overflow + other.overflow)


def _count_bad(header: npyfile.NpyHeader, region: tuple[slice, ...], buf: np.ndarray) -> _Bad:
    """Count the non-finite values of `buf` (the region, converted); tell overflow in the cast from NaN/Inf.

    Only a float source wider than the stored dtype can overflow; its region
    is read again in its own dtype, and only when `buf` has non-finite values.
    """
    bad = int(buf.size - np.count_nonzero(np.isfinite(buf)))
    if not bad or header.dtype.kind != "f" or header.dtype.itemsize <= buf.dtype.itemsize:
        return _Bad(nonfinite=bad)
    src = np.empty(buf.shape, dtype=header.dtype.newbyteorder("="))
    npyfile.read_block(header, (slice(None),) + region, src)
    genuine = int(src.size - np.count_nonzero(np.isfinite(src)))
    return _Bad(nonfinite=genuine, overflow=bad - genuine)


def _write_task(path: str, task: _Task, dtype: str, check_finite: bool,
                storage_options: dict[str, Any] | None = None) -> tuple[int, _Bad]:
    """Convert the units of one task; returns (bytes written, the values that are not finite once stored).

    Opens the store's array for this task only: an array object caches the
    shape it was opened with, so none outlives the write it was opened for.
    A cast that overflows is counted (unless `check_finite` is off), never
    warned about.
    """
    arr = store.open_group(path, "r+", storage_options)[task.field]
    objects = store.ShardObjects() if storage.is_remote(path) else None  # whole shards, one PUT each
    nbytes, bad = 0, _Bad()
    for region in task.regions:
        buf = np.empty((task.header.shape[0],) + tuple(s.stop - s.start for s in region), dtype=dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            npyfile.read_block(task.header, (slice(None),) + region, buf)
        if check_finite:
            bad = bad + _count_bad(task.header, region, buf)
        index = (task.sample, slice(None)) + region
        if objects is None:
            arr[index] = buf
        else:
            objects.add(task.field, arr, index, buf)
        nbytes += buf.nbytes
    if objects is not None:
        objects.store(path, storage_options)
    return nbytes, bad


def _pool(workers: int) -> Executor:
    """Worker processes for the copy (zarr-python serialises threads on its event loop).

    Spawned, not forked: a forked child would inherit zarr's event loop state
    from the parent, which has already opened the store.  One task or one
    worker runs in this process instead.
    """
    if workers <= 1:
        return _InlineExecutor()
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


class _InlineExecutor(Executor):
    def submit(self, fn, /, *args, **kwargs):  # type: ignore[override]
        fut: Future = Future()
        fut.set_result(fn(*args, **kwargs))
        return fut


def _bad_message(path: str, bad: _Bad, dtype: str) -> str:
    parts = []
    if bad.nonfinite:
        parts.append(f"{bad.nonfinite} non-finite values (NaN/Inf)")
    if bad.overflow:
        parts.append(f"{bad.overflow} finite values too large for {dtype} (beyond +-{np.finfo(dtype).max:.3g}: "
                     "stored they would be Inf)")
    fix = "fix the data" if not bad.overflow else "rescale the data, or store it with --dtype float64,"
    return f"{path} has {' and '.join(parts)}; {fix} or pass --allow-nonfinite to keep them"


def write_samples(path: str, fields: list[FieldInput], layouts: list[store.FieldLayout], first_sample: int,
                  config: ConvertConfig) -> int:
    """Write every file of every field as samples ``first_sample, first_sample + 1, ...``; returns the bytes.

    Stops early once a file is known to hold values that would not be stored
    finite (NaN/Inf, or too large for the stored dtype), unless allowed,
    after counting that file's values, and raises a UserError naming it.
    """
    dtype = layouts[0].dtype
    itemsize = np.dtype(dtype).itemsize
    opts = config.storage_options
    tasks = list(_tasks(fields, layouts, first_sample, itemsize))
    total = sum(t.nbytes for t in tasks)
    workers = min(config.workers, max(1, total // UNIT_BYTES), len(tasks))
    if storage.scheme(path) in IN_PROCESS_SCHEMES:  # another process would see an empty file system
        workers = 1
    bad: dict[str, _Bad] = {}
    written = 0
    with tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not config.progress,
              file=sys.stderr) as bar, _pool(workers) as pool:
        futures = [(t.header.path, pool.submit(_write_task, path, t, dtype, not config.allow_nonfinite, opts))
                   for t in tasks]
        for src, fut in futures:
            nbytes, nbad = fut.result()
            written += nbytes
            advance(bar, nbytes)
            if nbad:
                bad[src] = bad.get(src, _Bad()) + nbad
            elif bad and src not in bad:  # the bad file is fully counted: stop
                for _, f in futures:
                    f.cancel()
                break
    if bad:
        path0, count = next(iter(bad.items()))
        raise UserError(_bad_message(path0, count, dtype))
    group = store.open_group(path, "r+", opts)
    for f in fields:
        src = group[store.source_name(f.name)]
        src[first_sample:first_sample + len(f.headers)] = np.array([h.path for h in f.headers])
    group["sample"][first_sample:] = np.arange(first_sample, first_sample + len(fields[0].headers))
    return written


def _settings(fields: list[FieldInput], config: ConvertConfig, plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {
        f.name: {"pattern": f.pattern, "source_dtype": str(f.headers[0].dtype),
                 "allow_nonfinite": config.allow_nonfinite} for f in fields}
    out.update(created_by="m2m convert", crop=list(plan.crop), pad=plan.pad, shard_mult=plan.shard_mult,
               reference_field=fields[0].name)
    if config.styles is not None:
        out["style_source"] = {"table": config.styles}
    elif config.style_pattern is not None:
        out["style_source"] = {"pattern": config.style_pattern}
    return out


def run(config: ConvertConfig) -> ConvertSummary:
    """Run a conversion (see the module docstring).  Raises UserError on bad input, before writing anything.

    Options, input files and the output location are checked first
    (`check_config`, `gather`, `map2map.store.check_output_path`); a local
    output is then written under its writer lock (`map2map.utils.locks`),
    so a second conversion into the same store is refused.  A remote one
    has no lock (see the module docstring); what its storage service
    refuses (a missing bucket, credentials) is one line (`_remote_errors`).
    """
    t0 = time.perf_counter()
    check_config(config)
    storage.check_scheme(config.output, "OUTPUT")
    fields = gather(config.field)
    styles = gather_styles(config, len(fields[0].headers))
    out = output_location(config.output)
    with _remote_errors(out):
        store.check_output_path(out, inputs=[h.path for f in fields for h in f.headers]
                                + list(styles.sources if styles else ()), storage_options=config.storage_options)
        plan = None if config.append else plan_layouts(fields, config)
        with _output_lock(out) as notes:
            if config.append:
                fields, plan, old, written = _append(out, fields, styles, config, notes)
                appended: int | None = len(fields[0].headers)
                nsample = old + appended
            else:
                assert plan is not None
                notes += plan.notes
                written = _create(out, fields, styles, plan, config, notes)
                appended, nsample = None, len(fields[0].headers)
    return ConvertSummary(out, nsample, appended, [dataclasses.asdict(lay) for lay in plan.layouts], notes,
                          written, time.perf_counter() - t0, list(styles.names) if styles else [])


def output_location(text: str) -> str:
    """OUTPUT as the stage keeps it: a remote URL normalised (`map2map.storage.normalise`), a local path as
    ``pathlib`` prints it (a ``file://`` URL as its path)."""
    if storage.is_remote(text):
        return storage.normalise(text)
    return str(Path(storage.local_path(text)))


@contextlib.contextmanager
def _output_lock(out: str) -> Iterator[list[str]]:
    """Hold the writer lock of a local `out` for the body; yields the summary's notes so far (one line
    when a dead writer's lock was taken over, or when `out` is remote and so unlocked)."""
    if storage.is_remote(out):
        yield [f"no writer lock on {out}: object storage has no locks, so run one m2m convert at a time into it"]
        return
    with writer_lock(out, "m2m convert") as lock:
        yield [lock.note] if lock.note else []


@contextlib.contextmanager
def _remote_errors(out: str) -> Iterator[None]:
    """For a remote `out`: what the storage service refuses (a missing bucket, credentials, no connection)
    becomes its one-line `UserError` (`map2map.storage.user_error`); every other exception passes unchanged."""
    if not storage.is_remote(out):
        yield
        return
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # fsspec backends raise their own types; translated, or re-raised unchanged
        err = storage.user_error(exc, out)
        if err is exc:
            raise
        raise err from None


def _dtype_notes(fields: list[FieldInput], dtype: str) -> list[str]:
    return [f"{f.name}: {f.headers[0].dtype} stored as {dtype}" for f in fields
            if f.headers[0].dtype != np.dtype(dtype)]


def _check_foreign(out: str, option: str, storage_options: dict[str, Any] | None) -> None:
    """Refuse to delete a store holding anything that is not the store's own."""
    foreign = store.foreign_entries(out, storage_options)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise UserError(f"{option}: {out} holds {shown}, which {'is' if len(foreign) == 1 else 'are'} not part "
                        "of the store; move it out first, nothing was deleted")


def _create(out: str, fields: list[FieldInput], styles: StyleInput | None, plan: Plan, config: ConvertConfig,
            notes: list[str]) -> int:
    """Write a new store at `out` (built beside it and swapped in if it replaces one); returns the bytes.

    An existing `out` is replaced only if it is a map2map store holding
    nothing foreign (`map2map.store.foreign_entries`): a complete one with
    ``--overwrite``, an incomplete one (an interrupted run's) always.  Any
    other existing file or non-empty directory is refused, with or without
    ``--overwrite``; an empty directory may be replaced with ``--overwrite``.
    In object storage an incomplete store is deleted and written again in
    place, anything else under the prefix that is no map2map store is
    refused, and a complete store is never replaced (`map2map.store.staged_path`
    refuses ``--overwrite``: there is no rename to swap a new one in).
    """
    opts = config.storage_options
    remote = storage.is_remote(out)
    nnew = len(fields[0].headers)
    target = out
    if not remote and os.path.lexists(out) and not os.path.isdir(out):
        raise UserError(f"OUTPUT {out} exists and is not a directory (a store is one); choose another path")
    exists = storage.exists(out, opts) if remote else os.path.exists(out)
    meta = store.read_meta(out, opts) if exists else None
    if exists and meta is None and (remote or not config.overwrite or any(Path(out).iterdir())):
        refusal = "refusing to delete it" if config.overwrite else "choose another OUTPUT"
        raise UserError(f"{'--overwrite: ' if config.overwrite else ''}{out} exists and is not a map2map store; "
                        f"{refusal}")
    if meta is not None and meta.get("complete") and not config.overwrite:
        raise UserError(f"{out} exists and is complete; pass --overwrite to replace it or --append to add samples")
    if remote and meta is not None and meta.get("complete"):
        store.staged_path(out)  # refuses, naming the fix: a complete store in object storage is never replaced
    if meta is not None:
        _check_foreign(out, "--overwrite" if config.overwrite else "OUTPUT", opts)
    if meta is not None and (remote or not config.overwrite):
        notes.append(f"{out} is an incomplete store from an interrupted run: converting it again")
        store.remove(out, opts)
    elif exists:
        target = store.staged_path(out)
        if os.path.exists(target):
            store.remove(target)
    notes += _dtype_notes(fields, plan.layouts[0].dtype)
    store.create(target, plan.layouts, nsample=nnew, boxsize=config.boxsize, settings=_settings(fields, config, plan),
                 style_names=styles.names if styles else (), storage_options=opts)
    try:
        written = write_samples(target, fields, plan.layouts, 0, config)
        if styles is not None:
            store.write_styles(target, styles.values, 0, opts)
    except UserError:
        store.remove(target, opts)
        raise
    store.mark_complete(target, nnew, storage_options=opts)
    if target != out:
        store.swap_in(target, out)
    return written


def _resize_samples(group: zarr.Group, nsample: int) -> None:
    """Give every per-sample array of the store `nsample` samples."""
    for name in list(group.array_keys()):
        arr = group[name]
        if arr.metadata.dimension_names and arr.metadata.dimension_names[0] == "sample":
            arr.resize((nsample,) + arr.shape[1:])


def _stored_shard_mult(meta: dict[str, Any]) -> int:
    """The shard multiple a store was written with (recorded, or read off the reference field's shards)."""
    if "shard_mult" in meta:
        return int(meta["shard_mult"])
    ref = meta["fields"].get(meta.get("reference_field", ""), {})
    crop, shard = meta.get("crop"), ref.get("shard")
    if not crop or not shard or any(s % c for s, c in zip(shard, crop)):
        return 1
    multiples = {s // c for s, c in zip(shard, crop)}
    return multiples.pop() if len(multiples) == 1 else 1


def append_config(config: ConvertConfig, meta: dict[str, Any]) -> ConvertConfig:
    """`config` with each layout option it leaves None set to the store's (crop, pad, chunk, shard multiple, ...)."""
    ref = meta["fields"].get(meta.get("reference_field", ""), next(iter(meta["fields"].values())))
    fill: dict[str, Any] = {}
    if config.crop is None and meta.get("crop"):
        fill["crop"] = tuple(meta["crop"])
    if config.pad is None and meta.get("pad") is not None:
        fill["pad"] = int(meta["pad"])
    if config.chunk is None and ref.get("chunk"):
        fill["chunk"] = tuple(ref["chunk"])
    if config.shard_mult is None:
        fill["shard_mult"] = _stored_shard_mult(meta)
    if config.dtype is None:
        fill["dtype"] = ref.get("dtype", DTYPES[0])
    if config.compressor is None:
        fill["compressor"] = ref.get("compressor", COMPRESSORS[0])
    return dataclasses.replace(config, **fill)


def _check_append(st: store.Store, fields: list[FieldInput], config: ConvertConfig) -> list[FieldInput]:
    """Check the new files against the store before planning; returns the fields, the store's reference first."""
    names = [f.name for f in fields]
    if sorted(st.field_names) != sorted(names):
        raise UserError(f"--append: store {st.path} has fields {st.field_names}, but --field gives {names}")
    for f in fields:
        have = st.meta["fields"][f.name]
        stored = [int(have["channels"]), *have["spatial"]]
        if stored != [f.channels, *f.spatial]:
            raise UserError(f"--append: field {f.name} is stored as (channels, grid) {stored}, but its new files "
                            f"hold {[f.channels, *f.spatial]}")
    box = st.boxsize
    if config.boxsize is not None and (box is None or float(box) != float(config.boxsize)):
        held = "no box size (coordinates in box fractions)" if box is None else f"box size {box}"
        raise UserError(f"--append --boxsize {config.boxsize}: store {st.path} has {held}; leave --boxsize out "
                        "to keep the store's")
    ref = st.meta.get("reference_field")
    return sorted(fields, key=lambda f: f.name != ref)


def _check_append_styles(st: store.Store, styles: StyleInput | None) -> np.ndarray | None:
    """The new samples' style rows in the store's column order; refused unless they name the store's parameters."""
    have = st.style_names
    if styles is None:
        if have:
            raise UserError(f"--append: store {st.path} has styles ({', '.join(have)}); give --styles or "
                            "--style-pattern with one row for each new sample")
        return None
    if not have:
        raise UserError(f"--append: store {st.path} has no styles, but the new samples have "
                        f"({', '.join(styles.names)}); convert all samples into a new store with styles instead")
    if sorted(have) != sorted(styles.names):
        raise UserError(f"--append: store {st.path} has styles {', '.join(have)}, but the new rows name "
                        f"{', '.join(styles.names)}; give the same parameters")
    return styles.values[:, [styles.names.index(name) for name in have]]


def _compare_layouts(st: store.Store, plan: Plan) -> None:
    """Refuse an append whose explicit layout options would write shards unlike the store's."""
    for lay in plan.layouts:
        have = st.meta["fields"][lay.name]
        for what, mine, theirs in (("dtype", lay.dtype, have.get("dtype")),
                                   ("compressor", lay.compressor, have.get("compressor")),
                                   ("shard", list(lay.shard), have.get("shard")),
                                   ("inner chunk", list(lay.chunk), have.get("chunk"))):
            if mine != theirs:
                raise UserError(f"--append: the options given make field {lay.name}'s {what} {mine}, but store "
                                f"{st.path} has {theirs}; leave --crop, --pad, --chunk, --shard-mult, --dtype and "
                                "--compressor out to use the store's")


def _append(out: str, fields: list[FieldInput], styles: StyleInput | None, config: ConvertConfig,
            notes: list[str]) -> tuple[list[FieldInput], Plan, int, int]:
    """Add the files as new samples of the complete store `out`.

    Returns the fields (the store's reference field first), the plan, the
    number of samples before and the bytes written.
    """
    opts = config.storage_options
    st = store.open_store(out, storage_options=opts)
    fields = _check_append(st, fields, config)
    rows = _check_append_styles(st, styles)
    plan = plan_layouts(fields, append_config(config, st.meta))
    _compare_layouts(st, plan)
    notes += list(plan.notes) + _dtype_notes(fields, plan.layouts[0].dtype)
    old = st.nsample
    nnew = len(fields[0].headers)
    group = store.open_group(out, "r+", opts)
    _resize_samples(group, old + nnew)
    try:
        written = write_samples(out, fields, plan.layouts, old, config)
        if rows is not None:
            store.write_styles(out, rows, old, opts)
    except UserError:
        _resize_samples(group, old)
        raise
    store.mark_complete(out, old + nnew, storage_options=opts)
    return fields, plan, old, written
