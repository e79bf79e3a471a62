"""Helpers shared by the benchmarks: random input files and the peak RSS of a whole process tree."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil


def write_random_npy(path, channels: int, n: int, seed: int = 0) -> None:
    """A (channels, n, n, n) float32 .npy of normal noise, written slab by slab (never whole in memory)."""
    rng = np.random.default_rng(seed)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(channels, n, n, n))
    for c in range(channels):
        for x0 in range(0, n, 64):
            arr[c, x0:x0 + 64] = rng.standard_normal((min(64, n - x0), n, n), dtype=np.float32)
    arr.flush()
    del arr


def tree_rss(proc: psutil.Process) -> int:
    """Resident bytes of a process and all its descendants (shared pages counted per process)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_tracking_rss(cmd: list[str], interval: float = 0.05) -> int:
    """Run `cmd` to completion (raising on failure) and return the peak RSS of its process tree."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps))
        time.sleep(interval)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return peak


def drop_page_cache(root: str | Path) -> None:
    """Ask the kernel to drop the cached pages of every file under `root` (no privilege needed).

    posix_fadvise(DONTNEED) evicts clean pages, so the next read of these
    files comes from disk: a cold start, as on a node that has not read
    the data yet.
    """
    for path in [Path(root)] if Path(root).is_file() else Path(root).rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def store_files(root: str | Path) -> list[Path]:
    """Every file under `root`, sorted by path."""
    return sorted(p for p in Path(root).rglob("*") if p.is_file())


def sequential_read_rate(root: str | Path, block: int = 16 * 2**20) -> float:
    """The disk's sequential cold read rate over the files under `root`, in bytes per second.

    Drops the files from the page cache, reads each front to back with reads
    of `block` bytes into one buffer, and drops them again, so that what is
    measured next starts cold too.
    """
    drop_page_cache(root)
    buf = memoryview(bytearray(block))
    total = 0
    t0 = time.perf_counter()
    for path in store_files(root):
        fd = os.open(path, os.O_RDONLY)
        try:
            while (n := os.readv(fd, [buf])) > 0:
                total += n
        finally:
            os.close(fd)
    rate = total / (time.perf_counter() - t0)
    drop_page_cache(root)
    return rate
