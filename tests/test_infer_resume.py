"""`m2m infer` after a crash: a SIGKILLed client or worker; reruns compute only what is missing,
and the result is identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from map2map import infer, store, tiles
from map2map.errors import UserError

from conftest import run_m2m, start_m2m, wait_for_markers
from test_fields import drop_completion_mark
from test_infer import make_store, run_infer

SLOW_MODEL = '''
import time
import torch
from torch import nn


class Slow(nn.Module):
    """One 3-voxel convolution that takes its time, so a run can be interrupted half way."""

    def __init__(self, in_chan, out_chan, delay=0.08, **kwargs):
        super().__init__()
        self.conv = nn.Conv3d(in_chan, out_chan, 3)
        self.delay = delay

    def forward(self, x):
        if x.device.type != "meta":
            time.sleep(self.delay)
        return self.conv(x)
'''

NTILES = 64  # 16^3 box in crops of 4


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    cb = root / "callbacks"
    cb.mkdir()
    (cb / "slow.py").write_text(SLOW_MODEL)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 16, 16, 16)).astype(np.float32)
    data = make_store(root, "in", {"disp": x}, crop=8)
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(2, 2, 3)
    ckpt = root / "slow.pt"
    torch.save({"model": {"conv.weight": conv.weight.detach(), "conv.bias": conv.bias.detach()}}, ckpt)
    with torch.no_grad():
        ref = conv(torch.from_numpy(np.pad(x[0], [(0, 0)] + [(1, 1)] * 3, mode="wrap"))[None])[0].numpy()
    return root, data, str(ckpt), str(cb), ref


def command(data: str, ckpt: str, cb: str, out: Path, *extra: str) -> list[str]:
    return ["infer", "--data", data, "--in", "disp", "--model", "slow.Slow", "--callback-at", cb,
            "--load-state", ckpt, "--out", str(out), "--crop", "4", "--batch-size", "2", "--workers", "2",
            "--device", "cpu", "--no-progress", *extra]


def worker_processes(proc: subprocess.Popen) -> list[psutil.Process]:
    kids = psutil.Process(proc.pid).children(recursive=True)
    return [k for k in kids if "spawn_main" in " ".join(k.cmdline())]


def parse_counts(stdout: str) -> tuple[int, int]:
    line = next(line for line in stdout.splitlines() if line.startswith("tiles:"))
    computed = int(line.split("(")[1].split(" computed")[0])
    resumed = int(line.split(", ")[1].split(" resumed")[0])
    return computed, resumed


@pytest.fixture(scope="module")
def uninterrupted(slow, cluster):
    root, data, ckpt, cb, ref = slow
    out = root / "whole.zarr"
    s = run_infer(cluster, **options(data, ckpt, cb, out))
    assert (s.computed, s.skipped) == (NTILES, 0)
    pred = store.open_store(out).field("prediction")[0]
    assert float(np.abs(pred - ref).max()) <= 1e-5
    return pred


def options(data: str, ckpt: str, cb: str, out: Path, **kw) -> dict:
    """The engine's options for the same run as `command`."""
    return dict(dict(data=data, in_fields=["disp"], model="slow.Slow", callback_at=cb, load_state=ckpt,
                     out=str(out), crop=[4], batch_size=2, device="cpu"), **kw)


