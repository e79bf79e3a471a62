"""The one error handler of `m2m` (map2map.cli.main): every failure is one line on stderr with the right exit
status, whoever caused it (bad input, the user's code, a bug, Ctrl-C, a closed pipe, an unusable Dask
scheduler), and nothing is written.

Handler cases run in-process (`main([...])` with capsys); what happens at interpreter exit (a closed
stdout, a Dask client's finalizer) runs the real program in a subprocess and looks at its whole stderr.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import map2map
from map2map import info, store
from map2map.cli import crash_log_dir, main
from map2map.errors import UserCodeError, UserError, is_user_file, user_code_error
from map2map.models import VNet
from map2map.utils.imports import check_call, import_attr

from conftest import ROOT
from test_infer import make_store, save_ckpt
from test_infer_errors import infer_args

PACKAGE = os.path.dirname(map2map.__file__)


# --------------------------------------------------------------------------- helpers


def raiser(filename: str, exc: BaseException):
    """A function that raises `exc` from a frame whose code says it lives in `filename` (no file is
    written: a frame in map2map's package without touching it, or one in a user's file)."""
    scope: dict = {}
    exec(compile("def boom(*args, **kwargs):\n    raise exc\n", filename, "exec"), {"exc": exc}, scope)
    return scope["boom"]


def ours(exc: BaseException):
    """Raises `exc` from a frame in map2map's package: a bug."""
    return raiser(os.path.join(PACKAGE, "_pretend.py"), exc)


def one_line(capsys, status: int, expected_status: int) -> str:
    err = capsys.readouterr().err
    assert status == expected_status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def m2m(*args: str, env: dict | None = None, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """The real program in a subprocess, as users run it."""
    streams = kwargs if "stdout" in kwargs else {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    return subprocess.run([sys.executable, "-m", "map2map.cli", *args], text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})), timeout=timeout, **streams)


