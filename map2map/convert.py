"""`m2m convert`: stream .npy fields into a crop-aligned Zarr store.

Files of each ``--field NAME=PATTERN`` are sorted by path, and sample i pairs
the i-th file of every field (the original toolkit's pairing of glob
matches).  Every header is checked before the output is touched.  Data then
flows in *units*: shard-aligned blocks of one sample, read plane by plane
through memory maps, converted to the stored dtype, checked for NaN/Inf and
written as whole shards, two units at a time.  No unit holds more than a few
shards, so memory does not grow with the field.

Safety: a new store is marked complete only after its last byte is written;
``--overwrite`` builds the new store beside the old one and swaps them at
the end; ``--append`` grows the arrays but moves the completion mark (the
number of complete samples, with the consolidated metadata readers use)
only when every new sample is written, so an interrupted append leaves the
earlier samples readable.
"""

from __future__ import annotations

import glob
import math
import os
import sys
import multiprocessing
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import zarr
from tqdm import tqdm

from map2map import geometry, npyfile, store
from map2map.errors import UserError

MAX_CHANNELS = 16
UNIT_BYTES = 32 * 2**20


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


@dataclass
class Options:
    """Everything `m2m convert` takes, as plain values (the CLI fills it)."""

    output: str
    fields: list[str]
    crop: Sequence[int] | None = None
    pad: int | None = None
    boxsize: float | None = None
    overwrite: bool = False
    append: bool = False
    chunk: Sequence[int] | None = None
    shard_mult: int = 1
    dtype: str = "float32"
    compressor: str = "none"
    allow_nonfinite: bool = False
    workers: int = 2
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def parse_field(spec: str) -> tuple[str, str]:
    """Split ``NAME=PATTERN``; the name must be a plain identifier-like word."""
    name, sep, pattern = spec.partition("=")
    if not sep or not name or not pattern:
        raise UserError(f"--field {spec!r}: expected NAME=PATTERN, e.g. disp='sims/*/dis.npy'")
    if not name.replace("_", "").replace("-", "").isalnum() or name.startswith(("source_", "sample")):
        raise UserError(f"--field name {name!r}: use letters, digits, '_' or '-' (not 'sample' or 'source_*')")
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
    """Expand every pattern, check every header, and check that the fields pair up."""
    fields: list[FieldInput] = []
    for spec in specs:
        name, pattern = parse_field(spec)
        if any(f.name == name for f in fields):
            raise UserError(f"--field {name!r} is given twice")
        paths = sorted(glob.glob(os.path.expanduser(pattern)))
        if not paths:
            raise UserError(f"--field {name}: pattern {pattern!r} matches no files")
        headers = [npyfile.inspect(p) for p in paths]
        for h in headers:
            _check_shape(h)
            if h.shape != headers[0].shape:
                raise UserError(f"--field {name}: {h.path} has shape {h.shape} but "
                                f"{headers[0].path} has {headers[0].shape}")
        fields.append(FieldInput(name, pattern, headers))
    counts = {f.name: len(f.headers) for f in fields}
    if len(set(counts.values())) > 1:
        raise UserError("fields have different numbers of files: "
                        + ", ".join(f"{n}: {c}" for n, c in counts.items()))
    ndims = {len(f.spatial) for f in fields}
    if len(ndims) > 1:
        raise UserError("fields mix 2D and 3D grids: " + ", ".join(f"{f.name}: {f.spatial}" for f in fields))
    return fields


def plan_layouts(fields: list[FieldInput], opts: Options) -> list[store.FieldLayout]:
    """Chunking for every field: shards = crop (times `shard_mult`), inner chunks chosen for the halo.

    Crop, pad and chunk are in voxels of the first field's grid; a field on a
    grid `r` times finer (or coarser) gets them scaled by `r`, so crop windows
    of input and target cover the same shards.
    """
    ref = fields[0].spatial
    ndim = len(ref)
    crop = geometry.as_tuple(opts.crop if opts.crop else [min(128, n) for n in ref], ndim, "--crop")
    if any(c <= 0 for c in crop):
        raise UserError(f"--crop {list(crop)} must be positive")
    pad = opts.pad if opts.pad is not None else max(1, 3 * min(crop) // 8)
    if pad < 0:
        raise UserError(f"--pad {pad} must not be negative")
    if opts.chunk:
        chunk = geometry.as_tuple(opts.chunk, ndim, "--chunk")
    else:
        chunk = tuple(geometry.choose_inner_chunk(c, pad, ndim=ndim) for c in crop)
    shard = tuple(c * opts.shard_mult for c in crop)
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
                                         opts.dtype, opts.compressor))
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


_OPEN: dict[tuple[str, str], zarr.Array] = {}


def _array(path: str, name: str) -> zarr.Array:
    """The array `name` of the store at `path`, opened once per process."""
    key = (path, name)
    if key not in _OPEN:
        _OPEN[key] = zarr.open_group(path, mode="r+", use_consolidated=False)[name]
    return _OPEN[key]


def _write_unit(path: str, name: str, header: npyfile.NpyHeader, sample: int, region: tuple[slice, ...],
                dtype: str, check_finite: bool) -> tuple[int, int]:
    """Convert one unit; returns (bytes written, number of non-finite values found)."""
    buf = np.empty((header.shape[0],) + tuple(s.stop - s.start for s in region), dtype=dtype)
    npyfile.read_block(header, (slice(None),) + region, buf)
    bad = int(buf.size - np.count_nonzero(np.isfinite(buf))) if check_finite else 0
    _array(path, name)[(sample, slice(None)) + region] = buf
    return buf.nbytes, bad


