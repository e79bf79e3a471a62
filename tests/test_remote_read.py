"""Reading stores in object storage (`map2map.data.remote`): windows equal the local decoder, zarr-python and the
wrapped array bit for bit; a window costs requests per shard, not per chunk; FieldDataset over s3:// equals it on
a local disk, also in DataLoader workers.

Fast property tests use fsspec's ``memory://`` filesystem (the same array written there and on a local disk by
zarr-python, with shards and inner chunks never written); a few cases run against the real S3 server of the
`s3` fixture (tests/s3server.py).
"""

from __future__ import annotations

import pickle
import uuid

import fsspec
import numpy as np
import pytest
import torch
import zarr
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from conftest import save_fields
from map2map import convert
from map2map.data import remote, shards
from map2map.data.fields import FieldDataset
from map2map.data.sampler import DistFieldSampler
from map2map.data.windows import ZarrField, hint_window, read_window
from map2map.errors import UserError
from strategies import windows
from test_fields import wrap_window

# (array shape (sample, channel, *spatial), inner chunk, shard) per case; spatial sizes not multiples of the
# shard leave partial edge shards and chunks
LAYOUTS = {
    "3d": ((2, 2, 20, 12, 16), (4, 4, 4), (8, 8, 8)),
    "2d": ((2, 1, 18, 10), (3, 2), (6, 4)),
}


def zeroed(a: np.ndarray, chunk: tuple[int, ...], shard: tuple[int, ...]) -> np.ndarray:
    """`a` with one whole shard of sample 0 and one inner chunk of sample 1 set to 0, which zarr-python then never
    writes (its fill value)."""
    a = a.copy()
    a[(0, slice(None)) + tuple(slice(s, 2 * s) for s in shard)] = 0
    a[(1, slice(None)) + tuple(slice(c, 2 * c) for c in chunk)] = 0
    return a


def write(location: str, a: np.ndarray, chunk, shard) -> None:
    group = zarr.open_group(location, mode="w")
    arr = group.create_array("f", shape=a.shape, dtype=a.dtype, chunks=(1, a.shape[1]) + chunk,
                             shards=(1, a.shape[1]) + shard, compressors=None, fill_value=0)
    arr[...] = a


def memory_url() -> str:
    """A fresh store location in fsspec's memory filesystem (one per process, shared by every instance)."""
    return f"memory://m2m-{uuid.uuid4().hex[:12]}/s.zarr"


def forget(url: str) -> None:
    """Remove the bucket-like top folder of a memory:// store."""
    fsspec.filesystem("memory").rm(url.removeprefix("memory://").split("/")[0], recursive=True)


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def pair(request, tmp_path_factory):
    """(memory:// URL, local path, array): one array in both places, with a shard and a chunk never written."""
    shape, chunk, shard = LAYOUTS[request.param]
    a = zeroed(np.random.default_rng(7).standard_normal(shape).astype(np.float32), chunk, shard)
    url = memory_url()
    local = str(tmp_path_factory.mktemp("remote") / "s.zarr")
    write(url, a, chunk, shard)
    write(local, a, chunk, shard)
    yield url, local, a
    forget(url)


def test_store_has_shards_and_chunks_never_written(pair):
    """The cases the reader must fill with 0 are really there (no object; an index entry of 2**64 - 1)."""
    url, local, a = pair
    src = ZarrField(url, "f", 2)
    reader = src.remote_reader
    assert reader is not None and src.uses_direct_path
    assert reader.index((0, 0) + (1,) * (a.ndim - 2)) is None
    index = reader.index((1, 0) + (0,) * (a.ndim - 2))
    assert index is not None and index[(0, 0) + (1,) * (a.ndim - 2)][0] == shards.MISSING


@given(data=st.data())
def test_windows_equal_local_decoder_and_wrapped_array(pair, data):
    """Any window (wrapping, crossing shards, at the box edge) from memory:// equals the local decoder's and
    numpy.pad(mode="wrap") of the whole array, read with its hint (fetched in the background) or without one
    (each chunk alone), through a small cache or none."""
    url, local, a = pair
    win = data.draw(windows(a.shape[2:], span=25, max_len=30))
    sample = data.draw(st.integers(0, 1))
    cache = data.draw(st.sampled_from([0, 2**12, 2**20]))
    hint = data.draw(st.booleans())
    src = ZarrField(url, "f", 2, cache_bytes=cache)
    got = read_window(src, sample, win, hint=hint)
    assert np.array_equal(got, wrap_window(a[sample], win))
    assert src.remote_reader.pending == 0  # every chunk the hint fetched was read, as often as told
    assert np.array_equal(got, read_window(ZarrField(local, "f", 2), sample, win))