def whole_stderr_is(r: subprocess.CompletedProcess, status: int, *needles: str) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == status and len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(autouse=True)
def state_home(tmp_path, monkeypatch):
    """Crash logs go to this test's own directory, never to the user's home."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("M2M_DEBUG", raising=False)
    return tmp_path / "state"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 16, 16, 16)).astype(np.float32)
    data = make_store(root, "in", {"disp": x}, crop=8)
    torch.manual_seed(0)
    ckpt = save_ckpt(VNet(3, 3, width=4), root / "vnet.pt")
    return root, data, ckpt


def user_module(directory: Path, name: str, source: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.py"
    path.write_text(source)
    return path


# --------------------------------------------------------------------------- bad input, bugs, Ctrl-C


def test_user_error_and_argparse_error_are_one_line_exit_2(capsys, tmp_path):
    line = one_line(capsys, main(["info", str(tmp_path / "nothing")]), 2)
    assert line == f"m2m info: error: store {tmp_path / 'nothing'} does not exist"
    with pytest.raises(SystemExit) as exit_:
        main(["info"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("m2m info: error: ") and "required" in err[0]


def test_bug_is_one_line_with_the_traceback_in_a_new_log_file(capsys, monkeypatch, tmp_path, state_home):
    monkeypatch.setattr(info, "run", ours(KeyError("fields")))
    line = one_line(capsys, main(["info", str(tmp_path)]), 1)
    prefix = "m2m info: internal error (a bug in map2map): KeyError: 'fields'; traceback in "
    assert line.startswith(prefix), line
    log = Path(line[len(prefix):])
    assert log.parent == Path(crash_log_dir()) == state_home / "map2map"
    text = log.read_text()
    assert text.startswith(f"m2m info {tmp_path}\n")
    assert "Traceback (most recent call last)" in text and "_pretend.py" in text and "KeyError: 'fields'" in text
    # a second bug gets a file of its own
    line2 = one_line(capsys, main(["info", str(tmp_path)]), 1)
    assert Path(line2[len(prefix):]) != log and len(list(log.parent.iterdir())) == 2


def test_bug_log_falls_back_to_the_temporary_directory(capsys, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("XDG_STATE_HOME", str(blocker))  # its map2map/ cannot be created
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(info, "run", ours(ZeroDivisionError("division by zero")))
    line = one_line(capsys, main(["info", "x"]), 1)
    assert "ZeroDivisionError: division by zero; traceback in " + str(tmp_path / "tmp" / "map2map-crash-") in line


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback_instead_of_writing_it(capsys, monkeypatch, tmp_path, state_home, how):
    monkeypatch.setattr(info, "run", ours(IndexError("list index out of range")))
    if how == "env":
        monkeypatch.setenv("M2M_DEBUG", "1")
    status = main(["--debug", "info", "x"] if how == "flag" else ["info", "x"])
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("Traceback (most recent call last)") and "_pretend.py" in err
    assert err.strip().splitlines()[-1] == ("m2m info: internal error (a bug in map2map): IndexError: list index "
                                             "out of range; traceback above")
    assert not state_home.exists()


def test_debug_also_shows_where_a_user_error_came_from(capsys, tmp_path):
    status = main(["--debug", "info", str(tmp_path / "nothing")])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback (most recent call last)" in err and "UserError" in err
    assert err.strip().splitlines()[-1] == f"m2m info: error: store {tmp_path / 'nothing'} does not exist"


def test_keyboard_interrupt_is_one_line_exit_130(capsys, monkeypatch, state_home):
    monkeypatch.setattr(info, "run", ours(KeyboardInterrupt()))
    assert one_line(capsys, main(["info", "x"]), 130) == "m2m info: interrupted"
    assert not state_home.exists()


def test_running_out_of_memory_or_disk_is_not_called_a_bug(capsys, monkeypatch, state_home):
    monkeypatch.setattr(info, "run", ours(MemoryError("Unable to allocate 8.00 TiB")))
    line = one_line(capsys, main(["info", "x"]), 1)
    assert line == "m2m info: error: out of memory: MemoryError: Unable to allocate 8.00 TiB"
    monkeypatch.setattr(info, "run", ours(OSError(28, "No space left on device", "/data/x.zarr")))
    line = one_line(capsys, main(["info", "x"]), 1)
    assert line.startswith("m2m info: error: out of disk space or quota: OSError: [Errno 28] No space left")
    assert not state_home.exists()


def test_multi_line_messages_become_one_line(capsys, monkeypatch):
    monkeypatch.setattr(info, "run", ours(UserError("first\n  second")))
    assert one_line(capsys, main(["info", "x"]), 2) == "m2m info: error: first second"


# --------------------------------------------------------------------------- the user's code


def test_whose_file_is_it(tmp_path):
    assert is_user_file(str(tmp_path / "mine.py")) and is_user_file(__file__)
    assert not is_user_file(os.path.join(PACKAGE, "cli", "__init__.py"))
    assert not is_user_file(json.__file__)  # standard library
    assert not is_user_file(torch.__file__)  # installed package
    assert not is_user_file("<frozen importlib._bootstrap>") and not is_user_file("<string>")


def test_the_innermost_frame_of_the_user_or_of_map2map_decides(tmp_path):
    user_file = str(tmp_path / "model.py")
    try:
        raiser(user_file, ValueError("bad width"))()
    except ValueError as exc:
        found = user_code_error(exc)
    assert (found.filename, found.lineno, found.exc_type, found.detail) == (user_file, 2, "ValueError", "bad width")
    try:  # map2map code called by the user's code: map2map's frame is innermost, so it is a bug
        def users_forward():
            ours(KeyError("k"))()
        users_forward()
    except KeyError as exc:
        assert user_code_error(exc) is None
    try:  # a user's error re-raised by map2map (`raise ... from`): the original decides
        try:
            raiser(user_file, TypeError("wrong"))()
        except TypeError as cause:
            raise RuntimeError("tile task failed") from cause
    except RuntimeError as exc:
        assert user_code_error(exc).where == f"{user_file}:2"


def test_a_traceback_passed_as_text_is_read_for_its_frames(tmp_path):
    """torch's DataLoader workers re-raise a worker's exception with the worker's traceback as text."""
    text = ("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            f'  File "{PACKAGE}/data/fieldio.py", line 113, in read\n    apply_norm(norm, part)\n'
            f'  File "{tmp_path}/norms.py", line 7, in mynorm\n    raise ValueError("negative z")\n'
            "ValueError: negative z\n")
    found = user_code_error(ValueError(text))
    assert (found.where, found.exc_type, found.detail) == (f"{tmp_path}/norms.py:7", "ValueError", "negative z")


