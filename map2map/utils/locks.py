"""Advisory writer locks: one writer at a time for a store or a run directory.

A *writer lock* on a path is an exclusive, non-blocking ``fcntl.flock`` on
its *lock file*.  The kernel holds the lock for as long as the writer's
open file lives, so a writer that dies (even by SIGKILL) releases it; the
lock file itself records who took it (`Holder`: what, host, pid, start
time) so that a refused writer can name the holder.

Where the lock file lives (`lock_path`):

- beside the path, by default: ``<parent>/.<name>.m2m-lock``.  A store is
  created, deleted and replaced by renames (`map2map.store.swap_in`) under
  its lock, so the lock cannot live inside it; beside it, it exists before
  the store does, survives every swap, and is no file of the store (no
  Zarr or xarray reader ever sees it).
- inside the path (``inside=True``): ``<path>/.m2m-lock``, for a directory
  its writer never deletes or renames, such as a training run directory.

Every writer of one path must use the same place.  A writer releasing its
lock deletes the lock file (before unlocking, and a writer that locks
checks it still holds the file under that name), so a lock file found with
a record but without a lock was left by a writer that died: the next
writer takes it over and says so (`WriterLock.note`).

Locks are for local and network file systems with ``flock``; a URL (an
object store) cannot be locked this way and is refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Iterator

from map2map.errors import UserError

SUFFIX = ".m2m-lock"  # lock file beside a path: ``.<name>`` + SUFFIX; inside a directory: SUFFIX itself
READ_TRIES = 20  # times a refused writer re-reads a lock file whose holder has not yet written its record
READ_PAUSE = 0.025  # seconds between those reads


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a lock: the writer's name (e.g. ``m2m convert``), host, process id, start time."""

    what: str
    host: str
    pid: int
    started: str

    def describe(self) -> str:
        return f"{self.what} (host {self.host}, pid {self.pid}, started {self.started})"

    @classmethod
    def parse(cls, text: str) -> "Holder | None":
        """The record a lock file holds, or None if it holds none (empty or not ours)."""
        try:
            data = json.loads(text)
            return cls(str(data["what"]), str(data["host"]), int(data["pid"]), str(data["started"]))
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class WriterLock:
    """A held writer lock: the locked `path`, its `lock_file`, this writer's record, and `note`.

    `note` is None, or one sentence saying that the lock of a writer that
    died was taken over (callers print it as ``note: ...``).
    """

    path: str
    lock_file: str
    holder: Holder
    note: str | None


def lock_path(path: str | os.PathLike, *, inside: bool = False) -> str:
    """The lock file of `path` (see the module docstring): absolute, with the parent's symlinks resolved."""
    text = os.fspath(path)
    if "://" in text:
        raise UserError(f"{text}: a URL cannot be locked against a second writer; write to a local "
                        "or network file system path")
    full = os.path.abspath(text)
    if inside:
        return os.path.join(os.path.realpath(full), SUFFIX)
    parent, name = os.path.split(full)
    if not name:  # the root directory has no parent to hold a lock beside it
        raise UserError(f"{text}: cannot write to the root directory; give a directory below it")
    return os.path.join(os.path.realpath(parent), f".{name}{SUFFIX}")


def _read_holder(fd: int) -> Holder | None:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return Holder.parse(b"".join(chunks).decode("utf-8", "replace"))


def _same_file(fd: int, name: str) -> bool:
    """Whether the open file `fd` is still the file called `name` (not deleted or replaced meanwhile)."""
    try:
        st = os.stat(name)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _open(lock_file: str, path: str) -> int:
    try:
        os.makedirs(os.path.dirname(lock_file), exist_ok=True)
        return os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise UserError(f"{path}: cannot create its lock file {lock_file} "
                        f"({exc.strerror or type(exc).__name__})") from None


def _ended(holder: Holder) -> bool:
    """Whether the holder's process is known to have ended (it ran on this host and its pid is gone)."""
    if holder.host != socket.gethostname():
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def _refusal(fd: int, path: str, lock_file: str) -> UserError:
    """The one-line error for a second writer, naming the holder once its record is readable."""
    for _ in range(READ_TRIES):
        holder = _read_holder(fd)
        if holder is None:
            time.sleep(READ_PAUSE)
            continue
        if _ended(holder):  # a process it forked keeps the lock file open, and with it the lock
            return UserError(f"{path} is locked by {holder.describe()}: that process has ended, but a process "
                             "it started still holds the lock; stop that one, then run this again")
        return UserError(f"{path} is being written by {holder.describe()}; wait until it ends, or stop it, "
                         "then run this again")
    return UserError(f"{path} is being written by another writer (its lock file {lock_file} names none); "
                     "wait until it ends, then run this again")


def acquire(path: str | os.PathLike, what: str, *, inside: bool = False) -> tuple[WriterLock, int]:
    """Take the writer lock of `path`; returns the lock and the open file that holds it (see `writer_lock`)."""
    path = os.fspath(path)
    lock_file = lock_path(path, inside=inside)
    while True:
        fd = _open(lock_file, path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise UserError(f"{path}: cannot lock {lock_file} ({exc.strerror})") from None
            error = _refusal(fd, path, lock_file)
            os.close(fd)
            raise error from None
        if _same_file(fd, lock_file):
            break
        os.close(fd)  # its holder released it (and deleted it) between our open and our lock: again
    try:
        left = _read_holder(fd)
        me = Holder(what, socket.gethostname(), os.getpid(),
                    datetime.now().astimezone().isoformat(sep=" ", timespec="seconds"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(asdict(me)) + "\n").encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    note = None
    if left is not None:
        note = (f"took over the lock on {path} left by {left.describe()}, which ended without releasing it; "
                "what it wrote is checked as usual")
    return WriterLock(path, lock_file, me, note), fd


def release(lock: WriterLock, fd: int) -> None:
    """Delete the lock file (while still locked) and let the lock go.  A lock file that cannot be deleted (its
    directory became unwritable) is left: the next writer takes a leftover lock file over, so it is harmless,
    and the error that made the directory unwritable is the one to report."""
    try:
        if _same_file(fd, lock.lock_file):
            os.unlink(lock.lock_file)
    except OSError:
        pass  # see the docstring: a leftover, unlocked lock file is taken over by the next writer
    finally:
        os.close(fd)


@contextlib.contextmanager
def writer_lock(path: str | os.PathLike, what: str, *, inside: bool = False) -> Iterator[WriterLock]:
    """Hold the writer lock of `path` for the body: refused with a one-line `UserError` if another writer has it.

    `what` names this writer in the lock file (e.g. ``"m2m convert"``), for
    the message a second writer gets: the holder's name, host, pid and
    start time.  `path` need not exist; the directory holding the lock file
    is created if missing.  ``inside=True`` keeps the lock file inside the
    directory `path` (for directories never deleted or renamed while locked,
    e.g. run directories); by default it lies beside `path` (see the module
    docstring).  A lock left by a writer that died is taken over, and the
    yielded `WriterLock.note` says so.  The lock is not reentrant: the same
    process locking the same path twice is refused like any second writer.
    """
    lock, fd = acquire(path, what, inside=inside)
    try:
        yield lock
    finally:
        release(lock, fd)
