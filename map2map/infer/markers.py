"""Tile markers: one empty file per finished tile, so that a rerun resumes where a run stopped.

A *marker* is an empty file in the run's marker directory whose name carries
everything recorded about the tile: ``{sample}-{tile}_{voxels}_{loss}``, the
loss written as Python's ``repr`` of the float (exact round trip) or
``none``.  An empty file appears under its name whole or not at all, so no
temporary file is needed, and finding the finished tiles is one directory
scan that opens no file.  Markers of the earlier format (``{sample}-{tile}``
holding JSON) are still read, so a run interrupted before this format resumes.

In object storage (`done_dir` a URL, `map2map.storage`) a marker is an empty
object under the prefix `done_dir`, of the same name: a PUT that returned is
stored (no fsync), and finding the finished tiles is one listing of the prefix.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

from map2map import storage
from map2map.storage import StorageOptions
from map2map.utils import durable

Mark = tuple[int, int, "float | None", int]  # (sample, tile, loss, voxels)


def marker_name(sample: int, tile: int, loss: float | None, count: int) -> str:
    """The marker file name of a finished tile (see the module docstring)."""
    return f"{sample}-{tile}_{count}_{'none' if loss is None else repr(float(loss))}"


def parse_marker(name: str) -> tuple[tuple[int, int], dict[str, Any]] | None:
    """((sample, tile), {"loss": ..., "n": ...}) of a marker name, or None for any other name (a record of
    the earlier format gives None too: its content is needed, see `read_done`)."""
    key, sep, rest = name.partition("_")
    if not sep:
        return None
    count, sep, loss = rest.partition("_")
    try:
        sample, tile = (int(v) for v in key.split("-"))
        return (sample, tile), {"loss": None if loss == "none" else float(loss), "n": int(count)}
    except ValueError:
        return None


def mark_all(done_dir: str, marks: Iterable[Mark], storage_options: StorageOptions | None = None) -> None:
    """Record finished tiles: one empty marker each, then one fsync of `done_dir` makes them all durable
    (in object storage: one empty object each, stored once their PUTs return).

    Call it only once the tiles' data is durable (see `map2map.utils.durable`; in object storage: once
    the PUTs of their shards returned).
    """
    if storage.is_remote(done_dir):
        names = [marker_name(sample, tile, loss, count) for sample, tile, loss, count in marks]
        if names:
            fs, prefix = storage.filesystem(done_dir, storage_options)
            fs.pipe({f"{prefix}/{name}": b"" for name in names})  # the PUTs run concurrently
        return
    for sample, tile, loss, count in marks:
        os.close(os.open(os.path.join(done_dir, marker_name(sample, tile, loss, count)),
                         os.O_WRONLY | os.O_CREAT, 0o666))
    durable.fsync_path(done_dir)


def mark_done(done_dir: str, sample: int, tile: int, loss: float | None, count: int,
              storage_options: StorageOptions | None = None) -> None:
    """Record one finished tile (see `mark_all`)."""
    mark_all(done_dir, [(sample, tile, loss, count)], storage_options)


def _read_legacy(done_dir: str, name: str) -> tuple[tuple[int, int], dict[str, Any]] | None:
    try:
        sample, tile = (int(v) for v in name.split("-"))
        with open(os.path.join(done_dir, name)) as f:
            return (sample, tile), json.load(f)
    except (ValueError, OSError):
        return None  # a foreign or unreadable file (e.g. a record cut short): that tile is simply redone


def read_done(done_dir: str, storage_options: StorageOptions | None = None) -> dict[tuple[int, int], dict[str, Any]]:
    """The finished tiles recorded in `done_dir`: {(sample, tile): {"loss": ..., "n": ...}}; one directory
    scan (files of the earlier format are opened), or one listing of the prefix in object storage (where
    only this format was ever written)."""
    out = {}
    if storage.is_remote(done_dir):
        for name in storage.names(done_dir, storage_options):
            rec = parse_marker(name)
            if rec is not None:
                out[rec[0]] = rec[1]
        return out
    if not os.path.isdir(done_dir):
        return out
    with os.scandir(done_dir) as entries:
        for entry in entries:
            if durable.is_temporary(entry.name):
                continue
            rec = parse_marker(entry.name) or _read_legacy(done_dir, entry.name)
            if rec is not None:
                out[rec[0]] = rec[1]
    return out
