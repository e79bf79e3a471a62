"""`m2m demo` with its defaults, as the README's first command runs it, and the analysis notebook on its output.

This is the slowest test (a few minutes on 2 cores): it trains the demo's V-Net for real and checks the
claim the demo makes, that the trained model beats the trivial prediction (the ZA input) on r(k).
`m2m demo --sr` runs at its smallest sizes: every stage, the fine grid's shape and k range, and the trivial
baseline's figures against an independent computation (the model is not required to beat it).
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import pytest
import xarray as xr
from nbclient import NotebookClient

from conftest import ROOT, fails, run_m2m
from map2map import analysis
from map2map.report import interpolate


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo"
    res = run_m2m("demo", str(out), timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    for stage in ("1/5 synthesize", "2/5 convert", "3/5 train", "4/5 tiled inference", "5/5 report"):
        assert stage in res.stdout
    return out


def test_demo_beats_trivial_baseline(demo_dir):
    summary = json.loads((demo_dir / "report" / "summary.json").read_text())
    assert summary["mean_r_model"] > summary["mean_r_za"] and summary["beat_baseline"]
    report = (demo_dir / "report" / "report.md").read_text()
    assert "BEATS the trivial baseline" in report and "| k [h/Mpc] |" in report
    for name in ("spectra.png", "transfer_correlation.png", "slices.png"):
        assert (demo_dir / "report" / name).stat().st_size > 10_000
    assert (demo_dir / "run" / "checkpoint.pt").exists() and any((demo_dir / "run" / "runs").iterdir())


def test_notebook_runs_on_demo_output(demo_dir, monkeypatch, tmp_path):
    nb = nbformat.read(ROOT / "notebooks" / "analysis.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    monkeypatch.setenv("M2M_DEMO_DIR", str(demo_dir))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "mean r(k) up to half Nyquist" in printed
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert images == 3


# ---------------------------------------------------------------- m2m demo --sr

SR_TINY = ["--sr", "--ngrid", "8", "--crop", "4", "--train-boxes", "1", "--epochs", "1", "--width", "4",
           "--workers", "1", "--boxsize", "64"]


def trilinear(field: np.ndarray, factor: int) -> np.ndarray:
    """Periodic linear interpolation of cell-centred samples onto the `factor` times finer grid, one axis at a
    time in numpy (an implementation independent of `map2map.report.interpolate`)."""
    out = field
    for axis in range(1, field.ndim):
        n = out.shape[axis]
        u = (np.arange(n * factor) + 0.5) / factor - 0.5  # fine cell centres in coarse index units
        lo = np.floor(u).astype(int)
        w = (u - lo).reshape([-1 if a == axis else 1 for a in range(out.ndim)])
        out = (1 - w) * np.take(out, lo % n, axis=axis) + w * np.take(out, (lo + 1) % n, axis=axis)
    return out


def table_rows(report: str) -> np.ndarray:
    """The numbers of the report's T(k) / r(k) table, one row per k bin."""
    rows = [line for line in report.splitlines() if line.startswith("| 0") or line.startswith("| 1")]
    return np.array([[float(c) for c in line.strip("|").split("|")] for line in rows])


