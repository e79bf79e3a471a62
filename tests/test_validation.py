"""Bad options of `m2m train`, `m2m infer`, `m2m test` and `m2m demo` are refused before any work starts:
one line on stderr, exit status 2, nothing written and nothing already there changed.  A second writer of
the same run directory or output is refused, naming the first (real concurrent processes)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from map2map import demo
from map2map.cli import main
from map2map.errors import UserError
from map2map.models import VNet, build_model, total_stride
from conftest import fails, run_m2m
from stores import za_lpt_store
from test_infer import make_store, save_ckpt

CALLBACKS = '''
import time

from torch import nn


class Tiny(nn.Module):
    """Two 3-voxel convolutions; takes any keyword."""

    def __init__(self, in_chan, out_chan, mid=4, **kwargs):
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(in_chan, mid, 3), nn.LeakyReLU(0.2), nn.Conv3d(mid, out_chan, 3))

    def forward(self, x):
        return self.net(x)


class Strict(Tiny):
    """Names its keywords and takes no others (not even scale_factor)."""

    def __init__(self, in_chan, out_chan, mid=4):
        super().__init__(in_chan, out_chan, mid)
        self.mid = mid


class Slow(Tiny):
    """Each training batch takes at least 0.2 s, so a run of many epochs lasts long enough to meet another."""

    def forward(self, x):
        if self.training:
            time.sleep(0.2)
        return self.net(x)
'''

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("validation")
    (root / "cb").mkdir()
    (root / "cb" / "nets.py").write_text(CALLBACKS)
    rng = np.random.default_rng(0)
    flat = {name: rng.standard_normal((1, 3, 16, 16)).astype(np.float32) for name in ("za", "lpt")}
    return {"train": za_lpt_store(root, "train", 2, 1), "val2d": Path(make_store(root, "val2d", flat, crop=8)),
            "cb": root / "cb", "root": root}


def digest(path: Path) -> str:
    """A hash of every file under `path` (names and contents), or of the file `path`."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(path.parent)).encode() + p.read_bytes())
    return h.hexdigest()




def train_args(data, run_dir: Path, *extra: str, model: str = "nets.Tiny", epochs: int = 1) -> list[str]:
    return ["train", "--train-data", str(data["train"]), "--in", "za", "--tgt", "lpt", "--crop", "8",
            "--in-pad", "2", "--in-norms", "cosmology.dis", "--tgt-norms", "cosmology.dis", "--model", model,
            "--callback-at", str(data["cb"]), "--lr", "1e-2", "--loader-workers", "0", "--epochs", str(epochs),
            "--run-dir", str(run_dir), *extra]


# ---------------------------------------------------------------- m2m train: options out of range

@pytest.mark.parametrize("extra, needles", [
    (["--epochs", "-1"], ["--epochs", "-1"]),
    (["--aug-shift", "-3"], ["--aug-shift", "-3"]),
    (["--aug-shift", "1,-1,1"], ["--aug-shift", "1,-1,1"]),
    (["--crop", "0"], ["crop", "positive"]),
    (["--crop", "-8"], ["crop", "positive"]),
    (["--crop-step", "0"], ["crop_step", "positive"]),
    (["--batch-size", "0"], ["--batch-size", "0"]),
    (["--batch-size", "-2"], ["--batch-size", "-2"]),
    (["--lr", "0"], ["--lr", "positive"]),
    (["--lr", "-0.1"], ["--lr", "-0.1"]),
    (["--lr", "nan"], ["--lr", "nan"]),
    (["--lr", "inf"], ["--lr", "inf"]),
    (["--loader-workers", "-1"], ["--loader-workers", "-1"]),
    (["--log-interval", "0"], ["--log-interval", "0"]),
    (["--aug-add", "-1"], ["--aug-add", "-1"]),
    (["--aug-mul", "nan"], ["--aug-mul", "nan"]),
    (["--scale-factor", "0"], ["scale-factor", "0"]),
])
def test_train_options_out_of_range(data, capsys, tmp_path, extra, needles):
    run_dir = tmp_path / "run"
    fails(capsys, train_args(data, run_dir, *extra), *needles)
    assert not run_dir.exists()


def test_train_zero_epochs_is_nothing_to_do(data, capsys, tmp_path):
    assert main(train_args(data, tmp_path / "run", epochs=0)) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert not list((tmp_path / "run").glob("state_*.pt"))


