"""The client side: where the tiles run (this process, a local cluster or a given scheduler), the
workers' state, model preloading, streams of batches as tasks, progress and the workers' statistics.

Without ``--scheduler`` a run that needs one worker process (`local_workers`)
runs in this process, on threads (`run_in_process`): no cluster to start.
A run that needs several starts its local cluster in a thread
(`start_local`) while the client plans, and connects when the plan is ready.

A client that fails to connect is closed before the error leaves (no
``Client.__del__`` traceback later), and a client that was connected is
closed on the way out whatever happened; the local cluster starts without
a dashboard, its HTTP server on a free port, so a busy port 8787 costs
nothing and says nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator, Sequence

from map2map.errors import UserError, describe, one_line
from map2map.infer.specs import InferConfig, Job
from map2map.infer.worker import Result, Work, WorkerState, preload, run_stream, run_tiles, stats_of
from map2map.utils.progress import advance

CLOSE_TIMEOUT = 10.0  # seconds a client or local cluster gets to shut down
STREAMS_PER_SLOT = 4  # streams per task slot at least: a slow worker leaves the others little to wait for
MAX_STREAM_BATCHES = 16  # batches per stream at most: the progress bar advances a stream at a time
IN_PROCESS = "this process"  # the name of the in-process "worker" in the statistics
BAR_FORMAT = "{desc}: {n_fmt}/{total_fmt} tiles {percentage:3.0f}%|{bar}| {rate_fmt}, ETA {remaining}"
ADDRESS_HELP = "expected a scheduler address such as tcp://host:8786"


def cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def positive_seconds(value: float, option: str) -> float:
    """`value` if it is a finite positive number of seconds, else a `UserError` naming `option`."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise UserError(f"{option} {value}: expected a positive number of seconds")
    return float(value)


def scheduler_address(opts: InferConfig) -> tuple[str, str]:
    """(address, how errors name it) of the scheduler `--scheduler` or `--scheduler-file` gives.

    The scheduler file is read here, once, as the JSON a Dask scheduler
    writes (``"address"`` is what is needed); an address with no host or port
    is a `UserError` before any connection is tried.
    """
    if opts.scheduler:
        address, what = opts.scheduler, opts.scheduler
    else:
        path = opts.scheduler_file
        if not os.path.isfile(path):
            raise UserError(f"--scheduler-file {path} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                info = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"--scheduler-file {path} is not a Dask scheduler file ({describe(exc)}); expected "
                            f"the JSON a scheduler writes with --scheduler-file") from None
        if not isinstance(info, dict) or not isinstance(info.get("address"), str):
            raise UserError(f"--scheduler-file {path} is not a Dask scheduler file: no \"address\" in it; "
                            f"expected the JSON a scheduler writes with --scheduler-file")
        address, what = info["address"], f"{info['address']} (from --scheduler-file {path})"
    from distributed.comm import get_address_host_port, parse_address

    option = "--scheduler" if opts.scheduler else f"the address in --scheduler-file {opts.scheduler_file}"
    scheme, _ = parse_address(address, strict=False)
    if scheme in ("tcp", "tls", "ws", "wss"):  # the schemes with a host and a port (others, e.g. ucx: as given)
        try:
            _, port = get_address_host_port(address)
        except ValueError as exc:
            raise UserError(f"{option} {address!r} is not a Dask address ({one_line(exc)}); {ADDRESS_HELP}") \
                from None
        if not 0 < port < 65536:
            raise UserError(f"{option} {address!r}: port {port} is not a port (1 to 65535); {ADDRESS_HELP}")
    return address, what


def connect(address: str, what: str, timeout: float):
    """A client of the scheduler at `address` (`what` names it in errors), or a one-line `UserError`."""
    from map2map.infer.dask_types import ClosingClient

    try:
        return ClosingClient(address, timeout=timeout, set_as_default=False)
    except OSError as exc:  # refused, unreachable, timed out
        raise UserError(f"cannot reach the Dask scheduler at {what} within {timeout:g} s "
                        f"({describe(exc)[:200]})") from None
    except Exception:  # something answered, not in Dask's protocol: whatever decoding it failed (even a
        # MemoryError, from a message length read off another protocol) means only that
        raise UserError(f"{what} answered, but not as a Dask scheduler (another program listens there?); "
                        f"{ADDRESS_HELP}") from None


