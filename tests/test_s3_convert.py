"""`m2m convert` and `m2m info` with an object-storage OUTPUT (s3:// on a real S3-compatible server, memory://).

The server is moto's, in its own process on 127.0.0.1 (`s3server`); the `s3`
fixture gives each test a fresh bucket.  A store converted to S3 is compared
with the local conversion of the same files object by object (every key,
every byte), and through xarray.  Stores are tiny (16^3, two samples): each
request to the server takes a few milliseconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from conftest import ROOT, fails, run_m2m, save_fields
from map2map import convert, storage, store
from map2map.data.fields import FieldDataset
from map2map.errors import UserError

pytest.importorskip("s3fs")
pytest.importorskip("moto")

SHARDS_PER_SAMPLE = 8  # (16 / 8)^3: disp's 16^3 grid and dens's 32^3 grid in shards of the crop 8 (16 for dens)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Two samples of a 3-channel 16^3 field ``disp``, a 1-channel 32^3 field ``dens`` (twice as fine) and
    their styles, under ``first/``; two more under ``second/`` for appends."""
    root = tmp_path_factory.mktemp("npy")
    for part, seed in (("first", 1), ("second", 2)):
        save_fields(root / part, "lr", (3, 16, 16, 16), 2, seed=seed)
        save_fields(root / part, "hr", (1, 32, 32, 32), 2, seed=seed + 10)
        (root / part / "styles.csv").write_text(f"Om,D\n0.{seed}1,0.5\n0.{seed}2,0.75\n")
    return root


def fields(inputs: Path, part: str = "first") -> list[str]:
    """The field and style options of the samples in ``inputs/part``."""
    return [f"--field=disp={inputs}/{part}/lr_*.npy", f"--field=dens={inputs}/{part}/hr_*.npy",
            f"--styles={inputs}/{part}/styles.csv"]


def config(output: str, inputs: Path, part: str = "first", **kw) -> convert.ConvertConfig:
    specs = tuple(f.removeprefix("--field=") for f in fields(inputs, part) if f.startswith("--field="))
    return convert.ConvertConfig(output=output, field=specs, styles=f"{inputs}/{part}/styles.csv", crop=(8,), pad=2,
                                 boxsize=64.0, progress=False, **kw)


def local_store(tmp_path: Path, inputs: Path, *, append: bool = False) -> Path:
    out = tmp_path / "local.zarr"
    convert.run(config(str(out), inputs))
    if append:
        convert.run(config(str(out), inputs, "second", append=True))
    return out


def local_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def objects(s3, name: str) -> dict[str, bytes]:
    """Every object under ``s3://bucket/name`` (key relative to it -> bytes)."""
    fs = s3.fs()
    prefix = f"{s3.bucket}/{name}/"
    return {key[len(prefix):]: fs.cat_file(key) for key in sorted(fs.find(f"{s3.bucket}/{name}"))}


def assert_same_dataset(local: Path, url: str, options: dict) -> None:
    """Every variable and every attribute of the two stores, opened by xarray, equal bit for bit."""
    a = xr.open_zarr(local)
    b = xr.open_zarr(url, storage_options=options)
    assert sorted(a.variables) == sorted(b.variables)
    for name in a.variables:
        assert a[name].dims == b[name].dims and a[name].dtype == b[name].dtype, name
        assert np.array_equal(a[name].values, b[name].values), name
        assert a[name].attrs == b[name].attrs, name
    assert a.attrs == b.attrs and b.attrs[store.ATTR]["complete"]


def convert_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_m2m("convert", *args, "--no-progress", cwd=ROOT, timeout=timeout)


