"""`m2m train` on GPU clusters, tested on a CPU-only machine: device choice, mixed precision, compile,
SyncBatchNorm and TF32.

This machine has no GPU.  Where a test needs GPUs, only what torch reports about them is MOCKED (the
device count, whether CUDA starts, the build's CUDA version); every other part runs for real: the
launchers' environment variables are parsed by `dist_env`, training runs on real stores, checkpoints
are real files, DDP runs under a real torchrun with gloo.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from conftest import fails
from map2map import train
from map2map.cli import build_parser, main
from map2map.cli.configs import stage_of
from map2map.errors import UserError
from map2map.utils import precision
from map2map.utils.distenv import CudaInfo, DistEnv, choose_device, cuda_info, cuda_reason, dist_env, gpu_index
from stores import za_lpt_store

CALLBACKS = '''
from torch import nn


class Tiny(nn.Module):
    """Two 3-voxel convolutions (pad 2), with a BatchNorm between them if `bn`."""

    def __init__(self, in_chan, out_chan, mid=8, bn=False, **kwargs):
        super().__init__()
        norm = [nn.BatchNorm3d(mid)] if bn else []
        self.net = nn.Sequential(nn.Conv3d(in_chan, mid, 3), *norm, nn.LeakyReLU(0.2), nn.Conv3d(mid, out_chan, 3))

    def forward(self, x):
        return self.net(x)
'''

pytestmark = pytest.mark.usefixtures("torch_one_thread")

GPUS_OK = CudaInfo(torch_version="2.5.1+cu124", cuda="12.4", visible=4, usable=True)  # a mocked 4-GPU node
DRIVER_TOO_OLD = ("CUDA initialization: The NVIDIA driver on your system is too old (found version 11040). "
                  "Please update your GPU driver by downloading and installing a new version from the URL: "
                  "http://www.nvidia.com/Download/index.aspx Alternatively, go to: https://pytorch.org to install "
                  "a PyTorch version that has been compiled with your version of the CUDA driver. (Triggered "
                  "internally at /pytorch/c10/cuda/CUDAFunctions.cpp:109.)")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpu_train_data")
    (root / "cb").mkdir()
    (root / "cb" / "nets.py").write_text(CALLBACKS)
    return {"train": za_lpt_store(root, "train", 2, 1), "cb": root / "cb"}


def base(data, *extra: str, epochs: int = 2) -> list[str]:
    return ["train", "--train-data", str(data["train"]), "--in", "za", "--tgt", "lpt", "--crop", "8",
            "--in-pad", "2", "--in-norms", "cosmology.dis", "--tgt-norms", "cosmology.dis",
            "--model", "nets.Tiny", "--callback-at", str(data["cb"]), "--lr", "1e-2", "--batch-size", "2",
            "--loader-workers", "0", "--epochs", str(epochs), *extra]


def run(argv: list[str], run_dir: Path) -> train.TrainSummary:
    """`m2m train ARGV --run-dir RUN_DIR` through the CLI's own config builder."""
    module, config = stage_of(build_parser().parse_args([*argv, "--run-dir", str(run_dir)]))
    return module.run(config)


def state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def losses(summary: train.TrainSummary) -> list[float]:
    return [e.train_loss for e in summary.epochs]


# ---------------------------------------------------------------- rank -> device (GPU counts mocked)

def _devices(envs: list[dict[str, str]], cuda: CudaInfo) -> list[str]:
    return [choose_device("auto", dist_env(env).local_rank, cuda)[0] for env in envs]


def test_torchrun_four_local_ranks_on_four_gpus():
    envs = [{"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"} for r in range(4)]
    assert _devices(envs, GPUS_OK) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]


def _srun(node: int, local: int, tasks_per_node: int, nodes: int = 2) -> dict[str, str]:
    return {"SLURM_PROCID": str(node * tasks_per_node + local), "SLURM_LOCALID": str(local),
            "SLURM_NODEID": str(node), "SLURM_STEP_NUM_TASKS": str(nodes * tasks_per_node),
            "SLURM_STEP_TASKS_PER_NODE": f"{tasks_per_node}(x{nodes})", "SLURM_JOB_NODELIST": "gpu[01-02]",
            "SLURM_JOB_ID": "4242"}


def test_srun_gpus_per_task_one_each_task_uses_its_only_gpu():
    # srun --ntasks-per-node=4 --gpus-per-task=1: SLURM shows each task its own GPU alone
    envs = [_srun(node, local, 4) for node in (0, 1) for local in range(4)]
    own = CudaInfo(torch_version="2.5.1+cu124", cuda="12.4", visible=1, usable=True, visible_env="3")
    assert [dist_env(e).local_rank for e in envs] == [0, 1, 2, 3] * 2
    assert _devices(envs, own) == ["cuda:0"] * 8


