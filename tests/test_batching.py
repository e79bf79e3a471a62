"""Reused item buffers and the no-copy collate: memory is recycled only once nothing can see it."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from map2map.data.batching import BufferPool, ItemBuffers, collate
from map2map.data.fields import FieldDataset
from map2map.data.windows import ZarrField, read_window
from test_fields import make_store, wrap_window


def address(a: np.ndarray | torch.Tensor) -> int:
    return a.data_ptr() if isinstance(a, torch.Tensor) else a.__array_interface__["data"][0]


@pytest.mark.parametrize("shared", [False, True])
def test_pool_reuses_only_released_buffers(shared):
    pool = BufferPool(per_size=2, shared=shared)
    a = pool.empty((4, 5))
    addr = address(a)
    b = pool.empty((4, 5))
    assert address(b) != addr  # a is still held
    del a
    c = pool.empty((5, 4))  # same byte size, other shape: a's memory again
    assert address(c) == addr and c.shape == (5, 4) and c.flags.c_contiguous


def hold(a: np.ndarray, how: str):
    """Something made from `a` that keeps seeing its memory."""
    if how == "numpy view":
        return a[1:, ::2]
    if how == "tensor":
        return torch.from_numpy(a)
    if how == "tensor view":
        return torch.from_numpy(a)[1]
    return collate([{"x": torch.from_numpy(a)}])["x"]


@pytest.mark.parametrize("holder", ["numpy view", "tensor", "tensor view", "batch"])
@pytest.mark.parametrize("shared", [False, True])
def test_pool_keeps_buffers_something_still_sees(holder, shared):
    pool = BufferPool(per_size=1, shared=shared)
    a = pool.empty((2, 8))
    a[...] = 7
    held = hold(a, holder)
    del a
    gc.collect()
    b = pool.empty((2, 8))
    b[...] = 0
    assert np.all(np.asarray(held) == 7)
    del held, b
    assert address(pool.empty((2, 8))) == address(pool.buffers[16 * 4][0].data)


def test_pool_stops_pooling_past_its_size():
    pool = BufferPool(per_size=2)
    held = [pool.empty((100,)) for _ in range(4)]
    assert len(pool.buffers[400]) == 2 and len({address(h) for h in held}) == 4


def test_lent_buffer_waits_until_given_back():
    """The lending protocol in one process: pickled, the buffer is lent; the receiver's tensor freed, it is back."""
    import pickle
    from multiprocessing.reduction import ForkingPickler

    from map2map.data.batching import _Lent

    pool = BufferPool(per_size=2, shared=True)
    a = pool.empty((3, 4))
    a[...] = np.arange(12).reshape(3, 4)
    buf = pool.shared_buffer_of(torch.from_numpy(a))
    data = ForkingPickler.dumps(_Lent(buf, torch.from_numpy(a)[1:]))
    addr = address(a)
    del a
    assert buf.lent() and address(pool.empty((3, 4))) != addr  # lent: not refilled
    received = pickle.loads(data)  # what the main process gets: a tensor on a mapping of the same pages
    assert torch.equal(received, torch.arange(4.0, 12).reshape(2, 4))
    assert buf.lent()
    del received
    gc.collect()
    assert not buf.lent() and address(pool.empty((3, 4))) == addr


def test_collate_batch_of_one_is_default_collate_without_copy():
    item = {"input": torch.arange(24.0).reshape(2, 3, 4), "sample": 1, "anchor": torch.tensor([0, 4, 8]),
            "index": 9}
    got, want = collate([item]), default_collate([item])
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k])
    assert got["input"].data_ptr() == item["input"].data_ptr()
    two = collate([item, item])
    assert torch.equal(two["input"], default_collate([item, item])["input"])


def test_held_items_keep_their_values(tmp_path):
    """Items kept by the caller are never overwritten by later reads; released ones lend their memory."""
    path, _ = make_store(tmp_path, {"f": (3, 16, 16, 16)}, crop=[8], pad=2)
    kw = dict(store=path, in_fields=["f"], tgt_fields=["f"], crop=8, in_pad=2, augment=True, seed=3)
    ds, fresh = FieldDataset(**kw), FieldDataset(**kw)
    held = [ds[i] for i in range(len(ds))]
    for i, item in enumerate(held):
        want = fresh[i]
        assert torch.equal(item["input"], want["input"]) and torch.equal(item["target"], want["target"])
    first = address(held[0]["input"])
    del held, item
    assert address(ds[0]["input"]) == first


