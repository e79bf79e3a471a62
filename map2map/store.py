"""The store contract between pipeline stages: create, open, validate, mark complete.

A store is a Zarr (format 3) group.  Each field is an array shaped
``(sample, channel, *spatial)`` with named dimensions; every distinct grid size
gets its own spatial dimension names (``x_64``, ``y_64``, ``z_64``) and
channel counts their own channel dimension (``channel_3``), so that
``xarray.open_zarr`` opens the whole store as one Dataset and stores with the
same grids line up.  Coordinates are cell centres, in the box's length unit
when a box size is known and in box fractions otherwise.

The group attribute ``map2map`` holds the format version, box size,
periodicity, per-field settings, ``nsample`` (the number of samples that are
complete) and ``complete``.  The completion mark, together with the
consolidated metadata, is written last: readers open the consolidated view,
which only ever shows whole, finished samples, and refuse a store whose mark
is missing.

Field names are the store's to rule (`check_field_name`): a plain word that
none of the store's own arrays (``sample``, ``source_<field>``, the
dimension coordinates) can ever take.  Replacing a store is staged: the new
one is built beside it (`staged_path`) and swapped in only when complete
(`swap_in`), so a failure leaves the old store as it was.

Styles are per-sample parameters (e.g. Omega_m, the growth factor D): an
optional float32 array ``style`` shaped ``(sample, param)`` whose ``param``
coordinate names each parameter, written, resized and completed with the
fields (`create`'s `style_names`, `write_styles`) and read with
`read_styles`.  The names are also listed in the attribute (``styles``).

Output paths are the store's to rule too (`check_output_path`): an output
is never an input, inside one or around one, never inside another store,
and its parent must be creatable; `foreign_entries` says what in a store
directory (or under a remote store's prefix) is not the store's own, so
that no ``--overwrite`` deletes it.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import zarr

from map2map import storage
from map2map.errors import UserError
from map2map.storage import StorageOptions
from map2map.utils import durable

FORMAT_VERSION = 1
ATTR = "map2map"
AXES = "xyz"
PARTIAL = ".m2m-partial"  # suffix of the replacement a writer builds beside a store (`staged_path`)
OLD = ".m2m-old"  # suffix of the replaced store while `swap_in` moves it aside
MAX_NAME = 248  # longest field name: ``source_<name>`` must fit a 255-byte file name

warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")


class IncompleteStoreError(UserError):
    """The store lacks its completion mark: a writer died or is still running."""


def spatial_dims(shape: Iterable[int]) -> tuple[str, ...]:
    """Dimension names of a grid: the axis letter and its size, e.g. ``("x_64", "y_64", "z_64")``."""
    return tuple(f"{AXES[d]}_{n}" for d, n in enumerate(shape))


def channel_dim(nchan: int) -> str:
    return f"channel_{nchan}"


def field_dims(nchan: int, spatial: Iterable[int]) -> tuple[str, ...]:
    return ("sample", channel_dim(nchan)) + spatial_dims(spatial)


def source_name(field: str) -> str:
    """Name of the coordinate holding the source file of each sample of `field`."""
    return f"source_{field}"


_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_RESERVED = (  # names a store gives its own arrays (or Zarr reserves), and why a field cannot take them
    (re.compile(r"sample"), "clashes with the sample dimension every store has"),
    (re.compile(r"source_.*"), "clashes with the source-file coordinates source_<field> every store has"),
    (re.compile(r"channel_[0-9]+"), "clashes with the channel dimensions channel_<N> every store has"),
    (re.compile(f"[{AXES}]_[0-9]+"), "clashes with the spatial dimensions x_<N>, y_<N>, z_<N> every store has"),
    (re.compile(r"__.*"), "starts with '__', which Zarr reserves"),
    (re.compile(r"style|param"), "clashes with the style array and its param coordinate a store may have"),
)


def check_field_name(name: str, option: str) -> None:
    """Refuse a field name a store cannot hold as its own variable: a `UserError` naming `option`.

    A field name is a *plain word*: letters, digits, ``_`` or ``-``, starting
    with a letter or ``_``, at most `MAX_NAME` characters (ASCII only: it is
    a file name in the store and a variable name in xarray).  It must not
    take a name the store creates itself: ``sample``, ``source_*``, channel
    dimensions ``channel_<N>``, spatial dimensions ``x_<N>``, ``y_<N>``,
    ``z_<N>`` (also the names of their coordinates), nor a Zarr-reserved
    ``__*``.  Such a name would collide inside the store and end in a Zarr
    or xarray error far from its cause.
    """
    if not name:
        raise UserError(f"{option}: the field name is empty; give a word such as 'disp'")
    if not _WORD.fullmatch(name) or len(name) > MAX_NAME:
        raise UserError(f"{option} {name!r}: a field name is a word of letters, digits, '_' or '-' "
                        f"that starts with a letter or '_' (at most {MAX_NAME} characters)")
    for pattern, reason in _RESERVED:
        if pattern.fullmatch(name):
            raise UserError(f"{option} {name!r}: the name {reason}; choose another field name")


def cell_centres(n: int, boxsize: float | None) -> np.ndarray:
    """Cell-centre positions of a periodic grid of `n` cells, in box units (or box fractions)."""
    length = 1.0 if boxsize is None else float(boxsize)
    return (np.arange(n, dtype=np.float64) + 0.5) * (length / n)


@dataclass(frozen=True)
class FieldLayout:
    """How one field is stored: its shape per sample and its chunking (spatial parts only)."""

    name: str
    channels: int
    spatial: tuple[int, ...]
    shard: tuple[int, ...]
    chunk: tuple[int, ...]
    dtype: str = "float32"
    compressor: str = "none"

    @property
    def dims(self) -> tuple[str, ...]:
        return field_dims(self.channels, self.spatial)


def _compressors(name: str) -> Any:
    if name == "none":
        return None
    if name == "zstd":
        return zarr.codecs.ZstdCodec(level=1)
    if name == "blosc":
        return zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
    raise UserError(f"unknown compressor {name!r}: expected none, zstd or blosc")


def _create_field(group: zarr.Group, layout: FieldLayout, nsample: int) -> None:
    arr = group.create_array(
        layout.name,
        shape=(nsample, layout.channels) + layout.spatial,
        chunks=(1, layout.channels) + layout.chunk,
        shards=(1, layout.channels) + layout.shard,
        dtype=layout.dtype,
        compressors=_compressors(layout.compressor),
        fill_value=0.0,
        dimension_names=list(layout.dims),
        config={"write_empty_chunks": True},
    )
    arr.attrs["coordinates"] = source_name(layout.name)
    src = group.create_array(source_name(layout.name), shape=(nsample,), chunks=(4096,), dtype=str,
                             dimension_names=["sample"])
    src.attrs["long_name"] = f"source file of each sample of {layout.name}"


def _create_coords(group: zarr.Group, layouts: Iterable[FieldLayout], boxsize: float | None,
                   nsample: int) -> None:
    sample = group.create_array("sample", shape=(nsample,), chunks=(4096,), dtype="int64",
                                dimension_names=["sample"])
    if nsample:
        sample[:] = np.arange(nsample)
    done = set()
    for layout in layouts:
        for name, n in zip(spatial_dims(layout.spatial), layout.spatial):
            if name in done:
                continue
            done.add(name)
            coord = group.create_array(name, shape=(n,), dtype="float64", dimension_names=[name])
            coord[:] = cell_centres(n, boxsize)
            coord.attrs["units"] = "box length unit" if boxsize is not None else "box fraction"
            coord.attrs["long_name"] = f"{name[0]} cell centre"
        cname = channel_dim(layout.channels)
        if cname not in done:
            done.add(cname)
            coord = group.create_array(cname, shape=(layout.channels,), dtype="int64", dimension_names=[cname])
            coord[:] = np.arange(layout.channels)


def create(path: str | Path, layouts: list[FieldLayout], *, nsample: int, boxsize: float | None,
           settings: dict[str, Any], style_names: Iterable[str] = (),
           storage_options: StorageOptions | None = None) -> zarr.Group:
    """Create an empty, incomplete store at `path` (a local path or URL, which must not exist).

    With `style_names` (checked by `check_style_names`) the store also gets
    the ``style`` array, zero until `write_styles` fills it.
    """
    style_names = tuple(style_names)
    group = open_group(path, "w-", storage_options, zarr_format=3)
    meta = {
        "format_version": FORMAT_VERSION,
        "complete": False,
        "nsample": 0,
        "boxsize": boxsize,
        "periodic": True,
        "fields": {lay.name: dict(settings.get(lay.name, {}), channels=lay.channels, spatial=list(lay.spatial),
                                  shard=list(lay.shard), chunk=list(lay.chunk), dtype=lay.dtype,
                                  compressor=lay.compressor)
                   for lay in layouts},
    }
    meta.update({k: v for k, v in settings.items() if k not in meta["fields"]})
    if style_names:
        meta["styles"] = list(check_style_names(style_names, "style names"))
    group.attrs[ATTR] = meta
    for layout in layouts:
        _create_field(group, layout, nsample)
    _create_coords(group, layouts, boxsize, nsample)
    if style_names:
        _create_styles(group, style_names, nsample)
    return group


# ------------------------------------------------------------------ styles

STYLE = "style"  # the array of per-sample parameters, (sample, param)
PARAM = "param"  # its coordinate: the name of each parameter
STYLE_DIMS = ("sample", PARAM)


def check_style_names(names: Iterable[str], option: str) -> tuple[str, ...]:
    """The parameter names as a tuple, refused (a `UserError` naming `option`) unless plain, distinct words.

    A parameter name follows the rule of field names (`check_field_name`'s
    *plain word*, without its reserved names: a parameter is no variable of
    its own); at least one is needed.
    """
    names = tuple(names)
    if not names:
        raise UserError(f"{option}: no parameter names; give at least one, e.g. Om,D")
    for name in names:
        if not isinstance(name, str) or not _WORD.fullmatch(name) or len(name) > MAX_NAME:
            raise UserError(f"{option}: parameter name {name!r} is not a word of letters, digits, '_' or '-' "
                            "starting with a letter or '_'")
    seen = set()
    for name in names:
        if name in seen:
            raise UserError(f"{option}: parameter name {name!r} is given twice; every parameter needs its own name")
        seen.add(name)
    return names


def style_number(text: str, where: str) -> float:
    """One style value read from text: a finite number, or a `UserError` saying `where` it is and what it holds."""
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{where}: {text.strip()!r} is not a number; styles are numbers such as 0.31") from None
    if not math.isfinite(value):
        raise UserError(f"{where}: {text.strip()!r} is not finite; every style must be a finite number")
    return value


def _create_styles(group: zarr.Group, names: tuple[str, ...], nsample: int) -> None:
    arr = group.create_array(STYLE, shape=(nsample, len(names)), chunks=(4096, len(names)), dtype="float32",
                             fill_value=0.0, dimension_names=list(STYLE_DIMS))
    arr.attrs["long_name"] = "per-sample style parameters, named by the param coordinate"
    coord = group.create_array(PARAM, shape=(len(names),), dtype=str, dimension_names=[PARAM])
    coord[:] = np.array(names)
    coord.attrs["long_name"] = "name of each style parameter"


def write_styles(path: str | Path, values: np.ndarray, first_sample: int,
                 storage_options: StorageOptions | None = None) -> None:
    """Write the rows of `values` (nsample, nparam) as the styles of samples ``first_sample, ...``.

    The store must have been created with that many style names and hold
    those samples (an incomplete store being written, or one resized for an
    append); its completion mark is the caller's (`mark_complete`).
    """
    group = open_group(path, "r+", storage_options)
    values = np.asarray(values, dtype=np.float32)
    group[STYLE][first_sample:first_sample + len(values)] = values


def read_styles(path: str | Path | Store,
                storage_options: StorageOptions | None = None) -> tuple[tuple[str, ...], np.ndarray] | None:
    """The style parameters of a complete store: (names, float32 values shaped (nsample, nparam)), or None.

    None when the store has no styles.  `path` may be an opened `Store`.
    Only complete samples are read.
    """
    st = path if isinstance(path, Store) else open_store(path, storage_options=storage_options)
    names = st.style_names
    if not names:
        return None
    values = np.asarray(st.group[STYLE][: st.nsample], dtype=np.float32)
    return names, values


def mark_complete(path: str | Path, nsample: int, *, synced: Iterable[str] = (),
                  storage_options: StorageOptions | None = None, **extra: Any) -> None:
    """Write the completion mark and the consolidated metadata: the last write of every writer.

    Everything in a local store is fsynced first, and the mark after, so
    that not even a power loss can leave a store marked complete whose data
    did not reach the disk.  `synced` names arrays whose chunk files their
    writers already fsynced (inference workers do, before recording a
    tile): those files are not fsynced again, their directories and
    metadata are.  In object storage every object whose write returned is
    stored, so the mark simply comes after the last of them.
    """
    remote = storage.is_remote(path)
    if not remote:
        synced = frozenset(synced)
        durable.fsync_tree(path, lambda rel: len(rel) > 1 and rel[0] in synced and rel[-1] != "zarr.json")
    group = open_group(path, "r+", storage_options)
    meta = dict(group.attrs[ATTR])
    meta.update(extra, complete=True, nsample=int(nsample))
    group.attrs[ATTR] = meta
    zarr.consolidate_metadata(group.store)
    if not remote:
        durable.fsync_files([Path(path) / "zarr.json", path])


def open_group(path: str | Path, mode: str, storage_options: StorageOptions | None = None,
               **kwargs: Any) -> zarr.Group:
    """``zarr.open_group`` of the store at `path` (a local path or URL, `map2map.storage`).

    Modes other than ``"r"`` open the metadata as written (not the
    consolidated view, which is only rewritten by `mark_complete`); ``"r"``
    opens the consolidated view where there is one.
    """
    kwargs.setdefault("use_consolidated", None if mode == "r" else False)
    if mode == "w-":
        kwargs.pop("use_consolidated")
    return zarr.open_group(mode=mode, **storage.zarr_kwargs(os.fspath(path), storage_options), **kwargs)


def encode_shards(arr, writes: Sequence[tuple[tuple, np.ndarray]]) -> dict[str, bytes]:
    """The objects `writes` ((index, values) pairs, each index a union of whole shards of `arr`) make in
    `arr`'s store: key within the array -> bytes, as zarr encodes them for `arr` (same metadata, so the
    same bytes), in memory, without reading what the shards held before.

    Shards of an uncompressed array (what `create` makes without a
    compressor) whose writes cover them inside the array are laid out here
    directly (`_plain_shards`), every inner chunk written, in zarr's order;
    any other write goes through zarr's own codecs on an in-memory store.
    """
    objects: dict[str, bytes] = {}
    rest = []
    layout = _plain_layout(arr)
    for index, values in writes:
        shards = _plain_shards(arr, layout, index, values) if layout is not None else None
        if shards is None:
            rest.append((index, values))
        else:
            objects.update(shards)
    if rest:
        import zarr
        from zarr.core.buffer import default_buffer_prototype
        from zarr.storage import MemoryStore

        encoded = dict(arr.metadata.to_buffer_dict(default_buffer_prototype()))
        mem = zarr.open_array(store=MemoryStore(store_dict=encoded), mode="r+").with_config(
            {"write_empty_chunks": True})
        for index, values in rest:
            mem[index] = values
        objects.update((key, buf.to_bytes()) for key, buf in encoded.items() if key != "zarr.json")
    return objects


def _plain_layout(arr) -> tuple[tuple[int, ...], tuple[int, ...], Any] | None:
    """(shard shape, inner chunk shape, zarr's order of inner chunks in a shard) when `arr` is sharded
    with raw little-endian inner chunks and a crc32c-checked index at the end (as `create` makes an
    uncompressed array), else None."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

    try:
        from zarr.core.indexing import morton_order_iter
    except ImportError:  # another zarr: its own codecs encode every shard
        return None
    codecs = arr.metadata.codecs if hasattr(arr.metadata, "codecs") else ()
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sharding = codecs[0]
    little = all(isinstance(c, BytesCodec) and getattr(c.endian, "value", c.endian) == "little"
                 for c in (sharding.codecs[0], sharding.index_codecs[0]))
    if not (little and len(sharding.codecs) == 1 and len(sharding.index_codecs) == 2
            and isinstance(sharding.index_codecs[1], Crc32cCodec) and sharding.index_location.value == "end"):
        return None
    return tuple(arr.shards), tuple(sharding.chunk_shape), morton_order_iter


def _plain_shards(arr, layout, index: tuple, values: np.ndarray) -> dict[str, bytes] | None:
    """The shard objects of the write ``arr[index] = values`` laid out directly (see `_plain_layout`):
    key -> bytes, or None unless `index` (integers and slices of step 1) covers whole shards, all inside
    the array."""
    import google_crc32c

    shard, chunk, order = layout
    if not isinstance(index, tuple) or len(index) != len(arr.shape):
        return None
    lo, hi = [], []
    for i, n in zip(index, arr.shape):
        if isinstance(i, (int, np.integer)):
            lo.append(int(i))
            hi.append(int(i) + 1)
        elif isinstance(i, slice) and i.step in (None, 1):
            a, b, _ = i.indices(n)
            lo.append(a)
            hi.append(b)
        else:
            return None
    if any(a % s or b % s or b <= a for a, b, s in zip(lo, hi, shard)):  # whole shards, inside the array
        return None
    region = tuple(b - a for a, b in zip(lo, hi))
    dtype = arr.dtype.newbyteorder("<")
    data = np.broadcast_to(np.asarray(values), region) if np.ndim(values) == 0 else np.asarray(values)
    if data.size != math.prod(region):
        return None
    data = data.reshape(region)
    per_shard = tuple(s // c for s, c in zip(shard, chunk))
    objects = {}
    for first in itertools.product(*(range(a, b, s) for a, b, s in zip(lo, hi, shard))):
        parts, table = [], np.zeros(per_shard + (2,), dtype="<u8")
        offset = 0
        for inner in order(per_shard):
            at = tuple(f - a + i * c for f, a, i, c in zip(first, lo, inner, chunk))
            block = data[tuple(slice(x, x + c) for x, c in zip(at, chunk))]
            raw = np.ascontiguousarray(block, dtype=dtype).tobytes()
            table[inner] = (offset, len(raw))
            parts.append(raw)
            offset += len(raw)
        table_bytes = table.tobytes()
        parts += [table_bytes, np.uint32(google_crc32c.value(table_bytes)).astype("<u4").tobytes()]
        key = arr.metadata.encode_chunk_key(tuple(f // s for f, s in zip(first, shard)))
        objects[key] = b"".join(parts)
    return objects


class ShardObjects:
    """Writes of whole shards to arrays of a store, each shard stored as one object (or file).

    zarr writes a shard by reading what it held first (a GET, before the
    PUT), even when the write covers all of it.  A writer that owns whole
    shards (a convert task, an inference tile) gathers its writes here
    (`add`); `store` encodes the shards in memory (`encode_shards`) and
    stores each with one PUT, all of them at once; in a local store each
    is one file written whole (its writer fsyncs it, as inference does).
    """

    def __init__(self) -> None:
        self.writes: dict[str, tuple[Any, list[tuple[tuple, np.ndarray]]]] = {}

    def add(self, name: str, arr, index: tuple, values: np.ndarray) -> None:
        """Gather the write ``arr[index] = values`` to the array `name` of the store (`index` covers whole
        shards of `arr`)."""
        self.writes.setdefault(name, (arr, []))[1].append((index, values))

    def store(self, out_path: str, storage_options) -> list[str]:
        """Store every gathered shard in the store at `out_path` (a PUT each, or a local file each);
        returns once all are stored, with the paths it wrote (local files, or the objects' keys), which
        a local writer fsyncs before it marks them done."""
        if not storage.is_remote(out_path):
            paths = []
            for name, (arr, writes) in self.writes.items():
                for key, data in encode_shards(arr, writes).items():
                    path = os.path.join(out_path, name, key)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "wb") as f:
                        f.write(data)
                    paths.append(path)
            return paths
        fs, root = storage.filesystem(out_path, storage_options)
        objects = {f"{root}/{name}/{key}": data for name, (arr, writes) in self.writes.items()
                   for key, data in encode_shards(arr, writes).items()}
        if objects:
            fs.pipe(objects)
        return list(objects)


def read_meta(path: str | Path, storage_options: StorageOptions | None = None) -> dict[str, Any] | None:
    """The ``map2map`` attribute of the group at `path`, or None if it is no map2map store."""
    try:
        group = open_group(path, "r", storage_options, use_consolidated=False)
    except (FileNotFoundError, ValueError, zarr.errors.GroupNotFoundError, json.JSONDecodeError):
        return None
    return group.attrs.get(ATTR)


@dataclass
class Store:
    """An opened, complete store: the group as of its completion mark."""

    path: str
    group: zarr.Group
    meta: dict[str, Any]
    storage_options: StorageOptions | None = None

    @property
    def nsample(self) -> int:
        return int(self.meta["nsample"])

    @property
    def boxsize(self) -> float | None:
        return self.meta.get("boxsize")

    @property
    def field_names(self) -> list[str]:
        return list(self.meta["fields"])

    def field(self, name: str) -> zarr.Array:
        if name not in self.meta["fields"]:
            raise UserError(f"no field {name!r} in store {self.path}: it has {', '.join(self.field_names)}")
        return self.group[name]

    @property
    def style_names(self) -> tuple[str, ...]:
        """Names of the store's style parameters (empty when it has none; `read_styles` reads the values)."""
        return tuple(self.meta.get("styles") or ())

    def sources(self, name: str) -> list[str]:
        return [str(s) for s in self.group[source_name(name)][: self.nsample]]


def open_store(path: str | Path, *, allow_incomplete: bool = False,
               storage_options: StorageOptions | None = None) -> Store:
    """Open a store (a local path or URL) for reading; refuse a missing, foreign or incomplete one, or
    one the storage service refuses, with a one-line error."""
    path = storage.normalise(path)
    storage.check_scheme(path, "store")
    if not storage.exists(path, storage_options):
        raise storage.missing_bucket(path, storage_options) or UserError(f"store {path} does not exist")
    try:
        group = open_group(path, "r", storage_options)
    except Exception as exc:  # zarr and the storage backends raise several types for what they cannot read
        err = storage.user_error(exc, path)
        if isinstance(err, UserError):
            raise err from None
        raise UserError(f"{path} is not a readable Zarr store ({type(exc).__name__}: {exc})") from None
    meta = group.attrs.get(ATTR)
    if meta is None:
        raise UserError(f"{path} is a Zarr group but not a map2map store (no '{ATTR}' attribute)")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"store {path} has format version {meta['format_version']}; "
                        f"this map2map reads up to {FORMAT_VERSION}")
    if not meta.get("complete") and not allow_incomplete:
        raise IncompleteStoreError(f"store {path} is incomplete (no completion mark): "
                                   "its writer was interrupted; run it again")
    return Store(path, group, meta, storage_options)


def remove(path: str | Path, storage_options: StorageOptions | None = None) -> None:
    """Delete a store (only ever called on map2map stores or our own temporaries)."""
    if storage.is_remote(path):
        storage.remove_tree(os.fspath(path), storage_options)
    else:
        shutil.rmtree(storage.local_path(path), ignore_errors=False)


# ------------------------------------------------------------ output paths

PSEUDO_FILE_SYSTEMS = frozenset({  # kernel views, not storage: nothing can be written there
    "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "pstore",
    "bpf", "configfs", "fusectl", "mqueue", "binfmt_misc", "efivarfs", "rpc_pipefs", "nsfs", "autofs"})


def _resolved(path: str | os.PathLike) -> Path:
    """`path` absolute, with every symlink of its existing part resolved (the missing rest kept as given)."""
    return Path(os.path.realpath(os.path.abspath(os.path.expanduser(os.fspath(path)))))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _file_system(path: Path) -> str | None:
    """The type of the file system holding the existing `path` (from the mount table), or None if unknown."""
    best, kind = "", None
    try:
        with open("/proc/self/mounts") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[1])
        if _within(path, Path(point)) and len(point) >= len(best):
            best, kind = point, parts[2]
    return kind


def _enclosing_store(path: Path) -> Path | None:
    """The nearest existing directory above `path` that is a map2map store, or None."""
    for parent in path.parents:
        if (parent / "zarr.json").is_file() and read_meta(parent) is not None:
            return parent
    return None


def _url_parts(url: str) -> tuple[str, tuple[str, ...]]:
    """(scheme, the non-empty ``/``-separated segments after it) of a remote `url`; the first is the bucket."""
    scheme, rest = storage.normalise(url).split("://", 1)
    return scheme, tuple(part for part in rest.split("/") if part)


def _url_within(inner: str, outer: str) -> bool:
    """Whether the remote `inner` is `outer` or lies under its prefix (whole segments, same scheme)."""
    (s_in, parts_in), (s_out, parts_out) = _url_parts(inner), _url_parts(outer)
    return s_in == s_out and parts_in[:len(parts_out)] == parts_out


def _enclosing_remote_store(url: str, storage_options: StorageOptions | None) -> str | None:
    """The nearest prefix above the remote `url` (up to its bucket) that holds a map2map store, or None.

    One existence check of ``<prefix>/zarr.json`` per level (a store's group
    metadata object), and the metadata read only where there is one.
    """
    scheme, parts = _url_parts(url)
    for n in range(len(parts) - 1, 0, -1):
        parent = f"{scheme}://{'/'.join(parts[:n])}"
        fs, key = storage.filesystem(storage.join(parent, "zarr.json"), storage_options)
        try:
            found = fs.exists(key)
        except Exception as exc:  # what the service refuses is said of `url`, the location the user gave
            err = storage.user_error(exc, url)
            if err is exc:
                raise
            raise err from None
        if found and read_meta(parent, storage_options) is not None:
            return parent
    return None


def check_output_path(out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (),
                      option: str = "OUTPUT", storage_options: StorageOptions | None = None) -> None:
    """Refuse an output location that would overwrite or nest with its inputs, or that cannot be created.

    A one-line `UserError` naming `option` when `out`, symlinks resolved,
    equals one of `inputs` (input stores, input files, run directories),
    lies inside one, or contains one (deleting or replacing `out` would take
    the input with it); when it lies inside an existing map2map store (a
    store's writers would take it for their own); or when its parent cannot
    be created: the nearest existing ancestor must be a writable directory
    on a file system that stores files (not ``/proc`` or another kernel
    view).  Whether an existing `out` may be replaced is each writer's
    decision (its ``--overwrite`` rules), not this one's.

    A remote `out` (a URL, `map2map.storage`) is compared with the remote
    inputs of its scheme by whole key segments (a local input can neither
    hold nor lie in it), and the prefixes above it, up to its bucket, are
    looked up with `storage_options` for a store it would lie in.  Nothing
    local applies to it (there is no parent directory to create or check):
    whether the bucket exists and the credentials are accepted shows at its
    writer's first write.
    """
    text = os.fspath(out)
    if not text:
        raise UserError(f"{option} is empty; give a path")
    if storage.is_remote(text):
        _check_remote_output(text, inputs, option, storage_options)
        return
    path = _resolved(storage.local_path(text))
    for item in inputs:
        if storage.is_remote(item):
            continue
        other = _resolved(storage.local_path(item))
        _check_nesting(text, os.fspath(item), path == other, _within(path, other), _within(other, path), option)
    nest = _enclosing_store(path)
    if nest is not None:
        raise UserError(f"{option} {text} is inside the map2map store {nest}; write the output beside it")
    ancestor = path.parent
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{option} {text} cannot be created: {ancestor} is a file, not a directory")
    kind = _file_system(ancestor)
    if kind in PSEUDO_FILE_SYSTEMS:
        raise UserError(f"{option} {text} cannot be created: {ancestor} is on the kernel's {kind} file "
                        "system, which stores no files; choose a directory on a disk")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{option} {text} cannot be created: the directory {ancestor} is not writable")


def _check_nesting(text: str, item: str, same: bool, inside: bool, around: bool, option: str) -> None:
    """Refuse the output `text` that is the input `item`, lies inside it or contains it."""
    if same:
        raise UserError(f"{option} {text} is the input {item}; give another path for the output")
    if inside:
        raise UserError(f"{option} {text} is inside the input {item}; write the output beside it")
    if around:
        raise UserError(f"{option} {text} contains the input {item}; replacing it would "
                        "delete the input: give another path")


def _check_remote_output(text: str, inputs: Iterable[str | os.PathLike], option: str,
                         storage_options: StorageOptions | None) -> None:
    """`check_output_path` for a remote `text`: nesting with remote inputs, and no store above it."""
    url = storage.normalise(text)
    for item in inputs:
        if storage.is_remote(item):
            other = storage.normalise(item)
            _check_nesting(text, os.fspath(item), _url_parts(url) == _url_parts(other), _url_within(url, other),
                           _url_within(other, url), option)
    nest = _enclosing_remote_store(url, storage_options)
    if nest is not None:
        raise UserError(f"{option} {text} is inside the map2map store {nest}; write the output beside it")


def foreign_entries(path: str | os.PathLike, storage_options: StorageOptions | None = None) -> list[str]:
    """Names directly inside the store `path` (a directory, or a remote prefix) that are not the store's own, sorted.

    The store's own are its ``zarr.json``, the arrays of its group, and
    names map2map writers keep there while they work (``.m2m-*``, e.g.
    inference tile markers).  Anything else (a user's file, another store
    nested in it) is foreign, and no ``--overwrite`` may delete it.
    """
    location = os.fspath(path)
    return sorted(name for name in storage.names(location, storage_options)
                  if name != "zarr.json" and not name.startswith(".m2m-")
                  and not _is_array(storage.join(location, name), storage_options))


def _is_array(location: str, storage_options: StorageOptions | None = None) -> bool:
    """Whether `location` is a Zarr array (its ``zarr.json`` says so), read without Zarr's warnings."""
    node_file = storage.join(location, "zarr.json")
    try:
        if storage.is_remote(node_file):
            fs, key = storage.filesystem(node_file, storage_options)
            raw = fs.cat_file(key)
        else:
            raw = Path(storage.local_path(node_file)).read_bytes()
        node = json.loads(raw)
    except (OSError, ValueError):  # missing or unreadable (FileNotFoundError is an OSError), or not JSON
        return False
    return isinstance(node, dict) and node.get("node_type") == "array"


# ------------------------------------------------------- staged replacement

def staged_path(path: str | Path) -> str:
    """Where the replacement of the store at `path` is built: beside it, named ``<path>.m2m-partial``.

    A writer asked to replace a complete store (``--overwrite``) creates and
    completes the new store here, then calls `swap_in`; until then readers of
    `path` see the old store.  Whether a leftover at this path is resumed or
    removed is the writer's choice.
    """
    if storage.is_remote(path):
        text = storage.normalise(path)
        raise UserError(f"--overwrite: {text} is in object storage, which has no rename: a complete store there "
                        f"cannot be replaced without a moment when none is complete; write to a new URL (e.g. "
                        f"{text.removesuffix('.zarr')}-2.zarr) and delete the old one once the new one is complete")
    path = os.path.normpath(os.fspath(path))
    return path + PARTIAL


def swap_in(staged: str | Path, path: str | Path) -> None:
    """Replace the store at `path` by the finished store at `staged` (from `staged_path`).

    The old store is renamed aside (``<path>.m2m-old``), the new one renamed
    to `path`, the old one deleted, and the parent directory fsynced so the
    renames survive a power loss.  At every moment a complete store exists
    under `path` or ``<path>.m2m-old``; if renaming the new one in fails, the
    old one is renamed back.  A leftover ``.m2m-old`` of an earlier
    interrupted swap is deleted first; a missing old store is fine.
    """
    path = os.path.normpath(os.fspath(path))
    staged = os.path.normpath(os.fspath(staged))
    old = path + OLD
    if os.path.lexists(old):
        remove(old)
    if os.path.lexists(path):
        os.replace(path, old)
        try:
            os.replace(staged, path)
        except BaseException:
            os.replace(old, path)  # put the old store back: `path` never ends up empty-handed
            raise
    else:
        os.replace(staged, path)
    durable.fsync_path(os.path.dirname(os.path.abspath(path)))
    if os.path.lexists(old):
        remove(old)


def stored_bytes(path: str | Path, name: str, storage_options: StorageOptions | None = None) -> int:
    """Bytes the field `name` occupies in storage (files on disk, or objects)."""
    return storage.tree_bytes(storage.join(os.fspath(path), name), storage_options)
