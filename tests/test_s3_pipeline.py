"""The whole pipeline over object storage, as users run it: `m2m convert` of .npy files to s3://, `m2m train`
one epoch reading it, `m2m infer` from s3:// to s3://, then `xarray.open_zarr` of the prediction and
`map2map.analysis` on it; every stage a `m2m` subprocess against a real S3-compatible server (the `s3`
fixture, moto's server process on 127.0.0.1).  The same pipeline on local paths gives the same stores,
the same weights and bit for bit the same prediction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from map2map import analysis, synth
from conftest import run_m2m
from test_train import CALLBACKS

BOXSIZE = 128.0


def m2m(*args: str) -> str:
    """Run `m2m ARGS` in a subprocess; its standard output (the test fails with its stderr otherwise)."""
    done = run_m2m(*args)
    assert done.returncode == 0, f"m2m {' '.join(args[:1])} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def pipeline(npy: Path, cb: Path, base: str, run_dir: Path, options: list[str]) -> dict[str, str]:
    """convert -> train one epoch -> infer, with stores under `base` (a directory or a URL); the locations."""
    train, pred = f"{base}/train.zarr", f"{base}/pred.zarr"
    m2m("convert", train, "--field", f"za={npy}/*/dis_za.npy", "--field", f"lpt={npy}/*/dis_2lpt.npy",
        "--crop", "8", "--pad", "2", "--boxsize", str(BOXSIZE), "--no-progress", *options)
    m2m("train", "--train-data", train, "--in", "za", "--tgt", "lpt", "--crop", "8", "--in-pad", "2",
        "--in-norms", "cosmology.dis", "--tgt-norms", "cosmology.dis", "--model", "nets.Tiny", "--callback-at",
        str(cb), "--lr", "1e-2", "--batch-size", "2", "--loader-workers", "2", "--epochs", "1",
        "--run-dir", str(run_dir), *options)
    m2m("infer", "--data", train, "--in", "za", "--tgt", "lpt", "--out", pred, "--load-state",
        str(run_dir / "checkpoint.pt"), "--crop", "8", "--device", "cpu", "--no-progress", *options)
    return {"train": train, "pred": pred}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("s3_pipeline")
    synth.run(synth.SynthConfig(outdir=str(root / "npy"), num_samples=2, ngrid=16, seed=1, boxsize=BOXSIZE))
    (root / "cb").mkdir()
    (root / "cb" / "nets.py").write_text(CALLBACKS)
    return {"npy": root / "npy", "cb": root / "cb"}


def test_convert_train_infer_and_analysis_over_s3_equal_the_local_pipeline(inputs, s3, tmp_path):
    local = pipeline(inputs["npy"], inputs["cb"], str(tmp_path / "stores"), tmp_path / "run_local", [])
    remote = pipeline(inputs["npy"], inputs["cb"], s3.url(), tmp_path / "run_s3",
                      ["--storage-options", s3.options_json])

    # every stage wrote its store in the bucket, the run directory stayed local
    assert sorted(s3.fs().ls(s3.bucket)) == [f"{s3.bucket}/pred.zarr", f"{s3.bucket}/train.zarr"]
    assert (tmp_path / "run_s3" / "state_1.pt").is_file()

    # the same weights from the same store, read from S3 or from disk
    a = torch.load(tmp_path / "run_local" / "state_1.pt", weights_only=True)
    b = torch.load(tmp_path / "run_s3" / "state_1.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert b["card"]["train_stores"] == [remote["train"]]

    # xarray opens both stores straight from object storage, as a notebook would
    opened = {}
    for where, stores, opts in (("local", local, {}), ("s3", remote, {"storage_options": s3.options})):
        opened[where] = {k: xr.open_zarr(v, **opts) for k, v in stores.items()}
    for name in ("za", "lpt"):
        assert opened["s3"]["train"][name].equals(opened["local"]["train"][name]), name
    pred_s3, pred_local = opened["s3"]["pred"]["lpt"], opened["local"]["pred"]["lpt"]  # named as the target
    np.testing.assert_array_equal(pred_s3.values, pred_local.values)  # bit for bit
    assert np.isfinite(pred_s3.values).all()

    # the analysis of prediction against target, on the arrays read from S3
    target = opened["s3"]["train"]["lpt"]
    assert pred_s3.dims == target.dims and pred_s3.shape == target.shape
    r = analysis.correlation(pred_s3, target)  # the box size from the stores' coordinates
    r_local = analysis.correlation(pred_local, opened["local"]["train"]["lpt"])
    assert r.dims == ("sample", "k") and r.sizes["sample"] == 2 and r.attrs["boxsize"] == BOXSIZE
    np.testing.assert_array_equal(r.values, r_local.values)
    filled = r.nmodes.values > 0
    assert np.all(np.abs(r.values[:, filled]) <= 1 + 1e-12)
    p = analysis.power_spectrum(pred_s3)
    assert np.all(p.values[:, p.nmodes.values > 0] > 0)
