"""`m2m demo`: the whole pipeline on physical example data, end to end, on a CPU.

synth (train / val / test boxes of 1LPT input and 2LPT target displacements)
-> convert -> train (a small V-Net) -> infer on the held-out box (from the
checkpoint's model card alone) -> a report comparing the prediction and the
trivial prediction (the 1LPT input itself) with the 2LPT truth: power
spectra, T(k), r(k), a table and a plain verdict.

Each stage is called directly with its config (`run(config) -> summary`);
the equivalent `m2m` command is printed before it, so every step can be
repeated by hand.  Every option is checked before the first step (`check`,
then each stage's own config checks), so a demo that cannot finish fails in
a moment with one line.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from map2map.errors import UserError
from map2map.stage import Summary

VNET_STRIDE = 4  # total stride of map2map.models.VNet (two 2x downsamplings): crops are multiples of it


@dataclass(frozen=True)
class DemoConfig:
    """The demo's knobs; the defaults finish in a few minutes on 2 CPU cores."""

    outdir: str = "demo"
    ngrid: int = 64
    boxsize: float = 256.0
    train_boxes: int = 4
    crop: int = 32
    width: int = 8
    epochs: int = 12
    batch_size: int = 2
    lr: float = 1e-3
    seed: int = 0
    workers: int = 2


@dataclass
class DemoSummary(Summary):
    """What the demo produced and measured."""

    outdir: str
    beat_baseline: bool
    mean_r_model: float
    mean_r_za: float
    k_max: float
    train_losses: list[float]
    val_losses: list[float | None]
    prediction: str
    report: str
    seconds: float
    stages: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        return [f"demo finished in {self.seconds:.0f} s; everything is in {self.outdir}"]


def _model_kwargs(config: DemoConfig) -> dict[str, Any]:
    """The V-Net's keyword arguments: the demo's width, and a start at the identity map (the bypass with a
    zeroed last layer), which reaches a better r(k) in the demo's few epochs than PyTorch's default start."""
    return {"width": config.width, "identity_init": True}


def _show(*args: str) -> None:
    print(f"\n$ m2m {shlex.join(args)}", flush=True)


