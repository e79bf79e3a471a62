"""Benchmark reading crop + pad windows from a store in object storage: ours vs zarr-python, side by side.

A store converted by `map2map.convert` (random 3-channel fields, the default
layout for the crop and pad) is put into a bucket of a local S3-compatible
server (tests/s3server.py: moto on 127.0.0.1) that delays every request by
``--latency`` seconds, standing in for an object store's round trip.  Each
side reads the same windows (the crop lattice's anchors in a random order,
each window crop + pad on every side, wrapping periodically), one after the
other as a training process with no read-ahead would, and the bench checks
every side returns the same bits:

* ``ours``: `map2map.data.windows.ZarrField` over the URL (the remote shard
  reader of `map2map.data.remote`: indices and coalesced byte ranges fetched
  concurrently), with its chunk cache off so that every window is fetched
  whole, like the other sides;
* ``zarr``: zarr-python itself, ``zarr.open_group(url, storage_options=...)[field][...]``
  of each box-aligned piece of the window;
* ``per_chunk`` (``--per-chunk``): what map2map did before, zarr-python
  asked for one inner chunk at a time (``ZarrField(..., direct=False)``);
* ``ours_ahead`` (with ``--step-ms``): ours, hinting the next window right
  after reading each one (as `FieldDataset.follow`'s read-ahead does), so
  that its fetch runs in the background during the step.

``--step-ms`` adds a pause after every item on every side, standing in for
a training step (then no side can pass 1000 / step-ms items/s).

For each side: ``items_per_s`` and ``requests_per_item`` (GET requests
the side's filesystem made, counted at s3fs's ``_cat_file``).  Prints one
JSON line.

    python bench/remote.py                                   # 64^3, crop 32, pad 8, 20 ms per request
    python bench/remote.py --n 128 --crop 64 --pad 16 --items 8 --per-chunk
    python bench/remote.py --latency 0.05 --max-pool-connections 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))  # the S3 server the tests start
from _measure import write_random_npy  # noqa: E402
from s3server import CREDENTIALS, S3Server, make_bucket  # noqa: E402

from map2map import convert, geometry  # noqa: E402
from map2map.data.windows import ZarrField, hint_window, read_window  # noqa: E402

CHANNELS = 3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=64, help="grid side of each sample")
    p.add_argument("--nsample", type=int, default=1)
    p.add_argument("--crop", type=int, default=32)
    p.add_argument("--pad", type=int, default=8)
    p.add_argument("--chunk", type=int, default=None, help="inner chunk side (default: convert's choice)")
    p.add_argument("--items", type=int, default=4, help="windows each side reads (at most the crops there are)")
    p.add_argument("--latency", type=float, default=0.02, help="seconds the server waits before each answer")
    p.add_argument("--max-pool-connections", type=int, default=None,
                   help="s3fs connections at once (config_kwargs max_pool_connections; default s3fs's own)")
    p.add_argument("--per-chunk", action="store_true", help="also time zarr-python one inner chunk at a time")
    p.add_argument("--step-ms", type=float, default=0.0,
                   help="pause after each item, a stand-in for the training step (adds the ours_ahead side)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def count_gets(fs) -> list[int]:
    """Count the GET requests (``_cat_file`` calls) made through the s3fs instance `fs`: a one-item list."""
    counter = [0]
    inner = fs._cat_file

    async def counted(*args, **kwargs):
        counter[0] += 1
        return await inner(*args, **kwargs)

    fs._cat_file = counted
    return counter


def zarr_window(arr, sample: int, win) -> np.ndarray:
    """The window `win` of `sample` read by zarr-python, piece by box-aligned piece."""
    out = np.empty((arr.shape[1],) + geometry.window_shape(win), dtype=np.float32)
    for src, dst in geometry.window_pieces(win, arr.shape[2:], True):
        out[(slice(None),) + dst] = arr[(sample, slice(None)) + src]
    return out


def timed(read, jobs, step: float, ahead=None) -> tuple[float, list[np.ndarray]]:
    """Seconds to read every window of `jobs` with `read`, pausing `step` seconds after each (and, with
    `ahead`, hinting the next window first), and the windows read."""
    start, outs = time.perf_counter(), []
    for i, (sample, win) in enumerate(jobs):
        outs.append(read(sample, win))
        if ahead is not None and i + 1 < len(jobs):
            hint_window(ahead, *jobs[i + 1])
        time.sleep(step)
    return time.perf_counter() - start, outs


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.update(CREDENTIALS)
    import zarr

    with tempfile.TemporaryDirectory(prefix="m2m-remote-") as tmp:
        tmp = Path(tmp)
        (tmp / "npy").mkdir()
        for i in range(args.nsample):
            write_random_npy(tmp / "npy" / f"f_{i:03d}.npy", CHANNELS, args.n, seed=args.seed + i)
        local = tmp / "s.zarr"
        convert.run(convert.ConvertConfig(output=str(local), field=(f"f={tmp}/npy/f_*.npy",), crop=(args.crop,),
                                          pad=args.pad, chunk=None if args.chunk is None else (args.chunk,),
                                          progress=False))
        layout = zarr.open_group(str(local), mode="r")["f"]
        server = S3Server(latency=args.latency)
        try:
            s3 = make_bucket(server)
            s3.fs().put(str(local), f"{s3.bucket}/s.zarr", recursive=True)
            url = s3.url("s.zarr")
            options = dict(s3.options)
            if args.max_pool_connections:
                options["config_kwargs"] = {"max_pool_connections": args.max_pool_connections}

            grid = geometry.crop_grid((args.n,) * 3, (args.crop,) * 3)
            rng = np.random.default_rng(args.seed)
            order = rng.permutation(args.nsample * grid.size)[:args.items]
            pad = geometry.parse_pad(args.pad, 3, "pad")
            jobs = [(int(i) // grid.size, geometry.window(grid.anchor(int(i) % grid.size), (args.crop,) * 3, pad))
                    for i in order]

            ours = ZarrField(url, "f", args.nsample, cache_bytes=0, storage_options=options)
            ours_gets = count_gets(ours.remote_reader.fs)
            arr = zarr.open_group(url, mode="r", storage_options=options)["f"]
            zarr_gets = count_gets(arr.store.fs)
            sides = {"ours": (lambda s, w: read_window(ours, s, w), ours_gets, None),
                     "zarr": (lambda s, w: zarr_window(arr, s, w), zarr_gets, None)}
            if args.step_ms:
                fast = ZarrField(url, "f", args.nsample, cache_bytes=0, storage_options=options)
                sides["ours_ahead"] = (lambda s, w: read_window(fast, s, w), count_gets(fast.remote_reader.fs), fast)
            if args.per_chunk:
                slow = ZarrField(url, "f", args.nsample, cache_bytes=0, direct=False, storage_options=options)
                assert not slow.uses_direct_path  # opened: its zarr array is there
                sides["per_chunk"] = (lambda s, w: read_window(slow, s, w), count_gets(slow._arr.store.fs), None)
            results, first = {}, None
            for name, (read, gets, ahead) in sides.items():
                gets[0] = 0
                seconds, outs = timed(read, jobs, args.step_ms / 1000, ahead)
                if first is None:
                    first = outs
                elif not all(np.array_equal(a, b) for a, b in zip(first, outs)):
                    raise SystemExit(f"{name} read different bits than ours")
                results[name] = {"items_per_s": round(len(jobs) / seconds, 3),
                                 "requests_per_item": round(gets[0] / len(jobs), 2)}
        finally:
            server.stop()
    window = args.crop + 2 * args.pad
    line = {"bench": "remote", "n": args.n, "nsample": args.nsample, "crop": args.crop, "pad": args.pad,
            "chunk": list(layout.chunks[2:]), "shard": list(layout.shards[2:]), "items": len(jobs),
            "latency_s": args.latency, "step_ms": args.step_ms, "window_MB": round(CHANNELS * window ** 3 * 4 / 1e6, 3),
            "max_pool_connections": args.max_pool_connections, **results,
            "speedup_vs_zarr": round(results["ours"]["items_per_s"] / results["zarr"]["items_per_s"], 2)}
    print(json.dumps(line))
    return line


if __name__ == "__main__":
    main()
