"""`m2m train --adv-model`: each adversarial option doing what it says, exact resume, TensorBoard, checkpoints
and bad input.

The same tiny problem as tests/test_train.py (16^3 1LPT -> 2LPT displacements, crops of 8, batches of 2:
8 batches per epoch), with a generator and a discriminator from a `--callback-at` module that record what
they see in the module's `RECORD`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from map2map.cli import build_parser, main
from map2map.cli.configs import stage_of
from map2map.utils.imports import import_attr
from stores import za_lpt_store

CALLBACKS = '''
import atexit
import os

import torch
from torch import nn

RECORD = {"g_grad": [], "d_in": [], "d_built": [], "labels": []}


class Gen(nn.Module):
    """Two 3-voxel convolutions (pad 2); records, per training forward pass, whether it builds a graph."""

    def __init__(self, in_chan, out_chan, **kwargs):
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(in_chan, 8, 3), nn.LeakyReLU(0.2), nn.Conv3d(8, out_chan, 3))

    def forward(self, x):
        if self.training:
            RECORD["g_grad"].append(torch.is_grad_enabled())
        return self.net(x)


class Disc(nn.Module):
    """A tiny patch discriminator; records its input channels and every input it scores."""

    def __init__(self, in_chan, out_chan=1, dim=3, dump=False, **kwargs):
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(in_chan, 4, 3), nn.LeakyReLU(0.2), nn.Conv3d(4, out_chan, 3))
        RECORD["d_built"].append(in_chan)
        if os.environ.get("DUMP_DISC"):
            atexit.register(self._dump)

    def forward(self, x):
        RECORD["d_in"].append(x.detach().clone())
        return self.net(x)

    def _dump(self):
        params = {k: v.detach().clone() for k, v in self.state_dict().items()}
        torch.save(params, f"disc_rank{os.environ.get('RANK', 0)}.pt")


class NanFrom5(nn.BCEWithLogitsLoss):
    """BCE with logits that becomes NaN from its 5th call on."""

    calls = 0

    def forward(self, input, target):
        NanFrom5.calls += 1
        loss = super().forward(input, target)
        return loss * float("nan") if NanFrom5.calls >= 5 else loss


class Labels(nn.BCEWithLogitsLoss):
    """BCE with logits that records the labels it is asked for."""

    def forward(self, input, target):
        RECORD["labels"].append(sorted(set(target.flatten().tolist())))
        return super().forward(input, target)
'''

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adv_data")
    (root / "cb").mkdir()
    (root / "cb" / "nets.py").write_text(CALLBACKS)
    return {"train": za_lpt_store(root, "train", 2, 1), "cb": root / "cb"}


def base(data, *extra: str, epochs: int = 2) -> list[str]:
    return ["train", "--train-data", str(data["train"]), "--in", "za", "--tgt", "lpt", "--crop", "8",
            "--in-pad", "2", "--in-norms", "cosmology.dis", "--tgt-norms", "cosmology.dis",
            "--model", "nets.Gen", "--callback-at", str(data["cb"]), "--lr", "1e-3", "--batch-size", "2",
            "--loader-workers", "0", "--epochs", str(epochs), *extra]


def adv(data, *extra: str, epochs: int = 2) -> list[str]:
    return base(data, "--adv-model", "nets.Disc", *extra, epochs=epochs)


def run(argv: list[str], run_dir: Path) -> list:
    module, config = stage_of(build_parser().parse_args([*argv, "--run-dir", str(run_dir)]))
    return module.run(config).epochs


def record(data) -> dict:
    """The callback module's RECORD, emptied (tests do not depend on each other's traces)."""
    rec = import_attr("nets.RECORD", [], str(data["cb"]))
    for v in rec.values():
        v.clear()
    return rec


def scored(rec) -> list[torch.Tensor]:
    """The discriminator's training inputs: those after the one zero sample it is tried on when built."""
    probe, *rest = rec["d_in"]
    assert probe.shape[0] == 1 and not probe.any()
    return rest


