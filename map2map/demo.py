"""`m2m demo`: the whole pipeline on physical example data, end to end, on a CPU.

synth (train / val / test boxes of 1LPT input and 2LPT target displacements)
-> `m2m convert` -> `m2m train` (a small V-Net) -> `m2m infer` on the
held-out box -> a report comparing the prediction and the trivial
prediction (the 1LPT input itself) with the 2LPT truth: power spectra,
T(k), r(k), a table and a plain verdict.

Every stage runs through the same command-line entry point users run
(`map2map.cli.main`), with the arguments printed, so each step can be
repeated by hand.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from map2map.errors import UserError


@dataclass
class DemoOptions:
    """The demo's knobs; the defaults finish in a few minutes on 2 CPU cores."""

    outdir: str = "demo"
    ngrid: int = 64
    boxsize: float = 256.0
    train_boxes: int = 4
    crop: int = 32
    width: int = 8
    epochs: int = 6
    batch_size: int = 2
    lr: float = 1e-3
    seed: int = 0
    workers: int = 2


@contextmanager
def _cwd(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _m2m(*args: str) -> None:
    """Run one `m2m` subcommand in this process, as a user would from the shell."""
    from map2map.cli import main

    print(f"\n$ m2m {shlex.join(args)}", flush=True)
    code = main(list(args))
    if code:
        raise UserError(f"m2m {args[0]} failed with exit status {code}")


def _stage(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


def run(opts: DemoOptions) -> bool:
    """Run every stage in `opts.outdir`; returns whether the model beat the trivial baseline."""
    out = Path(opts.outdir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _stage("1/5 synthesize 1LPT (input) and 2LPT (target) displacement fields")
    for split, n, seed in (("train", opts.train_boxes, opts.seed), ("val", 1, opts.seed + 1000),
                           ("test", 1, opts.seed + 2000)):
        _m2m("synth", str(out / "sims" / split), "--num-samples", str(n), "--ngrid", str(opts.ngrid),
             "--boxsize", str(opts.boxsize), "--seed", str(seed))
    _stage("2/5 convert .npy files into crop-aligned Zarr stores")
    for split in ("train", "val", "test"):
        _m2m("convert", str(out / f"{split}.zarr"), "--overwrite", "--no-progress",
             f"--field=za={out}/sims/{split}/*/dis_za.npy", f"--field=lpt2={out}/sims/{split}/*/dis_2lpt.npy",
             "--crop", str(opts.crop), "--boxsize", str(opts.boxsize))
    _stage("3/5 train a small V-Net: ZA displacement -> 2LPT displacement")
    run_dir = out / "run"
    run_dir.mkdir(exist_ok=True)
    model_kwargs = json.dumps({"width": opts.width})
    common = ["--in-norms", "cosmology.dis", "--tgt-norms", "cosmology.dis", "--crop", str(opts.crop),
              "--in-pad", "auto", "--model", "VNet"]
    with _cwd(run_dir):
        _m2m("train", "--train-data", str(out / "train.zarr"), "--val-data", str(out / "val.zarr"),
             "--in", "za", "--tgt", "lpt2", *common, "--misc-kwargs", model_kwargs, "--augment",
             "--lr", str(opts.lr), "--batch-size", str(opts.batch_size), "--epochs", str(opts.epochs),
             "--seed", str(opts.seed), "--loader-workers", "1", "--log-interval", "10")
    _stage("4/5 tiled inference on the held-out box with Dask")
    _m2m("infer", "--data", str(out / "test.zarr"), "--in", "za", "--tgt", "lpt2", *common,
         "--misc-kwargs", model_kwargs, "--load-state", str(run_dir / "checkpoint.pt"),
         "--out", str(out / "pred.zarr"), "--overwrite", "--workers", str(opts.workers))
    _stage("5/5 report")
    beat = write_report(out, opts)
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; everything is in {out}")
    return beat


def write_report(out: Path, opts: DemoOptions) -> bool:
    """Compare the prediction and the ZA input with the 2LPT truth on the test box; print and save."""
    import xarray as xr

    from map2map import report

    test = xr.open_zarr(out / "test.zarr")
    pred = xr.open_zarr(out / "pred.zarr")
    truth = test["lpt2"].isel(sample=0).values
    za = test["za"].isel(sample=0).values
    field = "lpt2" if "lpt2" in pred else next(iter(pred.data_vars))
    prediction = pred[field].isel(sample=0).values
    cmp = report.compare(truth, {"model": prediction, "za": za}, opts.boxsize)
    beat, text = report.verdict(cmp, "model", "za")
    figs = report.figures(cmp, {"ZA input": za, "prediction": prediction, "2LPT truth": truth}, out / "report")
    meta = {"grid": f"{opts.ngrid}^3", "box": f"{opts.boxsize} Mpc/h", "training boxes": opts.train_boxes,
            "epochs": opts.epochs, "model": f"VNet(width={opts.width})"}
    md = report.markdown(cmp, text, figs, meta)
    (out / "report" / "report.md").write_text(md)
    print(report.table(cmp))
    print(f"\n{text}")
    print(f"report: {out / 'report' / 'report.md'} and {', '.join(str(p) for p in figs)}")
    (out / "report" / "summary.json").write_text(json.dumps(
        {"beat_baseline": beat, "mean_r_model": cmp.mean_r("model"), "mean_r_za": cmp.mean_r("za"),
         "k_max": cmp.k_max, "options": asdict(opts)}, indent=1))
    return beat


