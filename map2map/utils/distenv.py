"""Where this process sits in a distributed job, read from the launcher's environment.

`torchrun` sets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and
MASTER_PORT.  `srun` sets SLURM_PROCID, SLURM_LOCALID and SLURM_STEP_NUM_TASKS
instead (a batch script run without srun has SLURM_NTASKS but no step task
count, and is one process: it must not wait for tasks that never start); for those, the rendezvous address is MASTER_ADDR / MASTER_PORT if
set, else the first host of the step's node list and a port derived from the
job id (so two jobs sharing a node do not collide).  Without either launcher
the process is rank 0 of 1.  Pure functions of the environment mapping, so
they can be tested without a cluster.

A process's device follows from its local rank and what it sees of CUDA
(`CudaInfo`, asked of torch by `cuda_info`): `choose_device`, with the GPU
`gpu_index`; pure as well, so GPU set-ups can be tested without a GPU.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from typing import Mapping, MutableMapping

from map2map.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    """Rank, local rank and sizes of this process; `launcher` is 'none', 'torchrun' or 'slurm'."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    launcher: str = "none"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The one process that prints, logs and writes checkpoints."""
        return self.rank == 0


def _split_top(text: str) -> list[str]:
    """Split a SLURM host list at commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p for p in parts if p]


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list, e.g. 'gpu[07-09,12],cpu1' -> 'gpu07'."""
    items = _split_top(nodelist.strip())
    if not items:
        raise UserError(f"cannot read a host from the SLURM node list {nodelist!r}")
    item, host = items[0], ""
    while item:
        m = re.match(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if m is None:
            return host + item
        prefix, ranges, item = m.groups()
        first = re.split(r"[,-]", ranges)[0]
        if not first:
            raise UserError(f"cannot read a host from the SLURM node list {nodelist!r}")
        host += prefix + first
    return host


def tasks_on_node(tasks_per_node: str, node_id: int) -> int | None:
    """Tasks on node `node_id` from SLURM's compressed list such as '4(x2),3'."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_id] if 0 <= node_id < len(counts) else None


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise UserError(f"environment variable {key}={env[key]!r} is not an integer") from None


def rendezvous_port(job: int) -> int:
    """The rendezvous port of SLURM job `job` when MASTER_PORT is not set: one of 20000-29999.

    Below Linux's ephemeral range (32768 and up by default), so that no
    outgoing connection on the host holds it, and a rank that retries its
    connection before rank 0 listens cannot be handed the port itself and
    connect to itself; jobs sharing a node get different ports unless their
    ids are equal modulo 10000.
    """
    return 20000 + job % 10000


def dist_env(env: MutableMapping[str, str] | None = None) -> DistEnv:
    """Read this process's place from `env` (default `os.environ`).

    For SLURM jobs with several tasks this also fills in RANK, LOCAL_RANK,
    WORLD_SIZE, MASTER_ADDR and MASTER_PORT in `env`, which is what
    `torch.distributed.init_process_group` reads.  Raises `UserError` when
    the rendezvous address cannot be found.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        return DistEnv(_int(env, "RANK"), local_rank, world, local_world, "torchrun")
    if "SLURM_PROCID" not in env or "SLURM_STEP_NUM_TASKS" not in env or _int(env, "SLURM_STEP_NUM_TASKS") <= 1:
        return DistEnv()
    world, rank = _int(env, "SLURM_STEP_NUM_TASKS"), _int(env, "SLURM_PROCID")
    local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
    local_world = None
    if "SLURM_STEP_TASKS_PER_NODE" in env or "SLURM_TASKS_PER_NODE" in env:
        spec = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", ""))
        local_world = tasks_on_node(spec, int(env.get("SLURM_NODEID", "0") or 0))
    local_world = local_world or max(local_rank + 1, 1)
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise UserError("under srun with several tasks but no MASTER_ADDR and no SLURM_JOB_NODELIST: "
                            "cannot find the rendezvous host; export MASTER_ADDR and MASTER_PORT")
        env["MASTER_ADDR"] = first_host(nodelist)
    if "MASTER_PORT" not in env:
        job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
        if not job or not job.isdigit():
            raise UserError("under srun with several tasks but no MASTER_PORT and no SLURM_JOB_ID: "
                            "cannot choose a rendezvous port; export MASTER_PORT")
        env["MASTER_PORT"] = str(rendezvous_port(int(job)))
    env.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
               LOCAL_WORLD_SIZE=str(local_world))
    return DistEnv(rank, local_rank, world, local_world, "slurm")


