"""`m2m train` in this process: learning, exact resume, TensorBoard events, checkpoints and bad input.

Tiny problems only: 16^3 synthetic 1LPT -> 2LPT displacements in a converted
store, crops of 8, and a two-layer conv net from a `--callback-at` directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from map2map import convert, synth
from map2map.cli import build_parser, main
from map2map.cli.configs import stage_of
from map2map.models import VNet
from stores import za_lpt_store

CALLBACKS = '''
import torch
from torch import nn


class Tiny(nn.Module):
    """Two 3-voxel convolutions (pad 2), optional dropout to exercise the torch RNG."""

    def __init__(self, in_chan, out_chan, mid=8, dropout=0.0, **kwargs):
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(in_chan, mid, 3), nn.LeakyReLU(0.2), nn.Dropout3d(dropout),
                                 nn.Conv3d(mid, out_chan, 3))

    def forward(self, x):
        return self.net(x)


class NanAfter(nn.MSELoss):
    """Mean squared error that becomes NaN from its 11th call on."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, a, b):
        self.calls += 1
        loss = super().forward(a, b)
        return loss * float("nan") if self.calls >= 11 else loss
'''


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return make_data(tmp_path_factory.mktemp("train_data"))


def make_data(root: Path) -> dict[str, Path]:
    """Training and validation stores (16^3 1LPT -> 2LPT) and the callback module with the tiny models."""
    (root / "cb").mkdir()
    (root / "cb" / "nets.py").write_text(CALLBACKS)
    return {"train": za_lpt_store(root, "train", 2, 1), "val": za_lpt_store(root, "val", 1, 2), "cb": root / "cb",
            "npy": root / "train_npy"}


def base(data, *extra: str, epochs: int = 2) -> list[str]:
    return ["train", "--train-data", str(data["train"]), "--in", "za", "--tgt", "lpt", "--crop", "8",
            "--in-pad", "2", "--in-norms", "cosmology.dis", "--tgt-norms", "cosmology.dis",
            "--model", "nets.Tiny", "--callback-at", str(data["cb"]), "--lr", "1e-2", "--batch-size", "2",
            "--loader-workers", "0", "--epochs", str(epochs), *extra]


def run(argv: list[str], run_dir: Path) -> list:
    """`m2m train ARGV --run-dir RUN_DIR` through the CLI's own config builder; the epoch records."""
    module, config = stage_of(build_parser().parse_args([*argv, "--run-dir", str(run_dir)]))
    return module.run(config).epochs


def state(path: Path | str) -> dict:
    return torch.load(path, weights_only=True)


# ---------------------------------------------------------------- learning

def test_loss_goes_down_on_za_to_2lpt(data, tmp_path, capsys):
    rd = tmp_path
    history = run(base(data, "--val-data", str(data["val"]), "--in-pad", "auto", "--misc-kwargs", '{"mid": 16}',
                       epochs=6), rd)
    out = capsys.readouterr().out
    assert "--in-pad auto: 2" in out
    train_loss = [h["train_loss"] for h in history]
    val_loss = [h["val_loss"] for h in history]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert train_loss[-1] < 0.25 * train_loss[0], train_loss
    assert val_loss[-1] < 0.5 * val_loss[0], val_loss
    # one log line per epoch with loss, items/s and the data-wait fraction
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 6
    assert re.fullmatch(r"epoch 6/6: train loss \S+, val loss \S+, lr 0\.01, [\d.]+ items/s, data wait [\d.]+%; "
                        r"saved state_6\.pt", lines[-1])
    assert f"train loss {train_loss[-1]:.4e}, val loss {val_loss[-1]:.4e}" in lines[-1]
    assert os.readlink(rd / "checkpoint.pt") == "state_6.pt"
    saved = state(rd / "checkpoint.pt")
    assert saved["epoch"] == 6 and saved["min_loss"] == min(val_loss)
    assert saved["card"]["in_pad"] == [[2, 2]] * 3 and saved["card"]["in_chans"] == [3]
    assert saved["card"]["model"] == "nets.Tiny" and saved["card"]["model_kwargs"] == {"mid": 16}
    assert saved["config"]["model"] == "nets.Tiny" and saved["config"]["in_pad"] == "auto"


def test_package_model_by_name_with_misc_kwargs_and_auto_pad(data, tmp_path, capsys):
    rd = tmp_path
    argv = base(data, "--model", "VNet", "--misc-kwargs", '{"width": 2}', "--in-pad", "auto", "--crop-stop", "1",
                epochs=1)
    history = run(argv, rd)
    out = capsys.readouterr().out
    assert "--in-pad auto: 20" in out and "total stride 4" in out
    assert len(history) == 1 and history[0]["train_loss"] > 0
    saved = state(rd / "state_1.pt")
    assert saved["card"]["in_pad"] == [[20, 20]] * 3 and saved["card"]["total_stride"] == 4
    expect = VNet(3, 3, width=2).state_dict()  # width 2 from --misc-kwargs
    assert {k: v.shape for k, v in saved["model"].items()} == {k: v.shape for k, v in expect.items()}


def test_super_resolution_with_target_pad(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for i in range(2):
        np.save(tmp_path / f"lr_{i}.npy", rng.standard_normal((1, 16, 16, 16), dtype=np.float32))
        np.save(tmp_path / f"hr_{i}.npy", rng.standard_normal((1, 32, 32, 32), dtype=np.float32))
    convert.run(convert.ConvertConfig(output=str(tmp_path / "sr.zarr"), field=(f"lr={tmp_path}/lr_*.npy",
                                                                               f"hr={tmp_path}/hr_*.npy"),
                                      crop=(8,), pad=4, boxsize=64.0, progress=False))
    rd = tmp_path / "work"
    history = run(["train", "--train-data", str(tmp_path / "sr.zarr"), "--in", "lr", "--tgt", "hr", "--crop", "8",
                   "--crop-stop", "9", "--scale-factor", "2", "--tgt-pad", "2", "--in-pad", "auto", "--model", "G",
                   "--misc-kwargs", '{"chan_base": 4, "chan_min": 4}', "--lr", "1e-3", "--loader-workers", "0",
                   "--epochs", "1", "--detect-anomaly"], rd)
    out = capsys.readouterr().out
    assert "--in-pad auto: 3" in out  # G maps 8 + 2*3 = 14 voxels onto 2*14 - 6 = 22 >= 2*8 + 2*2, excess even
    assert "input [1, 14, 14, 14] -> output [1, 22, 22, 22], target crop [1, 16, 16, 16]" in out
    assert len(history) == 1 and np.isfinite(history[0]["train_loss"])
    assert state(rd / "state_1.pt")["card"]["scale_factor"] == 2


def test_npy_patterns_work_like_a_store(data, tmp_path):
    rd = tmp_path
    npy = data["npy"]
    argv = ["train", "--train-in-patterns", f"{npy}/*/dis_za.npy", "--train-tgt-patterns", f"{npy}/*/dis_2lpt.npy",
            "--crop", "8", "--in-pad", "2", "--in-norms", "cosmology.dis", "--tgt-norms", "cosmology.dis",
            "--model", "nets.Tiny", "--callback-at", str(data["cb"]), "--lr", "1e-2", "--batch-size", "2",
            "--loader-workers", "0", "--epochs", "1"]
    from_npy = run(argv, rd)
    rd = tmp_path / "store"
    from_store = run(base(data, epochs=1), rd)
    assert from_npy[0]["train_loss"] == from_store[0]["train_loss"]


# ---------------------------------------------------------------- exact resume

@pytest.mark.parametrize("workers", ["0", "1"])
def test_four_epochs_equal_two_plus_two(data, tmp_path, workers):
    extra = ["--augment", "--aug-shift", "2", "--aug-add", "0.01", "--aug-mul", "0.01", "--loader-workers", workers,
             "--misc-kwargs", '{"dropout": 0.2}', "--val-data", str(data["val"]), "--reduce-lr-on-plateau",
             "--scheduler-args", '{"patience": 0, "threshold": 0.2, "factor": 0.5}']
    rd = tmp_path / "straight"
    straight = run(base(data, *extra, epochs=4), rd)
    rd = tmp_path / "resumed"
    first = run(base(data, *extra, epochs=2), rd)
    second = run(base(data, *extra, epochs=4), rd)
    assert [h["epoch"] for h in second] == [3, 4]
    for a, b in zip(straight, first + second):
        assert (a["train_loss"], a["val_loss"], a["lr"]) == (b["train_loss"], b["val_loss"], b["lr"])
    a, b = state(tmp_path / "straight" / "state_4.pt"), state(tmp_path / "resumed" / "state_4.pt")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for key in pa:
            assert torch.equal(torch.as_tensor(pa[key]), torch.as_tensor(pb[key])), key
    assert a["scheduler"] == b["scheduler"] and a["min_loss"] == b["min_loss"]
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


@pytest.mark.parametrize("batch_size", ["1", "2"])
def test_loader_workers_lend_large_items_unchanged(tmp_path, batch_size):
    """Items of 1 MiB and more travel from workers through lent shared memory: the same losses as without workers."""
    (tmp_path / "cb").mkdir()
    (tmp_path / "cb" / "nets.py").write_text(CALLBACKS)
    synth.run(synth.SynthConfig(outdir=str(tmp_path / "npy"), num_samples=2, ngrid=48, seed=3))
    convert.run(convert.ConvertConfig(output=str(tmp_path / "big.zarr"), progress=False,
                                      field=(f"za={tmp_path}/npy/*/dis_za.npy", f"lpt={tmp_path}/npy/*/dis_2lpt.npy")))
    argv = ["train", "--train-data", str(tmp_path / "big.zarr"), "--in", "za", "--tgt", "lpt", "--crop", "48",
            "--in-pad", "2", "--model", "nets.Tiny", "--callback-at", str(tmp_path / "cb"), "--augment",
            "--batch-size", batch_size, "--epochs", "2", "--lr", "1e-3", "--misc-kwargs", '{"mid": 2}']
    assert 3 * 52 ** 3 * 4 >= 2**20  # an input item is large enough to be lent
    runs = {}
    for workers in ("0", "2"):
        rd = tmp_path / f"w{workers}"
        runs[workers] = run(argv + ["--loader-workers", workers], rd)
    for a, b in zip(runs["0"], runs["2"]):
        assert a["batch_losses"] == b["batch_losses"] and a["train_loss"] == b["train_loss"]


def test_resume_past_the_last_epoch_does_nothing(data, tmp_path, capsys):
    rd = tmp_path
    run(base(data, epochs=1), rd)
    assert run(base(data, epochs=1), rd) == []
    assert "nothing to do" in capsys.readouterr().out


# ---------------------------------------------------------------- TensorBoard

def _events(root: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = [p for p in (root / "runs").iterdir()]
    assert len(runs) == 1
    acc = EventAccumulator(str(runs[0]), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_tensorboard_logs_losses_lr_slices_and_spectra(data, tmp_path):
    rd = tmp_path
    history = run(base(data, "--val-data", str(data["val"]), "--log-interval", "3", epochs=2), rd)
    acc = _events(tmp_path)
    tags = acc.Tags()
    assert {"loss/batch/train", "loss/epoch/train", "loss/epoch/val", "lr"} <= set(tags["scalars"])
    slices = {f"slice/{split}/{name}" for split in ("train", "val")
              for name in ("input", "output", "target", "difference")}
    assert set(tags["images"]) == slices | {"power/val"}
    batch = [(e.step, e.value) for e in acc.Scalars("loss/batch/train")]
    logged = [bl for h in history for bl in h["batch_losses"]]
    assert [s for s, _ in batch] == [3, 6, 9, 12, 15] == [s for s, _ in logged]  # 8 batches per epoch
    assert [v for _, v in batch] == pytest.approx([v for _, v in logged], rel=1e-6)
    for tag, key in (("loss/epoch/train", "train_loss"), ("loss/epoch/val", "val_loss"), ("lr", "lr")):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2]
        assert [e.value for e in events] == pytest.approx([h[key] for h in history], rel=1e-6)
    images = acc.Images("slice/train/difference")
    assert [im.step for im in images] == [1, 2] and images[0].width == images[0].height >= 128
    assert [im.step for im in acc.Images("power/val")] == [1, 2]


# ---------------------------------------------------------------- scheduler and initialization

def test_init_weight_std_and_plateau_with_default_scheduler_args(data, tmp_path):
    rd = tmp_path
    run(base(data, "--init-weight-std", "0.05", "--reduce-lr-on-plateau", "--lr", "1e-9", "--misc-kwargs",
             '{"mid": 32}', epochs=1), rd)
    saved = state(rd / "state_1.pt")
    w = saved["model"]["net.0.weight"]
    assert abs(w.std().item() - 0.05) < 0.005 and abs(w.mean().item()) < 0.005
    assert saved["model"]["net.0.bias"].abs().max() < 1e-6  # zeroed, then moved by lr 1e-9
    assert saved["scheduler"]["patience"] == 10 and saved["scheduler"]["factor"] == 0.1  # torch's defaults


def test_plateau_reduces_lr_and_old_verbose_argument_is_dropped(data, tmp_path, capsys):
    rd = tmp_path
    history = run(base(data, "--reduce-lr-on-plateau", "--scheduler-args",
                       '{"verbose": true, "patience": 0, "threshold": 0.99, "factor": 0.5}', epochs=3), rd)
    assert [h["lr"] for h in history] == [1e-2, 1e-2, 5e-3]  # later epochs never improve 100x: halved after 2
    out = capsys.readouterr().out
    assert "'verbose' is no longer a torch option" in out and "learning rate reduced from 0.01 to 0.005" in out


# ---------------------------------------------------------------- failures

def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, capsys):
    rd = tmp_path
    assert main([*base(data, "--criterion", "nets.NanAfter", epochs=3), "--run-dir", str(rd)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "m2m train: error: loss is nan at epoch 2 batch 3; stopping; the last good checkpoint is state_1.pt"
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".pt") == ["checkpoint.pt", "state_1.pt"]
    assert os.readlink(rd / "checkpoint.pt") == "state_1.pt"


def test_checkpoint_with_other_channels_lists_mismatched_keys(data, tmp_path, capsys):
    rd = tmp_path
    run(base(data, epochs=1), rd)
    more = [*base(data, epochs=2), "--run-dir", str(rd)]
    more[more.index("za")] = "za,lpt"
    more[more.index("cosmology.dis")] = "cosmology.dis,cosmology.dis"
    capsys.readouterr()
    assert main(more) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"m2m train: error: {rd / 'checkpoint.pt'} does not fit the model")
    assert "net.0.weight is [8, 3, 3, 3, 3] in the checkpoint but [8, 6, 3, 3, 3] in the model" in err
    assert "--load-state-non-strict" in err
    assert main(more + ["--load-state-non-strict"]) == 0
    out = capsys.readouterr().out
    assert "net.0.weight" in out and "resuming from state_1.pt after epoch 1" in out


def _in_run_dir(make, rd: Path):
    return lambda *a, **k: [*make(*a, **k), "--run-dir", str(rd)]


def one_line_error(capsys, argv: list[str]) -> str:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_is_one_line(data, tmp_path, capsys):
    rd = tmp_path
    mk = _in_run_dir(base, rd)
    err = one_line_error(capsys, mk(data, "--model", "NoSuchNet"))
    assert "unknown model 'NoSuchNet'" in err and "map2map.models" in err and "needs module.NoSuchNet" in err
    err = one_line_error(capsys, mk(data, "--model", "nets.NoSuchNet"))
    assert "unknown model 'nets.NoSuchNet'" in err and "nets.py in" in err
    err = one_line_error(capsys, mk(data, "--criterion", "NoLoss"))
    assert "unknown criterion 'NoLoss'" in err and "torch.nn" in err
    err = one_line_error(capsys, mk(data, "--optimizer", "NoOpt"))
    assert "unknown optimizer 'NoOpt'" in err and "torch.optim" in err
    err = one_line_error(capsys, mk(data, "--misc-kwargs", "{width: 4}"))
    assert "--misc-kwargs" in err and "not JSON" in err
    err = one_line_error(capsys, mk(data, "--optimizer-args", '{"betas": 3}'))
    assert "--optimizer-args" in err
    err = one_line_error(capsys, mk(data, "--in-pad", "1"))
    assert "does not cover the target crop [8, 8, 8]" in err and "--in-pad 2 would" in err
    err = one_line_error(capsys, mk(data, "--model", "UNet", "--crop", "6", "--in-pad", "20"))
    assert "crop 6 is not a multiple of the model's total stride 4" in err
    err = one_line_error(capsys, mk(data, "--model", "UNet", "--crop-step", "6", "--in-pad", "20"))
    assert "crop step 6 is not a multiple of the model's total stride 4" in err
    err = one_line_error(capsys, mk(data, "--model", "UNet", "--in-pad", "19"))
    assert "not a multiple of the model's total stride 4" in err and "--in-pad 20 would" in err
    err = one_line_error(capsys, mk(data, "--model", "UNet", "--in-pad", "16"))
    assert "cannot run an input of [40, 40, 40]" in err and "--in-pad 20 would" in err
    err = one_line_error(capsys, mk(data, "--in", "nope"))
    assert "no field 'nope'" in err
    err = one_line_error(capsys, mk(data, "--val-data", str(tmp_path / "missing.zarr")))
    assert "does not exist" in err
    assert not list(tmp_path.glob("*.pt")) and not (tmp_path / "runs").exists()


def test_help_shows_the_original_option_names(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for opt in ("--train-data", "--val-data", "--in ", "--tgt ", "--train-in-patterns", "--train-tgt-patterns",
                "--val-in-patterns", "--val-tgt-patterns", "--in-norms", "--tgt-norms", "--crop ", "--crop-start",
                "--crop-stop", "--crop-step", "--in-pad", "--tgt-pad", "--scale-factor", "--augment", "--aug-shift",
                "--aug-add", "--aug-mul", "--model", "--criterion", "--optimizer ", "--lr", "--optimizer-args",
                "--reduce-lr-on-plateau", "--scheduler-args", "--init-weight-std", "--batch-size",
                "--loader-workers", "--epochs", "--seed", "--div-data", "--div-shuffle-dist", "--dist-backend",
                "--log-interval", "--load-state", "--load-state-non-strict", "--callback-at", "--misc-kwargs",
                "--detect-anomaly"):
        assert opt in text, opt
