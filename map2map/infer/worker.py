"""The worker side: Dask tasks that read tile windows, run the model (cached per process) and write shards."""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from map2map.infer.markers import mark_done
from map2map.infer.model import load_model
from map2map.infer.specs import Job, SourceSpec
from map2map.utils import durable

_LOCK = threading.Lock()
_CACHE: OrderedDict[tuple, Any] = OrderedDict()
_CACHE_MAX = 64
_STATS: dict[str, dict[str, int]] = {}
_TOKEN: list[str] = []


def _enter(token: str) -> None:
    """A task of run `token` starts here: drop readers and arrays of earlier runs (a long-lived
    worker of an existing cluster serves many runs), and all but the two latest models."""
    with _LOCK:
        if _TOKEN and _TOKEN[0] == token:
            return
        _TOKEN[:] = [token]
        models = [k for k in _CACHE if k[0] == "model"]
        for key in list(_CACHE):
            if (key[0] != "model" and token not in key) or (key[0] == "model" and key in models[:-2]):
                del _CACHE[key]
        for old in [t for t in _STATS if t != token][:-8]:
            del _STATS[old]


def _cached(key: tuple, make):
    """Per-process cache (a few entries, least recently used dropped) of models, readers and arrays."""
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    value = make()
    with _LOCK:
        _CACHE[key] = value
        while len(_CACHE) > _CACHE_MAX:
            _CACHE.popitem(last=False)
    return value


def _stats(token: str) -> dict[str, int]:
    with _LOCK:
        return _STATS.setdefault(token, {"model_loads": 0, "tasks": 0, "tiles": 0, "max_task_bytes": 0,
                                         "read_s": 0.0, "model_s": 0.0, "write_s": 0.0})


def worker_stats(token: str) -> dict[str, int]:
    """This process's counters for run `token` (for `client.run`)."""
    return dict(_stats(token))


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        count = torch.cuda.device_count()
        name = None
        try:
            from distributed import get_worker

            name = get_worker().name
        except (ImportError, ValueError):
            pass
        if count > 1 and isinstance(name, int):  # a local cluster: worker i on GPU i
            device = f"cuda:{name % count}"
    return device


def _worker_model(job: Job):
    import torch

    if job.torch_threads and torch.get_num_threads() != job.torch_threads:
        torch.set_num_threads(job.torch_threads)
    device = _resolve_device(job.device)

    def make():
        model = load_model(job.model).to(device)
        _stats(job.token)["model_loads"] += 1
        return model

    return _cached(("model", job.model, device), make), device


def _reader(spec: SourceSpec, token: str):
    # readers keep per-process chunk caches and file handles: one per thread
    return _cached(("reader", spec, token, threading.get_ident()), spec.open)


def _out_array(job: Job):
    import zarr

    return _cached(("out", job.out_path, job.out_field, job.token),
                   lambda: zarr.open_group(job.out_path, mode="r+", use_consolidated=False)[job.out_field])


def _read_fields(specs: Sequence[SourceSpec], chans: Sequence[int], norms: Sequence[str] | None, job: Job,
                 sample: int, win, out: np.ndarray) -> None:
    from map2map.data.fields import _norms, apply_norm
    from map2map.data.windows import read_window

    funcs = _norms(norms, len(specs), "norms", job.model.callback_at)
    kwargs = json.loads(job.norm_kwargs_json)
    start = 0
    for spec, c, norm in zip(specs, chans, funcs):
        part = out[start:start + c]
        read_window(_reader(spec, job.token), sample, win, part)
        if norm is not None:
            apply_norm(norm, part, **kwargs)
        start += c


def _criterion(job: Job):
    from map2map.utils.imports import import_attr

    return _cached(("criterion", job.criterion, job.model.callback_at),
                   lambda: import_attr(job.criterion, ["torch.nn"], job.model.callback_at, what="criterion")())


def _shard_files(arr, job: Job, sample: int, regions) -> list[str]:
    """The files of the output shards that make up `regions` (whole shards) of `sample`."""
    shard = arr.shards[2:] if arr.shards else arr.chunks[2:]
    paths = []
    for region in regions:
        ranges = [range(lo // s, -(-hi // s)) for (lo, hi), s in zip(region, shard)]
        for coords in itertools.product(*ranges):
            key = arr.metadata.encode_chunk_key((sample, 0) + coords)
            paths.append(os.path.join(job.out_path, job.out_field, key))
    return paths


def preload(job: Job) -> str:
    """Load the model in this worker ahead of its first tile (a task, so it runs where tiles do)."""
    _enter(job.token)
    _worker_model(job)
    return _resolve_device(job.device)


def run_tiles(job: Job, sample: int, tile_ids: Sequence[int]) -> list[tuple[int, float | None, int]]:
    """The Dask task: predict tiles `tile_ids` of `sample` and write them; returns (tile, loss, voxels)."""
    import torch

    from map2map.data.fields import undo_norms

    _enter(job.token)
    model, device = _worker_model(job)
    plan = job.plan
    stats = _stats(job.token)
    t0 = time.perf_counter()
    x = np.empty((len(tile_ids), sum(job.in_chans)) + plan.window_shape, dtype=np.float32)
    for b, t in enumerate(tile_ids):
        _read_fields(job.inputs, job.in_chans, job.in_norms, job, sample, plan.window(t), x[b])
    t1 = time.perf_counter()
    with torch.inference_mode():
        y = model(torch.from_numpy(x).to(device))
        if tuple(y.shape[2:]) != job.out_shape:
            raise RuntimeError(f"model output {tuple(y.shape[2:])} differs from the planned {job.out_shape}")
        y = y.float().cpu().numpy()
    t2 = time.perf_counter()
    nbytes = x.nbytes + y.nbytes
    arr = _out_array(job)
    results = []
    for b, t in enumerate(tile_ids):
        size = plan.size(t)
        region = plan.out_region(t)
        pred = np.ascontiguousarray(y[b][(slice(None),) + tuple(
            slice(o, o + n * plan.scale) for o, n in zip(job.offsets, size))])
        loss = None
        if job.targets:
            tgt = np.empty_like(pred)
            _read_fields(job.targets, job.tgt_chans, job.tgt_norms, job, sample, region, tgt)
            with torch.inference_mode():
                loss = float(_criterion(job)(torch.from_numpy(pred)[None], torch.from_numpy(tgt)[None]))
            nbytes += tgt.nbytes
        undo_norms(pred, job.tgt_norms, job.out_chans, job.model.callback_at, channel_axis=0,
                   **json.loads(job.norm_kwargs_json))
        arr[(sample, slice(None)) + tuple(slice(lo, hi) for lo, hi in region)] = pred
        results.append((t, loss, int(pred.size)))
    durable.fsync_files(_shard_files(arr, job, sample, [plan.out_region(t) for t in tile_ids]))
    for t, loss, n in results:  # only once every shard of the batch is on disk
        mark_done(job.done_dir, sample, t, loss, n)
    t3 = time.perf_counter()
    with _LOCK:
        stats["read_s"] += t1 - t0
        stats["model_s"] += t2 - t1
        stats["write_s"] += t3 - t2
        stats["tasks"] += 1
        stats["tiles"] += len(tile_ids)
        stats["max_task_bytes"] = max(stats["max_task_bytes"], nbytes)
    return results
