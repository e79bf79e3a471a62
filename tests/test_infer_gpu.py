"""The GPU a Dask inference worker uses (`map2map.infer.gpus`), for the set-ups users run.

This machine has no GPU: the GPU count and visibility are MOCKED (as facts
given to the pure rule, or by patching ``torch.cuda.is_available`` and
``torch.cuda.device_count`` inside real Dask worker processes); everything
else is real.  A *physical* GPU below is the entry of the worker's
``CUDA_VISIBLE_DEVICES`` its ``cuda:K`` stands for: workers that must not
collide must get distinct physical GPUs.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from map2map.errors import UserError
from map2map.infer import gpus
from map2map.infer.gpus import GpuFacts, worker_device
from map2map.utils.distenv import CudaInfo

NODE = ["0", "1", "2", "3"]  # the GPUs of a four-GPU node


def rotated(visible: list[str], i: int) -> str:
    """The CUDA_VISIBLE_DEVICES dask-cuda gives its worker `i`: the visible GPUs, the worker's own first."""
    return ",".join(visible[i:] + visible[:i])


def physical(device: str, visible: str | None, node: list[str] = NODE) -> str:
    """The physical GPU `device` ("cuda:K") stands for under `visible` (None: every GPU of the node)."""
    order = visible.split(",") if visible is not None else node
    return order[int(device.partition(":")[2])]


def cuda(count: int, visible: str | None = None, **kw) -> CudaInfo:
    """What a process of a CUDA build of torch sees with `count` GPUs usable (MOCKED)."""
    kw = {"torch_version": "2.6.0+cu124", "cuda": "12.4", "visible": count, "usable": count > 0, **kw}
    return CudaInfo(visible_env=visible, **kw)


def gpu(count: int, visible_devices: str | None = None, **kw) -> GpuFacts:
    return GpuFacts(cuda(count, visible_devices), **kw)


# --------------------------------------------------------------------------- the set-ups users run


@pytest.mark.parametrize("names", [[0, 1, 2, 3],  # LocalCUDACluster
                                   ["tcp://10.0.0.5:40001", "tcp://10.0.0.5:40002",
                                    "tcp://10.0.0.5:40003", "tcp://10.0.0.5:40004"],  # dask cuda worker
                                   ["gpu7-0", "gpu7-1", "gpu7-2", "gpu7-3"]])  # dask cuda worker --name gpu7
def test_dask_cuda_workers_each_use_their_own_gpu(names):
    devices, gpus_used = [], []
    for i, name in enumerate(names):
        visible = rotated(NODE, i)
        device = worker_device("cuda", gpu(4, visible_devices=visible, name=name, dask_cuda=True))
        devices.append(device)
        gpus_used.append(physical(device, visible))
    assert devices == ["cuda:0"] * 4
    assert sorted(gpus_used) == NODE  # four workers, four GPUs (the old `name % count` gave 0, 2, 0, 2)


def test_local_cuda_cluster_names_are_no_index_even_unrecognised():
    """Integer names index GPUs only on our own local cluster: a LocalCUDACluster whose plugins were not
    recognised still gets each worker its own GPU, the first it lists."""
    used = {physical(worker_device("auto", gpu(4, visible_devices=rotated(NODE, i), name=i)), rotated(NODE, i))
            for i in range(4)}
    assert used == set(NODE)


def test_dask_worker_nworkers_with_gpu_resource_and_no_name_is_refused():
    """`dask worker --nworkers 4 --resources GPU=1` on a four-GPU node, all workers seeing every GPU and named
    by their addresses: nothing tells them apart, so each refuses, in one line that says how to fix it."""
    for port in (40001, 40002, 40003, 40004):
        name = f"tcp://10.0.0.5:{port}"
        with pytest.raises(UserError) as err:
            worker_device("cuda", gpu(4, name=name, gpu_resource=1.0))
        msg = str(err.value)
        assert "\n" not in msg and name in msg and "GPU=1" in msg and "sees 4 GPUs" in msg
        assert "CUDA_VISIBLE_DEVICES=unset" in msg and "--name" in msg and "dask cuda worker" in msg


@pytest.mark.parametrize("visible", [None, "0,1,2,3"])  # unset, or set for the whole node (srun --gpus-per-node)
def test_dask_worker_nworkers_with_name_spreads_over_the_gpus(visible):
    """`dask worker --nworkers 4 --name gpu7 --resources GPU=1`: worker gpu7-i takes GPU i."""
    devices = [worker_device("cuda", gpu(4, visible_devices=visible, name=f"gpu7-{i}", gpu_resource=1.0))
               for i in range(4)]
    assert devices == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert sorted(physical(d, visible) for d in devices) == NODE