def test_srun_gpus_per_node_shares_the_node_gpus_in_turn():
    # srun --ntasks-per-node=8 --gpus-per-node=4: every task sees the node's 4 GPUs
    envs = [_srun(node, local, 8) for node in (0, 1) for local in range(8)]
    assert _devices(envs, GPUS_OK) == [f"cuda:{local % 4}" for _ in (0, 1) for local in range(8)]


def test_no_gpu_means_cpu_without_a_note():
    for cuda in (CudaInfo(torch_version="2.5.1+cpu"),
                 CudaInfo(torch_version="2.5.1+cu124", cuda="12.4", visible=0, visible_env="")):
        assert choose_device("auto", 0, cuda) == ("cpu", None)
        assert choose_device("cpu", 3, cuda) == ("cpu", None)
    assert choose_device("cpu", 1, GPUS_OK) == ("cpu", None)


@given(st.integers(0, 1023), st.integers(1, 64))
def test_gpu_index_is_local_rank_modulo_visible(local_rank, visible):
    index = gpu_index(local_rank, visible)
    assert 0 <= index < visible and index == local_rank % visible
    if local_rank < visible:  # one process per GPU: each its own
        assert index == local_rank


def test_cuda_reason_keeps_the_gist_of_torch_warning():
    assert cuda_reason(DRIVER_TOO_OLD) == "The NVIDIA driver on your system is too old (found version 11040)"
    text = ("CUDA initialization: Unexpected error from cudaGetDeviceCount(). Did you run some cuda functions "
            "before calling NumCudaDevices() that might have already set an error? Error 804: forward "
            "compatibility was attempted on non supported HW (Triggered internally at x.cpp:1.)")
    assert cuda_reason(text) == ("Unexpected error from cudaGetDeviceCount() (Error 804: forward compatibility "
                                 "was attempted on non supported HW)")


def test_requested_cuda_that_cannot_start_names_the_reason():
    broken = CudaInfo(torch_version="2.5.1+cu124", cuda="12.4", visible=2, usable=False,
                      why=cuda_reason(DRIVER_TOO_OLD))
    with pytest.raises(UserError) as err:
        choose_device("cuda", 0, broken)
    msg = str(err.value)
    assert "\n" not in msg and "driver on your system is too old (found version 11040)" in msg
    assert "torch.version.cuda 12.4" in msg and "2 GPU(s) visible" in msg and "--device cpu" in msg
    device, note = choose_device("auto", 0, broken)  # auto falls back, but says why
    assert device == "cpu" and "too old" in note and "--device cuda makes this an error" in note
    with pytest.raises(UserError, match="no GPU is visible to this process .*CUDA_VISIBLE_DEVICES=''"):
        choose_device("cuda", 0, CudaInfo(torch_version="2.5.1+cu124", cuda="12.4", visible_env=""))


def test_two_processes_on_one_gpu_under_nccl_get_a_hint():
    nccl = RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1727, invalid usage (run with NCCL_DEBUG=WARN for "
                        "details), NCCL version 2.19.3\nncclInvalidUsage: This usually reflects invalid usage of "
                        "NCCL library.\nLast error:\nDuplicate GPU detected : rank 3 and rank 0 both on CUDA "
                        "device f000")
    text = train._process_group_error(nccl)
    assert "\n" not in text and text.startswith("NCCL error in: ProcessGroupNCCL.cpp:1727, invalid usage")
    assert "; Duplicate GPU detected : rank 3 and rank 0 both on CUDA device f000" in text
    assert "--dist-backend gloo" in text


def _mock_old_driver(monkeypatch, visible: int = 2) -> None:
    """torch as a CUDA build whose CUDA does not start on this node's driver (GPU count MOCKED)."""
    def is_available() -> bool:
        warnings.warn(DRIVER_TOO_OLD, UserWarning)
        return False

    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "is_available", is_available)


def test_cuda_info_reads_torch_warning(monkeypatch):
    _mock_old_driver(monkeypatch)
    info = cuda_info()
    assert (info.cuda, info.visible, info.usable) == ("12.4", 2, False)
    assert info.why == "The NVIDIA driver on your system is too old (found version 11040)"


def test_device_cuda_with_an_old_driver_is_one_line(data, tmp_path, capsys, monkeypatch):
    _mock_old_driver(monkeypatch)
    fails(capsys, [*base(data), "--device", "cuda", "--run-dir", str(tmp_path)],
          "--device cuda, but 2 GPU(s) visible but CUDA does not start: The NVIDIA driver on your system is too "
          "old (found version 11040)", "torch.version.cuda 12.4")
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a usable GPU")
def test_device_cuda_on_this_machine_is_exit_2_one_line(data, tmp_path, capsys):
    line = fails(capsys, [*base(data), "--device", "cuda", "--run-dir", str(tmp_path)], "--device cuda, but ",
                 f"torch.version.cuda {torch.version.cuda}", "GPU(s) visible", "--device cpu")
    assert line.startswith("m2m train: error: ")
    assert not any(tmp_path.iterdir())


