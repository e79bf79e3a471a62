"""Benchmark `m2m convert` against a plain copy of the same bytes on the same disk.

Prints one JSON line: bytes, copy and convert rates (GB/s), their ratio, and
the peak RSS of the convert process, which runs the stage
(`map2map.convert.run`) in a process of its own so its memory is measured alone.  Both sides write to the same directory
and end with an fsync of what they wrote; the copy runs first so both read
from the same page-cache state (the inputs were just written, so both read
warm pages; the disk write is what differs).

    python bench/convert.py --n 512 --channels 3        # the issue's pair of 1.5 GiB fields
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _measure import run_tracking_rss, write_random_npy
from map2map.convert import ConvertConfig
from map2map.utils.durable import fsync_tree

# The child process: build the config from its JSON form and run the stage.
_CHILD = ("import json, sys; from map2map import convert; "
          "convert.run(convert.ConvertConfig(**json.loads(sys.argv[1])))")


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


def timed_convert(config: ConvertConfig) -> tuple[float, int]:
    """Run the conversion in a child process; returns (seconds including an fsync of the store, peak RSS)."""
    cmd = [sys.executable, "-c", _CHILD, json.dumps(dataclasses.asdict(config))]
    t0 = time.perf_counter()
    peak = run_tracking_rss(cmd)
    fsync_tree(config.output)
    return time.perf_counter() - t0, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256, help="grid size per axis")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--crop", type=int, default=128, help="m2m convert --crop")
    p.add_argument("--pad", type=int, default=48, help="m2m convert --pad")
    p.add_argument("--compressor", default="none", help="m2m convert --compressor")
    p.add_argument("--workers", type=int, default=2, help="m2m convert --workers")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="m2m-bench-", dir=args.dir))
    try:
        paths = make_inputs(root, args.n, args.channels)
        nbytes = sum(p.stat().st_size for p in paths)
        t_copy = timed_copy(paths, root / "copy")
        shutil.rmtree(root / "copy")
        config = ConvertConfig(output=str(root / "store.zarr"), field=(f"input={paths[0]}", f"target={paths[1]}"),
                               crop=(args.crop,), pad=args.pad, compressor=args.compressor, workers=args.workers,
                               progress=False)
        t_conv, rss = timed_convert(config)
        print(json.dumps({
            "bench": "convert", "n": args.n, "channels": args.channels, "bytes": nbytes,
            "crop": args.crop, "pad": args.pad, "compressor": args.compressor, "workers": args.workers,
            "copy_GBps": round(nbytes / t_copy / 1e9, 3), "convert_GBps": round(nbytes / t_conv / 1e9, 3),
            "ratio_convert_over_copy": round(t_copy / t_conv, 3),
            "convert_peak_tree_rss_MiB": round(rss / 2**20, 1),
        }))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
