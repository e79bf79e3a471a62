"""Tile markers: one tiny file per finished tile, so that a rerun resumes where a run stopped."""

from __future__ import annotations

import json
import os
import threading
from typing import Any


def mark_done(done_dir: str, sample: int, tile: int, loss: float | None, count: int) -> None:
    """Record a finished tile: a tiny JSON file, written to a temporary name, fsynced and renamed.

    Call it only once the tile's data is durable (see `map2map.utils.durable`).
    """
    name = os.path.join(done_dir, f"{sample}-{tile}")
    tmp = f"{name}.tmp-{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "w") as f:
        json.dump({"loss": loss, "n": count}, f)
        f.flush()
        os.fsync(f.fileno())
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
