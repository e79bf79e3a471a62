"""Reused item buffers, and the collate function that moves them to the trainer without copies.

A training item is large (3 x 224^3 float32 is 135 MB at crop 128 + pad 48)
and short-lived.  Allocating it afresh costs more than filling it: the kernel
faults in and zeroes every page, which here runs at about a quarter of the
speed of writing into memory already mapped.  And a DataLoader worker hands
each batch to the main process by copying it into fresh shared memory, which
costs as much again as reading the item.

A dataset owns its item buffers as an `ItemBuffers`: in each process a pool
of buffers (`BufferPool`), handed out again only once nothing references
them.  In a DataLoader worker (on Linux) the buffers are shared memory
(memfd) that `collate` lends to the main process: the main process maps the
same pages instead of receiving a copy, and the worker reuses a buffer once
the main process has let go of it.  `collate` finds the pool through the
worker's dataset (its ``item_buffers`` attribute).  In the main process
`collate` makes a batch of one a view of its item.
"""

from __future__ import annotations

import math
import mmap
import os
import sys
import weakref
from multiprocessing.reduction import DupFd
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate, get_worker_info

_HEADER = mmap.PAGESIZE  # a shared buffer starts with two int64 counters: times lent, times given back
_SHARE_MIN_BYTES = 2**20  # smaller tensors go the usual way


class _Buffer:
    """Plain process memory."""

    def __init__(self, nbytes: int) -> None:
        self.data = np.empty(nbytes, dtype=np.uint8)

    def lent(self) -> bool:
        """Whether another process may still be reading it."""
        return False


class _SharedBuffer(_Buffer):
    """Shared memory that another process can map (see `_Lent`); counts how often it was lent and returned."""

    def __init__(self, nbytes: int) -> None:
        self.fd = os.memfd_create("map2map-item", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, _HEADER + nbytes)
        mm = mmap.mmap(self.fd, _HEADER + nbytes)
        self.counts = np.frombuffer(mm, dtype=np.int64, count=2)
        self.data = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=_HEADER)
        self.address = self.data.__array_interface__["data"][0]

    def __del__(self) -> None:
        if hasattr(self, "fd"):
            os.close(self.fd)

    def lent(self) -> bool:
        return bool(self.counts[0] != self.counts[1])

    def holds(self, t: torch.Tensor) -> bool:
        return self.address <= t.data_ptr() and t.data_ptr() + t.nbytes <= self.address + self.data.nbytes


def _free_refcount() -> int:
    """What `sys.getrefcount` reports for a buffer's data nothing else references (calibrated, not assumed)."""
    probe = [_Buffer(0)]
    return sys.getrefcount(probe[0].data)


class BufferPool:
    """Arrays whose memory is recycled once every array, view and tensor made from it is gone.

    A buffer is free when its reference count is the pool's own (numpy views
    reference it, and ``torch.from_numpy`` keeps the array it wraps alive, so
    a tensor or batch still in use holds its buffer) and, for shared buffers,
    when no other process still maps it.  At most `per_size` buffers of each
    byte size are kept; past that, arrays are allocated as usual and not
    pooled.
    """

    def __init__(self, per_size: int = 3, shared: bool = False) -> None:
        self.per_size = per_size
        self.shared = shared
        self.buffers: dict[int, list[_Buffer]] = {}
        self._free = _free_refcount()

    def __getstate__(self) -> dict:
        return dict(self.__dict__, buffers={})  # buffers never travel to other processes

    def empty(self, shape: tuple[int, ...], dtype: np.dtype | type = np.float32) -> np.ndarray:
        """An uninitialised C-contiguous array of `shape`, on a recycled buffer when one is free."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        pool = self.buffers.setdefault(nbytes, [])
        for i in range(len(pool)):
            if sys.getrefcount(pool[i].data) == self._free and not pool[i].lent():
                return pool[i].data.view(dtype).reshape(shape)
        if len(pool) >= self.per_size:
            return np.empty(shape, dtype=dtype)
        pool.append(_SharedBuffer(nbytes) if self.shared else _Buffer(nbytes))
        return pool[-1].data.view(dtype).reshape(shape)

    def shared_buffer_of(self, t: torch.Tensor) -> _SharedBuffer | None:
        """The shared buffer `t` lies in, if any."""
        for pool in self.buffers.values():
            for buf in pool:
                if isinstance(buf, _SharedBuffer) and buf.holds(t):
                    return buf
        return None


class ItemBuffers:
    """The item buffers of one dataset: a `BufferPool` per process, made on first use in each.

    In a DataLoader worker on Linux the pool's buffers are shared memory that
    `collate` can lend (a forked worker starts its own pool; a pickled copy
    travels without buffers); elsewhere they are plain memory.
    """

    def __init__(self) -> None:
        self._pid: int | None = None
        self._pool: BufferPool | None = None

    def __getstate__(self) -> dict:
        return {"_pid": None, "_pool": None}

    def current(self) -> BufferPool:
        """This process's pool."""
        if self._pool is None or self._pid != os.getpid():
            shared = get_worker_info() is not None and hasattr(os, "memfd_create")
            self._pid, self._pool = os.getpid(), BufferPool(per_size=4 if shared else 3, shared=shared)
        return self._pool


