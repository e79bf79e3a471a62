"""`m2m demo`: the whole pipeline on physical example data, end to end, on a CPU.

synth (train / val / test boxes of 1LPT input and 2LPT target displacements)
-> convert -> train (a small V-Net) -> infer on the held-out box (from the
checkpoint's model card alone) -> a report comparing the prediction and the
trivial prediction (the 1LPT input itself) with the 2LPT truth: power
spectra, T(k), r(k), a table and a plain verdict.

`m2m demo --sr F` runs super-resolution the same way (`run_sr`): synth
pairs of a coarse (N^3) and an F times finer ((N F)^3) 2LPT displacement
from one linear field -> convert -> train the super-resolution generator
`G` (``--scale-factor F``; with `adv`, against a PatchGAN) -> infer the
held-out box -> a report on the fine grid comparing the prediction and the
trivial prediction (the coarse displacement interpolated trilinearly onto
the fine grid, `map2map.report.interpolate`) with the fine truth.  The
displacement, not the density, is the field: it is what the particles of a
simulation carry (as in Li et al. 2021, whose generator maps coarse to fine
particle displacements; the density follows from the particles), a
cell-centred field whose interpolation means something (the displacement
of the particles between the coarse ones), and the fine field's modes
below the coarse Nyquist are the coarse one's, so the baseline and the
model differ only in what they do with the modes the coarse grid lacks and
with the amplitude interpolation damps.

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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from map2map.errors import UserError
from map2map.stage import Summary

VNET_STRIDE = 4  # total stride of map2map.models.VNet (two 2x downsamplings): crops are multiples of it


@dataclass(frozen=True)
class DemoConfig:
    """The demo's knobs; the defaults finish in a few minutes on 2 CPU cores.

    Sizes left None take the defaults of the demo being run (`DEFAULTS`, or
    `SR_DEFAULTS` with `sr`, the refinement factor F); `resolved` fills them
    in.  With `sr`, `ngrid` and `crop` count coarse cells and `width` is
    `G`'s channels per level; `adv` adds a PatchGAN adversary.
    """

    outdir: str = "demo"
    ngrid: int | None = None
    boxsize: float | None = None
    train_boxes: int | None = None
    crop: int | None = None
    width: int | None = None
    epochs: int | None = None
    batch_size: int = 2
    lr: float = 1e-3
    seed: int = 0
    workers: int = 2
    sr: int | None = None
    adv: bool = False


DEFAULTS = {"ngrid": 64, "boxsize": 256.0, "train_boxes": 4, "crop": 32, "width": 8, "epochs": 12}
SR_DEFAULTS = {"ngrid": 16, "boxsize": 64.0, "train_boxes": 8, "crop": 8, "width": 16, "epochs": 8}
SR_FACTOR = 2  # `m2m demo --sr` without a value
# `--adv`: the adversary's options (those of bench/adversarial.py's default run)
ADV_OPTIONS = {"adv_model": "PatchGAN", "adv_start": 1, "adv_weight": 0.1, "adv_r1_reg_interval": 4}


def resolved(config: DemoConfig) -> DemoConfig:
    """`config` with every size left None set to its demo's default."""
    defaults = DEFAULTS if config.sr is None else SR_DEFAULTS
    return replace(config, **{k: v for k, v in defaults.items() if getattr(config, k) is None})


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


def _check(plan: _Plan) -> None:
    """Every stage's options checked before the first step writes anything."""
    from map2map import convert, synth, train

    for cfg in plan.synth:
        synth.check_config(cfg)
        synth.check_resources(cfg)
    for ccfg in plan.convert:
        convert.check_config(ccfg)
    train.check_config(plan.train)


def _convert_stage(plan: _Plan, config: DemoConfig, title: str) -> None:
    from map2map import convert

    _stage(title)
    for ccfg in plan.convert:
        _show("convert", ccfg.output, "--overwrite", "--no-progress", *(f"--field={f}" for f in ccfg.field),
              "--crop", str(config.crop), "--boxsize", str(config.boxsize))
        _print(convert.run(ccfg))


