"""Check map2map on a GPU machine in one command and print one JSON line of what it found.

Parts, in the order they run (each part is one entry of the JSON line):

* ``env``: torch, its CUDA build, the GPU's name and memory, TF32 defaults,
  the versions of the packages map2map needs.
* ``data``: a synthetic store made as ``m2m demo`` makes one (`map2map.synth`
  then `map2map.convert`): one box for training and inference speed, a small
  one for the GPU/CPU comparison.
* ``train``: `map2map.train.run` of a V-Net (`map2map.models.VNet`) on crops
  with ``--in-pad auto``, for 2 epochs and then resumed to 3 in float32, and
  2 epochs under ``--amp bf16`` and ``--amp fp16``; the last epoch's items/s
  and data-wait fraction of each, the largest GPU memory taken, and bf16's
  and fp16's items/s over float32's.  The batch is ``--batch`` (2), or the
  largest below it that fits in the GPU's memory.
* ``infer_match``: the same checkpoint predicting the small store with
  `map2map.infer.run` on the device and on the CPU: largest absolute
  difference over the standard deviation of the CPU prediction (cuDNN's
  TF32, on by PyTorch's default, rounds convolution inputs to 10 bits: expect
  differences in the third or fourth significant digit).
* ``infer_speed``: `map2map.infer.run` of the training box with tiles of
  ``--tiles`` voxels, float32 and bf16: output voxels per second of the tile
  phase (Mvox/s).
* ``ddp``: 2 ranks sharing the one device, ``torchrun`` with
  ``--dist-backend gloo``, one epoch: return code, where rank 0 said it ran,
  items/s.
* ``train_compile``: ``--compile`` (with ``--amp`` ``--compile-amp``, bf16 by
  default) for 2 epochs: items/s of the compiled second epoch.  Last, since
  compiling takes the longest, and only with two minutes of budget left.

Robust by construction: every part runs in its own try/except, so a failure
becomes an ``"error"`` text in its entry and the next part runs (a part
that needs a failed one is recorded as skipped); a part that would start
after ``--budget`` seconds is recorded as skipped; a watchdog prints the line
with what there is and exits (status 3) if the run reaches ``--budget`` plus
``--grace`` seconds.  The line is printed in every case.  ``--quick`` uses
tiny sizes (a V-Net of width 4 on a 16^3 box), a few seconds per part, so
that the test suite can run it on a CPU with ``--device cpu``; there
``--skip train_compile`` leaves out the part that takes minutes on a few CPU
cores (inductor compiles C++ kernels for every layer).

On the GPU machine of the device tool (Python 3.12 there, with torch but
without zarr and dask): once, here, in the repository root, fetch the wheels
it lacks into the ignored folder ``.whl``::

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \\
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \\
        zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 dask==2026.8.0 \\
        distributed==2026.8.0 partd==1.4.2 locket==1.0.0 zict==3.0.0 tblib==3.2.2 tornado==6.6.1

then run, with ``carry`` [".whl"] and ``timeout_s`` 540 (the JSON line also lands in ``$OUT``)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \\
    PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --json $OUT/gpu_check.json

Here, on a CPU: ``python bench/gpu_check.py --quick --device cpu``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]

PACKAGES = ("torch", "numpy", "zarr", "numcodecs", "dask", "distributed", "xarray", "triton")


@contextlib.contextmanager
def quiet() -> Any:
    """Hold back what a stage prints (epoch lines, notes): the JSON line is the output."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


