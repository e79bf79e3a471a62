"""`m2m info`: what a store holds, how it is laid out, and whether it is complete."""

from __future__ import annotations

import math

import numpy as np

from map2map import store


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return ""


def describe(path: str) -> str:
    """A human-readable summary of the store at `path` (incomplete stores included, and said so)."""
    st = store.open_store(path, allow_incomplete=True)
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
        stored = store.stored_bytes(path, name)
        total_raw, total_stored = total_raw + raw, total_stored + stored
        shards = arr.shards[2:] if arr.shards else None
        settings = meta["fields"].get(name, {})
        lines.append(f"  {name}: shape {shape} dims {tuple(arr.metadata.dimension_names)} dtype {arr.dtype}")
        source = f" source dtype {settings['source_dtype']}" if settings.get("source_dtype") else ""
        lines.append(f"    shard {shards} inner chunk {arr.chunks[2:]} compressor {settings.get('compressor')}{source}")
        lines.append(f"    stored {_human(stored)} of {_human(raw)} raw"
                     f" (ratio {raw / stored:.2f})" if stored else f"    stored 0 B of {_human(raw)} raw")
    if total_stored:
        lines.append(f"total      {_human(total_stored)} stored, {_human(total_raw)} raw, "
                     f"compression ratio {total_raw / total_stored:.2f}")
    return "\n".join(lines)
