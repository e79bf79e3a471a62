"""Reading .npy files in bounded pieces, through memory maps, never whole.

`glob_paired` expands the glob patterns of several fields into paired file
lists; `inspect` parses and checks a header (and that the file holds all the
bytes it promises); `read_block` copies one rectangular region of the array into a
native float32 (or float64) buffer by mapping one storage plane at a time and
unmapping it right after, so the resident memory of a conversion does not
grow with the file.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from map2map.errors import UserError


def glob_paired(patterns: Sequence[str], what: str) -> list[list[str]]:
    """The files of each glob pattern, sorted by path: file i of every pattern forms sample i.

    Each pattern is expanded with ``~`` as the home directory; the result
    holds absolute paths, one list per pattern, all of one length.  This is
    the original toolkit's pairing of glob matches.  `what` names the
    patterns in errors (e.g. ``--field``): a `UserError` for a pattern that
    matches no file, or for patterns that match different numbers of files.
    """
    out = []
    for pattern in patterns:
        paths = sorted(glob.glob(os.path.expanduser(pattern)))
        if not paths:
            raise UserError(f"{what} pattern {pattern!r} matches no files")
        out.append([os.path.abspath(p) for p in paths])
    counts = [len(paths) for paths in out]
    if len(set(counts)) > 1:
        raise UserError(f"{what} patterns match different numbers of files: "
                        + ", ".join(f"{p!r}: {n}" for p, n in zip(patterns, counts)))
    return out


@dataclass(frozen=True)
class NpyHeader:
    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    offset: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def inspect(path: str | Path) -> NpyHeader:
    """Parse the header of `path`; refuse corrupt, truncated or non-real-numeric files."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f, max_header_size=100000)
            offset = f.tell()
    except (ValueError, OSError, SyntaxError, EOFError) as exc:
        raise UserError(f"{path} is not a readable .npy file ({exc})") from None
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "fiu":
        raise UserError(f"{path} has dtype {dtype}: expected real numbers (float or int)")
    header = NpyHeader(path, tuple(int(s) for s in shape), dtype, bool(fortran), offset)
    size = os.path.getsize(path)
    if size < offset + header.nbytes:
        raise UserError(f"{path} is truncated: {size} bytes, but its header promises {offset + header.nbytes}")
    return header


def _storage(header: NpyHeader) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The C-order shape the bytes are laid out in, and the permutation from it back to array axes."""
    ndim = len(header.shape)
    if header.fortran_order:
        return header.shape[::-1], tuple(reversed(range(ndim)))
    return header.shape, tuple(range(ndim))


def read_block(header: NpyHeader, region: tuple[slice, ...], out: np.ndarray) -> None:
    """Copy ``array[region]`` into `out` (any dtype; converted on the way).

    Maps one slab of the slowest storage axis at a time (a channel for C-order
    files, a z-plane for Fortran-order ones) and unmaps it as soon as it is
    copied, so only the pages of the current slab count as resident.
    """
    region = tuple(slice(*s.indices(n)[:2]) for s, n in zip(region, header.shape))
    storage_shape, axes = _storage(header)
    sregion = tuple(region[a] for a in axes)
    slab_shape = storage_shape[1:]
    slab_bytes = int(np.prod(slab_shape)) * header.dtype.itemsize
    out_s = out.transpose(axes)
    for i in range(sregion[0].start, sregion[0].stop):
        slab = np.memmap(header.path, dtype=header.dtype, mode="r", offset=header.offset + i * slab_bytes,
                         shape=slab_shape)
        out_s[i - sregion[0].start] = slab[sregion[1:]]
        del slab  # unmaps: the slab's pages stop counting as ours
