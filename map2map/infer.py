"""`m2m infer` and `m2m test`: tiled whole-box inference as Dask tasks, into a prediction store.

The client checks everything it can before any work starts (store, fields,
checkpoint, model fit, norms, tile sizes), plans tiles with
`map2map.tiles.TilePlan`, creates the output store (or resumes it) and
submits one task per batch of tiles.  A task gets only small arguments (a
`Job` of paths, names and the plan, a sample number and tile numbers); in its
worker process it

1. reads each tile's input window (tile + halo, periodic wrap) with
   `map2map.data.windows.read_window`, the reader training uses, and applies
   the input norms;
2. runs the model, loaded once per worker process and cached there (eval mode,
   inference mode, one forward pass per batch of tiles);
3. narrows the output to the tile (``scale_factor`` times finer), optionally
   scores it against the target field, undoes the target norms, and
4. writes it into the tile's own output region, a union of whole output
   shards that no other task touches, then records the tile as done with a
   small marker file, written atomically after the data.

A rerun with the same settings skips tiles that have a marker; the completion
mark (and the per-sample losses) is written only when every tile is done, and
the markers are removed just before it.  Every tile reads a window of the
same size whose origin differs from the whole-box window's by a multiple of
the model's total stride, so the stitched result equals one forward pass over
the whole periodically padded box.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from map2map import geometry, store, tiles
from map2map.errors import UserError

DONE_DIR = ".m2m-done"
PARTIAL = ".m2m-partial"


# --------------------------------------------------------------------------- options


@dataclass
class Options:
    """Everything `m2m infer` / `m2m test` take, as plain values (the CLI fills it)."""

    out: str | None
    model: str
    load_state: str
    data: str | None = None
    in_fields: Sequence[str] = ()
    tgt: Sequence[str] | None = None
    in_patterns: Sequence[str] | None = None
    tgt_patterns: Sequence[str] | None = None
    crop: Sequence[int] | None = None
    in_pad: Sequence[int] | str = "auto"
    scale_factor: int = 1
    in_norms: Sequence[str] | None = None
    tgt_norms: Sequence[str] | None = None
    out_field: str | None = None
    out_chan: int | None = None
    out_shard: Sequence[int] | None = None
    out_chunk: Sequence[int] | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    norm_kwargs: dict[str, Any] = field(default_factory=dict)
    callback_at: str | None = None
    criterion: str = "MSELoss"
    batch_size: int = 1
    device: str = "auto"
    scheduler: str | None = None
    scheduler_file: str | None = None
    workers: int | None = None
    threads_per_worker: int = 1
    torch_threads: int | None = None
    overwrite: bool = False
    progress: bool = True
    connect_timeout: float = 5.0
    wait_workers: float = 60.0


# --------------------------------------------------------------------------- small specs sent to tasks


@dataclass(frozen=True)
class SourceSpec:
    """How a worker opens one field: ("zarr", store path, array name, nsample) or ("npy", paths)."""

    kind: str
    path: str = ""
    name: str = ""
    nsample: int = 0
    paths: tuple[str, ...] = ()

    def open(self):
        from map2map.data.windows import NpyField, ZarrField

        if self.kind == "zarr":
            return ZarrField(self.path, self.name, self.nsample)
        return NpyField(list(self.paths))


@dataclass(frozen=True)
class ModelSpec:
    """A model by name and constructor arguments, and the checkpoint it loads (with a stamp of the file)."""

    name: str
    checkpoint: str
    stamp: tuple[int, int]
    in_chan: int
    out_chan: int
    scale_factor: int
    ndim: int
    kwargs_json: str
    callback_at: str | None

    @property
    def kwargs(self) -> dict[str, Any]:
        return json.loads(self.kwargs_json)


@dataclass(frozen=True)
class Job:
    """Everything a tile task needs, small enough to send with every task."""

    token: str
    out_path: str
    out_field: str
    inputs: tuple[SourceSpec, ...]
    targets: tuple[SourceSpec, ...]
    in_chans: tuple[int, ...]
    tgt_chans: tuple[int, ...]
    in_norms: tuple[str, ...] | None
    tgt_norms: tuple[str, ...] | None
    norm_kwargs_json: str
    model: ModelSpec
    plan: tiles.TilePlan
    offsets: tuple[int, ...]
    out_shape: tuple[int, ...]
    criterion: str | None
    device: str
    torch_threads: int | None

    @property
    def done_dir(self) -> str:
        return os.path.join(self.out_path, DONE_DIR)

    @property
    def out_chans(self) -> tuple[int, ...]:
        return self.tgt_chans if self.tgt_chans else (self.model.out_chan,)


# --------------------------------------------------------------------------- checkpoints and models


def load_state_dict(path: str) -> dict[str, Any]:
    """The model state in checkpoint `path`: a bare state_dict, or a dict with a "model" entry."""
    return read_checkpoint(path)[0]


def read_checkpoint(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model state in checkpoint `path` and the training settings saved with it (``meta``, as
    `m2m train` writes; empty for a bare state_dict)."""
    import torch

    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises many types for truncated or foreign files
        msg = " ".join(str(exc).split())[:200]
        raise UserError(f"cannot read checkpoint {path} ({type(exc).__name__}: {msg})") from None
    meta: dict[str, Any] = {}
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {path} holds no model state (expected a state_dict, "
                        "or a dict with a 'model' state_dict)")
    if all(k.startswith("module.") for k in obj):  # saved from a DistributedDataParallel wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj, meta


