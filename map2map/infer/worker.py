"""The worker side: Dask tasks that read tile windows, run the model and write shards.

Each worker process holds one `WorkerState`, a Dask worker plugin that the
client registers (`map2map.infer.cluster.register_state`) and the tasks
reach through ``distributed.get_worker()``.  It owns what a worker keeps
between tasks: the models (the two latest, so runs of the same model on a
long-lived cluster load it once), and for the current run the field readers
(one set per thread: readers keep chunk caches and open files), the output
array, the criterion and the run's statistics.  A run is named by its token:
the first task of a new run drops the readers and arrays of earlier runs.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np
from distributed.diagnostics.plugin import WorkerPlugin

from map2map import tiles
from map2map.infer import gpus
from map2map.infer.markers import mark_done
from map2map.infer.specs import Job
from map2map.utils import durable

PLUGIN_NAME = "map2map-infer"
MODELS_KEPT = 2  # models a worker keeps across runs
RUNS_KEPT = 8  # runs whose statistics a worker keeps


def _new_stats() -> dict[str, Any]:
    return {"model_loads": 0, "tasks": 0, "tiles": 0, "max_task_bytes": 0,
            "read_s": 0.0, "model_s": 0.0, "write_s": 0.0}


class WorkerState(WorkerPlugin):
    """What one worker process keeps between tasks (see the module docstring).

    Registered once per cluster under `PLUGIN_NAME` and idempotent, so a
    later run finds the state (and the models) earlier runs left.  Everything
    is made in `setup`, on the worker: the object the client pickles is empty.
    """

    name = PLUGIN_NAME
    idempotent = True

    def setup(self, worker=None) -> None:
        self.worker = worker
        self._lock = threading.Lock()
        self.token: str | None = None
        self.models: OrderedDict[tuple, Any] = OrderedDict()
        self.stacks: dict[tuple, Any] = {}
        self.outputs: dict[tuple, Any] = {}
        self.criteria: dict[tuple, Any] = {}
        self.stats: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def teardown(self, worker=None) -> None:
        with self._lock:
            self.models.clear()
            self.stacks.clear()
            self.outputs.clear()
            self.criteria.clear()

    def begin(self, token: str) -> None:
        """A task of run `token` starts: drop the readers and arrays earlier runs opened."""
        with self._lock:
            if self.token != token:
                self.token = token
                self.stacks = {k: v for k, v in self.stacks.items() if k[0] == token}
                self.outputs = {k: v for k, v in self.outputs.items() if k[0] == token}
            if token not in self.stats:
                self.stats[token] = _new_stats()
                while len(self.stats) > RUNS_KEPT:
                    self.stats.popitem(last=False)

    def record(self, token: str, read_s: float, model_s: float, write_s: float, ntiles: int, nbytes: int) -> None:
        """Count one finished task of run `token`: its phases' seconds, tiles and bytes held."""
        with self._lock:
            stats = self.stats.setdefault(token, _new_stats())
            stats["read_s"] += read_s
            stats["model_s"] += model_s
            stats["write_s"] += write_s
            stats["tasks"] += 1
            stats["tiles"] += ntiles
            stats["max_task_bytes"] = max(stats["max_task_bytes"], nbytes)

    def run_stats(self, token: str) -> dict[str, Any]:
        """A copy of the statistics of run `token` (empty if this worker ran none of its tasks)."""
        with self._lock:
            return dict(self.stats.get(token, {}))

    def model(self, job: Job):
        """The job's model on this worker's device (loaded once, the `MODELS_KEPT` latest kept), and the device."""
        import torch

        if job.torch_threads and torch.get_num_threads() != job.torch_threads:
            torch.set_num_threads(job.torch_threads)
        device = self.device(job.device)
        key = (job.model, device)
        with self._lock:  # one load at a time: threads of one worker share it
            if key not in self.models:
                self.models[key] = job.model.load().to(device)
                self.stats.setdefault(job.token, _new_stats())["model_loads"] += 1
                while len(self.models) > MODELS_KEPT:
                    self.models.popitem(last=False)
            self.models.move_to_end(key)
            return self.models[key], device

    def device(self, device: str) -> str:
        """The torch device for `device` ("auto", "cpu", "cuda") on this worker: "cpu" or "cuda:K" by the
        rule of `map2map.infer.gpus.worker_device`, over what this worker observes (`gpus.observe`)."""
        if device == "cpu":
            return "cpu"
        return gpus.worker_device(device, gpus.observe(self.worker))

    def stack(self, job: Job, role: str):
        """This thread's `FieldStack` of the job's inputs (`role` "in") or targets ("tgt")."""
        from map2map.data.fieldio import FieldStack, lookup_norms

        key = (job.token, role, threading.get_ident())
        with self._lock:
            stack = self.stacks.get(key)
        if stack is None:
            specs, norms = (job.inputs, job.in_norms) if role == "in" else (job.targets, job.tgt_norms)
            what = "in_norms" if role == "in" else "tgt_norms"
            stack = FieldStack([s.open() for s in specs],
                               lookup_norms(norms, len(specs), what, job.model.callback_at),
                               json.loads(job.norm_kwargs_json))
            with self._lock:
                self.stacks[key] = stack
        return stack

    def output(self, job: Job):
        """The output array of the job (opened once per run)."""
        key = (job.token, job.out_path, job.out_field)
        with self._lock:
            if key not in self.outputs:
                import zarr

                group = zarr.open_group(job.out_path, mode="r+", use_consolidated=False)
                self.outputs[key] = group[job.out_field]
            return self.outputs[key]

    def criterion(self, job: Job):
        from map2map.utils.imports import import_attr

        key = (job.criterion, job.model.callback_at)
        with self._lock:
            if key not in self.criteria:
                cls = import_attr(job.criterion, ["torch.nn"], job.model.callback_at, what="criterion")
                self.criteria[key] = cls()
            return self.criteria[key]


