"""Tile markers: one tiny file per finished tile, so that a rerun resumes where a run stopped."""

from __future__ import annotations

import json
import os
from typing import Any

from map2map.utils import durable


def mark_done(done_dir: str, sample: int, tile: int, loss: float | None, count: int) -> None:
    """Record a finished tile: a tiny JSON file named ``{sample}-{tile}``, written atomically and durably.

    Call it only once the tile's data is durable (see `map2map.utils.durable`).
    """
    durable.atomic_write(os.path.join(done_dir, f"{sample}-{tile}"), json.dumps({"loss": loss, "n": count}))


def read_done(done_dir: str) -> dict[tuple[int, int], dict[str, Any]]:
    """The finished tiles recorded in `done_dir`: {(sample, tile): {"loss": ..., "n": ...}}."""
    out = {}
    if not os.path.isdir(done_dir):
        return out
    for name in os.listdir(done_dir):
        if durable.is_temporary(name):
            continue
        try:
            sample, tile = (int(v) for v in name.split("-"))
            with open(os.path.join(done_dir, name)) as f:
                out[(sample, tile)] = json.load(f)
        except (ValueError, OSError):
            continue  # a foreign or unreadable file (e.g. a marker cut short): that tile is simply redone
    return out