def build_model(spec: ModelSpec):
    """Construct the model `spec` names, as `m2m train` does (see `map2map.models.build_model`)."""
    from map2map.models import build_model as build

    return build(spec.name, spec.in_chan, spec.out_chan, scale_factor=spec.scale_factor, ndim=spec.ndim,
                 kwargs=spec.kwargs, callback_at=spec.callback_at)


def _fit_report(model, state: dict[str, Any]) -> str | None:
    """None if `state` fits `model` exactly, else which keys are missing, unexpected or mis-shaped."""
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(want[k].shape)}"
              for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    parts = []
    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if keys:
            shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
            parts.append(f"{what}: {shown}")
    return "; ".join(parts) or None


def load_model(spec: ModelSpec, meta_out: dict[str, Any] | None = None):
    """Build the model and load its checkpoint strictly; a mismatch is a `UserError` listing the keys.
    The checkpoint's training settings, if any, are put into `meta_out`."""
    model = build_model(spec)
    state, meta = read_checkpoint(spec.checkpoint)
    if meta_out is not None:
        meta_out.update(meta)
    report = _fit_report(model, state)
    if report:
        hint = (" (check --model, --model-kwargs, --out-chan, the input fields and --scale-factor)")
        raise UserError(f"checkpoint {spec.checkpoint} does not fit model {spec.name} with {spec.in_chan} input "
                        f"and {spec.out_chan} output channels: {report}{hint}")
    model.load_state_dict(state)
    model.eval()
    return model


def _file_stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def output_shape(model, in_chan: int, window: Sequence[int]) -> tuple[int, ...]:
    """Spatial output shape of `model` for one input window: a shape-only pass on a 'meta' copy,
    or a real pass on zeros if some operation has no meta support."""
    import torch

    x_shape = (1, in_chan) + tuple(window)
    with torch.no_grad():
        try:
            meta = copy.deepcopy(model).to("meta")
            return tuple(meta(torch.empty(x_shape, device="meta")).shape[2:])
        except Exception:
            pass
        try:
            return tuple(model(torch.zeros(x_shape)).shape[2:])
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"model rejects an input window of {list(window)} voxels ({exc}); "
                            "choose another --crop or --in-pad") from None


# --------------------------------------------------------------------------- worker side


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


def mark_done(done_dir: str, sample: int, tile: int, loss: float | None, count: int) -> None:
    """Record a finished tile: a tiny JSON file, written to a temporary name and renamed."""
    name = os.path.join(done_dir, f"{sample}-{tile}")
    tmp = f"{name}.tmp-{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "w") as f:
        json.dump({"loss": loss, "n": count}, f)
    os.replace(tmp, name)