def local_cluster(workers: int, threads_per_worker: int):
    """A `LocalCluster` of `workers` processes on this machine, quiet: no dashboard, and the scheduler's
    HTTP server (health, metrics) on a free loopback port instead of 8787, which another cluster may hold;
    worker logs only at CRITICAL, since a failed task comes back to the client as its exception.  Its
    workers carry `map2map.infer.gpus.LOCAL_CLUSTER_ENV`, so each may take the GPU its index names."""
    from distributed import LocalCluster

    from map2map.infer.gpus import LOCAL_CLUSTER_ENV

    return LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                        dashboard_address=None, scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                        silence_logs=logging.CRITICAL, env={LOCAL_CLUSTER_ENV: "1"})


def _shut_down(client, cluster) -> None:
    """Close `client`, then `cluster` (ours, when there is one)."""
    try:
        if client is not None:
            client.close(timeout=CLOSE_TIMEOUT)
    finally:
        if cluster is not None:
            cluster.close(timeout=CLOSE_TIMEOUT)


def _kill(pids: list[int]) -> None:
    """Kill the worker processes `pids` of our own local cluster that are still running after it was closed:
    a task that ignores the end of the run (a model inside a long forward pass) must not keep this process
    from exiting, since Python joins its child processes at exit."""
    import psutil

    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.ppid() == os.getpid():  # still our child, not a process that reused the number
                proc.kill()
                procs.append(proc)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=CLOSE_TIMEOUT)


def local_workers(opts: InferConfig, device: str) -> int:
    """Worker processes a run without ``--scheduler`` needs: ``--workers`` if given, else one per GPU with
    cuda, else 1.  One means none: the run stays in this process (`run_in_process`), where the model
    uses every core through torch threads while other threads read and write."""
    workers = opts.workers
    if workers is None:
        workers = max(1, cuda_count()) if device == "cuda" else 1
    if workers < 1 or opts.threads_per_worker < 1:
        raise UserError(f"--workers {workers} and --threads-per-worker {opts.threads_per_worker} must be positive")
    return workers


def start_local(workers: int, threads_per_worker: int) -> Future:
    """Start a `local_cluster` in a thread (the caller plans meanwhile); the future's result is the cluster.
    Whoever takes it closes it; `close_started` closes one that nobody took."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="m2m-cluster-start")
    try:
        return pool.submit(local_cluster, workers, threads_per_worker)
    finally:
        pool.shutdown(wait=False)


def close_started(starting: Future | None) -> None:
    """Close the cluster `start_local` started, once it is up (nothing if it failed to start)."""
    if starting is not None and starting.exception() is None:
        starting.result().close(timeout=CLOSE_TIMEOUT)


@contextlib.contextmanager
def dask_client(opts: InferConfig, device: str, starting: Future | None = None
                ) -> Iterator[tuple[Any, dict[str, Any]]]:
    """A Dask client: to `--scheduler` / `--scheduler-file`, or to a local cluster of worker processes
    (the one `starting` brings, from `start_local`, else one started here)."""
    timeout = positive_seconds(opts.connect_timeout, "--connect-timeout")
    wait = positive_seconds(opts.wait_workers, "wait_workers")
    client = cluster = None
    info: dict[str, Any] = {}
    if opts.scheduler or opts.scheduler_file:
        address, what = scheduler_address(opts)
        client = connect(address, what, timeout)
        info["cluster"] = opts.scheduler or opts.scheduler_file
    else:
        workers = local_workers(opts, device)
        cluster = starting.result() if starting is not None else local_cluster(workers, opts.threads_per_worker)
        info["cluster"] = f"local, {workers} worker processes x {opts.threads_per_worker} threads"
        info["workers"] = workers
    local_pids: list[int] = []
    try:
        if cluster is not None:
            from distributed import Client

            from map2map.infer.dask_types import IgnoreInterrupt

            client = Client(cluster, set_as_default=False)
            local_pids = list(client.run(os.getpid).values())
            client.register_plugin(IgnoreInterrupt())
        else:
            try:
                client.wait_for_workers(1, timeout=wait)
            except OSError:  # TimeoutError included
                raise UserError(f"the Dask scheduler at {what} has no workers after {wait:g} s") from None
        yield client, info
    except BaseException as exc:
        try:
            _shut_down(client, cluster)
        except OSError as err:  # the failure being raised is the news; a slow shutdown after it is not
            if hasattr(exc, "add_note"):
                exc.add_note(f"closing the Dask client afterwards failed too: {describe(err)}")
        finally:
            _kill(local_pids)  # workers of our own cluster still busy in a task (e.g. at Ctrl-C) end now
        raise
    else:
        _shut_down(client, cluster)


def torch_threads(opts: InferConfig, device: str, workers: int | None) -> int | None:
    if opts.torch_threads:
        return opts.torch_threads
    if workers is None or device != "cpu":
        return None  # an existing cluster keeps its own setting
    return max(1, (os.cpu_count() or 1) // (workers * opts.threads_per_worker))


def register_state(client) -> None:
    """Give every worker of the cluster, present and future, its `WorkerState` (a worker plugin).

    Idempotent: on a long-lived cluster the first run registers it and later
    runs find the state, and the models, it keeps.
    """
    from map2map.infer.dask_types import WorkerStatePlugin

    client.register_plugin(WorkerStatePlugin())


def preload_all(client, job: Job) -> None:
    """Every worker present loads the model before the first tile, so a model that cannot load on a
    worker (e.g. a checkpoint path it cannot see) fails once, here, and the tile phase times tiles."""
    register_state(client)
    workers = list(client.scheduler_info(n_workers=-1)["workers"])
    futures = [client.submit(preload, job, key=f"m2m-load-{job.token[:8]}-{i}", workers=[w],
                             allow_other_workers=True, pure=False) for i, w in enumerate(workers)]
    try:
        for fut in futures:
            fut.result()
    finally:
        for fut in futures:
            fut.cancel()


def streams(todo: Sequence[tuple[int, list[int]]], slots: int, max_batches: int = MAX_STREAM_BATCHES
            ) -> list[list[tuple[int, list[int]]]]:
    """Split the (sample, batch) pairs `todo` into consecutive streams (one task each, see
    `map2map.infer.worker`), as even as possible: at least `STREAMS_PER_SLOT` per task slot and at most
    `max_batches` batches each, fewer streams only when there are fewer batches."""
    n = len(todo)
    count = min(n, max(slots * STREAMS_PER_SLOT, -(-n // max_batches)))
    bounds = [n * i // count for i in range(count + 1)] if count else [0]
    return [list(todo[a:b]) for a, b in zip(bounds, bounds[1:])]


def _bar(total: int, done: int, progress: bool):
    """The progress bar of the tile phase: tiles done of all, tiles/s and the time left (ETA)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit=" tiles", desc="infer", disable=not progress, file=sys.stderr,
                bar_format=BAR_FORMAT)