def test_windows_equal_zarr_python(pair):
    url, _, a = pair
    ours, theirs = ZarrField(url, "f", 2), ZarrField(url, "f", 2, direct=False)
    assert ours.remote_reader is not None and not theirs.uses_direct_path
    for sample in (0, 1):
        for lo in (-7, 0, 5):
            win = tuple((lo + i, lo + i + n + 3) for i, n in enumerate(a.shape[2:]))
            want = read_window(theirs, sample, win)
            assert np.array_equal(read_window(ours, sample, win), want)
            assert np.array_equal(want, wrap_window(a[sample], win))


def test_other_layouts_are_read_by_zarr_python():
    """A compressed array in object storage is read by zarr-python, to the same bits."""
    a = np.random.default_rng(3).standard_normal((1, 2, 12, 10)).astype(np.float32)
    url = memory_url()
    group = zarr.open_group(url, mode="w")
    group.create_array("f", shape=a.shape, dtype=a.dtype, chunks=(1, 2, 4, 4), shards=(1, 2, 8, 8), fill_value=0,
                       compressors=zarr.codecs.ZstdCodec())[...] = a
    try:
        src = ZarrField(url, "f", 1)
        assert not src.uses_direct_path and src.remote_reader is None
        win = ((-3, 14), (5, 13))
        assert np.array_equal(read_window(src, 0, win), wrap_window(a[0], win))
    finally:
        forget(url)


@st.composite
def byte_ranges(draw):
    n = draw(st.integers(0, 30))
    return [shards.ByteRange((draw(st.integers(0, 2)),), draw(st.integers(0, 400)), draw(st.integers(1, 60)))
            for _ in range(n)]


@given(ranges=byte_ranges(), gap=st.integers(0, 50), most=st.integers(1, 200))
def test_coalesce(ranges, gap, most):
    """Every range lies whole in its request, of its object; requests are no larger than `most` unless one range
    is; two requests of an object one after the other could not have been one."""
    requests, which = remote.coalesce(ranges, gap, most)
    for r, i in zip(ranges, which):
        q = requests[i]
        assert q.shard == r.shard and q.offset <= r.offset and r.offset + r.nbytes <= q.offset + q.nbytes
    for i, q in enumerate(requests):
        inside = [r for r, j in zip(ranges, which) if j == i]
        assert inside and (q.nbytes <= most or len(inside) == 1)
        assert q.offset == min(r.offset for r in inside)
        assert q.offset + q.nbytes == max(r.offset + r.nbytes for r in inside)
    for p, q in zip(requests, requests[1:]):
        assert (p.shard, p.offset) <= (q.shard, q.offset)
        if p.shard == q.shard:
            joined = max(p.offset + p.nbytes, q.offset + q.nbytes) - p.offset
            assert q.offset > p.offset + p.nbytes + gap or joined > most


class CountingFS:
    """An fsspec filesystem that counts ``cat_ranges`` calls and the ranges they ask for."""

    def __init__(self, fs) -> None:
        self.fs, self.calls, self.ranges = fs, 0, 0

    def cat_ranges(self, paths, starts, ends, **kwargs):
        self.calls += 1
        self.ranges += len(paths)
        return self.fs.cat_ranges(paths, starts, ends, **kwargs)


