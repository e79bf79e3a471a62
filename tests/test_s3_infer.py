"""`m2m infer` with its input and output stores in object storage (a real S3-compatible server, the `s3`
fixture): the prediction equals the local one bit for bit, in this process and on a local cluster of
worker processes; each output shard is one PUT; a SIGKILLed run leaves a store readers refuse, and a
rerun resumes it; a complete store is never replaced; bad locations and options are one line, exit 2."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from map2map import infer, storage, store, tiles
from map2map.errors import UserError

from conftest import fails, run_m2m, start_m2m, wait_for_markers
from test_infer import make_store
from test_infer_resume import SLOW_MODEL, parse_counts

NSAMPLE = 2


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A local input store (2 samples of a 2-channel 16^3 field, 8^3 shards), a checkpoint of the slow
    one-convolution model of `test_infer_resume` (no model card) and its callback directory."""
    root = tmp_path_factory.mktemp("s3infer")
    cb = root / "callbacks"
    cb.mkdir()
    (cb / "slow.py").write_text(SLOW_MODEL)
    x = np.random.default_rng(3).standard_normal((NSAMPLE, 2, 16, 16, 16)).astype(np.float32)
    data = make_store(root, "in", {"disp": x}, crop=8)
    torch.manual_seed(3)
    conv = torch.nn.Conv3d(2, 2, 3)
    ckpt = root / "slow.pt"
    torch.save({"model": {"conv.weight": conv.weight.detach(), "conv.bias": conv.bias.detach()}}, ckpt)
    return root, data, str(ckpt), str(cb)


def config(case, data: str, out: str, **kw) -> infer.InferConfig:
    """The run every test makes, on one torch thread (so that every run computes the same bits)."""
    _, _, ckpt, cb = case
    values = dict(data=data, out=out, in_fields=("disp",), model="slow.Slow", callback_at=cb, load_state=ckpt,
                  crop=(8,), batch_size=2, device="cpu", workers=1, torch_threads=1, progress=False,
                  model_kwargs={"delay": 0})
    values.update(kw)
    return infer.InferConfig(**values)


def command(case, data: str, out: str, *extra: str) -> list[str]:
    """`config` as a command line (crop 4: many tiles, so that a run can be killed half way)."""
    _, _, ckpt, cb = case
    return ["infer", "--data", data, "--in", "disp", "--model", "slow.Slow", "--callback-at", cb,
            "--load-state", ckpt, "--out", out, "--crop", "4", "--batch-size", "2", "--workers", "1",
            "--torch-threads", "1", "--device", "cpu", "--no-progress", *extra]


@pytest.fixture(scope="module")
def local(case):
    """The local predictions (crop 8 and crop 4), the reference for every run over S3."""
    root, data, _, _ = case
    out = {}
    for crop in (8, 4):
        path = str(root / f"local-{crop}.zarr")
        infer.run(config(case, data, path, crop=(crop,)))
        out[crop] = np.asarray(store.open_store(path).field("prediction")[:])
    return out


def upload(s3, local_store: str, name: str = "in.zarr") -> str:
    """Copy a local store into the test's bucket; its URL."""
    url = s3.url(name)
    s3.fs().put(local_store.rstrip("/") + "/", url.removeprefix("s3://"), recursive=True)
    return url


def remote_prediction(s3, url: str) -> np.ndarray:
    """The prediction as users read it: `xarray.open_zarr` of the URL."""
    ds = xr.open_zarr(url, storage_options=s3.options)
    return ds["prediction"].values


def objects(s3, url: str) -> dict[str, str]:
    """Every object under `url`: key -> ETag (equal before and after: nothing was rewritten)."""
    fs = s3.fs()
    return {k: str(v.get("ETag")) for k, v in fs.find(url.removeprefix("s3://"), detail=True).items()}


class Requests:
    """Counts the PUTs and GETs of each object this process makes (s3fs's `_pipe_file` and `_cat_file`)."""

    def __init__(self, monkeypatch) -> None:
        import s3fs

        self.puts: dict[str, int] = {}
        self.gets: dict[str, int] = {}
        for method, counts in (("_pipe_file", self.puts), ("_cat_file", self.gets)):
            original = getattr(s3fs.S3FileSystem, method)

            def counted(fs, path, *args, _original=original, _counts=counts, **kwargs):
                _counts[path] = _counts.get(path, 0) + 1
                return _original(fs, path, *args, **kwargs)

            monkeypatch.setattr(s3fs.S3FileSystem, method, counted)

    @staticmethod
    def shards(counts: dict[str, int], field: str) -> dict[str, int]:
        return {k: n for k, n in counts.items() if f"/{field}/c/" in k}


