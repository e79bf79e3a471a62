"""Periodic window reads from stored fields, chunk-aware and cached.

A *window* is a box of voxels ``[lo, hi)`` per axis (crop + halo) that may
leave the periodic box; `map2map.geometry.window_pieces` splits it into at
most ``2**ndim`` box-aligned plain slices, and `read_window` copies each
piece into its place in the output.  A *source* (`FieldSource`) copies a
box-aligned region of one sample into arrays it is given, negating on the
way where asked, in small blocks so that a transposed destination (how
augmentation permutes axes) costs no separate pass over the data.

Sources: `ZarrField`, one array of a store, read by inner chunks kept in a
small per-process cache bounded in bytes (neighbouring crops reuse the halo
they share), through the shard decoder of `map2map.data.shards` when the
array's layout allows it (for a store in object storage, a URL, the remote
shard reader of `map2map.data.remote`) and through zarr-python otherwise
(tests check all agree bit for bit); and `NpyField`, .npy files (one per
sample) read through memory maps.  Counters record bytes decoded and bytes returned (their ratio
is the read amplification).

Read-ahead.  `hint_window` asks the kernel to start reading what a read of a
window will load from disk (for `ZarrField` through the shard decoder: the
byte ranges of the inner chunks it touches that are not in the cache, in the
order the read touches them), bounded in bytes, and returns without waiting
for the data.  From object storage the same hint starts fetching those
chunks, coalesced and concurrently, in a background thread
(`map2map.data.remote.RemoteShardReader.prefetch`); the read then takes them
from there.
`read_window` hints its own window before copying it, so the disk reads
ahead of the copy; a caller that knows which windows come next (the sampler's
order) can hint them early with the same arguments it will read them with.

Sources open files lazily and reopen after a fork, so they are safe in
DataLoader workers started with fork or spawn.
"""

from __future__ import annotations

import collections
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from map2map import geometry, storage
from map2map.data import remote, shards


@dataclass
class ReadStats:
    """Bytes decoded from storage vs bytes handed out; `amplification` = decoded / returned."""

    decoded: int = 0
    returned: int = 0

    @property
    def amplification(self) -> float:
        return self.decoded / self.returned if self.returned else float("nan")

    def __add__(self, other: "ReadStats") -> "ReadStats":
        return ReadStats(self.decoded + other.decoded, self.returned + other.returned)


