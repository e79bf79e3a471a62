"""`m2m infer` exactness and output format, through real Dask clusters.

The stitched prediction must equal the model applied once to the whole box
padded with ``numpy.pad(mode="wrap")`` and narrowed to the box.  Most runs use
one LocalCluster of two worker processes for the whole session (reached by
address, as `--scheduler` does); one runs the command as users do, with its
own local cluster; one uses a `dask scheduler` and two `dask worker`
processes started here on loopback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from map2map import convert, infer, store
from map2map.models import G, VNet, narrow_like

from conftest import run_m2m
from ports import free_port
from twoconv import TwoConv

TESTS = os.path.dirname(os.path.abspath(__file__))  # the --callback-at directory of tests/twoconv.py

TOL = 1e-5


# --------------------------------------------------------------------------- helpers (shared with test_infer_*)


def make_store(root: Path, name: str, fields: dict[str, np.ndarray], crop: int, pad: int = 4,
               boxsize: float | None = 100.0) -> str:
    """Write each field (nsample, C, *grid) as .npy files and convert them into one store."""
    specs = []
    for fname, arr in fields.items():
        d = root / f"{name}-npy" / fname
        d.mkdir(parents=True, exist_ok=True)
        for i, a in enumerate(arr):
            np.save(d / f"{i:02d}.npy", a)
        specs.append(f"{fname}={d}/*.npy")
    out = str(root / f"{name}.zarr")
    convert.run(convert.ConvertConfig(output=out, field=tuple(specs), crop=(crop,), pad=pad, boxsize=boxsize,
                                      progress=False, workers=1))
    return out


def tame(model: torch.nn.Module, gain: float = 0.05) -> torch.nn.Module:
    """Scale the last layer so outputs are O(1), and give batch norms non-trivial statistics."""
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
        last = [m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)][-1]
        last.weight.mul_(gain)
    return model.eval()


def save_ckpt(model: torch.nn.Module, path: Path, wrap: bool = True) -> str:
    torch.save({"model": model.state_dict(), "args": {"note": "test"}} if wrap else model.state_dict(), path)
    return str(path)


def reference(model: torch.nn.Module, x: np.ndarray, pad: int, out_shape) -> np.ndarray:
    """The model over the whole box padded periodically, narrowed to the (output) box."""
    padded = np.pad(x, [(0, 0)] + [(pad, pad)] * (x.ndim - 1), mode="wrap")
    with torch.no_grad():
        y = model(torch.from_numpy(padded)[None])
    return narrow_like(y, tuple(out_shape))[0].numpy()



def record(case: str, diff: float) -> None:
    """Print one exactness figure (run with -s to see them)."""
    print(f"\nEXACTNESS {case}: max abs diff {diff:.3g}")


# --------------------------------------------------------------------------- clusters


@pytest.fixture(scope="module")
def dask_cli_cluster(tmp_path_factory):
    """`dask scheduler` and two `dask worker` processes on loopback, torn down at the end."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = os.path.join(os.path.dirname(sys.executable), "dask")
    log = tmp_path_factory.mktemp("dask-cli")
    procs = []
    try:
        procs.append(subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                       "--no-dashboard"], stdout=subprocess.DEVNULL,
                                      stderr=open(log / "scheduler.log", "w")))
        for i in range(2):
            procs.append(subprocess.Popen([dask, "worker", address, "--nworkers", "1", "--nthreads", "1",
                                           "--host", "127.0.0.1", "--no-dashboard", "--name", f"cli-{i}"],
                                          stdout=subprocess.DEVNULL, stderr=open(log / f"worker{i}.log", "w")))
        from distributed import Client

        deadline = time.time() + 60
        while True:
            try:
                with Client(address, timeout="2s", set_as_default=False) as c:
                    c.wait_for_workers(2, timeout=60)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        yield address
    finally:
        from distributed import Client

        try:  # a scheduler shuts its workers down in a fraction of the time SIGTERM takes
            with Client(address, timeout="2s", set_as_default=False) as c:
                c.shutdown()
        except Exception:
            pass
        for p in reversed(procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def run_infer(address: str, **kw) -> infer.InferSummary:
    kw.setdefault("progress", False)
    return infer.run(infer.InferConfig(scheduler=address, **kw))


# --------------------------------------------------------------------------- exactness


@pytest.fixture(scope="module")
def vnet3d(tmp_path_factory):
    root = tmp_path_factory.mktemp("vnet3d")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 32, 32, 32)).astype(np.float32)
    data = make_store(root, "in", {"disp": x}, crop=16)
    torch.manual_seed(0)
    model = tame(VNet(3, 3, dim=3, width=4))
    ckpt = save_ckpt(model, root / "state_1.pt")
    refs = [reference(model, xi, 20, (32,) * 3) for xi in x]
    return root, data, ckpt, refs