def test_s3_in_process_equals_local_one_put_per_shard_and_no_overwrite(case, local, s3, monkeypatch, capsys):
    data = upload(s3, case[1])
    out = s3.url("pred.zarr")
    requests = Requests(monkeypatch)
    s = infer.run(config(case, data, out, storage_options=s3.options_json))
    assert (s.computed, s.skipped) == (NSAMPLE * 8, 0) and s.output == out
    shards = Requests.shards(requests.puts, "prediction")
    assert len(shards) == NSAMPLE * 8 and set(shards.values()) == {1}  # every shard one object, one PUT
    assert not Requests.shards(requests.gets, "prediction")  # and no shard read before it is written
    np.testing.assert_array_equal(remote_prediction(s3, out), local[8])
    names = storage.names(out, s3.options)
    assert infer.DONE_DIR not in names and "prediction" in names  # the markers are gone, the mark is there
    assert store.open_store(out, storage_options=s3.options).meta["complete"]

    before = objects(s3, out)
    line = fails(capsys, command(case, data, out, "--storage-options", s3.options_json, "--overwrite"),
                 "--overwrite", out, "new URL")
    assert "rename" in line
    fails(capsys, command(case, data, out, "--storage-options", s3.options_json), out, "complete")
    assert objects(s3, out) == before  # the complete store is untouched
    np.testing.assert_array_equal(remote_prediction(s3, out), local[8])


def test_s3_local_cluster_equals_local(case, local, s3):
    """Two worker processes read and write over S3 with the options the job carries."""
    data = upload(s3, case[1])
    out = s3.url("cluster", "pred.zarr")
    s = infer.run(config(case, data, out, storage_options=dict(s3.options), workers=2))
    assert s.cluster.startswith("local, 2 worker processes") and s.computed == NSAMPLE * 8
    assert sum(w["tiles"] for w in s.workers.values()) == NSAMPLE * 8 and all(a.startswith("tcp://") for a in s.workers)
    np.testing.assert_array_equal(remote_prediction(s3, out), local[8])


def drop_remote_completion_mark(s3, url: str) -> None:
    """Make a remote store look as if its writer had died before the completion mark."""
    import zarr

    group = store.open_group(url, "r+", s3.options)
    group.attrs[store.ATTR] = dict(group.attrs[store.ATTR], complete=False)
    zarr.consolidate_metadata(group.store)


def test_s3_local_input_remote_output_and_back(case, local, s3, tmp_path):
    """Either store alone may be remote; an incomplete remote output of other settings is started over."""
    out = s3.url("from-local.zarr")
    infer.run(config(case, case[1], out, storage_options=s3.options))
    np.testing.assert_array_equal(remote_prediction(s3, out), local[8])
    drop_remote_completion_mark(s3, out)
    infer.mark_done(storage.join(out, infer.DONE_DIR), 0, 0, None, 512, s3.options)  # a marker of that run
    s = infer.run(config(case, case[1], out, storage_options=s3.options, out_chunk=(4, 4, 4)))  # other settings
    assert any("starting over" in n for n in s.notes) and (s.computed, s.skipped) == (NSAMPLE * 8, 0)
    assert store.open_store(out, storage_options=s3.options).field("prediction").chunks[2:] == (4, 4, 4)
    np.testing.assert_array_equal(remote_prediction(s3, out), local[8])
    assert infer.DONE_DIR not in storage.names(out, s3.options)
    data = upload(s3, case[1])
    back = tmp_path / "back.zarr"
    infer.run(config(case, data, str(back), storage_options=s3.options))
    np.testing.assert_array_equal(store.open_store(back).field("prediction")[:], local[8])