def test_item_buffers_belong_to_their_dataset(tmp_path):
    """Each dataset recycles its own buffers; a pickled copy (a spawned worker's) starts with none."""
    import pickle

    path, _ = make_store(tmp_path, {"f": (1, 16, 16)}, crop=[8], pad=2)
    a, b = (FieldDataset(store=path, in_fields=["f"], crop=8, in_pad=2) for _ in range(2))
    first = address(a[0]["input"])
    held = b[0]  # b's item lives in b's pool, whatever a's holds
    assert address(held["input"]) != first and address(a[1]["input"]) == first
    pool = a.item_buffers.current()
    assert a.item_buffers.current() is pool and not pool.shared and pool.buffers
    copy = pickle.loads(pickle.dumps(a.item_buffers))
    assert isinstance(copy, ItemBuffers) and copy.current() is not pool and not copy.current().buffers


def test_loader_batches_of_one_equal_items(tmp_path):
    path, _ = make_store(tmp_path, {"f": (1, 16, 16)}, crop=[8], pad=2)
    ds = FieldDataset(store=path, in_fields=["f"], crop=8, in_pad=2, augment=True)
    batches = list(DataLoader(ds, batch_size=1, collate_fn=collate))
    assert len(batches) == len(ds)
    for i, batch in enumerate(batches):
        assert batch["input"].shape == (1, 1, 12, 12) and torch.equal(batch["input"][0], ds[i]["input"])
        assert batch["index"].tolist() == [i]


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_workers_lend_items_to_the_main_process(tmp_path, method, batch_size):
    """Batches from workers arrive on mappings of the workers' buffers, right even when all are held."""
    path, _ = make_store(tmp_path, {"f": (3, 64, 64, 64)}, crop=[32], pad=16, n=1)
    ds = FieldDataset(store=path, in_fields=["f"], tgt_fields=["f"], crop=32, in_pad=16,
                      augment=True, seed=2)
    assert ds[0]["input"].nbytes >= 2**20 > ds[0]["target"].nbytes  # one lent, one copied as usual
    loader = DataLoader(ds, batch_size=batch_size, num_workers=2, collate_fn=collate,
                        multiprocessing_context=method, pin_memory=True)
    batches = list(loader)  # every batch held at once: no worker buffer may be refilled under them
    assert sum(len(b["index"]) for b in batches) == len(ds)
    lent = 0
    for b in batches:
        lent += not b["input"].is_shared()  # lent tensors are mappings of a worker's memfd, not torch shm
        for i, idx in enumerate(b["index"].tolist()):
            want = ds[idx]
            assert torch.equal(b["input"][i], want["input"]) and torch.equal(b["target"][i], want["target"])
            assert tuple(b["anchor"][i].tolist()) == tuple(want["anchor"].tolist())
    assert lent > 0


def test_workers_reuse_buffers_given_back(tmp_path):
    """With batches released as they are consumed, the items stay right while buffers are refilled."""
    path, _ = make_store(tmp_path, {"f": (3, 64, 64, 64)}, crop=[32], n=1)
    ds = FieldDataset(store=path, in_fields=["f"], crop=32, in_pad=16, augment=True, seed=4)
    for epoch in range(2):
        ds.set_epoch(epoch)
        for b in DataLoader(ds, batch_size=1, num_workers=1, collate_fn=collate, prefetch_factor=4):
            assert torch.equal(b["input"][0], ds[int(b["index"])]["input"])


def test_truncated_shard_is_an_error_not_a_crash(tmp_path):
    """A shard cut short (disk full, copy interrupted) is a one-line OSError, never SIGBUS from the mapping."""
    path, arrays = make_store(tmp_path, {"f": (1, 16, 16)}, crop=[8], n=1)
    lay = ZarrField(path, "f", 1).shard_layout
    assert lay is not None  # read by the shard decoder
    shard = lay.file((0, 0, 0, 0))
    data = shard.read_bytes()
    # keep the shard index (at the end) readable but cut chunk bytes out of the middle
    shard.write_bytes(data[: len(data) // 4] + data[-lay.index_bytes:])
    src = ZarrField(path, "f", 1)
    with pytest.raises(OSError, match="is cut short"):
        read_window(src, 0, ((0, 8), (0, 8)))
    os.remove(shard)  # a missing shard reads as the fill value, as in zarr
    fresh = ZarrField(path, "f", 1)
    assert np.array_equal(read_window(fresh, 0, ((0, 8), (0, 8))), np.zeros((1, 8, 8), np.float32))
    assert not np.array_equal(wrap_window(arrays["f"][0], ((0, 8), (0, 8))), 0)
