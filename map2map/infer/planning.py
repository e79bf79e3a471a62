"""The client side: tiles, pads and output chunking for a model on the input grid."""

from __future__ import annotations

import math
from dataclasses import dataclass

from map2map import geometry, tiles
from map2map.errors import UserError
from map2map.infer.inputs import Inputs
from map2map.infer.specs import InferConfig
from map2map.modelfit import auto_pad
from map2map.models.stride import ShapeMemo, output_shape, total_stride


def _default_crop(inp: Inputs, stride: int) -> tuple[int, ...]:
    base = inp.in_shard if inp.in_shard else tuple(min(128, n) for n in inp.box)
    return tuple(max(stride, min(c, n) // stride * stride) for c, n in zip(base, inp.box))


def _pads(model, opts: InferConfig, in_chan: int, tile: tuple[int, ...], ndim: int,
          memo: ShapeMemo | None = None) -> tuple[tuple[int, int], ...]:
    if isinstance(opts.in_pad, str):
        if opts.in_pad != "auto":
            raise UserError(f"--in-pad {opts.in_pad!r}: expected 'auto' or integers")
        return tuple((p, p) for p in auto_pad(model, in_chan, tile, ndim, opts.scale_factor, ((0, 0),) * ndim,
                                              memo))
    try:
        return geometry.parse_pad(list(opts.in_pad), ndim, "--in-pad")
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _forwards_sharing(opts: InferConfig, device) -> int:
    """Forward passes that may run at once on one device (CUDA) or on the machine (CPU): tasks per worker
    (its threads) times the workers sharing it, as a run without ``--scheduler`` starts them
    (`map2map.infer.cluster.local_workers`); an existing cluster is assumed to give each device one worker."""
    import torch

    from map2map.infer.cluster import local_workers

    workers = 1
    if not (opts.scheduler or opts.scheduler_file):
        workers = local_workers(opts, device.type)
        if device.type == "cuda":
            workers = -(-workers // max(1, torch.cuda.device_count()))
    return workers * opts.threads_per_worker


def _auto_crop(model, opts: InferConfig, inp: Inputs, stride: int,
               shard: tuple[int, ...] | None) -> tuple[tuple[int, ...], str]:
    """The tile of `--crop auto` (`tiles.auto_tile` under the memory budget, `map2map.infer.memory`) and
    the note that says what was chosen and why."""
    from map2map.infer import memory

    ndim, s, box = len(inp.box), opts.scale_factor, inp.box
    in_chan = sum(inp.in_chans)
    step = tuple(tiles.tile_step(stride, s, sh) for sh in shard) if shard else (stride,) * ndim
    cap = tuple(n // st * st for n, st in zip(box, step))
    if not all(cap):
        raise UserError(f"--crop auto: no tile fits the box {list(box)}: a tile side must be a multiple of "
                        f"{list(step)} (the model's total stride {stride} and the output shard); use smaller "
                        "--out-shard or a larger box")
    halo = tuple(lo + hi for lo, hi in _pads(model, opts, in_chan, cap, ndim))
    device = memory.probe_device(opts.device)
    fp = memory.footprint(model, in_chan, tuple(c + h for c, h in zip(cap, halo)),
                          tuple(st + h for st, h in zip(step, halo)), device)
    in_per_voxel = 4 * in_chan  # the float32 input window, not in the probe's peak
    per_voxel = fp.per_voxel + in_per_voxel
    if getattr(opts, "velocity", False):  # forward mode carries a tangent beside every value: twice the probe's
        per_voxel += fp.per_voxel + fp.out_per_voxel
    tta_mode = opts.tta
    if tta_mode != "none":  # the transformed input, the transformed-back output and the running mean
        per_voxel += in_per_voxel + 2 * fp.out_per_voxel
    per_voxel *= opts.batch_size
    budget, why = memory.budget_bytes(opts.tile_memory, device)
    if opts.tile_memory is None:
        share = _forwards_sharing(opts, device)
        budget = budget // share - memory.model_bytes(model)
        why += f", shared by {share} forward passes at once, less the model's weights"
    gib = memory.GIB
    tile = tiles.auto_tile(box, step, halo, int(max(budget, 0) // per_voxel))
    if tile is None:
        small = math.prod(st + h for st, h in zip(step, halo))
        raise UserError(f"--crop auto: the smallest tile {list(step)} needs about {small * per_voxel / gib:.2f} "
                        f"GiB per forward pass, more than the budget of {max(budget, 0) / gib:.2f} GiB ({why}); "
                        "give a larger --tile-memory, a smaller --batch-size, or a --crop")
    window = tuple(t + h for t, h in zip(tile, halo))
    note = (f"--crop auto: tile {list(tile)} (window {list(window)}), computing "
            f"{tiles.tile_work(box, tile, halo) / math.prod(box):.2f}x the voxels it keeps; a forward pass of "
            f"{opts.batch_size} tile(s){' with --tta ' + tta_mode if tta_mode != 'none' else ''} needs about "
            f"{math.prod(window) * per_voxel / gib:.2f} GiB of {budget / gib:.2f} GiB ({why}; memory per voxel "
            f"from {fp.how})")
    return tile, note


@dataclass
class Plan:
    """The tiles of a run and the output's layout; `note` (or None) says how `--crop auto` chose the tile,
    for the run to print."""

    plan: tiles.TilePlan
    offsets: tuple[int, ...]
    out_shape: tuple[int, ...]
    out_shard: tuple[int, ...]
    out_chunk: tuple[int, ...]
    stride: int
    note: str | None = None


def make_plan(model, opts: InferConfig, inp: Inputs) -> Plan:
    """Tiles, pads and output chunking for `model` on the input grid, or a `UserError` that says why not."""
    ndim = len(inp.box)
    s = opts.scale_factor
    stride = total_stride(model)
    note = None
    try:
        shard = geometry.as_tuple(list(opts.out_shard), ndim, "--out-shard") if opts.out_shard else None
        if opts.crop == "auto":
            tile, note = _auto_crop(model, opts, inp, stride, shard)
        elif isinstance(opts.crop, str):
            raise UserError(f"--crop {opts.crop!r}: expected 'auto' or integers")
        else:
            tile = geometry.as_tuple(list(opts.crop), ndim, "--crop") if opts.crop else _default_crop(inp, stride)
        tiles.check_tile(tile, inp.box, stride, s, shard)
        shard = shard or tuple(t * s for t in tile)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    memo: ShapeMemo = {}  # the pad search's passes; the window's shape is often the last of them
    pad = _pads(model, opts, sum(inp.in_chans), tile, ndim, memo)
    plan = tiles.TilePlan(inp.box, tile, pad, s)
    out_shape = output_shape(model, sum(inp.in_chans), plan.window_shape, memo)
    if out_shape is None:
        raise UserError(f"the model rejects an input window of {list(plan.window_shape)} voxels; choose another "
                        "--crop or --in-pad")
    offsets = tiles.narrow_offsets(tile, pad, s, out_shape)
    if opts.out_chunk:
        chunk = geometry.as_tuple(list(opts.out_chunk), ndim, "--out-chunk")
        if any(c < 1 or sh % c for c, sh in zip(chunk, shard)):
            raise UserError(f"--out-chunk {list(chunk)} must divide the output shard {list(shard)}")
    else:
        chunk = tiles.choose_out_chunk(shard)
    return Plan(plan, offsets, out_shape, shard, chunk, stride, note)