@pytest.mark.parametrize("visible", ["0", "2", "GPU-7c3b2a10-0f2f-01ac-6b05-8da14d6e9005"])
@pytest.mark.parametrize("name", ["SLURMCluster-0", "SLURMCluster-5-3", "tcp://10.0.0.9:39001"])
def test_jobqueue_slurm_one_gpu_per_task_uses_it(name, visible):
    """dask-jobqueue's SLURMCluster with `--gpus-per-task=1`: each worker sees one GPU (renumbered or not by
    the job's cgroup), whatever its name or index: `cuda:0`."""
    facts = gpu(1, visible_devices=visible, name=name, gpu_resource=1.0, srun_task=(3, 4))
    assert worker_device("cuda", facts) == worker_device("auto", facts) == "cuda:0"


def test_jobqueue_slurm_several_processes_per_job_spread():
    """SLURMCluster(processes=4, job_extra_directives=["--gres=gpu:4"]): the job's four workers, named
    SLURMCluster-J-i by `dask worker --name SLURMCluster-J --nworkers 4`, take GPUs 0..3."""
    for job in range(3):
        assert [worker_device("cuda", gpu(4, visible_devices="0,1,2,3", name=f"SLURMCluster-{job}-{i}"))
                for i in range(4)] == [f"cuda:{i}" for i in range(4)]


