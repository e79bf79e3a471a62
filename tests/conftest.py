"""Shared test settings and fixtures: hypothesis profiles, small fields written as real .npy files in
temporary directories, the `m2m` program in a subprocess, local Dask clusters."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- hypothesis profiles
#
# Every property test runs under one profile, chosen with HYPOTHESIS_PROFILE (or pytest's
# --hypothesis-profile): "fast" (the default) is sized for CI on two shared cores, "thorough" for a
# search before a release or after changing the geometry, "dev" for quick edits.  No deadline: on
# shared cores an example's time measures the load, not the code.  Each profile builds on the one
# hypothesis loaded itself, which on a CI service (detected by hypothesis) is derandomized and keeps
# no example database.  A test sets its own `@settings` only for a special need.
HYPOTHESIS_PROFILES = {"fast": 100, "thorough": 2000, "dev": 10}  # name -> max_examples


def _register_hypothesis_profiles() -> None:
    base = settings.get_profile(settings.get_current_profile_name())
    for name, examples in HYPOTHESIS_PROFILES.items():
        settings.register_profile(name, base, max_examples=examples, deadline=None, print_blob=True)


_register_hypothesis_profiles()  # at import, so that --hypothesis-profile finds them too


def pytest_configure(config) -> None:
    """Load the profile HYPOTHESIS_PROFILE names (default "fast") unless --hypothesis-profile chose one."""
    if config.getoption("--hypothesis-profile", None):
        return
    name = os.environ.get("HYPOTHESIS_PROFILE", "fast")
    if name not in HYPOTHESIS_PROFILES:
        raise pytest.UsageError(f"HYPOTHESIS_PROFILE={name!r} is not a profile; use one of "
                                f"{', '.join(HYPOTHESIS_PROFILES)}")
    settings.load_profile(name)


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


def start_m2m(*args: str) -> subprocess.Popen:
    """Start the `m2m` program as users do, in a subprocess of text pipes, from the repository root."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "map2map.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def wait_for_markers(done: str, at_least: int, proc: subprocess.Popen, storage_options: dict | None = None,
                     timeout: float = 120) -> int:
    """Wait until the `m2m infer` run `proc` has marked at least `at_least` tiles finished in its marker
    directory `done` (a path or URL); returns how many.  Fails if `proc` exits first or after `timeout` s."""
    from map2map import infer

    deadline = time.time() + timeout
    while time.time() < deadline:
        n = len(infer.read_done(done, storage_options))
        if n >= at_least:
            return n
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"fewer than {at_least} tiles marked after {timeout} s")


def fails(capsys, argv: list[str], *needles: str) -> str:
    """Run `m2m ARGV` in this process: exit status 2, and one line on stderr, no traceback, holding every needle."""
    from map2map.cli import main

    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


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
    """A LocalCluster of two worker processes, started as `m2m infer` starts its own."""
    from map2map.infer.cluster import local_cluster as start

    return start(2, 1)


@pytest.fixture(scope="session", autouse=True)
def crash_logs_in_a_temporary_directory(tmp_path_factory):
    """Crash logs of internal errors (`m2m` writes them under $XDG_STATE_HOME) stay out of the user's home,
    also for the `m2m` subprocesses the tests start."""
    old = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))
    yield
    if old is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = old


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module's tests, reached by address as `--scheduler` does."""
    c = local_cluster()
    try:
        yield c.scheduler_address
    finally:
        c.close()


# --------------------------------------------------------------------------- object storage
#
# A real S3-compatible server (moto's server mode, its own process on 127.0.0.1; see tests/s3server.py),
# one per session, and a fresh bucket per test.  The credentials are put in the environment the way a user
# sets them, so that `m2m` subprocesses the test starts inherit them.


@pytest.fixture(scope="session")
def s3_server():
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    from s3server import S3Server

    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    from s3server import CREDENTIALS, make_bucket

    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    return make_bucket(s3_server)