def state(path) -> dict:
    return torch.load(path, weights_only=True)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted((run_dir / "runs").iterdir())
    out: dict[str, list] = {}
    for r in runs:
        acc = EventAccumulator(str(r), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


# ---------------------------------------------------------------- options doing what they say

def test_tensorboard_has_losses_penalty_and_scores_and_r1_at_its_interval(data, tmp_path):
    history = run(adv(data, "--adv-r1-reg-interval", "3", "--log-interval", "2"), tmp_path)
    tags = scalars(tmp_path)
    for key in ("D", "D/fake", "D/real", "G"):
        assert [s for s, _ in tags[f"loss/batch/train/adv/{key}"]] == [2, 4, 6, 8, 10, 12, 14, 16]
        assert [s for s, _ in tags[f"loss/epoch/train/adv/{key}"]] == [1, 2]
    assert [s for s, _ in tags["score/batch/train/real"]] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert [s for s, _ in tags["score/epoch/train/fake"]] == [1, 2]
    r1 = tags["loss/batch/train/adv/r1"]
    assert [s for s, _ in r1] == [3, 6, 9, 12, 15] and all(v > 0 for _, v in r1)
    assert history[1]["adv"]["r1"] == pytest.approx((r1[2][1] + r1[3][1] + r1[4][1]) / 3, rel=1e-6)
    assert "loss/batch/train/adv/gp" not in tags and "adv/batch/instance_noise" not in tags
    # the logged epoch values are the records'
    for epoch, (_, v) in enumerate(tags["loss/epoch/train/adv/D"]):
        assert v == pytest.approx(history[epoch]["adv"]["D"], rel=1e-6)
    # the supervised loss is still the training loss logged
    assert [s for s, _ in tags["loss/epoch/train"]] == [1, 2]


def test_instance_noise_decays_to_zero_after_its_batches(data, tmp_path):
    run(adv(data, "--instance-noise", "0.5", "--instance-noise-batches", "4", "--log-interval", "1"), tmp_path)
    stds = [v for _, v in scalars(tmp_path)["adv/batch/instance_noise"]]
    assert stds == pytest.approx([0.375, 0.25, 0.125] + [0.0] * 13)
    assert state(tmp_path / "state_2.pt")["adv"]["noise"] == {"init_std": 0.5, "batches": 4, "drawn": 16}


def test_label_smoothing_is_the_real_label(data, tmp_path):
    rec = record(data)
    run(adv(data, "--adv-criterion", "nets.Labels", "--adv-label-smoothing", "0.9", epochs=1), tmp_path)
    # per batch: the discriminator's fake (0) and real (0.9) terms, then the generator's (1)
    assert rec["labels"] == [[0.0], [pytest.approx(0.9)], [1.0]] * 8


def test_adv_start_delays_the_adversary(data, tmp_path):
    plain = run(base(data, epochs=1), tmp_path / "plain")
    rec = record(data)
    delayed = run(adv(data, "--adv-start", "1", "--log-interval", "1"), tmp_path / "delayed")
    assert delayed[0]["train_loss"] == plain[0]["train_loss"] and delayed[0]["adv"] is None
    assert delayed[1]["adv"] is not None
    assert len(scored(rec)) == 8 * 3  # second epoch only: fake, real, generator pass
    assert [s for s, _ in scalars(tmp_path / "delayed")["loss/batch/train/adv/D"]] == list(range(9, 17))
    # the plain epoch did not touch the discriminator: its weights in state_1 are those built
    torch.manual_seed(42 + 1)
    built = import_attr("nets.Disc", [], str(data["cb"]))(3)
    saved = state(tmp_path / "delayed" / "state_1.pt")["adv"]["model"]
    assert all(torch.equal(saved[k], v) for k, v in built.state_dict().items())


def test_cgan_feeds_the_input_to_the_discriminator(data, tmp_path):
    rec = record(data)
    run(adv(data, "--cgan", epochs=1), tmp_path)
    assert rec["d_built"] == [6]  # 3 input channels in front of 3 target channels
    fake, real = scored(rec)[:2]
    assert fake.shape == real.shape == (2, 6, 8, 8, 8)
    assert torch.equal(fake[:, :3], real[:, :3]) and not torch.equal(fake[:, 3:], real[:, 3:])
    # the condition is the input crop without its pad: the normalized 1LPT displacement, close to the target
    assert (real[:, :3] - real[:, 3:]).abs().mean() < 0.5 * real[:, 3:].abs().mean()
    rec = record(data)
    run(adv(data, epochs=1), tmp_path / "unconditional")
    assert rec["d_built"] == [3] and scored(rec)[0].shape[1] == 3


def test_spectral_norm_is_on_the_discriminators_layers(data, tmp_path):
    run(adv(data, "--adv-model-spectral-norm", epochs=1), tmp_path)
    keys = set(state(tmp_path / "state_1.pt")["adv"]["model"])
    for layer in ("net.0", "net.2"):
        assert {f"{layer}.weight_orig", f"{layer}.weight_u", f"{layer}.weight_v", f"{layer}.bias"} <= keys
    assert not any(k.endswith(".weight") for k in keys)


def test_iteration_ratio_is_respected(data, tmp_path):
    rec = record(data)
    history = run(adv(data, "--adv-iter-ratio", "4", "--adv-criterion", "WDistLoss", "--adv-wgan-gp-interval", "2",
                      "--log-interval", "1", epochs=1), tmp_path)
    # the generator builds a graph (steps) at batches 4 and 8 only; every batch steps the critic
    assert rec["g_grad"] == [False, False, False, True] * 2
    # per batch the critic scores fake and real, every 2nd batch the penalty's mixture, every 4th the generator
    assert len(scored(rec)) == 8 * 2 + 4 + 2
    tags = scalars(tmp_path)
    assert [s for s, _ in tags["loss/batch/train/adv/G"]] == [4, 8]
    assert [s for s, _ in tags["loss/batch/train/adv/D"]] == list(range(1, 9))
    assert [s for s, _ in tags["loss/batch/train/adv/gp"]] == [2, 4, 6, 8]
    assert set(history[0]["adv"]) >= {"D", "G", "gp", "score/real", "score/fake"}


def test_adv_weight_adds_the_supervised_loss(data, tmp_path):
    """With --adv-weight 0 the generator learns from the supervised loss alone: the same training losses as
    without an adversary."""
    plain = run(base(data), tmp_path / "plain")
    weighted = run(adv(data, "--adv-weight", "0"), tmp_path / "weighted")
    assert [h["train_loss"] for h in weighted] == [h["train_loss"] for h in plain]
    alone = run(adv(data), tmp_path / "alone")
    assert alone[1]["train_loss"] != plain[1]["train_loss"]


def test_patchgan_by_name_trains(data, tmp_path, capsys):
    history = run(base(data, "--crop", "16", "--adv-model", "PatchGAN", "--adv-model-spectral-norm", "--cgan",
                       epochs=1), tmp_path)
    assert "adversary PatchGAN:" in capsys.readouterr().out
    assert history[0]["adv"]["D"] > 0
    assert state(tmp_path / "state_1.pt")["adv"]["model"]["convs.0.convs.0.weight_orig"].shape[1] == 6


# ---------------------------------------------------------------- checkpoints

def test_four_epochs_equal_two_plus_two_with_the_adversary(data, tmp_path):
    extra = ["--augment", "--adv-r1-reg-interval", "3", "--instance-noise", "0.3", "--instance-noise-batches",
             "20", "--adv-model-spectral-norm", "--cgan", "--adv-iter-ratio", "2", "--reduce-lr-on-plateau",
             "--adv-lr", "2e-3", "--adv-optimizer-args", '{"betas": [0.5, 0.9]}']
    straight = run(adv(data, *extra, epochs=4), tmp_path / "straight")
    first = run(adv(data, *extra, epochs=2), tmp_path / "resumed")
    second = run(adv(data, *extra, epochs=4), tmp_path / "resumed")
    assert [h["epoch"] for h in second] == [3, 4]
    for a, b in zip(straight, first + second):
        assert (a["train_loss"], a["adv"], a["lr"]) == (b["train_loss"], b["adv"], b["lr"])
    a, b = state(tmp_path / "straight" / "state_4.pt"), state(tmp_path / "resumed" / "state_4.pt")
    for part in (a["model"], a["adv"]["model"]):
        other = b["model"] if part is a["model"] else b["adv"]["model"]
        assert part.keys() == other.keys()
        for key in part:
            assert torch.equal(part[key], other[key]), key
    for pa, pb in zip(a["adv"]["optimizer"]["state"].values(), b["adv"]["optimizer"]["state"].values()):
        for key in pa:
            assert torch.equal(torch.as_tensor(pa[key]), torch.as_tensor(pb[key])), key
    assert a["adv"]["optimizer"]["param_groups"][0]["lr"] == 2e-3
    assert a["adv"]["optimizer"]["param_groups"][0]["betas"] == (0.5, 0.9)
    assert a["adv"]["scheduler"] == b["adv"]["scheduler"] and a["adv"]["noise"] == b["adv"]["noise"]
    assert a["config"]["adv_model"] == "nets.Disc" and a["config"]["cgan"] is True


def test_adding_an_adversary_to_a_run_without_one_starts_it_fresh(data, tmp_path, capsys):
    run(base(data, epochs=1), tmp_path)
    saved = state(tmp_path / "state_1.pt")
    assert "adv" not in saved and not any(k.startswith(("adv_", "cgan", "instance_noise")) for k in saved["config"])
    capsys.readouterr()
    history = run(adv(data, epochs=2), tmp_path)
    out = capsys.readouterr().out
    assert "holds no discriminator (written without --adv-model); the adversary nets.Disc starts fresh" in out
    assert "resuming from state_1.pt after epoch 1" in out
    assert [h["epoch"] for h in history] == [2] and history[0]["adv"] is not None
    assert "adv" in state(tmp_path / "state_2.pt")
    capsys.readouterr()
    history = run(base(data, epochs=3), tmp_path)  # and back without the adversary: said, and left out
    assert "holds a discriminator; without --adv-model this run trains without it" in capsys.readouterr().out
    assert history[0]["adv"] is None and "adv" not in state(tmp_path / "state_3.pt")


# ---------------------------------------------------------------- bad input

def one_line_error(capsys, argv: list[str]) -> str:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and err.startswith("m2m train: error: ")
    return err


def test_bad_adversarial_input_is_one_line(data, tmp_path, capsys):
    rd = ["--run-dir", str(tmp_path)]
    err = one_line_error(capsys, base(data, "--adv-model", "NoSuchDisc", *rd))
    assert "unknown discriminator 'NoSuchDisc'" in err and "map2map.models" in err
    err = one_line_error(capsys, base(data, "--cgan", *rd))
    assert "--cgan needs --adv-model" in err
    err = one_line_error(capsys, adv(data, "--adv-r1-reg-interval", "-1", *rd))
    assert "--adv-r1-reg-interval must be 0 (off) or a positive number of batches, got -1" in err
    err = one_line_error(capsys, adv(data, "--adv-wgan-gp-interval", "-2", *rd))
    assert "--adv-wgan-gp-interval" in err and "-2" in err
    for value in ("0", "1.5", "-0.1"):
        err = one_line_error(capsys, adv(data, "--adv-label-smoothing", value, *rd))
        assert f"--adv-label-smoothing is the real label and must be in (0, 1], got {float(value)}" in err
    err = one_line_error(capsys, adv(data, "--adv-iter-ratio", "0", *rd))
    assert "--adv-iter-ratio must be at least 1" in err
    err = one_line_error(capsys, adv(data, "--adv-criterion", "NoLoss", *rd))
    assert "unknown adversarial criterion 'NoLoss'" in err
    err = one_line_error(capsys, adv(data, "--adv-optimizer-args", '{"nope": 1}', *rd))
    assert "--adv-optimizer-args" in err
    err = one_line_error(capsys, base(data, "--adv-model", "PatchGAN", *rd))  # 8 voxels: PatchGAN needs 9
    assert "--adv-model PatchGAN cannot score samples of 3 channels and shape [8, 8, 8]" in err
    assert "give a larger --crop" in err
    assert not list(tmp_path.glob("*.pt")) and not (tmp_path / "runs").exists()


def test_nan_discriminator_loss_stops(data, tmp_path, capsys):
    import_attr("nets.NanFrom5", [], str(data["cb"])).calls = 0
    err = one_line_error(capsys, adv(data, "--adv-criterion", "nets.NanFrom5", "--run-dir", str(tmp_path)))
    # calls 1-3 are batch 1 (fake, real, generator), the 5th is batch 2's real term
    assert err == "m2m train: error: discriminator loss is nan at epoch 1 batch 2; stopping; no checkpoint was written"


# ---------------------------------------------------------------- two processes

def test_two_process_ddp_with_the_adversary(data, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "map2map.cli", *adv(data, "--adv-r1-reg-interval", "2", "--instance-noise", "0.1", "--cgan",
                                     "--adv-iter-ratio", "2",
                                     "--adv-model-spectral-norm", "--augment", "--log-interval", "1")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DUMP_DISC="1")
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(work / f"disc_rank{r}.pt", weights_only=True) for r in (0, 1)]
    saved = torch.load(work / "checkpoint.pt", weights_only=True)
    for key, value in ranks[0].items():  # both ranks end with the same discriminator, the checkpoint's
        assert torch.equal(value, ranks[1][key]), key
        assert torch.equal(value, saved["adv"]["model"][key]), key
    assert saved["epoch"] == 2 and saved["adv"]["noise"]["drawn"] == 8  # 4 batches per rank and epoch
    assert proc.stdout.count("adversary nets.Disc:") == 1 and "2 process(es) on cpu" in proc.stdout
    tags = scalars(work)
    assert [s for s, _ in tags["loss/batch/train/adv/r1"]] == [2, 4, 6, 8]


