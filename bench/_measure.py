"""Measuring helpers shared by the benchmarks: peak RSS of a whole process tree."""

from __future__ import annotations

import subprocess
import time

import psutil


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
