"""Where stores live: local paths, and fsspec URLs for object storage.

Terms.  A *location* is what a user gives for a store: a local path
(``train.zarr``, ``/scratch/run/train.zarr``) or a *URL*, ``scheme://rest``
(``s3://bucket/train.zarr``, ``gs://...``, ``memory://...``).  A ``file://``
URL is a local path written as a URL and is treated as that path.  A
*remote* location is a URL of any other scheme; it is read and written
through fsspec with the *storage options* the user gave
(``--storage-options JSON``: keyword arguments of the fsspec filesystem,
e.g. ``{"endpoint_url": "http://127.0.0.1:9000"}``; credentials come from
the environment as fsspec's backends read them).

Local locations keep the local machinery untouched: zarr's ``LocalStore``,
the memory-mapped shard decoder, fsync, rename, file locks.  Remote ones
differ in three ways, which the stages respect:

* *Durability.*  An object whose PUT returned is stored; there is no fsync.
* *No rename.*  A store cannot be built beside another and swapped in, so a
  complete remote store is never replaced (`map2map.store` refuses with one
  line and names the fix: write to a new URL).
* *Objects, not directories.*  A "directory" is a key prefix; an empty one
  does not exist.

Every function here is a thin, stateless wrapper over fsspec: the filesystem
objects are fsspec's own (it caches instances per process and per options).
Errors fsspec raises for a missing bucket or refused credentials become one
line (`user_error`).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

from map2map.errors import UserError

StorageOptions = Mapping[str, Any]

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)
LOCAL_SCHEMES = frozenset({"file", "local"})


def scheme(location: str | os.PathLike) -> str | None:
    """The URL scheme of `location` in lower case, or None for a plain path."""
    match = _URL.match(os.fspath(location))
    return match.group(1).lower() if match else None


def is_remote(location: str | os.PathLike) -> bool:
    """True for a URL whose scheme is not a local one (``file://`` is local)."""
    s = scheme(location)
    return s is not None and s not in LOCAL_SCHEMES


def local_path(location: str | os.PathLike) -> str:
    """The local path of a local `location` (a ``file://`` URL loses its scheme); remote ones are refused."""
    text = os.fspath(location)
    if is_remote(text):
        raise ValueError(f"{text} is not a local path")
    match = _URL.match(text)
    return match.group(2) if match else text


def normalise(location: str | os.PathLike) -> str:
    """A location as the stages keep it: a remote URL without trailing slashes, a local one as its path."""
    text = os.fspath(location)
    if is_remote(text):
        s, rest = _URL.match(text).groups()
        return f"{s.lower()}://{rest.rstrip('/')}"
    return local_path(text)


def parse_options(text: str | None, option: str = "--storage-options") -> dict[str, Any]:
    """The storage options given as JSON text (an object), {} for None; a `UserError` for anything else."""
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{option}: {text!r} is not JSON ({exc.msg} at character {exc.pos}); "
                        'give an object such as \'{"endpoint_url": "http://127.0.0.1:9000"}\'') from None
    if not isinstance(value, dict):
        raise UserError(f"{option}: {text!r} is JSON but not an object; give keyword arguments of the "
                        'storage backend as an object such as \'{"anon": true}\'')
    return value


def check_scheme(location: str | os.PathLike, option: str) -> None:
    """Refuse (a `UserError` naming `option`) a URL whose scheme fsspec does not know or cannot load."""
    text = os.fspath(location)
    s = scheme(text)
    if s is None or s in LOCAL_SCHEMES:
        return
    import fsspec

    try:
        fsspec.get_filesystem_class(s)
    except ValueError:
        raise UserError(f"{option} {text}: unknown URL scheme {s}://; give a local path or a URL such as "
                        "s3://bucket/name.zarr, gs://..., file://... or memory://...") from None
    except ImportError as exc:
        raise UserError(f"{option} {text}: {s}:// needs a package that is not installed ({exc}); "
                        "install it, e.g. pip install s3fs for s3://") from None


def filesystem(location: str, options: StorageOptions | None = None):
    """(fsspec filesystem, path within it) of a remote `location`."""
    from fsspec.core import url_to_fs

    return url_to_fs(normalise(location), **dict(options or {}))


