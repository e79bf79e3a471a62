"""`m2m infer`: check everything, plan, create or resume the output, run the tiles, mark the store complete.

The input store and the output store may be URLs (`map2map.storage`), read
and written with the run's storage options, which travel to every worker
with the tasks.  A local output keeps the local machinery (fsync, rename,
swap, writer lock); an output in object storage is written as whole-shard
objects, with markers as empty objects and the completion mark last, and
has no writer lock (object storage has no file locks: one run per URL is
the user's to keep).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from map2map import storage, store, tiles
from map2map.errors import UserError
from map2map.infer.cluster import (IN_PROCESS, close_started, collect_stats, dask_client, local_workers,
                                   preload_all, run_in_process, scheduler_address, start_local, streams, submit_all,
                                   torch_threads)
from map2map.infer.defaults import check_channels, resolve
from map2map.infer.inputs import Inputs, check_finite, npy_inputs, store_inputs, target_box
from map2map.infer.markers import read_done
from map2map.infer.output import check_output, check_reachable, create_output, sample_losses, settings_hash
from map2map.infer.planning import Plan, make_plan
from map2map.infer.specs import DONE_DIR, VEL_FIELD, InferConfig, Job
from map2map.infer.styles import Styling, resolve_styles
from map2map.infer.worker import WorkerState
from map2map.modelfit import ModelSpec, file_stamp
from map2map.stage import Summary
from map2map.utils.distenv import DEVICES, choose_device, cuda_info
from map2map.utils.locks import writer_lock
from map2map.utils.precision import check_amp, slow_bf16


@dataclass
class InferSummary(Summary):
    """What an `m2m infer` / `m2m test` run did."""

    output: str | None
    field: str
    nsample: int
    tiles: int
    skipped: int
    computed: int
    tile: list[int]
    pad: list[list[int]]
    out_shape: list[int]
    stride: int
    overrides: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    criterion: str | None = None
    loss: list[float | None] | None = None
    cluster: str | None = None
    threads_per_worker: int = 1
    setup_s: float = 0.0
    tiles_s: float | None = None
    total_s: float = 0.0
    workers: dict[str, dict[str, float]] = field(default_factory=dict)
    written: list[str] = field(default_factory=list)
    amp: str = "off"
    tta: str = "none"
    slots: int = 1
    finish_s: float = 0.0

    @property
    def tiles_per_s(self) -> float | None:
        """Tiles computed per second of the tile phase."""
        return self.computed / self.tiles_s if self.tiles_s else None

    @property
    def model_busy(self) -> float | None:
        """The model's busy fraction: forward-pass seconds over the tile phase's seconds times its task
        slots (streams running at once)."""
        if not self.tiles_s or not self.workers:
            return None
        return sum(w.get("model_s", 0.0) for w in self.workers.values()) / (self.tiles_s * self.slots)

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out.update(tiles_per_s=self.tiles_per_s, model_busy=self.model_busy)
        return out

    def lines(self) -> list[str]:
        out = [f"note: {n}" for n in self.notes]
        out += [f"override: {o}" for o in self.overrides]
        out.append(f"tiles: {self.tiles} ({self.computed} computed, {self.skipped} resumed), crop {self.tile}, "
                   f"pad {self.pad}, model stride {self.stride}")
        if self.amp != "off":
            out.append(f"precision: amp {self.amp} (forward passes under autocast; predictions written as float32)")
        if self.tta != "none":
            out.append(f"tta: {self.tta} (each forward pass averaged over the mode's symmetries)")
        if self.tiles_s is not None:
            out.append(f"time: setup {self.setup_s:.2f} s, tiles {self.tiles_s:.2f} s, finish {self.finish_s:.2f} s, "
                       f"total {self.total_s:.2f} s on {self.cluster}")
            if self.workers:
                parts = [f"{k} {sum(v.get(k + '_s', 0.0) for v in self.workers.values()):.2f} s"
                         for k in ("read", "model", "write")]
                out.append(f"pipeline: {', '.join(parts)} (summed over {self.slots} task slots; read: windows, "
                           f"norms; write: narrowing, norms, loss, zarr, "
                           f"{'PUT' if storage.is_remote(self.output or '') else 'fsync'}), model busy "
                           f"{100 * self.model_busy:.0f}% of the tile phase, {self.tiles_per_s:.1f} tiles/s")
        for i, loss in enumerate(self.loss or []):
            out.append(f"sample {i}: {self.criterion} {loss:.6g}")
        out += [f"wrote {path}" for path in self.written]
        if self.output:
            out.append(f"{self.output}: field {self.field} {self.out_shape}, {self.nsample} samples, complete")
        return out


def _local_device(requested: str, amp: str) -> tuple[str, list[str]]:
    """The device type ("cpu" or "cuda") of our own local cluster's workers for ``--device`` `requested`, and
    notes for the run.

    Decided as for training, over what this process sees of CUDA
    (`map2map.utils.distenv.choose_device`): ``cuda`` that cannot be had is one
    line naming the reason; ``auto`` falls back to the CPU, with a note when
    GPUs are visible but CUDA does not start.  Each worker then takes its own
    GPU (`map2map.infer.gpus`).  A note also says when ``--amp bf16`` would be
    emulated, slowly, on the GPU (`map2map.utils.precision.slow_bf16`).
    """
    if requested == "cpu":
        return "cpu", []
    cuda = cuda_info()
    name, note = choose_device(requested, 0, cuda)
    notes = []
    if note is not None:  # the same reason as training's note, for a prediction
        notes.append(f"{cuda.unusable()} ({cuda.facts()}); predicting on cpu (--device cuda makes this an error)")
    slow = slow_bf16(torch.device(name)) if amp == "bf16" else None
    return torch.device(name).type, notes + ([slow] if slow else [])


def _check_locations(opts: InferConfig) -> str:
    """The output location (an absolute path, or a normalised URL), after checking the locations
    themselves: known URL schemes, input URLs whose bucket exists and whose service takes the
    credentials, a local checkpoint, an output that is no input (`map2map.store.check_output_path`) and,
    for a URL, whose bucket exists and whose service takes the credentials (`check_reachable`)."""
    for option, location in (("--data", opts.data), ("--out", opts.out)):
        if location:
            storage.check_scheme(location, option)
    if storage.is_remote(opts.load_state):
        raise UserError(f"--load-state {opts.load_state}: a checkpoint is read from a local file; copy it here "
                        "first")
    if opts.data and storage.is_remote(opts.data):
        check_reachable(storage.normalise(opts.data), opts.storage_options)
    remote = storage.is_remote(opts.out)
    out = storage.normalise(opts.out) if remote else os.path.abspath(storage.local_path(opts.out))
    if remote:
        check_reachable(out, opts.storage_options)
    store.check_output_path(opts.out, inputs=[*_input_paths(opts), opts.load_state], option="--out",
                            storage_options=opts.storage_options)
    return out


def _input_paths(opts: InferConfig) -> list[str]:
    """The input store, or the .npy files the patterns match."""
    if opts.data:
        return [opts.data]
    return sorted({p for pattern in [*(opts.test_in_patterns or ()), *(opts.test_tgt_patterns or ())]
                   for p in glob.glob(pattern)})


def _check_options(opts: InferConfig) -> str:
    """The output location (`_check_locations`), after the checks that need no file but the paths themselves."""
    if opts.batch_size < 1:
        raise UserError(f"--batch-size {opts.batch_size} must be positive")
    if opts.device not in DEVICES:
        raise UserError(f"--device {opts.device!r}: expected one of {', '.join(DEVICES)}")
    check_amp(opts.amp)
    from map2map.infer.tta import MODES

    if opts.tta not in MODES:
        raise UserError(f"--tta {opts.tta!r}: expected one of {', '.join(MODES)}")
    if isinstance(opts.crop, str) and opts.crop != "auto":
        raise UserError(f"--crop {opts.crop!r}: expected 'auto' or integers")
    if opts.tile_memory is not None and not (isinstance(opts.tile_memory, (int, float)) and opts.tile_memory > 0):
        raise UserError(f"--tile-memory {opts.tile_memory}: expected a positive number of GiB")
    if opts.scale_factor is not None and (not isinstance(opts.scale_factor, int) or opts.scale_factor < 1):
        raise UserError(f"--scale-factor {opts.scale_factor} must be a positive integer")
    if not opts.out:
        raise UserError("--out: give the path of the prediction store to write")
    if not opts.data and not opts.test_in_patterns:
        raise UserError("--data: give the input store")
    if opts.scheduler or opts.scheduler_file:
        scheduler_address(opts)  # a malformed address or scheduler file fails now, before the model loads
    return _check_locations(opts)


def _model_arguments(given: InferConfig, opts: InferConfig, inp: Inputs) -> dict[str, Any]:
    """The model's keyword arguments (`map2map.models.build.model_kwargs`): keys the model and the norms do
    not take are refused when given on the command line, and dropped when they came from the model card."""
    from map2map.data.fieldio import lookup_norms
    from map2map.models.build import model_kwargs
    from map2map.utils.imports import import_attr

    cls = import_attr(opts.model, ["map2map.models"], opts.callback_at, what="model")
    norms = [*lookup_norms(opts.in_norms, len(inp.inputs), "--in-norms", opts.callback_at),
             *lookup_norms(opts.tgt_norms, len(inp.targets) or 1, "--tgt-norms", opts.callback_at)]
    option = "--model-kwargs" if given.model_kwargs is not None else "--misc-kwargs"
    explicit = given.model_kwargs is not None or given.misc_kwargs is not None
    return model_kwargs(cls, opts.model, dict(opts.model_kwargs or {}), norms, option, strict=explicit)


def _model_spec(given: InferConfig, opts: InferConfig, inp: Inputs, style_size: int | None = None) -> ModelSpec:
    """The model to build on every worker: name, channels, checkpoint (with its stamp), arguments and the
    number of style parameters (the model card's; None: unstyled)."""
    out_chan = opts.out_chan or (sum(inp.tgt_chans) if inp.targets else sum(inp.in_chans))
    if opts.out_chan and inp.targets and opts.out_chan != sum(inp.tgt_chans):
        raise UserError(f"--out-chan {opts.out_chan} differs from the {sum(inp.tgt_chans)} channels of the target")
    checkpoint = os.path.abspath(opts.load_state)
    return ModelSpec(opts.model, checkpoint, file_stamp(checkpoint), sum(inp.in_chans), out_chan,
                     opts.scale_factor, len(inp.box), json.dumps(_model_arguments(given, opts, inp), sort_keys=True),
                     os.path.abspath(opts.callback_at) if opts.callback_at else None, style_size)


def _check_norms_and_criterion(opts: InferConfig, inp: Inputs, spec: ModelSpec) -> str | None:
    """Import the norms (and the criterion, when there is a target) now; returns the criterion name."""
    from map2map.data.fieldio import lookup_norms

    lookup_norms(opts.in_norms, len(inp.inputs), "--in-norms", spec.callback_at, opts.norm_kwargs or {})
    lookup_norms(opts.tgt_norms, len(inp.targets) or 1, "--tgt-norms", spec.callback_at, opts.norm_kwargs or {})
    if not inp.targets:
        return None
    from map2map.utils.imports import import_attr

    import_attr(opts.criterion, ["torch.nn"], spec.callback_at, what="criterion")
    return opts.criterion


def _plan_settings(opts: InferConfig, inp: Inputs, spec: ModelSpec, pl: Plan, out_field: str,
                   criterion: str | None, styling: Styling | None = None) -> dict[str, Any]:
    """Everything the predicted values depend on: a resumed run must match it exactly."""
    extra = styling.settings() if styling is not None else {}  # unstyled runs: the same hash as before styles
    return {**extra,
        "model": opts.model, "model_kwargs": opts.model_kwargs, "checkpoint": spec.checkpoint,
        "checkpoint_stamp": list(spec.stamp), "in_fields": list(opts.in_fields or []),
        "tgt_fields": list(opts.tgt or []), "in_patterns": list(opts.test_in_patterns or []),
        "tgt_patterns": list(opts.test_tgt_patterns or []), "input": inp.label, "input_identity": inp.identity,
        "crop": list(pl.plan.tile), "in_pad": [list(p) for p in pl.plan.pad], "scale_factor": opts.scale_factor,
        "in_norms": list(opts.in_norms or []), "tgt_norms": list(opts.tgt_norms or []),
        "norm_kwargs": opts.norm_kwargs, "callback_at": spec.callback_at, "criterion": criterion,
        "out_field": out_field, "out_chan": spec.out_chan, "out_shard": list(pl.out_shard),
        "out_chunk": list(pl.out_chunk), "stride": pl.stride,
        # they change the shape of each forward pass, where or in what precision it runs, hence the result
        "batch_size": opts.batch_size, "device": opts.device, "amp": opts.amp, "tta": opts.tta,
    }


def _pending(done: dict, nsample: int, ntiles: int, batch_size: int) -> list[tuple[int, list[int]]]:
    """The (sample, tile batch) pairs still to compute.

    Batches are fixed groups of tiles, the same in every run: a tile's values
    can depend on the shape of the forward pass it was part of, so a batch
    with any tile missing is redone whole.  `done` is `read_done`'s answer.
    """
    return [(sample, ids) for sample in range(nsample) for ids in tiles.batches(range(ntiles), batch_size)
            if not all((sample, t) in done for t in ids)]


def _finish(target: str, out: str, fields: list[str], nsample: int, ntiles: int,
            criterion: str | None, storage_options=None) -> list[float | None] | None:
    """Check every tile is recorded, mark the store complete (with the losses) and swap it in if needed.

    The workers fsynced the shards of the output `fields` before recording
    each tile, so the completion mark does not fsync them again.  In object
    storage the markers are objects under a prefix, removed before the
    completion mark is written, last."""
    done_dir = storage.join(target, DONE_DIR)
    done = read_done(done_dir, storage_options)
    missing = nsample * ntiles - len([k for k in done if k[0] < nsample and k[1] < ntiles])
    if missing:
        raise RuntimeError(f"{missing} tiles have no completion record after the run; rerun to finish them")
    losses = sample_losses(done, nsample) if criterion else None
    if storage.is_remote(target):
        storage.remove_tree(done_dir, storage_options)
    else:
        shutil.rmtree(done_dir)
    extra = {"loss": {"criterion": criterion, "per_sample": losses}} if criterion else {}
    store.mark_complete(target, nsample, synced=fields, storage_options=storage_options, **extra)
    if target != out:
        store.swap_in(target, out)
    return losses


@dataclass
class Prepared:
    """A checked `m2m infer` run, ready to write its output (see `prepare`)."""

    opts: InferConfig
    out: str
    inp: Inputs
    spec: ModelSpec
    plan: Plan
    criterion: str | None
    device: str
    remote: bool
    layout: store.FieldLayout
    settings: dict[str, Any]
    digest: str
    overrides: tuple[str, ...]
    notes: list[str]
    t_start: float
    workers: int = 0  # worker processes of our own local cluster; 1: none, the tiles run in this process
    starting: Future | None = None  # that cluster, starting (`cluster.start_local`) until `execute` takes it
    styling: Styling | None = None  # a styled model's styles (`map2map.infer.styles`), None for an unstyled one
    layouts: tuple[store.FieldLayout, ...] = ()  # every output field: the prediction, and `VEL_FIELD` with --velocity

    def __post_init__(self) -> None:
        self.layouts = self.layouts or (self.layout,)

    @property
    def vel_field(self) -> str | None:
        return VEL_FIELD if self.styling is not None and self.styling.vel_factors else None

    @property
    def storage_options(self) -> dict[str, Any]:
        """The storage options of the input and output URLs (parsed by `prepare`)."""
        return dict(self.opts.storage_options or {})

    @property
    def in_process(self) -> bool:
        return not self.remote and self.workers == 1

    def close(self) -> None:
        """Close the local cluster started for this run if `execute` did not take it (e.g. it failed first)."""
        starting, self.starting = self.starting, None
        close_started(starting)


def prepare(config: InferConfig, start_cluster: bool = False) -> Prepared:
    """Check everything that needs no output: options, checkpoint, inputs, model fit, norms, tiles.

    With `start_cluster`, a local cluster the run needs starts in a thread meanwhile; the caller runs
    `execute` or, if it does not, `Prepared.close`.  Raises `UserError` for every bad input; writes nothing.
    The storage options may come as the ``--storage-options`` JSON text: the prepared run holds them parsed.
    """
    t_start = time.perf_counter()
    if config.storage_options is None or isinstance(config.storage_options, str):
        config = dataclasses.replace(config, storage_options=storage.parse_options(config.storage_options))
    out = _check_options(config)
    remote = bool(config.scheduler or config.scheduler_file)
    # a cluster's own workers decide their device (map2map.infer.gpus); ours follow what this process sees
    device, notes = (config.device, []) if remote else _local_device(config.device, config.amp)
    workers = 0 if remote else local_workers(config, device)
    starting = start_local(workers, config.threads_per_worker) if start_cluster and workers > 1 else None
    try:
        return _prepare(config, t_start, out, remote, device, notes, workers, starting)
    except BaseException:
        close_started(starting)
        raise


def _prepare(config: InferConfig, t_start: float, out: str, remote: bool, device: str, notes: list[str],
             workers: int, starting: Future | None) -> Prepared:
    resolved = resolve(config)
    opts = resolved.config
    notes += resolved.notes
    inp = store_inputs(opts) if opts.data else npy_inputs(opts)
    target_box(inp, opts)
    card = resolved.checkpoint.card
    spec = _model_spec(config, opts, inp, card.style_size if card is not None else None)
    check_channels(resolved, spec.in_chan, spec.out_chan)
    styling = resolve_styles(opts, card, inp.nsample, spec.out_chan, len(inp.box))
    if styling is not None:
        where = "each sample's from the input store" if styling.source == "store" else f"--style {styling.source}"
        notes.append(f"styles {','.join(styling.names)}: {where}" + (
            f"; --velocity writes field {VEL_FIELD} in km/s" if styling.vel_factors else ""))
    pl = make_plan(spec.load(), opts, inp)
    if pl.note:  # how --crop auto chose the tile
        notes.append(pl.note)
    criterion = _check_norms_and_criterion(opts, inp, spec)
    if not opts.data and not opts.allow_nonfinite:  # a store was checked when it was converted
        check_finite(inp)

    out_field = opts.out_field or (opts.tgt[0] if opts.tgt and len(opts.tgt) == 1 else "prediction")
    store.check_field_name(out_field, "--out-field")
    layout = store.FieldLayout(out_field, spec.out_chan, pl.plan.out_box, pl.out_shard, pl.out_chunk)
    layouts = [layout]
    if styling is not None and styling.vel_factors:
        if out_field == VEL_FIELD:
            raise UserError(f"--out-field {out_field}: --velocity writes a field of that name; choose another")
        layouts.append(dataclasses.replace(layout, name=VEL_FIELD))
    plan_settings = _plan_settings(opts, inp, spec, pl, out_field, criterion, styling)
    settings = {
        out_field: {"model": opts.model, "checkpoint": spec.checkpoint, "input": inp.label},
        "created_by": "m2m infer", "model": opts.model, "checkpoint": spec.checkpoint, "input_store": inp.label,
        "infer": plan_settings,
    }
    return Prepared(opts, out, inp, spec, pl, criterion, device, remote, layout, settings,
                    settings_hash(plan_settings), resolved.overrides, notes, t_start, workers, starting,
                    styling, tuple(layouts))


def _job(prep: Prepared, token: str, target: str, device: str, workers: int | None) -> Job:
    opts, inp = prep.opts, prep.inp
    return Job(token, target, prep.layout.name, tuple(inp.inputs), tuple(inp.targets), tuple(inp.in_chans),
               tuple(inp.tgt_chans), tuple(opts.in_norms) if opts.in_norms else None,
               tuple(opts.tgt_norms) if opts.tgt_norms else None, json.dumps(opts.norm_kwargs, sort_keys=True),
               prep.spec, prep.plan.plan, prep.plan.offsets, prep.plan.out_shape, prep.criterion, device,
               torch_threads(opts, device, workers), opts.amp, opts.tta,
               prep.styling.values if prep.styling else (), prep.styling.norm if prep.styling else None,
               prep.vel_field, prep.styling.vel_factors if prep.styling else (),
               prep.styling.input_scales if prep.styling else True, prep.storage_options)


def _run_here(prep: Prepared, target: str, token: str | None, todo, total: int, done: int,
              summary: InferSummary) -> tuple[str, float]:
    """Run the tiles in this process (`cluster.run_in_process`); returns the token and the tile phase's time."""
    opts = prep.opts
    threads = torch.get_num_threads()
    state = WorkerState()
    state.setup(None)
    try:
        if token is None:
            token = create_output(target, prep.layouts, prep.inp, prep.settings, prep.digest, prep.styling,
                                  prep.storage_options)
        job = _job(prep, token, target, prep.device, 1)
        summary.cluster = f"{IN_PROCESS}, {opts.threads_per_worker} threads"
        state.begin(token)
        state.model(job)  # loaded (and its failure raised) before the tile phase is timed
        t_tiles = time.perf_counter()
        results = run_in_process(state, job, todo, opts.threads_per_worker, total, done, opts.progress)
        tiles_s = time.perf_counter() - t_tiles
        summary.computed = len(results)
        summary.workers = {IN_PROCESS: state.run_stats(token)}
        return token, tiles_s
    finally:
        state.teardown()
        torch.set_num_threads(threads)


def _run_on_cluster(prep: Prepared, target: str, token: str | None, todo, total: int, done: int,
                    summary: InferSummary) -> tuple[str, float]:
    """Run the tiles as Dask tasks, one per stream; returns the token and the tile phase's time."""
    opts = prep.opts
    starting, prep.starting = prep.starting, None
    with dask_client(opts, prep.device, starting) as (client, info):
        if token is None:  # only once the cluster is there: a failed start leaves nothing behind
            token = create_output(target, prep.layouts, prep.inp, prep.settings, prep.digest, prep.styling,
                                  prep.storage_options)
        job = _job(prep, token, target, opts.device if prep.remote else prep.device, info.get("workers"))
        summary.cluster = info["cluster"]
        nworkers = info.get("workers") or len(client.scheduler_info(n_workers=-1)["workers"])
        summary.slots = max(1, nworkers * opts.threads_per_worker)
        preload_all(client, job)
        t_tiles = time.perf_counter()
        results = submit_all(client, job, streams(todo, summary.slots), total, done, opts.progress)
        tiles_s = time.perf_counter() - t_tiles
        summary.computed = len(results)
        summary.workers = collect_stats(client, token)
    return token, tiles_s


def execute(prep: Prepared) -> InferSummary:
    """Create or resume the output of a prepared run, run its tiles and mark it complete.

    The caller holds the writer lock of `prep.out` (`map2map.utils.locks.writer_lock`).
    """
    opts, inp, pl, notes = prep.opts, prep.inp, prep.plan, prep.notes
    target, token = check_output(prep.out, prep.digest, opts.overwrite, notes, prep.storage_options)

    if token and not storage.is_remote(target):  # resuming (its marker directory is gone only if it died
        os.makedirs(os.path.join(target, DONE_DIR), exist_ok=True)  # while finishing: redo all)
    done = read_done(storage.join(target, DONE_DIR), prep.storage_options) if token else {}
    ntiles = pl.plan.ntiles
    todo = _pending(done, inp.nsample, ntiles, opts.batch_size)
    total = ntiles * inp.nsample
    ndone_before = total - sum(len(ids) for _, ids in todo)

    summary = InferSummary(output=prep.out, field=prep.layout.name, nsample=inp.nsample, tiles=total,
                           skipped=ndone_before, computed=0, tile=list(pl.plan.tile),
                           pad=[list(p) for p in pl.plan.pad], out_shape=list(pl.plan.out_box), stride=pl.stride,
                           overrides=list(prep.overrides), notes=notes, amp=opts.amp, tta=opts.tta,
                           threads_per_worker=opts.threads_per_worker, slots=opts.threads_per_worker)
    t_setup = time.perf_counter()
    if todo:
        run_tiles = _run_here if prep.in_process else _run_on_cluster
        token, summary.tiles_s = run_tiles(prep, target, token, todo, total, ndone_before, summary)
    t_finish = time.perf_counter()
    summary.loss = _finish(target, prep.out, [lay.name for lay in prep.layouts], inp.nsample, ntiles,
                           prep.criterion, prep.storage_options)
    summary.finish_s = time.perf_counter() - t_finish
    summary.criterion = prep.criterion
    summary.setup_s = t_setup - prep.t_start
    summary.total_s = time.perf_counter() - prep.t_start
    return summary


def run(config: InferConfig) -> InferSummary:
    """Run `m2m infer` (or the engine under `m2m test`); returns its summary.

    Raises `UserError` for every bad input, before anything is written; the
    output is written under its writer lock, so a second writer of the same
    output is refused with one line naming this one.  A local cluster the run
    needs starts while the client plans.
    """
    prep = prepare(config, start_cluster=True)
    try:
        with output_lock(prep.out, "m2m infer") as lock:
            if lock is not None and lock.note:
                prep.notes.append(lock.note)
            return execute(prep)
    finally:
        prep.close()


@contextlib.contextmanager
def output_lock(out: str, what: str):
    """The writer lock of a local output (`map2map.utils.locks.writer_lock`); None for an output in object
    storage, which has no file locks (see the module docstring)."""
    if storage.is_remote(out):
        yield None
        return
    with writer_lock(out, what) as lock:
        yield lock
