"""Writer locks with real processes: a second writer is refused naming the holder, a killed holder's lock is
taken over with a note, and the lock file lives where no swap or deletion of the store can lose it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from map2map import store
from map2map.errors import UserError
from map2map.utils import locks

# A process that takes the lock of argv[1], says "locked" on stdout and holds it until stdin closes
# (or it is killed).  With argv[2] == "race" it instead waits for the file argv[3] to appear, tries
# once, and prints "ok" or the error.
HOLDER = textwrap.dedent("""
    import os, sys, time
    from map2map.errors import UserError
    from map2map.utils.locks import writer_lock
    if len(sys.argv) > 2:
        while not os.path.exists(sys.argv[3]):
            time.sleep(0.001)
        try:
            with writer_lock(sys.argv[1], "racer"):
                time.sleep(0.5)
            print("ok", flush=True)
        except UserError as exc:
            print("refused", exc, flush=True)
        sys.exit(0)
    with writer_lock(sys.argv[1], "holder test") as lock:
        print("locked", lock.note, flush=True)
        sys.stdin.read()
""")


def start_holder(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("locked")
    return proc


def test_second_writer_refused_naming_the_holder(tmp_path):
    path = tmp_path / "a" / "s.zarr"  # neither it nor its parent exists yet
    proc = start_holder(path)
    try:
        with pytest.raises(UserError) as err:
            with locks.writer_lock(path, "m2m convert"):
                pytest.fail("a second writer got the lock")
        message = str(err.value)
        assert "\n" not in message
        assert f"pid {proc.pid}" in message and f"host {socket.gethostname()}" in message
        assert "holder test" in message and "started 20" in message and str(path) in message
    finally:
        proc.stdin.close()
        assert proc.wait(30) == 0
    with locks.writer_lock(path, "m2m convert") as lock:  # released at the holder's exit: free, no note
        assert lock.note is None
    assert not Path(lock.lock_file).exists()  # a clean release leaves no file behind
    assert not path.exists()  # locking never creates the path itself


def test_same_process_is_refused_too(tmp_path):
    with locks.writer_lock(tmp_path / "s", "first") as lock:
        assert lock.holder.pid == os.getpid()
        with pytest.raises(UserError, match=f"first .*pid {os.getpid()}"):
            with locks.writer_lock(tmp_path / "s", "second"):
                pass
    with locks.writer_lock(tmp_path / "s", "third") as lock:
        assert lock.note is None


def test_killed_holder_is_taken_over_with_a_note(tmp_path):
    path = tmp_path / "s.zarr"
    proc = start_holder(path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.stdin.close()
    proc.stdout.close()
    with locks.writer_lock(path, "m2m convert") as lock:
        assert lock.note is not None and "\n" not in lock.note
        assert f"pid {proc.pid}" in lock.note and "holder test" in lock.note and "took over" in lock.note
        assert lock.holder.pid == os.getpid()
    with locks.writer_lock(path, "m2m convert") as lock:  # released properly this time: nothing to take over
        assert lock.note is None


def test_one_of_many_simultaneous_writers_wins(tmp_path):
    path, go = tmp_path / "s.zarr", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(path), "race", str(go)], stdout=subprocess.PIPE,
                              text=True) for _ in range(4)]
    go.touch()
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(o.split()[0] for o in outs) == ["ok", "refused", "refused", "refused"], outs
    winner = procs[[o.split()[0] for o in outs].index("ok")].pid
    assert all(f"pid {winner}" in o for o in outs if o.startswith("refused")), outs


def test_lock_file_beside_the_store_survives_swap_and_removal(tmp_path):
    """The lock file is outside the store: a swap_in or removal of the store under the lock keeps it."""
    path = tmp_path / "s.zarr"
    with locks.writer_lock(path, "test") as lock:
        assert Path(lock.lock_file).parent == tmp_path.resolve() and Path(lock.lock_file).name.startswith(".")
        layout = store.FieldLayout("f", 1, (4, 4, 4), (4, 4, 4), (2, 2, 2))
        for _ in range(2):
            staged = store.staged_path(path)
            store.create(staged, [layout], nsample=0, boxsize=None, settings={})
            store.mark_complete(staged, 0)
            store.swap_in(staged, path)
            assert Path(lock.lock_file).exists()
        store.remove(path)
        assert Path(lock.lock_file).exists()
        with pytest.raises(UserError, match="being written by test"):
            with locks.writer_lock(str(path) + "/", "other"):  # another spelling of the same path
                pass


def test_lock_path_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert locks.lock_path("s.zarr") == locks.lock_path(tmp_path / "s.zarr") == str(tmp_path.resolve()
                                                                                      / ".s.zarr.m2m-lock")
    assert locks.lock_path("run", inside=True) == str(tmp_path.resolve() / "run" / ".m2m-lock")
    with pytest.raises(UserError, match="URL"):
        locks.lock_path("s3://bucket/s.zarr")
    with pytest.raises(UserError, match="root directory"):
        locks.lock_path("/")


def test_inside_lock_in_a_run_directory(tmp_path):
    with locks.writer_lock(tmp_path / "run", "m2m train", inside=True) as lock:
        assert Path(lock.lock_file) == tmp_path.resolve() / "run" / ".m2m-lock"
        with pytest.raises(UserError, match="m2m train"):
            with locks.writer_lock(tmp_path / "run", "m2m train", inside=True):
                pass
    assert sorted(os.listdir(tmp_path / "run")) == []


def test_unwritable_place_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot create its lock file") as err:
        with locks.writer_lock(blocker / "s.zarr", "test"):
            pass
    assert "\n" not in str(err.value)


def test_readers_never_see_the_lock(tmp_path, capsys):
    """xarray and `m2m info` read a store whose writer lock is held exactly as without it."""
    import xarray as xr

    from map2map.cli import main

    path = tmp_path / "s.zarr"
    group = store.create(path, [store.FieldLayout("f", 1, (4, 4), (4, 4), (2, 2))], nsample=1, boxsize=None,
                         settings={})
    group["f"][0] = 1.0
    store.mark_complete(path, 1)
    free = sorted(xr.open_zarr(path).variables)
    assert main(["info", str(path)]) == 0
    info = capsys.readouterr().out
    with locks.writer_lock(path, "m2m convert"):
        assert sorted(xr.open_zarr(path).variables) == free
        assert main(["info", str(path)]) == 0
        assert capsys.readouterr().out == info
        assert store.foreign_entries(path) == []


def test_a_forked_child_keeps_the_lock_of_its_ended_parent(tmp_path):
    """The lock lives as long as any process holds the open lock file: the refusal says the holder ended."""
    script = textwrap.dedent("""
        import os, sys, time
        from map2map.utils.locks import writer_lock
        lock = writer_lock(sys.argv[1], "parent")
        lock.__enter__()
        if os.fork() == 0:  # the child inherits the open lock file and lives on
            sys.stdin.read()
            os._exit(0)
        print("locked", flush=True)
        os._exit(0)  # the parent ends without releasing
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "s")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        proc.wait(30)
        with pytest.raises(UserError, match=f"parent .*pid {proc.pid}.*: that process has ended, but a process it "
                                            "started still holds the lock"):
            with locks.writer_lock(tmp_path / "s", "next"):
                pass
    finally:
        proc.stdin.close()  # the child reads EOF and exits
    for _ in range(500):
        try:
            with locks.writer_lock(tmp_path / "s", "next") as lock:
                assert lock.note is not None and f"pid {proc.pid}" in lock.note
            break
        except UserError:
            time.sleep(0.01)
    else:
        pytest.fail("the lock was not released when the child ended")