class FieldSource(Protocol):
    """A stored field: `shape` is (nsample, channels, *spatial)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    stats: ReadStats

    def read_box(self, sample: int, box: tuple[slice, ...], out: list[tuple[np.ndarray, bool]]) -> None:
        """Copy the box-aligned region `box` of `sample`, channel c into ``out[c][0]`` (negated if ``out[c][1]``)."""

    def hint_window(self, sample: int, win: tuple[geometry.Interval, ...], periodic: bool = True,
                    max_bytes: int | None = None, skip: int = 0, skip_cached: bool = True) -> int:
        """Ask the kernel to read ahead what reading `win` of `sample` loads from disk, without waiting:
        those bytes in read order, less the first `skip` of them, at most `max_bytes` of the rest; the
        bytes asked for (0 where the source cannot tell).  ``skip_cached=False`` counts in what the
        source's own cache holds now, so that the bytes of a window stay the same from call to call
        (a caller hinting a window in parts, with `skip`, needs that)."""

    def end_window(self, sample: int, win: tuple[geometry.Interval, ...], periodic: bool = True) -> None:
        """The read of `win` of `sample` is done (`read_window` says so after its copy): a later hint of the
        same window asks for it again."""


MAX_COPY_THREADS = 4  # most threads a `ZarrField` copies chunks with by itself (``copy_threads=None``)
WINDOW_HINT_BYTES = 2**29  # most bytes `read_window` hints ahead of its own copy (the rest is read by faults)
ANNOUNCED_WINDOWS = 4096  # hinted windows not read yet a remote `ZarrField` remembers


def _window_key(win: Sequence[geometry.Interval]) -> tuple[tuple[int, int], ...]:
    return tuple((int(lo), int(hi)) for lo, hi in win)


def hint_window(source: FieldSource, sample: int, win: tuple[geometry.Interval, ...], periodic: bool = True,
                max_bytes: int | None = None, skip: int = 0, skip_cached: bool = True) -> int:
    """`source.hint_window`: read-ahead of the window a later `read_window` with the same arguments reads."""
    return source.hint_window(sample, win, periodic, max_bytes, skip, skip_cached)


def read_window(source: FieldSource, sample: int, win: tuple[geometry.Interval, ...],
                out: np.ndarray | None = None, periodic: bool = True,
                channels: Sequence[tuple[np.ndarray, bool]] | None = None, hint: bool = True) -> np.ndarray | None:
    """Read the (periodic) window `win` of `sample` as an array (channels, *window shape).

    `out` may be a preallocated float array of that shape (e.g. a channel slice
    of a larger input, or a transposed view of one), filled in place and
    returned.  Alternatively `channels` gives, for every stored channel, the
    array to fill and whether to negate on the way (how augmentation turns the
    components of a vector field without another pass over the data).  The
    window's bytes are hinted first (`hint_window`, at most `WINDOW_HINT_BYTES`),
    so the disk reads ahead of the copy; ``hint=False`` leaves that out (for a
    caller that has hinted the window itself).
    """
    wshape = geometry.window_shape(win)
    if channels is None:
        if out is None:
            out = np.empty((source.shape[1],) + wshape, dtype=np.float32)
        if out.shape != (source.shape[1],) + wshape:
            raise ValueError(f"out has shape {out.shape}, the window needs {(source.shape[1],) + wshape}")
        channels = [(out[c], False) for c in range(source.shape[1])]
    elif len(channels) != source.shape[1] or any(a.shape != wshape for a, _ in channels):
        raise ValueError(f"channels must give {source.shape[1]} arrays of shape {wshape}")
    if hint:
        hint_window(source, sample, win, periodic, WINDOW_HINT_BYTES)
    for src, dst in geometry.window_pieces(win, source.shape[2:], periodic):
        source.read_box(sample, src, [(a[dst], neg) for a, neg in channels])
    source.end_window(sample, win, periodic)
    source.stats.returned += sum(a.size * a.itemsize for a, _ in channels)
    return out


def _blocks(dst: np.ndarray) -> list[int]:
    """Block shape of `_copy` into a transposed view `dst` (whose voxels do not run along memory on its
    last axis): 16 voxels along the leading axes and 64 along the last, in 3-d 32 x 32 x 64, with 8 along
    the first axis where that is the one `dst` runs along in memory (a block then reads 8 planes of
    the source, not 32, each far apart).  Chosen by timing every 3-d order that transposes, with and
    without flips, against other block shapes, against numpy and torch copying a whole chunk at once,
    and against 16 x 16 x 64 blocks whatever the layout (`bench/loader.py` measures the whole reader)."""
    if dst.ndim != 3:
        return [16] * (dst.ndim - 1) + [64]
    first = abs(dst.strides[0]) == min(abs(s) for s in dst.strides)
    return [8 if first else 32, 32, 64]


def auto_copy_threads() -> int:
    """Copy threads for ``copy_threads=None``: 1 in a DataLoader worker process (its siblings use the other
    cores), else the cores this process may run on, at most `MAX_COPY_THREADS`."""
    import torch.utils.data

    if torch.utils.data.get_worker_info() is not None:
        return 1
    return max(1, min(MAX_COPY_THREADS, len(os.sched_getaffinity(0))))


def _copy(dst: np.ndarray, src: np.ndarray, negate: bool) -> None:
    """``dst[...] = src`` (or ``-src``) for a C-ordered `src`.

    Where `dst` runs along memory on its last axis as `src` does (no
    augmentation, or one that keeps the last axis in place) both sides are
    runs of contiguous voxels, copied in one call.  Otherwise (`dst` is a
    transposed view, how augmentation permutes axes) the copy goes in blocks
    (`_blocks`), each a small transposition whose source and destination lines
    stay in cache.
    """
    moving = [abs(st) for st, n in zip(dst.strides, dst.shape) if n > 1]
    if dst.shape[-1:] in ((), (1,)) or not moving or abs(dst.strides[-1]) == min(moving):
        if negate:
            np.negative(src, out=dst)
        else:
            np.copyto(dst, src)
        return
    sizes = _blocks(dst)
    for starts in itertools.product(*[range(0, n, b) for n, b in zip(dst.shape, sizes)]):
        sl = tuple(slice(i, i + b) for i, b in zip(starts, sizes))
        if negate:
            np.negative(src[sl], out=dst[sl])
        else:
            dst[sl] = src[sl]


@dataclass
class ZarrField:
    """One field of a store, read by inner chunks with an LRU cache (see the module docstring).

    Only the path and array name are kept until the first read, and every
    handle is reopened in a new process, so a reader can be pickled into
    DataLoader workers and survives a fork.  `direct=False` reads through
    zarr-python even where the shard decoder could.  `path` may be a URL
    (`map2map.storage`), opened with `storage_options` (pickled with the
    reader, so they reach worker processes).  `copy_threads`: threads
    that copy the chunks of a box into place at once (each chunk into its
    own part of the output, so the result does not depend on them; page
    faults of cold chunks then overlap too); None chooses per process
    (`auto_copy_threads`).
    """

    path: str
    name: str
    nsample: int
    cache_bytes: int = 64 * 2**20
    direct: bool = True
    storage_options: dict | None = None
    copy_threads: int | None = 1
    stats: ReadStats = field(default_factory=ReadStats)

    def __post_init__(self) -> None:
        self._pid: int | None = None
        arr = self._open_array()
        self.shape = (self.nsample,) + tuple(arr.shape[1:])
        self.dtype = np.dtype(arr.dtype)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for key in ("_arr", "_cache", "_shards", "_announced", "_copier"):
            state.pop(key, None)
        state["_pid"] = None
        return state

    def _open_array(self):
        from map2map import store

        return store.open_group(self.path, "r", self.storage_options)[self.name]

    def _ensure_open(self) -> None:
        if self._pid == os.getpid():
            return
        self._arr = self._open_array()
        self._shards = None
        where = f"{self.path}/{self.name}"
        if self.direct and storage.is_remote(self.path):
            fs, root = storage.filesystem(self.path, self.storage_options)
            layout = remote.remote_layout_of(self._arr, root)
            self._shards = remote.RemoteShardReader(layout, fs, where) if layout else None
        elif self.direct:
            layout = shards.layout_of(self._arr)
            self._shards = shards.ShardReader(layout, where) if layout else None
        self._remote = isinstance(self._shards, remote.RemoteShardReader)
        self._announced: collections.OrderedDict[tuple, set] = collections.OrderedDict()
        self._cache = shards.ChunkCache(self.cache_bytes)
        threads = auto_copy_threads() if self.copy_threads is None else self.copy_threads
        self._copy_threads = threads
        self._copier = ThreadPoolExecutor(threads, thread_name_prefix="m2m-copy") if threads > 1 else None
        self._pid = os.getpid()

    @property
    def chunk(self) -> tuple[int, ...]:
        """Spatial inner chunk shape."""
        self._ensure_open()
        return tuple(self._arr.chunks[2:])

    @property
    def shard_layout(self) -> shards.ShardLayout | None:
        """The layout the shard decoder reads, None where zarr-python reads."""
        self._ensure_open()
        return self._shards.layout if self._shards else None

    @property
    def uses_direct_path(self) -> bool:
        """Whether the shard decoder reads (from a local disk or, see `remote_reader`, object storage)."""
        return self.shard_layout is not None

    @property
    def remote_reader(self) -> remote.RemoteShardReader | None:
        """This process's remote shard reader (its request counters), None where it does not read."""
        self._ensure_open()
        return self._shards if isinstance(self._shards, remote.RemoteShardReader) else None

    def box_chunks(self, sample: int, box: tuple[slice, ...]) -> list[tuple[int, ...]]:
        """Spatial coordinates of the inner chunks the box-aligned region `box` of `sample` intersects, in
        the order `read_box` copies them: through the shard decoder in the order of the bytes on disk
        (`shards.ShardReader.file_order`), else in C order."""
        self._ensure_open()
        cidxs = itertools.product(*[geometry.chunk_range(s.start, s.stop, c) for s, c in zip(box, self.chunk)])
        if self._shards is None:
            return list(cidxs)
        return [c[2:] for c in self._shards.file_order((sample, 0) + c for c in cidxs)]

    def window_chunks(self, sample: int, win: tuple[geometry.Interval, ...],
                      periodic: bool = True) -> list[tuple[int, ...]]:
        """Spatial coordinates of the inner chunks a read of `win` of `sample` touches, each once, in the
        order it first touches them."""
        pieces = [src for src, _ in geometry.window_pieces(win, self.shape[2:], periodic)]
        if self.remote_reader is not None:  # every index the window needs, fetched at once
            self._shards.load_indices([self._shards.shard_of((sample, 0) + c) for src in pieces
                                       for c in itertools.product(*[geometry.chunk_range(s.start, s.stop, n)
                                                                    for s, n in zip(src, self.chunk)])])
        seen: dict[tuple[int, ...], None] = {}
        for src in pieces:
            seen.update(dict.fromkeys(self.box_chunks(sample, src)))
        return list(seen)

    def _window_bytes(self, sample: int, win: tuple[geometry.Interval, ...], periodic: bool,
                      skip_cached: bool) -> list[tuple[tuple[int, ...], shards.ByteRange]]:
        """(chunk coordinates (all dims), bytes) of each inner chunk a read of `win` of `sample` loads from
        storage, in the order it loads them (see `window_ranges`)."""
        self._ensure_open()
        if self._shards is None:
            return []
        keys = ((sample, 0) + cidx for cidx in self.window_chunks(sample, win, periodic)
                if not (skip_cached and (sample,) + cidx in self._cache))
        return [(k, r) for k, r in ((k, self._shards.chunk_bytes(k)) for k in keys) if r is not None]

    def window_ranges(self, sample: int, win: tuple[geometry.Interval, ...],
                      periodic: bool = True, skip_cached: bool = True) -> list[shards.ByteRange]:
        """The byte ranges a read of `win` of `sample` loads from disk, in the order it loads them:
        those of the inner chunks it touches, less those never written and (with `skip_cached`) the
        chunks in the cache, contiguous ones merged; none where zarr-python reads (it reads by itself)."""
        return shards.merge_ranges(r for _, r in self._window_bytes(sample, win, periodic, skip_cached))

    def hint_window(self, sample: int, win: tuple[geometry.Interval, ...], periodic: bool = True,
                    max_bytes: int | None = None, skip: int = 0, skip_cached: bool = True) -> int:
        """Hint `window_ranges` less its first `skip` bytes, at most `max_bytes` of them (see
        `shards.ShardReader.hint`); the bytes asked for.  From object storage: start fetching every
        chunk with bytes among those, less the chunks in the cache (`remote.RemoteShardReader.prefetch`),
        each for as many reads as the window makes of it; a window hinted again before its read
        (`end_window`) adds no reads to the chunks it asked for already."""
        chunks = self._window_bytes(sample, win, periodic, skip_cached)
        ranges = shards.skip_ranges(shards.merge_ranges(r for _, r in chunks), skip)
        ranges = shards.bound_ranges(ranges, max_bytes)
        if not ranges:
            return 0
        if self.remote_reader is None:
            return self._shards.hint(ranges)
        reads = collections.Counter(  # a chunk is read once per piece of the window it lies in
            c for src, _ in geometry.window_pieces(win, self.shape[2:], periodic)
            for c in itertools.product(*[geometry.chunk_range(s.start, s.stop, n) for s, n in zip(src, self.chunk)]))
        announced = self._announce((sample, _window_key(win), periodic))
        asked, start, wanted = sum(r.nbytes for r in ranges), 0, []
        for key, r in chunks:  # the chunks overlapping bytes [skip, skip + asked) of the window's byte stream
            if (start < skip + asked and start + r.nbytes > skip and key not in announced
                    and (key[0],) + key[2:] not in self._cache):
                wanted.append((key, r, reads[key[2:]]))
                announced.add(key)
            start += r.nbytes
        self._shards.prefetch(wanted)
        return asked

    def _announce(self, window: tuple) -> set:
        """The chunks whose reads the hints of `window` (sample, window, periodic) have registered with the
        remote reader since its last read; at most `ANNOUNCED_WINDOWS` windows are remembered (a window
        forgotten unread leaves its chunks pending until the reader's bound drops them)."""
        announced = self._announced.setdefault(window, set())
        self._announced.move_to_end(window)
        while len(self._announced) > ANNOUNCED_WINDOWS:
            self._announced.popitem(last=False)
        return announced

    def end_window(self, sample: int, win: tuple[geometry.Interval, ...], periodic: bool = True) -> None:
        if self._pid == os.getpid() and self._remote:
            self._announced.pop((sample, _window_key(win), periodic), None)

    def read_box(self, sample: int, box: tuple[slice, ...], out: list[tuple[np.ndarray, bool]]) -> None:
        self._ensure_open()
        chunk = self.chunk
        pending: collections.deque = collections.deque()  # copies in flight, each holding its chunk
        limit = 2 * self._copy_threads  # copies in flight at most
        for cidx in self.box_chunks(sample, box):
            data = self._chunk(sample, cidx)
            lo = [i * c for i, c in zip(cidx, chunk)]
            src, dst = [], []
            for s, l, c in zip(box, lo, chunk):
                a, b = max(s.start, l), min(s.stop, l + c)
                src.append(slice(a - l, b - l))
                dst.append(slice(a - s.start, b - s.start))
            src, dst = tuple(src), tuple(dst)
            for c, (target, negate) in enumerate(out):
                if self._copier is None:
                    _copy(target[dst], data[(c,) + src], negate)
                    continue
                pending.append(self._copier.submit(_copy, target[dst], data[(c,) + src], negate))
                while len(pending) > limit:  # bounded: chunks in flight stay few (result() raises a copy's error)
                    pending.popleft().result()
        while pending:
            pending.popleft().result()

    def _chunk(self, sample: int, cidx: tuple[int, ...]) -> np.ndarray:
        """The (channels, *spatial) chunk at spatial chunk coordinates `cidx` of `sample`, from the cache."""
        key = (sample,) + cidx
        data = self._cache.get(key)
        if data is not None and self._remote:
            self._shards.release((sample, 0) + cidx)  # a read the remote reader was told of, served here
        if data is None:
            if self._shards:  # the channel chunk covers all channels
                data = self._shards.chunk((sample, 0) + cidx, self.shape)[0]
            else:
                sl = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(cidx, self.chunk, self.shape[2:]))
                data = np.asarray(self._arr[(sample, slice(None)) + sl])
            self.stats.decoded += data.nbytes
            self._cache.put(key, data)
        return data


