"""How a model fits its data and its weights: the model card, pads from crops, and loading checkpoints.

Terms:

* *model card*: what a checkpoint says about the model it holds, so that
  inference needs nothing else (`ModelCard`): the model's name and the
  ``--callback-at`` directory it came from, its keyword arguments, channels,
  scale factor and dimension, the input and target fields with their norms,
  the pads and crop it was trained with, its total stride, and where it was
  trained (stores, store format, map2map version); for a styled model the
  names of its style parameters in the order it takes them and their style
  norm (`map2map.data.styles.StyleNorm`), none for an unstyled one.
* *fit*: a state dict fits a model when every key is present with the same
  shape and nothing else is there (`match_model_state`).
* *cover*: a model's output covers a target crop when it is at least as large
  per axis and larger by an even number of voxels, so it narrows symmetrically
  onto the target (`check_geometry`, `auto_pad`).

Training writes the card into every checkpoint; `m2m infer` reads it back
(`read_checkpoint`) and `m2m info` shows it.  The output-shape probe itself
lives beside the stride rules in `map2map.models.stride`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

from map2map.errors import UserError

CARD_VERSION = 1


def _tuple(value: Any, item=lambda v: v) -> tuple | None:
    return None if value is None else tuple(item(v) for v in value)


def _pairs(value: Any) -> tuple[tuple[int, int], ...]:
    return tuple((int(lo), int(hi)) for lo, hi in value)


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """What a checkpoint says about its model (see the module docstring); plain values only."""

    model: str
    in_chan: int
    out_chan: int
    scale_factor: int
    ndim: int
    model_kwargs: Mapping[str, Any]
    callback_at: str | None
    in_fields: tuple[str, ...] | None
    tgt_fields: tuple[str, ...] | None
    in_chans: tuple[int, ...]
    tgt_chans: tuple[int, ...]
    in_norms: tuple[str, ...] | None
    tgt_norms: tuple[str, ...] | None
    norm_kwargs: Mapping[str, Any]
    in_pad: tuple[tuple[int, int], ...]
    tgt_pad: tuple[tuple[int, int], ...]
    total_stride: int
    crop: tuple[int, ...]
    train_stores: tuple[str, ...]
    store_format_version: int | None
    map2map_version: str
    style_names: tuple[str, ...] = ()  # empty: an unstyled model (and every card written before styles)
    style_shift: tuple[float, ...] = ()
    style_scale: tuple[float, ...] = ()
    card_version: int = CARD_VERSION

    @property
    def style_size(self) -> int | None:
        """The number of style parameters the model takes; None for an unstyled model."""
        return len(self.style_names) or None

    @property
    def style_norm(self):
        """The `map2map.data.styles.StyleNorm` the model was trained with; None for an unstyled model."""
        if not self.style_names:
            return None
        from map2map.data.styles import StyleNorm

        return StyleNorm(self.style_names, self.style_shift, self.style_scale)

    @staticmethod
    def style_fields(norm) -> dict[str, tuple]:
        """The card's style fields for a `StyleNorm` (None: unstyled), as keywords: ``ModelCard(...,
        **ModelCard.style_fields(norm))``."""
        if norm is None:
            return {}
        return {"style_names": tuple(norm.names), "style_shift": tuple(norm.shift),
                "style_scale": tuple(norm.scale)}

    def to_dict(self) -> dict[str, Any]:
        from map2map.stage import jsonable

        return jsonable(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "the checkpoint") -> "ModelCard":
        """The card saved as `d`; a `UserError` if it is not one this map2map can read."""
        try:
            if int(d.get("card_version", 0)) > CARD_VERSION:
                raise UserError(f"{source} has a model card of version {d['card_version']}; this map2map "
                                f"reads up to {CARD_VERSION}")
            card = cls(
                model=str(d["model"]), in_chan=int(d["in_chan"]), out_chan=int(d["out_chan"]),
                scale_factor=int(d["scale_factor"]), ndim=int(d["ndim"]),
                model_kwargs=dict(d.get("model_kwargs") or {}), callback_at=d.get("callback_at"),
                in_fields=_tuple(d.get("in_fields"), str), tgt_fields=_tuple(d.get("tgt_fields"), str),
                in_chans=_tuple(d["in_chans"], int), tgt_chans=_tuple(d["tgt_chans"], int),
                in_norms=_tuple(d.get("in_norms"), str), tgt_norms=_tuple(d.get("tgt_norms"), str),
                norm_kwargs=dict(d.get("norm_kwargs") or {}), in_pad=_pairs(d["in_pad"]),
                tgt_pad=_pairs(d["tgt_pad"]), total_stride=int(d["total_stride"]), crop=_tuple(d["crop"], int),
                train_stores=_tuple(d.get("train_stores") or (), str),
                store_format_version=d.get("store_format_version"),
                map2map_version=str(d.get("map2map_version", "unknown")),
                style_names=_tuple(d.get("style_names") or (), str),
                style_shift=_tuple(d.get("style_shift") or (), float),
                style_scale=_tuple(d.get("style_scale") or (), float),
                card_version=int(d.get("card_version", CARD_VERSION)))
            _ = card.style_norm  # built once here, so that a malformed style norm is refused with the rest
            return card
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{source} has a malformed model card ({type(exc).__name__}: {exc})") from None

    def describe(self) -> list[str]:
        """The card as lines for `m2m info`."""
        kw = ", ".join(f"{k}={v!r}" for k, v in self.model_kwargs.items())
        pad = ",".join(f"{lo}" if lo == hi else f"{lo},{hi}" for lo, hi in self.in_pad)
        lines = [f"model      {self.model}({self.in_chan}, {self.out_chan}, scale_factor={self.scale_factor}"
                 + (f", {kw}" if kw else "") + f"), {self.ndim}D, total stride {self.total_stride}"]
        if self.callback_at:
            lines.append(f"callback   {self.callback_at}")
        lines.append(f"input      {_fields(self.in_fields, self.in_chans, self.in_norms)}")
        lines.append(f"target     {_fields(self.tgt_fields, self.tgt_chans, self.tgt_norms)}")
        if self.norm_kwargs:
            lines.append(f"norm args  {dict(self.norm_kwargs)}")
        if self.style_names:
            lines.append(f"styles     {self.style_norm.describe()} (each range onto [-1, 1])")
        lines.append(f"crop       {list(self.crop)}, in-pad {pad}")
        lines.append(f"trained on {', '.join(self.train_stores) or 'unknown'}"
                     + (f" (store format {self.store_format_version})" if self.store_format_version else "")
                     + f", map2map {self.map2map_version}")
        return lines


def _fields(names: Sequence[str] | None, chans: Sequence[int], norms: Sequence[str] | None) -> str:
    names = list(names) if names else [f"file pattern {i + 1}" for i in range(len(chans))]
    norms = list(norms) if norms else [None] * len(names)
    return ", ".join(f"{n} ({c} channel{'s' if c != 1 else ''}" + (f", norm {m})" if m else ")")
                     for n, c, m in zip(names, chans, norms))


# ---------------------------------------------------------------- checkpoints


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file read back: the model state, its card (None for checkpoints without one), and
    the training state around it (epoch, best loss) when it is a training state."""

    path: str
    model_state: Mapping[str, Any]
    card: ModelCard | None
    epoch: int | None
    min_loss: float | None
    raw: Mapping[str, Any]


