"""What can go wrong, and whose it is: the user's input, the user's code, or map2map.

The command line (`map2map.cli.main`, whose docstring lists every case)
turns each kind into one line on stderr:

* `UserError`: bad input, e.g. an option's value; exit status 2.
* `UserCodeError`, or any exception whose *deciding frame* is in a *user file*
  (see `user_code_error`): the user's own code failed, e.g. a ``--callback-at``
  module, a model's ``__init__`` or a norm; exit status 2, naming the file,
  line and exception.
* the machine out of memory or disk space (`is_resource_error`): exit
  status 1, not called a bug.
* anything else is a bug in map2map; exit status 1, traceback saved to a file.

Stages raise these and let bugs propagate; they never print errors themselves.

Terms:

* a *user file*: a Python source file that belongs neither to this package,
  nor to the standard library, nor to an installed package (site-packages)
  (`is_user_file`).
* the *deciding frame* of a traceback: its innermost frame in a user file or in
  this package; frames of the standard library and of installed packages
  (torch, distributed) are passed over, so an error torch raises inside a
  user's ``forward`` is the user's, while one raised inside map2map code that
  a user's model calls is map2map's.
"""

from __future__ import annotations

import errno
import os
import re
import site
import sysconfig
import traceback
from dataclasses import dataclass
from types import TracebackType


class UserError(Exception):
    """Bad input from the user: a one-line message naming the value and what was expected."""


class UserCodeError(UserError):
    """An exception raised in the user's own code, at `filename`:`lineno` (see the module docstring)."""

    def __init__(self, filename: str, lineno: int | None, exc_type: str, detail: str):
        self.filename, self.lineno, self.exc_type, self.detail = filename, lineno, exc_type, one_line(detail)
        super().__init__(f"error in your code at {self.where}: {exc_type}: {self.detail}")

    def __reduce__(self):  # rebuilt from its parts, e.g. when a Dask worker sends it back
        return type(self), (self.filename, self.lineno, self.exc_type, self.detail)

    @property
    def where(self) -> str:
        return f"{self.filename}:{self.lineno}" if self.lineno else self.filename


def one_line(text: str) -> str:
    """`text` with every run of whitespace, newlines included, turned into one space."""
    return " ".join(str(text).split())


def describe(exc: BaseException) -> str:
    """``Type: message`` of `exc` on one line (only the type when the message is empty)."""
    msg = one_line(str(exc))
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


# --------------------------------------------------------------------------- whose file is it


def _foreign_roots() -> tuple[str, ...]:
    """Directories whose files are not user files: the standard library and installed packages."""
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if paths.get(k)}
    roots.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    roots.add(site.getusersitepackages())
    return tuple(os.path.realpath(r) for r in roots)


def _package_root() -> str:
    return os.path.realpath(os.path.dirname(__file__))


def _inside(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r + os.sep) for r in roots)


@dataclass(frozen=True)
class _Owners:
    """Decides whose a source file is (see the module docstring); built once per question asked."""

    package: str
    foreign: tuple[str, ...]

    @classmethod
    def here(cls) -> _Owners:
        return cls(_package_root(), _foreign_roots())

    def owner(self, filename: str) -> str:
        """"ours", "user" or "other" (standard library, installed packages, frozen or generated code)."""
        if not filename or filename.startswith("<"):
            return "other"
        path = os.path.realpath(filename)
        if _inside(path, (self.package,)):
            return "ours"
        parts = path.split(os.sep)
        if _inside(path, self.foreign) or "site-packages" in parts or "dist-packages" in parts:
            return "other"
        return "user"


def is_user_file(filename: str) -> bool:
    """Whether `filename` is a user file (see the module docstring)."""
    return _Owners.here().owner(filename) == "user"


# --------------------------------------------------------------------------- whose error is it

_TEXT_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+)', re.M)
_TEXT_TRACEBACK = "Original Traceback (most recent call last):"  # torch's DataLoader workers re-raise so


def _frames(tb: TracebackType | None) -> list[tuple[str, int | None]]:
    return [(f.filename, f.lineno) for f in traceback.extract_tb(tb)]


def _deciding(frames: list[tuple[str, int | None]], owners: _Owners) -> tuple[str, str, int | None] | None:
    """(owner, file, line) of the deciding frame (see the module docstring), or None."""
    for filename, lineno in reversed(frames):
        who = owners.owner(filename)
        if who != "other":
            return who, filename, lineno
    return None


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was explicitly raised from (``raise ... from``), the original last."""
    chain: list[BaseException] = []
    while exc is not None and all(exc is not e for e in chain):
        chain.append(exc)
        exc = exc.__cause__
    return chain


def _from_one(exc: BaseException, owners: _Owners) -> UserCodeError | None:
    if isinstance(exc, UserCodeError):
        return exc
    if isinstance(exc, SyntaxError) and exc.filename and owners.owner(exc.filename) == "user":
        return UserCodeError(exc.filename, exc.lineno, type(exc).__name__, exc.msg or "")
    text = str(exc)
    if _TEXT_TRACEBACK in text:  # the traceback of another process, as text: its frames decide
        frames = [(m["file"], int(m["line"])) for m in _TEXT_FRAME.finditer(text.split(_TEXT_TRACEBACK, 1)[1])]
        found = _deciding(frames, owners)
        if found and found[0] == "user":
            last = text.strip().splitlines()[-1]
            kind, _, detail = last.partition(": ")
            return UserCodeError(found[1], found[2], kind if detail else type(exc).__name__, detail or last)
        return None
    found = _deciding(_frames(exc.__traceback__), owners)
    if found and found[0] == "user":
        return UserCodeError(found[1], found[2], type(exc).__name__, text)
    return None


def user_code_error(exc: BaseException) -> UserCodeError | None:
    """`exc` as a `UserCodeError` when the user's code raised it, else None.

    The original exception is looked at first (`exc`'s explicit causes, then
    `exc`): the first whose deciding frame is in a user file names that file
    and line.  A `SyntaxError` in a user file names its own place.  A Dask
    worker's exception comes back with the worker's frames, so it is judged
    the same way; the text traceback torch's DataLoader workers put into the
    message is read for its frames.
    """
    owners = _Owners.here()
    for e in reversed(_causes(exc)):
        found = _from_one(e, owners)
        if found is not None:
            return found
    return None


def is_resource_error(exc: BaseException) -> bool:
    """Whether `exc` says the machine ran out of something (memory, disk space, quota): not a bug."""
    return isinstance(exc, MemoryError) or (
        isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.ENOMEM))

