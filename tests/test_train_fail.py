"""Ranks that fail together: real two-process `m2m train` runs with gloo on CPU.

Most runs start the two ranks as plain processes with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set, as ``srun`` without ``--kill-on-bad-exit``
starts tasks: nobody ends the survivors for them, so a survivor that ended
did so by itself.  One run goes through torchrun, which ends the others
itself once a rank exits non-zero.  Without the failure board
(`map2map.train.FailureBoard`) a rank waiting for a failed one would wait
for the process group's timeout (30 minutes by default); here a rank also
blocks in its own code, where no collective can notice anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from map2map import train
from map2map.cli import build_parser, train_args
from map2map.cli.configs import stage_of
from map2map.errors import UserError
from map2map.utils.distenv import DistEnv
from ports import free_port
from stores import za_lpt_store

# Training steps per rank and epoch in every run below: 2 samples x 8 crops = 16 items, 8 per rank, batches of 2.
STEPS = 4

CALLBACKS = '''
import os
import shutil
import subprocess
import time

from torch import nn


class Tiny(nn.Module):
    """Two convolutions that count their training steps and call `step` with the count."""

    def __init__(self, in_chan, out_chan, **kwargs):
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(in_chan, 4, 3), nn.LeakyReLU(0.2), nn.Conv3d(4, out_chan, 3))
        self.steps = 0

    def forward(self, x):
        if self.training:
            self.steps += 1
            self.step(int(os.environ.get("RANK", 0)), self.steps)
        return self.net(x)

    def step(self, rank, n):
        pass


class Boom(Tiny):
    """Rank 1 raises at its step 3; rank 0 then blocks in its own step 3 for ten minutes."""

    def step(self, rank, n):
        if rank == 1 and n == 3:
            raise RuntimeError("boom at step 3 on rank 1")
        if rank == 0 and n == 3:
            time.sleep(600)


class InTheWay(Tiny):
    """At rank 0's first step of epoch 2, a directory takes the place of state_2.pt in the run directory."""

    def step(self, rank, n):
        if rank == 0 and n == STEPS + 1:
            os.mkdir("state_2.pt")


class Freezer(Tiny):
    """At rank 0's first step of epoch 2, the run directory becomes unwritable: immutable (chattr +i, which
    stops root too) where the file system allows it, else read-only (chmod, which stops other users)."""

    def step(self, rank, n):
        if rank == 0 and n == STEPS + 1:
            if not shutil.which("chattr") or subprocess.run(["chattr", "+i", "."], capture_output=True).returncode:
                os.chmod(".", 0o555)
