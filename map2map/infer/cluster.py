"""The client side: a Dask client (given scheduler or local cluster), the workers' state, model preloading,
task submission and the workers' statistics."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Iterator

from map2map.errors import UserError
from map2map.infer.specs import InferConfig, Job
from map2map.infer.worker import WorkerState, preload, run_tiles, stats_of


def cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@contextlib.contextmanager
def dask_client(opts: InferConfig, device: str) -> Iterator[tuple[Any, dict[str, Any]]]:
    """A Dask client: to `--scheduler` / `--scheduler-file`, or to a local cluster of worker processes."""
    from distributed import Client, LocalCluster

    timeout = f"{opts.connect_timeout}s"
    cluster = None
    info: dict[str, Any] = {}
    if opts.scheduler or opts.scheduler_file:
        what = opts.scheduler or f"the scheduler file {opts.scheduler_file}"
        if opts.scheduler_file and not os.path.isfile(opts.scheduler_file):
            raise UserError(f"--scheduler-file {opts.scheduler_file} does not exist")
        try:
            if opts.scheduler:
                client = Client(opts.scheduler, timeout=timeout, set_as_default=False)
            else:
                client = Client(scheduler_file=opts.scheduler_file, timeout=timeout, set_as_default=False)
        except Exception as exc:
            msg = " ".join(str(exc).split())[:200]
            raise UserError(f"cannot reach the Dask scheduler at {what} within {opts.connect_timeout:g} s "
                            f"({type(exc).__name__}: {msg})") from None
        info["cluster"] = opts.scheduler or opts.scheduler_file
        try:
            client.wait_for_workers(1, timeout=opts.wait_workers)
        except Exception:
            client.close()
            raise UserError(f"the Dask scheduler at {what} has no workers after {opts.wait_workers:g} s") from None
    else:
        workers = opts.workers
        if workers is None:
            workers = max(1, cuda_count()) if device == "cuda" else min(2, os.cpu_count() or 1)
        if workers < 1 or opts.threads_per_worker < 1:
            raise UserError(f"--workers {workers} and --threads-per-worker {opts.threads_per_worker} must be positive")
        cluster = LocalCluster(n_workers=workers, threads_per_worker=opts.threads_per_worker, processes=True,
                               dashboard_address=None, silence_logs=logging.ERROR)
        client = Client(cluster, set_as_default=False)
        info["cluster"] = f"local, {workers} worker processes x {opts.threads_per_worker} threads"
        info["workers"] = workers
    try:
        yield client, info
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


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
    client.register_plugin(WorkerState())


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


def submit_all(client, job: Job, todo: list[tuple[int, list[int]]], total: int, done: int,
                progress: bool) -> list[tuple[int, int, float | None, int]]:
    from distributed import as_completed
    from tqdm import tqdm

    register_state(client)  # already there after `preload_all`: a no-op then
    futures = [client.submit(run_tiles, job, sample, ids, key=f"m2m-infer-{job.token[:8]}-{sample}-{ids[0]}",
                             retries=0) for sample, ids in todo]
    owner = {f.key: sample for f, (sample, _) in zip(futures, todo)}
    results = []
    with tqdm(total=total, initial=done, unit="tile", desc="infer", disable=not progress,
              file=sys.stderr) as bar:
        try:
            for fut in as_completed(futures, loop=client.loop):
                sample = owner[fut.key]
                try:
                    res = fut.result()
                except UserError:
                    raise
                except Exception as exc:
                    raise RuntimeError(f"tile task {fut.key} failed: {type(exc).__name__}: {exc}") from exc
                results.extend((sample, t, loss, n) for t, loss, n in res)
                bar.update(len(res))
        finally:
            for f in futures:
                f.cancel()
    return results


def collect_stats(client, token: str) -> dict[str, dict[str, Any]]:
    """Each worker's statistics of run `token`, by worker address: tasks, tiles, model loads, seconds
    spent reading, in the model and writing, and the most bytes one task held.  Workers that ran
    nothing of the run, or did not answer (e.g. one that died), are left out."""
    stats = client.run(stats_of, token, on_error="ignore")
    return {address: s for address, s in stats.items() if s}
