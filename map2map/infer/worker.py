"""The worker side: tasks that read tile windows, run the model and write shards, as a pipeline.

A task gets a *stream*: a list of (sample, batch of tiles) pairs, in order.
It runs them through a pipeline of three stages on three threads: while the
model runs on batch k, a reader thread reads and normalises the windows of
batch k + 1 (and hints batch k + 2's windows to the kernel, so the disk reads
ahead), and a writer thread narrows, un-normalises, writes and fsyncs batch
k - 1 (with ``--velocity`` its velocity field too, `map2map.infer.styles`)
and then marks its tiles done.  A tile owns whole shards, so each shard is
encoded in memory and written whole, as one file or, in object storage
(`Job.remote`), one object with one PUT (`map2map.store.ShardObjects`); a
PUT that returned is stored, so nothing is fsynced there before the tile's
marker (an empty object) is written.  So at most `PIPELINE_DEPTH` batches are in
flight per task (read ahead, in the model, being written), and the model
waits for I/O only when I/O is slower than the model.  A stream rather than one
batch per task, because a pipeline needs to know its next batch: Dask hands a
worker one task at a time, and a task of one batch has nothing to overlap with.

The same `run_stream` runs in a Dask worker (the task `run_tiles`) or in the
client's own process (`map2map.infer.cluster.run_in_process`, no Dask), on a
`WorkerState`.  In a Dask worker it is a worker plugin
(`map2map.infer.dask_types.WorkerStatePlugin`) that the client registers
(`map2map.infer.cluster.register_state`) and the tasks reach through
``distributed.get_worker()``.  It owns what a worker keeps between
tasks: the models (the two latest, so runs of the same model on a long-lived
cluster load it once), and for the current run the field readers (readers
keep chunk caches and open files; one stream uses one at a time, and returns
it for the next stream), the output array, the criterion and the run's
statistics.  A run is named by its token: the first task of a new run drops
the readers and arrays of earlier runs.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np

from map2map import tiles
from map2map.store import ShardObjects
from map2map.infer import gpus
from map2map.infer.markers import mark_all
from map2map.infer.specs import Job
from map2map.utils import durable

PLUGIN_NAME = "map2map-infer"
MODELS_KEPT = 2  # models a worker keeps across runs
RUNS_KEPT = 8  # runs whose statistics a worker keeps
PIPELINE_DEPTH = 3  # batches in flight per stream: one read ahead, one in the model, one being written


def _new_stats() -> dict[str, Any]:
    return {"model_loads": 0, "tasks": 0, "batches": 0, "tiles": 0, "max_task_bytes": 0, "max_in_flight": 0,
            "read_s": 0.0, "model_s": 0.0, "write_s": 0.0, "stream_s": 0.0}


class WorkerState:
    """What one worker process keeps between tasks (see the module docstring).

    Registered once per cluster under `PLUGIN_NAME` and idempotent, so a
    later run finds the state (and the models) earlier runs left.  Everything
    is made in `setup`, on the worker: the object the client pickles is empty.
    In the client's own process it is made and set up there (worker None).
    """

    name = PLUGIN_NAME
    idempotent = True

    def setup(self, worker=None) -> None:
        self.worker = worker
        self._lock = threading.Lock()
        self.token: str | None = None
        self.models: OrderedDict[tuple, Any] = OrderedDict()
        self.stacks: dict[tuple, Any] = {}  # (token, role, number) -> FieldStack
        self.free: dict[tuple, list] = {}  # (token, role) -> numbers of the stacks no stream holds
        self.outputs: dict[tuple, Any] = {}
        self.criteria: dict[tuple, Any] = {}
        self.stats: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def teardown(self, worker=None) -> None:
        with self._lock:
            self.models.clear()
            self.stacks.clear()
            self.free.clear()
            self.outputs.clear()
            self.criteria.clear()

    def begin(self, token: str) -> None:
        """A task of run `token` starts: drop the readers and arrays earlier runs opened."""
        with self._lock:
            if self.token != token:
                self.token = token
                self.stacks = {k: v for k, v in self.stacks.items() if k[0] == token}
                self.free = {k: v for k, v in self.free.items() if k[0] == token}
                self.outputs = {k: v for k, v in self.outputs.items() if k[0] == token}
            if token not in self.stats:
                self.stats[token] = _new_stats()
                while len(self.stats) > RUNS_KEPT:
                    self.stats.popitem(last=False)

    def record(self, token: str, **figures: float) -> None:
        """Count figures of run `token`: keys ending in ``_s`` and counts add up, ``max_`` keys keep the most."""
        with self._lock:
            stats = self.stats.setdefault(token, _new_stats())
            for key, value in figures.items():
                stats[key] = max(stats.get(key, 0), value) if key.startswith("max_") else stats.get(key, 0) + value

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

    def acquire_stack(self, job: Job, role: str) -> tuple[int, Any]:
        """A `FieldStack` of the job's inputs (`role` "in") or targets ("tgt") that no other stream holds,
        and its number (give both back with `release_stack`)."""
        from map2map.data.fieldio import FieldStack, lookup_norms

        with self._lock:
            free = self.free.setdefault((job.token, role), [])
            if free:
                number = free.pop()
                return number, self.stacks[(job.token, role, number)]
            number = sum(1 for k in self.stacks if k[:2] == (job.token, role))
        specs, norms = (job.inputs, job.in_norms) if role == "in" else (job.targets, job.tgt_norms)
        what = "in_norms" if role == "in" else "tgt_norms"
        stack = FieldStack([s.open() for s in specs], lookup_norms(norms, len(specs), what, job.model.callback_at),
                           json.loads(job.norm_kwargs_json))
        with self._lock:
            number = max([number] + [k[2] + 1 for k in self.stacks if k[:2] == (job.token, role)])
            self.stacks[(job.token, role, number)] = stack
        return number, stack

    def release_stack(self, job: Job, role: str, number: int) -> None:
        with self._lock:
            if (job.token, role, number) in self.stacks:  # not dropped by a newer run meanwhile
                self.free.setdefault((job.token, role), []).append(number)

    def output(self, job: Job, name: str | None = None):
        """The output array `name` (default: the prediction, `job.out_field`) of the job (opened once per run)."""
        key = (job.token, job.out_path, name or job.out_field)
        with self._lock:
            if key not in self.outputs:
                from map2map.store import open_group

                group = open_group(job.out_path, "r+", job.storage_options)
                self.outputs[key] = group[key[2]]
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


def check_whole_shards(arr, regions: Sequence[tuple[tiles.Interval, ...]]) -> None:
    """Refuse (RuntimeError) a region of output array `arr` that is not a union of whole shards
    (`tiles.whole_shards`): tiles are, so that each shard has one writer and is written whole."""
    shard = arr.shards[2:] if arr.shards else arr.chunks[2:]
    for region in regions:
        if not tiles.whole_shards(region, shard, arr.shape[2:]):
            raise RuntimeError(f"region {region} of the output is not a union of whole shards {shard}")


def preload(job: Job) -> str:
    """Load the model in this worker ahead of its first tile (a task, so it runs where tiles do);
    returns the device it is on."""
    state = worker_state()
    state.begin(job.token)
    return state.model(job)[1]


class InFlight:
    """Batches (and their bytes) between the start of their read and the end of their write, and the most
    at once: what `PIPELINE_DEPTH` bounds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.batches = self.nbytes = self.max_batches = self.max_bytes = 0

    def add(self, batches: int, nbytes: int) -> None:
        with self._lock:
            self.batches += batches
            self.nbytes += nbytes
            self.max_batches = max(self.max_batches, self.batches)
            self.max_bytes = max(self.max_bytes, self.nbytes)