class Check:
    """The results so far, the time budget and the one JSON line (printed once, by `finish` or the watchdog)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.perf_counter()
        self.results: dict[str, Any] = {"bench": "gpu_check", "device": args.device, "quick": args.quick,
                                        "budget_s": args.budget}
        self._printed = threading.Lock()
        self.done = False

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.args.budget - self.elapsed()

    def part(self, name: str, fn: Callable[[], dict[str, Any]], needs: tuple[str, ...] = (),
             least: float = 0.0) -> None:
        """Run part `name` unless a part it `needs` did not complete or less than `least` seconds of the
        budget are left; record its figures, or its error."""
        for need in needs:
            if "error" in self.results.get(need, {}) or "skipped" in self.results.get(need, {}):
                self.results[name] = {"skipped": f"needs part {need!r}, which did not complete"}
                return
        if self.left() <= least:
            self.results[name] = {"skipped": f"{max(self.left(), 0):.0f} s of the {self.args.budget:g} s budget "
                                             f"left, {least:g} s needed"}
            return
        t = time.perf_counter()
        entry: dict[str, Any] = {}
        self.results[name] = entry  # visible to the watchdog while it runs
        try:
            entry.update(fn())
        except BaseException as exc:  # noqa: BLE001 -- every failure is a finding, recorded, never fatal
            if isinstance(exc, KeyboardInterrupt):
                raise
            entry["error"] = error_text(exc)
        entry["seconds"] = round(time.perf_counter() - t, 1)

    def finish(self, note: str | None = None) -> bool:
        """Print the JSON line (and write it to ``--json``) unless it was printed already."""
        if not self._printed.acquire(blocking=False):
            return False
        if note:
            self.results["aborted"] = note
        self.results["seconds"] = round(self.elapsed(), 1)
        line = json.dumps(self.results, default=str)
        print(line, flush=True)
        if self.args.json:
            with contextlib.suppress(OSError):
                Path(self.args.json).write_text(line + "\n")
        return True


def error_text(exc: BaseException) -> str:
    """The exception in one line, with the innermost frame of this repository's code where it was raised."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if str(ROOT) in f.filename]
    where = f" (at {Path(frames[-1].filename).relative_to(ROOT)}:{frames[-1].lineno})" if frames else ""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return (text[:600] + " ...") if len(text) > 600 else text + where


def watchdog(check: Check) -> None:
    """Print what there is and end the process once the budget and its grace are spent (a hung part)."""
    deadline = check.args.budget + check.args.grace
    while not check.done:
        if check.elapsed() > deadline:
            if check.finish(f"still running part {list(check.results)[-1]!r} after {deadline:g} s: "
                            "stopped by the watchdog"):
                os._exit(3)
            return
        time.sleep(0.5)


def _gpu_memory() -> dict[str, float]:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def _reset_gpu() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------- the parts


def part_env(check: Check) -> dict[str, Any]:
    import torch

    from map2map.utils.distenv import cuda_info
    from map2map.utils.precision import tf32_flags

    info = cuda_info()
    out: dict[str, Any] = {"python": sys.version.split()[0], "cpus": os.cpu_count(),
                           "cuda_facts": info.facts(), "cuda_unusable": info.unusable(),
                           "tf32_matmul_cudnn": list(tf32_flags())}
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    out["versions"] = versions
    if info.unusable() is None:
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   multiprocessors=props.multi_processor_count, cudnn=torch.backends.cudnn.version())
    if check.args.device == "cuda" and info.unusable() is not None:
        raise RuntimeError(f"--device cuda, but {info.unusable()} ({info.facts()})")
    return out


def make_store(root: Path, name: str, ngrid: int, crop: int, pad: int) -> Path:
    from map2map import convert, synth

    npy = root / f"{name}-npy"
    with quiet():
        synth.run(synth.SynthConfig(outdir=str(npy), num_samples=1, ngrid=ngrid, boxsize=2.0 * ngrid, seed=0))
        out = root / f"{name}.zarr"
        convert.run(convert.ConvertConfig(output=str(out), field=(f"za={npy}/*/dis_za.npy",
                                                                  f"lpt={npy}/*/dis_2lpt.npy"),
                                          crop=(crop,), pad=pad, boxsize=2.0 * ngrid, progress=False,
                                          workers=min(4, os.cpu_count() or 1)))
    shutil.rmtree(npy)
    return out


def part_data(check: Check, sizes: dict[str, Any], work: Path) -> dict[str, Any]:
    t = time.perf_counter()
    sizes["train_store"] = make_store(work, "train", sizes["ngrid"], sizes["crop"], sizes["pad"])
    t_train = time.perf_counter() - t
    sizes["small_store"] = make_store(work, "small", sizes["small_ngrid"], sizes["small_ngrid"], sizes["pad"])
    return {"train_box": [1, 3, *[sizes["ngrid"]] * 3], "small_box": [1, 3, *[sizes["small_ngrid"]] * 3],
            "crop": sizes["crop"], "store_pad": sizes["pad"], "train_store_s": round(t_train, 1)}