def submit_all(client, job: Job, work: list[Work], total: int, done: int, progress: bool) -> list[Result]:
    """Run the streams `work` as Dask tasks (`run_tiles`), one each; returns every tile's result."""
    from distributed import as_completed

    register_state(client)  # already there after `preload_all`: a no-op then
    futures = [client.submit(run_tiles, job, w, key=f"m2m-infer-{job.token[:8]}-{w[0][0]}-{w[0][1][0]}",
                             retries=0) for w in work]
    results: list[Result] = []
    with _bar(total, done, progress) as bar:
        try:
            for fut in as_completed(futures, loop=client.loop):
                try:
                    res = fut.result()
                except UserError:
                    raise
                except Exception as exc:
                    raise RuntimeError(f"tile task {fut.key} failed: {type(exc).__name__}: {exc}") from exc
                results.extend(res)
                advance(bar, len(res))
        finally:
            for f in futures:
                f.cancel()
    return results


def run_in_process(state: WorkerState, job: Job, todo: Sequence[tuple[int, list[int]]], threads: int,
                   total: int, done: int, progress: bool) -> list[Result]:
    """Run the (sample, batch) pairs `todo` in this process: `threads` streams at once on `state`, one
    consecutive share of `todo` each; returns every tile's result.  Ctrl-C (or any failure) stops every
    stream after the batches it has started, which are written and marked as usual."""
    count = min(threads, len(todo))
    bounds = [len(todo) * i // count for i in range(count + 1)] if count else [0]
    shares = [list(todo[a:b]) for a, b in zip(bounds, bounds[1:])]
    stop = threading.Event()
    lock = threading.Lock()
    results: list[Result] = []
    with _bar(total, done, progress) as bar:
        def on_batch(n: int) -> None:
            with lock:
                advance(bar, n)

        with ThreadPoolExecutor(max(1, len(shares)), thread_name_prefix="m2m-stream") as pool:
            futures = [pool.submit(run_stream, state, job, share, on_batch, stop) for share in shares]
            try:
                for fut in futures:
                    results.extend(fut.result())
            except BaseException:
                stop.set()
                raise
    return results


def collect_stats(client, token: str) -> dict[str, dict[str, Any]]:
    """Each worker's statistics of run `token`, by worker address: tasks, tiles, model loads, seconds
    spent reading, in the model and writing, and the most bytes one task held.  Workers that ran
    nothing of the run, or did not answer (e.g. one that died), are left out."""
    stats = client.run(stats_of, token, on_error="ignore")
    return {address: s for address, s in stats.items() if s}