def worker_state() -> WorkerState:
    """The `WorkerState` of the Dask worker running this task."""
    from distributed import get_worker

    state = get_worker().plugins.get(PLUGIN_NAME)
    if not isinstance(state, WorkerState):
        raise RuntimeError(f"this Dask worker has no {PLUGIN_NAME!r} plugin: the client registers it "
                           "(map2map.infer.cluster.register_state) before submitting tasks")
    return state


def stats_of(token: str, dask_worker=None) -> dict[str, Any]:
    """This worker's statistics for run `token` (run with ``client.run``, which passes `dask_worker`)."""
    state = dask_worker.plugins.get(PLUGIN_NAME) if dask_worker is not None else None
    return state.run_stats(token) if isinstance(state, WorkerState) else {}




def shard_files(arr, array_dir: str, sample: int, regions: Sequence[tuple[tiles.Interval, ...]]) -> list[str]:
    """The files of the shards of output array `arr` (stored in `array_dir`) that make up `regions`
    of `sample`; each region must be a union of whole shards (`tiles.whole_shards`), as tiles are."""
    shard = arr.shards[2:] if arr.shards else arr.chunks[2:]
    shape = arr.shape[2:]
    paths = []
    for region in regions:
        if not tiles.whole_shards(region, shard, shape):
            raise RuntimeError(f"region {region} of the output is not a union of whole shards {shard}")
        for coords in tiles.shards_of(region, shard):
            paths.append(os.path.join(array_dir, arr.metadata.encode_chunk_key((sample, 0) + coords)))
    return paths


def preload(job: Job) -> str:
    """Load the model in this worker ahead of its first tile (a task, so it runs where tiles do);
    returns the device it is on."""
    state = worker_state()
    state.begin(job.token)
    return state.model(job)[1]


def run_tiles(job: Job, sample: int, tile_ids: Sequence[int]) -> list[tuple[int, float | None, int]]:
    """The Dask task: predict tiles `tile_ids` of `sample` and write them; returns (tile, loss, voxels)."""
    import torch

    from map2map.data.fieldio import undo_norms
    from map2map.utils import precision

    state = worker_state()
    state.begin(job.token)
    model, device = state.model(job)
    plan = job.plan
    t0 = time.perf_counter()
    inputs = state.stack(job, "in")
    x = np.empty((len(tile_ids),) + inputs.shape(plan.window(tile_ids[0])), dtype=np.float32)
    for b, t in enumerate(tile_ids):
        inputs.read(sample, plan.window(t), x[b])
    t1 = time.perf_counter()
    with torch.inference_mode():
        with precision.autocast(torch.device(device), job.amp):
            y = model(torch.from_numpy(x).to(device))
        if tuple(y.shape[2:]) != job.out_shape:
            raise RuntimeError(f"model output {tuple(y.shape[2:])} differs from the planned {job.out_shape}")
        y = y.float().cpu().numpy()  # float32 (an autocast output is 16-bit) before narrowing, norms and writing
    t2 = time.perf_counter()
    nbytes = x.nbytes + y.nbytes
    arr = state.output(job)
    results = []
    for b, t in enumerate(tile_ids):
        size = plan.size(t)
        region = plan.out_region(t)
        pred = np.ascontiguousarray(y[b][(slice(None),) + tuple(
            slice(o, o + n * plan.scale) for o, n in zip(job.offsets, size))])
        loss = None
        if job.targets:
            tgt = state.stack(job, "tgt").read(sample, region, np.empty_like(pred))
            with torch.inference_mode():
                loss = float(state.criterion(job)(torch.from_numpy(pred)[None], torch.from_numpy(tgt)[None]))
            nbytes += tgt.nbytes
        undo_norms(pred, job.tgt_norms, job.out_chans, job.model.callback_at, channel_axis=0,
                   **json.loads(job.norm_kwargs_json))
        arr[(sample, slice(None)) + tuple(slice(lo, hi) for lo, hi in region)] = pred
        results.append((t, loss, int(pred.size)))
    durable.fsync_files(shard_files(arr, os.path.join(job.out_path, job.out_field), sample,
                                    [plan.out_region(t) for t in tile_ids]))
    for t, loss, n in results:  # only once every shard of the batch is on disk
        mark_done(job.done_dir, sample, t, loss, n)
    state.record(job.token, t1 - t0, t2 - t1, time.perf_counter() - t2, len(tile_ids), nbytes)
    return results