def _train_config(check: Check, sizes: dict[str, Any], run_dir: Path, epochs: int, batch: int, **kw: Any):
    from map2map import train

    return train.TrainConfig(
        model="VNet", lr=1e-4, train_data=str(sizes["train_store"]), in_fields=("za",), tgt_fields=("lpt",),
        crop=(sizes["crop"],), in_pad="auto", in_norms=("cosmology.dis",), tgt_norms=("cosmology.dis",),
        misc_kwargs={"width": sizes["width"]}, batch_size=batch, loader_workers=sizes["loader_workers"],
        epochs=epochs, log_interval=1_000_000, run_dir=str(run_dir), device=check.args.device,
        crop_step=(sizes["crop_step"],) if sizes.get("crop_step") else None, **kw)


def _figures(summary) -> dict[str, Any]:
    last = summary.epochs[-1]
    return {"items_per_s": round(last.items_per_s, 3), "data_wait": round(last.data_wait, 4),
            "last_epoch": last.epoch, "train_loss": last.train_loss}


def _is_oom(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower()


def train_run(check: Check, sizes: dict[str, Any], run_dir: Path, epochs: int, **kw: Any):
    """`map2map.train.run` with the largest batch up to ``--batch`` that fits; returns (summary, batch)."""
    from map2map import train

    batch = sizes["batch"]
    while True:
        _reset_gpu()
        try:
            with quiet():
                return train.run(_train_config(check, sizes, run_dir, epochs, batch, **kw)), batch
        except RuntimeError as exc:
            if not _is_oom(exc) or batch == 1:
                raise
            shutil.rmtree(run_dir, ignore_errors=True)
            batch //= 2


def part_train(check: Check, sizes: dict[str, Any], work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"model": "VNet", "width": sizes["width"], "crop": sizes["crop"],
                           "loader_workers": sizes["loader_workers"]}
    run_dir = work / "train-fp32"
    first, batch = train_run(check, sizes, run_dir, 2)
    sizes["batch_used"] = out["batch_size"] = batch
    sizes["checkpoint"] = first.checkpoint
    out["in_pad"] = first.in_pad
    out["fp32"] = {**_figures(first), **_gpu_memory()}
    _reset_gpu()
    with quiet():
        from map2map import train

        resumed = train.run(_train_config(check, sizes, run_dir, 3, batch))
    out["resume"] = {"start_epoch": resumed.start_epoch, "epochs_run": [e.epoch for e in resumed.epochs],
                     "ok": resumed.start_epoch == 2 and [e.epoch for e in resumed.epochs] == [3],
                     **_figures(resumed)}
    sizes["checkpoint"] = resumed.checkpoint
    for amp in ("bf16", "fp16"):
        if check.left() <= 0:
            out[amp] = {"skipped": f"the {check.args.budget:g} s budget was spent"}
            continue
        try:
            summary, b = train_run(check, {**sizes, "batch": batch}, work / f"train-{amp}", 2, amp=amp)
            out[amp] = {**_figures(summary), **_gpu_memory(), **({"batch_size": b} if b != batch else {})}
            out[f"{amp}_over_fp32"] = round(out[amp]["items_per_s"] / out["fp32"]["items_per_s"], 3)
        except Exception as exc:  # noqa: BLE001 -- one mode failing is a finding; the next still runs
            out[amp] = {"error": error_text(exc)}
    if "bf16_over_fp32" in out:  # the goal on a GPU
        out["goal_bf16_at_least_1.6x_fp32"] = out["bf16_over_fp32"] >= 1.6
        out["goal_bf16_data_wait_under_5pc"] = out["bf16"]["data_wait"] < 0.05
    return out


def part_train_compile(check: Check, sizes: dict[str, Any], work: Path) -> dict[str, Any]:
    amp = check.args.compile_amp
    summary, batch = train_run(check, {**sizes, "batch": sizes.get("batch_used", sizes["batch"])},
                               work / "train-compile", 2, amp=amp, compile=True)
    out = {"amp": amp, "batch_size": batch, **_figures(summary), **_gpu_memory(),
           "first_epoch_items_per_s": round(summary.epochs[0].items_per_s, 3)}
    fp32 = check.results.get("train", {}).get("fp32", {}).get("items_per_s")
    same_amp = check.results.get("train", {}).get(amp, {}).get("items_per_s") if amp != "off" else fp32
    if fp32:
        out["over_fp32"] = round(out["items_per_s"] / fp32, 3)
    if same_amp:
        out[f"over_{amp}_uncompiled"] = round(out["items_per_s"] / same_amp, 3)
    return out


class Cluster:
    """One Dask cluster of one worker process for every inference part (started once, as `m2m infer`
    starts its own, with our local cluster's GPU rule)."""

    def __init__(self) -> None:
        self.cluster = None

    def address(self) -> str:
        if self.cluster is None:
            from map2map.infer.cluster import local_cluster

            self.cluster = local_cluster(1, 1)
        return self.cluster.scheduler_address

    def close(self) -> None:
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.close(timeout=10)


def infer_run(cluster: Cluster, ckpt: str, data: Path, out: Path, device: str, **kw: Any):
    from map2map import infer

    shutil.rmtree(out, ignore_errors=True)
    threads = (os.cpu_count() or 1) if device == "cpu" else None
    with quiet():
        return infer.run(infer.InferConfig(load_state=ckpt, data=str(data), out=str(out), device=device,
                                           scheduler=cluster.address(), torch_threads=threads, progress=False,
                                           **kw))


def part_infer_match(check: Check, sizes: dict[str, Any], work: Path, cluster: Cluster) -> dict[str, Any]:
    import numpy as np

    from map2map import store

    ckpt, data = sizes["checkpoint"], sizes["small_store"]
    preds, out = {}, {}
    for device in dict.fromkeys([check.args.device, "cpu"]):
        s = infer_run(cluster, ckpt, data, work / f"match-{device}.zarr", device, crop=(sizes["small_ngrid"],))
        preds[device] = store.open_store(str(work / f"match-{device}.zarr")).field(s.field)[:]
        out[f"{device}_tiles_s"] = round(s.tiles_s or 0.0, 2)
    cpu = preds["cpu"]
    dev = preds[check.args.device]
    scale = float(cpu.std())
    out.update(box=list(cpu.shape), field_std=scale, max_abs_diff=float(np.abs(dev - cpu).max()),
               relative=float(np.abs(dev - cpu).max()) / scale)
    return out


def part_infer_speed(check: Check, sizes: dict[str, Any], work: Path, cluster: Cluster) -> dict[str, Any]:
    ckpt, data = sizes["checkpoint"], sizes["train_store"]
    out: dict[str, Any] = {"box": sizes["ngrid"], "device": check.args.device}
    for amp in ("off", "bf16"):
        for tile in sizes["tiles"]:
            key = f"tile{tile}_{'fp32' if amp == 'off' else amp}"
            if check.left() <= 0:
                out[key] = {"skipped": f"the {check.args.budget:g} s budget was spent"}
                continue
            try:
                _reset_gpu()
                s = infer_run(cluster, ckpt, data, work / f"speed-{tile}-{amp}.zarr", check.args.device,
                              crop=(tile,), amp=amp)
                voxels = s.nsample * sizes["ngrid"] ** 3
                phases = {f"worker_{k}_s": round(sum(w.get(f"{k}_s", 0.0) for w in s.workers.values()), 2)
                          for k in ("read", "model", "write")}
                out[key] = {"mvox_per_s": round(voxels / s.tiles_s / 1e6, 3), "tiles": s.tiles,
                            "tiles_s": round(s.tiles_s, 2), "pad": s.pad[0], **phases}
            except Exception as exc:  # noqa: BLE001 -- one size failing is a finding; the next still runs
                out[key] = {"error": error_text(exc)}
    return out


EPOCH_LINE = re.compile(r"epoch (\d+)/\d+: .*?([0-9.]+) items/s, data wait ([0-9.]+)%")


def part_ddp(check: Check, sizes: dict[str, Any], work: Path) -> dict[str, Any]:
    run_dir = work / "ddp"
    run_dir.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "map2map.cli", "train", "--train-data", str(sizes["train_store"]), "--in", "za", "--tgt", "lpt",
           "--crop", str(sizes["crop"]), "--in-pad", "auto", "--in-norms", "cosmology.dis",
           "--tgt-norms", "cosmology.dis", "--model", "VNet", "--misc-kwargs", json.dumps({"width": sizes["width"]}),
           "--lr", "1e-4", "--batch-size", "1", "--loader-workers", str(sizes["loader_workers"]),
           "--epochs", "1", "--log-interval", "1000000", "--run-dir", str(run_dir),
           "--device", check.args.device, "--dist-backend", "gloo"]
    threads = max(1, (os.cpu_count() or 2) // 2)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    timeout = max(10.0, min(check.left() + check.args.grace / 2, 300.0))
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=run_dir, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-400:]
        raise RuntimeError(f"torchrun did not end within {timeout:.0f} s; stderr ends: "
                           f"{tail.decode(errors='replace') if isinstance(tail, bytes) else tail}") from None
    out: dict[str, Any] = {"ranks": 2, "backend": "gloo", "returncode": proc.returncode,
                           "wall_s": round(time.perf_counter() - t, 1)}
    lines = proc.stdout.splitlines()
    out["place"] = next((line for line in lines if " on rank 0, " in line), None)
    epochs = [m.groups() for m in map(EPOCH_LINE.search, lines) if m]
    if epochs:
        out.update(items_per_s=float(epochs[-1][1]), data_wait=float(epochs[-1][2]) / 100)
    out["checkpoint"] = (run_dir / "checkpoint.pt").exists()
    if proc.returncode != 0 or not epochs:
        out["error"] = " ".join((proc.stderr.strip().splitlines() or ["(no stderr)"])[-3:])[:600]
    return out


