"""`m2m convert`: stream .npy fields into a crop-aligned Zarr store.

`run` takes a `ConvertConfig` (the command line's options) and returns a
`ConvertSummary`.  Files of each ``--field NAME=PATTERN`` are sorted by path,
and sample i pairs the i-th file of every field (`map2map.npyfile.glob_paired`).
Every name and header is checked before the output is touched.  Data then
flows in *units*: shard-aligned blocks of one sample, read plane by plane
through memory maps, converted to the stored dtype, checked for NaN/Inf and
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
readable.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import sys
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import zarr
from tqdm import tqdm

from map2map import geometry, npyfile, store
from map2map.errors import UserError
from map2map.stage import Summary

MAX_CHANNELS = 16
UNIT_BYTES = 32 * 2**20


@dataclass(frozen=True)
class ConvertConfig:
    """Everything `m2m convert` takes; field names are the command line's option names.

    `field` holds the ``NAME=PATTERN`` strings of ``--field``.  `crop`, `pad`
    and `chunk` are in voxels of the first field's grid (None: the defaults
    `plan_layouts` describes).
    """

    output: str
    field: tuple[str, ...]
    crop: tuple[int, ...] | None = None
    pad: int | None = None
    boxsize: float | None = None
    overwrite: bool = False
    append: bool = False
    chunk: tuple[int, ...] | None = None
    shard_mult: int = 1
    dtype: str = "float32"
    compressor: str = "none"
    allow_nonfinite: bool = False
    workers: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.field, str):  # one spec given bare
            object.__setattr__(self, "field", (self.field,))
        for name in ("field", "crop", "chunk"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, int)):
                object.__setattr__(self, name, tuple(value))


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

    def lines(self) -> list[str]:
        out = [f"note: {note}" for note in self.notes]
        for lay in self.layouts:
            out.append(f"{lay['name']}: {lay['channels']} x {tuple(lay['spatial'])}, shard {tuple(lay['shard'])}, "
                       f"inner chunk {tuple(lay['chunk'])}, {lay['dtype']}")
        verb = "wrote" if self.appended is None else f"appended {self.appended} samples, now"
        out.append(f"{self.output}: {verb} {self.nsample} samples, complete")
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
    if shape[0] > MAX_CHANNELS or _looks_channel_last(shape):
        hint = (" it looks channel-last: move the channel axis first (np.moveaxis(a, -1, 0))"
                if shape[-1] <= MAX_CHANNELS else
                " a scalar field needs a leading channel axis of 1 (a[None])")
        raise UserError(f"{header.path} has shape {shape} with {shape[0]} channels on its first axis;{hint}")


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
    ndims = {len(f.spatial) for f in fields}
    if len(ndims) > 1:
        raise UserError("fields mix 2D and 3D grids: " + ", ".join(f"{f.name}: {f.spatial}" for f in fields))
    return fields


def _shape_option(value: int | Sequence[int], ndim: int, option: str) -> tuple[int, ...]:
    try:
        return geometry.as_tuple(value, ndim, option)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def default_pad(crop: Sequence[int]) -> int:
    """The halo pad assumed when ``--pad`` is not given: 3/8 of the smallest crop side, at least 1."""
    return max(1, 3 * min(crop) // 8)


def plan_layouts(fields: list[FieldInput], config: ConvertConfig) -> list[store.FieldLayout]:
    """Chunking for every field: shards = crop (times `shard_mult`), inner chunks chosen for the halo.

    Crop, pad and chunk are in voxels of the first field's grid; a field on a
    grid `r` times finer (or coarser) gets them scaled by `r`, so crop windows
    of input and target cover the same shards.
    """
    ref = fields[0].spatial
    ndim = len(ref)
    crop = _shape_option(config.crop if config.crop else [min(128, n) for n in ref], ndim, "--crop")
    if any(c <= 0 for c in crop):
        raise UserError(f"--crop {list(crop)} must be positive")
    if config.shard_mult < 1:
        raise UserError(f"--shard-mult {config.shard_mult} must be at least 1")
    pad = config.pad if config.pad is not None else default_pad(crop)
    if pad < 0:
        raise UserError(f"--pad {pad} must not be negative")
    if config.chunk:
        chunk = _shape_option(config.chunk, ndim, "--chunk")
        if any(c <= 0 for c in chunk):
            raise UserError(f"--chunk {list(chunk)} must be positive")
    else:
        chunk = tuple(geometry.choose_inner_chunk(c, pad, ndim=ndim) for c in crop)
    shard = tuple(c * config.shard_mult for c in crop)
    if any(s % c for s, c in zip(shard, chunk)):
        raise UserError(f"--chunk {list(chunk)} must divide the shard {list(shard)} (crop x shard multiple)")
    layouts = []
    for f in fields:
        try:
            num, den = geometry.grid_ratio(f.spatial, ref)
            f_shard = geometry.scale_shape(shard, num, den, "shard")
            f_chunk = geometry.scale_shape(chunk, num, den, "chunk")
        except ValueError as exc:
            raise UserError(f"--field {f.name} (grid {list(f.spatial)}): {exc}") from None
        f_shard = tuple(min(s, n) for s, n in zip(f_shard, f.spatial))
        f_chunk = tuple(min(c, s) for c, s in zip(f_chunk, f_shard))
        if any(s % c for s, c in zip(f_shard, f_chunk)):
            f_chunk = f_shard
        layouts.append(store.FieldLayout(f.name, f.channels, f.spatial, f_shard, f_chunk,
                                         config.dtype, config.compressor))
    return layouts


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


def _write_task(path: str, task: _Task, dtype: str, check_finite: bool) -> tuple[int, int]:
    """Convert the units of one task; returns (bytes written, number of non-finite values found).

    Opens the store's array for this task only: an array object caches the
    shape it was opened with, so none outlives the write it was opened for.
    """
    arr = zarr.open_group(path, mode="r+", use_consolidated=False)[task.field]
    nbytes = bad = 0
    for region in task.regions:
        buf = np.empty((task.header.shape[0],) + tuple(s.stop - s.start for s in region), dtype=dtype)
        npyfile.read_block(task.header, (slice(None),) + region, buf)
        if check_finite:
            bad += int(buf.size - np.count_nonzero(np.isfinite(buf)))
        arr[(task.sample, slice(None)) + region] = buf
        nbytes += buf.nbytes
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


def write_samples(path: str, fields: list[FieldInput], layouts: list[store.FieldLayout], first_sample: int,
                  config: ConvertConfig) -> int:
    """Write every file of every field as samples ``first_sample, first_sample + 1, ...``; returns the bytes.

    Stops early once a file is known to hold NaN/Inf (unless allowed), after
    counting that file's values, and raises a UserError naming it.
    """
    itemsize = np.dtype(config.dtype).itemsize
    tasks = list(_tasks(fields, layouts, first_sample, itemsize))
    total = sum(t.nbytes for t in tasks)
    workers = min(config.workers, max(1, total // UNIT_BYTES), len(tasks))
    bad: dict[str, int] = {}
    written = 0
    with tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not config.progress,
              file=sys.stderr) as bar, _pool(workers) as pool:
        futures = [(t.header.path, pool.submit(_write_task, path, t, config.dtype, not config.allow_nonfinite))
                   for t in tasks]
        for src, fut in futures:
            nbytes, nbad = fut.result()
            written += nbytes
            bar.update(nbytes)
            if nbad:
                bad[src] = bad.get(src, 0) + nbad
            elif bad and src not in bad:  # the bad file is fully counted: stop
                for _, f in futures:
                    f.cancel()
                break
    if bad:
        path0, count = next(iter(bad.items()))
        raise UserError(f"{path0} has {count} non-finite values (NaN/Inf); "
                        "fix the data or pass --allow-nonfinite to keep them")
    group = zarr.open_group(path, mode="r+", use_consolidated=False)
    for f in fields:
        src = group[store.source_name(f.name)]
        src[first_sample:first_sample + len(f.headers)] = np.array([h.path for h in f.headers])
    group["sample"][first_sample:] = np.arange(first_sample, first_sample + len(fields[0].headers))
    return written


def _settings(fields: list[FieldInput], config: ConvertConfig, pad: int, crop: Sequence[int]) -> dict[str, Any]:
    out: dict[str, Any] = {
        f.name: {"pattern": f.pattern, "source_dtype": str(f.headers[0].dtype),
                 "allow_nonfinite": config.allow_nonfinite} for f in fields}
    out.update(created_by="m2m convert", crop=list(crop), pad=pad, reference_field=fields[0].name)
    return out


def _refuse_existing(out: Path) -> None:
    meta = store.read_meta(out)
    if meta is None and out.exists():
        raise UserError(f"{out} exists and is not a map2map store; choose another OUTPUT")
    if meta is not None and meta.get("complete"):
        raise UserError(f"{out} exists and is complete; pass --overwrite to replace it or --append to add samples")


def _check_append(st: store.Store, layouts: list[store.FieldLayout]) -> None:
    if sorted(st.field_names) != sorted(lay.name for lay in layouts):
        raise UserError(f"--append: store {st.path} has fields {st.field_names}, "
                        f"but --field gives {[lay.name for lay in layouts]}")
    for lay in layouts:
        arr = st.field(lay.name)
        have = (arr.shape[1:], arr.dtype, arr.shards[2:] if arr.shards else arr.chunks[2:], arr.chunks[2:])
        want = ((lay.channels,) + lay.spatial, np.dtype(lay.dtype), lay.shard, lay.chunk)
        if have != want:
            raise UserError(f"--append: field {lay.name} is stored as (channels+grid, dtype, shard, chunk) "
                            f"{have}, the new files give {want}")


def run(config: ConvertConfig) -> ConvertSummary:
    """Run a conversion (see the module docstring).  Raises UserError on bad input, before writing anything."""
    t0 = time.perf_counter()
    if config.overwrite and config.append:
        raise UserError("--overwrite and --append exclude each other")
    fields = gather(config.field)
    layouts = plan_layouts(fields, config)
    crop = [layouts[0].shard[d] // config.shard_mult for d in range(len(fields[0].spatial))]
    pad = config.pad if config.pad is not None else default_pad(crop)
    out = Path(config.output)
    notes = [f"{f.name}: {f.headers[0].dtype} stored as {config.dtype}" for f in fields
             if f.headers[0].dtype != np.dtype(config.dtype)]
    if config.append:
        old, written = _append(out, fields, layouts, config)
        appended: int | None = len(fields[0].headers)
        nsample = old + appended
    else:
        written = _create(out, fields, layouts, config, _settings(fields, config, pad, crop), notes)
        appended, nsample = None, len(fields[0].headers)
    return ConvertSummary(str(out), nsample, appended, [dataclasses.asdict(lay) for lay in layouts], notes,
                          written, time.perf_counter() - t0)


def _create(out: Path, fields: list[FieldInput], layouts: list[store.FieldLayout], config: ConvertConfig,
            settings: dict[str, Any], notes: list[str]) -> int:
    """Write a new store at `out` (built beside it and swapped in if it replaces one); returns the bytes."""
    nnew = len(fields[0].headers)
    target = out
    if out.exists() and not config.overwrite:
        _refuse_existing(out)
        notes.append(f"{out} is an incomplete store from an interrupted run: converting it again")
        store.remove(out)
    elif out.exists():
        if store.read_meta(out) is None and any(out.iterdir()):
            raise UserError(f"--overwrite: {out} is not a map2map store; refusing to delete it")
        target = Path(store.staged_path(out))
        if target.exists():
            store.remove(target)
    store.create(target, layouts, nsample=nnew, boxsize=config.boxsize, settings=settings)
    try:
        written = write_samples(str(target), fields, layouts, 0, config)
    except UserError:
        store.remove(target)
        raise
    store.mark_complete(target, nnew)
    if target != out:
        store.swap_in(target, out)
    return written


def _resize_samples(group: zarr.Group, nsample: int) -> None:
    """Give every per-sample array of the store `nsample` samples."""
    for name in list(group.array_keys()):
        arr = group[name]
        if arr.metadata.dimension_names and arr.metadata.dimension_names[0] == "sample":
            arr.resize((nsample,) + arr.shape[1:])


def _append(out: Path, fields: list[FieldInput], layouts: list[store.FieldLayout],
            config: ConvertConfig) -> tuple[int, int]:
    """Add the files as new samples of the complete store `out`; returns (samples before, bytes written)."""
    st = store.open_store(out)
    _check_append(st, layouts)
    old = st.nsample
    nnew = len(fields[0].headers)
    group = zarr.open_group(str(out), mode="r+", use_consolidated=False)
    _resize_samples(group, old + nnew)
    try:
        written = write_samples(str(out), fields, layouts, old, config)
    except UserError:
        _resize_samples(group, old)
        raise
    store.mark_complete(out, old + nnew)
    return old, written
