"""Helpers of `m2m train` on their own: launcher environments, checkpoint files, RNG states, state matching."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from map2map.errors import UserError
from map2map.utils import checkpoint as ckpt
from map2map.modelfit import load_model_state
from map2map.utils.distenv import DistEnv, dist_env, first_host


# ---------------------------------------------------------------- launcher environments

@pytest.mark.parametrize("nodelist, host", [
    ("node1", "node1"),
    ("gpu[07-09,12]", "gpu07"),
    ("gpu[07-09,12],cpu1", "gpu07"),
    ("a[3,5]", "a3"),
    ("rack[1-2]-n[05-06]", "rack1-n05"),
    ("nid001234.cluster", "nid001234.cluster"),
])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_single_process_without_launcher():
    assert dist_env({}) == DistEnv()
    assert not DistEnv().distributed and DistEnv().is_main


def test_torchrun_variables():
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    assert dist_env(env) == DistEnv(3, 1, 4, 2, "torchrun")


def test_srun_fills_in_rendezvous():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NODEID": "2",
           "SLURM_STEP_TASKS_PER_NODE": "2(x3),2", "SLURM_JOB_NODELIST": "gpu[10-13]", "SLURM_JOB_ID": "123456"}
    got = dist_env(env)
    assert got == DistEnv(5, 1, 8, 2, "slurm")
    assert env["MASTER_ADDR"] == "gpu10"
    assert env["MASTER_PORT"] == "23456"  # 20000 + job id mod 10000: below the ephemeral ports
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("5", "1", "8")


def test_srun_keeps_given_master_and_single_task_is_single_process():
    env = {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    assert dist_env(env).world_size == 2 and env["MASTER_ADDR"] == "h" and env["MASTER_PORT"] == "1234"
    assert dist_env({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}) == DistEnv()
    # a batch script run without srun: the job has 4 tasks, but this is the only process
    assert dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n[1-2]"}) == DistEnv()


def test_srun_without_host_is_a_clear_error():
    with pytest.raises(UserError, match="MASTER_ADDR"):
        dist_env({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"})
    with pytest.raises(UserError, match="MASTER_PORT"):
        dist_env({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NODELIST": "n1"})


# ---------------------------------------------------------------- checkpoint files

def _state(epoch: int) -> dict:
    return {"epoch": epoch, "model": {"w": torch.full((3,), float(epoch))}, "min_loss": None}


def test_save_links_latest_and_reads_back_weights_only(tmp_path):
    for epoch in (1, 2):
        ckpt.save_state(_state(epoch), tmp_path)
    link = tmp_path / "checkpoint.pt"
    assert link.is_symlink() and os.readlink(link) == "state_2.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "state_1.pt", "state_2.pt"]
    state = ckpt.read_state(link)
    assert state["epoch"] == 2 and torch.equal(state["model"]["w"], torch.full((3,), 2.0))
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(tmp_path / "state_1.pt").st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0o600


def test_missing_empty_and_dangling_states_mean_fresh_start(tmp_path):
    assert ckpt.read_state(tmp_path / "nope.pt") is None
    (tmp_path / "empty.pt").touch()
    assert ckpt.read_state(tmp_path / "empty.pt") is None
    os.symlink("gone.pt", tmp_path / "checkpoint.pt")
    assert ckpt.read_state(tmp_path / "checkpoint.pt") is None


def test_corrupt_or_unsafe_state_is_a_user_error(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="bad.pt is not a readable checkpoint"):
        ckpt.read_state(tmp_path / "bad.pt")
    torch.save({"epoch": 1, "model": {}, "evil": nn.Linear(1, 1)}, tmp_path / "unsafe.pt")
    with pytest.raises(UserError, match="unsafe.pt is not a readable checkpoint") as err:
        ckpt.read_state(tmp_path / "unsafe.pt")
    assert "weights_only" not in str(err.value)  # never torch's unsafe advice
    (tmp_path / "text.pt").write_text("hello\n")
    with pytest.raises(UserError, match="text.pt is not a readable checkpoint"):
        ckpt.read_state(tmp_path / "text.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="is not a training state"):
        ckpt.read_state(tmp_path / "other.pt")


def test_failed_write_leaves_previous_state_and_no_temporary(tmp_path):
    ckpt.save_state(_state(1), tmp_path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ckpt.save_state({"epoch": 2, "model": {}, "x": Unpicklable()}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "state_1.pt"]
    assert os.readlink(tmp_path / "checkpoint.pt") == "state_1.pt"


def test_remove_stale_temporaries(tmp_path):
    (tmp_path / ".m2m-tmp.state_3.pt.77.abcd").write_bytes(b"partial")
    (tmp_path / "state_2.pt").write_bytes(b"keep")
    assert ckpt.remove_stale(tmp_path) == [".m2m-tmp.state_3.pt.77.abcd"]
    assert [p.name for p in tmp_path.iterdir()] == ["state_2.pt"]


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    ckpt.seed_all([1, 2, 3])
    torch.rand(5), np.random.rand(3), random.random(), np.random.randn()
    saved = ckpt.rng_state()
    torch.save({"rng": [saved]}, tmp_path / "r.pt")
    expect = (torch.rand(4), np.random.rand(4), random.random(), np.random.randn())
    ckpt.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"][0])
    got = (torch.rand(4), np.random.rand(4), random.random(), np.random.randn())
    assert torch.equal(expect[0], got[0]) and np.array_equal(expect[1], got[1]) and expect[2:] == got[2:]


# ---------------------------------------------------------------- model states

def test_mismatched_model_state_lists_keys_or_loads_matching_ones():
    saved = nn.Sequential(nn.Conv3d(1, 4, 3), nn.Conv3d(4, 2, 1)).state_dict()
    model = nn.Sequential(nn.Conv3d(3, 4, 3), nn.Conv3d(4, 2, 1), nn.Conv3d(2, 2, 1))
    with pytest.raises(UserError) as err:
        load_model_state(model, saved, strict=True, source="state_1.pt")
    msg = str(err.value)
    assert "\n" not in msg and "state_1.pt" in msg
    assert "0.weight is [4, 1, 3, 3, 3] in the checkpoint but [4, 3, 3, 3, 3] in the model" in msg
    assert "1 of another shape, 2 missing of 6 model entries" in msg
    notes = load_model_state(model, saved, strict=False)
    assert notes and torch.equal(model[1].weight, saved["1.weight"])


def test_cli_spells_the_checkpoint_link_like_the_checkpoint_module():
    from map2map.cli import train_args

    assert train_args.CKPT_LINK == ckpt.CKPT_LINK


def test_fsync_tree_visits_every_file(tmp_path):
    from map2map.utils.durable import fsync_tree

    for rel in ("a", "d/b", "d/e/c"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    assert fsync_tree(tmp_path) == 3
