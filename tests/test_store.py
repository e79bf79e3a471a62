"""The store's own rules and the helpers every writer shares: field names, staged replacement, durable atomic
files, and pairing glob matches."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from hypothesis import given
from hypothesis import strategies as st

from map2map import npyfile, store
from map2map.errors import UserError
from map2map.utils import durable

# ------------------------------------------------------------------ field names

REFUSED = {
    "": "empty",
    "x_64": "spatial dimensions",
    "y_1": "spatial dimensions",
    "z_007": "spatial dimensions",
    "channel_3": "channel dimensions",
    "sample": "sample dimension",
    "source_a": "source-file coordinates",
    "source_": "source-file coordinates",
    "__meta": "Zarr reserves",
    "1st": "starts with a letter",
    "-a": "starts with a letter",
    "a b": "a word of letters",
    "a/b": "a word of letters",
    "a.b": "a word of letters",
    "dé": "a word of letters",
    "a" * (store.MAX_NAME + 1): "at most",
}
# Plain words that only look like the store's own names: each must open as its own variable.
ACCEPTED = ["disp", "_a", "a-b", "A", "X_64", "x64", "x_", "xy_3", "w_3", "channel", "channels_3", "channel_x",
            "samples", "Sample", "source", "sourcefile", "c", "zarr", "a" * store.MAX_NAME]


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_field_names(name):
    with pytest.raises(UserError) as err:
        store.check_field_name(name, "--field")
    message = str(err.value)
    assert REFUSED[name] in message and message.startswith("--field") and "\n" not in message
    if name:
        assert repr(name) in message


def test_accepted_names_open_as_variables_beside_the_stores_own(tmp_path):
    """A store holding every accepted look-alike name opens in xarray, each name as its own data variable."""
    for name in ACCEPTED:
        store.check_field_name(name, "--field")
    layouts = [store.FieldLayout(name, 1 + i % 3, (4, 4, 4) if i % 2 else (8, 8, 8), (4, 4, 4), (2, 2, 2))
               for i, name in enumerate(ACCEPTED)]
    path = tmp_path / "s.zarr"
    group = store.create(path, layouts, nsample=1, boxsize=1.0, settings={})
    for i, lay in enumerate(layouts):
        group[lay.name][0] = np.full((lay.channels,) + lay.spatial, i, np.float32)
    store.mark_complete(path, 1)
    ds = xr.open_zarr(path)
    assert sorted(ds.data_vars) == sorted(ACCEPTED)
    for i, lay in enumerate(layouts):
        assert ds[lay.name].dims == lay.dims and float(ds[lay.name].max()) == i


@given(st.text(max_size=12))
def test_a_refusal_is_one_line_naming_the_option(name):
    try:
        store.check_field_name(name, "--out-field")
    except UserError as exc:
        assert str(exc).startswith("--out-field") and "\n" not in str(exc)
    else:
        assert name.isascii() and (name[0].isalpha() or name[0] == "_")
        made = {"sample", store.source_name("f"), store.channel_dim(3), *store.spatial_dims((64, 64, 64))}
        assert name not in made and not name.startswith("source_")


# ------------------------------------------------------------ staged replacement

def _store(path: Path, value: float) -> None:
    """A complete one-field store whose data all equal `value`."""
    group = store.create(path, [store.FieldLayout("f", 1, (4, 4), (4, 4), (2, 2))], nsample=1, boxsize=None,
                         settings={})
    group["f"][0] = np.full((1, 4, 4), value, np.float32)
    store.mark_complete(path, 1)


def _value(path: Path) -> float:
    return float(store.open_store(path).field("f")[0].max())


def test_staged_path_is_beside_the_store(tmp_path):
    assert store.staged_path(tmp_path / "s.zarr") == str(tmp_path / "s.zarr") + store.PARTIAL
    assert store.staged_path(f"{tmp_path}/s.zarr/") == str(tmp_path / "s.zarr") + store.PARTIAL


def test_swap_replaces_the_store_and_leaves_nothing_beside_it(tmp_path):
    out = tmp_path / "s.zarr"
    _store(out, 1.0)
    staged = Path(store.staged_path(out))
    _store(staged, 2.0)
    store.swap_in(staged, out)
    assert _value(out) == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]
    # into an empty place, and over a leftover of an interrupted earlier swap
    _store(tmp_path / ("s.zarr" + store.OLD), 9.0)
    _store(staged, 3.0)
    store.swap_in(staged, out)
    _store(staged, 4.0)
    store.swap_in(staged, tmp_path / "t.zarr")
    assert (_value(out), _value(tmp_path / "t.zarr")) == (3.0, 4.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr", "t.zarr"]


def test_failure_before_the_swap_leaves_the_old_store_intact(tmp_path):
    out = tmp_path / "s.zarr"
    _store(out, 1.0)
    staged = Path(store.staged_path(out))
    with pytest.raises(RuntimeError):
        group = store.create(staged, [store.FieldLayout("f", 1, (4, 4), (4, 4), (2, 2))], nsample=1,
                             boxsize=None, settings={})
        group["f"][0] = np.full((1, 4, 4), 2.0, np.float32)
        raise RuntimeError("the writer dies before its completion mark")
    assert _value(out) == 1.0 and store.open_store(out).meta["complete"]
    with pytest.raises(store.IncompleteStoreError):
        store.open_store(staged)


def test_failed_rename_puts_the_old_store_back(tmp_path, monkeypatch):
    out = tmp_path / "s.zarr"
    _store(out, 1.0)
    staged = Path(store.staged_path(out))
    _store(staged, 2.0)
    replace = os.replace

    def failing(src, dst):
        if os.fspath(src) == str(staged):
            raise OSError("disk gone")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="disk gone"):
        store.swap_in(staged, out)
    monkeypatch.setattr(os, "replace", replace)
    assert _value(out) == 1.0 and _value(staged) == 2.0
    assert not (tmp_path / ("s.zarr" + store.OLD)).exists()


# ------------------------------------------------------------ durable atomic files

def test_atomic_write_bytes_text_and_writer(tmp_path):
    assert durable.atomic_write(tmp_path / "a.bin", b"\x00\x01") == tmp_path / "a.bin"
    durable.atomic_write(tmp_path / "b.txt", "grüß\n")
    durable.atomic_write(tmp_path / "c.npy", lambda f: np.save(f, np.arange(5)))
    durable.atomic_write(tmp_path / "a.bin", b"new")  # replaces
    assert (tmp_path / "a.bin").read_bytes() == b"new"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "grüß\n"
    assert np.array_equal(np.load(tmp_path / "c.npy"), np.arange(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "c.npy"]


def test_atomic_path_for_writers_that_need_a_path(tmp_path):
    with durable.atomic_path(tmp_path / "m.npy") as tmp:
        assert durable.is_temporary(tmp.name) and tmp.parent == tmp_path
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(3, 4))
        mm[:] = 7
        mm.flush()
        del mm
        assert not (tmp_path / "m.npy").exists()
    assert np.all(np.load(tmp_path / "m.npy") == 7)
    assert [p.name for p in tmp_path.iterdir()] == ["m.npy"]


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        durable.atomic_write(tmp_path / "private", b"x")
        os.umask(0o022)
        durable.atomic_write(tmp_path / "shared", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o644


def test_data_is_fsynced_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace

    def record_fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        fsync(fd)

    def record_replace(src, dst):
        events.append(("replace", os.stat(src).st_ino))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_replace)
    durable.atomic_write(tmp_path / "f", b"data")
    monkeypatch.undo()
    file_ino, dir_ino = (tmp_path / "f").stat().st_ino, tmp_path.stat().st_ino
    assert events == [("fsync", file_ino), ("replace", file_ino), ("fsync", dir_ino)]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    durable.atomic_write(path, "old")

    def half(f):
        f.write(b"half of the new")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        durable.atomic_write(path, half)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]

    def no_rename(src, dst):
        raise OSError("rename refused")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="rename refused"):
        durable.atomic_write(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


# ------------------------------------------------------------ pairing glob matches

def test_glob_paired_sorts_and_pairs_absolute_paths(tmp_path, monkeypatch):
    for name in ("b_2", "b_10", "b_1", "a_1", "a_2", "a_3"):
        (tmp_path / f"{name}.npy").touch()
    (tmp_path / "b_3.npy").touch()
    monkeypatch.chdir(tmp_path)
    a, b = npyfile.glob_paired(["a_*.npy", "b_?.npy"], "--field")
    assert a == [str(tmp_path / f"a_{i}.npy") for i in (1, 2, 3)]
    assert b == [str(tmp_path / f"b_{i}.npy") for i in (1, 2, 3)]  # sorted by path: b_10 is not matched
    monkeypatch.setenv("HOME", str(tmp_path))
    assert npyfile.glob_paired(["~/a_*.npy"], "--x") == [a]


def test_glob_paired_errors_name_the_patterns(tmp_path):
    (tmp_path / "a_1.npy").touch()
    (tmp_path / "b_1.npy").touch()
    (tmp_path / "b_2.npy").touch()
    with pytest.raises(UserError) as err:
        npyfile.glob_paired([f"{tmp_path}/a_*.npy", f"{tmp_path}/none_*.npy"], "--test-in-patterns")
    assert str(err.value) == f"--test-in-patterns pattern '{tmp_path}/none_*.npy' matches no files"
    with pytest.raises(UserError) as err:
        npyfile.glob_paired([f"{tmp_path}/a_*.npy", f"{tmp_path}/b_*.npy"], "--field")
    assert str(err.value) == (f"--field patterns match different numbers of files: '{tmp_path}/a_*.npy': 1, "
                              f"'{tmp_path}/b_*.npy': 2")


# ------------------------------------------------------------------ output paths

def _refusal(out, inputs=(), match=""):
    with pytest.raises(UserError, match=match) as err:
        store.check_output_path(out, inputs=inputs, option="--out")
    message = str(err.value)
    assert "\n" not in message and message.startswith("--out ")
    return message


def test_output_may_not_be_an_input_inside_one_or_around_one(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.npy").write_bytes(b"x")
    _store(tmp_path / "in.zarr", 1.0)
    inputs = [data / "a.npy", tmp_path / "in.zarr"]
    _refusal(tmp_path / "in.zarr", inputs, "is the input")
    _refusal(data / "a.npy", inputs, "is the input")
    _refusal(tmp_path / "in.zarr" / "pred.zarr", inputs, "inside the input")
    _refusal(data, inputs, "contains the input")
    _refusal(tmp_path, inputs, "contains the input")
    (tmp_path / "link").symlink_to(tmp_path / "in.zarr")  # another name for the input
    _refusal(tmp_path / "link", inputs, "is the input")
    _refusal(str(tmp_path / "data") + "/../in.zarr/x", inputs, "inside the input")
    for fine in (tmp_path / "out.zarr", data / "b.npy", tmp_path / "in.zarr.bak", tmp_path / "new" / "deep" / "o"):
        store.check_output_path(fine, inputs=inputs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "in.zarr", "link"]  # it checks, never creates


def test_output_inside_any_map2map_store_is_refused(tmp_path):
    _store(tmp_path / "s.zarr", 1.0)
    _refusal(tmp_path / "s.zarr" / "pred.zarr", (), "inside the map2map store")
    _refusal(tmp_path / "s.zarr" / "x" / "y", (), "inside the map2map store")
    store.check_output_path(tmp_path / "s.zarr")  # replacing the store itself is each writer's decision
    (tmp_path / "plain").mkdir()
    store.check_output_path(tmp_path / "plain" / "o.zarr")


def test_parent_must_be_creatable(tmp_path):
    (tmp_path / "file").write_text("x")
    message = _refusal(tmp_path / "file" / "o.zarr", (), "is a file")
    assert str(tmp_path / "file") in message
    _refusal(tmp_path / "file" / "a" / "b", (), "is a file")
    _refusal("/proc/x.zarr", (), "proc file system")
    _refusal("/sys/x", (), "sysfs")
    _refusal("", (), "empty")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any directory")
def test_unwritable_parent_is_refused(tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        _refusal(locked / "o.zarr", (), "not writable")
    finally:
        locked.chmod(0o755)


def test_foreign_entries_name_what_is_not_the_stores_own(tmp_path):
    path = tmp_path / "s.zarr"
    _store(path, 1.0)
    assert store.foreign_entries(path) == []
    (path / ".m2m-done").mkdir()  # a writer's own working files
    assert store.foreign_entries(path) == []
    _store(path / "pred.zarr", 2.0)
    (path / "notes.txt").write_text("mine")
    assert store.foreign_entries(path) == ["notes.txt", "pred.zarr"]


def test_completion_mark_leaves_out_only_the_chunks_writers_synced(tmp_path, monkeypatch):
    """`mark_complete(synced=[field])`: that field's chunk files are not fsynced again; its metadata, every
    other file and every directory are, and the store reads back complete."""
    path = tmp_path / "s.zarr"
    layouts = [store.FieldLayout(name, 1, (8, 8), (4, 4), (4, 4)) for name in ("a", "b")]
    group = store.create(path, layouts, nsample=1, boxsize=None, settings={})
    group["a"][:] = 1.0
    group["b"][:] = 2.0
    synced: list[tuple[str, ...]] = []
    real = durable.fsync_path
    monkeypatch.setattr(durable, "fsync_path", lambda p: (synced.append(Path(p).relative_to(path).parts), real(p)))
    store.mark_complete(path, 1, synced=["a"])
    files = {Path(d, f).relative_to(path).parts for d, _, fs in os.walk(path) for f in fs}
    chunks_a = {p for p in files if p[0] == "a" and p[-1] != "zarr.json"}
    assert chunks_a and not chunks_a & set(synced)
    assert ("a", "zarr.json") in synced and ("a",) in synced  # metadata and directories still made durable
    assert {p for p in files if p[0] == "b" and p[-1] != "zarr.json"} <= set(synced)
    assert store.open_store(path).nsample == 1


# --------------------------------------------------------------------------- shards laid out directly

def _zarr_encoded(arr, index, values) -> dict[str, bytes]:
    """The oracle: zarr's own codecs writing ``arr[index] = values`` to an in-memory copy of `arr`."""
    import zarr
    from zarr.core.buffer import default_buffer_prototype
    from zarr.storage import MemoryStore

    encoded = dict(arr.metadata.to_buffer_dict(default_buffer_prototype()))
    mem = zarr.open_array(store=MemoryStore(store_dict=encoded), mode="r+").with_config({"write_empty_chunks": True})
    mem[index] = values
    return {k: v.to_bytes() for k, v in encoded.items() if k != "zarr.json"}