def test_stitched_inference_of_an_adversarially_trained_generator_equals_the_whole_box(data, tmp_path):
    import numpy as np

    from map2map import store
    from conftest import run_m2m

    run(adv(data, "--cgan", "--adv-r1-reg-interval", "2", epochs=1), tmp_path)
    preds = {}
    for crop in ("8", "16"):  # tiles of 8 stitched, and the whole 16^3 box in one tile
        out = tmp_path / f"pred{crop}.zarr"
        r = run_m2m("infer", "--data", str(data["train"]), "--in", "za", "--load-state", str(tmp_path / "state_1.pt"),
                    "--callback-at", str(data["cb"]), "--out", str(out), "--crop", crop, "--workers", "1",
                    "--device", "cpu")
        assert r.returncode == 0, r.stderr[-2000:]
        preds[crop] = store.open_store(out).field("lpt")[:]
    assert preds["8"].shape == (2, 3, 16, 16, 16) and np.abs(preds["16"]).max() > 0
    np.testing.assert_allclose(preds["8"], preds["16"], rtol=0, atol=1e-5)


def test_help_shows_the_adversarial_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for opt in ("--adv-model ", "--adv-model-spectral-norm", "--adv-criterion", "--adv-lr", "--adv-optimizer-args",
                "--adv-start", "--adv-weight", "--adv-iter-ratio", "--adv-label-smoothing", "--adv-r1-reg-interval",
                "--adv-r1-reg-gamma", "--adv-wgan-gp-interval", "--cgan", "--instance-noise ",
                "--instance-noise-batches"):
        assert opt in text, opt