def read_done(done_dir: str) -> dict[tuple[int, int], dict[str, Any]]:
    """The finished tiles recorded in `done_dir`: {(sample, tile): {"loss": ..., "n": ...}}."""
    out = {}
    if not os.path.isdir(done_dir):
        return out
    for name in os.listdir(done_dir):
        if ".tmp-" in name:
            continue
        try:
            sample, tile = (int(v) for v in name.split("-"))
            with open(os.path.join(done_dir, name)) as f:
                out[(sample, tile)] = json.load(f)
        except (ValueError, OSError):
            continue  # a foreign or unreadable file: that tile is simply redone
    return out


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
    for t, loss, n in results:  # only after every shard of the batch is written
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


# --------------------------------------------------------------------------- client side: inputs


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


def _store_inputs(opts: Options) -> Inputs:
    path = os.path.abspath(opts.data)
    st = store.open_store(path)
    if not opts.in_fields:
        raise UserError(f"--in: name the input field(s) of {path}; it has {', '.join(st.field_names)}")
    names = list(opts.in_fields) + list(opts.tgt or [])
    if len(set(names)) != len(names):
        raise UserError(f"field names repeat in --in / --tgt: {names}")
    arrays = [st.field(n) for n in names]
    specs = [SourceSpec("zarr", path, n, st.nsample) for n in names]
    nin = len(opts.in_fields)
    first = arrays[0]
    shard = tuple(first.shards[2:]) if first.shards else tuple(first.chunks[2:])
    stamp = _file_stamp(os.path.join(path, "zarr.json"))
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


def _glob_fields(patterns: Sequence[str], what: str) -> list[list[str]]:
    out = []
    for p in patterns:
        paths = sorted(glob.glob(os.path.expanduser(p)))
        if not paths:
            raise UserError(f"{what} pattern {p!r} matches no files")
        out.append([os.path.abspath(q) for q in paths])
    counts = [len(p) for p in out]
    if len(set(counts)) > 1:
        raise UserError(f"{what} patterns match different numbers of files: {counts}")
    return out


def _npy_inputs(opts: Options) -> Inputs:
    from map2map import npyfile

    ins = _glob_fields(opts.in_patterns, "--test-in-patterns")
    tgts = _glob_fields(opts.tgt_patterns, "--test-tgt-patterns") if opts.tgt_patterns else []
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
    stamp = [(p, _file_stamp(p)) for paths in ins + tgts for p in paths]
    return Inputs(specs[:len(ins)], specs[len(ins):], [s[0] for s in shapes[:len(ins)]],
                  [s[0] for s in shapes[len(ins):]], boxes.pop(), len(ins[0]), None, None, ins[0],
                  ",".join(opts.in_patterns), {"patterns": [list(opts.in_patterns), list(opts.tgt_patterns or [])],
                                               "stamp": stamp})


def _target_box(inp: Inputs, opts: Options) -> tuple[int, ...]:
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


# --------------------------------------------------------------------------- client side: planning


