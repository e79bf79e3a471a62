"""`bench/gpu_check.py`, the GPU check, end to end on a CPU: one JSON line with every part's figures, failures
recorded instead of raised, and the line printed even when a part hangs.

This machine has no GPU: the check runs with ``--device cpu`` (the GPU-vs-CPU comparison then compares the
CPU with itself), and ``--device cuda`` meets this process's real, CPU-only torch.  ``--compile`` is left out
(``--skip train_compile``): inductor compiling every layer's C++ kernels takes minutes on two cores, and
tests/test_train_gpu.py trains with ``--compile``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

SCRIPT = ROOT / "bench" / "gpu_check.py"


def _load_script():
    """bench/gpu_check.py as a module (bench/ is no package; its directory stays off sys.path)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load_script()


def run(*args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout + proc.stderr[-3000:]
    return proc, json.loads(lines[0])


def number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_quick_check_on_cpu_reports_every_part(tmp_path):
    proc, line = run("--quick", "--device", "cpu", "--skip", "train_compile", "--dir", str(tmp_path),
                     "--json", str(tmp_path / "line.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "line.json").read_text()) == line
    assert list(line)[-1] == "seconds" and "aborted" not in line
    for part in gpu_check.PARTS:
        assert "error" not in line[part], (part, line[part])
        if part != "train_compile":
            assert "skipped" not in line[part] and number(line[part]["seconds"]), (part, line[part])
    assert line["train_compile"] == {"skipped": "--skip"}

    env = line["env"]
    assert env["versions"]["torch"] and env["versions"]["zarr"] and env["cpus"] >= 1
    train = line["train"]
    assert train["batch_size"] == 2 and train["in_pad"] == [[20, 20]] * 3
    for mode in ("fp32", "resume", "bf16", "fp16"):
        figures = train[mode]
        assert number(figures["items_per_s"]) and figures["items_per_s"] > 0, (mode, figures)
        assert 0 <= figures["data_wait"] < 1 and number(figures["train_loss"]), (mode, figures)
    assert train["resume"]["ok"] and train["resume"]["start_epoch"] == 2 and train["resume"]["epochs_run"] == [3]
    assert number(train["bf16_over_fp32"]) and number(train["fp16_over_fp32"])
    assert line["infer_match"]["relative"] == 0.0 and line["infer_match"]["field_std"] > 0  # cpu against cpu
    for key in ("tile16_fp32", "tile16_bf16"):
        assert line["infer_speed"][key]["mvox_per_s"] > 0 and line["infer_speed"][key]["tiles"] == 1
    ddp = line["ddp"]
    assert ddp["returncode"] == 0 and ddp["checkpoint"] and ddp["items_per_s"] > 0
    assert ddp["place"] == "device cpu on rank 0, 2 processes (torchrun), backend gloo"
    assert not list(tmp_path.glob("m2m-gpu-check-*"))  # its scratch directory is gone


@pytest.mark.skipif(torch.cuda.is_available(), reason="a usable GPU would run the whole check")
def test_cuda_without_a_gpu_is_recorded_and_the_rest_skipped(tmp_path):
    proc, line = run("--quick", "--device", "cuda", "--dir", str(tmp_path), timeout=120)
    assert proc.returncode == 0
    assert line["env"]["error"].startswith("RuntimeError: --device cuda, but ")
    assert "versions" not in line["env"] and number(line["env"]["seconds"])
    assert line["data"] == {"skipped": "needs part 'env', which did not complete"}
    for part in gpu_check.PARTS[2:]:
        assert line[part]["skipped"].startswith("needs part "), part


def test_a_failing_part_is_recorded_and_the_budget_skips_the_rest():
    check = gpu_check.Check(gpu_check.parse(["--budget", "1000"]))

    def broken() -> dict:
        raise ZeroDivisionError("a figure over nothing")

    check.part("first", broken)
    check.part("second", lambda: {"x": 1}, needs=("first",))
    check.part("third", lambda: {"x": 2}, least=10_000)
    check.part("fourth", lambda: {"x": 3})
    assert check.results["first"]["error"].startswith("ZeroDivisionError: a figure over nothing (at ")
    assert check.results["second"] == {"skipped": "needs part 'first', which did not complete"}
    assert check.results["third"]["skipped"].endswith("s of the 1000 s budget left, 10000 s needed")
    assert check.results["fourth"]["x"] == 3


def test_the_watchdog_prints_the_line_when_a_part_hangs():
    code = ("import sys, threading, time; sys.path.insert(0, sys.argv[1]); import gpu_check as g; "
            "c = g.Check(g.parse(['--budget', '0.5', '--grace', '1'])); "
            "threading.Thread(target=g.watchdog, args=(c,), daemon=True).start(); "
            "c.part('first', lambda: {'x': 1}); c.part('hangs', lambda: time.sleep(60) or {})")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "bench")], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 3, proc.stderr
    line = json.loads(proc.stdout)
    assert line["first"]["x"] == 1 and line["hangs"] == {}
    assert line["aborted"] == "still running part 'hangs' after 1.5 s: stopped by the watchdog"


def test_unknown_part_to_skip_is_refused():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--skip", "nope"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip() == ("--skip nope: expected parts among env, data, train, infer_match, infer_speed, "
                                   "ddp, train_compile")
