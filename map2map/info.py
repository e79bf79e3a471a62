"""`m2m info`: what a store holds (layout, completeness), or what a checkpoint holds (model card, epoch, losses)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from map2map import storage, store
from map2map.stage import Summary


@dataclass(frozen=True)
class InfoConfig:
    """`m2m info PATH`: a store (a directory, or a URL read with `storage_options`) or a checkpoint file."""

    path: str
    storage_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.storage_options, str):  # the JSON text of --storage-options
            object.__setattr__(self, "storage_options", storage.parse_options(self.storage_options))


@dataclass
class InfoSummary(Summary):
    path: str
    kind: str  # "store" or "checkpoint"
    text: str

    def lines(self) -> list[str]:
        return self.text.splitlines()


def run(config: InfoConfig) -> InfoSummary:
    if not storage.is_remote(config.path) and os.path.isfile(storage.local_path(config.path)):
        path = storage.local_path(config.path)
        return InfoSummary(path, "checkpoint", describe_checkpoint(path))
    return InfoSummary(config.path, "store", describe(config.path, config.storage_options))


def describe_checkpoint(path: str) -> str:
    """A human-readable summary of checkpoint `path`: model card, epoch, losses, parameters."""
    from map2map.modelfit import read_checkpoint

    ck = read_checkpoint(path)
    nparam = sum(int(np.prod(v.shape)) for k, v in ck.model_state.items() if not k.endswith("num_batches_tracked"))
    lines = [f"checkpoint {path}" + (f" -> {os.path.realpath(path)}" if os.path.islink(path) else "")]
    if ck.epoch is not None:
        lines.append(f"epoch      {ck.epoch}" + (f", best loss {ck.min_loss:.6g}" if ck.min_loss is not None else ""))
    for rec in ck.raw.get("losses") or []:
        val = f", val {rec['val']:.6g}" if rec.get("val") is not None else ""
        lines.append(f"  epoch {rec['epoch']}: train {rec['train']:.6g}{val}, lr {rec['lr']:.3g}")
    lines.append(f"parameters {nparam} in {len(ck.model_state)} tensors")
    if ck.card is None:
        lines.append("card       none (not written by m2m train): m2m infer needs --model and the other options")
    else:
        lines += ck.card.describe()
    return "\n".join(lines)


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return ""


def _describe_styles(st: store.Store) -> list[str]:
    """One line per style parameter: its name and the range of its complete samples' values."""
    names = st.style_names
    if not names:
        return []
    values = np.asarray(st.group[store.STYLE][: st.nsample], dtype=np.float64)
    lines = [f"styles     {len(names)} parameter{'' if len(names) == 1 else 's'} ({store.STYLE} (sample, "
             f"{store.PARAM}), float32)"]
    for c, name in enumerate(names):
        if len(values):
            lines.append(f"  {name}: {values[:, c].min():.6g} to {values[:, c].max():.6g}")
        else:
            lines.append(f"  {name}: no samples")
    return lines


def describe(path: str, storage_options: storage.StorageOptions | None = None) -> str:
    """A human-readable summary of the store at `path` (a local path or URL; incomplete stores included,
    and said so)."""
    st = store.open_store(path, allow_incomplete=True, storage_options=storage_options)
    meta = st.meta
    lines = [f"store      {path}",
             f"complete   {'yes' if meta.get('complete') else 'NO (interrupted or still being written)'}",
             f"format     map2map {meta.get('format_version')}, Zarr format 3",
             f"samples    {st.nsample}",
             f"box size   {meta.get('boxsize') if meta.get('boxsize') is not None else 'unknown'}"
             f"{' (periodic)' if meta.get('periodic') else ''}",
             f"written by {meta.get('created_by', 'unknown')}"
             + (f" (model {meta['model']}, checkpoint {meta.get('checkpoint')}, input {meta.get('input_store')})"
                if meta.get("model") else "")]
    lines.append("fields")
    total_raw = total_stored = 0
    for name in st.field_names:
        arr = st.group[name]
        shape = (st.nsample,) + arr.shape[1:]
        raw = math.prod(shape) * np.dtype(arr.dtype).itemsize
        stored = store.stored_bytes(st.path, name, storage_options)
        total_raw, total_stored = total_raw + raw, total_stored + stored
        shards = arr.shards[2:] if arr.shards else None
        settings = meta["fields"].get(name, {})
        lines.append(f"  {name}: shape {shape} dims {tuple(arr.metadata.dimension_names)} dtype {arr.dtype}")
        source = f" source dtype {settings['source_dtype']}" if settings.get("source_dtype") else ""
        lines.append(f"    shard {shards} inner chunk {arr.chunks[2:]} compressor {settings.get('compressor')}{source}")
        lines.append(f"    stored {_human(stored)} of {_human(raw)} raw"
                     f" (ratio {raw / stored:.2f})" if stored else f"    stored 0 B of {_human(raw)} raw")
    lines += _describe_styles(st)
    if total_stored:
        lines.append(f"total      {_human(total_stored)} stored, {_human(total_raw)} raw, "
                     f"compression ratio {total_raw / total_stored:.2f}")
    return "\n".join(lines)