def test_auto_device_trains_on_cpu_and_says_where(data, tmp_path, capsys):
    summary = run(base(data, epochs=1), tmp_path)
    out = capsys.readouterr().out
    assert summary.device == "cpu" and summary.backend is None and summary.amp == "off"
    assert "device cpu, one process" in out.splitlines()
    assert "precision: amp off, TF32 matmul off, cuDNN conv on (PyTorch's defaults; no effect on cpu)" in out
    saved = state(tmp_path / "state_1.pt")
    assert saved["scaler"] is None
    assert {k: saved["config"][k] for k in ("device", "amp", "compile", "sync_bn", "tf32")} == {
        "device": "auto", "amp": "off", "compile": False, "sync_bn": False, "tf32": None}


# ---------------------------------------------------------------- mixed precision

def test_bf16_learns_and_resumes(data, tmp_path, capsys):
    straight = run(base(data, "--amp", "bf16", epochs=3), tmp_path / "straight")
    out = capsys.readouterr().out
    assert "precision: amp bf16" in out
    assert losses(straight)[-1] < 0.5 * losses(straight)[0], losses(straight)
    first = run(base(data, "--amp", "bf16", epochs=2), tmp_path / "resumed")
    second = run(base(data, "--amp", "bf16", epochs=3), tmp_path / "resumed")
    assert [e.epoch for e in second.epochs] == [3] and second.start_epoch == 2
    assert "resuming from state_2.pt after epoch 2" in capsys.readouterr().out
    resumed = losses(first) + losses(second)
    assert all(torch.isfinite(torch.tensor(resumed)))
    assert resumed == pytest.approx(losses(straight), rel=1e-2)  # bitwise equality is promised for --amp off only
    saved = state(tmp_path / "resumed" / "state_3.pt")
    assert saved["config"]["amp"] == "bf16" and saved["scaler"] is None  # bf16 needs no loss scaling
    assert all(v.dtype == torch.float32 for v in saved["model"].values() if v.is_floating_point())


def test_fp16_on_cpu_trains_with_a_loss_scaler_that_resumes(data, tmp_path, capsys):
    """torch's CPU autocast runs float16 and its GradScaler works on CPU: fp16 is handled, not refused."""
    run(base(data, "--amp", "fp16", epochs=2), tmp_path)
    scaler = state(tmp_path / "state_2.pt")["scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] == 16  # 8 steps per epoch, none overflowed
    second = run(base(data, "--amp", "fp16", epochs=3), tmp_path)
    assert [e.epoch for e in second.epochs] == [3] and all(torch.isfinite(torch.tensor(losses(second))))
    assert state(tmp_path / "state_3.pt")["scaler"]["_growth_tracker"] == 24  # counted on from the checkpoint
    capsys.readouterr()
    run(base(data, "--amp", "off", epochs=4), tmp_path)  # a scaler state is simply not used without fp16
    assert state(tmp_path / "state_4.pt")["scaler"] is None
    run(base(data, "--amp", "fp16", epochs=5), tmp_path)
    assert "has no fp16 loss scaler state (written without --amp fp16); the scaler starts fresh" in \
        capsys.readouterr().out
    assert state(tmp_path / "state_5.pt")["scaler"]["_growth_tracker"] == 8


def test_autocast_off_is_no_context_at_all():
    assert not isinstance(precision.autocast(torch.device("cpu"), "off"), torch.autocast)
    with precision.autocast(torch.device("cpu"), "bf16"):
        assert nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.bfloat16
    assert precision.grad_scaler(torch.device("cpu"), "bf16") is None
    with pytest.raises(UserError, match="--amp 'fp8': expected one of off, bf16, fp16"):
        precision.check_amp("fp8")


# ---------------------------------------------------------------- compile

def test_compile_trains_and_its_checkpoint_loads_into_the_plain_model(data, tmp_path, capsys):
    compiled = run(base(data, "--compile"), tmp_path / "compiled")
    assert "torch.compile" in capsys.readouterr().out
    eager = run(base(data), tmp_path / "eager")
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-3)  # the same training, other kernels
    saved = state(tmp_path / "compiled" / "state_2.pt")
    assert saved["config"]["compile"] is True
    assert not any(k.startswith("_orig_mod") for k in saved["model"])
    sys.path.insert(0, str(data["cb"]))
    try:
        import nets
    finally:
        sys.path.remove(str(data["cb"]))
    plain = nets.Tiny(3, 3)
    plain.load_state_dict(saved["model"], strict=True)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, saved["model"][key]), key