@pytest.mark.parametrize("crop,batch", [(16, 1), (12, 3)])
def test_vnet_3d_matches_whole_box(cluster, vnet3d, crop, batch):
    root, data, ckpt, refs = vnet3d
    out = root / f"out-{crop}.zarr"
    s = run_infer(cluster, out=str(out), model="VNet", load_state=ckpt, data=data, in_fields=["disp"],
                  crop=[crop], model_kwargs={"width": 4}, batch_size=batch)
    assert s.stride == 4 and s.pad == [[20, 20]] * 3 and s.computed == 2 * (-(-32 // crop)) ** 3
    pred = store.open_store(out).field("prediction")[:]
    for i, ref in enumerate(refs):
        diff = float(np.abs(pred[i] - ref).max())
        record(f"3D V-Net 32^3, crop {crop}, batch {batch}", diff)
        assert diff <= TOL
        assert np.abs(ref).max() > 0.1
    # each tile wrote exactly one shard file of its own
    shards = [p for p in (out / "prediction").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert len(shards) == s.tiles
    assert sum(w["tasks"] for w in s.workers.values()) > 2
    for w in s.workers.values():
        assert w["model_loads"] <= 1  # once per worker process (0: kept from the previous run), not per task


def test_vnet_2d_and_norms_match_whole_box(cluster, tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 2, 64, 64)).astype(np.float32) * 5
    v = rng.standard_normal((1, 1, 64, 64)).astype(np.float32)
    data = make_store(tmp_path, "in2d", {"dis": x, "aux": v}, crop=32)
    torch.manual_seed(2)
    model = tame(VNet(3, 2, dim=2, width=4))
    ckpt = save_ckpt(model, tmp_path / "ck.pt")
    from map2map.data.norms import cosmology

    kw = {"z": 1.0}
    xin = np.concatenate([cosmology.dis(x[0].copy(), **kw), v[0]])
    ref_n = reference(model, xin, 20, (64, 64))  # the model's own output, before the target norm is undone
    ref = cosmology.dis(ref_n.copy(), undo=True, **kw)
    scale = cosmology.dis_scale(kw["z"], 6.0, 0.31)
    for crop, batch in ((16, 2), (20, 1)):
        out = tmp_path / f"o{crop}.zarr"
        s = run_infer(cluster, out=str(out), model="VNet", load_state=ckpt, data=data, in_fields=["dis", "aux"],
                      out_chan=2, crop=[crop], model_kwargs={"width": 4}, batch_size=batch,
                      in_norms=["cosmology.dis", "nonorm.none"], tgt_norms=["cosmology.dis"], norm_kwargs=kw,
                      callback_at=str(_identity_norm(tmp_path)))
        pred = store.open_store(out).field("prediction")[0]
        diff = float(np.abs(cosmology.dis(pred.copy(), **kw) - ref_n).max())
        record(f"2D V-Net 64^2 with in/tgt norms (normalized units), crop {crop}, batch {batch}", diff)
        assert diff <= TOL
        assert float(np.abs(pred - ref).max()) <= TOL * scale  # in Mpc/h: the same, times the norm's scale
        assert s.tiles == (-(-64 // crop)) ** 2


def _identity_norm(root: Path) -> Path:
    d = root / "callbacks"
    d.mkdir(exist_ok=True)
    (d / "nonorm.py").write_text("def none(x, undo=False, **kwargs):\n    return x\n")
    return d


@pytest.mark.parametrize("ndim,n,crop", [(3, 16, 8), (3, 16, 6), (2, 32, 12)])
def test_super_resolution_matches_whole_box(cluster, tmp_path, ndim, n, crop):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 1) + (n,) * ndim).astype(np.float32)
    y = rng.standard_normal((1, 1) + (2 * n,) * ndim).astype(np.float32)
    data = make_store(tmp_path, "sr", {"lo": x, "hi": y}, crop=8)
    torch.manual_seed(4)
    model = tame(G(1, 1, scale_factor=2, dim=ndim, chan_base=4, chan_min=4), gain=0.5)
    ckpt = save_ckpt(model, tmp_path / "g.pt")
    out = tmp_path / "sr-out.zarr"
    s = run_infer(cluster, out=str(out), model="G", load_state=ckpt, data=data, in_fields=["lo"], tgt=["hi"],
                  scale_factor=2, crop=[crop], model_kwargs={"chan_base": 4, "chan_min": 4}, batch_size=2)
    assert s.pad == [[2, 2]] * ndim and s.out_shape == [2 * n] * ndim
    box_bytes = 4 * (n ** ndim + 2 * (2 * n) ** ndim)  # one sample's input, output and target
    for w in s.workers.values():
        assert 0 < w["max_task_bytes"] < box_bytes / 2  # no task holds a whole box
    ref = reference(model, x[0], 2, (2 * n,) * ndim)
    st = store.open_store(out)
    pred = st.field("hi")[0]
    diff = float(np.abs(pred - ref).max())
    record(f"{ndim}D super-resolution x2 {n}->{2 * n}, crop {crop}", diff)
    assert diff <= TOL
    # the loss against the target is the MSE over the whole sample
    mse = float(np.mean((ref.astype(np.float64) - y[0]) ** 2))
    assert s.loss[0] == pytest.approx(mse, rel=1e-5)
    assert st.meta["loss"]["per_sample"][0] == pytest.approx(mse, rel=1e-5)
    # coordinates line up with the target grid of the input store
    ds_in, ds_out = xr.open_zarr(data), xr.open_zarr(out)
    dims = store.spatial_dims((2 * n,) * ndim)
    assert ds_out["hi"].dims[2:] == dims == ds_in["hi"].dims[2:]
    for d in dims:
        np.testing.assert_array_equal(ds_out[d].values, ds_in[d].values)
    truth = ds_in[["hi"]].drop_vars("source_hi").rename(hi="truth")
    merged = xr.merge([truth, ds_out[["hi"]].drop_vars("source_hi")])
    assert float(((merged["hi"] - merged["truth"]) ** 2).mean()) == pytest.approx(mse, rel=1e-5)


def test_two_conv_model_3d_on_dask_cli_cluster(dask_cli_cluster, tmp_path):
    """`dask scheduler` + two `dask worker` processes, reached with --scheduler, through the CLI."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 20, 20, 20)).astype(np.float32)
    data = make_store(tmp_path, "cli", {"disp": x}, crop=10)
    torch.manual_seed(5)
    model = tame(TwoConv(3, 3, width=8), gain=1.0)
    ckpt = save_ckpt(model, tmp_path / "g1.pt", wrap=False)
    for crop in (8, 10):
        out = tmp_path / f"cli-{crop}.zarr"
        r = run_m2m("infer", "--data", data, "--in", "disp", "--model", "twoconv.TwoConv", "--callback-at", TESTS,
                    "--load-state", ckpt, "--out", str(out), "--crop", str(crop), "--model-kwargs", '{"width": 8}',
                    "--batch-size", "2",
                    "--scheduler", dask_cli_cluster, "--no-progress")
        assert r.returncode == 0, r.stderr
        pred = store.open_store(out).field("prediction")[:]
        for i in range(2):
            diff = float(np.abs(pred[i] - reference(model, x[i], 1, (20,) * 3)).max())
            record(f"3D two-convolution 20^3 on dask CLI cluster, crop {crop}", diff)
            assert diff <= TOL


def test_cli_local_cluster_output_store_format(tmp_path):
    """The command as users run it: its own local cluster of 2 worker processes, progress bar, attrs."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 3, 16, 16, 16)).astype(np.float32)
    data = make_store(tmp_path, "in", {"disp": x}, crop=8)
    torch.manual_seed(6)
    model = tame(TwoConv(3, 3, width=4), gain=1.0)
    ckpt = str(tmp_path / "state_3.pt")
    torch.save({"epoch": 3, "model": model.state_dict(), "config": {"lr": 0.1}}, ckpt)  # a state without a card
    out = tmp_path / "pred.zarr"
    r = run_m2m("infer", "--data", data, "--in", "disp", "--model", "twoconv.TwoConv", "--callback-at", TESTS,
                "--load-state", ckpt, "--out", str(out), "--crop", "8", "--misc-kwargs", '{"width": 4}', "--workers", "2", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "8/8" in r.stderr  # the progress bar counts tiles
    assert "complete" in r.stdout
    diff = float(np.abs(store.open_store(out).field("prediction")[0] - reference(model, x[0], 1, (16,) * 3)).max())
    record("3D two-convolution 16^3, local cluster from the CLI, crop 8", diff)
    assert diff <= TOL
    meta = store.read_meta(out)
    assert meta["complete"] and meta["nsample"] == 1
    assert meta["model"] == "twoconv.TwoConv" and meta["checkpoint"] == os.path.abspath(ckpt)
    assert meta["input_store"] == os.path.abspath(data)
    assert meta["infer"]["crop"] == [8, 8, 8] and meta["infer"]["model_kwargs"] == {"width": 4}
    assert meta["fields"]["prediction"]["shard"] == [8, 8, 8]
    assert not (out / infer.DONE_DIR).exists()
    ds, ds_in = xr.open_zarr(out), xr.open_zarr(data)
    assert ds["prediction"].dims == ds_in["disp"].dims
    np.testing.assert_array_equal(ds["x_16"].values, ds_in["x_16"].values)
    assert ds["source_prediction"].values[0] == ds_in["source_disp"].values[0]
    xr.merge([ds_in, ds])  # same grid, same coordinates: merges without conflicts


def test_m2m_test_writes_out_npy_next_to_targets(cluster, tmp_path):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 1, 24, 24)).astype(np.float32)
    y = rng.standard_normal((2, 1, 24, 24)).astype(np.float32)
    for i in range(2):
        (tmp_path / f"s{i}").mkdir()
        np.save(tmp_path / f"s{i}" / "lin.npy", x[i])
        np.save(tmp_path / f"s{i}" / "nbody.npy", y[i])
    torch.manual_seed(7)
    model = tame(VNet(1, 1, dim=2, width=4))
    ckpt = save_ckpt(model, tmp_path / "v.pt")
    r = run_m2m("test", "--test-in-patterns", str(tmp_path / "s*" / "lin.npy"),
                "--test-tgt-patterns", str(tmp_path / "s*" / "nbody.npy"), "--model", "VNet",
                "--load-state", ckpt, "--model-kwargs", '{"width": 4}', "--crop", "8", "--batch-size", "4",
                "--scheduler", cluster, "--no-progress")
    assert r.returncode == 0, r.stderr
    for i in range(2):
        out = tmp_path / f"s{i}" / "nbody_out.npy"
        assert f"wrote {out}" in r.stdout
        ref = reference(model, x[i], 20, (24, 24))
        diff = float(np.abs(np.load(out) - ref).max())
        record("2D V-Net 24^2 via m2m test, crop 8", diff)
        assert diff <= TOL
        mse = float(np.mean((ref.astype(np.float64) - y[i]) ** 2))
        assert f"sample {i}: MSELoss {mse:.6g}"[:24] in r.stdout
    assert not list(tmp_path.glob("s0/.m2m-test-*")) and not list(tmp_path.glob("s0/*.tmp-*"))