def test_train_unknown_misc_kwargs_are_refused(data, capsys, tmp_path):
    run_dir = tmp_path / "run"
    line = fails(capsys, train_args(data, run_dir, "--model", "VNet", "--in-pad", "auto", "--misc-kwargs",
                                    '{"widht": 2}'), "--misc-kwargs key 'widht' unknown", "model VNet takes")
    assert "width" in line.split("takes", 1)[1]
    fails(capsys, train_args(data, run_dir, "--misc-kwargs", '{"mdi": 2}', model="nets.Strict"),
          "'mdi' unknown", "model nets.Strict takes mid", "the norms cosmology.dis take", "omega_m")
    assert not run_dir.exists()


def test_train_misc_kwargs_of_the_norms_only_are_fine(data, capsys, tmp_path):
    """A key only a norm takes goes to the norms, not to a model that names its keywords."""
    assert main(train_args(data, tmp_path, "--misc-kwargs", '{"z": 0.5, "mid": 3}', model="nets.Strict")) == 0
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["model"]["net.0.weight"].shape[0] == 3  # mid=3 reached the model
    assert saved["card"]["norm_kwargs"] == {"z": 0.5, "mid": 3}


@pytest.mark.parametrize("width", ["0", "-2"])
def test_train_model_width_not_positive(data, capsys, tmp_path, width):
    run_dir = tmp_path / "run"
    fails(capsys, train_args(data, run_dir, "--model", "VNet", "--in-pad", "auto", "--misc-kwargs",
                             f'{{"width": {width}}}'), "cannot build model VNet(", f"width={width}")
    assert not run_dir.exists()


def test_user_model_failure_names_its_line(data, capsys, tmp_path):
    line = fails(capsys, train_args(data, tmp_path / "run", "--misc-kwargs", '{"mid": -1}'),
                 "error in your code at", "RuntimeError", "building nets.Tiny(", "check --misc-kwargs mid=-1")
    assert f"{data['cb'] / 'nets.py'}:" in line


def test_validation_data_of_another_dimension(data, capsys, tmp_path):
    run_dir = tmp_path / "run"
    for pad in ("2", "auto"):
        line = fails(capsys, train_args(data, run_dir, "--val-data", str(data["val2d"]), "--in-pad", pad),
                     "validation data is 2D, training data is 3D")
        assert "in_pad" not in line
    assert not run_dir.exists()


def test_in_pad_auto_is_printed_only_once_it_fits(data, capsys, tmp_path):
    argv = train_args(data, tmp_path / "run", "--model", "VNet", "--misc-kwargs", '{"width": 1}', "--in-pad",
                      "auto", "--crop", "6")
    status = main(argv)
    captured = capsys.readouterr()
    assert status == 2 and "--in-pad auto" not in captured.out
    assert captured.err.strip().splitlines() == [
        "m2m train: error: crop 6 is not a multiple of the model's total stride 4; use e.g. 4 or 8"]


def test_in_pad_auto_that_cannot_fit_suggests_no_pad(data, capsys, tmp_path):
    line = fails(capsys, train_args(data, tmp_path / "run", "--in-pad", "auto", "--tgt-pad", "0,1,0,1,0,1"),
                 "--in-pad auto:", "odd number of voxels", "--in-pad per side")
    assert "would" not in line
    line = fails(capsys, train_args(data, tmp_path / "run", "--in-pad", "1"), "does not cover")
    assert line.endswith("--in-pad 2 would (or use --in-pad auto)")


# ---------------------------------------------------------------- m2m train: one training per run directory

def test_second_training_in_a_run_directory_is_refused(data, tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "map2map.cli", *train_args(data, run_dir, model="nets.Slow", epochs=1000)]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "state_1.pt").exists():  # the first is under way, holding the lock
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first training wrote no checkpoint"
            time.sleep(0.05)
        before = {p.name: digest(p) for p in run_dir.glob("state_*.pt")}
        logs = sorted(p.name for p in (run_dir / "runs").iterdir())
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert first.poll() is None, "the first training ended before the second was refused"
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert f"{run_dir} is being written by m2m train" in lines[0] and f"pid {first.pid}" in lines[0]
    assert "starting fresh" not in second.stdout and "epoch" not in second.stdout
    for name, value in before.items():  # what the first wrote is untouched
        assert digest(run_dir / name) == value
    assert sorted(p.name for p in (run_dir / "runs").iterdir()) == logs  # no second TensorBoard log


# ---------------------------------------------------------------- build_model: keywords