def test_a_window_costs_requests_per_shard_not_per_chunk(tmp_path):
    """A window over all of a 16^3 sample in 8^3 shards of 2^3 inner chunks: 8 shards, 512 chunks; the reader asks
    for 8 indices in one call, then 8 coalesced ranges in one call."""
    a = np.random.default_rng(1).standard_normal((1, 1, 16, 16, 16)).astype(np.float32)
    url = memory_url()
    write(url, a, (2, 2, 2), (8, 8, 8))
    try:
        src = ZarrField(url, "f", 1)
        counting = src.remote_reader.fs = CountingFS(src.remote_reader.fs)
        win = ((0, 16),) * 3
        assert len(src.window_chunks(0, win)) == 512
        assert (counting.calls, counting.ranges) == (1, 8)  # the indices
        got = read_window(src, 0, win)
        assert np.array_equal(got, a[0])
        assert (counting.calls, counting.ranges) == (2, 16)
        assert (src.remote_reader.fetches, src.remote_reader.requests) == (2, 16)
        assert src.remote_reader.pending == 0  # every chunk fetched was taken by the read
        # read again: the cache holds the chunks, nothing is fetched
        assert np.array_equal(read_window(src, 0, ((-3, 13),) * 3), wrap_window(a[0], ((-3, 13),) * 3))
        assert counting.calls == 2
        # a window longer than the box, no cache: a chunk read once per piece it lies in is fetched once
        src = ZarrField(url, "f", 1, cache_bytes=0)
        counting = src.remote_reader.fs = CountingFS(src.remote_reader.fs)
        win = ((-4, 20), (0, 16), (-1, 18))
        assert np.array_equal(read_window(src, 0, win), wrap_window(a[0], win))
        assert (counting.calls, counting.ranges, src.remote_reader.pending) == (2, 16, 0)
    finally:
        forget(url)


def test_a_window_hinted_again_is_read_once():
    """A window hinted twice before its read (as inference hints the next batch, then reads it with its own hint)
    and an overlapping window hinted before either is read: each chunk is fetched once, and after both reads
    nothing is left pending, even without a cache."""
    a = np.random.default_rng(2).standard_normal((1, 1, 16, 16, 16)).astype(np.float32)
    url = memory_url()
    write(url, a, (2, 2, 2), (8, 8, 8))
    try:
        src = ZarrField(url, "f", 1, cache_bytes=0)
        counting = src.remote_reader.fs = CountingFS(src.remote_reader.fs)
        first, second = ((-2, 6),) * 3, ((2, 10),) * 3
        for win in (first, first, second):
            hint_window(src, 0, win)
        assert src.remote_reader.fetches == 3  # the indices, the first window, what the second adds
        assert np.array_equal(read_window(src, 0, first), wrap_window(a[0], first))
        assert np.array_equal(read_window(src, 0, second, hint=False), wrap_window(a[0], second))
        assert counting.calls == 3 and src.remote_reader.pending == 0
    finally:
        forget(url)


def test_damaged_shards_are_refused():
    """A shard object cut short (its index no longer at its end) or whose chunk runs past its end is an OSError."""
    a = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 1, 8, 8)
    url = memory_url()
    write(url, a, (4, 4), (4, 4))
    fs, root = fsspec.core.url_to_fs(url)
    key = f"{root}/f/c/0/0/0/0"
    whole = fs.cat_file(key)
    try:
        fs.pipe_file(key, whole[:-7])
        with pytest.raises(OSError, match="cut short"):
            read_window(ZarrField(url, "f", 2), 0, ((0, 4), (0, 4)))
        fs.pipe_file(key, whole)  # whole again: readable
        assert np.array_equal(read_window(ZarrField(url, "f", 2), 0, ((0, 4), (0, 4))), a[0, :, :4, :4])
        fs.pipe_file(key, whole[-(16 + 4):])  # the index alone: its chunk runs past the end
        with pytest.raises(OSError, match="cut short"):
            read_window(ZarrField(url, "f", 2), 0, ((0, 4), (0, 4)))
    finally:
        forget(url)


# --------------------------------------------------------------------------- the real S3 server


