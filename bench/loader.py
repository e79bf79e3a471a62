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

    python bench/loader.py --n 512 --items 16     # 2 samples of (3, 512^3) in and out (README figures)
    python bench/loader.py --n 256 --items 16     # the same at 256^3: our peak RSS does not change
    python bench/loader.py --n 512 --items 16 --cold   # every run starts from disk
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
from _measure import drop_page_cache, run_tracking_rss, write_random_npy  # noqa: E402


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
    files = {"in": [], "tgt": []}
    for k, kind in enumerate(files):
        for i in range(nsample):
            path = root / f"{kind}_{i}.npy"
            write_random_npy(path, 3, n, seed=10 * k + i)
            files[kind].append(str(path))
    store = str(root / "store.zarr")
    subprocess.run([sys.executable, "-m", "map2map.cli", "convert", store, "--no-progress", "--crop", "128",
                    "--pad", "48", f"--field=input={root}/in_*.npy", f"--field=target={root}/tgt_*.npy"],
                   check=True, stdout=subprocess.DEVNULL)
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
        ds = OriginalWay(args.in_files.split(","), args.tgt_files.split(","), 128, 48)
        sampler = DistFieldSampler(len(ds.in_files), [len(ds.anchors)], locality=False, seed=1)
    else:
        ds = FieldDataset(store=args.store, in_fields=["input"], tgt_fields=["target"], crop=128, in_pad=48,
                          augment=True, cache_bytes=args.cache_mib * 2**20)
        sampler = DistFieldSampler(ds.nsample, ds.crop_counts, seed=1)
    rates = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        ds.epoch = epoch
        order = sampler.indices()[: args.items].tolist()
        loader = DataLoader(ds, batch_size=1, sampler=order, num_workers=args.workers,
                            collate_fn=collate if args.side == "ours" else None,  # m2m train's collate
                            prefetch_factor=1 if args.workers else None)
        t0 = time.perf_counter()
        for _ in loader:
            pass
        rates.append(len(order) / (time.perf_counter() - t0))
    stats = ds.read_stats().amplification if args.side == "ours" and args.workers == 0 else None
    print(json.dumps({"rates": rates, "amplification": stats}))


def measure(side: str, workers: int, files, args) -> dict:
    if args.cold:
        for path in files[0] + files[1] + [files[2]]:
            drop_page_cache(path)
    out = Path(tempfile.mktemp(suffix=".json"))
    cmd = [sys.executable, __file__, "--side", side, "--workers", str(workers), "--items", str(args.items),
           "--in-files", ",".join(files[0]), "--tgt-files", ",".join(files[1]), "--store", files[2],
           "--cache-mib", str(args.cache_mib), "--result", str(out)]
    peak = run_tracking_rss(cmd)
    res = json.loads(out.read_text())
    out.unlink()
    return {"items_per_s": [round(r, 3) for r in res["rates"]], "peak_rss_MiB": round(peak / 2**20, 1),
            "amplification": res["amplification"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--nsample", type=int, default=2)
    p.add_argument("--items", type=int, default=24, help="items per epoch (a prefix of the shuffled order)")
    p.add_argument("--cache-mib", type=int, default=64, help="FieldDataset chunk cache per worker")
    p.add_argument("--dir", default=None)
    p.add_argument("--cold", action="store_true", help="drop the data files from the page cache before each run")
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
    root = Path(tempfile.mkdtemp(prefix="m2m-loader-", dir=args.dir))
    try:
        files = make_data(root, args.n, args.nsample)
        result = {"bench": "loader", "n": args.n, "nsample": args.nsample, "crop": 128, "pad": 48,
                  "items_per_epoch": args.items, "cache_MiB": args.cache_mib, "cold": args.cold}
        for workers in (0, 2):
            orig = measure("original", workers, files, args)
            ours = measure("ours", workers, files, args)
            result[f"workers{workers}"] = {
                "original": orig, "ours": ours,
                "speedup": [round(b / a, 2) for a, b in zip(orig["items_per_s"], ours["items_per_s"])],
                "rss_ratio": round(ours["peak_rss_MiB"] / orig["peak_rss_MiB"], 3)}
        print(json.dumps(result))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