def _infer_stage(plan: _Plan, config: DemoConfig) -> Summary:
    from map2map import infer

    _stage("4/5 tiled inference on the held-out box with Dask (model, fields and norms from the model card)")
    icfg = plan.infer
    _show("infer", "--load-state", icfg.load_state, "--data", icfg.data, "--out", icfg.out, "--overwrite",
          "--workers", str(config.workers))
    predicted = infer.run(icfg)
    _print(predicted)
    return predicted


def check(config: DemoConfig) -> None:
    """Refuse a demo that could not finish, before its first step: a one-line `UserError` naming the option.
    `config` is `resolved`."""
    if config.sr is not None and (not _whole(config.sr) or config.sr < 2 or config.sr & (config.sr - 1)):
        raise UserError(f"--sr {config.sr!r}: expected a power of 2 of at least 2 (the refinement factor of the "
                        f"super-resolution generator G), e.g. --sr 2")
    if config.adv and config.sr is None:
        raise UserError("--adv: the adversary is for the super-resolution demo; add --sr")
    width = "channels of the V-Net model's first level" if config.sr is None else "channels per level of G"
    for option, value, what in (("--train-boxes", config.train_boxes, "training boxes"),
                                ("--width", config.width, width),
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
    if config.sr is not None:
        from map2map.models.patchgan import PatchGAN

        side = PatchGAN.min_side
        if config.adv and config.crop * config.sr < side:
            raise UserError(f"--crop {config.crop}: with --adv the PatchGAN needs a fine crop of at least "
                            f"{side} voxels per side; use --crop {-(-side // config.sr)} or more")
    elif config.crop % VNET_STRIDE:
        stride = VNET_STRIDE
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


def run(config: DemoConfig) -> DemoSummary | SRDemoSummary:
    """Run every stage in `config.outdir`, once every option is checked (`check`); with `sr`, `run_sr`."""
    config = resolved(config)
    check(config)
    if config.sr is not None:
        return run_sr(config)
    from map2map import synth, train

    out = Path(config.outdir).resolve()
    plan = _plan(config, out)
    _check(plan)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stages: dict[str, Any] = {}

    _stage("1/5 synthesize 1LPT (input) and 2LPT (target) displacement fields")
    for cfg in plan.synth:
        _show("synth", cfg.outdir, "--num-samples", str(cfg.num_samples), "--ngrid", str(config.ngrid),
              "--boxsize", str(config.boxsize), "--seed", str(cfg.seed), "--overwrite")
        _print(synth.run(cfg))

    _convert_stage(plan, config, "2/5 convert .npy files into crop-aligned Zarr stores")

    _stage("3/5 train a small V-Net: ZA displacement -> 2LPT displacement")
    tcfg = plan.train
    _show("train", "--train-data", tcfg.train_data, "--val-data", tcfg.val_data, "--in", "za", "--tgt", "lpt2",
          "--in-norms", "cosmology.dis", "--tgt-norms", "cosmology.dis", "--crop", str(config.crop),
          "--in-pad", "auto", "--model", "VNet", "--misc-kwargs", json.dumps(_model_kwargs(config)), "--augment",
          "--lr", str(config.lr), "--batch-size", str(config.batch_size), "--epochs", str(config.epochs),
          "--seed", str(config.seed), "--loader-workers", "1", "--log-interval", "10", "--run-dir", tcfg.run_dir)
    trained = train.run(tcfg)
    stages["train"] = trained.to_json()

    stages["infer"] = _infer_stage(plan, config).to_json()

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
         "k_max": cmp.k_max, "options": _options(opts)}, indent=1))
    return cmp, beat


def _options(opts: DemoConfig) -> dict[str, Any]:
    """The options as the report's summary.json records them (the plain demo's without its `--sr` ones)."""
    options = asdict(opts)
    if opts.sr is None:
        del options["sr"], options["adv"]
    return options


# ---------------------------------------------------------------- m2m demo --sr


@dataclass
class SRDemoSummary(Summary):
    """What the super-resolution demo produced and measured; the means are over the band between the coarse
    and the fine grid's Nyquist wave numbers (the modes the input lacks)."""

    outdir: str
    beat_baseline: bool
    band: tuple[float, float]
    mean_r_model: float
    mean_r_baseline: float
    mean_t_model: float
    mean_t_baseline: float
    train_losses: list[float]
    prediction: str
    report: str
    seconds: float
    stages: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        return [f"demo --sr finished in {self.seconds:.0f} s; everything is in {self.outdir}"]


