"""Benchmark `m2m infer` against the bare model on the same tiles, and its memory per worker.

Prints one JSON line.  In the same run, on one random 3-channel box:

(a) ``whole``: one forward pass over the whole periodically padded box (skipped
    when its activations would not fit in half the free memory);
(b) ``tiles``: the same model over the same tiles and batches as (c), in this
    process, windows sliced from the padded box in memory: no I/O, no Dask;
(c) ``infer``: the `m2m infer` stage end to end in a child process with its default
    placement (the tiles in that process, or its local cluster with ``--workers``),
    reading the box from a store and writing the prediction store;
(d) ``original``: the original toolkit's algorithm end to end in a child process:
    import what the original's ``m2m.py`` imports (torch, numpy, and through its
    training module TensorBoard's writer, torch.distributed, the data loader and
    matplotlib's pyplot), load the whole box from .npy into memory, load the
    model, run (b)'s tiles stitched into one array in memory, save it as .npy.  The goals compare
    (c) with (d): ``infer_over_original`` (wall time) and
    ``largest_process_over_original`` (the largest peak RSS of (c)'s processes over
    (d)'s).

(c), (b) and (d) run alternately ``--repeat`` times and the best time of each
counts: other load on a shared machine slows them unevenly.  Rates are
voxels/s of the box.  ``overhead_tiles`` is the extra time of (c)'s
tile phase (from its first task submitted to its last result: I/O, stitching,
scheduling) over (b); ``overhead_end_to_end`` adds process start, model
checks, cluster start and shutdown.  (a) and (b) use as many torch threads as
(c) uses in all (workers x torch threads); one process with N threads and N
processes with one thread do not compute equally fast, so (c) can beat (b).
From inside (c): ``worker_read_model_write_s`` splits the task time, summed
over workers, into reading + normalizing, the forward pass, and narrowing +
writing + marking done; ``worker_io_over_model`` is the I/O and stitching
cost relative to the model in the same processes (robust to other load on
the machine, which slows both alike); ``worker_busy_fraction`` is the
read + model + write time over the tile phase times the task slots (above 1
when the pipeline's threads overlap them); ``infer_model_busy`` is the model's
share alone (`InferSummary.model_busy`), ``infer_setup_s`` and
``infer_finish_s`` (c)'s time before the tile phase and after it.

Peak RSS per worker is the kernel's high-water mark (VmHWM in
/proc/PID/status) of each worker process of (c), read until the process
exits: exact peaks, not samples.  Run at --n 256 and --n 512 to check that it
does not grow with the box.

    python bench/infer.py                 # 256^3, a 3->32->3 two-convolution model, crop 64
    python bench/infer.py --n 512

``--finish-tiles N`` measures instead the client's finishing of a run of N
tiles (a cube number; one shard each, fsynced and marked as workers do):
``scan_s`` finds the finished tiles (one directory scan), ``legacy_scan_s``
does the same with one JSON file opened per tile (the earlier marker format),
``refsync_s`` is what fsyncing every file of the store again would cost
(what the completion mark did before it was told which shards the workers
had fsynced), ``dirs_s`` fsyncs only its directories and metadata files, ``finish_s`` is the engine's whole
finishing step (check, losses, mark complete).

    python bench/infer.py --finish-tiles 4096
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import zarr

from map2map import convert, store, tiles
from map2map.models import narrow_like

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(TESTS := Path(__file__).resolve().parents[1] / "tests"))
from _inmemory import tiles_in_memory  # noqa: E402
from _measure import write_random_npy  # noqa: E402
from twoconv import TwoConv  # noqa: E402  (the user model of the tests, loaded by --callback-at)


def make_input(root: Path, n: int, channels: int) -> Path:
    path = root / "npy" / "x.npy"
    path.parent.mkdir()
    write_random_npy(path, channels, n)
    return path


def vm_hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


CHILD = """
import json, sys
from map2map import infer
print(infer.run(infer.InferConfig(**json.loads(sys.argv[1]))).dumps())
"""


ORIGINAL = """
import json, sys
import numpy as np
import torch
# what the original's entry point (m2m.py -> main -> train, test) imports besides: TensorBoard's writer,
# torch.distributed and the data loader (its training module), matplotlib's pyplot (its figures)
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot
import torch.distributed
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
sys.path[:0] = sys.argv[1:3]
from _inmemory import tiles_in_memory
from twoconv import TwoConv
from map2map import tiles
a = json.loads(sys.argv[3])
torch.set_num_threads(a["threads"])
x = np.load(a["input"])
model = TwoConv(x.shape[0], x.shape[0], width=a["width"])
model.load_state_dict(torch.load(a["ckpt"])["model"])
model.eval()
plan = tiles.TilePlan(x.shape[1:], (a["crop"],) * 3, ((1, 1),) * 3)
out = np.empty_like(x)
tiles_in_memory(model, x, plan, a["batch_size"], out)
np.save(a["output"], out)
"""


def run_original(args: dict) -> tuple[float, int]:
    """(d): the original's algorithm end to end in a child process; returns wall time and peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", ORIGINAL, str(Path(__file__).resolve().parent), str(TESTS),
                             json.dumps(args)],
                            stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, vm_hwm(proc.pid) or 0)
        time.sleep(0.05)
    err = proc.communicate()[1]
    if proc.returncode:
        raise RuntimeError(f"the original's algorithm failed ({proc.returncode}): {err[-2000:]}")
    return time.perf_counter() - t0, peak


