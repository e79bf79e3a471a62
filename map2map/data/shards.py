"""The shard decoder: inner chunks of uncompressed sharded Zarr arrays on a local disk, memory-mapped.

Terms.  A *shard* is one file of a sharded Zarr (format 3) array; it holds a
block of *inner chunks* followed by its *index*: one ``(offset, nbytes)``
pair of little-endian uint64 per inner chunk, in C order, then a crc32c
checksum (the layout of the Zarr v3 sharding specification with the index
at the end).  An inner chunk never written has both entries ``2**64 - 1``;
a shard file never written reads as the fill value, 0.

This is the layout `m2m convert` writes by default (no compression, the
sharding codec with only the bytes codec inside).  For it a window is
copied straight out of the page cache: the index of a shard is read once
and checked against the file size (a shard cut short is an `OSError`, not a
SIGBUS from a mapping past the end of the file), and each inner chunk is
memory-mapped at its byte range.  zarr-python 3.1 reads inner chunks one by
one through its async machinery at 0.1-0.4 GB/s, and ``pread`` into a
buffer costs one more pass over every byte.  The same layout in object
storage is read by `map2map.data.remote` (which shares `IndexedShards` and
`sharded_layout` with this module); any other layout or codec is read by
zarr-python itself (see `map2map.data.windows`).

Read-ahead.  A *byte range* (`ByteRange`) is a run of bytes in one shard
file.  Bytes not in the page cache reach a mapping by page faults, each
reading a little around itself and waiting for it, so the disk idles while
the copy runs and the copy waits while the disk reads.  `ShardReader.hint`
asks the kernel to read byte ranges in now (``posix_fadvise(WILLNEED)``:
the reads are queued and the call returns without waiting for them); a
reader that hints a whole window before copying it keeps the disk busy while
it copies.  Hinted pages are page cache, not the process's memory: they add
nothing to its resident size.  The writer chooses the order of the chunks in
a shard's file (zarr-python: Morton order), so `ShardReader.file_order` puts
chunks in the order of their bytes, and the disk reads each shard front to
back.

`ChunkCache` holds recently used chunks (these mappings, or chunks zarr
decoded) within a byte bound.  A `ShardReader` keeps descriptors of the
shard files it reads open, a bounded number of them; it belongs to one
process (the reader of `map2map.data.windows.ZarrField` makes a new one
after a fork).
"""

from __future__ import annotations

import math
import mmap
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Iterable, NamedTuple

import numpy as np

MISSING = np.uint64(2**64 - 1)  # both index entries of an inner chunk never written
OPEN_FILES = 64  # shard files a reader keeps open
HINT_PIECE = 2**17  # bytes per read-ahead request (the kernel reads at most its device's read-ahead size per request)


class ChunkCache:
    """Chunks keyed by (sample, chunk index), evicted least recently used past `max_bytes`.

    A chunk larger than the whole bound is not kept.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.items: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def __contains__(self, key: tuple) -> bool:
        """Whether `key` is held (its place in the eviction order unchanged)."""
        return key in self.items

    def get(self, key: tuple) -> np.ndarray | None:
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key: tuple, value: np.ndarray) -> None:
        if value.nbytes > self.max_bytes:
            return
        self.items[key] = value
        self.nbytes += value.nbytes
        while self.nbytes > self.max_bytes:
            _, old = self.items.popitem(last=False)
            self.nbytes -= old.nbytes


class ByteRange(NamedTuple):
    """`nbytes` bytes at `offset` in the file of the shard at shard coordinates `shard`."""

    shard: tuple[int, ...]
    offset: int
    nbytes: int


def merge_ranges(ranges: Iterable[ByteRange]) -> list[ByteRange]:
    """`ranges` in the same order, each one that starts in its shard's file where the one before it
    ends merged into that one."""
    merged: list[ByteRange] = []
    for r in ranges:
        if merged and merged[-1].shard == r.shard and merged[-1].offset + merged[-1].nbytes == r.offset:
            merged[-1] = merged[-1]._replace(nbytes=merged[-1].nbytes + r.nbytes)
        else:
            merged.append(r)
    return merged


def skip_ranges(ranges: Iterable[ByteRange], nbytes: int) -> list[ByteRange]:
    """`ranges` less their first `nbytes` bytes (the range holding the cut starting where it is cut)."""
    kept, left = [], max(0, nbytes)
    for r in ranges:
        if left >= r.nbytes:
            left -= r.nbytes
            continue
        kept.append(r._replace(offset=r.offset + left, nbytes=r.nbytes - left) if left else r)
        left = 0
    return kept


def bound_ranges(ranges: Iterable[ByteRange], max_bytes: int | None) -> list[ByteRange]:
    """The leading part of `ranges` holding at most `max_bytes` bytes (the last range cut short to fit);
    all of them if `max_bytes` is None."""
    if max_bytes is None:
        return list(ranges)
    kept, left = [], max(0, max_bytes)
    for r in ranges:
        if left <= 0:
            break
        kept.append(r if r.nbytes <= left else r._replace(nbytes=left))
        left -= kept[-1].nbytes
    return kept


@dataclass(frozen=True)
class ShardLayout:
    """Where and how an uncompressed sharded array lays out its bytes (shapes over all dims)."""

    root: PurePath               # the array's directory (or key prefix in object storage)
    shard: tuple[int, ...]       # shard shape
    chunk: tuple[int, ...]       # inner chunk shape
    dtype: np.dtype              # little-endian
    encode_key: object           # shard coordinates -> file name under `root` (the array's key encoding)

    @property
    def per_shard(self) -> tuple[int, ...]:
        """Inner chunks per shard along each dim."""
        return tuple(s // c for s, c in zip(self.shard, self.chunk))

    @property
    def index_bytes(self) -> int:
        """Size of a shard's index: an (offset, nbytes) uint64 pair per inner chunk, then a crc32c."""
        return math.prod(self.per_shard) * 16 + 4

    def file(self, shard: tuple[int, ...]) -> PurePath:
        """The file of the shard at shard coordinates `shard`."""
        return self.root / self.encode_key(shard)


