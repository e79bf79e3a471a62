"""The remote shard reader: inner chunks of uncompressed sharded Zarr arrays in object storage, fetched by
coalesced byte ranges, concurrently, in the background.

Terms are those of `map2map.data.shards` (shard, inner chunk, index,
`ByteRange`); here a shard is an *object* (``s3://bucket/train.zarr/f/c/0/0/1/0/0``),
and a *request* is one byte-range read of one object.

zarr-python reads a region of a sharded array in object storage shard by
shard (several at once), and inside a shard a request for its index and then
one per inner chunk, each waiting for the one before; asked for one inner
chunk at a time (how a chunk cache asks), every chunk costs two requests in
a row.  For the layout the shard decoder reads
(`map2map.data.shards.sharded_layout`) in a store that is not on a local
disk, `RemoteShardReader` instead:

1. *Indices.*  The indices of the shards a window touches that the reader
   does not hold yet are fetched all at once (a suffix byte range of each
   object, concurrently), checked (length and the writer's crc32c checksum)
   and kept per shard in the reader.  A shard object that does not exist
   reads as the fill value, 0, as in the local decoder.  This happens in the
   calling thread, when a window first touches a shard.
2. *Chunks.*  `prefetch` takes the byte ranges of the inner chunks a window
   needs, coalesces them (`coalesce`: ranges in one object at most
   `MAX_GAP` bytes apart are read as one request, of at most `MAX_REQUEST`
   bytes unless one chunk is larger) and fetches every request with one
   ``fs.cat_ranges`` call, which fsspec's asynchronous filesystems (s3fs,
   gcsfs) run concurrently, through as many connections as the backend
   opens (s3fs: ``max_pool_connections`` in ``config_kwargs`` of the storage
   options).  A window costs requests in proportion to the shards it
   touches, not to its chunks.
3. *Background.*  The fetch runs in a thread of the reader (one fetch at a
   time, in the order asked for), so `prefetch` returns at once.  Its chunks
   are *pending*, each with the number of reads the caller said it will
   make of it (a chunk lies in more than one piece of a window nearly as
   long as the box, see `map2map.geometry.window_pieces`), until `chunk` (or
   `release`, for a read the caller served from its own cache) has taken
   them all, waiting for the fetch where it has not finished.  Pending
   chunks are kept aside from the caller's chunk cache, so nothing evicts
   them before their copy, up to `PENDING_BYTES` (past that the oldest are
   dropped, and fetched again if read).  A chunk read that nothing
   prefetched is fetched alone, in the calling thread.

`map2map.data.windows.ZarrField` prefetches in its `hint_window`: the hint
`read_window` gives before its copy fetches the whole window at once, and
the read-ahead of `map2map.data.fields.FieldDataset.follow` fetches the next
items' windows while the current item is copied and trained on.

Objects cut short: every fetched range must come back whole (an index that
points past the end of its object is an `OSError`, as `check_index` makes it
on a local disk) and an index must match its checksum.  Chunks handed out are
read-only views of the fetched bytes (a chunk kept keeps its request's bytes).  Object storage has no partial writes:
a writer stores whole shards (see `map2map.storage`).

A reader belongs to one process and is not pickled (fsspec's connections and
the thread do not survive a fork); `ZarrField` makes a new one in each process.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from map2map.data.shards import ByteRange, IndexedShards, ShardLayout

MAX_GAP = 2**20        # bytes between two ranges of one object that one request reads through
MAX_REQUEST = 2**24    # bytes one coalesced request reads at most (one larger chunk is read alone)
PENDING_BYTES = 2**30  # bytes of fetched chunks a reader keeps aside for their reads


def coalesce(ranges: Sequence[ByteRange], max_gap: int = MAX_GAP,
             max_bytes: int = MAX_REQUEST) -> tuple[list[ByteRange], list[int]]:
    """(requests, which): the byte ranges to read for `ranges`, and for each range the index of the
    request that holds it whole.

    Requests go object by object (shards in C order), each in the order of
    its bytes; a range joins the request before it where both lie in one
    object, it starts at most `max_gap` bytes past the request's end (or
    overlaps it), and the request stays within `max_bytes`.
    """
    requests: list[ByteRange] = []
    which = [0] * len(ranges)
    for i in sorted(range(len(ranges)), key=lambda i: (ranges[i].shard, ranges[i].offset)):
        r = ranges[i]
        if requests:
            last = requests[-1]
            end = max(last.offset + last.nbytes, r.offset + r.nbytes)
            if (last.shard == r.shard and r.offset <= last.offset + last.nbytes + max_gap
                    and end - last.offset <= max_bytes):
                requests[-1] = last._replace(nbytes=end - last.offset)
                which[i] = len(requests) - 1
                continue
        requests.append(r)
        which[i] = len(requests) - 1
    return requests, which


def parse_index(raw: bytes, layout: ShardLayout, shard: tuple[int, ...], where: str) -> np.ndarray:
    """The index (``per_shard + (2,)`` uint64) of a shard from the last ``layout.index_bytes`` of its
    object; an `OSError` for an object shorter than that or an index that does not match its checksum."""
    import google_crc32c  # zarr's own crc32c codec needs it

    if len(raw) != layout.index_bytes:
        raise OSError(f"shard {shard} of {where} is cut short: {len(raw)} bytes, its index alone needs "
                      f"{layout.index_bytes}")
    body = raw[:-4]
    if google_crc32c.value(body) != int.from_bytes(raw[-4:], "little"):
        raise OSError(f"shard {shard} of {where} is damaged or cut short: its index does not match its checksum")
    return np.frombuffer(body, dtype="<u8").reshape(layout.per_shard + (2,))


@dataclass
class Pending:
    """A chunk being fetched: `nbytes` at `offset` of request `request` of the fetch `future`, for `reads`
    more reads."""

    future: Future
    request: int
    offset: int
    nbytes: int
    reads: int


class RemoteShardReader(IndexedShards):
    """Inner chunks of one array with layout `layout` (``layout.root``: its key prefix in `fs`, an fsspec
    filesystem), fetched as the module docstring says.  `requests` and `fetches` count the byte-range
    requests made and the ``cat_ranges`` calls that made them."""

    def __init__(self, layout: ShardLayout, fs: Any, where: str, max_pending: int = PENDING_BYTES) -> None:
        super().__init__(layout, where)
        self.fs = fs
        self.max_pending = max_pending
        self.requests = 0
        self.fetches = 0
        self._pending: OrderedDict[tuple, Pending] = OrderedDict()
        self._pending_bytes = 0
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()

    def close(self) -> None:
        """Let the fetch thread end once its fetch is done, dropping what was asked for after it (only
        in the process that started it)."""
        if self._pool is not None and self._pid == os.getpid():
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __del__(self) -> None:
        self.close()

    def _cat(self, ranges: Sequence[tuple[tuple[int, ...], int, int | None]]) -> list:
        """``fs.cat_ranges`` of (shard, start, end) triples, counted; an exception in place of a failed one."""
        self.requests += len(ranges)
        self.fetches += 1
        return self.fs.cat_ranges([str(self.layout.file(s)) for s, _, _ in ranges], [a for _, a, _ in ranges],
                                  [b for _, _, b in ranges], on_error="return")

    def load_indices(self, shards: Sequence[tuple[int, ...]]) -> None:
        """Fetch the indices of `shards` not held yet, all at once (suffix ranges), and keep them."""
        missing = [s for s in dict.fromkeys(shards) if s not in self._index]
        if not missing:
            return
        blobs = self._cat([(s, -self.layout.index_bytes, None) for s in missing])
        for shard, blob in zip(missing, blobs):
            if isinstance(blob, FileNotFoundError):
                self._index[shard] = None  # never written: the fill value
            elif isinstance(blob, BaseException):
                raise blob
            else:
                self._index[shard] = parse_index(blob, self.layout, shard, self.where)

    def index(self, shard: tuple[int, ...]) -> np.ndarray | None:
        """The shard's index, shaped ``per_shard + (2,)``; None if the shard was never written."""
        self.load_indices([shard])
        return self._index[shard]

    def _fetch(self, requests: Sequence[ByteRange]) -> list[bytes]:
        """The bytes of `requests` (one ``cat_ranges`` call); an `OSError` for one that does not come back whole."""
        blobs = self.fs.cat_ranges([str(self.layout.file(r.shard)) for r in requests], [r.offset for r in requests],
                                   [r.offset + r.nbytes for r in requests], on_error="return")
        for r, blob in zip(requests, blobs):
            if isinstance(blob, FileNotFoundError):
                raise OSError(f"shard {r.shard} of {self.where} was removed while it was read") from blob
            if isinstance(blob, BaseException):
                raise blob
            if len(blob) != r.nbytes:
                raise OSError(f"shard {r.shard} of {self.where} is cut short: its index points to bytes "
                              f"{r.offset}..{r.offset + r.nbytes}, the object ends before")
        return blobs

    @property
    def pending(self) -> int:
        """Chunks fetched or being fetched that no read has taken yet."""
        return len(self._pending)

    def prefetch(self, chunks: Sequence[tuple[tuple[int, ...], ByteRange, int]]) -> int:
        """Start fetching, in the background, the inner chunks `chunks` ((chunk coordinates (all dims), where
        its bytes lie, reads to come) triples) that are not pending already (those that are: their reads
        added); the requests that takes."""
        todo = []
        for key, r, reads in chunks:
            if key in self._pending:
                self._pending[key].reads += reads
            else:
                todo.append((key, r, reads))
        if not todo:
            return 0
        requests, which = coalesce([r for _, r, _ in todo])
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="m2m-fetch")
        future = self._pool.submit(self._fetch, requests)
        self.requests += len(requests)
        self.fetches += 1
        for (key, r, reads), i in zip(todo, which):
            self._pending[key] = Pending(future, i, r.offset - requests[i].offset, r.nbytes, reads)
            self._pending_bytes += r.nbytes
        while self._pending_bytes > self.max_pending:
            self._pending_bytes -= self._pending.popitem(last=False)[1].nbytes
        return len(requests)

    def release(self, cidx: tuple[int, ...]) -> Pending | None:
        """Count one read of the pending chunk at chunk coordinates `cidx` (all dims) as done, dropping it
        after its last; its entry, None if it is not pending."""
        entry = self._pending.get(cidx)
        if entry is not None:
            entry.reads -= 1
            if entry.reads <= 0:
                del self._pending[cidx]
                self._pending_bytes -= entry.nbytes
        return entry

    def chunk(self, cidx: tuple[int, ...], extent: tuple[int, ...]) -> np.ndarray:
        """The inner chunk at chunk coordinates `cidx` (all dims), cut to `extent` (the array's shape):
        the pending one (waiting for its fetch), else fetched now."""
        lay = self.layout
        entry = self.release(cidx)
        if entry is not None:
            blob, offset, nbytes = entry.future.result()[entry.request], entry.offset, entry.nbytes
        else:
            where = self.chunk_bytes(cidx)
            if where is None:
                return self.cut(np.zeros(lay.chunk, dtype=lay.dtype), cidx, extent)  # never written: 0
            self.requests += 1
            self.fetches += 1
            blob, offset, nbytes = self._fetch([where])[0], 0, where.nbytes
        data = np.frombuffer(blob, dtype=lay.dtype, count=nbytes // lay.dtype.itemsize, offset=offset)
        return self.cut(data.reshape(lay.chunk), cidx, extent)


def remote_layout_of(arr, root: str) -> ShardLayout | None:
    """The layout of the zarr array `arr` of a store in object storage (zarr's ``FsspecStore``), its shard
    objects under the key prefix `root` of the caller's filesystem, if `RemoteShardReader` reads it
    (`map2map.data.shards.sharded_layout`), else None."""
    from pathlib import PurePosixPath

    from zarr.storage import FsspecStore

    from map2map.data.shards import sharded_layout

    if not isinstance(arr.store_path.store, FsspecStore):
        return None
    return sharded_layout(arr, PurePosixPath(root) / arr.store_path.path)

