"""Which GPU a Dask inference worker uses: a pure rule over facts the worker observes.

Terms:

* the worker's *visible GPUs*: the CUDA devices its process can use, numbered
  ``cuda:0``, ``cuda:1``, ... in the order of its ``CUDA_VISIBLE_DEVICES``
  (all of the host's when that is unset); ``cuda:0`` is the *current device*.
* *our local cluster*: the `LocalCluster` that ``m2m infer`` starts itself
  (`map2map.infer.cluster.local_cluster`); its workers have `LOCAL_CLUSTER_ENV`
  set to ``"1"`` in their environment, are named ``0 .. N-1`` and all see
  every GPU of the machine.
* a *dask-cuda worker*: one started by ``dask cuda worker`` or
  ``LocalCUDACluster``; dask-cuda gives each its own ``CUDA_VISIBLE_DEVICES``
  with the worker's GPU listed first, and installs worker plugins of its
  own, by which the worker is recognised.
* an *srun task index*: ``SLURM_LOCALID`` of a worker that srun started as one
  of several tasks of its step on one node (``SLURM_STEP_TASKS_PER_NODE``); a
  batch script's own process is no srun task.
* a *name index*: the ``-i`` that ``dask worker --name NAME --nworkers N``
  appends to the names of its workers (``NAME-0`` ... ``NAME-{N-1}``), as
  dask-jobqueue does with ``processes`` > 1 (``SLURMCluster-3-0`` ...).
* the worker's *GPU resource*: the amount of the Dask resource ``GPU`` it was
  started with (``--resources GPU=1``), if any.

The device (`worker_device`), by the first rule that applies:

1. ``cpu`` requested: ``cpu``.
2. no usable GPU: ``cpu`` for ``auto``; for ``cuda`` a one-line `UserError`
   naming the worker and the reason (decided as for training:
   `map2map.utils.distenv.choose_device`).
3. one visible GPU: ``cuda:0`` (``srun --gpus-per-task=1``, dask-jobqueue with
   one GPU per job, ``CUDA_VISIBLE_DEVICES`` set per worker).
4. our local cluster: worker ``i`` takes ``cuda:{i % count}``.
5. a dask-cuda worker: ``cuda:0``, its own GPU.
6. an srun task index ``k``: ``cuda:{k % count}`` (the rank-to-GPU rule of
   training, for ``srun --gpus-per-node``).
7. a name index ``i``: ``cuda:{i % count}``.
8. a GPU resource smaller than the visible GPUs: a one-line `UserError` (the
   worker shares its GPUs with others, and nothing says which one is its own).
9. otherwise ``cuda:0``: the worker has its visible GPUs to itself.

Rules 4, 6 and 7 give an index ``k``; the GPU is ``cuda:{k % count}``
(`map2map.utils.distenv.gpu_index`, the rank-to-GPU rule of training).
Worker names that are plain integers are an index only on our local cluster:
`LocalCUDACluster` names its workers ``0 .. N-1`` too, but has already given
each its own GPU as ``cuda:0``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

from map2map.errors import UserError
from map2map.utils.distenv import CudaInfo, tasks_on_node, choose_device, gpu_index

LOCAL_CLUSTER_ENV = "M2M_LOCAL_CLUSTER"  # "1" in the environment of our local cluster's workers
FIX = ("give each worker one GPU (dask cuda worker, CUDA_VISIBLE_DEVICES per worker, or srun --gpus-per-task=1), "
       "or start `dask worker --nworkers N` with --name NAME so that worker NAME-i takes GPU i")


@dataclass(frozen=True)
class GpuFacts:
    """What one worker process observes about its GPUs (`cuda`) and its place (see the module's terms).

    `srun_task` is (``SLURM_LOCALID``, tasks of the step on this node) for an
    srun task, else None; `gpu_resource` the worker's GPU resource, else None.
    """

    cuda: CudaInfo
    name: Any = None
    local_cluster: bool = False
    dask_cuda: bool = False
    srun_task: tuple[int, int] | None = None
    gpu_resource: float | None = None


def shown_name(name: Any) -> str:
    """A worker's name as a message shows it: as it is when printable, else quoted (one line either way)."""
    text = str(name)
    return text if text and text.isprintable() and text.strip() == text else repr(text)


def name_index(name: Any) -> int | None:
    """The name index of worker `name` (``"NAME-3"`` -> 3), or None when its name has none."""
    if not isinstance(name, str):
        return None
    m = re.fullmatch(r".*\S-([0-9]+)", name, re.DOTALL)
    return int(m.group(1)) if m else None


def worker_index(facts: GpuFacts) -> int:
    """The index that places a worker with `facts` among the GPUs it sees (rules 3 to 9 of the module
    docstring); the GPU is `gpu_index` of it.  Needs at least one usable GPU."""
    count = facts.cuda.visible
    if count == 1:
        return 0
    if facts.local_cluster and isinstance(facts.name, int) and not isinstance(facts.name, bool):
        return facts.name
    if facts.dask_cuda:
        return 0
    if facts.srun_task is not None and facts.srun_task[1] > 1:
        return facts.srun_task[0]
    index = name_index(facts.name)
    if index is not None:
        return index
    if facts.gpu_resource is not None and facts.gpu_resource < count:
        visible = "unset" if facts.cuda.visible_env is None else repr(facts.cuda.visible_env)
        raise UserError(f"Dask worker {shown_name(facts.name)} sees {count} GPUs (CUDA_VISIBLE_DEVICES={visible}) but has "
                        f"the resource GPU={facts.gpu_resource:g}: nothing says which GPU is its own; {FIX}")
    return 0


def worker_device(requested: str, facts: GpuFacts) -> str:
    """The torch device (``"cpu"`` or ``"cuda:K"``) for a worker with `facts` when the run asks for
    `requested` (``auto``, ``cpu`` or ``cuda``), by the rules of the module docstring; whether a GPU is
    usable, and why not, is decided as for training (`map2map.utils.distenv.choose_device`)."""
    try:
        device, _ = choose_device(requested, 0, facts.cuda)
    except UserError as exc:
        raise UserError(f"Dask worker {shown_name(facts.name)}: {exc}") from None
    if device == "cpu":
        return "cpu"
    return f"cuda:{gpu_index(worker_index(facts), facts.cuda.visible)}"


# --------------------------------------------------------------------------- observing a worker


def srun_task(env: Mapping[str, str]) -> tuple[int, int] | None:
    """(``SLURM_LOCALID``, tasks of the step on this node) when `env` is an srun task's, else None."""
    spec, local, node = (env.get(k, "") for k in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_LOCALID", "SLURM_NODEID"))
    if not spec or not re.fullmatch(r"[0-9]+", local):
        return None
    tasks = tasks_on_node(spec, int(node) if re.fullmatch(r"[0-9]+", node) else 0)
    return (int(local), tasks) if tasks else None


def is_dask_cuda(plugins: Mapping[str, Any]) -> bool:
    """Whether a worker with these worker `plugins` was started by dask-cuda (which installs its own)."""
    return any(type(p).__module__.partition(".")[0] == "dask_cuda" for p in plugins.values())


def gpu_resource(resources: Mapping[str, float]) -> float | None:
    """The amount of the resource ``GPU`` (any letter case) among a worker's Dask `resources`."""
    amounts = [v for k, v in resources.items() if str(k).lower() == "gpu"]
    return float(amounts[0]) if amounts else None


def observe(worker=None, env: Mapping[str, str] | None = None) -> GpuFacts:
    """The `GpuFacts` of this process, a Dask `worker` (None: no worker): what it sees of CUDA
    (`map2map.utils.distenv.cuda_info`), `env` (default ``os.environ``), and the worker's name, plugins and resources."""
    from map2map.utils.distenv import cuda_info

    env = os.environ if env is None else env
    plugins = getattr(worker, "plugins", None) or {}
    resources = getattr(getattr(worker, "state", None), "total_resources", None) or {}
    return GpuFacts(cuda=cuda_info(), name=getattr(worker, "name", None),
                    local_cluster=env.get(LOCAL_CLUSTER_ENV) == "1", dask_cuda=is_dask_cuda(plugins),
                    srun_task=srun_task(env), gpu_resource=gpu_resource(resources))
