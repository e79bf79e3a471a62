"""`m2m test`: the inference engine on .npy inputs, writing ``<target>_out.npy`` beside each target file."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Sequence

import numpy as np

from map2map.errors import UserError
from map2map.infer import engine
from map2map.infer.engine import InferSummary
from map2map.npyfile import glob_paired
from map2map.utils import durable
from map2map.infer.specs import InferConfig


def out_npy_path(target: str) -> str:
    """Where `m2m test` writes the prediction for target file `target`: ``<target>_out.npy``."""
    base = target[:-4] if target.endswith(".npy") else target
    return base + "_out.npy"


def write_npy(arr, sample: int, channels: slice, path: str, shard: Sequence[int]) -> None:
    """Copy channels `channels` of `sample` of zarr array `arr` into a new .npy file, one shard-sized
    region at a time (never the whole box in memory), atomically (temporary name, then rename)."""
    shape = (channels.stop - channels.start,) + tuple(arr.shape[2:])
    with durable.atomic_path(path) as tmp:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(arr.dtype), shape=shape)
        axes = [range(0, n, s) for n, s in zip(shape[1:], shard)]
        for starts in np.ndindex(*[len(a) for a in axes]):
            region = tuple(slice(a[i], min(a[i] + s, n)) for a, i, s, n in zip(axes, starts, shard, shape[1:]))
            mm[(slice(None),) + region] = arr[(sample, channels) + region]
        mm.flush()
        del mm


def _write_all(summary: InferSummary, tgts: list[list[str]], keep: bool, storage_options=None) -> None:
    """Write every sample's prediction of the store `summary.output` (a path, or a URL read with
    `storage_options`) beside its target files (and remove the store unless `keep`: `summary.output` is
    then None)."""
    from map2map import store

    arr = store.open_group(summary.output, "r", storage_options, use_consolidated=False)[summary.field]
    shard = tuple(arr.shards[2:]) if arr.shards else tuple(arr.chunks[2:])
    for sample in range(summary.nsample):
        start = 0
        for paths in tgts:
            c = np.load(paths[sample], mmap_mode="r").shape[0]
            path = out_npy_path(paths[sample])
            write_npy(arr, sample, slice(start, start + c), path, shard)
            summary.written.append(path)
            start += c
    if not keep:
        shutil.rmtree(summary.output)  # our own hidden store beside the targets: always local
        summary.output = None


def run(config: InferConfig) -> InferSummary:
    """`m2m test`: predict each sample of .npy inputs with the same engine and write
    ``<target>_out.npy`` next to each target file.

    Predictions go through a prediction store: `config.out` if given (kept),
    else a hidden store in the first target file's directory named after the
    settings, so that a rerun after a crash resumes it; it is removed at the end.
    """
    if not config.test_in_patterns:
        raise UserError("--test-in-patterns: give the .npy glob pattern(s) of the input fields")
    if not config.test_tgt_patterns:
        raise UserError("--test-tgt-patterns: give the .npy glob pattern(s) of the target fields")
    tgts = glob_paired(config.test_tgt_patterns, "--test-tgt-patterns")
    keep = config.out is not None
    if not keep:
        key = json.dumps([list(config.test_in_patterns), list(config.test_tgt_patterns), config.model,
                          os.path.abspath(config.load_state)])
        name = f".m2m-test-{hashlib.sha1(key.encode()).hexdigest()[:12]}.zarr"
        config = dataclasses.replace(config, out=os.path.join(os.path.dirname(tgts[0][0]), name), overwrite=True)
    prep = engine.prepare(config, start_cluster=True)
    try:
        with engine.output_lock(prep.out, "m2m test") as lock:  # held until the store is read (and removed)
            if lock is not None and lock.note:
                prep.notes.append(lock.note)
            summary = engine.execute(prep)
            _write_all(summary, tgts, keep, prep.storage_options)
    finally:
        prep.close()
    return summary
