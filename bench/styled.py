"""Benchmark styled emulation over time: a styled V-Net conditioned on the growth factor D against an
unstyled V-Net and the Zel'dovich approximation, on a growth factor neither model saw; and its velocity.

Data (`map2map.synth`, flat LambdaCDM): ``--realisations`` training boxes
(seed 0), each written at every training redshift (``--train-z``) with the
same white noise, and one held-out box (seed 1000) at the test redshifts
(``--test-z``: by default one inside the training range of D, interpolation,
and one beyond it, extrapolation), with 2LPT and ZA velocities.

Input and target: the input of every sample is the Zel'dovich displacement
of its realisation at z = 0 (D = 1), ``psi_za(z) / D(z)``, the same at every
redshift; the target is the 2LPT displacement at the sample's redshift.  So
the input says nothing about the time and the target is a function of the
input *and* D: a model must be told D (the style) to fit it.  (With ZA at the
target D as input, the target would be a function of the input alone, and a
style could not help.)  The training store (``m2m convert --styles``) holds
the style table ``Om,D`` synth wrote; the styled model takes ``--style D``.

Training (``--models``, each with the same store, crop, pad, norms
(``cosmology.dis``), learning rate, batch size, epochs, seed and, with
``--augment``, augmentation, and ``--train-args``):

* ``styled``: ``StyledVNet --style D`` on the input above;
* ``unstyled``: the ``VNet`` of the same width on the same input;
* ``styled_at_D``: ``StyledVNet --style D`` on the Zel'dovich displacement
  at the sample's own D (``psi_za(z)``, the input of the field's emulators,
  which scales with D) to the same target.  For displacements this input
  already says the time (the 2LPT target is nearly a function of it alone),
  so it is no test of the style; it is the model whose velocity ``m2m infer
  --velocity`` computes by default: the derivative in D through the input
  and the style together.

Report, per held-out redshift, on the whole held-out box (one periodic
pass, as `m2m infer` would stitch it exactly):

* ``rms``: the RMS over voxels of the length of the displacement error
  (Mpc/h) of the styled model, the unstyled model and the ZA baseline
  ``D psi_za(z=0)`` (the Zel'dovich displacement at the held-out time; its
  error is the 2LPT correction), against the 2LPT displacement;
* T(k) and r(k) (`map2map.analysis`) of the displacement and of the CIC
  density it implies, against the 2LPT truth, as means over the bins up to a
  quarter of the Nyquist frequency (``low``) and between half of it and
  Nyquist (``high``); ``1 - r`` is what matters, r of all three is near 1;
* each styled model's velocity: dpsi/dD by forward-mode differentiation
  (`map2map.models.velocity.displacement_and_derivative`; for ``styled``
  the input does not scale with D, ``input_scales=False``, what ``m2m infer
  --velocity --velocity-input fixed`` computes; for ``styled_at_D`` it
  does, the default) times a H f D (`velocity_factors`) in km/s, against
  the 2LPT velocity, beside the ZA velocity against the same: RMS error
  (km/s), T(k), r(k).

Prints one JSON line.  A benchmark, not a test: the figures say how the
runs compare at this budget on these boxes, measured once.

    python bench/styled.py                                  # 32^3, 2 realisations, z 0,1,2 -> 0.5 and 3
    python bench/styled.py --models styled_at_D             # only the model of ZA at D, for its velocity
    python bench/styled.py --realisations 4 --epochs 64 --width 16   # a larger budget
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from map2map import analysis, convert, synth
from map2map.cli import build_parser
from map2map.cli.configs import stage_of
from map2map.cosmology import growth_factor
from map2map.data.norms import cosmology as cosmology_norms
from map2map.modelfit import read_checkpoint
from map2map.models import build_model, narrow_like
from map2map.models.build import forward
from map2map.models.eulerian import dis_norm_of
from map2map.models.velocity import displacement_and_derivative, velocity_factors

DIS_STD = dis_norm_of(cosmology_norms.dis)  # Mpc/h per unit of the cosmology.dis norm (at its default z = 0)

# name: (model, input field of the training store, styled, the input scales with D)
MODELS = {"styled": ("StyledVNet", "za0", True, False), "unstyled": ("VNet", "za0", False, False),
          "styled_at_D": ("StyledVNet", "za", True, True)}


def _float_list(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def add_za0(npy: Path, record_name: str = "synth.json") -> None:
    """Write ``dis_za0.npy`` = ``dis_za / D`` (the realisation's ZA displacement at D = 1) into every sample
    directory of the synth output `npy`."""
    record = json.loads((npy / record_name).read_text())
    for sample in record["samples"]:
        d = npy / sample["dir"]
        np.save(d / "dis_za0.npy", (np.load(d / "dis_za.npy") / np.float32(sample["growth_D1"])).astype(np.float32))


def make_train_store(root: Path, args: argparse.Namespace) -> Path:
    npy = root / "train_npy"
    synth.run(synth.SynthConfig(outdir=str(npy), num_samples=args.realisations, ngrid=args.ngrid,
                                boxsize=args.boxsize, seed=0, redshifts=args.train_z))
    add_za0(npy)
    out = root / "train.zarr"
    convert.run(convert.ConvertConfig(output=str(out), field=(f"za0={npy}/*/dis_za0.npy", f"za={npy}/*/dis_za.npy",
                                                              f"lpt={npy}/*/dis_2lpt.npy"),
                                      crop=(args.crop,), pad=20, boxsize=args.boxsize,
                                      styles=str(synth.style_table_path(npy)), progress=False))
    return out


def train(store: Path, run_dir: Path, args: argparse.Namespace, model: str, field: str, extra: list[str],
          kwargs: dict[str, Any]) -> dict[str, Any]:
    argv = ["train", "--train-data", str(store), "--in", field, "--tgt", "lpt", "--in-norms", "cosmology.dis",
            "--tgt-norms", "cosmology.dis", "--crop", str(args.crop), "--in-pad", "auto", "--model", model,
            "--misc-kwargs", json.dumps({"width": args.width, **kwargs}), "--lr", str(args.lr),
            "--batch-size", str(args.batch_size), "--loader-workers", "0", "--epochs", str(args.epochs),
            "--seed", "42", "--run-dir", str(run_dir), "--log-interval", "1000000",
            *(["--augment"] if args.augment else []), *shlex.split(args.train_args), *extra]
    module, config = stage_of(build_parser().parse_args(argv))
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        summary = module.run(config)
    return {"seconds": round(time.perf_counter() - t0, 1),
            "train_loss": [round(e.train_loss, 6) for e in summary.epochs], "checkpoint": summary.checkpoint}


def load(checkpoint: str):
    ck = read_checkpoint(checkpoint)
    card = ck.card
    model = build_model(card.model, card.in_chan, card.out_chan, scale_factor=card.scale_factor, ndim=card.ndim,
                        kwargs=card.model_kwargs, style_size=card.style_size)
    model.load_state_dict(ck.model_state)
    return model.eval(), card


def padded(field: np.ndarray, card) -> torch.Tensor:
    """The normalised input (1, C, ...) of a whole periodic box, padded circularly by the card's input pad."""
    pad = [p for lo_hi in reversed(card.in_pad) for p in lo_hi]  # F.pad wants the last axis first
    return F.pad(torch.from_numpy(field / np.float32(DIS_STD))[None], pad, mode="circular")


def predict(model, card, field: np.ndarray, d: float) -> np.ndarray:
    """The displacement (Mpc/h) the model predicts at growth factor `d` for the whole box from its input
    `field` (Mpc/h)."""
    x = padded(field, card)
    style = None if card.style_norm is None else card.style_norm.apply(torch.tensor([[d]], dtype=x.dtype))
    with torch.no_grad():
        y = forward(model, x, style)
    return narrow_like(y, field.shape[1:])[0].numpy() * DIS_STD


def velocity(model, card, field: np.ndarray, d: float, input_scales: bool) -> np.ndarray:
    """The styled model's peculiar velocity (km/s) at growth factor `d` from its input `field` (Mpc/h): dpsi/dD
    by jvp (through the input too if it scales with D, `input_scales`) times a H f D."""
    x = padded(field, card)
    physical = torch.tensor([[d]], dtype=x.dtype)
    _, dy = displacement_and_derivative(model, x, physical, card.style_norm, input_scales=input_scales)
    factor = velocity_factors(physical.numpy(), card.style_norm.names)[0]
    return narrow_like(dy, field.shape[1:])[0].numpy() * DIS_STD * factor


def rms(a: np.ndarray, b: np.ndarray) -> float:
    """RMS over voxels of the length of the vector a - b (channel first)."""
    return float(np.sqrt(np.mean(np.sum((a.astype(np.float64) - b) ** 2, axis=0))))


def spectra(pred: np.ndarray, true: np.ndarray, boxsize: float) -> dict[str, float]:
    """Means of T(k) and r(k) of `pred` against `true` over the low and the high k bins (see the docstring)."""
    n = true.shape[-1]
    t = analysis.transfer(pred, true, boxsize, nbins=n // 2)
    r = analysis.correlation(pred, true, boxsize, nbins=n // 2)
    k_nyq = math.pi * n / boxsize
    low, high = t.k <= 0.25 * k_nyq, (t.k > 0.5 * k_nyq) & (t.k <= k_nyq)
    return {"T_low": round(float(np.mean(t.value[low])), 5), "T_high": round(float(np.mean(t.value[high])), 5),
            "1-r_low": float(f"{1 - np.mean(r.value[low]):.3e}"),
            "1-r_high": float(f"{1 - np.mean(r.value[high]):.3e}")}


def compare(pred: np.ndarray, true: np.ndarray, boxsize: float, density: bool) -> dict[str, Any]:
    out = {"rms": round(rms(pred, true), 5), "dis": spectra(pred, true, boxsize)}
    if density:
        out["dens"] = spectra(synth.density_from_displacement(pred.astype(np.float64), boxsize),
                              synth.density_from_displacement(true.astype(np.float64), boxsize), boxsize)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ngrid", type=int, default=32, help="grid side N")
    p.add_argument("--boxsize", type=float, default=128.0, help="box side [Mpc/h]")
    p.add_argument("--realisations", type=int, default=2, help="training realisations (each at every --train-z)")
    p.add_argument("--train-z", type=_float_list, default=(0.0, 1.0, 2.0), help="training redshifts")
    p.add_argument("--test-z", type=_float_list, default=(0.5, 3.0), help="held-out redshifts")
    p.add_argument("--crop", type=int, default=16, help="training crop (a multiple of 4)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--width", type=int, default=8, help="the V-Nets' width")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--styled-kwargs", type=json.loads, default={},
                   help="JSON object of StyledVNet options beside the width, e.g. "
                        "'{\"demodulate\": false, \"style_bypass\": true}'")
    p.add_argument("--augment", action="store_true",
                   help="train with m2m train --augment (random flips and axis permutations; vector fields turn with the axes)")
    p.add_argument("--train-args", default="", metavar="ARGS",
                   help="more m2m train options for every model, e.g. '--reduce-lr-on-plateau'")
    p.add_argument("--models", type=lambda t: t.split(","), default=list(MODELS),
                   help=f"the models to train, comma-separated (default: {','.join(MODELS)})")
    args = p.parse_args()
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        p.error(f"--models: unknown {','.join(unknown)}; choose from {','.join(MODELS)}")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="m2m-bench-styled-") as tmp:
        root = Path(tmp)
        store = make_train_store(root, args)
        test_npy = root / "test_npy"
        synth.run(synth.SynthConfig(outdir=str(test_npy), num_samples=1, ngrid=args.ngrid, boxsize=args.boxsize,
                                    seed=1000, redshifts=args.test_z, velocity=True))
        record = json.loads((test_npy / "synth.json").read_text())
        runs = {}
        for name in args.models:
            model, field, styled, _ = MODELS[name]
            result = train(store, root / name, args, model, field, ["--style", "D"] if styled else [],
                           args.styled_kwargs if styled else {})
            runs[name] = (result.pop("checkpoint"), result)
        tests = {}
        for sample in record["samples"]:
            z, d = sample["redshift"], sample["growth_D1"]
            arrays = {k: np.load(test_npy / sample["dir"] / f"{k}.npy")
                      for k in ("dis_za", "dis_2lpt", "vel_za", "vel_2lpt")}
            za0 = (arrays["dis_za"] / np.float32(d)).astype(np.float32)
            true = arrays["dis_2lpt"]
            entry = {"D": round(d, 5), "ZA": compare(d * za0, true, args.boxsize, True)}
            velocities = {"ZA": compare(arrays["vel_za"], arrays["vel_2lpt"], args.boxsize, False)}
            for name, (checkpoint, _) in runs.items():
                model, card = load(checkpoint)
                scales = MODELS[name][3]
                field = (d * za0).astype(np.float32) if scales else za0
                entry[name] = compare(predict(model, card, field, d), true, args.boxsize, True)
                if card.style_norm is not None:
                    velocities[name] = compare(velocity(model, card, field, d, scales), arrays["vel_2lpt"],
                                               args.boxsize, False)
            if len(velocities) > 1:
                entry["velocity"] = velocities
            tests[f"z={z:g}"] = entry
    train_d = [round(float(growth_factor(z)), 5) for z in args.train_z]
    print(json.dumps({"ngrid": args.ngrid, "boxsize": args.boxsize, "realisations": args.realisations,
                      "train_z": list(args.train_z), "train_D": train_d, "crop": args.crop, "epochs": args.epochs,
                      "batch_size": args.batch_size, "width": args.width, "lr": args.lr, "augment": args.augment,
                      "train_args": args.train_args,
                      "styled_kwargs": args.styled_kwargs, "models": args.models,
                      "training": {name: result for name, (_, result) in runs.items()}, "test": tests,
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
