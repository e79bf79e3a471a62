"""Benchmark the training data path: the original toolkit's way vs FieldDataset on a converted store.

Both sides read the same crops (crop + pad windows of an input and a target
field, random crop order, augmentation on) through a torch DataLoader with
batch size 1, for two epochs, with 0 and 2 loader workers, in separate
processes so that their peak RSS (whole process tree) is their own.

The original way: a worker loads a whole .npy file with np.load the first
time it touches it and keeps it, then cuts periodic crops with index arrays
(``np.arange(lo, hi) % n`` per axis).

Prints one JSON line.  By default the page cache is left as it is, so
"first epoch" means first touch by the process (the files may still be
cached from being written, or from the other side's run); with ``--cold``
every run starts with the data files dropped from the page cache, so the
first epoch reads from disk on both sides.

With ``--cold`` the same run also measures, right before and right after
each of our runs, the disk's sequential cold read rate over the store's own
files (``disk_seq_GBps``: the files dropped from the page cache and read
front to back in 16 MiB reads), and reports our first epoch's *useful* rate:
the voxels of the windows an item holds (input window and target crop,
float32, ``useful_MB_per_item``) times items per second (``useful_GBps``),
and its fraction of the mean of the two disk rates
(``useful_fraction_of_disk``).  With 0 workers each side also reports the
bytes its process had read from storage per item of the first epoch
(``storage_MB_per_item``; on our side neighbouring crops share chunks
through the page cache, so it can be below the useful bytes).

    python bench/loader.py --n 512 --items 16     # 2 samples of (3, 512^3) in and out (README figures)
    python bench/loader.py --n 256 --items 16     # the same at 256^3: our peak RSS does not change
    python bench/loader.py --n 512 --items 16 --cold   # every run starts from disk
    python bench/loader.py --n 512 --items 16 --cold --no-original --data /tmp/m2m-512   # ours only, data kept
    python bench/loader.py --n 256 --cold --no-original --readahead-mib 0   # read-ahead across items off

Our side reads ahead across items (`FieldDataset.follow` with the epoch's
order, ``--readahead-mib`` per process, default two items); ``readahead_MiB``
in the JSON is null for the default.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import drop_page_cache, run_tracking_rss, sequential_read_rate, write_random_npy  # noqa: E402

CROP, PAD, CHANNELS = 128, 48, 3  # the crops both sides read: crop + pad windows of 3-channel fields


def useful_bytes_per_item(ndim: int = 3) -> int:
    """Voxels of one item's windows, float32: the input's crop + pad window and the target's crop."""
    return 4 * CHANNELS * ((CROP + 2 * PAD) ** ndim + CROP ** ndim)


def storage_read_bytes() -> int | None:
    """Bytes this process has caused to be read from storage (/proc/self/io), None where unknown."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Prefix:
    """The first `items` of a sampler's order of each epoch: what one bench epoch reads (`FieldDataset.follow`)."""

    def __init__(self, sampler, items: int) -> None:
        self.sampler, self.items = sampler, items

    def indices(self, epoch: int):
        return self.sampler.indices(epoch)[: self.items]