def test_compile_without_a_cxx_compiler_is_one_line(data, tmp_path, capsys, monkeypatch):
    from torch._inductor import config

    monkeypatch.delenv("TORCH_INDUCTOR_INSTALL_GXX", raising=False)
    monkeypatch.setattr(config.cpp, "cxx", (None, str(tmp_path / "no-such-g++")))
    fails(capsys, [*base(data), "--compile", "--device", "cpu", "--run-dir", str(tmp_path / "run")],
          "--compile on cpu needs a C++ compiler")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- SyncBatchNorm

def test_sync_bn_is_refused_in_one_line_on_cpu(data, tmp_path, capsys):
    fails(capsys, [*base(data, "--misc-kwargs", '{"bn": true}'), "--sync-bn", "--run-dir", str(tmp_path / "r")],
          "--sync-bn needs GPUs", "this run is on cpu")
    assert not (tmp_path / "r").exists()


def test_torch_sync_batchnorm_cannot_run_on_cpu_under_gloo():
    """Why --sync-bn is refused on CPU: torch's SyncBatchNorm refuses CPU tensors once a process group
    exists (if a torch version lifts that, so can we)."""
    code = ("import torch, torch.distributed as dist\n"
            "dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)\n"
            "bn = torch.nn.SyncBatchNorm(2)\n"
            "try:\n"
            "    bn(torch.ones(2, 2, 3, 3, 3))\n"
            "except ValueError as exc:\n"
            "    print('refused:', exc)\n"
            "dist.destroy_process_group()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: SyncBatchNorm expected input tensor to be on GPU" in out.stdout


def test_sync_batchnorm_converts_under_ddp_and_keeps_state_names():
    model = nn.Sequential(nn.Conv3d(1, 4, 3), nn.BatchNorm3d(4), nn.Conv3d(4, 1, 1))
    said: list[str] = []
    synced = train.sync_batchnorm(model, DistEnv(world_size=2, local_world_size=2), said.append)
    assert isinstance(synced[1], nn.SyncBatchNorm) and synced[0].weight is model[0].weight
    assert said == ["--sync-bn: 1 BatchNorm layers use the batch statistics of all 2 processes"]
    plain = nn.Sequential(nn.Conv3d(1, 4, 3), nn.BatchNorm3d(4), nn.Conv3d(4, 1, 1))
    plain.load_state_dict(synced.state_dict(), strict=True)
    one = nn.Sequential(nn.Conv3d(1, 4, 3), nn.BatchNorm3d(4))
    assert train.sync_batchnorm(one, DistEnv(), said.append) is one and isinstance(one[1], nn.BatchNorm3d)
    assert said[-1] == "note: --sync-bn: one process; its BatchNorm layers stay as they are"


# ---------------------------------------------------------------- TF32

def test_tf32_is_set_for_the_run_printed_and_restored(data, tmp_path, capsys):
    before = precision.tf32_flags()
    run(base(data, "--tf32", "on", epochs=1), tmp_path / "on")
    assert "precision: amp off, TF32 matmul on, cuDNN conv on (--tf32 on; no effect on cpu)" in \
        capsys.readouterr().out
    assert precision.tf32_flags() == before
    with precision.tf32("off") as flags:
        assert flags == (False, False) == precision.tf32_flags()
    assert precision.tf32_flags() == before
    assert state(tmp_path / "on" / "state_1.pt")["config"]["tf32"] == "on"


def test_bad_device_options_are_one_line(data, tmp_path, capsys):
    config = train.TrainConfig(model="nets.Tiny", lr=1e-2, train_data=str(data["train"]), amp="fp8")
    with pytest.raises(UserError, match="--amp 'fp8'"):
        train.run(config)
    with pytest.raises(UserError, match="--device 'tpu'"):
        train.run(train.TrainConfig(model="nets.Tiny", lr=1e-2, device="tpu"))
    with pytest.raises(UserError, match="--tf32 'yes'"):
        train.run(train.TrainConfig(model="nets.Tiny", lr=1e-2, tf32="yes"))
    with pytest.raises(SystemExit):
        main([*base(data), "--amp", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


# ---------------------------------------------------------------- two processes

def test_two_process_ddp_with_bf16_says_device_and_backend(data, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "map2map.cli", *base(data, "--amp", "bf16")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "device cpu on rank 0, 2 processes (torchrun), backend gloo" in proc.stdout.splitlines()
    saved = state(work / "state_2.pt")
    assert saved["config"]["amp"] == "bf16" and len(saved["rng"]) == 2
    assert all(torch.isfinite(torch.tensor([e["train"] for e in saved["losses"]])))