def _hint(stack, sample: int, windows: Sequence[tuple[tiles.Interval, ...]]) -> None:
    """Ask the kernel to read ahead what reading `windows` of `sample` from `stack` will load."""
    from map2map.data.windows import WINDOW_HINT_BYTES

    for win in windows:
        for source in stack.sources:
            source.hint_window(sample, win, True, WINDOW_HINT_BYTES)


Work = Sequence[tuple[int, Sequence[int]]]  # a stream: (sample, batch of tile numbers), in order
Result = tuple[int, int, "float | None", int]  # (sample, tile, loss, voxels)


def run_stream(state: WorkerState, job: Job, work: Work, on_batch: Callable[[int], None] | None = None,
               stop: threading.Event | None = None) -> list[Result]:
    """Predict and write every batch of `work` through the pipeline (see the module docstring); returns
    (sample, tile, loss, voxels) of each tile.  `on_batch(tiles)` is called as each batch is marked done;
    a set `stop` ends the stream after the batches already started."""
    import torch

    from map2map.infer import styles, tta
    from map2map.utils import precision

    state.begin(job.token)
    model, device = state.model(job)
    plan = job.plan
    arr = state.output(job)
    flight = InFlight()
    in_number, inputs = state.acquire_stack(job, "in")
    tgt = state.acquire_stack(job, "tgt") if job.targets else None
    norm_kwargs = json.loads(job.norm_kwargs_json)

    def read(k: int) -> np.ndarray:
        sample, ids = work[k]
        t0 = time.perf_counter()
        x = np.empty((len(ids),) + inputs.shape(plan.window(ids[0])), dtype=np.float32)
        flight.add(1, x.nbytes)
        for b, t in enumerate(ids):
            inputs.read(sample, plan.window(t), x[b])
        if k + 1 < len(work):
            _hint(inputs, work[k + 1][0], [plan.window(t) for t in work[k + 1][1]])
        state.record(job.token, read_s=time.perf_counter() - t0)
        return x

    def amp():
        return precision.autocast(torch.device(device), job.amp)

    vel_arr = state.output(job, job.vel_field) if job.vel_field else None
    nout = sum(job.out_chans)

    def write(k: int, x: np.ndarray, y: np.ndarray) -> list[Result]:
        from map2map.data.fieldio import undo_norms

        sample, ids = work[k]
        t0 = time.perf_counter()
        marks, held = [], 0
        objects = ShardObjects()  # whole shards gathered, each stored whole below
        for b, t in enumerate(ids):
            region = plan.out_region(t)
            narrow = tuple(slice(o, o + n * plan.scale) for o, n in zip(job.offsets, plan.size(t)))
            pred = np.ascontiguousarray(y[b][(slice(0, nout),) + narrow])
            index = (sample, slice(None)) + tuple(slice(lo, hi) for lo, hi in region)
            if vel_arr is not None:  # d output / dD, in the model's units, times the sample's factor: km/s
                vel = y[b][(slice(nout, None),) + narrow] * np.float32(job.vel_factors[sample])
                objects.add(job.vel_field, vel_arr, index, vel)
            loss = None
            if tgt is not None:
                target = tgt[1].read(sample, region, np.empty_like(pred))
                held = max(held, target.nbytes)
                with torch.inference_mode():
                    loss = float(state.criterion(job)(torch.from_numpy(pred)[None], torch.from_numpy(target)[None]))
            undo_norms(pred, job.tgt_norms, job.out_chans, job.model.callback_at, channel_axis=0, **norm_kwargs)
            objects.add(job.out_field, arr, index, pred)
            marks.append((sample, t, loss, int(pred.size)))
        flight.add(0, held)
        regions = [plan.out_region(t) for t in ids]  # whole shards (checked): one writer, one PUT, per shard
        for out_arr in (arr,) if vel_arr is None else (arr, vel_arr):
            check_whole_shards(out_arr, regions)
        files = objects.store(job.out_path, job.storage_options)  # one file, or one PUT, per shard
        if not job.remote:  # in object storage a shard whose PUT returned is stored
            durable.fsync_files(files)
        mark_all(job.done_dir, marks, job.storage_options)  # only once every shard of the batch is stored
        state.record(job.token, write_s=time.perf_counter() - t0, batches=1, tiles=len(ids))
        flight.add(-1, -(x.nbytes + y.nbytes + held))
        if on_batch is not None:
            on_batch(len(ids))
        return marks

    results: list[Result] = []
    t_start = time.perf_counter()
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="m2m-read") as reader, \
                ThreadPoolExecutor(1, thread_name_prefix="m2m-write") as writer:
            reading = reader.submit(read, 0) if work else None
            writing = None
            for k in range(len(work)):
                x = reading.result()
                if k + 1 < len(work) and not (stop is not None and stop.is_set()):
                    reading = reader.submit(read, k + 1)  # one batch read ahead
                t0 = time.perf_counter()
                with torch.inference_mode():
                    forward = styles.forward_for(model, job, work[k][0], len(x), device, amp)
                    chans = job.out_chans * 2 if vel_arr is not None else job.out_chans  # output, d output / dD
                    y = tta.averaged(forward, torch.from_numpy(x).to(device), job.tta, job.in_chans, chans)
                    if tuple(y.shape[2:]) != job.out_shape:
                        raise RuntimeError(f"model output {tuple(y.shape[2:])} differs from the planned "
                                           f"{job.out_shape}")
                    y = y.float().cpu().numpy()  # float32 (an autocast output is 16-bit) before narrowing and norms
                flight.add(0, y.nbytes)
                state.record(job.token, model_s=time.perf_counter() - t0)
                if writing is not None:
                    results.extend(writing.result())  # one batch being written
                writing = writer.submit(write, k, x, y)
                if stop is not None and stop.is_set():
                    break
            if writing is not None:
                results.extend(writing.result())
    finally:
        state.release_stack(job, "in", in_number)
        if tgt is not None:
            state.release_stack(job, "tgt", tgt[0])
        state.record(job.token, tasks=1, stream_s=time.perf_counter() - t_start, max_in_flight=flight.max_batches,
                     max_task_bytes=flight.max_bytes)
    return results


def run_tiles(job: Job, work: Work) -> list[Result]:
    """The Dask task: predict and write the batches of `work` (a stream, see `run_stream`) on this worker."""
    return run_stream(worker_state(), job, work)