def _default_crop(inp: Inputs, stride: int) -> tuple[int, ...]:
    base = inp.in_shard if inp.in_shard else tuple(min(128, n) for n in inp.box)
    return tuple(max(stride, min(c, n) // stride * stride) for c, n in zip(base, inp.box))


def _pads(model, opts: Options, in_chan: int, tile: tuple[int, ...], ndim: int) -> tuple[tuple[int, int], ...]:
    from map2map.models import required_pad

    if isinstance(opts.in_pad, str):
        if opts.in_pad != "auto":
            raise UserError(f"--in-pad {opts.in_pad!r}: expected 'auto' or integers")
        found = {t: required_pad(model, in_chan, t, ndim, opts.scale_factor) for t in set(tile)}
        return tuple((found[t], found[t]) for t in tile)
    try:
        return geometry.parse_pad(list(opts.in_pad), ndim, "--in-pad")
    except ValueError as exc:
        raise UserError(str(exc)) from None


@dataclass
class Plan:
    plan: tiles.TilePlan
    offsets: tuple[int, ...]
    out_shape: tuple[int, ...]
    out_shard: tuple[int, ...]
    out_chunk: tuple[int, ...]
    stride: int


def make_plan(model, opts: Options, inp: Inputs) -> Plan:
    """Tiles, pads and output chunking for `model` on the input grid, or a `UserError` that says why not."""
    from map2map.models import total_stride

    ndim = len(inp.box)
    s = opts.scale_factor
    stride = total_stride(model)
    try:
        tile = geometry.as_tuple(list(opts.crop), ndim, "--crop") if opts.crop else _default_crop(inp, stride)
        shard = geometry.as_tuple(list(opts.out_shard), ndim, "--out-shard") if opts.out_shard else None
        tiles.check_tile(tile, inp.box, stride, s, shard)
        shard = shard or tuple(t * s for t in tile)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    pad = _pads(model, opts, sum(inp.in_chans), tile, ndim)
    plan = tiles.TilePlan(inp.box, tile, pad, s)
    out_shape = output_shape(model, sum(inp.in_chans), plan.window_shape)
    offsets = tiles.narrow_offsets(tile, pad, s, out_shape)
    if opts.out_chunk:
        chunk = geometry.as_tuple(list(opts.out_chunk), ndim, "--out-chunk")
        if any(c < 1 or sh % c for c, sh in zip(chunk, shard)):
            raise UserError(f"--out-chunk {list(chunk)} must divide the output shard {list(shard)}")
    else:
        chunk = tiles.choose_out_chunk(shard)
    return Plan(plan, offsets, out_shape, shard, chunk, stride)


# --------------------------------------------------------------------------- client side: output store


def _settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _check_output(out: str, digest: str, overwrite: bool, notes: list[str]) -> tuple[str, str | None]:
    """Where to write, and the run token to resume there (None: create a new store there).

    A complete OUTPUT is refused unless `overwrite`, which builds the new
    store beside it (``OUTPUT.m2m-partial``) and swaps it in at the end.  An
    incomplete store written with the same settings is resumed; any other
    incomplete map2map store is started over.  Nothing is written here.
    """
    target = out
    if os.path.exists(out):
        meta = store.read_meta(out)
        if meta is None:
            if not os.path.isdir(out) or any(os.scandir(out)):
                raise UserError(f"{out} exists and is not a map2map store; choose another --out")
        elif meta.get("complete"):
            if not overwrite:
                raise UserError(f"{out} exists and is complete; pass --overwrite to replace it")
            target = out + PARTIAL
    if os.path.exists(target):
        meta = store.read_meta(target)
        info = (meta or {}).get("infer") or {}
        if meta is not None and not meta.get("complete") and info.get("settings_hash") == digest:
            ndone = len(read_done(os.path.join(target, DONE_DIR)))
            notes.append(f"resuming the interrupted run in {target}: {ndone} tiles already done")
            return target, info["run_token"]
        if meta is None and os.path.isdir(target) and any(os.scandir(target)):
            raise UserError(f"{target} exists and is not a map2map store; remove it or choose another --out")
        if meta is not None:
            notes.append(f"{target} is an incomplete store from a run with other settings: starting over")
    return target, None


def _create_output(target: str, layout: store.FieldLayout, inp: Inputs, settings: dict[str, Any],
                   digest: str) -> str:
    """Create the (incomplete) output store at `target`, replacing what `_check_output` allowed;
    returns the new run token."""
    if os.path.exists(target):
        shutil.rmtree(target)
    token = uuid.uuid4().hex
    meta_settings = dict(settings)
    meta_settings["infer"] = dict(settings["infer"], settings_hash=digest, run_token=token)
    group = store.create(target, [layout], nsample=inp.nsample, boxsize=inp.boxsize, settings=meta_settings)
    group[f"source_{layout.name}"][:] = np.array(inp.sources)
    os.makedirs(os.path.join(target, DONE_DIR))
    return token


def _losses(done: dict[tuple[int, int], dict[str, Any]], nsample: int) -> list[float | None]:
    sums = np.zeros(nsample)
    counts = np.zeros(nsample)
    for (sample, _), rec in done.items():
        if rec.get("loss") is not None:
            sums[sample] += rec["loss"] * rec["n"]
            counts[sample] += rec["n"]
    return [float(s / c) if c else None for s, c in zip(sums, counts)]


# --------------------------------------------------------------------------- client side: the cluster


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@contextlib.contextmanager
def _client(opts: Options, device: str) -> Iterator[tuple[Any, dict[str, Any]]]:
    """A Dask client: to `--scheduler` / `--scheduler-file`, or to a local cluster of worker processes."""
    from distributed import Client, LocalCluster

    timeout = f"{opts.connect_timeout}s"
    cluster = None
    info: dict[str, Any] = {}
    if opts.scheduler or opts.scheduler_file:
        what = opts.scheduler or f"the scheduler file {opts.scheduler_file}"
        if opts.scheduler_file and not os.path.isfile(opts.scheduler_file):
            raise UserError(f"--scheduler-file {opts.scheduler_file} does not exist")
        try:
            if opts.scheduler:
                client = Client(opts.scheduler, timeout=timeout, set_as_default=False)
            else:
                client = Client(scheduler_file=opts.scheduler_file, timeout=timeout, set_as_default=False)
        except Exception as exc:
            msg = " ".join(str(exc).split())[:200]
            raise UserError(f"cannot reach the Dask scheduler at {what} within {opts.connect_timeout:g} s "
                            f"({type(exc).__name__}: {msg})") from None
        info["cluster"] = opts.scheduler or opts.scheduler_file
        try:
            client.wait_for_workers(1, timeout=opts.wait_workers)
        except Exception:
            client.close()
            raise UserError(f"the Dask scheduler at {what} has no workers after {opts.wait_workers:g} s") from None
    else:
        workers = opts.workers
        if workers is None:
            workers = max(1, _cuda_count()) if device == "cuda" else min(2, os.cpu_count() or 1)
        if workers < 1 or opts.threads_per_worker < 1:
            raise UserError(f"--workers {workers} and --threads-per-worker {opts.threads_per_worker} must be positive")
        cluster = LocalCluster(n_workers=workers, threads_per_worker=opts.threads_per_worker, processes=True,
                               dashboard_address=None, silence_logs=logging.ERROR)
        client = Client(cluster, set_as_default=False)
        info["cluster"] = f"local, {workers} worker processes x {opts.threads_per_worker} threads"
        info["workers"] = workers
    try:
        yield client, info
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _torch_threads(opts: Options, device: str, workers: int | None) -> int | None:
    if opts.torch_threads:
        return opts.torch_threads
    if workers is None or device != "cpu":
        return None  # an existing cluster keeps its own setting
    return max(1, (os.cpu_count() or 1) // (workers * opts.threads_per_worker))


def _preload_all(client, job: Job) -> None:
    """Every worker present loads the model before the first tile, so a model that cannot load on a
    worker (e.g. a checkpoint path it cannot see) fails once, here, and the tile phase times tiles."""
    workers = list(client.scheduler_info(n_workers=-1)["workers"])
    futures = [client.submit(preload, job, key=f"m2m-load-{job.token[:8]}-{i}", workers=[w],
                             allow_other_workers=True, pure=False) for i, w in enumerate(workers)]
    try:
        for fut in futures:
            fut.result()
    finally:
        for fut in futures:
            fut.cancel()


def _submit_all(client, job: Job, todo: list[tuple[int, list[int]]], total: int, done: int,
                progress: bool) -> list[tuple[int, int, float | None, int]]:
    from distributed import as_completed
    from tqdm import tqdm

    futures = [client.submit(run_tiles, job, sample, ids, key=f"m2m-infer-{job.token[:8]}-{sample}-{ids[0]}",
                             retries=0) for sample, ids in todo]
    owner = {f.key: sample for f, (sample, _) in zip(futures, todo)}
    results = []
    with tqdm(total=total, initial=done, unit="tile", desc="infer", disable=not progress,
              file=sys.stderr) as bar:
        try:
            for fut in as_completed(futures, loop=client.loop):
                sample = owner[fut.key]
                try:
                    res = fut.result()
                except UserError:
                    raise
                except Exception as exc:
                    raise RuntimeError(f"tile task {fut.key} failed: {type(exc).__name__}: {exc}") from exc
                results.extend((sample, t, loss, n) for t, loss, n in res)
                bar.update(len(res))
        finally:
            for f in futures:
                f.cancel()
    return results


# --------------------------------------------------------------------------- the engine


def _compare_training(meta: dict[str, Any], opts: Options) -> list[str]:
    """Notes where the options differ from the settings the checkpoint was trained with."""
    notes = []
    given = {"model": opts.model, "scale_factor": opts.scale_factor,
             "in_norms": list(opts.in_norms or []), "tgt_norms": list(opts.tgt_norms or [])}
    for key, value in given.items():
        if key in meta:
            trained = meta[key] if meta[key] is not None else ([] if key.endswith("norms") else None)
            if trained != value:
                notes.append(f"the checkpoint was trained with {key} {trained!r}, this run uses {value!r}")
    return notes


def _check_out_name(name: str) -> None:
    if not name.replace("_", "").replace("-", "").isalnum() or name.startswith(("source_", "sample", "channel_")):
        raise UserError(f"--out-field {name!r}: use letters, digits, '_' or '-' (not 'sample', 'channel_*' "
                        "or 'source_*')")


def _resolve_local_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {device!r}: expected auto, cpu or cuda")
    if device == "auto":
        return "cuda" if _cuda_count() else "cpu"
    return device


def run(opts: Options) -> dict[str, Any]:
    """Run `m2m infer` (or the engine under `m2m test`); returns a summary for printing.

    Raises `UserError` for every bad input, before any worker starts when it can.
    """
    t_start = time.perf_counter()
    notes: list[str] = []
    if opts.batch_size < 1:
        raise UserError(f"--batch-size {opts.batch_size} must be positive")
    if not isinstance(opts.scale_factor, int) or opts.scale_factor < 1:
        raise UserError(f"--scale-factor {opts.scale_factor} must be a positive integer")
    if not opts.out:
        raise UserError("--out: give the path of the prediction store to write")
    out = os.path.abspath(opts.out)
    if not opts.data and not opts.in_patterns:
        raise UserError("--data: give the input store")
    inp = _store_inputs(opts) if opts.data else _npy_inputs(opts)
    if opts.data and os.path.abspath(opts.data) == out:
        raise UserError("--out must differ from --data")
    _target_box(inp, opts)
    ndim = len(inp.box)
    out_chan = opts.out_chan or (sum(inp.tgt_chans) if inp.targets else sum(inp.in_chans))
    if opts.out_chan and inp.targets and opts.out_chan != sum(inp.tgt_chans):
        raise UserError(f"--out-chan {opts.out_chan} differs from the {sum(inp.tgt_chans)} channels of the target")
    device = _resolve_local_device(opts.device)
    if device == "cuda" and not (opts.scheduler or opts.scheduler_file) and not _cuda_count():
        raise UserError("--device cuda: no CUDA device is available here")
    checkpoint = os.path.abspath(opts.load_state)
    if not os.path.isfile(checkpoint):
        raise UserError(f"checkpoint {checkpoint} does not exist")
    spec = ModelSpec(opts.model, checkpoint, _file_stamp(checkpoint), sum(inp.in_chans), out_chan,
                     opts.scale_factor, ndim, json.dumps(opts.model_kwargs, sort_keys=True),
                     os.path.abspath(opts.callback_at) if opts.callback_at else None)
    trained: dict[str, Any] = {}
    model = load_model(spec, trained)
    pl = make_plan(model, opts, inp)
    del model
    notes.extend(_compare_training(trained, opts))

    from map2map.data.fields import _norms

    _norms(opts.in_norms, len(inp.inputs), "--in-norms", spec.callback_at)
    _norms(opts.tgt_norms, len(inp.targets) or 1, "--tgt-norms", spec.callback_at)
    criterion = None
    if inp.targets:
        from map2map.utils.imports import import_attr

        criterion = opts.criterion
        import_attr(criterion, ["torch.nn"], spec.callback_at, what="criterion")

    out_field = opts.out_field or (opts.tgt[0] if opts.tgt and len(opts.tgt) == 1 else "prediction")
    _check_out_name(out_field)
    layout = store.FieldLayout(out_field, out_chan, pl.plan.out_box, pl.out_shard, pl.out_chunk)
    plan_settings = {
        "model": opts.model, "model_kwargs": opts.model_kwargs, "checkpoint": checkpoint,
        "checkpoint_stamp": list(spec.stamp), "in_fields": list(opts.in_fields or []),
        "tgt_fields": list(opts.tgt or []), "in_patterns": list(opts.in_patterns or []),
        "tgt_patterns": list(opts.tgt_patterns or []), "input": inp.label, "input_identity": inp.identity,
        "crop": list(pl.plan.tile), "in_pad": [list(p) for p in pl.plan.pad], "scale_factor": opts.scale_factor,
        "in_norms": list(opts.in_norms or []), "tgt_norms": list(opts.tgt_norms or []),
        "norm_kwargs": opts.norm_kwargs, "callback_at": spec.callback_at, "criterion": criterion,
        "out_field": out_field, "out_chan": out_chan, "out_shard": list(pl.out_shard),
        "out_chunk": list(pl.out_chunk), "stride": pl.stride,
        # they change the shape of each forward pass or where it runs, hence the last bits of the result
        "batch_size": opts.batch_size, "device": opts.device,
    }
    digest = _settings_hash(plan_settings)
    settings = {
        out_field: {"model": opts.model, "checkpoint": checkpoint, "input": inp.label},
        "created_by": "m2m infer", "model": opts.model, "checkpoint": checkpoint, "input_store": inp.label,
        "infer": plan_settings,
    }
    target, token = _check_output(out, digest, opts.overwrite, notes)

    if token:  # resuming (its marker directory is gone only if it died while finishing: redo all)
        os.makedirs(os.path.join(target, DONE_DIR), exist_ok=True)
    done = read_done(os.path.join(target, DONE_DIR)) if token else {}
    ntiles = pl.plan.ntiles
    # batches are fixed groups of tiles, the same in every run: a tile's values can depend on the
    # shape of the forward pass it was part of, so a batch with any tile missing is redone whole
    todo = [(sample, ids) for sample in range(inp.nsample) for ids in tiles.batches(range(ntiles), opts.batch_size)
            if not all((sample, t) in done for t in ids)]
    total = ntiles * inp.nsample
    ndone_before = total - sum(len(ids) for _, ids in todo)

    summary: dict[str, Any] = {"output": out, "field": out_field, "nsample": inp.nsample, "tiles": total,
                               "skipped": ndone_before, "computed": 0, "notes": notes,
                               "tile": list(pl.plan.tile), "pad": [list(p) for p in pl.plan.pad],
                               "out_shape": list(pl.plan.out_box), "stride": pl.stride}
    t_setup = time.perf_counter()
    worker_info: dict[str, Any] = {}
    if todo:
        with _client(opts, device) as (client, info):
            if token is None:  # only once the cluster is there: a failed start leaves nothing behind
                token = _create_output(target, layout, inp, settings, digest)
            job = Job(token, target, out_field, tuple(inp.inputs), tuple(inp.targets), tuple(inp.in_chans),
                      tuple(inp.tgt_chans), tuple(opts.in_norms) if opts.in_norms else None,
                      tuple(opts.tgt_norms) if opts.tgt_norms else None,
                      json.dumps(opts.norm_kwargs, sort_keys=True), spec, pl.plan, pl.offsets, pl.out_shape,
                      criterion, opts.device if (opts.scheduler or opts.scheduler_file) else device,
                      _torch_threads(opts, device, info.get("workers")))
            summary["cluster"] = info["cluster"]
            _preload_all(client, job)
            t_tiles = time.perf_counter()
            results = _submit_all(client, job, todo, total, ndone_before, opts.progress)
            summary["tiles_s"] = time.perf_counter() - t_tiles
            summary["computed"] = len(results)
            try:
                worker_info = client.run(worker_stats, token)
            except Exception:  # statistics only
                worker_info = {}
    summary["workers"] = worker_info
    done = read_done(os.path.join(target, DONE_DIR))
    missing = total - len([k for k in done if k[0] < inp.nsample and k[1] < ntiles])
    if missing:
        raise RuntimeError(f"{missing} tiles have no completion record after the run; rerun to finish them")
    losses = _losses(done, inp.nsample) if criterion else None
    shutil.rmtree(os.path.join(target, DONE_DIR))
    extra = {"loss": {"criterion": criterion, "per_sample": losses}} if criterion else {}
    store.mark_complete(target, inp.nsample, **extra)
    if target != out:
        trash = out + ".m2m-old"
        os.replace(out, trash)
        os.replace(target, out)
        shutil.rmtree(trash)
    summary["loss"] = losses
    summary["criterion"] = criterion
    summary["setup_s"] = t_setup - t_start
    summary["total_s"] = time.perf_counter() - t_start
    return summary


# --------------------------------------------------------------------------- m2m test


def out_npy_path(target: str) -> str:
    """Where `m2m test` writes the prediction for target file `target`: ``<target>_out.npy``."""
    base = target[:-4] if target.endswith(".npy") else target
    return base + "_out.npy"


def write_npy(arr, sample: int, channels: slice, path: str, shard: Sequence[int]) -> None:
    """Copy channels `channels` of `sample` of zarr array `arr` into a new .npy file, one shard-sized
    region at a time (never the whole box in memory), atomically (temporary name, then rename)."""
    shape = (channels.stop - channels.start,) + tuple(arr.shape[2:])
    tmp = f"{path}.tmp-{os.getpid()}.npy"
    mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(arr.dtype), shape=shape)
    try:
        axes = [range(0, n, s) for n, s in zip(shape[1:], shard)]
        for starts in np.ndindex(*[len(a) for a in axes]):
            region = tuple(slice(a[i], min(a[i] + s, n)) for a, i, s, n in zip(axes, starts, shard, shape[1:]))
            mm[(slice(None),) + region] = arr[(sample, channels) + region]
        mm.flush()
        del mm
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def run_test(opts: Options) -> dict[str, Any]:
    """`m2m test`: predict each sample of .npy inputs with the same engine and write
    ``<target>_out.npy`` next to each target file.

    Predictions go through a prediction store: `opts.out` if given (kept),
    else a hidden store in the first target file's directory named after the
    settings, so that a rerun after a crash resumes it; it is removed at the end.
    """
    if not opts.in_patterns:
        raise UserError("--test-in-patterns: give the .npy glob pattern(s) of the input fields")
    if not opts.tgt_patterns:
        raise UserError("--test-tgt-patterns: give the .npy glob pattern(s) of the target fields")
    tgts = _glob_fields(opts.tgt_patterns, "--test-tgt-patterns")
    keep = opts.out is not None
    if not keep:
        key = json.dumps([list(opts.in_patterns), list(opts.tgt_patterns), opts.model,
                          os.path.abspath(opts.load_state)])
        name = f".m2m-test-{hashlib.sha1(key.encode()).hexdigest()[:12]}.zarr"
        opts.out = os.path.join(os.path.dirname(tgts[0][0]), name)
        opts.overwrite = True
    summary = run(opts)
    import zarr

    arr = zarr.open_group(summary["output"], mode="r", use_consolidated=False)[summary["field"]]
    shard = tuple(arr.shards[2:]) if arr.shards else tuple(arr.chunks[2:])
    written = []
    for sample in range(summary["nsample"]):
        start = 0
        for paths in tgts:
            c = np.load(paths[sample], mmap_mode="r").shape[0]
            path = out_npy_path(paths[sample])
            write_npy(arr, sample, slice(start, start + c), path, shard)
            written.append(path)
            start += c
    if not keep:
        shutil.rmtree(summary["output"])
        summary["output"] = None
    summary["written"] = written
    return summary