def _worker_pool() -> BufferPool | None:
    """In a DataLoader worker, the pool of the worker's dataset (None if it owns no `ItemBuffers`)."""
    buffers = getattr(get_worker_info().dataset, "item_buffers", None)
    return buffers.current() if isinstance(buffers, ItemBuffers) else None


class _Lent:
    """A contiguous tensor in a shared buffer, pickled as the buffer's descriptor rather than its bytes.

    Unpickled (in the main process) it becomes a plain tensor on a mapping of
    the same memory; when that tensor is freed the mapping counts the buffer
    as given back, so the worker may fill it again.
    """

    def __init__(self, buf: _SharedBuffer, t: torch.Tensor) -> None:
        self.buf, self.t = buf, t

    def __reduce__(self):
        self.buf.counts[0] += 1  # lent: the worker must not refill it until it is given back
        offset = self.t.data_ptr() - self.buf.address
        dtype = _numpy_dtype(self.t.dtype).str
        return _map_lent, (DupFd(self.buf.fd), self.buf.data.nbytes, offset, tuple(self.t.shape), dtype)


def _map_lent(fd: DupFd, nbytes: int, offset: int, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    """The tensor a `_Lent` stands for, on a mapping of its worker's buffer."""
    fd = fd.detach()
    try:
        mm = mmap.mmap(fd, _HEADER + nbytes)
    finally:
        os.close(fd)
    counts = np.frombuffer(mm, dtype=np.int64, count=2)
    arr = np.frombuffer(mm, dtype=dtype, count=math.prod(shape), offset=_HEADER + offset).reshape(shape)
    weakref.finalize(arr, _give_back, counts)
    return torch.from_numpy(arr)


def _give_back(counts: np.ndarray) -> None:
    counts[1] += 1


def _lend(values: list[torch.Tensor], pool: BufferPool) -> _Lent | torch.Tensor:
    """`values` stacked along a new first axis, in a shared buffer (the item's own for a batch of one).

    When the pool has no shared buffer to spare, the stacked tensor goes the usual way.
    """
    buf = pool.shared_buffer_of(values[0]) if len(values) == 1 else None
    if buf is not None and values[0].is_contiguous():
        return _Lent(buf, values[0].unsqueeze(0))
    out = torch.from_numpy(pool.empty((len(values),) + tuple(values[0].shape), _numpy_dtype(values[0].dtype)))
    torch.stack(values, out=out)
    buf = pool.shared_buffer_of(out)
    return _Lent(buf, out) if buf is not None else out


def collate(batch: list[Any]) -> Any:
    """`default_collate`, without the copies it makes of large tensors.

    In the main process a batch of one item is its tensors with a leading
    axis of length one (views).  In a DataLoader worker whose dataset has
    shared item buffers (see `ItemBuffers`), tensors of 1 MiB or more are
    lent to the main process instead of copied into fresh shared memory.
    Everything else is collated as `default_collate` does.
    """
    if not isinstance(batch[0], dict):
        return default_collate(batch)
    if get_worker_info() is None:
        if len(batch) != 1:
            return default_collate(batch)
        return {k: v.unsqueeze(0) if isinstance(v, torch.Tensor) else default_collate([v])
                for k, v in batch[0].items()}
    pool = _worker_pool()
    out = {}
    for k in batch[0]:
        values = [item[k] for item in batch]
        lend = (pool is not None and pool.shared and isinstance(values[0], torch.Tensor)
                and values[0].nbytes >= _SHARE_MIN_BYTES)
        out[k] = _lend(values, pool) if lend and _numpy_dtype(values[0].dtype) else default_collate(values)
    return out


def _numpy_dtype(dtype: torch.dtype) -> np.dtype | None:
    """The numpy dtype of a torch dtype, None if numpy has none (bfloat16)."""
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:
        return None