def converted(tmp_path, s3) -> tuple[str, str, dict[str, list[np.ndarray]]]:
    """(local store, the same store in the bucket, arrays): input ``lr`` 16^3 and target ``hr`` 32^3 (2 samples),
    shards of several inner chunks; one shard of the target never written (removed in both)."""
    arrays = {"lr": save_fields(tmp_path / "npy", "lr", (3, 16, 16, 16), 2, seed=3),
              "hr": save_fields(tmp_path / "npy", "hr", (1, 32, 32, 32), 2, seed=4)}
    local = tmp_path / "s.zarr"
    convert.run(convert.ConvertConfig(output=str(local), field=(f"lr={tmp_path}/npy/lr_*.npy",
                                                                f"hr={tmp_path}/npy/hr_*.npy"),
                                      crop=(8,), pad=2, chunk=(4,), progress=False))
    _, _, *shard = zarr.open_group(str(local), mode="r")["hr"].shards
    (local / "hr" / "c" / "1" / "0" / "1" / "0" / "1").unlink()
    arrays["hr"][1][:, shard[0]:2 * shard[0], :shard[1], shard[2]:2 * shard[2]] = 0
    fs = s3.fs()
    fs.put(str(local), f"{s3.bucket}/s.zarr", recursive=True)
    assert sorted(fs.ls(f"{s3.bucket}/s.zarr", detail=False)) == sorted(
        f"{s3.bucket}/s.zarr/{p.name}" for p in local.iterdir())
    return str(local), s3.url("s.zarr"), arrays


def test_s3_windows_equal_local_and_zarr_python(tmp_path, s3):
    local, url, arrays = converted(tmp_path, s3)
    ours = ZarrField(url, "hr", 2, storage_options=s3.options)
    theirs = ZarrField(url, "hr", 2, direct=False, storage_options=s3.options)
    disk = ZarrField(local, "hr", 2)
    assert ours.remote_reader is not None and not theirs.uses_direct_path and disk.remote_reader is None
    for sample, win in [(1, ((-3, 13), (5, 21), (30, 44))), (1, ((0, 32),) * 3), (0, ((28, 36), (-4, 4), (7, 9)))]:
        got = read_window(ours, sample, win)
        assert np.array_equal(got, wrap_window(arrays["hr"][sample], win))
        assert np.array_equal(got, read_window(theirs, sample, win))
        assert np.array_equal(got, read_window(disk, sample, win))
    assert ours.remote_reader.requests < len(ours.window_chunks(1, ((0, 32),) * 3))


def test_s3_dataset_items_equal_local_items(tmp_path, s3):
    """FieldDataset over s3:// with augmentation and read-ahead: every item equals the local store's bit for bit."""
    local, url, _ = converted(tmp_path, s3)
    kw = dict(in_fields=["lr"], tgt_fields=["hr"], crop=8, in_pad=2, tgt_pad=3, scale_factor=2, augment=True,
              aug_shift=3, aug_add=0.1, seed=11, cache_bytes=2**16)
    there = FieldDataset(store=url, storage_options=s3.options, **kw)
    here = FieldDataset(store=local, **kw)
    assert all(f.remote_reader is not None for f in there.inputs + there.targets)
    sampler = DistFieldSampler(here.nsample, here.crop_counts, seed=2)
    there.follow(sampler, batch_size=2)
    for n, idx in enumerate(sampler.indices().tolist()):
        a, b = there[idx], here[idx]
        assert torch.equal(a["input"], b["input"]) and torch.equal(a["target"], b["target"])
        if n == 0:  # the read-ahead has started fetching the next items' chunks
            assert sum(f.remote_reader.pending for f in there.inputs + there.targets) > 0


def test_s3_dataloader_workers_get_the_options(tmp_path, s3):
    """Two worker processes forked after the parent has read, over s3://: they open their own readers, and the
    endpoint reaches them only through the storage options the readers carry (a pickled dataset, as spawned
    workers get it, too)."""
    local, url, _ = converted(tmp_path, s3)
    kw = dict(in_fields=["lr"], tgt_fields=["hr"], crop=8, in_pad=2, scale_factor=2)
    there = FieldDataset(store=url, storage_options=s3.options, **kw)
    here = FieldDataset(store=local, **kw)
    there[0]  # the parent reads first: forked workers open their own readers
    copy = pickle.loads(pickle.dumps(there))
    assert torch.equal(copy[3]["input"], here[3]["input"])
    loader = DataLoader(there, batch_size=2, num_workers=2, multiprocessing_context="fork")
    seen = 0
    for batch in loader:
        for i, idx in enumerate(batch["index"].tolist()):
            assert torch.equal(batch["input"][i], here[idx]["input"])
            assert torch.equal(batch["target"][i], here[idx]["target"])
            seen += 1
    assert seen == len(here)


def test_s3_missing_store_is_one_line(s3):
    with pytest.raises(UserError, match="does not exist"):
        FieldDataset(store=s3.url("nothing.zarr"), storage_options=s3.options, in_fields=["lr"])

