"""Benchmark `m2m convert` against a plain copy of the same bytes on the same disk.

Prints one JSON line: bytes, copy and convert rates (GB/s), their ratio, and
the peak RSS of the convert process.  Both sides write to the same directory
and end with an fsync of what they wrote; the copy runs first so both read
from the same page-cache state (the inputs were just written, so both read
warm pages; the disk write is what differs).

    python bench/convert.py --n 512 --channels 3        # the issue's pair of 1.5 GiB fields
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _measure import run_tracking_rss, write_random_npy
from map2map.utils.durable import fsync_tree


def make_inputs(root: Path, n: int, channels: int) -> list[Path]:
    paths = [root / "input.npy", root / "target.npy"]
    for seed, path in enumerate(paths):
        write_random_npy(path, channels, n, seed)
    return paths


def timed_copy(paths: list[Path], dest: Path) -> float:
    dest.mkdir()
    t0 = time.perf_counter()
    subprocess.run(["cp", *map(str, paths), str(dest)], check=True)
    fsync_tree(dest)
    return time.perf_counter() - t0


def timed_convert(paths: list[Path], out: Path, extra: list[str]) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "map2map.cli", "convert", str(out), "--no-progress",
           f"--field=input={paths[0]}", f"--field=target={paths[1]}", *extra]
    t0 = time.perf_counter()
    peak = run_tracking_rss(cmd)
    fsync_tree(out)
    return time.perf_counter() - t0, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256, help="grid size per axis")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--convert-args", default="--crop 128 --pad 48", help="extra m2m convert options")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="m2m-bench-", dir=args.dir))
    try:
        paths = make_inputs(root, args.n, args.channels)
        nbytes = sum(p.stat().st_size for p in paths)
        t_copy = timed_copy(paths, root / "copy")
        shutil.rmtree(root / "copy")
        t_conv, rss = timed_convert(paths, root / "store.zarr", args.convert_args.split())
        print(json.dumps({
            "bench": "convert", "n": args.n, "channels": args.channels, "bytes": nbytes,
            "convert_args": args.convert_args,
            "copy_GBps": round(nbytes / t_copy / 1e9, 3), "convert_GBps": round(nbytes / t_conv / 1e9, 3),
            "ratio_convert_over_copy": round(t_copy / t_conv, 3),
            "convert_peak_tree_rss_MiB": round(rss / 2**20, 1),
        }))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