# ---------------------------------------------------------------- main


def sizes_for(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        # one crop per training epoch (a crop step of the box), 8 for the two DDP ranks; one tile per inference
        return {"ngrid": 16, "small_ngrid": 16, "crop": 8, "crop_step": 16, "pad": 20, "width": 4, "batch": 2,
                "loader_workers": 0, "tiles": (16,)}
    return {"ngrid": args.ngrid, "small_ngrid": 64, "crop": args.crop, "pad": 20, "width": args.width,
            "batch": args.batch, "loader_workers": args.loader_workers, "tiles": tuple(args.tiles)}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds per part (for tests on CPU)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds after which no part starts")
    p.add_argument("--grace", type=float, default=45.0,
                   help="seconds past the budget after which the watchdog prints and stops the run")
    p.add_argument("--ngrid", type=int, default=256, help="grid size per axis of the training box")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--width", type=int, default=64, help="V-Net width")
    p.add_argument("--batch", type=int, default=2, help="batch size to try first (halved until it fits)")
    p.add_argument("--loader-workers", type=int, default=4)
    p.add_argument("--tiles", type=int, nargs="+", default=[128, 256], help="inference tile sizes")
    p.add_argument("--compile-amp", choices=["off", "bf16", "fp16"], default="bf16")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the JSON line to this file")
    p.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    return p.parse_args(argv)


PARTS = ("env", "data", "train", "infer_match", "infer_speed", "ddp", "train_compile")  # in running order


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # map2map from this checkout, also where it is not installed: here, in Dask workers and torchrun's ranks
    sys.path.insert(0, str(ROOT))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    skip = set(filter(None, args.skip.split(",")))
    if skip - set(PARTS):
        raise SystemExit(f"--skip {','.join(sorted(skip - set(PARTS)))}: expected parts among {', '.join(PARTS)}")
    check = Check(args)
    threading.Thread(target=watchdog, args=(check,), daemon=True).start()
    sizes = sizes_for(args)
    work = Path(tempfile.mkdtemp(prefix="m2m-gpu-check-", dir=args.dir))
    cluster = Cluster()
    # name: (what it runs, the parts it needs, the seconds of budget it needs left to start)
    parts: dict[str, tuple[Callable[[], dict[str, Any]], tuple[str, ...], float]] = {
        "env": (lambda: part_env(check), (), 0),
        "data": (lambda: part_data(check, sizes, work), ("env",), 0),
        "train": (lambda: part_train(check, sizes, work), ("data",), 0),
        "infer_match": (lambda: part_infer_match(check, sizes, work, cluster), ("train",), 0),
        "infer_speed": (lambda: part_infer_speed(check, sizes, work, cluster), ("train",), 0),
        "ddp": (lambda: part_ddp(check, sizes, work), ("data",), 0),
        "train_compile": (lambda: part_train_compile(check, sizes, work), ("data",), 0 if args.quick else 120),
    }
    try:
        for name in PARTS:
            if name in skip:
                check.results[name] = {"skipped": "--skip"}
                continue
            check.part(name, *parts[name])
    finally:
        cluster.close()
        shutil.rmtree(work, ignore_errors=True)
        check.done = True
        check.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
