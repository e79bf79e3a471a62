"""Benchmark `m2m train` on CPU: training items/s and the fraction of step time spent waiting for data,
per number of loader workers, float32 vs bf16 mixed precision side by side, and the epoch start latency.

The V-Net on crops of 32 plus the pad it needs (found by ``--in-pad auto``),
batch size 1, reading 1LPT -> 2LPT displacements from a store made by
``m2m convert`` (shards = the crop, inner chunks for the pad), once per
number of loader workers.  Each run trains ``--epochs`` epochs in its own
run directory; the last epoch is reported (the first also pays one-off
warm-up costs).  Loader workers live across epochs, as in training, so
their start-up counts as waiting in the first epoch only; ``first_batch_s``
is the first and the last epoch's wait from the epoch's start to its first
batch.  Then the same training under ``--amp bf16`` (and any other
``--amp`` modes asked for) with the largest worker count, beside float32's
run with it.

``epoch_start`` times that latency on the training loader alone, per epoch,
with workers started afresh every epoch (``fresh``: what `m2m train` did
before its workers lived across epochs) and kept (``kept``: what it does),
per worker count above 0.  Prints one JSON line.

On a shared machine items/s follows the other load (OpenMP threads wait for
each other when one is descheduled); the data-wait fraction is the robust
figure.  Compare items/s only within one run, or pin ``--threads``.

    python bench/train.py                      # 2 samples of 64^3: 16 crops per epoch, workers 0, 1, 2
    python bench/train.py --workers 2 --amp bf16,fp16
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from map2map import convert, synth, train
from map2map.data.batching import collate
from map2map.utils.distenv import DistEnv


def make_store(root: Path, ngrid: int, nsamples: int, crop: int, pad: int) -> Path:
    synth.run(synth.SynthConfig(outdir=str(root / "npy"), num_samples=nsamples, ngrid=ngrid, seed=0))
    out = root / "train.zarr"
    convert.run(convert.ConvertConfig(output=str(out), field=(f"za={root}/npy/*/dis_za.npy",
                                                              f"lpt={root}/npy/*/dis_2lpt.npy"),
                                      crop=(crop,), pad=pad, boxsize=2.0 * ngrid, progress=False))
    return out


def run(store: Path, work: Path, crop: int, workers: int, epochs: int, width: int, amp: str = "off",
        device: str = "cpu") -> train.TrainSummary:
    config = train.TrainConfig(
        model="VNet", lr=1e-4, train_data=str(store), in_fields=("za",), tgt_fields=("lpt",), crop=(crop,),
        in_pad="auto", in_norms=("cosmology.dis",), tgt_norms=("cosmology.dis",), misc_kwargs={"width": width},
        batch_size=1, loader_workers=workers, epochs=epochs, log_interval=1_000_000, run_dir=str(work), amp=amp,
        device=device)
    with contextlib.redirect_stdout(io.StringIO()):  # the epoch lines; the summary has the figures
        return train.run(config)


def _figures(summary: train.TrainSummary) -> dict[str, Any]:
    last = summary.epochs[-1]
    return {"items_per_s": round(last.items_per_s, 3), "data_wait": round(last.data_wait, 4),
            "first_batch_s": [round(summary.epochs[0].first_batch_s, 4), round(last.first_batch_s, 4)]}


def epoch_start(store: Path, crop: int, pad: tuple[int, ...], workers: int, epochs: int) -> dict[str, list[float]]:
    """Seconds from each epoch's start to its first batch on the training loader alone (as `m2m train` builds
    it), with loader workers started afresh every epoch and kept across epochs."""
    config = train.TrainConfig(
        model="VNet", lr=1e-4, train_data=str(store), in_fields=("za",), tgt_fields=("lpt",), crop=(crop,),
        in_pad=pad, in_norms=("cosmology.dis",), tgt_norms=("cosmology.dis",), augment=True, batch_size=1,
        loader_workers=workers)
    ds = train.make_dataset(config, "train", pad, config.seed)
    kept, sampler = train.make_loader(ds, config, DistEnv(), torch.device("cpu"), training=True)
    fresh = DataLoader(ds, batch_size=1, sampler=sampler, num_workers=workers, collate_fn=collate,
                       persistent_workers=False)
    out: dict[str, list[float]] = {}
    for name, loader in (("fresh", fresh), ("kept", kept)):
        out[name] = []
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            t0 = time.perf_counter()
            it = iter(loader)
            next(it)
            out[name].append(round(time.perf_counter() - t0, 4))
            for _ in it:  # the rest of the epoch, as training reads it
                pass
    train.end_workers(kept)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ngrid", type=int, default=64, help="grid size per axis of each sample")
    p.add_argument("--samples", type=int, default=2, help="samples in the store")
    p.add_argument("--crop", type=int, default=32)
    p.add_argument("--width", type=int, default=16, help="V-Net width (channels of its first level)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run; the last is reported")
    p.add_argument("--workers", default="0,1,2", help="comma-separated loader worker counts to compare")
    p.add_argument("--amp", default="bf16", help="comma-separated mixed precision modes to compare with float32 "
                                                 "(with the largest worker count); '' for none")
    p.add_argument("--start-epochs", type=int, default=3,
                   help="epochs per loader in the epoch start comparison (fresh vs kept workers)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="m2m-bench-train-", dir=args.dir))
    try:
        store = make_store(root, args.ngrid, args.samples, args.crop, pad=20)
        results, pad, in_pad = {}, None, ()
        t0 = time.perf_counter()
        counts = [int(v) for v in args.workers.split(",")]
        by_workers = {}
        for i, w in enumerate(counts):
            summary = run(store, root / f"run{i}", args.crop, w, args.epochs, args.width, device=args.device)
            pad = ",".join(str(lo) for lo, _ in summary.in_pad) if len({lo for lo, _ in summary.in_pad}) > 1 \
                else str(summary.in_pad[0][0])
            in_pad = tuple(v for lo_hi in summary.in_pad for v in lo_hi)
            by_workers[w] = results[str(w) if counts.count(w) == 1 else f"{w}#{i}"] = _figures(summary)
        amp_workers = max(counts)
        precisions = {"loader_workers": amp_workers, "fp32": by_workers[amp_workers]}
        for amp in [a for a in args.amp.split(",") if a]:
            summary = run(store, root / f"run-{amp}", args.crop, amp_workers, args.epochs, args.width, amp,
                          args.device)
            precisions[amp] = _figures(summary)
            precisions[f"{amp}_over_fp32"] = round(precisions[amp]["items_per_s"] /
                                                   precisions["fp32"]["items_per_s"], 3)
        starts = {str(w): epoch_start(store, args.crop, in_pad, w, args.start_epochs)
                  for w in counts if w > 0}
        print(json.dumps({
            "bench": "train", "model": "VNet", "width": args.width, "crop": args.crop, "in_pad": pad,
            "batch_size": 1, "device": args.device, "torch_threads": torch.get_num_threads(),
            "items_per_epoch": args.samples * (args.ngrid // args.crop) ** 3, "epoch_reported": args.epochs,
            "loader_workers": results, "precision": precisions, "epoch_start": starts,
            "seconds": round(time.perf_counter() - t0, 1),
        }))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