def _stage(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


def _print(summary: Summary) -> None:
    for line in summary.lines():
        print(line, flush=True)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class _Plan:
    """The configs of every step, built (and checked) before the first one runs."""

    synth: tuple[Any, ...]
    convert: tuple[Any, ...]
    train: Any
    infer: Any


def _plan(config: DemoConfig, out: Path) -> _Plan:
    from map2map import convert, infer, synth, train

    synths = tuple(synth.SynthConfig(outdir=str(out / "sims" / split), num_samples=n, ngrid=config.ngrid,
                                     boxsize=config.boxsize, seed=seed, overwrite=True)
                   for split, n, seed in (("train", config.train_boxes, config.seed),
                                          ("val", 1, config.seed + 1000), ("test", 1, config.seed + 2000)))
    converts = tuple(convert.ConvertConfig(
        output=str(out / f"{split}.zarr"),
        field=(f"za={out}/sims/{split}/*/dis_za.npy", f"lpt2={out}/sims/{split}/*/dis_2lpt.npy"),
        crop=(config.crop,), boxsize=config.boxsize, overwrite=True, progress=False)
        for split in ("train", "val", "test"))
    tcfg = train.TrainConfig(
        model="VNet", lr=config.lr, train_data=str(out / "train.zarr"), val_data=str(out / "val.zarr"),
        in_fields=("za",), tgt_fields=("lpt2",), in_norms=("cosmology.dis",), tgt_norms=("cosmology.dis",),
        crop=(config.crop,), in_pad="auto", misc_kwargs=_model_kwargs(config), augment=True,
        batch_size=config.batch_size, epochs=config.epochs, seed=config.seed, loader_workers=1, log_interval=10,
        run_dir=str(out / "run"))
    icfg = infer.InferConfig(load_state=str(out / "run" / "checkpoint.pt"), data=str(out / "test.zarr"),
                             out=str(out / "pred.zarr"), overwrite=True, workers=config.workers)
    return _Plan(synths, converts, tcfg, icfg)


def check(config: DemoConfig) -> None:
    """Refuse a demo that could not finish, before its first step: a one-line `UserError` naming the option."""
    for option, value, what in (("--train-boxes", config.train_boxes, "training boxes"),
                                ("--width", config.width, "channels of the V-Net model's first level"),
                                ("--epochs", config.epochs, "epochs: the prediction needs a trained checkpoint"),
                                ("--batch-size", config.batch_size, "crops per training batch"),
                                ("--workers", config.workers, "Dask workers for inference"),
                                ("--crop", config.crop, "voxels per side of a crop"),
                                ("--ngrid", config.ngrid, "voxels per side of a box")):
        if not _whole(value) or value < 1:
            raise UserError(f"{option} {value!r}: expected a whole number of at least 1 ({what})")
    if not _whole(config.seed) or config.seed < 0:
        raise UserError(f"--seed {config.seed!r}: expected a whole number, 0 or more")
    for option, value in (("--boxsize", config.boxsize), ("--lr", config.lr)):
        if not _positive(value):
            raise UserError(f"{option} {value!r}: expected a finite positive number")
    stride = VNET_STRIDE
    if config.crop % stride:
        raise UserError(f"--crop {config.crop}: the V-Net takes crops of a multiple of {stride} voxels; use e.g. "
                        f"{max(stride, config.crop // stride * stride)}")
    if config.ngrid < config.crop or config.ngrid % config.crop:
        raise UserError(f"--ngrid {config.ngrid}: the box must be a whole number of --crop {config.crop} crops "
                        f"per side; use e.g. --ngrid {max(1, round(config.ngrid / config.crop)) * config.crop}")
    from map2map import store  # the options above fail fast: nothing heavy is imported before them

    outdir = Path(config.outdir)
    store.check_output_path(outdir, option="OUTDIR")
    if os.path.lexists(outdir) and not outdir.is_dir():
        raise UserError(f"OUTDIR {outdir} exists and is not a directory; choose another path")


def run(config: DemoConfig) -> DemoSummary:
    """Run every stage in `config.outdir`, once every option is checked (`check`)."""
    check(config)
    from map2map import convert, infer, synth, train

    out = Path(config.outdir).resolve()
    plan = _plan(config, out)
    for cfg in plan.synth:
        synth.check_config(cfg)
        synth.check_resources(cfg)
    for ccfg in plan.convert:
        convert.check_config(ccfg)
    train.check_config(plan.train)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stages: dict[str, Any] = {}

    _stage("1/5 synthesize 1LPT (input) and 2LPT (target) displacement fields")
    for cfg in plan.synth:
        _show("synth", cfg.outdir, "--num-samples", str(cfg.num_samples), "--ngrid", str(config.ngrid),
              "--boxsize", str(config.boxsize), "--seed", str(cfg.seed), "--overwrite")
        _print(synth.run(cfg))

    _stage("2/5 convert .npy files into crop-aligned Zarr stores")
    for ccfg in plan.convert:
        _show("convert", ccfg.output, "--overwrite", "--no-progress", *(f"--field={f}" for f in ccfg.field),
              "--crop", str(config.crop), "--boxsize", str(config.boxsize))
        _print(convert.run(ccfg))

    _stage("3/5 train a small V-Net: ZA displacement -> 2LPT displacement")
    tcfg = plan.train
    _show("train", "--train-data", tcfg.train_data, "--val-data", tcfg.val_data, "--in", "za", "--tgt", "lpt2",
          "--in-norms", "cosmology.dis", "--tgt-norms", "cosmology.dis", "--crop", str(config.crop),
          "--in-pad", "auto", "--model", "VNet", "--misc-kwargs", json.dumps(_model_kwargs(config)), "--augment",
          "--lr", str(config.lr), "--batch-size", str(config.batch_size), "--epochs", str(config.epochs),
          "--seed", str(config.seed), "--loader-workers", "1", "--log-interval", "10", "--run-dir", tcfg.run_dir)
    trained = train.run(tcfg)
    stages["train"] = trained.to_json()

    _stage("4/5 tiled inference on the held-out box with Dask (model, fields and norms from the model card)")
    icfg = plan.infer
    _show("infer", "--load-state", icfg.load_state, "--data", icfg.data, "--out", icfg.out, "--overwrite",
          "--workers", str(config.workers))
    predicted = infer.run(icfg)
    _print(predicted)
    stages["infer"] = predicted.to_json()

    _stage("5/5 report")
    cmp, beat = write_report(out, config)
    summary = DemoSummary(outdir=str(out), beat_baseline=beat, mean_r_model=cmp.mean_r("model"),
                          mean_r_za=cmp.mean_r("za"), k_max=cmp.k_max,
                          train_losses=[r.train_loss for r in trained.epochs],
                          val_losses=[r.val_loss for r in trained.epochs], prediction=str(out / "pred.zarr"),
                          report=str(out / "report" / "report.md"), seconds=time.perf_counter() - t0,
                          stages=stages)
    return summary


def write_report(out: Path, opts: DemoConfig):
    """Compare the prediction and the ZA input with the 2LPT truth on the test box; print and save.
    Returns the comparison and whether the model beat the trivial baseline."""
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
            "epochs": opts.epochs, "model": "VNet(" + ", ".join(f"{k}={v}" for k, v in _model_kwargs(opts).items()) + ")"}
    md = report.markdown(cmp, text, figs, meta)
    (out / "report" / "report.md").write_text(md)
    print(report.table(cmp))
    print(f"\n{text}")
    print(f"report: {out / 'report' / 'report.md'} and {', '.join(str(p) for p in figs)}")
    (out / "report" / "summary.json").write_text(json.dumps(
        {"beat_baseline": beat, "mean_r_model": cmp.mean_r("model"), "mean_r_za": cmp.mean_r("za"),
         "k_max": cmp.k_max, "options": asdict(opts)}, indent=1))
    return cmp, beat


