"""Locations (local paths and fsspec URLs) and the store contract over object storage.

Pure rules (schemes, normalising, joining, options) are checked directly;
the store functions run against fsspec's in-process ``memory://`` filesystem
and a real S3-compatible server (the `s3` fixture: moto's server process on
127.0.0.1), where the refusals are the server's own answers.
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
import xarray as xr
from hypothesis import given
from hypothesis import strategies as st

from map2map import storage, store
from map2map.errors import UserError


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


# ------------------------------------------------------------------ pure rules

@given(st.sampled_from(["s3", "S3", "gs", "memory", "abfs"]), st.text("abc/._-0123", min_size=1, max_size=20))
def test_remote_urls_keep_their_rest_and_lose_trailing_slashes(sch, rest):
    url = f"{sch}://{rest}"
    assert storage.is_remote(url)
    assert storage.scheme(url) == sch.lower()
    assert storage.normalise(url) == f"{sch.lower()}://{rest.rstrip('/')}"
    assert storage.join(url, "a", "b") == f"{sch.lower()}://{rest.rstrip('/')}/a/b"


@given(st.text("abc/._-0123", min_size=1, max_size=20))
def test_file_urls_and_plain_paths_are_local(rest):
    assert not storage.is_remote(rest)
    assert storage.local_path(rest) == rest
    assert storage.local_path("file://" + rest) == rest
    assert storage.normalise("file://" + rest) == rest
    assert storage.join("file://" + rest, "x") == os.path.join(rest, "x")
    with pytest.raises(ValueError):
        storage.local_path("s3://" + rest)


def test_storage_options_are_a_json_object():
    assert storage.parse_options(None) == {}
    assert storage.parse_options("  ") == {}
    assert storage.parse_options('{"endpoint_url": "http://h:1", "anon": true}') == {
        "endpoint_url": "http://h:1", "anon": True}
    for bad, why in (("{not json", "is not JSON"), ("[1]", "not an object"), ('"s"', "not an object")):
        with pytest.raises(UserError, match=why) as err:
            storage.parse_options(bad)
        assert _one_line(err.value).startswith("--storage-options")


def test_unknown_scheme_is_refused_naming_the_option():
    with pytest.raises(UserError, match=r"--data foo://x/y.zarr: unknown URL scheme foo://") as err:
        storage.check_scheme("foo://x/y.zarr", "--data")
    _one_line(err.value)
    storage.check_scheme("s3://bucket/x.zarr", "--data")
    storage.check_scheme("file:///tmp/x", "--data")
    storage.check_scheme("plain/path", "--data")


def test_user_errors_name_the_bucket_or_the_credentials_and_leave_other_failures_alone():
    missing = storage.user_error(FileNotFoundError("The specified bucket does not exist"), "s3://nob/x.zarr")
    assert isinstance(missing, UserError) and "bucket nob does not exist" in _one_line(missing)
    refused = storage.user_error(PermissionError("The AWS Access Key Id you provided does not exist"),
                                 "s3://b/x.zarr")
    assert isinstance(refused, UserError) and "refused the credentials" in _one_line(refused)
    bug = KeyError("x")
    assert storage.user_error(bug, "s3://b/x.zarr") is bug


# ------------------------------------------------------------------ stores over memory://

def _layout(n: int = 8) -> store.FieldLayout:
    return store.FieldLayout(name="a", channels=1, spatial=(n, n), shard=(n, n), chunk=(4, 4), dtype="float32",
                             compressor="none")


def _write(url: str, values: np.ndarray, options=None) -> None:
    group = store.create(url, [_layout(values.shape[-1])], nsample=len(values), boxsize=1.0, settings={},
                         style_names=("D",), storage_options=options)
    group["a"][:] = values
    store.write_styles(url, np.arange(len(values), dtype=np.float32)[:, None], 0, storage_options=options)


def test_a_store_in_memory_is_refused_until_marked_and_opens_with_xarray_after():
    url = f"memory://m2m-{uuid.uuid4().hex}/x.zarr"
    values = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    _write(url, values)
    with pytest.raises(store.IncompleteStoreError, match="incomplete"):
        store.open_store(url)
    store.mark_complete(url, 2)
    st_ = store.open_store(url)
    assert st_.nsample == 2 and st_.path == url
    np.testing.assert_array_equal(st_.field("a")[:], values)
    names, styles = store.read_styles(url)
    assert names == ("D",) and styles[:, 0].tolist() == [0.0, 1.0]
    ds = xr.open_zarr(url, consolidated=True)
    np.testing.assert_array_equal(ds["a"].values, values)
    assert store.stored_bytes(url, "a") >= values.nbytes
    store.remove(url)
    assert not storage.exists(url)
    with pytest.raises(UserError, match="does not exist"):
        store.open_store(url)


def test_object_storage_never_replaces_a_store_it_cannot_swap():
    with pytest.raises(UserError, match="no rename") as err:
        store.staged_path("s3://bucket/train.zarr/")
    assert "s3://bucket/train-2.zarr" in _one_line(err.value)


# ------------------------------------------------------------------ a real S3 server

def test_store_round_trip_on_s3_and_listing(s3):
    url = s3.url("x.zarr")
    values = np.arange(2 * 64, dtype=np.float32).reshape(2, 1, 8, 8)
    _write(url, values, s3.options)
    store.mark_complete(url, 2, storage_options=s3.options)
    st_ = store.open_store(url + "/", storage_options=s3.options)
    np.testing.assert_array_equal(st_.field("a")[:], values)
    assert "zarr.json" in storage.names(url, s3.options) and "a" in storage.names(url, s3.options)
    assert storage.names(s3.url("nothing-here"), s3.options) == []
    # one shard per sample: each is one object
    assert sorted(s3.fs().find(f"{s3.bucket}/x.zarr/a/c")) == [f"{s3.bucket}/x.zarr/a/c/{i}/0/0/0" for i in (0, 1)]


def test_a_missing_bucket_is_one_line(s3):
    url = f"s3://m2m-missing-{uuid.uuid4().hex[:8]}/x.zarr"
    with pytest.raises(UserError) as err:
        store.open_store(url, storage_options=s3.options)
    assert f"bucket {url.split('/')[2]} does not exist" in _one_line(err.value)


def test_refused_credentials_are_one_line(monkeypatch):
    pytest.importorskip("s3fs")
    from s3server import S3Server

    server = S3Server(auth=True)
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        with pytest.raises(UserError, match="refused the credentials") as err:
            store.open_store("s3://anybucket/x.zarr", storage_options=server.options)
        _one_line(err.value)
    finally:
        server.stop()
