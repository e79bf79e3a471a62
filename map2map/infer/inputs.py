"""The client side: what the input (a store, or .npy glob patterns) holds, checked before any work."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from map2map import storage, store
from map2map.npyfile import glob_paired
from map2map.errors import UserError
from map2map.infer.specs import InferConfig, SourceSpec
from map2map.modelfit import file_stamp


@dataclass
class Inputs:
    inputs: list[SourceSpec]
    targets: list[SourceSpec]
    in_chans: list[int]
    tgt_chans: list[int]
    box: tuple[int, ...]
    nsample: int
    boxsize: float | None
    in_shard: tuple[int, ...] | None
    sources: list[str]
    label: str
    identity: Any


def store_location(location: str) -> str:
    """How the run names an input store: an absolute path, or a normalised URL."""
    if storage.is_remote(location):
        return storage.normalise(location)
    return os.path.abspath(storage.local_path(location))


def store_stamp(path: str, storage_options) -> Any:
    """What changes when the store at `path` is rewritten: its ``zarr.json``'s file stamp, or for a URL
    the object's size, modification time and ETag."""
    if not storage.is_remote(path):
        return file_stamp(os.path.join(path, "zarr.json"))
    fs, key = storage.filesystem(storage.join(path, "zarr.json"), storage_options)
    info = fs.info(key)
    return [info.get("size"), str(info.get("LastModified", info.get("mtime", ""))), info.get("ETag")]


def store_inputs(opts: InferConfig) -> Inputs:
    path = store_location(opts.data)
    options = dict(opts.storage_options or {})
    st = store.open_store(path, storage_options=options)
    if not opts.in_fields:
        raise UserError(f"--in: name the input field(s) of {path}; it has {', '.join(st.field_names)}")
    names = list(opts.in_fields) + list(opts.tgt or [])
    if len(set(names)) != len(names):
        raise UserError(f"field names repeat in --in / --tgt: {names}")
    arrays = [st.field(n) for n in names]
    specs = [SourceSpec("zarr", path, n, st.nsample, storage_options=options if storage.is_remote(path) else None)
             for n in names]
    nin = len(opts.in_fields)
    first = arrays[0]
    shard = tuple(first.shards[2:]) if first.shards else tuple(first.chunks[2:])
    stamp = store_stamp(path, options)
    return Inputs(specs[:nin], specs[nin:], [a.shape[1] for a in arrays[:nin]],
                  [a.shape[1] for a in arrays[nin:]], _same_box(arrays[:nin], names[:nin], "input"), st.nsample,
                  st.boxsize, shard, st.sources(opts.in_fields[0]), path,
                  {"store": path, "stamp": stamp, "fields": names})


def _same_box(arrays, names, what: str) -> tuple[int, ...]:
    boxes = {tuple(a.shape[2:]) for a in arrays}
    if len(boxes) > 1:
        raise UserError(f"{what} fields differ in grid: " + ", ".join(f"{n} {list(a.shape[2:])}"
                                                                     for n, a in zip(names, arrays)))
    return boxes.pop()


def npy_inputs(opts: InferConfig) -> Inputs:
    from map2map import npyfile

    ins = glob_paired(opts.test_in_patterns, "--test-in-patterns")
    tgts = glob_paired(opts.test_tgt_patterns, "--test-tgt-patterns") if opts.test_tgt_patterns else []
    if tgts and len(tgts[0]) != len(ins[0]):
        raise UserError(f"input patterns match {len(ins[0])} files but target patterns {len(tgts[0])}")
    shapes = []
    for paths in ins + tgts:
        heads = [npyfile.inspect(p) for p in paths]
        for h in heads:
            if len(h.shape) not in (3, 4) or h.shape != heads[0].shape:
                raise UserError(f"{h.path} has shape {h.shape}; expected channel-first (C, X, Y[, Z]) like "
                                f"{heads[0].path} {heads[0].shape}")
        shapes.append(heads[0].shape)
    boxes = {s[1:] for s in shapes[:len(ins)]}
    if len(boxes) > 1:
        raise UserError(f"input files differ in grid: {sorted(boxes)}")
    specs = [SourceSpec("npy", paths=tuple(p)) for p in ins + tgts]
    stamp = [(p, file_stamp(p)) for paths in ins + tgts for p in paths]
    return Inputs(specs[:len(ins)], specs[len(ins):], [s[0] for s in shapes[:len(ins)]],
                  [s[0] for s in shapes[len(ins):]], boxes.pop(), len(ins[0]), None, None, ins[0],
                  ",".join(opts.test_in_patterns), {"patterns": [list(opts.test_in_patterns), list(opts.test_tgt_patterns or [])],
                                               "stamp": stamp})


def target_box(inp: Inputs, opts: InferConfig) -> tuple[int, ...]:
    if not inp.targets:
        return tuple(n * opts.scale_factor for n in inp.box)
    boxes = set()
    for spec in inp.targets:
        src = spec.open()
        boxes.add(tuple(src.shape[2:]))
    want = tuple(n * opts.scale_factor for n in inp.box)
    if boxes != {want}:
        raise UserError(f"target grid {sorted(boxes)} is not --scale-factor {opts.scale_factor} times the input "
                        f"grid {list(inp.box)}")
    return want


CHECK_CHUNK = 2**24  # values per read when scanning an input file for non-finite values (64 MiB of float32)


def count_nonfinite(path: str) -> tuple[int, int]:
    """(NaN/Inf values, finite values too large for float32) in the .npy file `path`, read in chunks
    of `CHECK_CHUNK` values through a memory map (the reader casts to float32)."""
    data = np.load(path, mmap_mode="r")
    if not np.issubdtype(data.dtype, np.floating):
        return 0, 0
    flat = data.reshape(-1, order="A")  # a view of the map in its storage order, C or Fortran
    big = float(np.finfo(np.float32).max)
    nonfinite = overflow = 0
    for start in range(0, flat.size, CHECK_CHUNK):
        chunk = np.asarray(flat[start:start + CHECK_CHUNK])
        finite = np.isfinite(chunk)
        nonfinite += int(chunk.size - np.count_nonzero(finite))
        if chunk.dtype.itemsize > 4:
            overflow += int(np.count_nonzero(np.abs(chunk, where=finite, out=np.zeros_like(chunk)) > big))
    return nonfinite, overflow


def check_finite(inp: Inputs) -> None:
    """Refuse input .npy files with NaN/Inf values (or values float32 cannot hold), as `m2m convert` refuses
    them, unless ``--allow-nonfinite``: the prediction would be NaN wherever a tile's window meets one."""
    for spec in inp.inputs:
        for path in spec.paths:
            nonfinite, overflow = count_nonfinite(path)
            if nonfinite:
                raise UserError(f"{path} has {nonfinite} non-finite values (NaN/Inf); fix the data or pass "
                                "--allow-nonfinite to predict anyway")
            if overflow:
                raise UserError(f"{path} has {overflow} values too large for float32 (they become Inf when "
                                "read as float32); rescale the data or pass --allow-nonfinite to predict anyway")