def sharded_layout(arr, root: PurePath) -> ShardLayout | None:
    """The layout of the zarr array `arr`, with its shard files under `root`, if its codecs are the ones
    this module decodes (uncompressed, sharded with the index at the end, little-endian), else None."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

    codecs = arr.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sharding = codecs[0]
    inner_ok = len(sharding.codecs) == 1 and isinstance(sharding.codecs[0], BytesCodec)
    index_ok = (len(sharding.index_codecs) == 2 and isinstance(sharding.index_codecs[1], Crc32cCodec)
                and sharding.index_location.value == "end")
    dtype = np.dtype(arr.dtype)
    little = dtype.itemsize == 1 or (sharding.codecs[0].endian is not None
                                      and sharding.codecs[0].endian.value == "little")
    if not (inner_ok and index_ok and little):
        return None
    return ShardLayout(root, tuple(arr.shards), tuple(sharding.chunk_shape), dtype.newbyteorder("<"),
                       arr.metadata.encode_chunk_key)


def layout_of(arr) -> ShardLayout | None:
    """The layout of the zarr array `arr` if this module can read it (`sharded_layout`, in a local store),
    else None."""
    from zarr.storage import LocalStore

    store = arr.store_path.store
    if not isinstance(store, LocalStore):
        return None
    return sharded_layout(arr, Path(store.root) / arr.store_path.path)


def check_index(index: np.ndarray, size: int, shard: tuple[int, ...], where: str) -> None:
    """Refuse a shard whose index points past the end of its file of `size` bytes (cut short: mapping
    it would SIGBUS)."""
    written = index[..., 0] != MISSING
    ends = index[..., 0][written] + index[..., 1][written]
    if ends.size and int(ends.max()) > size:
        raise OSError(f"shard {shard} of {where} is cut short: its chunks need {int(ends.max())} bytes, "
                      f"the file has {size}")


def map_chunk(fd: int, offset: int, nbytes: int, dtype: np.dtype) -> np.ndarray:
    """The `nbytes` at `offset` of the file `fd` as a read-only array, memory-mapped (unmapped when freed).

    The caller has checked the range lies in the file (`check_index`).
    """
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    mm = mmap.mmap(fd, offset + nbytes - start, offset=start, access=mmap.ACCESS_READ)
    return np.frombuffer(mm, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset - start)


class IndexedShards:
    """What every reader of layout `layout` shares: shard indices kept per shard (`index`, made by
    subclasses), and where an inner chunk lies.  `where` names the array in errors."""

    def __init__(self, layout: ShardLayout, where: str) -> None:
        self.layout = layout
        self.where = where
        self._index: dict[tuple, np.ndarray | None] = {}

    def index(self, shard: tuple[int, ...]) -> np.ndarray | None:
        """The shard's index, shaped ``per_shard + (2,)``; None if the shard was never written."""
        raise NotImplementedError

    def load_indices(self, shards: Iterable[tuple[int, ...]]) -> None:
        """Read the indices of `shards` not read yet (one by one here; a remote reader asks for them all at once)."""
        for shard in shards:
            self.index(shard)

    def shard_of(self, cidx: tuple[int, ...]) -> tuple[int, ...]:
        """Shard coordinates of the inner chunk at chunk coordinates `cidx` (all dims)."""
        return tuple(i * c // s for i, c, s in zip(cidx, self.layout.chunk, self.layout.shard))

    def chunk_bytes(self, cidx: tuple[int, ...]) -> ByteRange | None:
        """Where the inner chunk at chunk coordinates `cidx` (all dims) lies; None if never written."""
        lay = self.layout
        shard = self.shard_of(cidx)
        index = self.index(shard)
        if index is None:
            return None
        offset, nbytes = index[tuple(i % p for i, p in zip(cidx, lay.per_shard))]
        return None if offset == MISSING else ByteRange(shard, int(offset), int(nbytes))

    def file_order(self, cidxs: Iterable[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """The inner chunks `cidxs` (chunk coordinates, all dims) shard by shard (shards in C order), and
        within a shard in the order its file holds them (never written ones first)."""
        def key(cidx):
            where = self.chunk_bytes(cidx)
            return (self.shard_of(cidx), -1 if where is None else where.offset)
        return sorted(cidxs, key=key)

    def cut(self, data: np.ndarray, cidx: tuple[int, ...], extent: tuple[int, ...]) -> np.ndarray:
        """The inner chunk `data` at chunk coordinates `cidx` cut to `extent` (the array's shape): a chunk
        at the array's end has padding the array does not cover."""
        chunk = self.layout.chunk
        if any((i + 1) * c > n for i, c, n in zip(cidx, chunk, extent)):
            data = data[tuple(slice(0, min(c, n - i * c)) for i, c, n in zip(cidx, chunk, extent))]
        return data


class ShardReader(IndexedShards):
    """Inner chunks of one array with layout `layout`, memory-mapped out of its shard files.

    `where` names the array in errors.  Shard indices are read (and checked)
    once per shard; at most `OPEN_FILES` shard files stay open, the least
    recently used closed first.  One process only: make a new reader after a fork.
    """

    def __init__(self, layout: ShardLayout, where: str) -> None:
        super().__init__(layout, where)
        self._files: OrderedDict[tuple, int] = OrderedDict()
        self._pid = os.getpid()

    def close(self) -> None:
        """Close the open shard files (only in the process that opened them: a forked copy leaves them)."""
        if self._pid == os.getpid():
            while self._files:
                os.close(self._files.popitem()[1])

    def __del__(self) -> None:
        self.close()

    def _fd(self, shard: tuple[int, ...]) -> int | None:
        """A descriptor of the shard's file; None if the shard was never written."""
        fd = self._files.get(shard)
        if fd is not None:
            self._files.move_to_end(shard)
            return fd
        try:
            fd = os.open(self.layout.file(shard), os.O_RDONLY)
        except FileNotFoundError:
            return None
        self._files[shard] = fd
        if len(self._files) > OPEN_FILES:
            os.close(self._files.popitem(last=False)[1])
        return fd

    def index(self, shard: tuple[int, ...]) -> np.ndarray | None:
        """The shard's index, shaped ``per_shard + (2,)``; None if the shard was never written."""
        if shard not in self._index:
            lay = self.layout
            fd = self._fd(shard)
            if fd is None:
                self._index[shard] = None
            else:
                end = os.fstat(fd).st_size
                raw = os.pread(fd, lay.index_bytes - 4, end - lay.index_bytes)
                index = np.frombuffer(raw, dtype="<u8").reshape(lay.per_shard + (2,))
                check_index(index, end, shard, self.where)
                self._index[shard] = index
        return self._index[shard]

    def hint(self, ranges: Iterable[ByteRange]) -> int:
        """Ask the kernel to read `ranges` into the page cache, in order, without waiting; the bytes asked for.

        Each range goes in requests of `HINT_PIECE` bytes: the kernel reads a
        larger one only up to the device's read-ahead size.  Pages cached
        already cost the kernel a look-up each and no read.  Where the system
        has no ``posix_fadvise`` nothing is asked for.
        """
        if not hasattr(os, "posix_fadvise"):
            return 0
        total = 0
        for shard, offset, nbytes in ranges:
            fd = self._fd(shard)
            if fd is None:
                continue
            for start in range(offset, offset + nbytes, HINT_PIECE):
                os.posix_fadvise(fd, start, min(HINT_PIECE, offset + nbytes - start), os.POSIX_FADV_WILLNEED)
            total += nbytes
        return total

    def chunk(self, cidx: tuple[int, ...], extent: tuple[int, ...]) -> np.ndarray:
        """The inner chunk at chunk coordinates `cidx` (all dims), cut to `extent` (the array's shape):
        a chunk at the array's end has padding the array does not cover."""
        lay = self.layout
        where = self.chunk_bytes(cidx)
        if where is None:
            data = np.zeros(lay.chunk, dtype=lay.dtype)  # never written: the array's fill value, 0
        else:
            data = map_chunk(self._fd(where.shard), where.offset, where.nbytes, lay.dtype).reshape(lay.chunk)
        return self.cut(data, cidx, extent)
