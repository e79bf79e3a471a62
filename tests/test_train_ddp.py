"""Real two-process DistributedDataParallel training under torchrun, with gloo on CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from stores import za_lpt_store

# A model that, at interpreter exit, saves its parameters and how many training
# batches it saw, one file per rank: the only way to look inside every rank.
CALLBACKS = '''
import atexit
import os

import torch
from torch import nn


class Dumped(nn.Module):
    def __init__(self, in_chan, out_chan, **kwargs):
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(in_chan, 4, 3), nn.LeakyReLU(0.2), nn.Conv3d(4, out_chan, 3))
        self.forwards = 0
        atexit.register(self._dump)

    def forward(self, x):
        if self.training:
            self.forwards += 1
        return self.net(x)

    def _dump(self):
        params = {k: v.detach().clone() for k, v in self.named_parameters()}
        torch.save({"params": params, "forwards": self.forwards}, f"params_rank{os.environ.get('RANK', 0)}.pt")
'''


@pytest.mark.parametrize("div_data", [False, True])
def test_two_process_ddp_with_gloo(tmp_path, div_data):
    train_store, val_store = za_lpt_store(tmp_path, "train", 2, 1, boxsize=None), za_lpt_store(tmp_path, "val", 1, 2, boxsize=None)
    (tmp_path / "cb").mkdir()
    (tmp_path / "cb" / "nets.py").write_text(CALLBACKS)
    work = tmp_path / "work"
    work.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "map2map.cli", "train", "--train-data", str(train_store), "--val-data", str(val_store),
           "--in", "za", "--tgt", "lpt", "--crop", "8", "--in-pad", "2", "--in-norms", "cosmology.dis",
           "--tgt-norms", "cosmology.dis", "--model", "nets.Dumped", "--callback-at", str(tmp_path / "cb"),
           "--lr", "1e-2", "--batch-size", "2", "--loader-workers", "0", "--epochs", "2", "--log-interval", "1",
           "--augment"] + (["--div-data"] if div_data else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout

    # both ranks trained: 16 items, 8 per rank, batches of 2, 2 epochs
    ranks = [torch.load(work / f"params_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["forwards"] for r in ranks] == [8, 8]
    # and ended with identical parameters, those of the checkpoint
    saved = torch.load(work / "checkpoint.pt", weights_only=True)
    for key, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][key]), key
        assert torch.equal(value, saved["model"][f"net.{key.split('.', 1)[1]}"]), key
    assert len(saved["rng"]) == 2 and not torch.equal(saved["rng"][0]["torch"], saved["rng"][1]["torch"])
    assert saved["config"]["div_data"] is div_data

    # only rank 0 printed, wrote checkpoints and wrote TensorBoard events
    assert out.count("saved state_1.pt") == 1 and out.count("saved state_2.pt") == 1
    assert "2 process(es) on cpu" in out
    assert sorted(p.name for p in work.glob("*.pt")) == ["checkpoint.pt", "params_rank0.pt", "params_rank1.pt",
                                                         "state_1.pt", "state_2.pt"]
    events = list((work / "runs").rglob("events.out.tfevents.*"))
    assert len(events) == 1