def join(location: str, *names: str) -> str:
    """`location` with `names` appended (``/`` for URLs, the OS separator for paths)."""
    if is_remote(location):
        return "/".join([normalise(location), *names])
    return os.path.join(local_path(location), *names)


def zarr_kwargs(location: str, options: StorageOptions | None = None) -> dict[str, Any]:
    """Keyword arguments that make ``zarr.open_group`` open `location`: ``store=`` and, for a URL,
    ``storage_options=`` (zarr refuses storage options with a local path)."""
    if is_remote(location):
        return {"store": normalise(location), "storage_options": dict(options or {})}
    return {"store": local_path(location)}


def exists(location: str, options: StorageOptions | None = None) -> bool:
    """Whether anything is stored at `location` (a file, a directory, or objects under the prefix)."""
    if not is_remote(location):
        return os.path.lexists(local_path(location))
    fs, path = filesystem(location, options)
    try:
        return bool(fs.exists(path))
    except Exception as exc:  # fsspec backends raise their own types; translated, or re-raised unchanged
        raise user_error(exc, location) from exc


def names(location: str, options: StorageOptions | None = None) -> list[str]:
    """The names directly under `location` (objects and prefixes), sorted; [] where nothing is."""
    if not is_remote(location):
        path = local_path(location)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, path = filesystem(location, options)
    try:
        entries = fs.ls(path, detail=False, refresh=True)
    except FileNotFoundError:
        return []
    return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries} - {""})


BUCKET_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss"})


def missing_bucket(location: str, options: StorageOptions | None = None) -> UserError | None:
    """The one-line error for a URL whose bucket does not exist, or None (a bucket exists, or the scheme
    has no buckets)."""
    if scheme(location) not in BUCKET_SCHEMES:
        return None
    bucket = normalise(location).split("://", 1)[1].split("/", 1)[0]
    fs, _ = filesystem(location, options)
    try:
        there = fs.exists(bucket)
    except Exception as exc:  # fsspec backends raise their own types; translated, or re-raised unchanged
        raise user_error(exc, location) from exc
    return None if there else UserError(f"{location}: bucket {bucket} does not exist; create it or give "
                                        "another URL")


def put_bytes(location: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Store `data` as the one object `location` (remote only: local files go through `map2map.utils.durable`)."""
    fs, path = filesystem(location, options)
    fs.pipe_file(path, data)


def remove_tree(location: str, options: StorageOptions | None = None) -> None:
    """Delete everything under a remote `location` (local trees go through `map2map.store.remove`)."""
    fs, path = filesystem(location, options)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
    fs.invalidate_cache(path)


def tree_bytes(location: str, options: StorageOptions | None = None) -> int:
    """Bytes stored under `location` (every object or file below it)."""
    if not is_remote(location):
        total = 0
        for root, _, files in os.walk(local_path(location)):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        return total
    fs, path = filesystem(location, options)
    return int(sum(fs.du(path, total=False).values())) if fs.exists(path) else 0


def user_error(exc: BaseException, location: str) -> BaseException:
    """The one-line `UserError` for what object storage refused at `location`, or `exc` itself if it is
    nothing the user can fix (a bug or an outage is not made to look like bad input)."""
    text = f"{type(exc).__name__}: {exc}"
    bucket = normalise(location).split("://", 1)[-1].split("/", 1)[0]
    low = text.lower()
    if "nosuchbucket" in low or "bucket does not exist" in low:
        return UserError(f"{location}: bucket {bucket} does not exist; create it or give another URL")
    if isinstance(exc, PermissionError) or any(word in low for word in (
            "invalidaccesskeyid", "signaturedoesnotmatch", "accessdenied", "access denied", "forbidden",
            "unable to locate credentials", "nocredentials", "expiredtoken", "invalidtoken")):
        return UserError(f"{location}: the storage service refused the credentials ({_first_line(text)}); "
                         "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or the backend's own) and --storage-options")
    if isinstance(exc, (ConnectionError, TimeoutError)) or "could not connect" in low or "connect timeout" in low:
        return UserError(f"{location}: cannot reach the storage service ({_first_line(text)}); "
                         "check endpoint_url in --storage-options and the network")
    return exc


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:200] if text.strip() else text
