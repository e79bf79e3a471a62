"""Checkpoints and models for inference: read a checkpoint, build the model it fits, probe its output shape."""

from __future__ import annotations

import copy
import os
from typing import Any, Sequence

from map2map.errors import UserError
from map2map.infer.specs import ModelSpec


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


def file_stamp(path: str) -> tuple[int, int]:
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
