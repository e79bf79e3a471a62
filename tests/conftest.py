"""Shared fixtures: small fields written as real .npy files in temporary directories."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def save_fields(directory: Path, name: str, shape: tuple[int, ...], n: int, seed: int = 0,
                dtype: str = "float32", order: str = "C") -> list[np.ndarray]:
    """Write `n` random fields `directory/{name}_{i}.npy` and return the arrays written."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = []
    for i in range(n):
        a = rng.standard_normal(shape).astype(dtype)
        if order == "F":
            a = np.asfortranarray(a)
        np.save(directory / f"{name}_{i:02d}.npy", a)
        arrays.append(a)
    return arrays


def run_m2m(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the `m2m` program as users do, in a subprocess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "map2map.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny models: one torch thread is fast, deterministic and leaves the shared cores alone; restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def m2m():
    return run_m2m


def local_cluster():
    """A LocalCluster of two worker processes, as `m2m infer` starts by default."""
    import logging

    from distributed import LocalCluster

    return LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                        silence_logs=logging.ERROR)


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module's tests, reached by address as `--scheduler` does."""
    c = local_cluster()
    try:
        yield c.scheduler_address
    finally:
        c.close()