def _sr_model_kwargs(config: DemoConfig) -> dict[str, Any]:
    """G's keyword arguments: `width` channels at every level."""
    return {"chan_base": config.width, "chan_min": config.width}


def _sr_plan(config: DemoConfig, out: Path) -> _Plan:
    from map2map import convert, infer, synth, train

    synths = tuple(synth.SynthConfig(outdir=str(out / "sims" / split), num_samples=n, ngrid=config.ngrid,
                                     boxsize=config.boxsize, seed=seed, sr=config.sr, overwrite=True)
                   for split, n, seed in (("train", config.train_boxes, config.seed),
                                          ("val", 1, config.seed + 1000), ("test", 1, config.seed + 2000)))
    converts = tuple(convert.ConvertConfig(
        output=str(out / f"{split}.zarr"),
        field=(f"lr={out}/sims/{split}/*/dis_lr.npy", f"hr={out}/sims/{split}/*/dis_hr.npy"),
        crop=(config.crop,), boxsize=config.boxsize, overwrite=True, progress=False)
        for split in ("train", "val", "test"))
    adv = ADV_OPTIONS if config.adv else {}
    # a run directory per kind of run, so a rerun with more epochs resumes and one with or without --adv does not
    run_dir = out / (f"run_sr{config.sr}" + ("_adv" if config.adv else ""))
    tcfg = train.TrainConfig(
        model="G", scale_factor=config.sr, lr=config.lr, train_data=str(out / "train.zarr"),
        val_data=str(out / "val.zarr"), in_fields=("lr",), tgt_fields=("hr",), in_norms=("cosmology.dis",),
        tgt_norms=("cosmology.dis",), crop=(config.crop,), in_pad="auto", misc_kwargs=_sr_model_kwargs(config),
        augment=True, batch_size=config.batch_size, epochs=config.epochs, seed=config.seed, loader_workers=1,
        log_interval=10, run_dir=str(run_dir), **adv)
    icfg = infer.InferConfig(load_state=str(run_dir / "checkpoint.pt"), data=str(out / "test.zarr"),
                             out=str(out / "pred.zarr"), overwrite=True, workers=config.workers)
    return _Plan(synths, converts, tcfg, icfg)


def _adv_args() -> list[str]:
    return [a for k, v in ADV_OPTIONS.items() for a in ("--" + k.replace("_", "-"), str(v))]


def run_sr(config: DemoConfig) -> SRDemoSummary:
    """The super-resolution demo in `config.outdir`; `config` is `resolved` and checked."""
    from map2map import synth, train

    out = Path(config.outdir).resolve()
    plan = _sr_plan(config, out)
    _check(plan)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stages: dict[str, Any] = {}
    fine = config.ngrid * config.sr

    _stage(f"1/5 synthesize coarse ({config.ngrid}^3, input) and fine ({fine}^3, target) 2LPT displacements "
           f"from the same linear fields")
    for cfg in plan.synth:
        _show("synth", cfg.outdir, "--num-samples", str(cfg.num_samples), "--ngrid", str(config.ngrid),
              "--boxsize", str(config.boxsize), "--seed", str(cfg.seed), "--sr", str(config.sr), "--overwrite")
        _print(synth.run(cfg))

    _convert_stage(plan, config, "2/5 convert .npy files into crop-aligned Zarr stores (coarse field lr, fine "
                   "field hr)")

    _stage(f"3/5 train the super-resolution generator G: coarse displacement -> {config.sr}x finer displacement"
           + (" (against a PatchGAN)" if config.adv else ""))
    tcfg = plan.train
    _show("train", "--train-data", tcfg.train_data, "--val-data", tcfg.val_data, "--in", "lr", "--tgt", "hr",
          "--in-norms", "cosmology.dis", "--tgt-norms", "cosmology.dis", "--scale-factor", str(config.sr),
          "--crop", str(config.crop), "--in-pad", "auto", "--model", "G", "--misc-kwargs",
          json.dumps(_sr_model_kwargs(config)), "--augment", "--lr", str(config.lr), "--batch-size",
          str(config.batch_size), "--epochs", str(config.epochs), "--seed", str(config.seed), "--loader-workers", "1",
          "--log-interval", "10", "--run-dir", tcfg.run_dir, *(_adv_args() if config.adv else []))
    trained = train.run(tcfg)
    stages["train"] = trained.to_json()

    stages["infer"] = _infer_stage(plan, config).to_json()

    _stage("5/5 report on the fine grid")
    cmp, beat = write_sr_report(out, config)
    return SRDemoSummary(outdir=str(out), beat_baseline=beat, band=(cmp.k_min, cmp.k_max),
                         mean_r_model=cmp.mean_r("model"), mean_r_baseline=cmp.mean_r("trilinear"),
                         mean_t_model=cmp.mean_t("model"), mean_t_baseline=cmp.mean_t("trilinear"),
                         train_losses=[r.train_loss for r in trained.epochs], prediction=str(out / "pred.zarr"),
                         report=str(out / "report" / "report.md"), seconds=time.perf_counter() - t0, stages=stages)