@dataclass
class NpyField:
    """A field given as a list of .npy files (one per sample), read through memory maps.

    The original toolkit's input format: files are never loaded whole; each
    read copies plain slices out of a memory map.
    """

    paths: list[str]
    stats: ReadStats = field(default_factory=ReadStats)

    def __post_init__(self) -> None:
        first = np.load(self.paths[0], mmap_mode="r")
        self.shape = (len(self.paths),) + first.shape
        self.dtype = first.dtype
        self._maps: dict[int, np.ndarray] = {}
        self._pid: int | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"], state["_pid"] = {}, None
        return state

    def _map(self, sample: int) -> np.ndarray:
        if self._pid != os.getpid():
            self._maps, self._pid = {}, os.getpid()
        if sample not in self._maps:
            self._maps[sample] = np.load(self.paths[sample], mmap_mode="r")
        return self._maps[sample]

    def hint_window(self, sample: int, win: tuple[geometry.Interval, ...], periodic: bool = True,
                    max_bytes: int | None = None, skip: int = 0, skip_cached: bool = True) -> int:
        return 0  # a memory map reads by page faults

    def end_window(self, sample: int, win: tuple[geometry.Interval, ...], periodic: bool = True) -> None:
        pass

    def read_box(self, sample: int, box: tuple[slice, ...], out: list[tuple[np.ndarray, bool]]) -> None:
        data = self._map(sample)
        for c, (target, negate) in enumerate(out):
            _copy(target, data[(c,) + box], negate)
            self.stats.decoded += target.size * self.dtype.itemsize