def test_build_model_keyword_rules():
    from map2map.data.norms import cosmology

    with pytest.raises(UserError, match="'widht' unknown: model VNet takes bypass, identity_init, width"):
        build_model("VNet", 3, 3, scale_factor=1, ndim=3, kwargs={"widht": 2})
    with pytest.raises(UserError, match="--model-kwargs key 'z' unknown"):
        build_model("VNet", 3, 3, scale_factor=1, ndim=3, kwargs={"z": 0}, option="--model-kwargs")
    model = build_model("VNet", 3, 3, scale_factor=1, ndim=3, kwargs={"z": 0, "width": 2}, norms=[cosmology.dis])
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in VNet(3, 3, width=2).parameters())
    with pytest.raises(UserError, match=r"cannot build model G\(.*chan_min=0.*ValueError: G needs 1 <= chan_min.*"
                                        r"check --misc-kwargs chan_min=0"):
        build_model("G", 3, 3, scale_factor=2, ndim=3, kwargs={"chan_min": 0})


# ---------------------------------------------------------------- m2m infer / m2m test

@pytest.fixture(scope="module")
def infer_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer_validation")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 16, 16, 16)).astype(np.float32)
    data = Path(make_store(root, "in", {"disp": x}, crop=8))
    torch.manual_seed(0)
    ckpt = save_ckpt(VNet(3, 3, width=4), root / "vnet.pt")
    return root, data, ckpt


def infer_args(data: Path, ckpt: str, out: Path, *extra: str) -> list[str]:
    return ["infer", "--data", str(data), "--in", "disp", "--model", "VNet", "--model-kwargs", '{"width": 4}',
            "--load-state", ckpt, "--out", str(out), "--crop", "8", "--no-progress", *extra]


def test_infer_output_inside_equal_to_or_containing_the_input(infer_setup, capsys):
    root, data, ckpt = infer_setup
    before = digest(data)
    fails(capsys, infer_args(data, ckpt, data / "pred.zarr"), "--out", "is inside the input")
    fails(capsys, infer_args(data, ckpt, data), "--out", "is the input")
    fails(capsys, infer_args(data, ckpt, root), "--out", "contains the input")
    fails(capsys, infer_args(data, ckpt, Path(ckpt)), "--out", "is the input")
    assert digest(data) == before
    assert not (data / "pred.zarr").exists()


def test_infer_output_being_written_by_another_is_refused(infer_setup, capsys, tmp_path):
    root, data, ckpt = infer_setup
    out = tmp_path / "pred.zarr"
    before = digest(data)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom map2map.utils.locks import writer_lock\n"
         "with writer_lock(sys.argv[1], 'm2m infer'):\n    print('locked', flush=True)\n    time.sleep(600)\n",
         str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        fails(capsys, infer_args(data, ckpt, out), f"{out} is being written by m2m infer", f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists() and digest(data) == before


def test_infer_unknown_model_kwargs(infer_setup, capsys, tmp_path):
    root, data, ckpt = infer_setup
    argv = infer_args(data, ckpt, tmp_path / "o.zarr")
    argv[argv.index('{"width": 4}')] = '{"widht": 4}'
    fails(capsys, argv, "--model-kwargs key 'widht' unknown", "model VNet takes")
    assert not (tmp_path / "o.zarr").exists()


@pytest.mark.parametrize("value", ["-1", "0", "1-1", "nan"])
def test_connect_timeout_must_be_positive(infer_setup, capsys, tmp_path, value):
    root, data, ckpt = infer_setup
    with pytest.raises(SystemExit) as exc:
        main(infer_args(data, ckpt, tmp_path / "o.zarr", "--connect-timeout", value))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--connect-timeout" in err[0] and "positive number" in err[0]


def _npy_pairs(root: Path, x: np.ndarray, y: np.ndarray) -> tuple[str, str]:
    for i in range(len(x)):
        (root / f"s{i}").mkdir(parents=True, exist_ok=True)
        np.save(root / f"s{i}" / "lin.npy", x[i])
        np.save(root / f"s{i}" / "nbody.npy", y[i])
    return str(root / "s*" / "lin.npy"), str(root / "s*" / "nbody.npy")


def test_m2m_test_refuses_nonfinite_inputs_unless_allowed(cluster, capsys, tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 1, 16, 16)).astype(np.float32)
    x[1, 0, 3, 4:7] = [np.nan, np.inf, -np.inf]
    y = rng.standard_normal((2, 1, 16, 16)).astype(np.float32)
    ins, tgts = _npy_pairs(tmp_path, x, y)
    torch.manual_seed(1)
    ckpt = save_ckpt(VNet(1, 1, dim=2, width=2), tmp_path / "v.pt")
    argv = ["test", "--test-in-patterns", ins, "--test-tgt-patterns", tgts, "--model", "VNet", "--load-state", ckpt,
            "--model-kwargs", '{"width": 2}', "--crop", "8", "--scheduler", cluster, "--no-progress"]
    before = {p: digest(p) for p in tmp_path.rglob("*.npy")}
    fails(capsys, argv, f"{tmp_path / 's1' / 'lin.npy'} has 3 non-finite values", "--allow-nonfinite")
    assert {p: digest(p) for p in tmp_path.rglob("*.npy")} == before  # nothing written, nothing changed
    assert not list(tmp_path.glob("s*/.m2m-test-*"))

    assert main(argv + ["--allow-nonfinite"]) == 0, capsys.readouterr().err
    good, bad = np.load(tmp_path / "s0" / "nbody_out.npy"), np.load(tmp_path / "s1" / "nbody_out.npy")
    assert np.isfinite(good).all() and not np.isfinite(bad).all()