def write_sr_report(out: Path, opts: DemoConfig):
    """Compare the prediction and the interpolated coarse input with the fine truth on the test box, on the
    fine grid up to its Nyquist wave number, the verdict over the band between the two grids' Nyquist wave
    numbers; print and save.  Returns the comparison and whether the model beat the baseline there."""
    import xarray as xr

    from map2map import report

    test = xr.open_zarr(out / "test.zarr")
    pred = xr.open_zarr(out / "pred.zarr")
    truth = test["hr"].isel(sample=0).values
    baseline = report.interpolate(test["lr"].isel(sample=0).values, opts.sr)
    field = "hr" if "hr" in pred else next(iter(pred.data_vars))
    prediction = pred[field].isel(sample=0).values
    cmp = report.compare(truth, {"model": prediction, "trilinear": baseline}, opts.boxsize,
                         k_min=report.nyquist(opts.ngrid, opts.boxsize),
                         k_max=report.nyquist(opts.ngrid * opts.sr, opts.boxsize),
                         band="between the coarse and the fine grid's Nyquist")
    beat, text = report.verdict(cmp, "model", "trilinear")
    text += (f"; mean T(k) there: model {cmp.mean_t('model'):.4f}, trilinear {cmp.mean_t('trilinear'):.4f} "
             f"(1 is the true power)")
    figs = report.figures(cmp, {"trilinear coarse input": baseline, "prediction": prediction, "2LPT fine truth": truth},
                          out / "report")
    model = "G(" + ", ".join(f"{k}={v}" for k, v in _sr_model_kwargs(opts).items()) + f", scale_factor={opts.sr})"
    meta = {"coarse grid (input)": f"{opts.ngrid}^3", "fine grid (target)": f"{opts.ngrid * opts.sr}^3",
            "box": f"{opts.boxsize} Mpc/h", "training boxes": opts.train_boxes, "epochs": opts.epochs,
            "model": model + (" against a PatchGAN (" + " ".join(_adv_args()) + ")" if opts.adv else ""),
            "baseline": "trilinear: the coarse displacement linearly interpolated onto the fine grid's cell centres "
                        "(periodic)",
            "reading": "the fine field's modes beyond the coarse Nyquist are independent draws (m2m synth --sr), "
                       "tied to the coarse field only through 2LPT's mode coupling, so no prediction reaches r(k) "
                       "near 1 there; what super-resolution can restore is their power (T(k) towards 1), and "
                       "below the coarse Nyquist the amplitude that interpolation damps"}
    md = report.markdown(cmp, text, figs, meta, title="map2map super-resolution demo report")
    (out / "report" / "report.md").write_text(md)
    print(report.table(cmp))
    print(f"\n{text}")
    print(f"report: {out / 'report' / 'report.md'} and {', '.join(str(p) for p in figs)}")
    (out / "report" / "summary.json").write_text(json.dumps(
        {"beat_baseline": beat, "band": [cmp.k_min, cmp.k_max], "mean_r_model": cmp.mean_r("model"),
         "mean_r_trilinear": cmp.mean_r("trilinear"), "mean_t_model": cmp.mean_t("model"),
         "mean_t_trilinear": cmp.mean_t("trilinear"), "options": _options(opts)}, indent=1))
    return cmp, beat