@given(st.data())
def test_shards_laid_out_directly_are_zarrs_bytes(data):
    """An uncompressed sharded array's whole shards, laid out by `encode_shards` without zarr's codecs, are
    byte for byte what zarr writes (inner chunks in its order, the crc32c-checked index at the end), for any
    shard and inner chunk sizes, sample and channel indexing, and writes of one or several shards; zero
    chunks included."""
    import zarr

    ndim = data.draw(st.integers(1, 3), label="ndim")
    chunk = tuple(data.draw(st.lists(st.sampled_from([1, 2, 3]), min_size=ndim, max_size=ndim), label="chunk"))
    per = tuple(data.draw(st.lists(st.integers(1, 3), min_size=ndim, max_size=ndim), label="chunks per shard"))
    shard = tuple(c * p for c, p in zip(chunk, per))
    counts = tuple(data.draw(st.lists(st.integers(1, 3), min_size=ndim, max_size=ndim), label="shards per axis"))
    nchan = data.draw(st.integers(1, 2), label="channels")
    shape = (2, nchan) + tuple(s * n for s, n in zip(shard, counts))
    arr = zarr.create_array(zarr.storage.MemoryStore(), shape=shape, dtype="float32",
                            shards=(1, nchan) + shard, chunks=(1, nchan) + chunk, compressors=None, fill_value=0)
    sample = data.draw(st.integers(0, 1), label="sample")
    lo = [data.draw(st.integers(0, n - 1), label="first shard") for n in counts]
    hi = [data.draw(st.integers(a + 1, n), label="end shard") for a, n in zip(lo, counts)]
    index = (sample, slice(None)) + tuple(slice(a * s, b * s) for a, b, s in zip(lo, hi, shard))
    values = np.random.default_rng(data.draw(st.integers(0, 9), label="seed")).standard_normal(
        (nchan,) + tuple((b - a) * s for a, b, s in zip(lo, hi, shard))).astype(np.float32)
    values[(slice(None),) + tuple(slice(0, c) for c in chunk)] = 0  # an all-zero chunk is written too
    assert store._plain_layout(arr) is not None
    got = store.encode_shards(arr, [(index, values)])
    assert got == _zarr_encoded(arr, index, values)
    assert len(got) == np.prod([b - a for a, b in zip(lo, hi)])


def test_other_writes_go_through_zarrs_codecs():
    """A compressed array, and a write that is not whole shards inside the array, are encoded by zarr."""
    import zarr

    values = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8)
    zstd = zarr.create_array(zarr.storage.MemoryStore(), shape=(1, 2, 8, 8), dtype="float32", shards=(1, 2, 8, 8),
                             chunks=(1, 2, 4, 4), compressors=zarr.codecs.ZstdCodec(level=1))
    assert store._plain_layout(zstd) is None
    index = (0, slice(None), slice(0, 8), slice(0, 8))
    assert store.encode_shards(zstd, [(index, values)]) == _zarr_encoded(zstd, index, values)
    edge = zarr.create_array(zarr.storage.MemoryStore(), shape=(1, 2, 12, 8), dtype="float32",
                             shards=(1, 2, 8, 8), chunks=(1, 2, 4, 4), compressors=None)
    layout = store._plain_layout(edge)
    index = (0, slice(None), slice(8, 12), slice(0, 8))  # the last shard reaches past the array's end
    assert store._plain_shards(edge, layout, index, values[:, :4]) is None
    assert store.encode_shards(edge, [(index, values[:, :4])]) == _zarr_encoded(edge, index, values[:, :4])