def read_checkpoint(path: str) -> Checkpoint:
    """Read checkpoint `path`: a training state (``state_{epoch}.pt``), a dict with a 'model' state dict,
    or a bare state dict; a `UserError` for anything else."""
    import torch

    from map2map.utils.checkpoint import load_file, unwrap_ddp

    obj = load_file(path)
    raw: Mapping[str, Any] = {}
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        raw, obj = obj, obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} holds no model state (expected a state_dict, or a dict with a 'model' "
                        "state_dict as m2m train writes)")
    obj = unwrap_ddp(obj)
    card = raw.get("card")
    epoch = raw.get("epoch")
    return Checkpoint(path, obj, ModelCard.from_dict(card, path) if isinstance(card, dict) else None,
                      int(epoch) if epoch is not None else None, raw.get("min_loss"), raw)


def _shape(v: Any) -> list[int] | None:
    return list(v.shape) if hasattr(v, "shape") else None


def _summarize(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def first_difference(own: Mapping[str, Any], saved: Mapping[str, Any]) -> str | None:
    """The first entry, in the model's order, where state `saved` differs from the model's state `own`
    (missing, or of another shape, with both shapes), else the first entry the model lacks; None if they fit."""
    for k, v in own.items():
        if k not in saved:
            return f"{k} {_shape(v)} is missing in the checkpoint"
        if _shape(saved[k]) != _shape(v):
            return f"{k} is {_shape(saved[k])} in the checkpoint but {_shape(v)} in the model"
    extra = next((k for k in saved if k not in own), None)
    return None if extra is None else f"{extra} {_shape(saved[extra])} in the checkpoint is not in the model"


def match_model_state(model, saved: Mapping[str, Any], strict: bool, source: str = "the state",
                      hint: str = "check --in/--tgt fields, --model and --misc-kwargs, or load the matching "
                                  "entries only with --load-state-non-strict") -> tuple[dict[str, Any], list[str]]:
    """Check `saved` against `model`'s state dict; return the entries to load and notes on the rest.

    Strict: any missing key, unexpected key or shape mismatch raises one
    `UserError` naming the first difference (`first_difference`) and counting
    the rest.  Non-strict: only entries whose key and shape match are
    returned, and the notes name what was skipped.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = [f"{k} {_shape(saved[k])} vs {_shape(own[k])}" for k in own
              if k in saved and _shape(saved[k]) != _shape(own[k])]
    problems = []
    if shapes:
        problems.append(f"shape mismatch (checkpoint vs model): {_summarize(shapes)}")
    if missing:
        problems.append(f"missing in checkpoint: {_summarize(missing)}")
    if unexpected:
        problems.append(f"not in model: {_summarize(unexpected)}")
    if problems and strict:
        counts = [f"{n} {what}" for n, what in ((len(shapes), "of another shape"), (len(missing), "missing"),
                                                (len(unexpected), "not in the model")) if n]
        raise UserError(f"{source} does not fit the model: {first_difference(own, saved)} "
                        f"({', '.join(counts)} of {len(own)} model entries; {hint})")
    keep = {k: v for k, v in saved.items() if k in own and _shape(v) == _shape(own[k])}
    return keep, problems


def load_model_state(model, saved: Mapping[str, Any], strict: bool, source: str = "the state",
                     hint: str | None = None) -> list[str]:
    """Load `saved` into `model` (see `match_model_state`); returns notes on skipped entries."""
    keep, problems = match_model_state(model, saved, strict, source, *([hint] if hint else []))
    model.load_state_dict(keep, strict=not problems)
    return problems


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model by name and constructor arguments, and the checkpoint it loads (with a stamp of the file:
    size and modification time, so a worker reloads a file that changed)."""

    name: str
    checkpoint: str
    stamp: tuple[int, int]
    in_chan: int
    out_chan: int
    scale_factor: int
    ndim: int
    kwargs_json: str
    callback_at: str | None
    style_size: int | None = None  # the model card's `ModelCard.style_size`

    @property
    def kwargs(self) -> dict[str, Any]:
        import json

        return json.loads(self.kwargs_json)

    def build(self):
        """The model, untrained (as `m2m train` builds it)."""
        from map2map.models import build_model

        return build_model(self.name, self.in_chan, self.out_chan, scale_factor=self.scale_factor,
                           ndim=self.ndim, kwargs=self.kwargs, callback_at=self.callback_at,
                           style_size=self.style_size)

    def load(self):
        """The model with the checkpoint's weights, strictly, in eval mode."""
        model = self.build()
        load_model_state(model, read_checkpoint(self.checkpoint).model_state, strict=True,
                         source=f"checkpoint {self.checkpoint}",
                         hint=f"model {self.name} with {self.in_chan} input and {self.out_chan} output channels; "
                              "check --model, --model-kwargs, --out-chan, the input fields and --scale-factor")
        return model.eval()


def file_stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


# ---------------------------------------------------------------- pads and crops


def pad_text(pad: Sequence[int] | Sequence[tuple[int, int]]) -> str:
    """A pad as the command line writes it: ``20``, ``20,20,16`` or ``lo0,hi0,...``."""
    pairs = [(p, p) if isinstance(p, int) else tuple(p) for p in pad]
    if all(lo == hi for lo, hi in pairs):
        los = [lo for lo, _ in pairs]
        return str(los[0]) if len(set(los)) == 1 else ",".join(map(str, los))
    return ",".join(f"{lo},{hi}" for lo, hi in pairs)


def auto_pad(model, in_chan: int, crop: Sequence[int], ndim: int, scale_factor: int,
             tgt_pad: Sequence[tuple[int, int]], memo: dict | None = None) -> list[int]:
    """The smallest input pad per axis whose output covers the target crop (+ tgt-pad), by `required_pad`
    (`memo`: its `map2map.models.stride.ShapeMemo`)."""
    from map2map.models.stride import required_pad

    found: dict[tuple[int, int], int] = {}
    pads = []
    for c, (lo, hi) in zip(crop, tgt_pad):
        key = (c, (lo + hi + 1) // 2)
        if key not in found:
            found[key] = required_pad(model, in_chan, key[0], ndim, scale_factor, key[1], memo=memo)
        pads.append(found[key])
    return pads


def _misfit(model, in_chan: int, crop: Sequence[int], in_pad, tgt_pad, scale_factor: int,
            stride: int) -> tuple[str | None, tuple[int, ...] | None]:
    """(why the model does not fit crop and pads, or None; the output shape) for `check_geometry`."""
    from map2map.models.stride import output_shape

    window = tuple(c + lo + hi for c, (lo, hi) in zip(crop, in_pad))
    if any(n % stride for n in window):
        return (f"crop + in-pad = {list(window)} voxels per axis is not a multiple of the model's total "
                f"stride {stride}"), None
    out = output_shape(model, in_chan, window)
    tgt_crop = [c * scale_factor for c in crop]
    tgt = [c + lo + hi for c, (lo, hi) in zip(tgt_crop, tgt_pad)]
    where = f"with crop {list(crop)} and --in-pad {pad_text(in_pad)} the model"
    if out is None or len(out) != len(crop):
        return (f"{where} cannot run an input of {list(window)} voxels per axis (it rejects that size or shrinks "
                "it to nothing)"), None
    if any(o < c or (o - t) % 2 for o, c, t in zip(out, tgt_crop, tgt)):
        return (f"{where} maps an input of {list(window)} voxels to {list(out)}, which does not cover the "
                f"target crop {tgt_crop} (target window {tgt}) with an even margin"), out
    return None, out


def _remedy(model, in_chan: int, crop, ndim: int, scale_factor: int, in_pad, tgt_pad, stride: int,
            auto: bool) -> str:
    """What would fit instead: a pad `auto_pad` finds and that passes the check, or why none does."""
    from map2map.models.stride import StrideError

    odd = [d for d, (lo, hi) in enumerate(tgt_pad) if (lo + hi) % 2]
    if odd:
        return (f"--tgt-pad adds an odd number of voxels on axis {odd[0]}, which no pad on both sides of the "
                "input matches; give an even total --tgt-pad per axis, or --in-pad per side (lo0,hi0,...)")
    try:
        pad = auto_pad(model, in_chan, crop, ndim, scale_factor, tgt_pad)
    except StrideError as exc:
        return f"no --in-pad fixes it: {exc}"
    pairs = tuple((p, p) for p in pad)
    if auto or pairs == tuple(tuple(p) for p in in_pad) or \
            _misfit(model, in_chan, crop, pairs, tgt_pad, scale_factor, stride)[0] is not None:
        return "no --in-pad fixes it; choose another --crop or model"
    return f"--in-pad {pad_text(pad)} would (or use --in-pad auto)"


def check_geometry(model, in_chan: int, crop: Sequence[int], step: Sequence[int], in_pad, tgt_pad,
                   scale_factor: int, auto: bool = False) -> tuple[int, tuple[int, ...]]:
    """Check crops, steps and pads against the model; return (total stride, output shape).

    Crop sizes and steps must be multiples of the total stride (the model is
    translation-equivariant only for such shifts), so must crop + pads, and
    the output must cover the target crop so it narrows symmetrically onto it.
    `auto`: `in_pad` came from `auto_pad` (``--in-pad auto``), so the message
    of a misfit suggests no other pad.
    """
    from map2map.models.stride import check_stride, total_stride

    stride = total_stride(model)
    check_stride(list(crop), list(step), stride)
    problem, out = _misfit(model, in_chan, crop, in_pad, tgt_pad, scale_factor, stride)
    if problem is not None:
        remedy = _remedy(model, in_chan, crop, len(crop), scale_factor, in_pad, tgt_pad, stride, auto)
        raise UserError(f"{'--in-pad auto: ' if auto else ''}{problem}; {remedy}")
    return stride, out