'''.replace("STEPS", str(STEPS))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fail")
    (root / "cb").mkdir()
    (root / "cb" / "nets.py").write_text(CALLBACKS)
    return {"store": za_lpt_store(root, "train", 2, 1, boxsize=None), "cb": root / "cb"}


def argv(setup, model: str, *extra: str, workers: int = 0, epochs: int = 2) -> list[str]:
    return ["train", "--train-data", str(setup["store"]), "--in", "za", "--tgt", "lpt", "--crop", "8",
            "--in-pad", "2", "--model", model, "--callback-at", str(setup["cb"]), "--lr", "1e-2",
            "--batch-size", "2", "--loader-workers", str(workers), "--epochs", str(epochs), *extra]


ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@dataclass
class Ended:
    """How one process ended: exit status, seconds after the start, stdout and stderr lines."""

    status: int
    seconds: float
    out: list[str]
    err: list[str]



def ranks(args: list[str], run_dirs: list[Path], timeout: float = 240) -> list[Ended]:
    """`m2m ARGS` as ranks 0 and 1 of one run, plain processes (srun without --kill-on-bad-exit), rank r in
    run_dirs[r]; waits for both (killing them after `timeout` s and failing the test)."""
    port, procs = free_port(), []
    t0 = time.monotonic()
    for rank, cwd in enumerate(run_dirs):
        cwd.mkdir(parents=True, exist_ok=True)
        env = dict(ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "map2map.cli", *args], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    ended: dict[int, float] = {}
    try:
        while len(ended) < len(procs) and time.monotonic() - t0 < timeout:
            for rank, p in enumerate(procs):
                if rank not in ended and p.poll() is not None:
                    ended[rank] = time.monotonic() - t0
            time.sleep(0.05)
    finally:
        for p in procs:
            p.kill()
    outputs = [p.communicate() for p in procs]
    if len(ended) < len(procs):  # say where each rank was: its last lines
        tails = "\n".join(f"rank {rank} stderr: {err.strip().splitlines()[-5:]}" for rank, (_, err) in enumerate(outputs))
        pytest.fail(f"ranks still running after {timeout} s: {sorted(set(range(2)) - set(ended))}\n{tails}")
    return [Ended(p.returncode, ended[rank], out.strip().splitlines(), err.strip().splitlines())
            for rank, (p, (out, err)) in enumerate(zip(procs, outputs))]


def one_line(ended: Ended) -> str:
    assert len(ended.err) == 1 and "Traceback" not in ended.err[0], ended.err
    return ended.err[0]


# ---------------------------------------------------------------- a rank that raises


def test_a_rank_that_raises_ends_every_rank(setup, tmp_path):
    zero, one = ranks(argv(setup, "nets.Boom"), [tmp_path, tmp_path])
    where = f"error in your code at {setup['cb'] / 'nets.py'}:"
    assert one.status == 2 and one_line(one).startswith(f"m2m train: {where}")
    assert one_line(one).endswith("RuntimeError: boom at step 3 on rank 1")
    # rank 0 was asleep in its own step 3, where no collective could notice anything: the board ended it
    assert zero.status == 1
    assert one_line(zero).startswith(f"m2m train: error: rank 1 failed: {where}")
    assert one_line(zero).endswith("RuntimeError: boom at step 3 on rank 1; rank 0 stops too")
    assert abs(zero.seconds - one.seconds) < 30  # seconds, not the ten minutes of rank 0's sleep
    assert not list(tmp_path.glob("*.pt"))


def test_under_torchrun_with_loader_workers(setup, tmp_path):
    """torchrun ends the others itself once a rank exits non-zero; both ranks still say what happened."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "map2map.cli", *argv(setup, "nets.Boom", workers=2)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0 and time.monotonic() - t0 < 200
    lines = [line for line in proc.stderr.splitlines() if line.startswith("m2m train:")]
    assert any(line.startswith("m2m train: error: rank 1 failed: error in your code at ") for line in lines), lines
    assert any(line.startswith("m2m train: error in your code at ") for line in lines), lines


# ---------------------------------------------------------------- a checkpoint that cannot be written


def test_a_failed_checkpoint_write_on_rank_0_ends_every_rank(setup, tmp_path):
    zero, one = ranks(argv(setup, "nets.InTheWay"), [tmp_path, tmp_path])
    text = (f"cannot write the checkpoint {tmp_path / 'state_2.pt'}: Is a directory; checkpoint.pt still points "
            "at state_1.pt; fix that and run again to resume")
    assert (zero.status, one_line(zero)) == (2, f"m2m train: error: {text}")
    assert (one.status, one_line(one)) == (1, f"m2m train: error: rank 0 failed: {text}; rank 1 stops too")
    assert abs(zero.seconds - one.seconds) < 30
    assert os.readlink(tmp_path / "checkpoint.pt") == "state_1.pt"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".m2m-tmp")]


def test_a_run_directory_that_becomes_unwritable_ends_every_rank_and_resumes_once_fixed(setup, tmp_path):
    if os.geteuid() == 0 and shutil.which("chattr") is None:
        pytest.skip("root writes into read-only directories, and chattr is not here to make one immutable")
    try:
        zero, one = ranks(argv(setup, "nets.Freezer"), [tmp_path, tmp_path])
    finally:
        if shutil.which("chattr"):
            subprocess.run(["chattr", "-i", str(tmp_path)], capture_output=True)
        tmp_path.chmod(0o755)
    if zero.status == one.status == 0:  # root, and chattr +i refused (file system, or capability)
        pytest.skip("root writes into read-only directories, and this one could not be made immutable")
    line = one_line(zero)
    assert zero.status == 2, zero.err
    start = f"m2m train: error: cannot write the checkpoint {tmp_path / 'state_2.pt'}: "
    reason = line[len(start):].split(";")[0]
    assert line.startswith(start) and reason in ("Operation not permitted", "Permission denied"), line
    assert line.endswith("checkpoint.pt still points at state_1.pt; fix that and run again to resume")
    assert one.status == 1 and one_line(one) == f"m2m train: error: rank 0 failed: {line[len('m2m train: error: '):]}; rank 1 stops too"

    # writable again: one process resumes after epoch 1, taking over the lock file the failed run could not delete
    proc = subprocess.run([sys.executable, "-m", "map2map.cli", *argv(setup, "nets.Tiny")], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "took over the lock" in proc.stdout and "resuming from state_1.pt after epoch 1" in proc.stdout
    assert os.readlink(tmp_path / "checkpoint.pt") == "state_2.pt"


# ---------------------------------------------------------------- ranks that would resume differently


def test_ranks_with_different_states_all_stop_in_one_line_and_copies_agree(setup, tmp_path):
    first, second = tmp_path / "node0", tmp_path / "node1"
    first.mkdir()
    proc = subprocess.run([sys.executable, "-m", "map2map.cli", *argv(setup, "nets.Tiny", epochs=1)], cwd=first,
                          env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr

    # node-local run directories: rank 0's holds the state after epoch 1, rank 1's nothing
    zero, one = ranks(argv(setup, "nets.Tiny"), [first, second])
    line = one_line(zero)
    assert zero.status == one.status == 2 and one_line(one) == line
    assert line.startswith("m2m train: error: the ranks would resume from different states in ./checkpoint.pt: "
                           "rank 0: epoch 1 (file sha256 ")
    assert "rank 1: nothing (a fresh start); give every rank the same run directory" in line
    assert os.readlink(first / "checkpoint.pt") == "state_1.pt" and not (first / "state_2.pt").exists()
    assert sorted(os.listdir(second)) == []

    # the same bytes in both: the ranks agree and resume
    shutil.copy(first / "state_1.pt", second / "state_1.pt")
    os.symlink("state_1.pt", second / "checkpoint.pt")
    zero, one = ranks(argv(setup, "nets.Tiny"), [first, second])
    assert zero.status == one.status == 0, zero.err + one.err
    assert "resuming from state_1.pt after epoch 1" in zero.out and os.readlink(first / "checkpoint.pt") == "state_2.pt"


# ---------------------------------------------------------------- the pieces, in this process


def test_dist_timeout_bounds_the_wait_for_ranks_that_never_start(setup, tmp_path):
    env = dict(ENV, RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "map2map.cli", *argv(setup, "nets.Tiny", "--dist-timeout", "2")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2 and time.monotonic() - t0 < 120
    err = proc.stderr.strip()
    assert "\n" not in err and err.startswith("m2m train: error: cannot start the gloo process group for rank 0 of 2")
    assert "--dist-timeout: did every process start" in err


def test_dist_timeout_option(capsys):
    args = ["train", "--train-data", "x.zarr", "--in", "a", "--tgt", "b", "--model", "VNet", "--lr", "1"]
    _, cfg = stage_of(build_parser().parse_args(args))
    assert cfg.dist_timeout == train.DIST_TIMEOUT_S == train_args.DIST_TIMEOUT_S == 1800
    _, cfg = stage_of(build_parser().parse_args([*args, "--dist-timeout", "90"]))
    assert cfg.dist_timeout == 90
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(UserError, match=f"--dist-timeout must be a positive number of seconds, got {bad}"):
            train.check_config(train.TrainConfig(model="VNet", lr=1, dist_timeout=bad))


def test_rank_ranges():
    assert train._rank_ranges([3]) == "rank 3"
    assert train._rank_ranges([0, 1, 2, 5, 7, 8]) == "ranks 0-2,5,7-8"


def test_failure_lines_and_lost_peers(tmp_path):
    assert train.failure_line(UserError("bad\n  value")) == "bad value"
    assert train.failure_line(KeyError("x")) == "KeyError: 'x'"
    gloo = RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:23955. This is typically caused by a "
                        "remote worker crashing.")
    assert train.lost_peer(gloo) and not train.lost_peer(ValueError(str(gloo)))
    assert not train.lost_peer(RuntimeError("boom"))
    with pytest.raises(UserError, match=r"^rank 1 lost its connection to another rank, which ended without saying "
                                        r"why \(killed\? out of memory\? see its log\): \[pair.cc:553\] Connection "
                                        r"closed by peer \[127.0.0.1\]:23955$"):
        train.tell_others(gloo, DistEnv(rank=1, world_size=2), None)
    train.tell_others(gloo, DistEnv(), None)  # one process: nothing to tell, the error goes on as it is