def test_s3_sigkill_then_rerun_resumes_and_matches(case, local, s3):
    data = upload(s3, case[1])
    out = s3.url("killed.zarr")
    total = NSAMPLE * 64
    args = command(case, data, out, "--storage-options", s3.options_json, "--model-kwargs", '{"delay": 0.08}')
    done_prefix = storage.join(out, infer.DONE_DIR)
    proc = start_m2m(*args)
    try:
        wait_for_markers(done_prefix, 12, proc, s3.options)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    with pytest.raises(store.IncompleteStoreError):
        store.open_store(out, storage_options=s3.options)
    done = infer.read_done(done_prefix, s3.options)
    assert 12 <= len(done) < total
    whole = sum(len(ids) for sample in range(NSAMPLE) for ids in tiles.batches(range(64), 2)
                if all((sample, t) in done for t in ids))
    r = run_m2m(*args)
    assert r.returncode == 0, r.stderr
    computed, resumed = parse_counts(r.stdout)
    assert resumed == whole and computed + resumed == total and computed < total
    assert "resuming the interrupted run" in r.stdout
    np.testing.assert_array_equal(remote_prediction(s3, out), local[4])
    assert infer.DONE_DIR not in storage.names(out, s3.options)


# --------------------------------------------------------------------------- bad input: one line, exit 2


@pytest.fixture(scope="module")
def refusing_server():
    """An S3 server that refuses every key (authentication on from the first request)."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    from s3server import S3Server

    server = S3Server(auth=True)
    yield server
    server.stop()


def test_unknown_schemes_and_malformed_options(case, capsys, tmp_path):
    _, data, _, _ = case
    out = str(tmp_path / "p.zarr")
    fails(capsys, command(case, "nosuch://b/in.zarr", out), "--data", "unknown URL scheme nosuch://")
    fails(capsys, command(case, data, "nosuch://b/p.zarr"), "--out", "unknown URL scheme nosuch://")
    fails(capsys, command(case, data, out, "--storage-options", "{bad"), "--storage-options", "not JSON")
    fails(capsys, command(case, data, out, "--storage-options", "[1]"), "--storage-options", "not an object")
    with pytest.raises(UserError, match="local file"):
        infer.run(config(case, data, out, load_state="s3://b/ckpt.pt"))
    assert not Path(out).exists()


def test_missing_bucket_is_one_line(case, s3, capsys, tmp_path):
    _, data, _, _ = case
    missing = "s3://m2m-no-such-bucket/x.zarr"
    options = ["--storage-options", s3.options_json]
    fails(capsys, command(case, missing, str(tmp_path / "p.zarr"), *options), "bucket m2m-no-such-bucket",
          "does not exist")
    fails(capsys, command(case, data, missing, *options), "bucket m2m-no-such-bucket", "does not exist")
    assert not (tmp_path / "p.zarr").exists()


def test_refused_credentials_are_one_line(case, refusing_server, capsys, tmp_path, monkeypatch):
    from s3server import CREDENTIALS

    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    _, data, _, _ = case
    options = ["--storage-options", json.dumps(refusing_server.options)]
    fails(capsys, command(case, "s3://bucket/in.zarr", str(tmp_path / "p.zarr"), *options),
          "refused the credentials")
    fails(capsys, command(case, data, "s3://bucket/p.zarr", *options), "refused the credentials")


def test_m2m_test_keeps_its_store_at_a_url(case, local, s3, tmp_path):
    """`m2m test --out URL`: the prediction store in object storage, the .npy files beside the targets."""
    from map2map.infer import npy

    _, _, ckpt, cb = case
    x = store.open_store(case[1]).field("disp")
    for i in range(NSAMPLE):
        (tmp_path / f"s{i}").mkdir()
        np.save(tmp_path / f"s{i}" / "lin.npy", x[i])
        np.save(tmp_path / f"s{i}" / "nbody.npy", np.zeros_like(x[i]))
    out = s3.url("test.zarr")
    s = npy.run(infer.InferConfig(
        load_state=ckpt, out=out, test_in_patterns=(str(tmp_path / "s*" / "lin.npy"),),
        test_tgt_patterns=(str(tmp_path / "s*" / "nbody.npy"),), model="slow.Slow", callback_at=cb, crop=(8,),
        batch_size=2, device="cpu", workers=1, torch_threads=1, progress=False, model_kwargs={"delay": 0},
        storage_options=s3.options_json))
    assert s.output == out
    for i in range(NSAMPLE):
        np.testing.assert_array_equal(np.load(tmp_path / f"s{i}" / "nbody_out.npy"), local[8][i])
    np.testing.assert_array_equal(remote_prediction(s3, out), local[8])