@pytest.fixture(scope="module")
def sr_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo_sr") / "demo"
    res = run_m2m("demo", str(out), *SR_TINY, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    for stage in ("1/5 synthesize", "2/5 convert", "3/5 train", "4/5 tiled inference", "5/5 report on the fine grid"):
        assert stage in res.stdout
    for command in ("$ m2m synth", "$ m2m convert", "$ m2m train", "$ m2m infer"):
        assert command in res.stdout
    assert "--sr 2" in res.stdout and "--scale-factor 2" in res.stdout and "--model G" in res.stdout
    return out


def test_sr_demo_predicts_the_fine_grid(sr_dir):
    pred = xr.open_zarr(sr_dir / "pred.zarr")
    test = xr.open_zarr(sr_dir / "test.zarr")
    assert pred["hr"].shape == test["hr"].shape == (1, 3, 16, 16, 16)
    assert test["lr"].shape == (1, 3, 8, 8, 8)
    assert np.isfinite(pred["hr"].values).all()


def test_sr_demo_report_is_on_the_fine_grid_with_an_exact_baseline(sr_dir):
    report = (sr_dir / "report" / "report.md").read_text()
    assert "| k [h/Mpc] | T model | r model | T trilinear | r trilinear |" in report
    assert "trivial baseline" in report and "fine grid (target): 16^3" in report
    rows = table_rows(report)
    boxsize, n_lr, n_hr = 64.0, 8, 16
    k_nyq_lr, k_nyq_hr = np.pi * n_lr / boxsize, np.pi * n_hr / boxsize
    assert rows[:, 0].max() > k_nyq_lr and rows[:, 0].max() <= k_nyq_hr  # past the coarse grid's reach
    assert (rows[:, 0] > k_nyq_lr).sum() >= 3

    test = xr.open_zarr(sr_dir / "test.zarr")
    truth = test["hr"].isel(sample=0).values
    base = trilinear(test["lr"].isel(sample=0).values.astype(np.float64), 2)
    t = analysis.transfer(base, truth, boxsize, nbins=n_hr // 2)
    r = analysis.correlation(base, truth, boxsize, nbins=n_hr // 2)
    nmodes = analysis.power_spectrum(truth, boxsize, nbins=n_hr // 2).nmodes
    shown = t.k <= k_nyq_hr
    np.testing.assert_allclose(rows[:, 0], t.k[shown], atol=6e-5)
    np.testing.assert_allclose(rows[:, 3], t.value[shown], atol=6e-5)
    np.testing.assert_allclose(rows[:, 4], r.value[shown], atol=6e-6)

    summary = json.loads((sr_dir / "report" / "summary.json").read_text())
    band = (t.k > k_nyq_lr) & (t.k <= k_nyq_hr)
    assert summary["band"] == pytest.approx([k_nyq_lr, k_nyq_hr])
    assert summary["mean_r_trilinear"] == pytest.approx(np.average(r.value[band], weights=nmodes[band]), abs=1e-6)
    assert summary["mean_t_trilinear"] == pytest.approx(np.average(t.value[band], weights=nmodes[band]), abs=1e-6)
    assert summary["beat_baseline"] == (summary["mean_r_model"] > summary["mean_r_trilinear"])  # reported, not required
    for name in ("spectra.png", "transfer_correlation.png", "slices.png"):
        assert (sr_dir / "report" / name).stat().st_size > 10_000


def test_interpolate_matches_numpy_trilinear():
    field = np.random.default_rng(1).standard_normal((3, 5, 6, 4)).astype(np.float32)
    for factor in (2, 4):
        np.testing.assert_allclose(interpolate(field, factor), trilinear(field, factor), atol=1e-6)
    plane = field[0]  # a 2D field of 5 channels on a 6 x 4 grid
    np.testing.assert_allclose(interpolate(plane, 2), trilinear(plane, 2), atol=1e-6)


@pytest.mark.parametrize("extra, needles", [
    (["--adv"], ["--adv", "--sr"]),
    (["--sr", "3"], ["--sr 3", "power of 2"]),
    (["--sr", "1"], ["--sr 1", "power of 2"]),
    (["--sr", "--adv", "--crop", "4", "--ngrid", "8"], ["--crop 4", "PatchGAN", "--crop 5"]),
    (["--sr", "--ngrid", "12"], ["--ngrid 12", "--crop 8"]),
    (["--sr", "--width", "0"], ["--width 0", "G"]),
])
def test_sr_demo_options_are_checked_before_the_first_step(capsys, tmp_path, extra, needles):
    out = tmp_path / "demo"
    fails(capsys, ["demo", str(out), *extra], *needles)
    assert not out.exists()


def test_sr_demo_adv_trains_against_a_patchgan_in_its_own_run_dir(tmp_path):
    from map2map.demo import ADV_OPTIONS, DemoConfig, _sr_plan, resolved

    plain = _sr_plan(resolved(DemoConfig(outdir=str(tmp_path), sr=2)), tmp_path).train
    adv = _sr_plan(resolved(DemoConfig(outdir=str(tmp_path), sr=2, adv=True)), tmp_path).train
    assert plain.adv_model is None and plain.model == "G" and plain.scale_factor == 2
    assert {k: getattr(adv, k) for k in ADV_OPTIONS} == ADV_OPTIONS and adv.adv_model == "PatchGAN"
    assert plain.run_dir != adv.run_dir  # a rerun with --adv does not resume the run without it
