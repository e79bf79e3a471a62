"""`m2m infer` as a pipeline: tiles run in this process without a cluster (the default without --scheduler
and --workers), reads and writes overlap the model with a bounded number of batches in flight, the
progress bar and summary give rates and the read / model / write split, markers are found with one
directory scan, and test-time augmentation and --crop auto reach the workers.  Every run's output must
still equal the whole-box pass."""

from __future__ import annotations

import math
import signal
import subprocess
import sys

import numpy as np
import psutil
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from map2map import infer, store
from map2map.cli import build_parser
from map2map.cli.configs import stage_of
from map2map.errors import UserError
from map2map.infer import engine
from map2map.infer.cluster import IN_PROCESS, STREAMS_PER_SLOT, streams
from map2map.infer.markers import marker_name, parse_marker
from map2map.infer.worker import PIPELINE_DEPTH
from map2map.models import G, VNet

from conftest import start_m2m, wait_for_markers
from test_infer import TESTS, make_store, reference, save_ckpt, tame
from twoconv import TwoConv

TOL = 1e-5


def run_here(**kw) -> infer.InferSummary:
    """`m2m infer` with no --scheduler and no --workers on the CPU: the tiles run in this process."""
    kw.setdefault("progress", False)
    kw.setdefault("device", "cpu")
    return infer.run(infer.InferConfig(**kw))


def children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]


@pytest.fixture(scope="module")
def conv3d(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline3d")
    x = np.random.default_rng(0).standard_normal((2, 2, 16, 16, 16)).astype(np.float32)
    data = make_store(root, "in", {"disp": x}, crop=8)
    torch.manual_seed(0)
    model = tame(TwoConv(2, 2, width=4), gain=1.0)
    ckpt = save_ckpt(model, root / "two.pt")
    refs = [reference(model, xi, 1, (16,) * 3) for xi in x]
    return root, data, ckpt, model, x, refs


def two_conv(data: str, ckpt: str, out, **kw) -> dict:
    return dict(dict(data=data, in_fields=["disp"], model="twoconv.TwoConv", callback_at=TESTS,
                     model_kwargs={"width": 4}, load_state=ckpt, out=str(out)), **kw)


@pytest.mark.parametrize("crop,batch,threads", [(4, 1, 1), (6, 3, 1), (4, 2, 2)])
def test_in_process_pipeline_matches_whole_box(conv3d, crop, batch, threads):
    root, data, ckpt, _, _, refs = conv3d
    out = root / f"here-{crop}-{batch}-{threads}.zarr"
    before = children()
    s = run_here(**two_conv(data, ckpt, out, crop=[crop], batch_size=batch, threads_per_worker=threads))
    assert children() == before  # no worker process was started
    assert s.cluster.startswith(IN_PROCESS) and list(s.workers) == [IN_PROCESS]
    pred = store.open_store(out).field("prediction")[:]
    for i, ref in enumerate(refs):
        assert float(np.abs(pred[i] - ref).max()) <= TOL
    w = s.workers[IN_PROCESS]
    nbatches = 2 * math.ceil(math.ceil(16 / crop) ** 3 / batch)
    assert w["tiles"] == s.computed == s.tiles and w["batches"] == nbatches and w["tasks"] == threads
    # the pipeline overlapped: a batch was read while another was in the model, never more than the bound
    assert 2 <= w["max_in_flight"] <= PIPELINE_DEPTH


def test_in_process_2d_super_resolution_with_loss(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 1, 32, 32)).astype(np.float32)
    y = rng.standard_normal((1, 1, 64, 64)).astype(np.float32)
    data = make_store(tmp_path, "sr", {"lo": x, "hi": y}, crop=8)
    torch.manual_seed(4)
    model = tame(G(1, 1, scale_factor=2, dim=2, chan_base=4, chan_min=4), gain=0.5)
    ckpt = save_ckpt(model, tmp_path / "g.pt")
    s = run_here(out=str(tmp_path / "o.zarr"), model="G", load_state=ckpt, data=data, in_fields=["lo"],
                 tgt=["hi"], scale_factor=2, crop=[12], model_kwargs={"chan_base": 4, "chan_min": 4}, batch_size=2)
    ref = reference(model, x[0], 2, (64, 64))
    assert float(np.abs(store.open_store(tmp_path / "o.zarr").field("hi")[0] - ref).max()) <= TOL
    assert s.loss[0] == pytest.approx(float(np.mean((ref.astype(np.float64) - y[0]) ** 2)), rel=1e-5)
    box_bytes = 4 * (32 ** 2 + 2 * 64 ** 2)
    assert 0 < s.workers[IN_PROCESS]["max_task_bytes"] < box_bytes  # the batches in flight, not the box