def test_srun_tasks_sharing_the_node_gpus_take_local_id():
    """`srun --ntasks-per-node=4 --gpus-per-node=4 dask worker ...`: task k (SLURM_LOCALID) takes GPU k."""
    devices = []
    for local in range(4):
        env = {"SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_LOCALID": str(local), "SLURM_NODEID": "1",
               "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
        task = gpus.srun_task(env)
        assert task == (local, 4)
        devices.append(worker_device("cuda", gpu(4, visible_devices=env["CUDA_VISIBLE_DEVICES"],
                                                 name=f"tcp://10.0.0.7:{40000 + local}", srun_task=task)))
    assert devices == [f"cuda:{k}" for k in range(4)]


def test_srun_task_only_for_a_step_of_several_tasks():
    assert gpus.srun_task({}) is None
    assert gpus.srun_task({"SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "4"}) is None  # a batch script
    assert gpus.srun_task({"SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "1"}) == (0, 1)
    assert worker_device("cuda", gpu(4, srun_task=(0, 1), name="tcp://h:1")) == "cuda:0"


def test_our_local_cluster_maps_worker_index():
    assert [worker_device("cuda", gpu(2, name=i, local_cluster=True)) for i in range(4)] == \
        ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert [worker_device("auto", gpu(1, name=i, local_cluster=True)) for i in range(4)] == ["cuda:0"] * 4


def test_a_lone_worker_uses_the_first_gpu():
    """`dask worker SCHEDULER` on a two-GPU workstation, no GPU resource (or one covering every GPU)."""
    assert worker_device("cuda", gpu(2, name="tcp://127.0.0.1:39000")) == "cuda:0"
    assert worker_device("cuda", gpu(2, name="tcp://127.0.0.1:39000", gpu_resource=2.0)) == "cuda:0"


# --------------------------------------------------------------------------- no GPU


@pytest.mark.parametrize("info", [CudaInfo(), cuda(0), cuda(0, ""), cuda(2, usable=False)])
def test_cpu_and_auto_without_gpu(info):
    facts = GpuFacts(info, name=3, local_cluster=True)
    assert worker_device("cpu", facts) == "cpu"
    assert worker_device("auto", facts) == "cpu"
    assert worker_device("cpu", gpu(4, name=1, local_cluster=True)) == "cpu"


@pytest.mark.parametrize("info, reason", [
    (CudaInfo(torch_version="2.6.0+cpu"), "CPU-only build"),
    (cuda(0, ""), "CUDA_VISIBLE_DEVICES=''"),
    (cuda(0, "-1"), "CUDA_VISIBLE_DEVICES='-1'"),
    (cuda(0), "no GPU is visible"),
    (cuda(2, usable=False, why="The NVIDIA driver on your system is too old (found version 11040)"),
     "driver on your system is too old"),
])
def test_cuda_without_gpu_is_one_line_naming_worker_and_reason(info, reason):
    with pytest.raises(UserError) as err:
        worker_device("cuda", GpuFacts(info, name="SLURMCluster-2"))
    msg = str(err.value)
    assert "\n" not in msg and reason in msg
    assert msg.startswith("Dask worker SLURMCluster-2: --device cuda")


def test_unknown_device_is_refused():
    with pytest.raises(UserError, match="--device 'cuda:1': expected one of auto, cpu, cuda"):
        worker_device("cuda:1", gpu(2))


# --------------------------------------------------------------------------- properties of the rule


facts_with_gpus = st.builds(
    GpuFacts, st.builds(cuda, st.integers(1, 16), st.none() | st.text("0123456789,", max_size=12)),
    name=st.none() | st.integers(0, 1000) | st.text(max_size=20)
    | st.builds(lambda p, i: f"{p}-{i}", st.text(min_size=1, max_size=8), st.integers(0, 99)),
    local_cluster=st.booleans(), dask_cuda=st.booleans(),
    srun_task=st.none() | st.tuples(st.integers(0, 15), st.integers(1, 16)),
    gpu_resource=st.none() | st.floats(0.1, 16))


@given(facts_with_gpus, st.sampled_from(["auto", "cuda"]))
def test_a_device_is_always_a_visible_gpu_or_one_line_refusal(facts, requested):
    count = facts.cuda.visible
    refused = count > 1 and unplaced(facts) and facts.gpu_resource is not None and facts.gpu_resource < count
    try:
        device = worker_device(requested, facts)
    except UserError as exc:
        assert refused and "\n" not in str(exc)
        return
    assert not refused
    kind, _, k = device.partition(":")
    assert kind == "cuda" and 0 <= int(k) < facts.cuda.visible
    assert worker_device("cpu", facts) == "cpu"
    if facts.cuda.visible == 1 or (facts.dask_cuda and not facts.local_cluster):
        assert device == "cuda:0"


def unplaced(facts: GpuFacts) -> bool:
    """Nothing tells which GPU is the worker's: not our local cluster's, not dask-cuda's, no srun task
    index, no name index."""
    ours = facts.local_cluster and isinstance(facts.name, int)
    srun = facts.srun_task is not None and facts.srun_task[1] > 1
    return not ours and not facts.dask_cuda and not srun and gpus.name_index(facts.name) is None


@given(st.text(min_size=1, max_size=20).filter(lambda p: not p[-1].isspace()), st.integers(0, 10**6))
def test_name_index_reads_dask_suffix(prefix, i):
    assert gpus.name_index(f"{prefix}-{i}") == i


def ends_in_dash_digits(name: str) -> bool:
    head = name.rstrip("0123456789")
    return head != name and head.endswith("-")


@given(st.text(max_size=20).filter(lambda s: not ends_in_dash_digits(s)))
def test_names_without_suffix_have_no_index(name):
    assert gpus.name_index(name) is None


def test_name_index_of_addresses_and_integers():
    assert gpus.name_index("tcp://10.0.0.5:40001") is None
    assert gpus.name_index("tcp://gpu-node-3:40001") is None
    assert gpus.name_index(3) is None and gpus.name_index("-3") is None
    assert gpus.name_index("SLURMCluster-5-12") == 12


def test_dask_cuda_is_recognised_by_its_plugins():
    plugin = type("CPUAffinity", (), {"__module__": "dask_cuda.plugins"})()
    assert gpus.is_dask_cuda({"CPUAffinity-1234": plugin, "map2map-infer": object()})
    assert not gpus.is_dask_cuda({"map2map-infer": object()})
    assert gpus.gpu_resource({"GPU": 1}) == 1.0 and gpus.gpu_resource({"gpu": 2}) == 2.0
    assert gpus.gpu_resource({"MEMORY": 10e9}) is None


# --------------------------------------------------------------------------- a real Dask worker


def test_real_workers_choose_their_device():
    """Two real worker processes (a distributed LocalCluster started as `local_cluster` starts ours,
    with LOCAL_CLUSTER_ENV set) with two GPUs MOCKED inside them: the device `WorkerState` gives a task.
    Then the same workers as dask-cuda would set them up (own GPU first, not our cluster), and as workers
    without a GPU."""
    import logging

    from distributed import Client, LocalCluster

    from map2map.infer.cluster import register_state

    def mock_gpus(count):
        def patch():
            import torch

            torch.cuda.is_available = lambda: count > 0
            torch.cuda.device_count = lambda: count
            torch.version.cuda = "12.4"
        return patch

    def device_of(requested):
        from distributed import get_worker

        from map2map.infer.worker import worker_state

        return get_worker().name, os.environ.get("CUDA_VISIBLE_DEVICES"), worker_state().device(requested)

    def as_dask_cuda(dask_worker):
        os.environ.pop(gpus.LOCAL_CLUSTER_ENV, None)
        os.environ["CUDA_VISIBLE_DEVICES"] = rotated(["0", "1"], dask_worker.name)

    def devices(client, requested):
        futures = [client.submit(device_of, requested, workers=[w], allow_other_workers=False, pure=False)
                   for w in sorted(client.scheduler_info()["workers"])]
        return sorted(f.result() for f in futures)

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}, silence_logs=logging.CRITICAL,
                      env={gpus.LOCAL_CLUSTER_ENV: "1"}) as cluster, \
            Client(cluster, set_as_default=False) as client:
        client.run(mock_gpus(2))
        register_state(client)
        assert devices(client, "cuda") == [(0, None, "cuda:0"), (1, None, "cuda:1")]
        assert [d for _, _, d in devices(client, "auto")] == ["cuda:0", "cuda:1"]
        assert [d for _, _, d in devices(client, "cpu")] == ["cpu", "cpu"]

        client.run(as_dask_cuda)
        chosen = devices(client, "cuda")
        assert [d for _, _, d in chosen] == ["cuda:0", "cuda:0"]
        assert sorted(physical(d, v, ["0", "1"]) for _, v, d in chosen) == ["0", "1"]  # distinct GPUs

        client.run(mock_gpus(0))
        assert [d for _, _, d in devices(client, "auto")] == ["cpu", "cpu"]
        with pytest.raises(UserError) as err:
            devices(client, "cuda")
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith("Dask worker ") and "--device cuda, but no GPU is visible" in msg