def test_client_sigkill_then_rerun_resumes_and_matches(slow, uninterrupted, cluster):
    root, data, ckpt, cb, _ = slow
    out = root / "killed-client.zarr"
    proc = start_m2m(*command(data, ckpt, cb, out))
    workers = []
    try:
        wait_for_markers(str(out / infer.DONE_DIR), 12, proc)
        workers = worker_processes(proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    psutil.wait_procs(workers, timeout=30)  # orphaned workers notice and exit on their own
    with pytest.raises(store.IncompleteStoreError):
        store.open_store(out)
    done = infer.read_done(str(out / infer.DONE_DIR))
    assert 12 <= len(done) < NTILES
    # a batch of tiles is redone whole unless all its tiles were marked (each of the two workers may have
    # stopped between two markers of one batch): exactly the tiles of whole batches are resumed
    whole = sum(len(ids) for ids in tiles.batches(range(NTILES), 2) if all((0, t) in done for t in ids))
    # the rerun may as well use another cluster: here an existing one, by address
    s = run_infer(cluster, **options(data, ckpt, cb, out))
    computed, resumed = s.computed, s.skipped
    assert resumed == whole >= len(done) - 2 and computed + resumed == NTILES and computed < NTILES
    assert any("resuming the interrupted run" in n for n in s.notes)
    pred = store.open_store(out).field("prediction")[0]
    np.testing.assert_array_equal(pred, uninterrupted)
    assert not (out / infer.DONE_DIR).exists()


def test_worker_sigkill_is_survived_and_matches(slow, uninterrupted):
    root, data, ckpt, cb, _ = slow
    out = root / "killed-worker.zarr"
    proc = start_m2m(*command(data, ckpt, cb, out))
    try:
        wait_for_markers(str(out / infer.DONE_DIR), 8, proc)
        victim = worker_processes(proc)[0]
        victim.send_signal(signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"\nworker SIGKILL: run exited with {proc.returncode}: {stderr.strip()[-300:]}")
    if proc.returncode != 0:  # the run may give up on the lost tasks: the rerun finishes them
        r = run_m2m(*command(data, ckpt, cb, out))
        assert r.returncode == 0, r.stderr
    else:
        assert parse_counts(stdout)[0] == NTILES
    pred = store.open_store(out).field("prediction")[0]
    np.testing.assert_array_equal(pred, uninterrupted)


def test_rerun_with_other_settings_starts_over_and_overwrite_replaces(slow, uninterrupted, cluster):
    root, data, ckpt, cb, ref = slow
    out = root / "changed.zarr"
    fast = {"model_kwargs": {"delay": 0}}
    s = run_infer(cluster, **options(data, ckpt, cb, out, batch_size=8, **fast))
    drop_completion_mark(out)  # as if the run had died before its completion mark
    os.makedirs(out / infer.DONE_DIR)
    infer.mark_done(str(out / infer.DONE_DIR), 0, 0, None, 64)
    # another crop: the tiles written so far do not belong to this run
    s = run_infer(cluster, **options(data, ckpt, cb, out, crop=[8], **fast))
    assert any("starting over" in n for n in s.notes) and (s.computed, s.skipped) == (8, 0)
    np.testing.assert_allclose(store.open_store(out).field("prediction")[0], ref, atol=1e-5, rtol=0)
    # complete now: refused without --overwrite, replaced with it
    with pytest.raises(UserError, match="exists and is complete"):
        run_infer(cluster, **options(data, ckpt, cb, out, **fast))
    s = run_infer(cluster, **options(data, ckpt, cb, out, overwrite=True, batch_size=16, **fast))
    st = store.open_store(out)
    assert st.meta["infer"]["crop"] == [4, 4, 4] and s.computed == NTILES
    np.testing.assert_allclose(st.field("prediction")[0], ref, atol=1e-5, rtol=0)
    assert not Path(str(out) + infer.PARTIAL).exists()


def test_markers_follow_durable_shards(tmp_path):
    """The files a tile batch fsyncs before its markers (what `ShardObjects.store` returns) are exactly the
    output shards it wrote, and a region that is not whole shards is refused before anything is written."""
    from map2map.infer.worker import check_whole_shards

    out = tmp_path / "o.zarr"
    group = store.create(str(out), [store.FieldLayout("p", 2, (16, 16, 12), (8, 8, 8), (4, 4, 4))], nsample=2,
                         boxsize=None, settings={})
    regions = [((8, 16), (0, 8), (0, 12)), ((0, 8), (8, 16), (8, 12))]  # the last axis ends in a partial shard
    check_whole_shards(group["p"], regions)
    objects = store.ShardObjects()
    for lo_hi in regions:
        shape = (2,) + tuple(hi - lo for lo, hi in lo_hi)
        objects.add("p", group["p"], (1, slice(None)) + tuple(slice(lo, hi) for lo, hi in lo_hi),
                    np.ones(shape, np.float32))
    files = objects.store(str(out), None)
    written = [str(p) for p in (out / "p").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert len(files) == 3 and sorted(files) == sorted(written)
    assert (group["p"][1] == 1).sum() == 2 * (8 * 8 * 12 + 8 * 8 * 4)
    with pytest.raises(RuntimeError, match="not a union of whole shards"):
        check_whole_shards(group["p"], [((0, 4), (0, 8), (0, 8))])


def test_markers_round_trip_and_skip_leftovers(tmp_path):
    """Markers read back as written; a killed writer's temporary, a foreign file or a cut-short marker
    counts as not done."""
    from map2map.utils import durable

    infer.mark_done(str(tmp_path), 0, 3, 0.5, 64)
    infer.mark_done(str(tmp_path), 1, 0, None, 8)
    from map2map.infer.markers import marker_name

    assert sorted(os.listdir(tmp_path)) == ["0-3_64_0.5", "1-0_8_none"] == sorted(
        [marker_name(0, 3, 0.5, 64), marker_name(1, 0, None, 8)])  # nothing else left behind
    durable.temporary_name(tmp_path / "2-2").write_text('{"loss": 0.1, "n": 8}')
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "4-4").write_text('{"loss": 0.1')  # a record of the earlier format, cut short
    (tmp_path / "5-x_8_none").write_text("")  # a name that is no marker
    assert infer.read_done(str(tmp_path)) == {(0, 3): {"loss": 0.5, "n": 64}, (1, 0): {"loss": None, "n": 8}}
    assert infer.read_done(str(tmp_path / "missing")) == {}