def run_infer(config: dict, interval: float = 0.1) -> tuple[float, dict, dict[int, int], int]:
    """Run the `m2m infer` stage with `config` (`InferConfig` fields) in a child process, as the command
    does; returns wall time, its summary, peak RSS of each worker process, peak RSS of the client."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    main = psutil.Process(proc.pid)
    workers: dict[int, int] = {}
    client = 0
    while proc.poll() is None:
        client = max(client, vm_hwm(proc.pid) or 0)
        try:
            kids = main.children(recursive=True)
        except psutil.Error:
            kids = []
        for k in kids:
            try:
                if "spawn_main" not in " ".join(k.cmdline()):
                    continue  # the multiprocessing resource tracker
            except psutil.Error:
                continue
            peak = vm_hwm(k.pid)
            if peak is not None:
                workers[k.pid] = max(workers.get(k.pid, 0), peak)
        time.sleep(interval)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"m2m infer failed ({proc.returncode}): {err[-2000:]}")
    return wall, json.loads(out.strip().splitlines()[-1]), workers, client


def finish_bench(root: Path, ntiles: int) -> dict:
    """Time the finishing of a run of `ntiles` tiles of 4^3 voxels, one shard each (see the module doc)."""
    from map2map.infer import engine, markers
    from map2map.infer.specs import DONE_DIR
    from map2map.utils import durable

    side = round(ntiles ** (1 / 3))
    if side ** 3 != ntiles:
        raise SystemExit(f"--finish-tiles {ntiles}: expected a cube number (e.g. 4096 = 16^3)")
    out = root / "finish.zarr"
    box = (4 * side,) * 3
    group = store.create(str(out), [store.FieldLayout("prediction", 1, box, (4,) * 3, (4,) * 3)], nsample=1,
                         boxsize=None, settings={})
    group["prediction"][0] = np.random.default_rng(0).standard_normal((1,) + box).astype(np.float32)
    done = out / DONE_DIR
    done.mkdir()
    durable.fsync_tree(out)  # as the workers leave it: every shard on disk
    markers.mark_all(str(done), [(0, t, 0.5, 64) for t in range(ntiles)])
    legacy = root / "legacy"
    legacy.mkdir()
    for t in range(ntiles):
        (legacy / f"0-{t}").write_text(json.dumps({"loss": 0.5, "n": 64}))
    os.sync()
    t0 = time.perf_counter()
    found = markers.read_done(str(done))
    t1 = time.perf_counter()
    legacy_found = {}
    for name in os.listdir(legacy):  # the earlier read: one file opened per tile
        with open(legacy / name) as f:
            legacy_found[name] = json.load(f)
    t2 = time.perf_counter()
    nfiles = durable.fsync_tree(out)
    t3 = time.perf_counter()
    dirs = [d for d, _, _ in os.walk(out)]
    durable.fsync_files([os.path.join(d, "zarr.json") for d in dirs] + dirs)
    t4 = time.perf_counter()
    engine._finish(str(out), str(out), ["prediction"], 1, ntiles, "MSELoss")
    t5 = time.perf_counter()
    assert len(found) == len(legacy_found) == ntiles and store.open_store(out).nsample == 1
    return {"bench": "infer-finish", "tiles": ntiles, "files": nfiles, "dirs": len(dirs),
            "scan_s": round(t1 - t0, 4), "legacy_scan_s": round(t2 - t1, 4), "refsync_s": round(t3 - t2, 4),
            "dirs_s": round(t4 - t3, 4), "finish_s": round(t5 - t4, 4), "load_avg_1min": os.getloadavg()[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256, help="grid size per axis")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--width", type=int, default=32, help="channels between the two convolutions")
    p.add_argument("--crop", type=int, default=64, help="tile size (and the input store's shard)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--store-chunk", type=int, default=None,
                   help="inner chunk of the input store (default: m2m convert's choice for the crop)")
    p.add_argument("--workers", type=int, default=None, help="m2m infer --workers (default: its own default)")
    p.add_argument("--whole", choices=["auto", "yes", "no"], default="auto", help="run (a)")
    p.add_argument("--repeat", type=int, default=2, help="runs of (c) and (b), alternating; the best of each counts")
    p.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--finish-tiles", type=int, default=None, metavar="N",
                   help="measure only the finishing of a run of N tiles (see above)")
    args = p.parse_args()
    n, c = args.n, args.channels
    root = Path(tempfile.mkdtemp(prefix="m2m-bench-infer-", dir=args.dir))
    try:
        if args.finish_tiles:
            print(json.dumps(finish_bench(root, args.finish_tiles)))
            return
        src = make_input(root, n, c)
        data = root / "in.zarr"
        convert.run(convert.ConvertConfig(output=str(data), field=(f"disp={src}",), crop=(args.crop,),
                                          chunk=(args.store_chunk,) if args.store_chunk else None,
                                          progress=False, workers=2))
        in_chunk = list(zarr.open_group(str(data), mode="r")["disp"].chunks[2:])
        torch.manual_seed(0)
        model = TwoConv(c, c, width=args.width).eval()
        ckpt = root / "state.pt"
        torch.save({"model": model.state_dict()}, ckpt)

        x = np.load(src)
        pad = 1
        plan = tiles.TilePlan((n,) * 3, (args.crop,) * 3, ((pad, pad),) * 3)
        os.sync()  # the inputs just written must not be flushed while (c) runs
        runs_c, runs_b, runs_d = [], [], []
        for r in range(args.repeat):  # alternate (c) and (b): other load on the machine hits both alike
            out = root / f"out{r}.zarr"
            config = {"data": str(data), "in_fields": ["disp"], "model": "twoconv.TwoConv",
                      "callback_at": str(TESTS), "model_kwargs": {"width": args.width},
                      "load_state": str(ckpt), "out": str(out), "crop": [args.crop], "batch_size": args.batch_size,
                      "device": "cpu", "progress": False, "workers": args.workers}
            wall_c, summary, workers, client_rss = run_infer(config)
            shutil.rmtree(out)
            split = [round(sum(w[k + "_s"] for w in summary["workers"].values()), 2)
                     for k in ("read", "model", "write")]
            runs_c.append({"tiles": summary["tiles_s"], "wall": wall_c, "cluster": summary["cluster"],
                           "split": split, "workers": workers, "client": client_rss,
                           "busy": summary.get("model_busy"), "setup": summary["setup_s"],
                           "finish": summary["finish_s"]})
            cluster = summary["cluster"]
            nworkers = len(summary["workers"])
            threads = summary["threads_per_worker"]
            # (b): all of (c)'s threads in this one process
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // (nworkers * threads)) * nworkers * threads)
            with torch.inference_mode():  # warm up: the first pass of a shape picks its algorithms
                model(torch.zeros((args.batch_size, c) + plan.window_shape))
            runs_b.append(tiles_in_memory(model, x, plan, args.batch_size))
            runs_d.append(run_original({"input": str(src), "ckpt": str(ckpt), "width": args.width, "crop": args.crop,
                                        "batch_size": args.batch_size, "threads": torch.get_num_threads(),
                                        "output": str(root / "original_out.npy")}))
            (root / "original_out.npy").unlink()
        best = min(runs_c, key=lambda r: r["tiles"])
        tiles_c, wall_c = best["tiles"], min(r["wall"] for r in runs_c)
        t_b = min(runs_b)
        read, model_s, write = best["split"]

        whole_bytes = 4 * (args.width + 2 * c) * (n + 2 * pad) ** 3
        t_a = None
        if args.whole == "yes" or (args.whole == "auto" and whole_bytes < psutil.virtual_memory().available / 2):
            xp = torch.from_numpy(np.pad(x, [(0, 0)] + [(pad, pad)] * 3, mode="wrap"))[None]
            with torch.inference_mode():
                t0 = time.perf_counter()
                narrow_like(model(xp), (n,) * 3)
                t_a = time.perf_counter() - t0
            del xp
        vox = n ** 3
        rss = sorted(v for r in runs_c for v in r["workers"].values())
        wall_d = min(t for t, _ in runs_d)
        rss_d = max(m for _, m in runs_d)
        largest = max(rss + [max(r["client"] for r in runs_c)])
        print(json.dumps({
            "bench": "infer", "n": n, "channels": c, "model": f"TwoConv(width {args.width}): conv3+act+conv1",
            "crop": args.crop, "pad": pad, "input_inner_chunk": in_chunk, "ntiles": plan.ntiles,
            "batch_size": args.batch_size,
            "cluster": cluster, "torch_threads_ab": torch.get_num_threads(),
            "whole_Mvox_s": round(vox / t_a / 1e6, 3) if t_a else None,
            "tiles_no_io_Mvox_s": round(vox / t_b / 1e6, 3),
            "infer_tiles_Mvox_s": round(vox / tiles_c / 1e6, 3),
            "infer_end_to_end_Mvox_s": round(vox / wall_c / 1e6, 3),
            "whole_s": round(t_a, 2) if t_a else None, "tiles_no_io_s": round(t_b, 2),
            "infer_tiles_s": round(tiles_c, 2), "infer_end_to_end_s": round(wall_c, 2),
            "overhead_tiles": round(tiles_c / t_b - 1, 3),  # best (c) over best (b)
            "worker_read_model_write_s": [read, model_s, write],
            "worker_io_over_model": round((read + write) / model_s, 3),
            "worker_busy_fraction": round((read + model_s + write) / (tiles_c * nworkers * threads), 3),
            "overhead_end_to_end": round(wall_c / t_b - 1, 3),
            "worker_peak_rss_MiB": [round(r / 2**20, 1) for r in rss],
            "client_peak_rss_MiB": round(max(r["client"] for r in runs_c) / 2**20, 1),
            "original_end_to_end_s": round(wall_d, 2), "original_peak_rss_MiB": round(rss_d / 2**20, 1),
            "infer_over_original": round(wall_c / wall_d, 3),
            "largest_process_over_original": round(largest / rss_d, 3),
            "infer_model_busy": round(best["busy"], 3), "infer_setup_s": round(best["setup"], 2),
            "infer_finish_s": round(best["finish"], 2),
            "runs_infer_end_to_end_s": [round(r["wall"], 2) for r in runs_c],
            "runs_original_s": [round(t, 2) for t, _ in runs_d],
            "repeat": args.repeat, "runs_infer_tiles_s": [round(r["tiles"], 2) for r in runs_c],
            "runs_tiles_no_io_s": [round(t, 2) for t in runs_b], "load_avg_1min_at_end": os.getloadavg()[0],
            "box_MiB": round(4 * c * vox / 2**20, 1),
        }))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
