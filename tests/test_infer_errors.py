"""`m2m infer` bad input: one-line errors (exit 2), and nothing written or lost."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from map2map import store
from map2map.models import G, VNet

from conftest import fails, run_m2m
from stores import drop_completion_mark, random_pair_store
from test_infer import make_store, save_ckpt


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    _, _, data = random_pair_store(root, "in", 0)
    torch.manual_seed(0)
    ckpt = save_ckpt(VNet(3, 3, width=4), root / "vnet.pt")
    return root, data, ckpt


def infer_args(data: str, ckpt: str, out: Path, *extra: str) -> list[str]:
    return ["infer", "--data", data, "--in", "disp", "--model", "VNet", "--model-kwargs", '{"width": 4}',
            "--load-state", ckpt, "--out", str(out), "--crop", "8", "--no-progress", *extra]




def test_missing_checkpoint(setup, capsys, tmp_path):
    root, data, _ = setup
    out = tmp_path / "o.zarr"
    fails(capsys, infer_args(data, str(root / "nope.pt"), out), "checkpoint", "nope.pt", "does not exist")
    assert not out.exists()


def test_corrupt_checkpoints(setup, capsys, tmp_path):
    root, data, ckpt = setup
    out = tmp_path / "o.zarr"
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(1000))
    fails(capsys, infer_args(data, str(garbage), out), "garbage.pt is not a readable checkpoint", "torch.save")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(Path(ckpt).read_bytes()[:5000])
    fails(capsys, infer_args(data, str(truncated), out), "truncated.pt is not a readable checkpoint", "cut short")
    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, empty)
    fails(capsys, infer_args(data, str(empty), out), "holds no model state")
    assert not out.exists()


def test_checkpoint_that_does_not_fit_lists_keys(setup, capsys, tmp_path):
    root, data, _ = setup
    out = tmp_path / "o.zarr"
    wide = save_ckpt(VNet(3, 3, width=8), tmp_path / "wide.pt")
    fails(capsys, infer_args(data, wide, out), "does not fit the model", "model VNet with 3 input",
          "conv_l0.convs.0.weight is [8, 3, 3, 3, 3] in the checkpoint but [4, 3, 3, 3, 3] in the model",
          "of another shape")
    other = save_ckpt(G(3, 3, scale_factor=2, chan_base=4, chan_min=4), tmp_path / "g.pt", wrap=False)
    fails(capsys, infer_args(data, other, out), "conv_l0.convs.0.weight [4, 3, 3, 3, 3] is missing in the checkpoint",
          "missing", "not in the model")
    assert not out.exists()


def test_field_not_in_store_and_incomplete_store(setup, capsys, tmp_path):
    root, data, ckpt = setup
    out = tmp_path / "o.zarr"
    argv = infer_args(data, ckpt, out)
    argv[argv.index("disp")] = "velocity"
    fails(capsys, argv, "no field 'velocity'", "it has disp, tgt")
    fails(capsys, infer_args(data, ckpt, out, "--tgt", "nope"), "no field 'nope'")
    broken = make_store(tmp_path, "broken", {"disp": np.zeros((1, 3, 16, 16, 16), np.float32)}, crop=8)
    drop_completion_mark(broken)
    fails(capsys, infer_args(broken, ckpt, out), "incomplete")
    fails(capsys, infer_args(str(tmp_path / "absent.zarr"), ckpt, out), "does not exist")
    assert not out.exists()


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + p.read_bytes())
    return h.hexdigest()


def test_complete_output_is_refused_without_overwrite(setup, capsys, tmp_path):
    root, data, ckpt = setup
    out = tmp_path / "done.zarr"
    lay = store.FieldLayout("prediction", 3, (16, 16, 16), (8, 8, 8), (8, 8, 8))
    g = store.create(out, [lay], nsample=1, boxsize=None, settings={})
    g["prediction"][:] = 1.5
    store.mark_complete(out, 1)
    before = _digest(out)
    fails(capsys, infer_args(data, ckpt, out), "exists and is complete", "--overwrite")
    assert _digest(out) == before
    other = tmp_path / "notastore"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    fails(capsys, infer_args(data, ckpt, other), "is not a map2map store")
    assert (other / "precious.txt").read_text() == "keep me"


def test_unreachable_scheduler_fails_within_seconds(setup, capsys, tmp_path):
    root, data, ckpt = setup
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    out = tmp_path / "o.zarr"
    t0 = time.perf_counter()
    fails(capsys, infer_args(data, ckpt, out, "--scheduler", f"tcp://127.0.0.1:{port}"),
          "cannot reach the Dask scheduler", f"127.0.0.1:{port}", "within 5 s")
    assert time.perf_counter() - t0 < 20
    assert not out.exists()  # the output is created only once a cluster is there
    fails(capsys, infer_args(data, ckpt, out, "--scheduler-file", str(tmp_path / "none.json")),
          "--scheduler-file", "does not exist")


def test_tile_and_pad_errors_suggest_valid_sizes(setup, capsys, tmp_path):
    root, data, ckpt = setup
    out = tmp_path / "o.zarr"
    argv = infer_args(data, ckpt, out)
    argv[argv.index("--crop") + 1] = "6"
    fails(capsys, argv, "crop 6 on axis 0 must be a multiple of the model's total stride 4", "use e.g. 4 or 8")
    fails(capsys, infer_args(data, ckpt, out, "--out-shard", "16"), "output shard 16", "crop 8")
    argv = infer_args(data, ckpt, out, "--out-shard", "16")
    argv[argv.index("--crop") + 1] = "12"
    fails(capsys, argv, "crop 12 on axis 0 must be a multiple of the output shard 16; use e.g. 16")
    fails(capsys, infer_args(data, ckpt, out, "--in-pad", "4"), "model rejects an input window of [16, 16, 16]")
    fails(capsys, infer_args(data, ckpt, out, "--in-pad", "18"), "to 4 voxels, which do not cover", "--in-pad")
    fails(capsys, infer_args(data, ckpt, out, "--out-chunk", "3"), "--out-chunk [3, 3, 3] must divide")
    fails(capsys, infer_args(data, ckpt, out, "--tgt", "tgt", "--scale-factor", "2"),
          "target grid", "not --scale-factor 2 times")
    fails(capsys, infer_args(data, ckpt, out, "--in-norms", "nosuch"), "unknown norm 'nosuch'")
    fails(capsys, [a if a != "VNet" else "NoNet" for a in infer_args(data, ckpt, out)], "unknown model 'NoNet'")
    assert not out.exists()


def test_cli_exit_status_and_one_line_as_users_see_it(setup, tmp_path):
    root, data, _ = setup
    r = run_m2m(*infer_args(data, str(tmp_path / "missing.pt"), tmp_path / "o.zarr"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"m2m infer: error: checkpoint {tmp_path / 'missing.pt'} does not exist"]
    r = run_m2m("infer", "--data", data, "--in", "disp", "--model", "VNet", "--load-state", "x.pt",
                "--out", "o", "--model-kwargs", "{width: 4}")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "JSON object" in r.stderr