def test_convert_to_s3_writes_the_local_store_object_for_object(tmp_path, inputs, s3):
    """Through the real CLI with two worker processes: the same keys, the same bytes, one object per shard."""
    url = s3.url("train.zarr")
    done = convert_cli(url, *fields(inputs), "--crop", "8", "--pad", "2", "--boxsize", "64", "--workers", "2",
                       "--storage-options", s3.options_json)
    assert done.returncode == 0, done.stderr
    assert f"{url}: wrote 2 samples, complete" in done.stdout
    assert "note: no writer lock on" in done.stdout
    local = local_store(tmp_path, inputs)
    assert objects(s3, "train.zarr") == local_files(local)
    assert_same_dataset(local, url, s3.options)
    for name in ("disp", "dens"):
        shards = [k for k in objects(s3, "train.zarr") if k.startswith(f"{name}/c/")]
        assert len(shards) == 2 * SHARDS_PER_SAMPLE, shards  # a shard is one object, none left out
    st = store.open_store(url, storage_options=s3.options)
    assert st.nsample == 2 and st.meta["complete"]
    names, values = store.read_styles(st)
    assert names == ("Om", "D") and np.array_equal(values, np.float32([[0.11, 0.5], [0.12, 0.75]]))


def test_each_shard_is_written_by_one_put_before_the_completion_mark(tmp_path, inputs, s3, monkeypatch):
    """Counted at the filesystem: every shard object is PUT once (the tasks write whole shards) and never
    read first, and the group metadata says complete only in PUTs after the last shard's."""
    import s3fs

    puts: list[tuple[str, bool]] = []  # (key, whether it is the group metadata saying complete)
    pipe = s3fs.S3FileSystem._pipe_file
    group_key = f"{s3.bucket}/one.zarr/zarr.json"

    async def recorded(self, path, data, *args, **kwargs):
        complete = path == group_key and bool(json.loads(data)["attributes"].get(store.ATTR, {}).get("complete"))
        puts.append((path, complete))
        return await pipe(self, path, data, *args, **kwargs)

    gets: list[str] = []
    cat = s3fs.S3FileSystem._cat_file

    async def read(self, path, *args, **kwargs):
        gets.append(path)
        return await cat(self, path, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_pipe_file", recorded)
    monkeypatch.setattr(s3fs.S3FileSystem, "_cat_file", read)
    convert.run(config(s3.url("one.zarr"), inputs, workers=1, storage_options=s3.options))
    assert not [key for key in gets if "/disp/c/" in key or "/dens/c/" in key]
    shards = [i for i, (key, _) in enumerate(puts) if "/disp/c/" in key or "/dens/c/" in key]
    assert len(shards) == len({puts[i][0] for i in shards}) == 2 * 2 * SHARDS_PER_SAMPLE
    marks = [i for i, (_, complete) in enumerate(puts) if complete]
    assert marks and max(shards) < min(marks) and puts[-1][0] == group_key


def test_append_on_s3_equals_the_local_append(tmp_path, inputs, s3, monkeypatch):
    """The first conversion is cut into small tasks for two worker processes, which get the storage options."""
    url = s3.url("grow.zarr")
    spawned, pool = [], convert._pool

    def recorded_pool(workers: int):
        spawned.append(workers)
        return pool(workers)

    with monkeypatch.context() as small:
        small.setattr(convert, "UNIT_BYTES", 16 * 2**10)
        small.setattr(convert, "_pool", recorded_pool)
        convert.run(config(url, inputs, workers=2, storage_options=s3.options))
    assert spawned == [2]
    summary = convert.run(config(url, inputs, "second", append=True, storage_options=s3.options))
    assert (summary.nsample, summary.appended) == (4, 2)
    local = local_store(tmp_path, inputs, append=True)
    assert objects(s3, "grow.zarr") == local_files(local)
    assert_same_dataset(local, url, s3.options)


def test_overwrite_of_a_complete_s3_store_is_refused_and_keeps_it(tmp_path, inputs, s3, capsys):
    url = s3.url("keep.zarr")
    convert.run(config(url, inputs, storage_options=s3.options))
    before = objects(s3, "keep.zarr")
    line = fails(capsys, ["convert", url, *fields(inputs, "second"), "--overwrite", "--no-progress",
                          "--storage-options", s3.options_json], "no rename", "keep-2.zarr")
    assert url in line
    fails(capsys, ["convert", url, *fields(inputs, "second"), "--no-progress", "--storage-options", s3.options_json],
          "exists and is complete")
    assert objects(s3, "keep.zarr") == before


def test_a_prefix_that_is_no_map2map_store_is_refused_and_nothing_deleted(inputs, s3, capsys):
    fs = s3.fs()
    fs.pipe_file(f"{s3.bucket}/theirs.zarr/notes.txt", b"not ours")
    for extra in ([], ["--overwrite"]):
        fails(capsys, ["convert", s3.url("theirs.zarr"), *fields(inputs), *extra, "--no-progress",
                       "--storage-options", s3.options_json], "is not a map2map store")
    assert objects(s3, "theirs.zarr") == {"notes.txt": b"not ours"}


def test_an_incomplete_store_holding_foreign_objects_is_not_deleted(inputs, s3, capsys):
    url = s3.url("mixed.zarr")
    convert.run(config(url, inputs, storage_options=s3.options))
    group = store.open_group(url, "r+", s3.options)
    group.attrs[store.ATTR] = dict(group.attrs[store.ATTR], complete=False)
    s3.fs().pipe_file(f"{s3.bucket}/mixed.zarr/notes.txt", b"mine")
    before = objects(s3, "mixed.zarr")
    fails(capsys, ["convert", url, *fields(inputs), "--no-progress", "--storage-options", s3.options_json],
          "notes.txt", "nothing was deleted")
    assert objects(s3, "mixed.zarr") == before


def test_an_output_inside_a_store_on_s3_is_refused(inputs, s3, capsys):
    outer = s3.url("outer.zarr")
    convert.run(config(outer, inputs, storage_options=s3.options))
    for inner in (s3.url("outer.zarr", "inner.zarr"), s3.url("outer.zarr", "deeper", "inner.zarr")):
        fails(capsys, ["convert", inner, *fields(inputs), "--no-progress", "--storage-options", s3.options_json],
              "is inside the map2map store", outer)
    assert not s3.fs().exists(f"{s3.bucket}/outer.zarr/inner.zarr")


def test_remote_outputs_nest_with_remote_inputs_by_whole_segments():
    """Decided before any request: the same URL, inside one, or around one."""
    check = store.check_output_path
    with pytest.raises(UserError, match="is the input"):
        check("s3://b/a.zarr/", inputs=["S3://b/a.zarr"])
    with pytest.raises(UserError, match="is inside the input"):
        check("s3://b/a.zarr/x.zarr", inputs=["s3://b/a.zarr"])
    with pytest.raises(UserError, match="contains the input"):
        check("s3://b/a", inputs=["s3://b/a/x.zarr", "/tmp/local.npy"])
    name = f"m2m-{uuid.uuid4().hex[:8]}"  # no relation: a sibling sharing a name's beginning, another scheme
    check(f"memory://{name}/a.zarr", inputs=[f"memory://{name}/a.zarr2", f"s3://{name}/a.zarr", "/tmp/a.zarr"])


def test_memory_urls_convert_in_this_process(tmp_path, inputs):
    """memory:// lives in one process: converted without worker processes, even when asked for them."""
    url = f"memory://m2m-{uuid.uuid4().hex[:8]}/train.zarr"
    try:
        convert.run(config(url, inputs, workers=2))
        st = store.open_store(url)
        local = store.open_store(local_store(tmp_path, inputs))
        for name in ("disp", "dens"):
            assert np.array_equal(st.group[name][:], local.group[name][:])
        assert st.meta == local.meta
    finally:
        store.remove(url)


def test_file_urls_are_local_paths(tmp_path, inputs):
    summary = convert.run(config(f"file://{tmp_path}/url.zarr/", inputs))
    assert summary.output == str(tmp_path / "url.zarr")
    assert local_files(tmp_path / "url.zarr") == local_files(local_store(tmp_path, inputs))


def test_info_lists_an_s3_store_as_a_local_one(tmp_path, inputs, s3):
    url = s3.url("info.zarr")
    convert.run(config(url, inputs, storage_options=s3.options))
    local = local_store(tmp_path, inputs)
    remote = run_m2m("info", url, "--storage-options", s3.options_json, cwd=ROOT)
    assert remote.returncode == 0, remote.stderr
    here = run_m2m("info", str(local), cwd=ROOT)
    assert remote.stdout.splitlines()[0] == f"store      {url}"
    assert remote.stdout.splitlines()[1:] == here.stdout.splitlines()[1:]  # stored bytes included


def test_a_killed_convert_leaves_a_refused_store_and_a_rerun_finishes_it(tmp_path, inputs, monkeypatch):
    """SIGKILL once the first shard object exists (the server delays every request, so the writer is mid-way)."""
    from s3server import CREDENTIALS, S3Server, make_bucket

    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    server = S3Server(latency=0.02)
    try:
        s3 = make_bucket(server)
        url = s3.url("killed.zarr")
        args = [sys.executable, "-m", "map2map.cli", "convert", url, *fields(inputs), "--crop", "8", "--pad", "2",
                "--boxsize", "64", "--no-progress", "--storage-options", s3.options_json]
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # its worker processes die with it
        fs = s3.fs()
        deadline = time.monotonic() + 120
        while not any("/c/" in k and ("/disp/" in k or "/dens/" in k) for k in fs.find(f"{s3.bucket}/killed.zarr")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        assert proc.poll() is None, "the conversion ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        with pytest.raises(store.IncompleteStoreError, match="incomplete"):
            store.open_store(url, storage_options=s3.options)
        with pytest.raises(store.IncompleteStoreError, match="incomplete"):  # the training reader
            FieldDataset(store=url, in_fields=["disp"], tgt_fields=["dens"], scale_factor=2,
                         storage_options=s3.options)
        info = run_m2m("info", url, "--storage-options", s3.options_json, cwd=ROOT)
        assert info.returncode == 0 and "complete   NO" in info.stdout, info.stderr
        again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr
        assert "incomplete store from an interrupted run: converting it again" in again.stdout
        local = local_store(tmp_path, inputs)
        assert objects(s3, "killed.zarr") == local_files(local)
        assert_same_dataset(local, url, s3.options)
    finally:
        server.stop()


# ------------------------------------------------------------------ bad input, one line and exit 2

@pytest.fixture(scope="module")
def refusing_server():
    """A server that refuses every key (authentication on from the first request)."""
    from s3server import S3Server

    server = S3Server(auth=True)
    yield server
    server.stop()


def _one_line_exit_2(done: subprocess.CompletedProcess, *needles: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("options, needle", [("{not json", "is not JSON"), ("[1]", "not an object")])
@pytest.mark.parametrize("command", ["convert", "info"])
def test_malformed_storage_options(tmp_path, inputs, command, options, needle):
    where = ["s3://bucket/x.zarr", *fields(inputs)] if command == "convert" else ["s3://bucket/x.zarr"]
    _one_line_exit_2(run_m2m(command, *where, "--storage-options", options, cwd=ROOT), "--storage-options", needle)


@pytest.mark.parametrize("command", ["convert", "info"])
def test_unknown_scheme(inputs, command):
    where = ["foo://x/y.zarr", *fields(inputs)] if command == "convert" else ["foo://x/y.zarr"]
    _one_line_exit_2(run_m2m(command, *where, cwd=ROOT), "foo://x/y.zarr", "unknown URL scheme foo://")


def test_a_bucket_that_does_not_exist(inputs, s3):
    url = f"s3://{s3.bucket}-missing/x.zarr"
    _one_line_exit_2(convert_cli(url, *fields(inputs), "--storage-options", s3.options_json),
                     f"bucket {s3.bucket}-missing does not exist")
    done = run_m2m("info", url, "--storage-options", s3.options_json, cwd=ROOT)
    _one_line_exit_2(done, url)


@pytest.mark.parametrize("command", ["convert", "info"])
def test_refused_credentials(inputs, refusing_server, command, monkeypatch):
    from s3server import CREDENTIALS

    for key, value in CREDENTIALS.items():  # keys the server does not know (it knows none)
        monkeypatch.setenv(key, value)
    options = json.dumps(refusing_server.options)
    where = ["s3://bucket/x.zarr", *fields(inputs)] if command == "convert" else ["s3://bucket/x.zarr"]
    _one_line_exit_2(run_m2m(command, *where, "--storage-options", options, cwd=ROOT),
                     "s3://bucket/x.zarr", "refused the credentials")


def test_storage_options_reach_the_config_as_a_dict():
    cfg = convert.ConvertConfig(output="s3://b/x.zarr", field=("a=b",), storage_options='{"anon": true}')
    assert cfg.storage_options == {"anon": True}
    assert storage.is_remote(convert.output_location(cfg.output))
    assert convert.output_location("file:///tmp/x.zarr/") == "/tmp/x.zarr"
