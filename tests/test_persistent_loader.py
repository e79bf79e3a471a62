"""Loader workers that live across epochs: started once, and still a new augmentation every epoch.

The epoch reaches the workers through the sampler's items (`EpochItem`), not
through the dataset object they copied when they started; the results equal
those of loading in the training process.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from map2map.cli import build_parser
from map2map.cli.configs import stage_of
from map2map.data.batching import collate
from map2map.data.fields import FieldDataset
from map2map.data.sampler import DistFieldSampler, EpochItem
from stores import za_lpt_store

# A model that writes the sum of every training input item it sees, and a norm that writes the id of the
# process it runs in (a loader worker, or the training process), to the files the environment names.
CALLBACKS = '''
import os

from torch import nn


class Recorder(nn.Module):
    def __init__(self, in_chan, out_chan, **kwargs):
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(in_chan, 4, 3), nn.LeakyReLU(0.2), nn.Conv3d(4, out_chan, 3))

    def forward(self, x):
        if self.training:
            with open(os.environ["M2M_TEST_ITEMS"], "a") as f:
                f.writelines(f"{float(item.double().sum())!r}\\n" for item in x)
        return self.net(x)


def pid(x, undo=False, **kwargs):
    with open(os.environ["M2M_TEST_PIDS"], "a") as f:
        f.write(f"{os.getpid()}\\n")
'''

EPOCHS, ITEMS = 3, 16  # 2 samples x 8 crops per epoch


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("persistent")
    (root / "cb").mkdir()
    (root / "cb" / "nets.py").write_text(CALLBACKS)
    return {"store": za_lpt_store(root, "train", 2, 1), "cb": root / "cb"}


def train(data, run_dir: Path, workers: int, monkeypatch) -> tuple[list, list[list[float]], list[int]]:
    """Train EPOCHS epochs with augmentation; (epoch records, input item sums per epoch, norm process ids)."""
    items, pids = run_dir / "items.txt", run_dir / "pids.txt"
    monkeypatch.setenv("M2M_TEST_ITEMS", str(items))
    monkeypatch.setenv("M2M_TEST_PIDS", str(pids))
    argv = ["train", "--train-data", str(data["store"]), "--in", "za", "--tgt", "lpt", "--crop", "8", "--in-pad", "2",
            "--in-norms", "nets.pid", "--model", "nets.Recorder", "--callback-at", str(data["cb"]), "--lr", "1e-2",
            "--batch-size", "2", "--loader-workers", str(workers), "--epochs", str(EPOCHS), "--augment",
            "--aug-shift", "2", "--aug-add", "0.01", "--aug-mul", "0.01", "--log-interval", "1",
            "--run-dir", str(run_dir)]
    module, config = stage_of(build_parser().parse_args(argv))
    records = module.run(config).epochs
    sums = [float(v) for v in items.read_text().split()]
    assert len(sums) == EPOCHS * ITEMS
    return records, [sums[e * ITEMS:(e + 1) * ITEMS] for e in range(EPOCHS)], [int(v) for v in pids.read_text().split()]


def test_workers_start_once_and_augment_every_epoch_as_the_training_process_does(data, tmp_path, monkeypatch):
    in_process, sums0, pids0 = train(data, tmp_path / "w0", 0, monkeypatch)
    kept, sums2, pids2 = train(data, tmp_path / "w2", 2, monkeypatch)

    # the same items, augmentation and losses, batch by batch
    assert sums2 == sums0
    for a, b in zip(in_process, kept):
        assert a.batch_losses == b.batch_losses and a.train_loss == b.train_loss
    # a new augmentation every epoch, not only a new order: the items' contents differ
    assert len({tuple(sorted(s)) for s in sums2}) == EPOCHS
    # norms ran in the training process without workers, in two worker processes started once with them
    assert set(pids0) == {os.getpid()}
    assert len(set(pids2)) == 2 and os.getpid() not in pids2
    assert all(r.first_batch_s > 0 for r in kept)
    # and ended with the run (not left for the garbage collector, nor inherited by later forks)
    assert not [pid for pid in set(pids2) if Path(f"/proc/{pid}").exists()]


def test_epoch_items_carry_the_epoch_to_the_dataset(data):
    ds = FieldDataset(store=str(data["store"]), in_fields=["za"], tgt_fields=["lpt"], crop=8, in_pad=2,
                      augment=True, aug_shift=2, aug_add=0.01, seed=5)
    plain = DistFieldSampler(ds.nsample, ds.crop_counts, seed=3)
    items = DistFieldSampler(ds.nsample, ds.crop_counts, seed=3, epoch_items=True)
    for s in (plain, items):
        s.set_epoch(4)
    assert list(items) == [EpochItem(4, i) for i in plain] and all(type(i) is int for i in plain)

    ds.set_epoch(4)
    expected = {i: ds[i] for i in plain}
    ds.set_epoch(0)  # an epoch item overrides the dataset's own epoch
    for key in list(items)[:4]:
        got = ds[key]
        assert got["index"] == key.index
        for name in ("input", "target", "anchor"):
            assert torch.equal(got[name], expected[key.index][name]), name
    assert not torch.equal(ds[EpochItem(3, 0)]["input"], ds[EpochItem(4, 0)]["input"])

    # through persistent workers: epoch after epoch, what this process reads for that epoch
    loader = DataLoader(ds, batch_size=4, sampler=items, num_workers=1, collate_fn=collate, persistent_workers=True)
    for epoch in (1, 2):
        items.set_epoch(epoch)
        ds.set_epoch(epoch)  # here only: the worker's copy never sees it
        for batch in loader:
            for j, idx in enumerate(batch["index"].tolist()):
                assert torch.equal(batch["input"][j], ds[idx]["input"])