def test_in_process_2d_vnet_with_norms(tmp_path):
    x = np.random.default_rng(1).standard_normal((1, 2, 48, 48)).astype(np.float32) * 5
    data = make_store(tmp_path, "in2d", {"dis": x}, crop=16)
    torch.manual_seed(2)
    model = tame(VNet(2, 2, dim=2, width=4))
    ckpt = save_ckpt(model, tmp_path / "v.pt")
    from map2map.data.norms import cosmology

    kw = {"z": 1.0}
    ref_n = reference(model, cosmology.dis(x[0].copy(), **kw), 20, (48, 48))
    s = run_here(out=str(tmp_path / "o.zarr"), model="VNet", load_state=ckpt, data=data, in_fields=["dis"],
                 crop=[16], model_kwargs={"width": 4}, batch_size=2, in_norms=["cosmology.dis"],
                 tgt_norms=["cosmology.dis"], norm_kwargs=kw)
    pred = store.open_store(tmp_path / "o.zarr").field("prediction")[0]
    assert float(np.abs(cosmology.dis(pred.copy(), **kw) - ref_n).max()) <= TOL
    assert s.computed == 9


def test_progress_bar_and_summary_figures(conv3d, capsys):
    root, data, ckpt, _, _, _ = conv3d
    s = run_here(**two_conv(data, ckpt, root / "progress.zarr", crop=[4], progress=True))
    err = capsys.readouterr().err
    assert "128/128 tiles" in err and "tiles/s" in err and "ETA" in err
    assert s.tiles_per_s == pytest.approx(s.computed / s.tiles_s)
    w = s.workers[IN_PROCESS]
    assert 0 < w["model_s"] <= w["stream_s"] * 1.001 and w["read_s"] > 0 and w["write_s"] > 0
    assert 0 < s.model_busy <= 1.001 and s.model_busy == pytest.approx(w["model_s"] / s.tiles_s)
    line = next(x for x in s.lines() if x.startswith("pipeline:"))
    assert f"model {w['model_s']:.2f} s" in line and f"model busy {100 * s.model_busy:.0f}%" in line
    assert f"{s.tiles_per_s:.1f} tiles/s" in line
    assert s.finish_s > 0 and any(f"finish {s.finish_s:.2f} s" in x for x in s.lines())
    js = s.to_json()
    assert js["model_busy"] == s.model_busy and js["tiles_per_s"] == s.tiles_per_s


def flipped_reference(model, x: np.ndarray, pad: int, shape) -> np.ndarray:
    """The mean over the 8 reflections g of g^-1(whole-box pass of g x) (2 channels: no vector field)."""
    out = np.zeros((x.shape[0],) + tuple(shape), dtype=np.float64)
    for mask in range(8):
        axes = tuple(1 + a for a in range(3) if mask >> a & 1)
        out += np.flip(reference(model, np.ascontiguousarray(np.flip(x, axes)), pad, shape), axes)
    return out / 8


def test_tta_flips_in_the_pipeline_matches_averaged_whole_box_passes(conv3d):
    root, data, ckpt, model, x, _ = conv3d
    out = root / "tta.zarr"
    s = run_here(**two_conv(data, ckpt, out, crop=[8], batch_size=2, tta="flips"))
    pred = store.open_store(out).field("prediction")[:]
    for i in range(2):
        assert float(np.abs(pred[i] - flipped_reference(model, x[i], 1, (16,) * 3)).max()) <= TOL
    assert s.tta == "flips" and any(line.startswith("tta: flips") for line in s.lines())
    assert store.read_meta(out)["infer"]["tta"] == "flips"