# ---------------------------------------------------------------- devices

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class CudaInfo:
    """What this process sees of CUDA.

    `cuda` and `hip`: the CUDA or ROCm version torch was built for (``torch.version.cuda``,
    ``torch.version.hip``; both None in a CPU-only build); `visible`: the GPUs this process sees (after
    CUDA_VISIBLE_DEVICES, whose value is `visible_env`, None when unset); `usable`: whether CUDA
    started; `why`: torch's reason when it did not (e.g. a driver older than the build needs).
    """

    torch_version: str = ""
    cuda: str | None = None
    hip: str | None = None
    visible: int = 0
    usable: bool = False
    why: str | None = None
    visible_env: str | None = None

    def facts(self) -> str:
        """The facts behind a device choice, for messages."""
        build = f"built for ROCm {self.hip}" if self.hip else f"torch.version.cuda {self.cuda}"
        env = "" if self.visible_env is None else f", CUDA_VISIBLE_DEVICES={self.visible_env!r}"
        return f"torch {self.torch_version}, {build}, {self.visible} GPU(s) visible{env}"

    def unusable(self) -> str | None:
        """Why this process cannot use a GPU (None if it can)."""
        if self.usable and self.visible > 0:
            return None
        if self.cuda is None and self.hip is None:
            return "this torch is a CPU-only build"
        if self.visible == 0:
            return "no GPU is visible to this process" + (f" ({self.why})" if self.why else "")
        why = f": {self.why}" if self.why else " (a driver older than this torch build needs is the usual cause)"
        return f"{self.visible} GPU(s) visible but CUDA does not start{why}"


def cuda_reason(warning: str) -> str:
    """The gist of torch's warning when CUDA does not start: its first sentence, plus the CUDA error code if
    one comes later (e.g. 'The NVIDIA driver on your system is too old (found version 11040)')."""
    text = " ".join(warning.split("(Triggered internally")[0].split())
    text = text.split("CUDA initialization:", 1)[-1].strip()
    first = text.split(". ", 1)[0].rstrip(".")
    code = re.search(r"Error \d+: [^.(]+", text)
    return first + (f" ({code.group(0).strip()})" if code and code.group(0).strip() not in first else "")


def cuda_info() -> CudaInfo:
    """What this process sees of CUDA, asked of torch (the one function here that does; imported when
    called).  When CUDA does not start, torch says why in a warning (e.g. a driver too old for its build),
    which becomes `CudaInfo.why`; other warnings are passed on."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        visible = torch.cuda.device_count()
        usable = torch.cuda.is_available()
    why = None
    for w in caught:
        text = str(w.message)
        if why is None and not usable and "CUDA" in text:
            why = cuda_reason(text)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return CudaInfo(torch_version=torch.__version__, cuda=torch.version.cuda, hip=getattr(torch.version, "hip", None),
                    visible=visible, usable=usable, why=why, visible_env=os.environ.get("CUDA_VISIBLE_DEVICES"))


def gpu_index(local_rank: int, visible: int) -> int:
    """The GPU, among the `visible` ones, of the process with local rank `local_rank`: ``local_rank % visible``.

    One rule for the usual launches: torchrun, or ``srun --gpus-per-node=G`` with G tasks per node, shows
    every process all G GPUs, and local ranks 0..G-1 take one each; ``srun --gpus-per-task=1`` shows each
    task its own single GPU, index 0 whatever the local rank; more processes than GPUs share them in turn
    (gloo allows that, nccl refuses two processes on one GPU).
    """
    if visible < 1:
        raise ValueError(f"no GPU to choose from (visible={visible})")
    return local_rank % visible


def choose_device(requested: str, local_rank: int, cuda: CudaInfo) -> tuple[str, str | None]:
    """This process's device for ``--device`` `requested`: ("cpu" or "cuda:N", a note for the log or None).

    ``auto`` is the GPU `gpu_index` picks when CUDA is usable, else the CPU (with a note when GPUs are
    visible but CUDA does not start: the run would otherwise be silently slow); ``cuda`` that cannot be
    had is a `UserError` naming the reason.
    """
    if requested not in DEVICES:
        raise UserError(f"--device {requested!r}: expected one of {', '.join(DEVICES)}")
    if requested == "cpu":
        return "cpu", None
    why = cuda.unusable()
    if why is None:
        return f"cuda:{gpu_index(local_rank, cuda.visible)}", None
    if requested == "cuda":
        fix = ("install a CUDA build of torch (TORCH_SPEC in scripts/setup.sh)" if cuda.cuda is None and
               cuda.hip is None else "run on a node with a GPU" if cuda.visible == 0 else
               "install a torch built for the driver's CUDA version (nvidia-smi shows it)")
        raise UserError(f"--device cuda, but {why} ({cuda.facts()}); {fix}, or use --device cpu")
    if cuda.visible > 0 and (cuda.cuda is not None or cuda.hip is not None):
        return "cpu", f"{why} ({cuda.facts()}); training on cpu (--device cuda makes this an error)"
    return "cpu", None
