"""`m2m train` killed with SIGKILL, as a real subprocess, resumes from the last complete checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stores import za_lpt_store

CALLBACKS = '''
import time

import torch
from torch import nn


class Slow(nn.Module):
    """Two convolutions; each training batch takes at least 0.1 s, so an epoch of 8 batches lasts 0.8 s."""

    def __init__(self, in_chan, out_chan, **kwargs):
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(in_chan, 4, 3), nn.LeakyReLU(0.2), nn.Conv3d(4, out_chan, 3))

    def forward(self, x):
        if self.training:
            time.sleep(0.1)
        return self.net(x)


class Heavy(Slow):
    """With a 256 MB buffer, so that writing a checkpoint takes long enough to be killed in the middle."""

    def __init__(self, in_chan, out_chan, **kwargs):
        super().__init__(in_chan, out_chan)
        self.register_buffer("ballast", torch.ones(64 * 2**20))
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kill")
    st = za_lpt_store(root, "train", 2, 3, boxsize=None)
    (root / "cb").mkdir()
    (root / "cb" / "nets.py").write_text(CALLBACKS)
    return {"store": st, "cb": root / "cb"}


def command(setup, model: str, epochs: int) -> list[str]:
    return [sys.executable, "-m", "map2map.cli", "train", "--train-data", str(setup["store"]), "--in", "za",
            "--tgt", "lpt", "--crop", "8", "--in-pad", "2", "--in-norms", "cosmology.dis", "--tgt-norms",
            "cosmology.dis", "--model", model, "--callback-at", str(setup["cb"]), "--lr", "1e-2",
            "--batch-size", "2", "--loader-workers", "0", "--epochs", str(epochs), "--augment"]


ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def finish(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def kill_when(cmd: list[str], cwd: Path, ready, timeout: float = 120) -> None:
    """Start `cmd`, SIGKILL it as soon as `ready()` is true (polled every millisecond)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "timed out waiting to kill"
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


def test_killed_during_an_epoch_resumes_exactly(setup, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    cmd = command(setup, "nets.Slow", 3)
    finish(cmd, straight)

    seen: dict[str, float] = {}

    def in_epoch_two() -> bool:  # 0.3 s into the 0.8 s second epoch
        if "t" not in seen and (killed / "checkpoint.pt").exists():
            seen["t"] = time.monotonic()
        return "t" in seen and time.monotonic() > seen["t"] + 0.3

    kill_when(cmd, killed, in_epoch_two)
    assert os.readlink(killed / "checkpoint.pt") == "state_1.pt" and not (killed / "state_2.pt").exists()

    out = finish(cmd, killed)
    assert "resuming from state_1.pt after epoch 1" in out and "saved state_3.pt" in out
    a = torch.load(straight / "state_3.pt", weights_only=True)
    b = torch.load(killed / "state_3.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(setup, tmp_path):
    cmd = command(setup, "nets.Heavy", 2)
    kill_when(cmd, tmp_path, lambda: any(n.startswith(".m2m-tmp.state_2.pt") for n in os.listdir(tmp_path)))
    names = os.listdir(tmp_path)
    assert "state_2.pt" not in names and any(n.startswith(".m2m-tmp.state_2.pt") for n in names)
    assert os.readlink(tmp_path / "checkpoint.pt") == "state_1.pt"
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1

    out = finish(cmd, tmp_path)
    assert "interrupted checkpoint write" in out and "resuming from state_1.pt after epoch 1" in out
    assert not any(n.startswith(".m2m-tmp") for n in os.listdir(tmp_path))
    assert os.readlink(tmp_path / "checkpoint.pt") == "state_2.pt"
    assert torch.load(tmp_path / "state_2.pt", weights_only=True)["epoch"] == 2