class OriginalWay:
    """The original toolkit's reading: whole-file np.load on first touch, periodic index arrays."""

    def __init__(self, in_files, tgt_files, crop, pad, seed=0):
        self.in_files, self.tgt_files = in_files, tgt_files
        self.crop, self.pad, self.seed, self.epoch = crop, pad, seed, 0
        self.size = np.load(in_files[0], mmap_mode="r").shape[1:]
        self.anchors = [a for a in np.ndindex(*[n // crop for n in self.size])]
        self.cache = {}

    def __len__(self):
        return len(self.in_files) * len(self.anchors)

    def _load(self, path):
        if path not in self.cache:
            self.cache[path] = np.load(path)
        return self.cache[path]

    def _crop(self, field, anchor, pad):
        idx = [np.arange(a * self.crop - pad, (a + 1) * self.crop + pad) % n for a, n in zip(anchor, self.size)]
        return field[(slice(None),) + np.ix_(*idx)]

    def __getitem__(self, idx):
        import torch

        from map2map.data import augment

        ifile, icrop = divmod(idx, len(self.anchors))
        anchor = self.anchors[icrop]
        x = self._crop(self._load(self.in_files[ifile]), anchor, self.pad)
        y = self._crop(self._load(self.tgt_files[ifile]), anchor, 0)
        element = augment.random_element(np.random.default_rng([self.seed, self.epoch, idx]), len(self.size))
        x, y = augment.apply(x, element, vector=True), augment.apply(y, element, vector=True)
        return {"input": torch.from_numpy(x), "target": torch.from_numpy(y)}


def make_data(root: Path, n: int, nsample: int) -> tuple[list[str], list[str], str]:
    """Random input and target .npy files under `root` and their store; kept from an earlier call
    with the same `n` and `nsample` (a ``done`` mark records them)."""
    mark = root / "done"
    if mark.exists() and mark.read_text() == f"{n} {nsample}":
        return ([str(root / f"in_{i}.npy") for i in range(nsample)],
                [str(root / f"tgt_{i}.npy") for i in range(nsample)], str(root / "store.zarr"))
    shutil.rmtree(root / "store.zarr", ignore_errors=True)
    files = {"in": [], "tgt": []}
    for k, kind in enumerate(files):
        for i in range(nsample):
            path = root / f"{kind}_{i}.npy"
            write_random_npy(path, 3, n, seed=10 * k + i)
            files[kind].append(str(path))
    store = str(root / "store.zarr")
    subprocess.run([sys.executable, "-m", "map2map.cli", "convert", store, "--no-progress", "--crop", str(CROP),
                    "--pad", str(PAD), f"--field=input={root}/in_*.npy", f"--field=target={root}/tgt_*.npy"],
                   check=True, stdout=subprocess.DEVNULL)
    mark.write_text(f"{n} {nsample}")
    return files["in"], files["tgt"], store


def run_side(args: argparse.Namespace) -> None:
    """One side, one worker count, in this process: prints items/s of each epoch as JSON."""
    import torch
    from torch.utils.data import DataLoader

    from map2map.data.batching import collate
    from map2map.data.fields import FieldDataset
    from map2map.data.sampler import DistFieldSampler

    torch.set_num_threads(1)
    if args.side == "original":
        ds = OriginalWay(args.in_files.split(","), args.tgt_files.split(","), CROP, PAD)
        sampler = DistFieldSampler(len(ds.in_files), [len(ds.anchors)], locality=False, seed=1)
    else:
        readahead = None if args.readahead_mib is None else int(args.readahead_mib * 2**20)
        ds = FieldDataset(store=args.store, in_fields=["input"], tgt_fields=["target"], crop=CROP, in_pad=PAD,
                          augment=True, cache_bytes=args.cache_mib * 2**20, readahead=readahead)
        sampler = DistFieldSampler(ds.nsample, ds.crop_counts, seed=1)
        ds.follow(Prefix(sampler, args.items), batch_size=1)  # read ahead in the order the loader asks
    rates, read_bytes = [], None
    for epoch in range(2):
        sampler.set_epoch(epoch)
        ds.epoch = epoch
        order = sampler.indices()[: args.items].tolist()
        loader = DataLoader(ds, batch_size=1, sampler=order, num_workers=args.workers,
                            collate_fn=collate if args.side == "ours" else None,  # m2m train's collate
                            prefetch_factor=1 if args.workers else None)
        io0 = storage_read_bytes()
        t0 = time.perf_counter()
        for _ in loader:
            pass
        rates.append(len(order) / (time.perf_counter() - t0))
        io1 = storage_read_bytes()
        if epoch == 0 and args.workers == 0 and io0 is not None and io1 is not None:
            read_bytes = (io1 - io0) / len(order)
    stats = ds.read_stats().amplification if args.side == "ours" and args.workers == 0 else None
    threads = None
    if args.side == "ours":  # what FieldDataset's copy_threads=None chooses in the process that reads
        from map2map.data.windows import auto_copy_threads

        threads = auto_copy_threads() if args.workers == 0 else 1
    print(json.dumps({"rates": rates, "amplification": stats, "read_bytes_per_item": read_bytes,
                      "copy_threads": threads}))


def measure(side: str, workers: int, files, args) -> dict:
    if args.cold:
        for path in files[0] + files[1] + [files[2]]:
            drop_page_cache(path)
    out = Path(tempfile.mktemp(suffix=".json"))
    cmd = [sys.executable, __file__, "--side", side, "--workers", str(workers), "--items", str(args.items),
           "--in-files", ",".join(files[0]), "--tgt-files", ",".join(files[1]), "--store", files[2],
           "--cache-mib", str(args.cache_mib), "--result", str(out)]
    if args.readahead_mib is not None:
        cmd += ["--readahead-mib", str(args.readahead_mib)]
    peak = run_tracking_rss(cmd)
    res = json.loads(out.read_text())
    out.unlink()
    summary = {"items_per_s": [round(r, 3) for r in res["rates"]], "peak_rss_MiB": round(peak / 2**20, 1),
               "amplification": res["amplification"]}
    if res.get("copy_threads") is not None:
        summary["copy_threads"] = res["copy_threads"]
    if args.cold and res["read_bytes_per_item"] is not None:
        summary["storage_MB_per_item"] = round(res["read_bytes_per_item"] / 1e6, 1)
    return summary


def cold_rates(ours: dict, disk_rate: float) -> dict:
    """Our first epoch's useful GB/s and its fraction of the disk's sequential rate (bytes/s)."""
    useful = ours["items_per_s"][0] * useful_bytes_per_item()
    return {"useful_GBps": round(useful / 1e9, 3), "useful_fraction_of_disk": round(useful / disk_rate, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--nsample", type=int, default=2)
    p.add_argument("--items", type=int, default=24, help="items per epoch (a prefix of the shuffled order)")
    p.add_argument("--cache-mib", type=int, default=64, help="FieldDataset chunk cache per worker")
    p.add_argument("--readahead-mib", type=float, default=None,
                   help="FieldDataset read-ahead across items per process (default: two items; 0: off)")
    p.add_argument("--dir", default=None)
    p.add_argument("--data", default=None,
                   help="keep the data files and store in this directory (made once, reused by later runs)")
    p.add_argument("--no-original", dest="original", action="store_false",
                   help="run only our side (no original-way keys, speedup or rss_ratio)")
    p.add_argument("--cold", action="store_true", help="drop the data files from the page cache before each run "
                   "and measure the disk's sequential rate on the store's files")
    p.add_argument("--side", choices=["original", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--in-files", help=argparse.SUPPRESS)
    p.add_argument("--tgt-files", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            run_side(args)
        Path(args.result).write_text(buf.getvalue().strip().splitlines()[-1])
        return
    if args.data:
        root = Path(args.data)
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = Path(tempfile.mkdtemp(prefix="m2m-loader-", dir=args.dir))
    try:
        files = make_data(root, args.n, args.nsample)
        result = {"bench": "loader", "n": args.n, "nsample": args.nsample, "crop": CROP, "pad": PAD,
                  "items_per_epoch": args.items, "cache_MiB": args.cache_mib, "cold": args.cold,
                  "readahead_MiB": args.readahead_mib}
        if args.cold:
            result["useful_MB_per_item"] = round(useful_bytes_per_item() / 1e6, 1)
        for workers in (0, 2):
            entry = result[f"workers{workers}"] = {}
            if args.original:
                entry["original"] = measure("original", workers, files, args)
            disk = [sequential_read_rate(files[2])] if args.cold else []
            ours = entry["ours"] = measure("ours", workers, files, args)
            if args.cold:
                disk.append(sequential_read_rate(files[2]))
                entry["disk_seq_GBps"] = [round(d / 1e9, 3) for d in disk]
                ours.update(cold_rates(ours, sum(disk) / len(disk)))
            if args.original:
                orig = entry["original"]
                entry["speedup"] = [round(b / a, 2) for a, b in zip(orig["items_per_s"], ours["items_per_s"])]
                entry["rss_ratio"] = round(ours["peak_rss_MiB"] / orig["peak_rss_MiB"], 3)
        result["load_average"] = [round(x, 2) for x in os.getloadavg()]
        print(json.dumps(result))
    finally:
        if not args.data:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