def test_m2m_test_names_values_too_large_for_float32(capsys, tmp_path):
    x = np.zeros((1, 1, 16, 16))
    x[0, 0, 0, :2] = 1e39
    ins, tgts = _npy_pairs(tmp_path, x, np.zeros((1, 1, 16, 16), np.float32))
    ckpt = save_ckpt(VNet(1, 1, dim=2, width=2), tmp_path / "v.pt")
    fails(capsys, ["test", "--test-in-patterns", ins, "--test-tgt-patterns", tgts, "--model", "VNet",
                   "--load-state", ckpt, "--model-kwargs", '{"width": 2}', "--crop", "8", "--no-progress"],
          "has 2 values too large for float32")


# ---------------------------------------------------------------- m2m demo

@pytest.mark.parametrize("extra, needles", [
    (["--workers", "0"], ["--workers 0"]),
    (["--epochs", "0"], ["--epochs 0", "checkpoint"]),
    (["--width", "0"], ["--width 0", "V-Net"]),
    (["--width", "-4"], ["--width -4", "V-Net"]),
    (["--train-boxes", "0"], ["--train-boxes 0"]),
    (["--batch-size", "0"], ["--batch-size 0"]),
    (["--ngrid", "40"], ["--ngrid 40", "--crop 32", "--ngrid 32"]),
    (["--ngrid", "16"], ["--ngrid 16", "--crop 32"]),
    (["--crop", "30", "--ngrid", "60"], ["--crop 30", "multiple of 4"]),
    (["--lr", "-1"], ["--lr -1"]),
    (["--boxsize", "nan"], ["--boxsize nan"]),
    (["--seed", "-1"], ["--seed -1"]),
])
def test_demo_options_are_checked_before_the_first_step(capsys, tmp_path, extra, needles):
    out = tmp_path / "demo"
    fails(capsys, ["demo", str(out), *extra], *needles)
    assert not out.exists()


def test_demo_output_that_cannot_be_a_directory(capsys, tmp_path):
    (tmp_path / "file").write_text("keep")
    fails(capsys, ["demo", str(tmp_path / "file")], "OUTDIR", "not a directory")
    fails(capsys, ["demo", str(tmp_path / "file" / "demo")], "OUTDIR", "cannot be created")
    assert (tmp_path / "file").read_text() == "keep"


def test_demo_fails_fast_without_the_heavy_imports(tmp_path):
    """The demo's own options are checked before torch, Dask or zarr are imported (so it fails at once)."""
    code = ("import sys\nfrom map2map.cli import main\nstatus = main(['demo', sys.argv[1], '--workers', '0'])\n"
            "print(status, sorted(m for m in ('torch', 'distributed', 'zarr') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "demo")], capture_output=True, text=True,
                       timeout=120)
    assert r.stdout.split() == ["2", "[]"], r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_demo_stride_is_the_vnets():
    assert total_stride(VNet(3, 3, width=1)) == demo.VNET_STRIDE


def test_demo_large_grid_is_refused_for_its_memory(capsys, tmp_path):
    fails(capsys, ["demo", str(tmp_path / "demo"), "--ngrid", "65536", "--crop", "64"], "--ngrid 65536", "memory")
    assert not (tmp_path / "demo").exists()


def test_cli_one_line_as_users_see_it(data, tmp_path):
    r = run_m2m(*train_args(data, tmp_path / "run", "--epochs", "-1"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "m2m train: error: --epochs must be 0 or more (the total number of epochs), got -1"]
