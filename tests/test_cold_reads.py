"""The shard decoder's read path and its read-ahead hints, on real stores: the bytes zarr-python reads,
the byte ranges the shard index gives, and the byte bound of a hint.

Oracles are computed here from first principles: the window's voxels by periodic wrap of what
zarr-python reads, the chunks a window touches by listing its voxels, and their byte ranges by
parsing each shard's index straight from the end of its file.
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import save_fields
from map2map import convert
from map2map.data import shards
from map2map.data.windows import ZarrField, hint_window, read_window
from strategies import windows

pytestmark = pytest.mark.skipif(not hasattr(os, "posix_fadvise") or not Path("/proc/self/fd").is_dir(),
                                reason="read-ahead hints need posix_fadvise; the recorder reads /proc/self/fd")

LAYOUTS = {  # name -> (field shape of one sample, crop, inner chunk): edge shards cut short, chunks never written
    "3d": ((3, 20, 12, 16), 8, 4),
    "2d": ((2, 10, 14), 4, 2),
}
EXAMPLES = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # `stores` is built once


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, str]:
    """Name -> path of a two-sample store of field ``f`` in each of `LAYOUTS`."""
    out = {}
    for name, (shape, crop, chunk) in LAYOUTS.items():
        tmp = tmp_path_factory.mktemp(name)
        save_fields(tmp / "npy", "f", shape, 2, seed=len(out))
        out[name] = str(tmp / "s.zarr")
        convert.run(convert.ConvertConfig(output=out[name], field=(f"f={tmp}/npy/f_*.npy",), crop=[crop], pad=1,
                                          chunk=[chunk], compressor="none", progress=False))
    return out


def zarr_window(path: str, sample: int, win) -> np.ndarray:
    """Oracle: the sample as zarr-python reads it, wrapped periodically at the window."""
    a = np.asarray(zarr.open_group(path, mode="r")["f"][sample])
    for axis, (lo, hi) in enumerate(win, start=1):
        a = np.take(a, np.arange(lo, hi), axis=axis, mode="wrap")
    return a


def oracle_ranges(path: str, sample: int, win) -> set[tuple[str, int, int]]:
    """(shard file, offset, nbytes) of every written inner chunk holding a voxel of the periodic window,
    the chunks found by listing the window's voxels and their bytes by parsing the shard index."""
    arr = zarr.open_group(path, mode="r")["f"]
    layout = shards.layout_of(arr)
    chunk, shard = layout.chunk[2:], layout.shard[2:]
    per_axis = [sorted({(v % n) // c for v in range(lo, hi)}) for (lo, hi), n, c in zip(win, arr.shape[2:], chunk)]
    found = set()
    for cidx in itertools.product(*per_axis):
        sidx = (sample, 0) + tuple(i * c // s for i, c, s in zip(cidx, chunk, shard))
        file = layout.file(sidx)
        if not file.exists():
            continue
        raw = file.read_bytes()
        per_shard = layout.per_shard
        index = np.frombuffer(raw[-layout.index_bytes:-4], dtype="<u8").reshape(per_shard + (2,))
        offset, nbytes = (int(v) for v in index[(0, 0) + tuple(i % p for i, p in zip(cidx, per_shard[2:]))])
        if offset != 2**64 - 1:
            found.add((str(file), offset, nbytes))
    return found


class Recorder:
    """While entered: records, in order, the read-ahead requests (``posix_fadvise(WILLNEED)``) and the
    chunk mappings of this process, as (kind, file path, offset, nbytes) with kind "hint" or "map";
    requests go in pieces of `piece` bytes if given."""

    def __init__(self, piece: int | None = None) -> None:
        self.events: list[tuple[str, str, int, int]] = []
        self.piece = piece

    def __enter__(self) -> "Recorder":
        self._patch = pytest.MonkeyPatch.context()
        mp = self._patch.__enter__()
        real_fadvise, real_map = os.posix_fadvise, shards.map_chunk

        def fadvise(fd, offset, length, advice):
            if advice == os.POSIX_FADV_WILLNEED:
                self.events.append(("hint", os.readlink(f"/proc/self/fd/{fd}"), offset, length))
            real_fadvise(fd, offset, length, advice)

        def map_chunk(fd, offset, nbytes, dtype):
            self.events.append(("map", os.readlink(f"/proc/self/fd/{fd}"), offset, nbytes))
            return real_map(fd, offset, nbytes, dtype)

        mp.setattr(os, "posix_fadvise", fadvise)
        mp.setattr(shards, "map_chunk", map_chunk)
        if self.piece is not None:
            mp.setattr(shards, "HINT_PIECE", self.piece)
        return self

    def __exit__(self, *exc) -> None:
        self._patch.__exit__(*exc)

    @property
    def hints(self) -> list[tuple[str, int, int]]:
        return [e[1:] for e in self.events if e[0] == "hint"]

    @property
    def maps(self) -> list[tuple[str, int, int]]:
        return [e[1:] for e in self.events if e[0] == "map"]

    def clear(self) -> None:
        self.events.clear()


def flat(ranges) -> list[tuple[str, int]]:
    """Every (file, byte offset) of `ranges` of (file, offset, nbytes), in order."""
    return [(f, b) for f, off, n in ranges for b in range(off, off + n)]


@st.composite
def window_cases(draw):
    """(layout name, sample, window): windows from inside the box to several box sides long, anchored
    on either side of the box, so that they cross shard edges and wrap."""
    name = draw(st.sampled_from(sorted(LAYOUTS)))
    shape = LAYOUTS[name][0][1:]
    return name, draw(st.integers(0, 1)), draw(windows(shape, span=2 * max(shape), max_len=2 * max(shape)))


@EXAMPLES
@given(case=window_cases(), cache=st.sampled_from([0, 2**12, 2**20]), threads=st.sampled_from([1, 3]))
def test_window_reads_equal_zarr(stores, case, cache, threads):
    """The shard decoder's read, hints included, is bit for bit what zarr-python reads, for any window,
    with the chunks copied in this thread or by several at once."""
    name, sample, win = case
    src = ZarrField(stores[name], "f", 2, cache_bytes=cache, copy_threads=threads)
    assert src.uses_direct_path
    got = read_window(src, sample, win)
    want = zarr_window(stores[name], sample, win)
    assert got.dtype == want.dtype and np.array_equal(got.view(np.uint32), want.view(np.uint32))


@EXAMPLES
@given(case=window_cases(), piece=st.sampled_from([None, 100, 512]))
def test_hints_cover_exactly_the_chunks_a_read_loads(stores, case, piece):
    """`hint_window` asks for every byte of the chunks the window touches (by the shard index), each once,
    in requests of at most `HINT_PIECE` bytes; a read of the same window maps exactly those chunks, and
    hints them all before it maps the first."""
    name, sample, win = case
    oracle = oracle_ranges(stores[name], sample, win)
    with Recorder(piece) as rec:
        src = ZarrField(stores[name], "f", 2, cache_bytes=0)
        asked = hint_window(src, sample, win)
        assert set(flat(rec.hints)) == set(flat(oracle))
        assert asked == sum(n for _, _, n in rec.hints) == sum(n for _, _, n in oracle)  # no byte twice
        assert all(0 < n <= shards.HINT_PIECE for _, _, n in rec.hints)
        rec.clear()
        read_window(src, sample, win)
    assert set(rec.maps) == oracle
    assert set(flat(rec.hints)) == set(flat(oracle))
    if oracle:
        kinds = [e[0] for e in rec.events]
        assert "hint" not in kinds[kinds.index("map"):]


@EXAMPLES
@given(case=window_cases(), bound=st.integers(-1, 2**15))
def test_bounded_hints_are_a_prefix_within_the_bound(stores, case, bound):
    """With `max_bytes`, the hints are the leading `max_bytes` bytes of the unbounded ones, in order."""
    name, sample, win = case
    with Recorder() as rec:
        src = ZarrField(stores[name], "f", 2, cache_bytes=0)
        full = src.window_ranges(sample, win)
        asked = src.hint_window(sample, win, max_bytes=bound)
    total = sum(r.nbytes for r in full)
    assert asked == sum(n for _, _, n in rec.hints) == min(max(bound, 0), total)
    prefix, left = [], max(bound, 0)
    for r in full:  # the first `bound` bytes of the ranges in read order
        take = min(left, r.nbytes)
        prefix += [(str(src.shard_layout.file(r.shard)), b) for b in range(r.offset, r.offset + take)]
        left -= take
    assert flat(rec.hints) == prefix


def test_reads_follow_the_bytes_on_disk(stores):
    """A read maps the chunks of each shard in the order of their offsets (zarr-python writes them in
    Morton order, not C order), one shard after another, and hints their bytes in that same order.
    (The window wraps, but no shard holds voxels of two of its periodic pieces.)"""
    with Recorder() as rec:
        read_window(ZarrField(stores["3d"], "f", 2, cache_bytes=0), 1, ((-3, 9), (2, 10), (-5, 7)))
    files = [f for f, _, _ in rec.maps]
    runs = [f for i, f in enumerate(files) if i == 0 or files[i - 1] != f]
    assert len(runs) == len(set(files))  # each shard's chunks together
    for f in set(files):
        offsets = [off for g, off, _ in rec.maps if g == f]
        assert offsets == sorted(offsets)
    assert any(len([g for g in files if g == f]) > 2 for f in set(files))
    assert flat(rec.hints) == flat(rec.maps)


def test_cached_and_never_written_chunks_are_not_hinted(stores, tmp_path):
    """Chunks in the reader's cache need no disk read, and a shard never written has no bytes."""
    win = ((0, 8), (0, 8), (0, 8))
    with Recorder() as rec:
        src = ZarrField(stores["3d"], "f", 2, cache_bytes=2**20)
        assert src.hint_window(0, win) == 3 * 8**3 * 4  # one whole shard
        read_window(src, 0, win)
        rec.clear()
        assert src.window_ranges(0, win) == [] and src.hint_window(0, win) == 0 and rec.hints == []
        assert src.hint_window(1, win) == 3 * 8**3 * 4  # the other sample is not cached

    copy = tmp_path / "copy.zarr"
    shutil.copytree(stores["3d"], copy)
    layout = ZarrField(str(copy), "f", 2).shard_layout
    os.remove(layout.file((0, 0, 0, 0, 0)))
    missing = ZarrField(str(copy), "f", 2, cache_bytes=0)
    assert missing.window_ranges(0, win) == []
    wide = ((-2, 10), (0, 8), (0, 8))  # the missing shard and its neighbour across the box edge
    assert {r.shard for r in missing.window_ranges(0, wide)} == {(0, 0, 1, 0, 0), (0, 0, 2, 0, 0)}
    got = read_window(missing, 0, wide)
    assert np.array_equal(got, zarr_window(str(copy), 0, wide)) and not got[:, 2:10].any()


def test_hints_leave_the_process_memory_alone(stores):
    """A hint maps nothing: the pages it asks for go to the page cache, not to the process."""
    src = ZarrField(stores["3d"], "f", 2, cache_bytes=0)
    before = Path("/proc/self/maps").read_text().count("\n")
    assert src.hint_window(0, ((-8, 24), (-8, 20), (-8, 24))) > 0
    assert Path("/proc/self/maps").read_text().count("\n") == before


# --------------------------------------------------------------------------- the pure range helpers


def ranges_strategy():
    shard = st.sampled_from([(0,), (1,)])
    return st.lists(st.builds(shards.ByteRange, shard, st.integers(0, 64), st.integers(1, 16)), max_size=8)


@given(ranges=ranges_strategy())
def test_merge_ranges_keeps_bytes_and_order(ranges):
    merged = shards.merge_ranges(ranges)
    flat = lambda rs: [(r.shard, b) for r in rs for b in range(r.offset, r.offset + r.nbytes)]  # noqa: E731
    assert flat(merged) == flat(ranges) and len(merged) <= len(ranges)
    assert all(not (a.shard == b.shard and a.offset + a.nbytes == b.offset) for a, b in zip(merged, merged[1:]))


@given(ranges=ranges_strategy(), bound=st.one_of(st.none(), st.integers(-4, 200)))
def test_bound_ranges_is_a_prefix_within_the_bound(ranges, bound):
    kept = shards.bound_ranges(ranges, bound)
    total = sum(r.nbytes for r in ranges)
    assert sum(r.nbytes for r in kept) == (total if bound is None else min(max(bound, 0), total))
    assert all(r.nbytes > 0 for r in kept)
    assert kept[:-1] == ranges[:max(len(kept) - 1, 0)]
    if kept:
        last, orig = kept[-1], ranges[len(kept) - 1]
        assert last.shard == orig.shard and last.offset == orig.offset and last.nbytes <= orig.nbytes


# --------------------------------------------------------------------------- the copy into augmented views


@given(shape=st.lists(st.integers(1, 70), min_size=2, max_size=3), data=st.data(), negate=st.booleans())
def test_copy_into_any_view_equals_plain_assignment(shape, data, negate):
    """`_copy` (whole runs or blocks, by the destination's layout) writes exactly ``src`` (or ``-src``)
    into a permuted, flipped view of a larger array, and nothing outside it."""
    from map2map.data import augment
    from map2map.data.windows import _copy

    element = data.draw(st.sampled_from(augment.cube_group(len(shape))))
    src = np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32)
    big = np.zeros([max(shape) + 3] * len(shape), np.float32)  # a cube: every view of it has its shape
    view = augment.inverse_view(big[None], element)[0]
    region = tuple(slice(1, 1 + n) for n in shape)
    _copy(view[region], src, negate)
    want = np.zeros_like(big)
    augment.inverse_view(want[None], element)[0][region] = -src if negate else src
    assert np.array_equal(big.view(np.uint32), want.view(np.uint32))


def _auto_threads(_):
    from map2map.data.windows import auto_copy_threads

    return auto_copy_threads()


def test_copy_threads_are_chosen_per_process():
    """``copy_threads=None``: several in the main process (here, where this machine has several cores), one in
    each DataLoader worker, whose siblings use the other cores."""
    import torch

    from map2map.data.windows import MAX_COPY_THREADS, auto_copy_threads

    cores = len(os.sched_getaffinity(0))
    assert auto_copy_threads() == max(1, min(MAX_COPY_THREADS, cores))
    loader = torch.utils.data.DataLoader(list(range(4)), batch_size=None, num_workers=2, collate_fn=_auto_threads)
    assert [int(n) for n in loader] == [1, 1, 1, 1]


def test_threaded_items_equal_single_threaded_items(stores):
    """FieldDataset items of a 3-d vector field, augmented (transposed, flipped and negated copies), are bit for
    bit the same whatever the copy threads; a bad count is one line."""
    from map2map.data.fields import FieldDataset
    from map2map.errors import UserError

    def items(threads):
        ds = FieldDataset(store=stores["3d"], in_fields=["f"], tgt_fields=["f"], crop=4, in_pad=3, augment=True,
                          cache_bytes=0, copy_threads=threads)
        return [ds[i] for i in range(len(ds))]

    one, three = items(1), items(3)
    assert len(one) == 2 * 5 * 3 * 4
    for a, b in zip(one, three):
        for key in ("input", "target"):
            assert np.array_equal(a[key].numpy().view(np.uint32), b[key].numpy().view(np.uint32))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(UserError, match="copy_threads must be a positive integer"):
            items(bad)
