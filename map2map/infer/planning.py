"""The client side: tiles, pads and output chunking for a model on the input grid."""

from __future__ import annotations

from dataclasses import dataclass

from map2map import geometry, tiles
from map2map.errors import UserError
from map2map.infer.inputs import Inputs
from map2map.infer.specs import InferConfig
from map2map.modelfit import auto_pad
from map2map.models.stride import output_shape, total_stride


def _default_crop(inp: Inputs, stride: int) -> tuple[int, ...]:
    base = inp.in_shard if inp.in_shard else tuple(min(128, n) for n in inp.box)
    return tuple(max(stride, min(c, n) // stride * stride) for c, n in zip(base, inp.box))


def _pads(model, opts: InferConfig, in_chan: int, tile: tuple[int, ...], ndim: int) -> tuple[tuple[int, int], ...]:
    if isinstance(opts.in_pad, str):
        if opts.in_pad != "auto":
            raise UserError(f"--in-pad {opts.in_pad!r}: expected 'auto' or integers")
        return tuple((p, p) for p in auto_pad(model, in_chan, tile, ndim, opts.scale_factor, ((0, 0),) * ndim))
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


def make_plan(model, opts: InferConfig, inp: Inputs) -> Plan:
    """Tiles, pads and output chunking for `model` on the input grid, or a `UserError` that says why not."""
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
    return Plan(plan, offsets, out_shape, shard, chunk, stride)
