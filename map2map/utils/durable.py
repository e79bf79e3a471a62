"""Making writes durable: data reaches the disk before the marks that say it is there.

A store's completion mark, an inference tile's marker and a checkpoint link
all claim that other bytes are complete.  After a crash of the process the
page cache still holds those bytes; after a power loss only what was
fsynced survives, and a mark that reached the disk before its data would
leave something looking complete that is not.  So writers fsync the data,
then write the mark.

A *temporary* is a file a writer builds beside its destination, named
``TMP_PREFIX + <destination name> + <unique suffix>``: hidden, in the same
directory (so the final rename never crosses file systems), and
recognisable, so readers skip it and cleaners may remove leftovers of a
killed process (`is_temporary`).  `atomic_path` and `atomic_write` are the
one way files are written whole: a temporary is written, flushed and
fsynced, renamed over the destination, and the directory is fsynced so the
rename itself survives a power loss.  A reader sees the old file or the new
one, never a part.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

TMP_PREFIX = ".m2m-tmp."


def fsync_path(path: str | os.PathLike) -> None:
    """fsync one file or directory (a directory's fsync makes the names in it, e.g. renames, durable)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def fsync_files(paths: Iterable[str | os.PathLike]) -> None:
    for path in paths:
        fsync_path(path)


def fsync_tree(root: str | os.PathLike, skip: Callable[[tuple[str, ...]], bool] | None = None) -> int:
    """fsync every file below `root`, then every directory (deepest first); returns the number of files.

    `skip`, given a file's path below `root` as a tuple of names, says which
    files to leave out (ones their writers already fsynced); every directory
    is still fsynced, so the names of those files are durable too.
    """
    nfiles = 0
    dirs = []
    for dirpath, _, files in os.walk(root):
        dirs.append(dirpath)
        rel = Path(dirpath).relative_to(root).parts
        for f in files:
            if skip is not None and skip(rel + (f,)):
                continue
            fsync_path(Path(dirpath) / f)
            nfiles += 1
    fsync_files(reversed(dirs))
    return nfiles


def is_temporary(name: str) -> bool:
    """Whether the file name `name` (no directory) is a temporary of `atomic_path`."""
    return name.startswith(TMP_PREFIX)


def temporary_name(path: str | os.PathLike) -> Path:
    """A fresh temporary beside `path`: hidden, unique to this process and call (see the module doc)."""
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{secrets.token_hex(4)}")


def _fsync_file(path: Path) -> None:
    """fsync a regular file's data; unlike `fsync_path` an error here is raised (the data may be lost)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content into; on success it becomes `path`, durably.

    The temporary is created empty beside `path` with mode 0o666 less the
    umask (as `open` creates files), so the result's permissions follow the
    umask.  The body may write it any way (a file object, a memory map).
    When the body returns, the temporary is fsynced, renamed over `path`,
    and the directory fsynced.  If anything fails, the temporary is removed
    and `path` keeps its old content.
    """
    path = Path(path)
    tmp = temporary_name(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], object]) -> Path:
    """Replace the file `path` by `data`, atomically and durably (see `atomic_path`); returns `path`.

    `data` is the whole content (``str`` is written as UTF-8), or a callable
    that writes it into the binary file object it is given, e.g.
    ``lambda f: numpy.save(f, array)``.
    """
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
    return path