def test_callback_module_with_a_syntax_error(setup, capsys, tmp_path):
    root, data, ckpt = setup
    cb = tmp_path / "cb"
    path = user_module(cb, "net", "import torch\n\nclass Net(torch.nn.Module)\n    pass\n")
    out = tmp_path / "o.zarr"
    argv = infer_args(data, ckpt, out, "--callback-at", str(cb))
    argv[argv.index("VNet")] = "net.Net"
    line = one_line(capsys, main(argv), 2)
    assert line.startswith(f"m2m infer: error in your code at {path}:3: SyntaxError: "), line
    assert not out.exists()
    # fixed, the module is imported afresh (the broken one was not kept)
    with pytest.raises(UserCodeError):
        import_attr("net.Net", [], cb)
    path.write_text("import torch\n\nclass Net(torch.nn.Module):\n    pass\n")
    assert import_attr("net.Net", [], cb).__name__ == "Net"


def test_user_code_error_survives_the_trip_back_from_a_worker():
    err = pickle.loads(pickle.dumps(UserCodeError("/home/u/net.py", 12, "KeyError", "'w'")))
    assert (str(err), err.where) == ("error in your code at /home/u/net.py:12: KeyError: 'w'", "/home/u/net.py:12")


def test_callback_module_that_fails_to_import(capsys, tmp_path):
    cb = tmp_path / "cb"
    path = user_module(cb, "norms", "import math\nimport no_such_package_here\n")
    with pytest.raises(UserCodeError) as err:
        import_attr("norms.dis", ["map2map.data.norms"], cb, what="norm")
    assert str(err.value) == (f"error in your code at {path}:2: ModuleNotFoundError: No module named "
                              "'no_such_package_here'")
    other = user_module(cb, "models", "import torch\n\nWIDTH = undefined_name\n")
    with pytest.raises(NameError) as err:  # any other failure at import: the handler finds the user's line
        import_attr("models.Net", ["map2map.models"], cb, what="model")
    assert user_code_error(err.value).where == f"{other}:3"


def test_model_whose_init_raises(setup, capsys, tmp_path):
    root, data, ckpt = setup
    cb = tmp_path / "cb"
    path = user_module(cb, "net", "import torch\n\nclass Net(torch.nn.Module):\n"
                                  "    def __init__(self, in_chan, out_chan, **kwargs):\n"
                                  "        super().__init__()\n"
                                  "        raise LookupError('no such layer table')\n")
    out = tmp_path / "o.zarr"
    argv = infer_args(data, ckpt, out, "--callback-at", str(cb))
    argv[argv.index("VNet")] = "net.Net"
    line = one_line(capsys, main(argv), 2)
    assert line.startswith("m2m infer: ") and f"{path.name}:6" in line and "no such layer table" in line, line
    assert not out.exists()


