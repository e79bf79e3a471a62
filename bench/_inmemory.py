"""The original toolkit's way of predicting a box, for the benchmarks: the whole box in memory, windows cut
from it periodically padded, the model over them in batches, stitched into one array.  Kept light (numpy,
torch and `map2map.tiles` only), since bench/infer.py times it end to end in a child process."""

from __future__ import annotations

import time

import numpy as np
import torch

from map2map import tiles


def tiles_in_memory(model, x: np.ndarray, plan: tiles.TilePlan, batch: int, out: np.ndarray | None = None) -> float:
    """(b): the model over every tile, windows cut from the padded box in memory, stitched into `out` (a new
    array if None); returns seconds."""
    (lo, hi), = set(plan.pad)
    extra = max(t * c - n for t, c, n in zip(plan.tile, plan.counts, plan.box))  # full windows past the edge
    padded = np.pad(x, [(0, 0)] + [(lo, hi + extra)] * 3, mode="wrap")
    out = np.empty_like(x) if out is None else out
    t0 = time.perf_counter()
    with torch.inference_mode():
        for ids in tiles.batches(range(plan.ntiles), batch):
            xb = np.stack([padded[(slice(None),) + tuple(slice(a + lo, b + lo) for a, b in plan.window(t))]
                           for t in ids])
            y = model(torch.from_numpy(xb)).numpy()
            for b, t in enumerate(ids):
                ext = plan.extent(t)
                out[(slice(None),) + tuple(slice(a, b) for a, b in ext)] = \
                    y[b][(slice(None),) + tuple(slice(0, b - a) for a, b in ext)]
    return time.perf_counter() - t0
