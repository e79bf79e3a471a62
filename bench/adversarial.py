"""Benchmark adversarial training: super-resolution of the 2LPT density with and without a discriminator.

Data: ``m2m synth --sr F --density`` pairs (the low-resolution CIC density at
N^3 as input, the high-resolution one at (N F)^3 as target, from the same
linear field; see `map2map.synth`), training samples from one seed and one
validation sample from another, converted into two stores.

Training: the original's super-resolution generator ``G`` (``--scale-factor
F``, ``--in-pad auto``) for the same number of epochs (the same steps) twice,
once supervised alone (MSE) and once with the adversary given by
``--adv-args`` (by default a PatchGAN that starts after the first epoch and
adds its loss with a small weight).  Both runs start from the same
initialization and see the same batches.

Report: the trained generator's prediction on the whole validation box (one
periodic pass), against the true high-resolution density: T(k) =
sqrt(P_pred / P_true) and r(k) = P_x / sqrt(P_pred P_true) per k bin
(`map2map.analysis`), and their means over the bins between the
low-resolution and the high-resolution Nyquist frequencies (``band``: the
modes the input lacks, which the adversary is there to bring back) and over
the bins in the top quarter below the high-resolution Nyquist frequency
(``nyquist``).  Prints one JSON
line.  A benchmark, not a test: at a budget this small the figures say how
the two runs compare here, not what adversarial training does at scale.

    python bench/adversarial.py                       # N 16, F 2, 4 samples, 4 epochs
    python bench/adversarial.py --ngrid 32 --samples 8 --epochs 20 \\
        --adv-args "--adv-model PatchGAN --cgan --adv-start 5 --adv-r1-reg-interval 4"
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
from map2map.modelfit import read_checkpoint
from map2map.models import build_model, narrow_like

DEFAULT_ADV = "--adv-model PatchGAN --adv-start 1 --adv-weight 0.1 --adv-r1-reg-interval 4"


def make_store(root: Path, name: str, ngrid: int, sr: int, nsamples: int, seed: int, boxsize: float,
               crop: int) -> Path:
    """``root/name.zarr`` with fields ``lr`` (the low-resolution density) and ``hr`` (the high-resolution one)."""
    npy = root / f"{name}_npy"
    synth.run(synth.SynthConfig(outdir=str(npy), num_samples=nsamples, ngrid=ngrid, seed=seed, boxsize=boxsize,
                                sr=sr, density=True))
    out = root / f"{name}.zarr"
    convert.run(convert.ConvertConfig(output=str(out), field=(f"lr={npy}/*/dens_lr.npy", f"hr={npy}/*/dens_hr.npy"),
                                      crop=(crop,), pad=4, boxsize=boxsize, progress=False))
    return out


def train(train_store: Path, run_dir: Path, args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    argv = ["train", "--train-data", str(train_store), "--in", "lr", "--tgt", "hr", "--crop", str(args.crop),
            "--scale-factor", str(args.sr), "--in-pad", "auto", "--model", "G", "--misc-kwargs",
            json.dumps({"chan_base": args.width, "chan_min": args.width}), "--lr", str(args.lr),
            "--batch-size", str(args.batch_size), "--loader-workers", "0", "--epochs", str(args.epochs),
            "--run-dir", str(run_dir), "--log-interval", "1000000", *extra]
    module, config = stage_of(build_parser().parse_args(argv))
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        summary = module.run(config)
    return {"seconds": round(time.perf_counter() - t0, 1), "train_loss": [e.train_loss for e in summary.epochs],
            "checkpoint": summary.checkpoint}


def predict(checkpoint: str, lowres: np.ndarray, highres_shape: tuple[int, ...]) -> np.ndarray:
    """The generator of `checkpoint` on one whole periodic low-resolution field (C, N, N, N), narrowed to the
    high-resolution grid."""
    ck = read_checkpoint(checkpoint)
    card = ck.card
    model = build_model(card.model, card.in_chan, card.out_chan, scale_factor=card.scale_factor, ndim=card.ndim,
                        kwargs=card.model_kwargs)
    model.load_state_dict(ck.model_state)
    model.eval()
    pad = [p for lo_hi in reversed(card.in_pad) for p in lo_hi]  # F.pad wants the last axis first
    x = F.pad(torch.from_numpy(lowres)[None], pad, mode="circular")
    with torch.no_grad():
        y = model(x)
    return narrow_like(y, highres_shape)[0].numpy()


def spectra(pred: np.ndarray, true: np.ndarray, boxsize: float, k_lo: float, k_hi: float) -> dict[str, Any]:
    t = analysis.transfer(pred, true, boxsize)
    r = analysis.correlation(pred, true, boxsize)
    band = (t.k > k_lo) & (t.k <= k_hi)
    near = (t.k > 0.75 * k_hi) & (t.k <= k_hi)
    return {"k": t.k.round(4).tolist(), "T": t.value.round(4).tolist(), "r": r.value.round(4).tolist(),
            "T_band": float(np.mean(t.value[band])), "r_band": float(np.mean(r.value[band])),
            "T_nyquist": float(np.mean(t.value[near])), "r_nyquist": float(np.mean(r.value[near]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ngrid", type=int, default=16, help="low-resolution grid side N")
    p.add_argument("--sr", type=int, default=2, help="refinement factor F")
    p.add_argument("--boxsize", type=float, default=64.0, help="box side [Mpc/h]")
    p.add_argument("--samples", type=int, default=4, help="training samples")
    p.add_argument("--crop", type=int, default=8, help="crop on the low-resolution grid")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--width", type=int, default=8, help="G's chan_base and chan_min")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--adv-args", default=DEFAULT_ADV, help="the adversarial run's extra m2m train options")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="m2m-bench-adv-") as tmp:
        root = Path(tmp)
        train_store = make_store(root, "train", args.ngrid, args.sr, args.samples, 0, args.boxsize, args.crop)
        make_store(root, "val", args.ngrid, args.sr, 1, 1000, args.boxsize, args.crop)
        lowres = np.load(root / "val_npy" / "000" / "dens_lr.npy")
        true = np.load(root / "val_npy" / "000" / "dens_hr.npy")
        k_nyq_lr = math.pi * args.ngrid / args.boxsize
        k_nyq_hr = k_nyq_lr * args.sr
        runs = {}
        for name, extra in (("supervised", []), ("adversarial", shlex.split(args.adv_args))):
            result = train(train_store, root / name, args, extra)
            pred = predict(result.pop("checkpoint"), lowres, true.shape[1:])
            result.update(spectra(pred, true, args.boxsize, k_nyq_lr, k_nyq_hr))
            runs[name] = result
    print(json.dumps({"ngrid": args.ngrid, "sr": args.sr, "boxsize": args.boxsize, "samples": args.samples,
                      "epochs": args.epochs, "crop": args.crop, "adv_args": args.adv_args,
                      "band": [round(k_nyq_lr, 4), round(k_nyq_hr, 4)], "runs": runs}))


if __name__ == "__main__":
    main()