def test_norm_with_the_wrong_signature_is_refused_where_it_is_defined(tmp_path):
    cb = tmp_path / "cb"
    path = user_module(cb, "usr", "def ok(x, undo=False, **kwargs):\n    return x\n\n\ndef bad(x):\n    return x\n")
    check_call(import_attr("usr.ok", [], cb), "usr.ok", "norm", None, undo=False)
    with pytest.raises(UserCodeError) as err:
        check_call(import_attr("usr.bad", [], cb), "usr.bad", "norm", None, undo=False)
    assert err.value.where == f"{path}:5"
    assert "norm usr.bad(x) cannot be called as usr.bad(x, undo=...)" in str(err.value)
    assert "unexpected keyword argument 'undo'" in str(err.value)


def test_norm_with_the_wrong_signature_through_the_cli(setup, capsys, tmp_path):
    root, data, ckpt = setup
    cb = tmp_path / "cb"
    path = user_module(cb, "usr", "def bad(x):\n    return x\n")
    out = tmp_path / "o.zarr"
    line = one_line(capsys, main(infer_args(data, ckpt, out, "--callback-at", str(cb), "--in-norms", "usr.bad",
                                            "--workers", "1")), 2)
    assert line.startswith(f"m2m infer: error in your code at {path}:1: TypeError: "), line
    assert not out.exists()


def test_user_norm_failing_inside_a_dask_worker(setup, tmp_path):
    """The worker's exception comes back with the worker's frames: the user's file and line are named,
    in one line, with no worker log on stderr."""
    root, data, ckpt = setup
    cb = tmp_path / "cb"
    path = user_module(cb, "usr", "def norm(x, undo=False, **kwargs):\n"
                                  "    raise ValueError(f'cannot normalise {x.shape}')\n")
    out = tmp_path / "o.zarr"
    r = m2m(*infer_args(data, ckpt, out, "--callback-at", str(cb), "--in-norms", "usr.norm", "--workers", "1",
                        "--device", "cpu"))
    line = whole_stderr_is(r, 2, f"m2m infer: error in your code at {path}:2: ValueError: cannot normalise (3, ")
    assert "bug" not in line and r.stdout == ""
    assert not out.exists() or not store.open_store(out, allow_incomplete=True).meta.get("complete")


# --------------------------------------------------------------------------- interpreter exit


def test_closed_stdout_is_quiet_exit_141(setup):
    """`m2m info STORE | head -1` with the reader gone before anything is written: no traceback, and no
    "Exception ignored" from Python's flush at exit."""
    root, data, _ = setup
    read, write = os.pipe()
    os.close(read)
    try:
        r = m2m("info", data, stdout=write, stderr=subprocess.PIPE)
    finally:
        os.close(write)
    assert (r.returncode, r.stderr) == (141, "")


SLOW_MODEL = """import multiprocessing
import time

import torch


class Slow(torch.nn.Module):
    def __init__(self, in_chan, out_chan, **kwargs):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        if multiprocessing.current_process().name != "MainProcess":  # in a Dask worker: still busy at Ctrl-C
            time.sleep(60)
        return x
"""


def test_ctrl_c_in_a_terminal_during_inference(setup, tmp_path):
    """Ctrl-C reaches the whole process group, the local cluster's workers included: one line, exit 130,
    no worker's traceback, and the output is left to resume (not marked complete)."""
    root, data, _ = setup
    cb = tmp_path / "cb"
    user_module(cb, "slow", SLOW_MODEL)
    ckpt = tmp_path / "slow.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, ckpt)
    out = tmp_path / "o.zarr"
    err_path = tmp_path / "stderr.txt"
    argv = [a for a in infer_args(data, str(ckpt), out, "--workers", "2", "--device", "cpu", "--callback-at",
                                  str(cb)) if a != "--no-progress"]
    argv[argv.index("VNet")] = "slow.Slow"
    with open(err_path, "w") as err:
        # as from a terminal: SIGINT at its default even when this test runs in a background job (which
        # ignores it, and Python then keeps ignoring it)
        p = subprocess.Popen([sys.executable, "-m", "map2map.cli", *argv], stdout=subprocess.PIPE, stderr=err,
                             text=True, cwd=ROOT, start_new_session=True,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"),
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 240
            while "infer:" not in err_path.read_text() and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)  # the bar is drawn once the workers hold the model
            os.killpg(p.pid, signal.SIGINT)
            p.communicate(timeout=120)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    text = err_path.read_text()
    lines = [f for f in text.replace("\r", "\n").splitlines() if f.strip() and not f.startswith("infer: ")]
    assert (p.returncode, lines) == (130, ["m2m infer: interrupted"]), text
    assert not out.exists() or not store.open_store(out, allow_incomplete=True).meta.get("complete")


