"""`m2m train` reading its stores from object storage: a real S3-compatible server (the `s3` fixture, moto's
server process on 127.0.0.1) against the same store on local disk, and the refusals, one line each.

The stores and the tiny model are test_train's (16^3 1LPT -> 2LPT, two training samples, crops of 8).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch

from conftest import fails
import test_train
from test_train import base, run, state
from test_train_styles import styled_args, toy_store

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """test_train's stores and callback module (its `data` fixture, made here for this module)."""
    return test_train.make_data(tmp_path_factory.mktemp("train_data"))


def upload(s3, local: Path, name: str) -> str:
    """Copy the local store `local` object by object to ``s3://bucket/name``; its URL."""
    s3.fs().put(str(local), f"{s3.bucket}/{name}", recursive=True)
    return s3.url(name)


def assert_same_state(a: dict, b: dict) -> None:
    """Model weights and optimizer moments equal bit for bit."""
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        for key in pa:
            assert torch.equal(torch.as_tensor(pa[key]), torch.as_tensor(pb[key])), key


def test_an_epoch_from_s3_equals_the_epoch_from_local_disk(data, s3, tmp_path):
    """Two loader workers read the store from S3 (the options travel pickled with the data set; in-process
    reads and torchrun ranks, which get the options on their command line, read through the same code)."""
    train_url, val_url = upload(s3, data["train"], "train.zarr"), upload(s3, data["val"], "val.zarr")
    extra = ["--augment", "--aug-shift", "2", "--loader-workers", "2"]
    local = run(base(data, "--val-data", str(data["val"]), *extra, epochs=1), tmp_path / "local")
    remote = run(base(data, "--train-data", train_url, "--val-data", val_url, "--storage-options", s3.options_json,
                      *extra, epochs=1), tmp_path / "remote")
    assert [(h["batch_losses"], h["train_loss"], h["val_loss"]) for h in remote] == \
           [(h["batch_losses"], h["train_loss"], h["val_loss"]) for h in local]
    a, b = state(tmp_path / "local" / "state_1.pt"), state(tmp_path / "remote" / "state_1.pt")
    assert_same_state(a, b)
    # the card names the stores as the user gave them; the options (credentials, maybe) are saved nowhere
    assert b["card"]["train_stores"] == [train_url, val_url]
    assert "storage_options" not in b["config"] and b["config"]["train_data"] == train_url
    # the run directory is local, and nothing was written to the bucket
    names = {where: sorted(p.name for p in (tmp_path / where).iterdir()) for where in ("local", "remote")}
    assert names["remote"] == names["local"]
    assert sorted(s3.fs().ls(s3.bucket)) == [f"{s3.bucket}/train.zarr", f"{s3.bucket}/val.zarr"]


def test_styles_and_box_size_come_from_s3(s3, tmp_path):
    """A styled model with the Eulerian loss: the styles, their norm and the box size are read from the store
    in object storage, as they are from disk."""
    local, _ = toy_store(tmp_path, "s2", 2)
    url = upload(s3, local, "s2.zarr")
    extra = ("--loss", "lag_eul")
    run(styled_args(local, *extra), tmp_path / "local")
    run(styled_args(url, *extra, "--storage-options", s3.options_json), tmp_path / "remote")
    a, b = state(tmp_path / "local" / "state_1.pt"), state(tmp_path / "remote" / "state_1.pt")
    assert_same_state(a, b)
    assert list(b["card"]["style_names"]) == ["Om", "D"]
    assert [b["card"][k] for k in ("style_shift", "style_scale")] == [a["card"][k] for k in ("style_shift", "style_scale")]
    assert b["losses"] == a["losses"]


def test_bad_locations_and_options_are_one_line(data, s3, tmp_path, capsys):
    rd = ["--run-dir", str(tmp_path / "rd")]
    opts = ["--storage-options", s3.options_json]
    fails(capsys, base(data, "--train-data", "foo://bucket/train.zarr", *rd), "--train-data foo://bucket/train.zarr",
          "unknown URL scheme foo://")
    fails(capsys, base(data, "--val-data", "nope://bucket/val.zarr", *rd), "--val-data", "unknown URL scheme nope://")
    missing = f"s3://m2m-missing-{uuid.uuid4().hex[:8]}/train.zarr"
    fails(capsys, base(data, "--train-data", missing, *opts, *rd), missing, "does not exist")
    fails(capsys, base(data, "--train-data", s3.url("nothing.zarr"), *opts, *rd), s3.url("nothing.zarr"),
          "does not exist")
    fails(capsys, base(data, "--train-data", s3.url("t.zarr"), "--storage-options", "{endpoint_url: 1}", *rd),
          "--storage-options", "is not JSON")
    fails(capsys, base(data, "--train-data", s3.url("t.zarr"), "--storage-options", "[1]", *rd),
          "--storage-options", "not an object")
    fails(capsys, base(data, "--run-dir", s3.url("run")), "--run-dir " + s3.url("run"), "local")
    fails(capsys, base(data, "--load-state", s3.url("run/checkpoint.pt"), *rd), "--load-state", "local")
    fails(capsys, ["train", "--train-in-patterns", s3.url("*.npy"), "--train-tgt-patterns", "x/*.npy",
                   "--model", "VNet", "--lr", "1", *rd], "--train-in-patterns", "m2m convert")
    assert not (tmp_path / "rd").exists()


def test_refused_credentials_are_one_line(data, tmp_path, capsys, monkeypatch):
    pytest.importorskip("s3fs")
    from s3server import S3Server

    server = S3Server(auth=True)  # refuses every key
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        fails(capsys, base(data, "--train-data", "s3://anybucket/train.zarr", "--storage-options",
                           f'{{"endpoint_url": "{server.endpoint}"}}', "--run-dir", str(tmp_path / "rd")),
              "s3://anybucket/train.zarr", "refused the credentials")
    finally:
        server.stop()
    assert not (tmp_path / "rd").exists()