def _jobs(fields: list[FieldInput], layouts: list[store.FieldLayout], first_sample: int,
          itemsize: int) -> Iterator[tuple[str, npyfile.NpyHeader, int, tuple[slice, ...]]]:
    for i in range(len(fields[0].headers)):
        for f, lay in zip(fields, layouts):
            for region in units(lay, itemsize):
                yield f.name, f.headers[i], first_sample + i, region


def _pool(workers: int) -> Executor:
    """Worker processes for the copy (zarr-python serialises threads on its event loop).

    Spawned, not forked: a forked child would inherit zarr's event loop state
    from the parent, which has already opened the store.  One unit of work or
    one worker runs in this process instead.
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
                  opts: Options) -> None:
    """Write every file of every field as samples ``first_sample, first_sample + 1, ...``.

    Stops early once a file is known to hold NaN/Inf (unless allowed), after
    counting that file's values, and raises a UserError naming it.
    """
    _OPEN.clear()  # array objects cache their shape: never reuse them across writes
    itemsize = np.dtype(opts.dtype).itemsize
    jobs = list(_jobs(fields, layouts, first_sample, itemsize))
    total = sum(math.prod(s.stop - s.start for s in r) * h.shape[0] * itemsize for _, h, _, r in jobs)
    workers = min(opts.workers, max(1, total // UNIT_BYTES))
    bad: dict[str, int] = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not opts.progress,
              file=sys.stderr) as bar, _pool(workers) as pool:
        futures = [(h.path, pool.submit(_write_unit, path, n, h, s, r, opts.dtype, not opts.allow_nonfinite))
                   for n, h, s, r in jobs]
        for src, fut in futures:
            nbytes, nbad = fut.result()
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
        src = group[f"source_{f.name}"]
        src[first_sample:first_sample + len(f.headers)] = np.array([os.path.abspath(h.path) for h in f.headers])
    group["sample"][first_sample:] = np.arange(first_sample, first_sample + len(fields[0].headers))


def _settings(fields: list[FieldInput], opts: Options, pad: int, crop: Sequence[int]) -> dict[str, Any]:
    out: dict[str, Any] = {
        f.name: {"pattern": f.pattern, "source_dtype": str(f.headers[0].dtype),
                 "allow_nonfinite": opts.allow_nonfinite} for f in fields}
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


def convert(opts: Options) -> dict[str, Any]:
    """Run a conversion; returns a summary for printing.  Raises UserError on bad input."""
    if opts.overwrite and opts.append:
        raise UserError("--overwrite and --append exclude each other")
    fields = gather(opts.fields)
    layouts = plan_layouts(fields, opts)
    ref = fields[0].spatial
    crop = list(layouts[0].shard[d] // opts.shard_mult for d in range(len(ref)))
    pad = opts.pad if opts.pad is not None else max(1, 3 * min(crop) // 8)
    nnew = len(fields[0].headers)
    out = Path(opts.output)
    notes = [f"{f.name}: {f.headers[0].dtype} stored as {opts.dtype}" for f in fields
             if f.headers[0].dtype != np.dtype(opts.dtype)]
    if opts.append:
        return _append(out, fields, layouts, opts, notes)
    target = out
    if out.exists() and not opts.overwrite:
        _refuse_existing(out)
        notes.append(f"{out} is an incomplete store from an interrupted run: converting it again")
        store.remove(out)
    elif out.exists():
        if store.read_meta(out) is None and any(out.iterdir()):
            raise UserError(f"--overwrite: {out} is not a map2map store; refusing to delete it")
        target = out.with_name(out.name + ".m2m-partial")
        if target.exists():
            store.remove(target)
    store.create(target, layouts, nsample=nnew, boxsize=opts.boxsize,
                 settings=_settings(fields, opts, pad, crop) | opts.extra)
    try:
        write_samples(str(target), fields, layouts, 0, opts)
    except UserError:
        store.remove(target)
        raise
    store.mark_complete(target, nnew)
    if target != out:
        trash = out.with_name(out.name + ".m2m-old")
        os.replace(out, trash)
        os.replace(target, out)
        store.remove(trash)
    return {"output": str(out), "nsample": nnew, "layouts": layouts, "notes": notes}


def _append(out: Path, fields: list[FieldInput], layouts: list[store.FieldLayout], opts: Options,
            notes: list[str]) -> dict[str, Any]:
    st = store.open_store(out)
    _check_append(st, layouts)
    old = st.nsample
    nnew = len(fields[0].headers)
    group = zarr.open_group(str(out), mode="r+", use_consolidated=False)
    for name in list(group.array_keys()):
        arr = group[name]
        if arr.metadata.dimension_names and arr.metadata.dimension_names[0] == "sample":
            arr.resize((old + nnew,) + arr.shape[1:])
    try:
        write_samples(str(out), fields, layouts, old, opts)
    except UserError:
        for name in list(group.array_keys()):
            arr = group[name]
            if arr.metadata.dimension_names and arr.metadata.dimension_names[0] == "sample":
                arr.resize((old,) + arr.shape[1:])
        raise
    store.mark_complete(out, old + nnew)
    return {"output": str(out), "nsample": old + nnew, "appended": nnew, "layouts": layouts, "notes": notes}