# --------------------------------------------------------------------------- Dask schedulers that are not there


def test_scheduler_that_is_not_an_address(setup, tmp_path):
    root, data, ckpt = setup
    out = tmp_path / "o.zarr"
    whole_stderr_is(m2m(*infer_args(data, ckpt, out, "--scheduler", "notanaddress")), 2,
                    "m2m infer: error: --scheduler 'notanaddress' is not a Dask address", "tcp://host:8786")
    assert not out.exists()


def test_unreachable_scheduler(setup, tmp_path):
    root, data, ckpt = setup
    out = tmp_path / "o.zarr"
    whole_stderr_is(m2m(*infer_args(data, ckpt, out, "--scheduler", "tcp://127.0.0.1:1", "--connect-timeout", "1")),
                    2, "cannot reach the Dask scheduler at tcp://127.0.0.1:1 within 1 s")
    assert not out.exists()


def test_garbage_scheduler_files(setup, tmp_path):
    root, data, ckpt = setup
    out = tmp_path / "o.zarr"
    garbage = tmp_path / "scheduler.json"
    garbage.write_bytes(os.urandom(64))
    whole_stderr_is(m2m(*infer_args(data, ckpt, out, "--scheduler-file", str(garbage))), 2,
                    f"--scheduler-file {garbage} is not a Dask scheduler file")
    assert not out.exists()


def test_scheduler_address_where_another_program_answers(setup, tmp_path):
    """A server of another protocol sends bytes Dask reads as a message length (e.g. "allocate 3.07 EiB")."""
    root, data, ckpt = setup
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    stop = threading.Event()

    def serve():
        conns = []
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
            conns.append(conn)
        for c in conns:
            c.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    out = tmp_path / "o.zarr"
    try:
        r = m2m(*infer_args(data, ckpt, out, "--scheduler", f"tcp://127.0.0.1:{port}", "--connect-timeout", "2"))
    finally:
        stop.set()
        thread.join()
        server.close()
    line = whole_stderr_is(r, 2, f"tcp://127.0.0.1:{port} answered, but not as a Dask scheduler")
    assert "MemoryError" not in line and "EiB" not in line
    assert not out.exists()


# --------------------------------------------------------------------------- the happy path says nothing more


def test_local_cluster_is_quiet_with_port_8787_taken_and_draws_100_percent_once(setup, tmp_path):
    root, data, ckpt = setup
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 8787))
        holder.listen()
    except OSError:  # taken already: by something that listens, else the case cannot be set up here
        holder.close()
        holder = None
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", 8787)) != 0:
                pytest.skip("port 8787 is neither free nor listened on")
    out = tmp_path / "o.zarr"
    try:  # mininterval 0: tqdm draws every step, so drawing the final one before close shows as two lines
        r = m2m(*[a for a in infer_args(data, ckpt, out, "--workers", "1", "--device", "cpu")
                  if a != "--no-progress"], env={"TQDM_MININTERVAL": "0"})
    finally:
        if holder is not None:
            holder.close()
    assert r.returncode == 0, r.stderr
    frames = [f for f in r.stderr.replace("\r", "\n").splitlines() if f.strip()]
    assert frames and all(f.startswith("infer: ") for f in frames), r.stderr  # nothing but the bar
    assert sum("100%" in f for f in frames) == 1, frames
    assert "complete" in r.stdout
