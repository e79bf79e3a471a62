"""Measure zarr-python write and read rates of candidate store layouts (the basis of the default).

For one (3, N^3) float32 field: whole-array write, 224^3 window reads (crop
128 + pad 48) at random positions, and reads of single inner chunks, for
sharded layouts with several inner chunk sizes and for unsharded chunks.
Prints one JSON line of MB/s figures.

    python bench/layout.py --n 256
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

LAYOUTS = {"shard128_inner16": (16, 128), "shard128_inner32": (32, 128), "shard128_inner64": (64, 128),
           "unsharded32": (32, None), "unsharded64": (64, None)}


def measure(root: Path, a: np.ndarray, chunk: int, shard: int | None, anchors) -> dict:
    c = a.shape[1]
    path = root / f"{chunk}_{shard}.zarr"
    z = zarr.create_array(str(path), shape=a.shape, dtype="float32", chunks=(1, c) + (chunk,) * 3,
                          shards=None if shard is None else (1, c) + (shard,) * 3, compressors=None,
                          fill_value=0, config={"write_empty_chunks": True})
    t = time.perf_counter()
    z[...] = a
    write = a.nbytes / (time.perf_counter() - t)
    z = zarr.open_array(str(path), mode="r")
    t, nbytes = time.perf_counter(), 0
    for x, y, w in anchors:
        nbytes += z[0, :, x:x + 224, y:y + 224, w:w + 224].nbytes
    window = nbytes / (time.perf_counter() - t)
    t, n = time.perf_counter(), 0
    for i, j, k in np.ndindex(*(128 // chunk,) * 3):
        z[0, :, i * chunk:(i + 1) * chunk, j * chunk:(j + 1) * chunk, k * chunk:(k + 1) * chunk]
        n += 1
    per_chunk = 128 ** 3 * c * 4 / (time.perf_counter() - t)
    shutil.rmtree(path)
    return {"write_MBps": round(write / 1e6), "window_read_MBps": round(window / 1e6),
            "chunk_read_MBps": round(per_chunk / 1e6)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256)
    args = p.parse_args()
    a = np.random.default_rng(0).standard_normal((1, 3) + (args.n,) * 3, dtype=np.float32)
    rng = np.random.default_rng(1)
    anchors = [rng.integers(0, args.n - 224, 3) for _ in range(6)]
    root = Path(tempfile.mkdtemp(prefix="m2m-layout-"))
    try:
        out = {"bench": "layout", "n": args.n, "zarr": zarr.__version__}
        for name, (chunk, shard) in LAYOUTS.items():
            out[name] = measure(root, a, chunk, shard, anchors)
        print(json.dumps(out))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
