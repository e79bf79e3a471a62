"""Making writes durable: data reaches the disk before the marks that say it is there.

A store's completion mark, an inference tile's marker and a checkpoint link
all claim that other bytes are complete.  After a crash of the process the
page cache still holds those bytes; after a power loss only what was
fsynced survives, and a mark that reached the disk before its data would
leave something looking complete that is not.  So writers fsync the data,
then write the mark.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable


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


def fsync_tree(root: str | os.PathLike) -> int:
    """fsync every file below `root`, then every directory (deepest first); returns the number of files."""
    nfiles = 0
    dirs = []
    for dirpath, _, files in os.walk(root):
        dirs.append(dirpath)
        for f in files:
            fsync_path(Path(dirpath) / f)
            nfiles += 1
    fsync_files(reversed(dirs))
    return nfiles