def test_crop_auto_reaches_the_planner_and_stays_exact(conv3d):
    root, data, ckpt, _, _, refs = conv3d
    out = root / "auto.zarr"
    s = run_here(**two_conv(data, ckpt, out, crop="auto", tile_memory=0.0001))
    note = next(n for n in s.notes if n.startswith("--crop auto: tile"))
    assert f"tile {s.tile}" in note and s.tiles == 2 * math.prod(-(-16 // t) for t in s.tile)
    pred = store.open_store(out).field("prediction")[:]
    for i, ref in enumerate(refs):
        assert float(np.abs(pred[i] - ref).max()) <= TOL


def test_tta_is_part_of_the_resume_settings_and_bad_values_are_one_line(conv3d):
    root, data, ckpt, _, _, _ = conv3d
    digests = {mode: engine.prepare(infer.InferConfig(**two_conv(data, ckpt, root / "d.zarr", tta=mode))).digest
               for mode in ("none", "flips", "all")}
    assert len(set(digests.values())) == 3
    with pytest.raises(UserError, match="--tta 'spin': expected one of none, flips, all"):
        engine.prepare(infer.InferConfig(**two_conv(data, ckpt, root / "d.zarr", tta="spin")))
    with pytest.raises(UserError, match="--crop 'big'"):
        engine.prepare(infer.InferConfig(**two_conv(data, ckpt, root / "d.zarr", crop="big")))
    with pytest.raises(UserError, match="--tile-memory -1"):
        engine.prepare(infer.InferConfig(**two_conv(data, ckpt, root / "d.zarr", tile_memory=-1)))


def test_command_line_options_reach_the_config(tmp_path):
    args = build_parser().parse_args(["infer", "--data", "d", "--out", "o", "--load-state", "c", "--crop", "auto",
                                      "--tile-memory", "1.5", "--tta", "all"])
    _, config = stage_of(args)
    assert (config.crop, config.tile_memory, config.tta) == ("auto", 1.5, "all")
    args = build_parser().parse_args(["infer", "--data", "d", "--out", "o", "--load-state", "c", "--crop", "8,8,4"])
    assert stage_of(args)[1].crop == (8, 8, 4) and stage_of(args)[1].tta == "none"


def test_a_failed_check_closes_the_cluster_started_meanwhile(conv3d):
    """With --workers 2 the local cluster starts while the client plans; a bad input found meanwhile
    closes it again."""
    root, data, ckpt, _, _, _ = conv3d
    before = children()
    with pytest.raises(UserError, match="nosuch"):
        run_here(**two_conv(data, ckpt, root / "bad.zarr", in_fields=["nosuch"], workers=2))
    psutil.wait_procs([p for p in children() if p not in before], timeout=30)
    assert children() == before


# --------------------------------------------------------------------------- resume, in process

SLOW = '''
import time
from torch import nn


class Slow(nn.Module):
    def __init__(self, in_chan, out_chan, **kwargs):
        super().__init__()
        self.conv = nn.Conv3d(in_chan, out_chan, 3)

    def forward(self, x):
        time.sleep(0.05)
        return self.conv(x)
'''


def test_in_process_run_killed_then_resumed_is_exact(tmp_path):
    cb = tmp_path / "cb"
    cb.mkdir()
    (cb / "slow.py").write_text(SLOW)
    x = np.random.default_rng(0).standard_normal((1, 2, 16, 16, 16)).astype(np.float32)
    data = make_store(tmp_path, "in", {"disp": x}, crop=8)
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(2, 2, 3)
    ckpt = tmp_path / "slow.pt"
    torch.save({"model": {"conv.weight": conv.weight.detach(), "conv.bias": conv.bias.detach()}}, ckpt)
    with torch.no_grad():
        ref = conv(torch.from_numpy(np.pad(x[0], [(0, 0)] + [(1, 1)] * 3, mode="wrap"))[None])[0].numpy()
    out = tmp_path / "o.zarr"
    args = ["infer", "--data", data, "--in", "disp", "--model", "slow.Slow", "--callback-at", str(cb),
            "--load-state", str(ckpt), "--out", str(out), "--crop", "4", "--batch-size", "2", "--device", "cpu",
            "--no-progress"]
    proc = start_m2m(*args)
    try:
        wait_for_markers(str(out / infer.DONE_DIR), 10, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = infer.read_done(str(out / infer.DONE_DIR))
    assert 10 <= len(done) < 64
    s = run_here(data=data, in_fields=["disp"], model="slow.Slow", callback_at=str(cb), load_state=str(ckpt),
                 out=str(out), crop=[4], batch_size=2)
    assert s.skipped >= len(done) - 1 and s.computed + s.skipped == 64 and s.computed < 64  # <= 1 batch half marked
    np.testing.assert_allclose(store.open_store(out).field("prediction")[0], ref, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- pure pieces

losses = st.one_of(st.none(), st.floats(allow_nan=False), st.just(float("nan")), st.just(float("-inf")))


@given(st.integers(0, 10**6), st.integers(0, 10**9), losses, st.integers(0, 2**40))
def test_marker_names_round_trip(sample, tile, loss, count):
    key, rec = parse_marker(marker_name(sample, tile, loss, count))
    assert key == (sample, tile) and rec["n"] == count
    if loss is None or not math.isnan(loss):
        assert rec["loss"] == loss
    else:
        assert math.isnan(rec["loss"])


def test_read_done_is_one_scan_that_opens_no_marker(tmp_path, monkeypatch):
    infer.mark_done(str(tmp_path), 0, 3, 0.125, 64)
    infer.mark_done(str(tmp_path), 1, 0, None, 8)
    (tmp_path / "2-5").write_text('{"loss": 0.5, "n": 4}')  # a record of the earlier format still counts
    assert infer.read_done(str(tmp_path)) == {(0, 3): {"loss": 0.125, "n": 64}, (1, 0): {"loss": None, "n": 8},
                                              (2, 5): {"loss": 0.5, "n": 4}}
    (tmp_path / "2-5").unlink()

    def no_open(*a, **k):
        raise AssertionError("a marker was opened")

    monkeypatch.setattr("builtins.open", no_open)
    assert set(infer.read_done(str(tmp_path))) == {(0, 3), (1, 0)}


@given(st.lists(st.integers(1, 4), max_size=300), st.integers(1, 16), st.integers(1, 40))
def test_streams_partition_the_work_in_order(sizes, slots, most):
    todo = [(i % 3, list(range(n))) for i, n in enumerate(sizes)]
    got = streams(todo, slots, most)
    assert [b for w in got for b in w] == todo and all(got)
    n = len(todo)
    assert len(got) == min(n, max(slots * STREAMS_PER_SLOT, -(-n // most)))
    if got:
        assert max(map(len, got)) - min(map(len, got)) <= 1 and max(map(len, got)) <= most


def test_a_run_in_this_process_never_imports_dask_distributed(conv3d, tmp_path):
    """Importing `distributed` is a noticeable part of a small job's start beside torch's own import:
    `m2m infer` in one process (no --scheduler, no --workers) runs without it, end to end."""
    root, data, ckpt, model, x, refs = conv3d
    out = tmp_path / "pred.zarr"
    argv = ["infer", "--data", data, "--in", "disp", "--model", "twoconv.TwoConv", "--callback-at", TESTS,
            "--load-state", ckpt, "--out", str(out), "--crop", "8", "--misc-kwargs", '{"width": 4}', "--device", "cpu"]
    code = ("import sys\nfrom map2map.cli import main\n"
            f"status = main({argv!r})\n"
            "print('status', status, 'distributed' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.stdout.strip().splitlines()[-1] == "status 0 False", r.stdout + r.stderr
    got = store.open_store(out).field("prediction")
    assert max(float(np.abs(got[i] - refs[i]).max()) for i in range(len(refs))) <= TOL
