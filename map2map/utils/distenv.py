"""Where this process sits in a distributed job, read from the launcher's environment.

`torchrun` sets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and
MASTER_PORT.  `srun` sets SLURM_PROCID, SLURM_LOCALID and SLURM_STEP_NUM_TASKS
instead (a batch script run without srun has SLURM_NTASKS but no step task
count, and is one process: it must not wait for tasks that never start); for those, the rendezvous address is MASTER_ADDR / MASTER_PORT if
set, else the first host of the step's node list and a port derived from the
job id (so two jobs sharing a node do not collide).  Without either launcher
the process is rank 0 of 1.  Pure functions of the environment mapping, so
they can be tested without a cluster.
"""

from __future__ import annotations

import os
import re
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


def _tasks_on_node(tasks_per_node: str, node_id: int) -> int | None:
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
        local_world = _tasks_on_node(spec, int(env.get("SLURM_NODEID", "0") or 0))
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
        env["MASTER_PORT"] = str(20000 + int(job) % 20000)
    env.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
               LOCAL_WORLD_SIZE=str(local_world))
    return DistEnv(rank, local_rank, world, local_world, "slurm")
