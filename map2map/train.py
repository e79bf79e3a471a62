"""`m2m train`: the training loop, in one process or many (torchrun / srun, DistributedDataParallel).

The flow, top to bottom in `run` (a `TrainConfig` in, a `TrainSummary` out):

0. Options out of range are refused (`check_config`) before anything else.
1. Where am I: rank, local rank and world size from torchrun's or SLURM's
   variables, and the device (``--device``; a GPU is ``local_rank %
   visible GPUs``, see `map2map.utils.distenv.choose_device`); the process
   group is created only when there are several processes (gloo on CPU, nccl
   on GPU), with ``--dist-timeout``.  Rank 0 alone prints, logs to TensorBoard
   and writes checkpoints.  Ranks fail together (`FailureBoard`): a rank
   whose training raises tells the others, which end at once instead of
   waiting in a collective for the process group's timeout.
1b. What to resume from (`agree_on_state`), before anything is written: each
   rank reads its state to resume (``--load-state``, default ``checkpoint.pt``
   in the run directory); several ranks compare epochs and file digests, and
   ranks that would resume from different states (node-local run
   directories) all stop with the same line.
2. Data: a `FieldDataset` per split (its items carry the styles the model
   takes, `choose_styles`), a `DistFieldSampler` over its crops
   (disjoint per rank, reshuffled from (seed, epoch)), a `DataLoader` whose
   workers live across epochs; the sampler's items carry their epoch to them
   (`map2map.data.sampler.EpochItem`), so augmentation still changes every epoch.
   The stores may be URLs (`map2map.storage`): the datasets carry
   ``--storage-options`` into every loader worker, and every rank parses
   them from its own command line.  Only the stores: the run directory is local.
3. Model, found by name and built as ``Model(in_chan, out_chan,
   scale_factor=..., **misc_kwargs)`` (keys neither the model nor a norm
   takes are refused, `map2map.models.build`); its total stride is checked
   against the crops, and its output against the target crop (``--in-pad
   auto`` finds the smallest pad that covers it).  A styled model (one with a
   ``style_size`` argument) is built with the number of style parameters and
   called as ``model(x, style)`` (`map2map.models.build.forward`), the styles
   normalised by the training store's style norm (`style_norm_for`), which
   the model card records.
   ``--sync-bn`` turns its BatchNorm layers into SyncBatchNorm under DDP.
4. Criterion (inside ``--loss``'s `LagEulLoss`, `build_loss`), optimizer, the
   optional ReduceLROnPlateau scheduler, and for
   ``--amp fp16`` a loss scaler (`map2map.utils.precision`); with
   ``--adv-model`` the adversary: a discriminator with its own criterion,
   optimizer and scheduler (`build_adversary`, `map2map.adversary`), which
   from epoch ``--adv-start`` on steps at every batch of `train_epoch` and
   gives the generator its loss.  Without it nothing of it is built or run.
   Nothing is written before here: a bad option leaves no trace.  Then rank 0
   takes the run directory's writer lock (`map2map.utils.locks`) and holds
   it to the end, so a second training in the same directory is refused.
5. State: the state agreed on in 1b restores model, optimizer, scheduler,
   loss scaler, the adversary and RNG states, or training starts fresh.  Then ``--compile``
   compiles the model in place (so its state_dict keeps the plain names) and
   DDP wraps it.
6. Epochs: train and validate (forward passes and losses under ``--amp``'s
   autocast), step the scheduler, log, write ``state_{epoch}.pt`` (with the
   model card, `map2map.modelfit.ModelCard`) and relink ``checkpoint.pt``, all
   in the run directory (``--run-dir``; never the process's working directory
   unless that is the run directory).  A checkpoint that cannot be written
   stops the run with one line naming the file and the system's reason.

Every source of randomness in an epoch derives from (seed, epoch) or from RNG
states saved in the checkpoint, so a resumed run continues exactly as an
uninterrupted one (bit-identical on CPU with one process and ``--amp off``).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import importlib.util
import inspect
import json
import math
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NoReturn, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from map2map import __version__, adversary, modelfit, storage, store
from map2map.data.batching import collate
from map2map.data import styles
from map2map.data.fields import FieldDataset
from map2map.data.sampler import DistFieldSampler
from map2map.errors import UserError, describe, is_resource_error, one_line, user_code_error
from map2map.models import add_spectral_norm, build_model, narrow_cast
from map2map.models.build import forward
from map2map.models.eulerian import LagEulLoss, LossTerms, check_loss, dis_norm_of
from map2map.stage import Summary
from map2map.utils import checkpoint as ckpt
from map2map.utils import precision
from map2map.utils.distenv import DEVICES, CudaInfo, DistEnv, choose_device, cuda_info, dist_env
from map2map.utils.locks import writer_lock
from map2map.utils.imports import import_attr


Pad = Any  # "auto", an int, or 1, d or 2d ints (see `map2map.geometry.parse_pad`)
DIST_TIMEOUT_S = 1800.0  # --dist-timeout's default: torch's default process group timeout (30 minutes)
STYLE_LOSS_DEFAULTS = {"style": None, "loss": "lag", "eul_weight": None}  # saved in the config only when set


@dataclass(frozen=True)
class TrainConfig:
    """Everything `m2m train` takes; field names are the command line's option names (see `m2m train --help`).

    `run_dir` holds everything the run writes: ``state_{epoch}.pt``,
    ``checkpoint.pt`` and the TensorBoard logs under ``runs/``.  `load_state`
    None means ``checkpoint.pt`` in `run_dir` (resumed when it exists); ``""``
    means start fresh; any other path must exist.  `device`, `amp`, `compile`,
    `sync_bn` and `tf32` say where and in what precision it runs (`tf32` None:
    PyTorch's defaults); the config is saved in every checkpoint.
    `dist_timeout` (seconds) bounds every wait of the process group: the
    rendezvous of all ranks at the start and each collective, e.g. the
    barrier where the other ranks wait while rank 0 writes a checkpoint.  Its
    default is torch's own default; a rank that raises ends the others at
    once whatever the timeout (`FailureBoard`), so it matters only for a rank
    that dies silently (killed, out of memory) under nccl, or a real hang.
    `style` names the style parameters a styled model takes (`choose_styles`),
    `loss` and `eul_weight` choose the loss (`build_loss`); at their defaults
    they are left out of the config saved in checkpoints.
    `train_data` and `val_data` are store locations, local paths or URLs
    (`map2map.storage`); `storage_options` (a dict, or the
    ``--storage-options`` JSON text) open the URL ones, here and in every
    loader worker and process (the datasets carry them).  They are never
    saved in checkpoints (they may hold credentials).  `run_dir` and
    `load_state` are local paths.
    """

    model: str
    lr: float
    train_data: str | None = None
    val_data: str | None = None
    storage_options: Mapping[str, Any] | None = None
    in_fields: tuple[str, ...] | None = None
    tgt_fields: tuple[str, ...] | None = None
    train_in_patterns: tuple[str, ...] | None = None
    train_tgt_patterns: tuple[str, ...] | None = None
    val_in_patterns: tuple[str, ...] | None = None
    val_tgt_patterns: tuple[str, ...] | None = None
    in_norms: tuple[str, ...] | None = None
    tgt_norms: tuple[str, ...] | None = None
    crop: tuple[int, ...] | None = None
    crop_start: tuple[int, ...] | None = None
    crop_stop: tuple[int, ...] | None = None
    crop_step: tuple[int, ...] | None = None
    in_pad: Pad = 0
    tgt_pad: Pad = 0
    scale_factor: int = 1
    augment: bool = False
    aug_shift: tuple[int, ...] | None = None
    aug_add: float | None = None
    aug_mul: float | None = None
    batch_size: int = 1
    loader_workers: int = 2
    readahead: float | None = None  # MiB; None: the dataset's default (two items)
    div_data: bool = False
    div_shuffle_dist: float = 1
    criterion: str = "MSELoss"
    optimizer: str = "Adam"
    optimizer_args: Mapping[str, Any] = field(default_factory=dict)
    reduce_lr_on_plateau: bool = False
    scheduler_args: Mapping[str, Any] = field(default_factory=dict)
    init_weight_std: float | None = None
    misc_kwargs: Mapping[str, Any] = field(default_factory=dict)
    callback_at: str | None = None
    epochs: int = 128
    seed: int = 42
    run_dir: str = "."
    load_state: str | None = None
    load_state_strict: bool = True
    dist_backend: str | None = None
    dist_timeout: float = DIST_TIMEOUT_S
    log_interval: int = 100
    detect_anomaly: bool = False
    device: str = "auto"
    amp: str = "off"
    compile: bool = False
    sync_bn: bool = False
    tf32: str | None = None
    # the adversary (`map2map.adversary`); all off without adv_model
    adv_model: str | None = None
    adv_model_spectral_norm: bool = False
    adv_criterion: str = "BCEWithLogitsLoss"
    adv_lr: float | None = None  # None: --lr
    adv_optimizer_args: Mapping[str, Any] | None = None  # None: --optimizer-args
    adv_start: int = 0
    adv_iter_ratio: int = 1
    adv_weight: float | None = None  # None: the adversarial loss alone once the adversary is active
    adv_label_smoothing: float = 1.0
    adv_r1_reg_interval: int = 0
    adv_r1_reg_gamma: float = 2.0
    adv_wgan_gp_interval: int = 0
    cgan: bool = False
    instance_noise: float = 0.0
    instance_noise_batches: int = 10000
    # styles and the loss (`choose_styles`, `build_loss`); saved in checkpoints only where not the default
    style: tuple[str, ...] | None = None  # None: all of the store's for a styled model, none for another
    loss: str = "lag"
    eul_weight: float | None = None

    def __post_init__(self) -> None:
        if self.style is not None:
            text = self.style if isinstance(self.style, str) else ",".join(self.style)
            object.__setattr__(self, "style", styles.parse_names(text))
        if self.storage_options is not None:
            object.__setattr__(self, "storage_options", _storage_dict(self.storage_options))
        for name in ("optimizer_args", "scheduler_args", "misc_kwargs"):
            object.__setattr__(self, name, _json_dict(getattr(self, name), "--" + name.replace("_", "-")))
        if self.adv_optimizer_args is not None:
            object.__setattr__(self, "adv_optimizer_args", _json_dict(self.adv_optimizer_args,
                                                                      "--adv-optimizer-args"))

    @property
    def state_path(self) -> str:
        """The state to resume from ('' for none)."""
        return os.path.join(self.run_dir, ckpt.CKPT_LINK) if self.load_state is None else self.load_state


@dataclass
class EpochRecord:
    """One epoch as `m2m train` logged it (losses are means over all ranks' items)."""

    epoch: int
    train_loss: float
    val_loss: float | None
    lr: float
    items_per_s: float
    data_wait: float
    batch_losses: list[tuple[int, float]]
    checkpoint: str | None = None
    first_batch_s: float = 0.0  # seconds from the epoch's start to its first training batch
    adv: dict[str, float] | None = None  # the adversary's epoch means (`map2map.adversary`), when it was active
    loss_terms: dict[str, float] | None = None  # with --loss eul / lag_eul: "train/lag", "train/eul", "val/..."

    def __getitem__(self, key: str) -> Any:  # records read like the dicts they were
        return getattr(self, key)


@dataclass
class TrainSummary(Summary):
    """What a training run did (on every rank; only rank 0 wrote files)."""

    run_dir: str
    start_epoch: int
    epochs: list[EpochRecord]
    in_pad: list[list[int]]
    total_stride: int
    parameters: int
    world_size: int
    device: str
    checkpoint: str | None
    seconds: float
    backend: str | None = None
    amp: str = "off"

    @property
    def history(self) -> list[EpochRecord]:
        return self.epochs


# ---------------------------------------------------------------- 1. processes and devices


def _no_cxx_compiler() -> bool:
    """Whether torch's inductor finds no C++ compiler, by its own search (False where a torch lacks that
    search: its compile then names the missing compiler itself)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.exc import InvalidCxxCompiler
    except ImportError:
        return False
    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        return True
    return False


def check_device_options(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse ``--sync-bn`` and ``--compile`` where they cannot run (one line, before any process group)."""
    if cfg.sync_bn and device.type != "cuda":
        raise UserError(f"--sync-bn needs GPUs: torch's SyncBatchNorm synchronizes only GPU tensors, and this run "
                        f"is on {device.type}; leave out --sync-bn")
    if cfg.compile and device.type == "cpu" and _no_cxx_compiler():
        raise UserError("--compile on cpu needs a C++ compiler (torch's inductor looks for $CXX, else g++): "
                        "install one, or leave out --compile")
    if cfg.compile and device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise UserError("--compile on GPUs needs triton (torch's inductor generates triton kernels): "
                        "pip install triton, or leave out --compile")


def _process_group_error(exc: BaseException) -> str:
    """The first line of a process group's error, with NCCL's "Last error" line and a hint for two
    processes on one GPU."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    for i, line in enumerate(lines[:-1]):
        if line.startswith("Last error"):
            text += f"; {lines[i + 1]}"
    if "Duplicate GPU" in text:
        text += (" (nccl needs a GPU per process: start at most as many processes per node as GPUs, or use "
                 "--dist-backend gloo)")
    elif "timed out" in text.lower():
        text += (" (--dist-timeout: did every process start, with the same MASTER_ADDR, MASTER_PORT and "
                 "WORLD_SIZE?)")
    return text


def setup_processes(cfg: TrainConfig) -> tuple[DistEnv, torch.device, str | None, list[str]]:
    """Find this process's rank, pick its device (`map2map.utils.distenv.choose_device`), and join the process
    group when there are several processes; returns (place, device, backend or None, notes for the log)."""
    env = dist_env()
    name, note = choose_device(cfg.device, env.local_rank, cuda_info() if cfg.device != "cpu" else CudaInfo())
    device = torch.device(name)
    check_device_options(cfg, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # crops have one fixed size: let cuDNN pick the fastest kernels
    elif env.local_world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // env.local_world_size))
    backend = None
    if env.distributed:
        backend = cfg.dist_backend or ("nccl" if device.type == "cuda" else "gloo")
        # nccl told its device starts at once (so two processes on one GPU are refused here) and barriers
        # know the device
        bind = {"device_id": device} if backend == "nccl" and "device_id" in inspect.signature(
            dist.init_process_group).parameters else {}
        try:
            dist.init_process_group(backend=backend, init_method="env://", rank=env.rank,
                                    world_size=env.world_size, timeout=timedelta(seconds=cfg.dist_timeout),
                                    **bind)
        except (RuntimeError, ValueError) as exc:  # DistBackendError is a RuntimeError
            raise UserError(f"cannot start the {backend} process group for rank {env.rank} of "
                            f"{env.world_size}: {_process_group_error(exc)}") from None
    return env, device, backend, [note] if note else []


def _place(env: DistEnv, device: torch.device, backend: str | None) -> str:
    """Where this run runs, for the log: device, GPU name, processes and backend."""
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    if not env.distributed:
        return f"device {device}{gpu}, one process"
    return f"device {device}{gpu} on rank 0, {env.world_size} processes ({env.launcher}), backend {backend}"


# ---------------------------------------------------------------- 1. ranks that fail together

POLL_S = 0.5  # how often every rank looks at the failure board
TELL_S = 5.0  # how long a failing rank waits for the others to have seen its failure
GRACE_S = 10.0  # how long a stopping rank waits for the failed rank to exit, or for its own normal end

# gloo's words for a peer process that went away in the middle of a collective
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


class AllRanksError(UserError):
    """A `UserError` that every rank raises at the same point, after comparing notes with the others (e.g.
    ranks that would resume from different states): no rank needs to be told of it by another."""


def lost_peer(exc: BaseException) -> bool:
    """Whether `exc` is what a collective raises on this rank when another rank's process has ended (gloo
    notices the closed connection at once; nccl does not notice, see `FailureBoard`)."""
    return isinstance(exc, RuntimeError) and any(words in str(exc) for words in _PEER_GONE)


def failure_line(exc: BaseException) -> str:
    """`exc` in one line, as another rank reports it: a `UserError`'s message, the user's file and line
    for an error in the user's code, else ``Type: message``."""
    if isinstance(exc, UserError):
        return one_line(str(exc))
    code_error = user_code_error(exc)
    return str(code_error) if code_error is not None else describe(exc)


def _say_and_end(line: str, wait: Callable[[], None] | None = None) -> NoReturn:
    """Print `line` on stderr, call `wait`, and end this process at once with status 1: no cleanup, because
    the main thread may be blocked in a collective that would wait for the process group's timeout."""
    with contextlib.suppress(OSError, ValueError):  # a closed stream: nobody left to tell
        sys.stdout.flush()
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    if wait is not None:
        wait()
    os._exit(1)


class FailureBoard:
    """Where the ranks of one run tell each other that they failed, so that all of them stop at once.

    A *board* is a few keys in the rendezvous store that every rank joined
    (torch's TCPStore at MASTER_ADDR:MASTER_PORT: torchrun's agent hosts it,
    under srun rank 0 does), under a prefix of this run and restart; each
    rank reads it through a connection of its own.

    * A rank whose training raises (`fail`) posts its error in one line
      (`failure_line`) as the run's failure, unless another rank posted
      first, and waits up to `TELL_S` until every other rank has seen it;
      then its exception goes on to the command line, which prints it, and
      at exit the rank marks itself exited.
    * A *watcher* thread in every rank looks at the board every `POLL_S`.
      On another rank's failure it says ``m2m train: error: rank N failed:
      LINE; rank M stops too`` on stderr, waits up to `GRACE_S` for the
      failed rank to mark itself exited (so that it has printed its own
      error before torchrun, seeing this rank end, ends it), and ends its
      process with status 1 (`_say_and_end`).  This works for every backend
      and wherever the main thread waits: nccl, unlike gloo, does not notice
      a peer that has gone, and would wait for the timeout.
    * A rank whose own error only echoes another's failure (gloo's lost
      connection, `lost_peer`) reports that failure instead of its echo.
    * At a normal end every rank stops its watcher (`stop`) before any rank
      leaves (a barrier): under srun rank 0's exit takes the store with it.
      A watcher that loses the store otherwise (its host ended) waits
      `GRACE_S` for its own rank to stop, else says so and ends with 1.
    * `AllRanksError`s are not posted: every rank raises them at once.

    A rank that dies without raising (killed, out of memory) posts nothing:
    under gloo the others' collectives fail at once (and say so), under nccl
    they wait for ``--dist-timeout``; torchrun, and srun with
    ``--kill-on-bad-exit=1``, end them as soon as a rank exits non-zero.
    (When the store's host is the one that died, torch also prints its own
    warning about the lost connection.)
    """

    def __init__(self, rank: int, world_size: int, timeout: float,
                 environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self.rank, self.world_size = rank, world_size
        self.address = f"{environ['MASTER_ADDR']}:{environ['MASTER_PORT']}"
        # a new store per torchrun restart in current torch; the prefix keeps restarts apart in any case
        self._prefix = f"m2m-train/{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self._store = dist.TCPStore(environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), is_master=False,
                                    timeout=timedelta(seconds=timeout), wait_for_workers=False)
        self._stopped, self._failing = threading.Event(), threading.Event()
        self._ending = threading.Lock()  # taken by the one thread that ends this process
        self._watcher = threading.Thread(target=self._watch, name="m2m-failure-board", daemon=True)
        self._watcher.start()

    def _key(self, name: str) -> str:
        return self._prefix + name

    def _first(self) -> tuple[int, str]:
        """(rank, line) of the run's first failure (posted: the failure count is above 0)."""
        rank, _, line = self._store.get(self._key("failure")).decode().partition("\t")
        return int(rank), line

    def stop(self) -> None:
        """This rank ends normally, or with an error every rank raises: the watcher stops."""
        self._stopped.set()

    def fail(self, exc: BaseException, echo: bool = False) -> None:
        """Tell the other ranks that this one failed with `exc` (see the class docstring).

        `echo`: `exc` may only be the consequence of another rank's failure;
        if another rank posted first, this process says so and ends here.
        """
        if isinstance(exc, AllRanksError):
            self.stop()
            return
        self._failing.set()
        try:
            if self._store.add(self._key("failures"), 1) > 1:
                rank, line = self._first()
                if echo and rank != self.rank:
                    self._peer_failed(rank, line)
                return
            self._store.set(self._key("failure"), f"{self.rank}\t{failure_line(exc)}")
            atexit.register(self._mark_exited)
            deadline = time.monotonic() + TELL_S
            while (self._store.add(self._key("seen"), 0) < self.world_size - 1
                   and time.monotonic() < deadline):
                time.sleep(0.05)
        except RuntimeError:  # torch's store errors: the store's host ended, nobody left to tell
            return

    def _mark_exited(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._store.set(self._key("exited"), "1")

    def _watch(self) -> None:
        while not self._stopped.wait(POLL_S):
            try:
                if self._store.add(self._key("failures"), 0) == 0:
                    continue
                rank, line = self._first()
                if rank == self.rank:
                    return
                self._store.add(self._key("seen"), 1)
            except RuntimeError:
                if self._stopped.wait(GRACE_S):
                    return
                self._end(f"m2m train: error: lost the rendezvous store at {self.address} (its host, rank 0 "
                          f"or torchrun, ended); rank {self.rank} stops too")
            if self._failing.is_set():
                return  # this rank fails by itself and says why
            self._peer_failed(rank, line)

    def _peer_failed(self, rank: int, line: str) -> NoReturn:
        """Say that `rank` failed, give it time to exit first, and end this process."""
        self._end(f"m2m train: error: rank {rank} failed: {line}; rank {self.rank} stops too", self._wait_exit)

    def _wait_exit(self) -> None:
        """Wait up to `GRACE_S` for the failed rank to mark itself exited."""
        deadline = time.monotonic() + GRACE_S
        with contextlib.suppress(RuntimeError):  # the store's host (the failed rank) has ended
            while not self._store.check([self._key("exited")]) and time.monotonic() < deadline:
                time.sleep(0.05)

    def _end(self, line: str, wait: Callable[[], None] | None = None) -> NoReturn:
        if not self._ending.acquire(blocking=False):
            threading.Event().wait()  # the other thread of this process is ending it
        _say_and_end(line, wait)


def tell_others(exc: BaseException, env: DistEnv, board: FailureBoard | None) -> None:
    """Before `exc` leaves this rank: post it on the board (`FailureBoard.fail`).  A collective's error for
    a lost connection to another rank is raised instead as a `UserError` saying so (unless another rank
    posted its failure first: then this process ends saying that)."""
    echo = env.distributed and lost_peer(exc)
    error = exc
    if echo:
        error = UserError(f"rank {env.rank} lost its connection to another rank, which ended without saying why "
                          f"(killed? out of memory? see its log): {one_line(str(exc)).split('. ')[0]}")
    if board is not None:
        board.fail(error, echo=echo)
    if echo:
        raise error from None


# ---------------------------------------------------------------- 2. data


def _json_dict(value: Any, option: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise UserError(f"{option} is not JSON ({exc.msg} at column {exc.colno}): {value!r}") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{option} must be a JSON object like '{{\"key\": 1}}', got {value!r}")
    return dict(value)


def _storage_dict(value: Any) -> dict[str, Any]:
    """Storage options as the config keeps them: a dict, from a dict or the ``--storage-options`` JSON text."""
    if isinstance(value, str):
        return storage.parse_options(value)
    if not isinstance(value, Mapping):
        raise UserError(f"--storage-options must be a JSON object like '{{\"anon\": true}}', got {value!r}")
    return dict(value)


def open_train_store(cfg: TrainConfig) -> store.Store:
    """The training store (``--train-data``), opened with the run's storage options."""
    return store.open_store(cfg.train_data, storage_options=cfg.storage_options)


_DATASET_KEYS = set(inspect.signature(FieldDataset.__init__).parameters) - {"self", "kwargs"}


def make_dataset(cfg: TrainConfig, split: str, in_pad: Any, seed: int, fields_only: bool = False,
                 style_names: Sequence[str] | None = None) -> FieldDataset | None:
    """The training or validation dataset from a store (``--train-data``) or .npy globs; None for no val.

    `fields_only`: whole fields, no pads or crop options (which are per axis),
    to learn the data's dimension first.  `style_names`: the style parameters
    its items carry (`choose_styles`; None: none)."""
    path = getattr(cfg, f"{split}_data")
    in_patterns = getattr(cfg, f"{split}_in_patterns")
    tgt_patterns = getattr(cfg, f"{split}_tgt_patterns")
    flag = f"--{split}-data"
    if path is None and not in_patterns:
        if split == "val":
            if tgt_patterns:
                raise UserError("--val-tgt-patterns needs --val-in-patterns")
            return None
        raise UserError("no training data: give --train-data STORE --in NAME --tgt NAME, "
                        "or --train-in-patterns and --train-tgt-patterns")
    if path is not None and (in_patterns or tgt_patterns):
        raise UserError(f"give {flag} or --{split}-in-patterns/--{split}-tgt-patterns, not both")
    if path is not None and not cfg.in_fields:
        raise UserError(f"{flag} needs the input field names: --in NAME[,NAME]")
    if (path is not None and not cfg.tgt_fields) or (path is None and not tgt_patterns):
        raise UserError(f"training needs targets: give --tgt NAME[,NAME] with {flag}, "
                        f"or --{split}-tgt-patterns")
    training = split == "train"
    norm_kwargs = cfg.misc_kwargs
    clash = sorted(set(norm_kwargs) & _DATASET_KEYS)
    if clash:
        raise UserError(f"--misc-kwargs keys {clash} clash with data set arguments; use the options instead")
    return FieldDataset(
        store=path, in_fields=cfg.in_fields if path else None, tgt_fields=cfg.tgt_fields if path else None,
        in_patterns=in_patterns, tgt_patterns=tgt_patterns,
        **({} if fields_only else dict(crop=cfg.crop, crop_start=cfg.crop_start, crop_stop=cfg.crop_stop,
                                       crop_step=cfg.crop_step, in_pad=in_pad, tgt_pad=cfg.tgt_pad)),
        scale_factor=cfg.scale_factor,
        augment=cfg.augment and training, aug_shift=cfg.aug_shift if training and not fields_only else None,
        aug_add=cfg.aug_add if training else None, aug_mul=cfg.aug_mul if training else None,
        in_norms=cfg.in_norms, tgt_norms=cfg.tgt_norms, callback_at=cfg.callback_at, seed=seed,
        readahead=None if cfg.readahead is None or fields_only else int(cfg.readahead * 2**20),
        storage_options=cfg.storage_options,
        **({} if style_names is None else {"styles": tuple(style_names)}), **norm_kwargs)


def make_loader(ds: FieldDataset, cfg: TrainConfig, env: DistEnv, device: torch.device,
                training: bool) -> tuple[DataLoader, DistFieldSampler]:
    """The loader of one split and its sampler (call the sampler's ``set_epoch`` before each epoch).

    Loader workers live across epochs (``persistent_workers``): they start
    once, at the first epoch, keep their readers' caches, and end with the
    run (`end_workers`).  The sampler
    yields `EpochItem`s, so each item's augmentation follows its epoch in the
    workers as in this process.  The loader draws its workers' seeds from a
    generator of its own (from seed, rank and split), not from torch's global
    one: a resumed run starts its iterators at another epoch than an
    uninterrupted one, and must not shift the global stream (dropout) by it."""
    sampler = DistFieldSampler(ds.nsample, ds.crop_counts, shuffle=training, div_data=cfg.div_data,
                               div_shuffle_dist=cfg.div_shuffle_dist, seed=cfg.seed,
                               rank=env.rank, world_size=env.world_size, epoch_items=True)
    ds.follow(sampler, cfg.batch_size)  # read ahead in the order this process (and each worker) is asked
    seed = np.random.SeedSequence([cfg.seed % 2**64, env.rank, int(training)]).generate_state(1, np.uint64)[0]
    generator = torch.Generator().manual_seed(int(seed))
    loader = DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.loader_workers,
                        collate_fn=collate, pin_memory=device.type == "cuda",
                        persistent_workers=cfg.loader_workers > 0, generator=generator)
    return loader, sampler


def end_workers(loader: DataLoader) -> None:
    """End `loader`'s workers now.  Torch ends persistent workers when the loader's iterator is collected,
    which a reference cycle anywhere in the run can put off past its end; processes forked meanwhile (the
    next run's workers) would inherit the iterator, and collecting it there fails."""
    iterator = getattr(loader, "_iterator", None)  # torch's own names: no public way to end persistent workers
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None


# ---------------------------------------------------------------- 3. model and geometry


def init_weight_std(model: nn.Module, std: float) -> None:
    """Draw convolution / linear weights from N(0, std) and affine norm scales from N(1, std), biases 0."""
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
                m.weight.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, norms) and getattr(m, "weight", None) is not None:
                m.weight.normal_(1.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()


def sync_batchnorm(model: nn.Module, env: DistEnv, say) -> nn.Module:
    """``--sync-bn``: `model` with its BatchNorm layers turned into SyncBatchNorm, which normalize with the
    batch statistics of all processes together (same parameters, same state_dict names), when there are
    several processes; otherwise `model` as it is, with a note."""
    count = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if count == 0:
        say("note: --sync-bn: the model has no BatchNorm layers; nothing to synchronize")
        return model
    if not env.distributed:
        say("note: --sync-bn: one process; its BatchNorm layers stay as they are")
        return model
    say(f"--sync-bn: {count} BatchNorm layers use the batch statistics of all {env.world_size} processes")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


# ---------------------------------------------------------------- 4. criterion, optimizer, scheduler


def build_optim(cfg: TrainConfig, model: nn.Module, adv: bool = False
                ) -> tuple[nn.Module, torch.optim.Optimizer, Any, list[str]]:
    """Criterion, optimizer, scheduler (or None) and notes for the generator, or with `adv` for the
    discriminator: ``--adv-criterion`` (also found in `map2map.models`, e.g. WDistLoss), the same optimizer
    with ``--adv-lr`` and ``--adv-optimizer-args`` (each defaulting to the generator's)."""
    notes = []
    crit_name, lr, opt_args = cfg.criterion, cfg.lr, dict(cfg.optimizer_args)
    crit_option, lr_option, args_option = "--criterion", "lr", "--optimizer-args"
    places = ["torch.nn"]
    if adv:
        crit_name, crit_option, places = cfg.adv_criterion, "--adv-criterion", ["torch.nn", "map2map.models"]
        lr, lr_option = (cfg.lr, "lr") if cfg.adv_lr is None else (cfg.adv_lr, "--adv-lr")
        if cfg.adv_optimizer_args is not None:
            opt_args, args_option = dict(cfg.adv_optimizer_args), "--adv-optimizer-args"
    crit_cls = import_attr(crit_name, places, cfg.callback_at, what="adversarial criterion" if adv else "criterion")
    try:
        criterion = crit_cls()
    except TypeError as exc:
        raise UserError(f"cannot build {crit_option} {crit_name}(): {exc}") from None
    opt_cls = import_attr(cfg.optimizer, ["torch.optim"], cfg.callback_at, what="optimizer")
    try:
        optimizer = opt_cls(model.parameters(), lr=lr, **opt_args)
    except (TypeError, ValueError) as exc:
        raise UserError(f"cannot build --optimizer {cfg.optimizer} with {lr_option}={lr} and "
                        f"{args_option} {json.dumps(opt_args)}: {exc}") from None
    scheduler = None
    if cfg.reduce_lr_on_plateau:
        sched_args = dict(cfg.scheduler_args)
        if "verbose" in sched_args:  # removed from torch; lr changes are printed anyway
            sched_args.pop("verbose")
            notes.append("--scheduler-args 'verbose' is no longer a torch option; ignored (lr changes are printed)")
        try:
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **sched_args)
        except (TypeError, ValueError) as exc:
            raise UserError(f"cannot build ReduceLROnPlateau with --scheduler-args {json.dumps(sched_args)}: "
                            f"{exc}") from None
    return criterion, optimizer, scheduler, notes


def build_adversary(cfg: TrainConfig, env: DistEnv, device: torch.device, train_ds: FieldDataset,
                    out_shape: Sequence[int]) -> adversary.Adversary | None:
    """``--adv-model``: the discriminator (``Model(target channels [+ input channels with --cgan], 1)``,
    found by name like the generator, spectral norm on its layers with ``--adv-model-spectral-norm``), its
    criterion, optimizer and scheduler (`build_optim`); None without it.  Built from a seed of its own
    inside a forked RNG, so the global random streams are those of a run without it.  It must score the
    samples it will see (the output narrowed to the target crop): tried once on zeros, in eval mode (which
    changes no statistics), so a discriminator too deep for the crop is one line here."""
    if cfg.adv_model is None:
        return None
    import_attr(cfg.adv_model, ["map2map.models"], cfg.callback_at, what="discriminator")
    in_chan = sum(train_ds.tgt_chan) + (sum(train_ds.in_chan) if cfg.cgan else 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        model = build_model(cfg.adv_model, in_chan, 1, scale_factor=1, ndim=train_ds.ndim, kwargs={},
                            callback_at=cfg.callback_at, option="--adv-model")
        if cfg.adv_model_spectral_norm:
            add_spectral_norm(model)
    model.to(device)
    tgt = [c * cfg.scale_factor + lo + hi for c, (lo, hi) in zip(train_ds.crop, train_ds.tgt_pad)]
    shape = [min(o, t) for o, t in zip(out_shape, tgt)]
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chan, *shape, device=device))
    except RuntimeError as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--adv-model {cfg.adv_model} cannot score samples of {in_chan} channels and shape {shape} "
                        f"(the output narrowed to the target crop): {why}; give a larger --crop or a shallower "
                        "discriminator") from None
    model.train()
    criterion, optimizer, scheduler, _ = build_optim(cfg, model, adv=True)
    criterion.to(device)
    return adversary.Adversary(cfg, model, criterion, optimizer, scheduler, env.distributed)


# ---------------------------------------------------------------- 5. state


@dataclass(frozen=True)
class StateSeen:
    """What one rank finds to resume from, compared across ranks (`agree_on_state`).

    `kind` is "fresh" (nothing to resume: ``--load-state ''``, or the run
    directory's ``checkpoint.pt`` missing or empty), "state" (a state after
    `epoch` epochs; `digest` is the SHA-256 of its file when ranks compare)
    or "error" (`error` says why the state named cannot be used).
    """

    kind: str
    epoch: int | None = None
    digest: str | None = None
    error: str | None = None

    def text(self) -> str:
        if self.kind == "state":
            return f"epoch {self.epoch}" + (f" (file sha256 {self.digest[:12]})" if self.digest else "")
        return "nothing (a fresh start)" if self.kind == "fresh" else f"an unusable state ({self.error})"


def _file_digest(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**22):
            sha.update(chunk)
    return sha.hexdigest()


def read_resume_state(cfg: TrainConfig, digest: bool = False) -> tuple[dict[str, Any] | None, StateSeen]:
    """This rank's state to resume (`TrainConfig.state_path`, loaded on the CPU; None: start fresh) and what
    it found (`StateSeen`; with `digest`, the file's SHA-256).  The default ``checkpoint.pt`` of the run
    directory may be missing (a new run); an explicitly named state must exist."""
    path = cfg.state_path
    if cfg.load_state and not os.path.isfile(cfg.load_state):
        why = "is a directory" if os.path.isdir(cfg.load_state) else "does not exist"
        return None, StateSeen("error", error=f"--load-state {cfg.load_state} {why} (leave the option out to "
                                              f"resume from {ckpt.CKPT_LINK} in the run directory, or give '' "
                                              "to start fresh)")
    try:
        # on the CPU: load_state_dict copies onto the model's device, and RNG states stay CPU tensors
        state = ckpt.read_state(path, map_location="cpu") if path else None
    except UserError as exc:
        return None, StateSeen("error", error=one_line(str(exc)))
    if state is None:
        return None, StateSeen("fresh")
    return state, StateSeen("state", int(state["epoch"]), _file_digest(path) if digest else None)


def _rank_ranges(ranks: Sequence[int]) -> str:
    """``rank 3`` or ``ranks 0-2,5`` (sorted ranks, runs of consecutive ones as ranges)."""
    runs: list[list[int]] = []
    for r in ranks:
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    text = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    return f"rank {text}" if len(ranks) == 1 else f"ranks {text}"


def agree_on_state(cfg: TrainConfig, env: DistEnv) -> dict[str, Any] | None:
    """The state to resume (None: start fresh), the same on every rank, or a one-line error on every rank.

    With several processes, every rank reads its own state (node-local run
    directories may hold different ones) and the ranks compare what they
    found, epoch and file digest: rank 0's choice holds only where every rank
    found the same.  Otherwise, or when the state named is unusable, every rank
    raises the same `AllRanksError` (a `UserError` for one process).
    """
    state, mine = read_resume_state(cfg, digest=env.distributed)
    error = UserError
    if env.distributed:
        error = AllRanksError
        seen: list[Any] = [None] * env.world_size
        dist.all_gather_object(seen, mine)
        if any(s != seen[0] for s in seen):
            groups: dict[StateSeen, list[int]] = {}
            for rank, s in enumerate(seen):
                groups.setdefault(s, []).append(rank)
            found = "; ".join(f"{_rank_ranges(ranks)}: {s.text()}" for s, ranks in groups.items())
            raise AllRanksError(
                f"the ranks would resume from different states in {cfg.state_path or '(none)'}: {found}; give "
                "every rank the same run directory (--run-dir on a shared file system) or the same --load-state "
                "file, or start all fresh with --load-state ''")
    if mine.kind == "error":
        raise error(mine.error)
    return state


def restore(cfg: TrainConfig, state: dict[str, Any] | None, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: Any, env: DistEnv, say, scaler: torch.amp.GradScaler | None = None
            ) -> tuple[int, float | None, list[dict[str, Any]]]:
    """Restore `state` (from `agree_on_state`; None: start fresh); return (start epoch, best loss, the
    per-epoch losses so far).

    The loss scaler of ``--amp fp16`` continues from the state's ``scaler`` entry; a state written
    in another amp mode has none, and the scaler starts fresh.
    """
    path = cfg.state_path
    if state is None:
        why = "no --load-state" if not path else f"{path} is missing or empty"
        say(f"starting fresh ({why})")
        if cfg.init_weight_std is not None:
            init_weight_std(model, cfg.init_weight_std)
        return 0, None, []
    shown = os.path.realpath(path) if os.path.islink(path) else path
    problems = modelfit.load_model_state(model, state["model"], cfg.load_state_strict, source=path)
    for p in problems:
        say(f"note: --load-state-non-strict: {p}")
    if problems:
        say("note: model states differ, so the optimizer and scheduler start fresh")
    else:
        try:
            if state.get("optimizer") is not None:
                optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None and state.get("scheduler") is not None:
                scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, TypeError) as exc:
            if cfg.load_state_strict:
                raise UserError(f"the optimizer state in {path} does not fit --optimizer {cfg.optimizer}: {exc} "
                                "(use --load-state-non-strict to start the optimizer fresh)") from None
            say(f"note: optimizer state not loaded ({exc})")
        if scaler is not None:
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            else:
                say(f"note: {path} has no fp16 loss scaler state (written without --amp fp16); the scaler "
                    "starts fresh")
    rngs = state.get("rng")
    epoch = int(state["epoch"])
    if isinstance(rngs, torch.Tensor):  # the original toolkit's state: torch's CPU generator of rank 0 only
        ckpt.seed_all([cfg.seed, epoch, env.rank])
        if env.rank == 0:
            torch.set_rng_state(rngs.to(torch.uint8))
        say(f"note: {path} holds the original toolkit's RNG state (torch's CPU generator only): restored on "
            "rank 0, the other generators reseeded")
    elif len(rngs or []) == env.world_size:
        ckpt.set_rng_state(rngs[env.rank])
    else:
        rngs = rngs or []
        ckpt.seed_all([cfg.seed, epoch, env.rank])
        say(f"note: {path} holds RNG states of {len(rngs)} processes, not {env.world_size}; reseeded")
    say(f"resuming from {os.path.basename(shown)} after epoch {epoch}")
    return epoch, state.get("min_loss"), list(state.get("losses") or [])


def save_checkpoint(state: Mapping[str, Any], run_dir: str) -> Path:
    """`ckpt.save_state` (returns the path written), with one line naming the file and the system's reason
    when it cannot be written: out of space or quota stays an `OSError` (the command line says so, status
    1), any other reason (permissions, a read-only file system) is a `UserError`."""
    target = os.path.abspath(os.path.join(run_dir, ckpt.state_name(int(state["epoch"]))))
    try:
        return ckpt.save_state(state, run_dir)
    except OSError as exc:
        reason = exc.strerror or describe(exc)
        link = os.path.join(os.path.dirname(target), ckpt.CKPT_LINK)
        then = (f"{ckpt.CKPT_LINK} still points at {os.path.basename(os.path.realpath(link))}"
                if os.path.lexists(link) else "no checkpoint was written")
        if is_resource_error(exc):
            raise OSError(exc.errno, f"{reason} while writing the checkpoint {target}; {then}") from None
        raise UserError(f"cannot write the checkpoint {target}: {reason}; {then}; fix that and run again to "
                        "resume") from None


def gather_rng(env: DistEnv) -> list[dict[str, Any]]:
    """Every rank's RNG states, in rank order (so that each rank resumes its own streams)."""
    mine = ckpt.rng_state()
    if not env.distributed:
        return [mine]
    everyone: list[Any] = [None] * env.world_size
    dist.all_gather_object(everyone, mine)
    return everyone


# ---------------------------------------------------------------- 6. the loop


@dataclass
class EpochStats:
    """What one training epoch measured (losses are means over all ranks' items)."""

    loss: float = 0.0
    items: int = 0
    seconds: float = 0.0
    wait: float = 0.0
    first_wait: float = 0.0
    batch_losses: list[tuple[int, float]] = field(default_factory=list)
    last: dict[str, torch.Tensor] = field(default_factory=dict)
    adv: dict[str, float] | None = None  # the adversary's means over its active batches and all ranks
    terms: dict[str, float] | None = None  # with --loss eul / lag_eul: the epoch means of "lag" and "eul"


class _Timed:
    """Iterate a loader, adding the time spent waiting for each batch (and for the workers' start) to `wait`;
    `first` is the wait for the first batch, workers' start included (the epoch's start latency)."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader, self.wait, self.first = loader, 0.0, 0.0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        t0 = time.perf_counter()
        it = iter(self.loader)
        self.wait += time.perf_counter() - t0
        first = True
        while True:
            t1 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                self.wait += time.perf_counter() - t1
            if first:
                self.first, first = time.perf_counter() - t0, False
            yield batch


def _mean_over_ranks(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= env.world_size
    return value


def _nonfinite(what: str, value: float, epoch: int, batch: int | None) -> UserError:
    where = f"epoch {epoch + 1}" + (f" batch {batch + 1}" if batch is not None else "")
    last = f"the last good checkpoint is {ckpt.state_name(epoch)}" if epoch > 0 else "no checkpoint was written"
    return UserError(f"{what} is {value} at {where}; stopping; {last}")


def _keep(input: torch.Tensor, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """The last item, in float32 on the CPU (an autocast output is 16-bit), for images and spectra."""
    return {"input": input[-1].detach().float().cpu(), "output": output[-1:].detach().float().cpu(),
            "target": target[-1:].detach().float().cpu()}


def train_epoch(epoch: int, loader: DataLoader, model: nn.Module, criterion: nn.Module,
                optimizer: torch.optim.Optimizer, env: DistEnv, device: torch.device, cfg: TrainConfig,
                writer: Any, bar: Any, scaler: torch.amp.GradScaler | None = None,
                adv: adversary.Adversary | None = None, style_norm: styles.StyleNorm | None = None) -> EpochStats:
    """One epoch of training; with a loss `scaler` (``--amp fp16``) the backward pass and step go through it.
    With an active adversary (`map2map.adversary`) each batch also steps the discriminator, and the
    generator steps on the adversary's loss at its batches only; the supervised loss is still the one
    logged as the training loss.  `criterion` is a `LagEulLoss` (or any criterion); with `style_norm` the
    batches' styles, normalised by it, go to the styled model."""
    model.train()
    stats, timed = EpochStats(), _Timed(loader)
    nbatch = len(loader)
    weighted = 0.0
    weighted_terms = np.zeros(2)
    adversarial = adv is not None and adv.active(epoch)
    if adversarial:
        adv.stats = adversary.AdvStats()
    t_start = time.perf_counter()
    for i, batch in enumerate(timed):
        step = epoch * nbatch + i + 1
        input = batch["input"].to(device, non_blocking=True)
        target = batch["target"].to(device, non_blocking=True)
        style = _style(batch, style_norm, device)
        steps = not adversarial or adv.generator_steps(step)  # whether the generator steps at this batch
        with precision.autocast(device, cfg.amp), torch.set_grad_enabled(steps):
            output = forward(model, input, style)
            out, tgt = narrow_cast(output, target)
            loss, terms = _loss(criterion, out, tgt)
        if terms is None:
            value = _mean_over_ranks(loss.detach().reshape(()).double(), env).item()
        else:  # the total, L_lag and L_eul in one collective
            values = _mean_over_ranks(torch.stack([loss.detach().reshape(()).double(), *terms]), env).tolist()
            value, terms = values[0], values[1:]
        if not math.isfinite(value):
            raise _nonfinite("loss", value, epoch, i)
        if adversarial:
            with precision.autocast(device, cfg.amp):
                loss, adv_log = adv.step(step, input, out, tgt, loss)
            if not math.isfinite(adv_log["D"]):
                raise _nonfinite("discriminator loss", adv_log["D"], epoch, i)
            _log_adversary(writer, adv, adv_log, env, step, cfg.log_interval)
        if loss is not None:
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:  # steps whose scaled gradients overflowed are skipped, and the scale shrinks
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
        n = input.shape[0]
        weighted += value * n
        stats.items += n
        if terms is not None:
            weighted_terms += np.asarray(terms) * n
        if step % cfg.log_interval == 0:
            stats.batch_losses.append((step, value))
            if writer is not None:
                writer.add_scalar("loss/batch/train", value, global_step=step)
                for key, term in zip(TERMS, terms or ()):
                    writer.add_scalar(f"loss/batch/train/{key}", term, global_step=step)
            bar.set_postfix(loss=f"{value:.3e}", refresh=False)
        bar.update(1)
        if i == nbatch - 1 and env.is_main:
            stats.last = _keep(input, out, tgt)
    stats.seconds = time.perf_counter() - t_start
    stats.wait, stats.first_wait = timed.wait, timed.first
    stats.loss = weighted / max(stats.items, 1)
    if getattr(criterion, "loss", "lag") != "lag":
        stats.terms = dict(zip(TERMS, (weighted_terms / max(stats.items, 1)).tolist()))
    stats.items *= env.world_size
    if adversarial:
        stats.adv = _dict_mean_over_ranks(adv.stats.means(), env)
    return stats


def _dict_mean_over_ranks(values: Mapping[str, float], env: DistEnv) -> dict[str, float]:
    """`values` (the same keys on every rank) averaged over ranks, in one collective."""
    keys = sorted(values)
    if not env.distributed or not keys:
        return {k: values[k] for k in keys}
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    t = _mean_over_ranks(t, env).cpu()
    return dict(zip(keys, t.tolist()))


def _log_adversary(writer: Any, adv: adversary.Adversary, log: Mapping[str, float], env: DistEnv, step: int,
                   interval: int) -> None:
    """The adversary's values of one batch: into its epoch means, and to TensorBoard (rank 0) every
    `interval` batches, R1 and the gradient penalty at every batch they are computed."""
    adv.stats.add(log)
    if step % interval == 0 or "r1" in log or "gp" in log:
        means = _dict_mean_over_ranks(log, env)
        if writer is not None:
            for key, value in means.items():
                if step % interval == 0 or key in ("r1", "gp"):
                    writer.add_scalar(adversary.TAGS[key], value, global_step=step)


def validate(epoch: int, loader: DataLoader, model: nn.Module, criterion: nn.Module, env: DistEnv,
             device: torch.device, amp: str = "off", style_norm: styles.StyleNorm | None = None
             ) -> tuple[float, dict[str, torch.Tensor], dict[str, float] | None]:
    """The mean validation loss, the last item (rank 0) and, for ``--loss eul`` / ``lag_eul``, the means of
    L_lag and L_eul (else None); styles normalised by `style_norm` (the training store's), as in training."""
    model.eval()
    total = torch.zeros(4, dtype=torch.float64, device=device)  # loss, items, L_lag, L_eul
    last: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for batch in loader:
            input = batch["input"].to(device, non_blocking=True)
            target = batch["target"].to(device, non_blocking=True)
            style = _style(batch, style_norm, device)
            with precision.autocast(device, amp):
                output = forward(model, input, style)
                out, tgt = narrow_cast(output, target)
                loss, terms = _loss(criterion, out, tgt)
            total[0] += loss.double() * input.shape[0]
            total[1] += input.shape[0]
            if terms is not None:
                total[2:] += torch.stack(terms) * input.shape[0]
            last = (input, out, tgt)
    if env.distributed:
        dist.all_reduce(total)
    value = (total[0] / total[1].clamp(min=1)).item()
    if not math.isfinite(value):
        raise _nonfinite("validation loss", value, epoch, None)
    means = None
    if getattr(criterion, "loss", "lag") != "lag":
        means = dict(zip(TERMS, (total[2:] / total[1].clamp(min=1)).tolist()))
    return value, (_keep(*last) if last and env.is_main else {}), means


TERMS = ("lag", "eul")  # the terms of --loss eul and lag_eul, logged as loss/.../{train,val}/{lag,eul}


def _style(batch: Mapping[str, Any], norm: styles.StyleNorm | None, device: torch.device) -> torch.Tensor | None:
    """The batch's styles (physical values) normalised by `norm`, on `device`; None without a norm."""
    if norm is None:
        return None
    return norm.apply(batch["style"].to(device, non_blocking=True))


def _loss(criterion: nn.Module, out: torch.Tensor, tgt: torch.Tensor
          ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """(loss, [L_lag, L_eul] as float64 scalars, detached, or None for ``--loss lag`` or a plain criterion)."""
    result = criterion(out, tgt)
    if not isinstance(result, LossTerms):
        return result, None
    if result.eul is None:
        return result.total, None
    return result.total, [result.lag.detach().reshape(()).double(), result.eul.detach().reshape(()).double()]


def _terms(train: Mapping[str, float] | None, val: Mapping[str, float] | None) -> dict[str, float] | None:
    """The epoch's loss terms as "train/lag", ..., "val/eul" (None for --loss lag)."""
    if train is None and val is None:
        return None
    return {f"{split}/{k}": v for split, terms in (("train", train), ("val", val)) for k, v in (terms or {}).items()}



def _strip_pad(x: torch.Tensor, pad: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The crop of an item (C, *spatial) without its input pad."""
    for axis, (lo, hi) in enumerate(pad, start=1):
        x = x.narrow(axis, lo, x.shape[axis] - lo - hi)
    return x


def log_images(writer: Any, tag: str, last: dict[str, torch.Tensor], pad, step: int) -> None:
    """Middle slices of one item: ``slice/{tag}/input``, ``.../output``, ``.../target``, ``.../difference``."""
    from map2map.utils.figures import slice_images

    if last:
        images = slice_images(_strip_pad(last["input"], pad), last["output"][0], last["target"][0])
        for name, image in images.items():
            writer.add_image(f"slice/{tag}/{name}", image, global_step=step, dataformats="HWC")


def log_spectra(writer: Any, tag: str, last: dict[str, torch.Tensor], step: int, boxsize: float | None) -> None:
    """P(k) of one item's output and target, as the figure ``power/{tag}``."""
    from map2map.utils.figures import spectra_figure

    fig = spectra_figure(last["output"], last["target"], boxsize) if last else None
    if fig is not None:
        writer.add_figure(f"power/{tag}", fig, global_step=step)


def _crop_boxsize(cfg: TrainConfig, ds: FieldDataset, out_shape: Sequence[int]) -> float | None:
    """Physical side length of the output crop, when the store knows its box size."""
    if cfg.train_data is None or len(set(out_shape)) != 1 or len(set(ds.size)) != 1:
        return None
    box = open_train_store(cfg).boxsize
    return None if box is None else float(box) * out_shape[0] / (ds.size[0] * ds.scale_factor)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(env: DistEnv, total: int, epoch: int, epochs: int):
    if not env.is_main:
        return _NoBar()
    from tqdm.auto import tqdm

    # disable=None: shown on a terminal, left out of log files (which get the per-epoch line)
    return tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False, file=sys.stderr,
                mininterval=1.0, dynamic_ncols=True, disable=None)


def run(cfg: TrainConfig) -> TrainSummary:
    """Run `m2m train`; returns the summary on every rank (rank 0 alone printed and wrote files)."""
    t0 = time.perf_counter()
    check_config(cfg)
    env, device, backend, notes = setup_processes(cfg)
    opened: dict[str, Any] = {"backend": backend, "notes": notes}
    board = None
    try:
        if backend in ("gloo", "nccl"):  # (mpi has no rendezvous store)
            board = FailureBoard(env.rank, env.world_size, cfg.dist_timeout)
        with contextlib.ExitStack() as stack, torch.autograd.set_detect_anomaly(cfg.detect_anomaly):
            opened["stack"] = stack  # the run directory's lock, released last
            opened["tf32"] = stack.enter_context(precision.tf32(cfg.tf32))  # this run's, restored after it
            try:
                summary = _train(cfg, env, device, opened)
                if board is not None:  # every watcher stops before a rank leaves (under srun rank 0 takes
                    board.stop()  # the store with it)
                    dist.barrier()
            except BaseException as exc:
                tell_others(exc, env, board)
                raise
            finally:
                if opened.get("writer") is not None:
                    opened["writer"].close()
    finally:
        if board is not None:
            board.stop()
        if env.distributed and dist.is_initialized():
            dist.destroy_process_group()
    summary.seconds = time.perf_counter() - t0
    return summary


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_config(cfg: TrainConfig) -> None:
    """Refuse option values out of range, before any work starts (one line each)."""
    if cfg.epochs < 0:
        raise UserError(f"--epochs must be 0 or more (the total number of epochs), got {cfg.epochs}")
    if not _positive_number(cfg.lr):
        raise UserError(f"--lr must be a positive finite number, got {cfg.lr}")
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.loader_workers < 0:
        raise UserError(f"--loader-workers must be 0 or more, got {cfg.loader_workers}")
    if cfg.readahead is not None and not (cfg.readahead >= 0 and math.isfinite(cfg.readahead)):
        raise UserError(f"--readahead must be MiB >= 0 (0 turns read-ahead off), got {cfg.readahead}")
    if cfg.log_interval < 1:
        raise UserError(f"--log-interval must be at least 1, got {cfg.log_interval}")
    if not _positive_number(cfg.dist_timeout):
        raise UserError(f"--dist-timeout must be a positive number of seconds, got {cfg.dist_timeout}")
    if cfg.device not in DEVICES:
        raise UserError(f"--device {cfg.device!r}: expected one of {', '.join(DEVICES)}")
    precision.check_amp(cfg.amp)
    precision.check_tf32(cfg.tf32)
    adversary.check_options(cfg)
    check_loss(cfg.loss, cfg.eul_weight)
    if not isinstance(cfg.scale_factor, int) or cfg.scale_factor < 1:
        raise UserError(f"--scale-factor must be a positive integer, got {cfg.scale_factor}")
    shifts = [cfg.aug_shift] if isinstance(cfg.aug_shift, int) else list(cfg.aug_shift or ())
    if any(v < 0 for v in shifts):  # (crop sizes and steps are checked with the data's size)
        raise UserError(f"--aug-shift must be 0 or more voxels per axis, got {','.join(map(str, shifts))}")
    for option, value in (("--aug-add", cfg.aug_add), ("--aug-mul", cfg.aug_mul),
                          ("--init-weight-std", cfg.init_weight_std)):
        if value is not None and not (_positive_number(value) or value == 0):
            raise UserError(f"{option} must be a finite standard deviation of 0 or more, got {value}")
    if not (math.isfinite(cfg.div_shuffle_dist) and cfg.div_shuffle_dist >= 0):
        raise UserError(f"--div-shuffle-dist must be 0 or more, got {cfg.div_shuffle_dist}")
    check_locations(cfg)
    if os.path.exists(cfg.run_dir) and not os.path.isdir(cfg.run_dir):
        raise UserError(f"--run-dir {cfg.run_dir} exists and is not a directory")


def check_locations(cfg: TrainConfig) -> None:
    """Refuse, one line each, a store URL of a scheme fsspec cannot open, and a URL where only local paths
    work: the run directory, the state to resume from and .npy patterns (stores alone may be remote)."""
    for option, location in (("--train-data", cfg.train_data), ("--val-data", cfg.val_data)):
        if location is not None:
            storage.check_scheme(location, option)
    for option, location in (("--run-dir", cfg.run_dir), ("--load-state", cfg.load_state)):
        if location and storage.is_remote(location):
            raise UserError(f"{option} {location}: checkpoints and TensorBoard logs are written and read in a "
                            "local directory; give a local path (only --train-data and --val-data may be URLs)")
    for split in ("train", "val"):
        for kind in ("in", "tgt"):
            remote = [p for p in getattr(cfg, f"{split}_{kind}_patterns") or () if storage.is_remote(p)]
            if remote:
                raise UserError(f"--{split}-{kind}-patterns {remote[0]}: .npy patterns are local files; convert "
                                f"them to a store (m2m convert) and give --{split}-data URL instead")


def _names_style_size(cls: Any) -> bool:
    """Whether the model class `cls` has a ``style_size`` parameter (a styled model, `map2map.models.build`)."""
    try:
        return "style_size" in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False


def choose_styles(cfg: TrainConfig) -> tuple[str, ...] | None:
    """The style parameters the model takes, in order (None: an unstyled model).

    ``--style`` names them; without it a styled model (one whose class has a
    ``style_size`` parameter) takes all of the training store's, in the
    store's order, and any other model none (a store with styles still
    trains an unstyled model).  One-line errors: ``--style`` for an
    unstyled model, with a store without styles or naming parameters the
    store lacks, and a styled model on data without styles."""
    cls = import_attr(cfg.model, ["map2map.models"], cfg.callback_at, what="model")
    styled = _names_style_size(cls)
    if cfg.style is not None and not styled:
        raise UserError(f"--style {','.join(cfg.style)}: model {cfg.model} takes no style_size argument, so it "
                        "cannot use styles; choose a styled model (e.g. StyledVNet) or leave out --style")
    if not styled:
        return None
    if cfg.train_data is None:
        raise UserError(f"model {cfg.model} is styled, and styles come from a store: give --train-data STORE "
                        "with styles (m2m convert --styles TABLE.csv)")
    names, _ = styles.store_styles(cfg.train_data, cfg.style, required=True,
                                   storage_options=cfg.storage_options)
    return names


def style_norm_for(cfg: TrainConfig, names: Sequence[str], state: Mapping[str, Any] | None
                   ) -> styles.StyleNorm | None:
    """The style norm of this run (None: unstyled): the one the model card of the state it resumes from
    recorded, else `styles.norm_from_store` of the training store; a `UserError` when the state was
    trained with other style parameters."""
    if not names:
        return None
    card = (state or {}).get("card")
    recorded = modelfit.ModelCard.from_dict(card, cfg.state_path).style_norm if card else None
    if recorded is None:
        return styles.norm_from_store(cfg.train_data, tuple(names), storage_options=cfg.storage_options)
    if recorded.names != tuple(names):
        raise UserError(f"{cfg.state_path} was trained with the style parameters {','.join(recorded.names)}, but "
                        f"this run chooses {','.join(names)}; give --style {','.join(recorded.names)}, or start "
                        "fresh with --load-state ''")
    return recorded


def _loss_margin(ds: FieldDataset, out_shape: Sequence[int]) -> list[tuple[int, int]]:
    """Per axis, (low, high) voxels by which the output and target, narrowed to each other (`narrow_cast`),
    exceed the target crop: the margin of the Eulerian loss (`LagEulLoss`)."""
    margin = []
    for crop, out, (lo, hi) in zip(ds.crop, out_shape, ds.tgt_pad):
        window = crop * ds.scale_factor + lo + hi
        common = min(out, window)
        cut = (window - common) // 2  # what `narrow_like` takes off the low end
        margin.append((max(lo - cut, 0), max(hi - (window - common - cut), 0)))
    return margin


def build_loss(cfg: TrainConfig, criterion: nn.Module, ds: FieldDataset, out_shape: Sequence[int]) -> LagEulLoss:
    """``--loss`` on the criterion (`map2map.models.eulerian.LagEulLoss`); ``lag`` is the criterion alone.
    ``eul`` and ``lag_eul`` paint the target, a displacement (as many channels as axes, its units from the
    first target norm), in the training store's box; one-line errors otherwise."""
    if cfg.loss == "lag":
        return LagEulLoss(criterion)
    option = f"--loss {cfg.loss}"
    channels = sum(ds.tgt_chan)
    if channels != ds.ndim:
        raise UserError(f"{option} paints the target as a displacement of {ds.ndim} channels (one per axis), but "
                        f"the target has {channels}; train on a displacement target, or use --loss lag")
    box = open_train_store(cfg).boxsize if cfg.train_data else None
    if box is None:
        where = f"store {cfg.train_data}" if cfg.train_data else "the .npy training data"
        raise UserError(f"{option} needs the box size to paint densities, but {where} has none; convert with "
                        "m2m convert --boxsize L, or use --loss lag")
    if len(set(ds.size)) != 1:
        raise UserError(f"{option} needs a cubic box (one box size), but the fields are {list(ds.size)} voxels")
    norm = ds.tgt_norms[0] if ds.tgt_norms else None
    name = f"--tgt-norms {cfg.tgt_norms[0]}" if cfg.tgt_norms else "the target norm"
    return LagEulLoss(criterion, cfg.loss, cfg.eul_weight, margin=_loss_margin(ds, out_shape),
                      dis_norm=dis_norm_of(norm, ds.norm_kwargs, name), boxsize=float(box),
                      meshsize=ds.size[0] * ds.scale_factor)


def _data_and_model(cfg: TrainConfig, env: DistEnv, device: torch.device, say) -> tuple[Any, ...]:
    """Training (and validation) data and the model on `device`, with ``--in-pad auto`` resolved.

    Returns (train_ds, val_ds or None, model, total stride, output shape).
    """
    # data, with a zero pad first when the pad is to be found from the model
    auto = cfg.in_pad == "auto"
    data_seed = cfg.seed + env.rank  # augmentation draws differ per rank
    names = choose_styles(cfg)
    train_ds = make_dataset(cfg, "train", 0 if auto else cfg.in_pad, data_seed, style_names=names)
    in_chan, out_chan = sum(train_ds.in_chan), sum(train_ds.tgt_chan)

    # model: identical on every rank (same seed; DDP also broadcasts rank 0's)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, in_chan, out_chan, scale_factor=cfg.scale_factor, ndim=train_ds.ndim,
                        kwargs=cfg.misc_kwargs, callback_at=cfg.callback_at,
                        norms=[*train_ds.in_norms, *train_ds.tgt_norms],
                        style_size=len(names) if names else None)
    model.to(device)
    in_pad: Any = cfg.in_pad
    if auto:
        in_pad = modelfit.auto_pad(model, in_chan, train_ds.crop, train_ds.ndim, cfg.scale_factor,
                                   train_ds.tgt_pad)
        train_ds = make_dataset(cfg, "train", in_pad, data_seed, style_names=names)
    stride, out_shape = modelfit.check_geometry(model, in_chan, train_ds.crop, train_ds.grid.step,
                                                train_ds.in_pad, train_ds.tgt_pad, train_ds.scale_factor,
                                                auto=auto)
    val_ds = make_dataset(cfg, "val", 0, cfg.seed, fields_only=True)  # crops and pads are per axis
    if val_ds is not None and val_ds.ndim != train_ds.ndim:
        raise UserError(f"validation data is {val_ds.ndim}D, training data is {train_ds.ndim}D; validate on "
                        "fields of the training fields' dimension")
    if val_ds is not None:
        val_ds = make_dataset(cfg, "val", in_pad, cfg.seed, style_names=names)
    if val_ds is not None and (val_ds.in_chan != train_ds.in_chan or val_ds.tgt_chan != train_ds.tgt_chan
                               or val_ds.crop != train_ds.crop):
        raise UserError(f"validation data (channels {val_ds.in_chan} -> {val_ds.tgt_chan}, crop "
                        f"{list(val_ds.crop)}) differ from training data (channels {train_ds.in_chan} -> "
                        f"{train_ds.tgt_chan}, crop {list(train_ds.crop)})")
    if auto:  # only once the pad it found fits and the data agree
        say(f"--in-pad auto: {modelfit.pad_text(in_pad)}")
    return train_ds, val_ds, model, stride, out_shape


def _describe(cfg: TrainConfig, env: DistEnv, device: torch.device, model: nn.Module, train_ds: FieldDataset,
              val_ds: FieldDataset | None, stride: int, out_shape: Sequence[int],
              adv: adversary.Adversary | None = None) -> list[str]:
    """What is about to be trained, on what (two lines for the log, three with an adversary)."""
    in_chan, out_chan = sum(train_ds.in_chan), sum(train_ds.tgt_chan)
    nparam = sum(p.numel() for p in model.parameters())
    return [f"model {cfg.model}: {nparam} parameters, total stride {stride}; input "
            f"{[in_chan, *(c + lo + hi for c, (lo, hi) in zip(train_ds.crop, train_ds.in_pad))]} -> output "
            f"{[out_chan, *out_shape]}, target crop {[out_chan, *(c * cfg.scale_factor for c in train_ds.crop)]}",
            f"{len(train_ds)} training items ({train_ds.nsample} samples x {train_ds.ncrop} crops)"
            + (f", {len(val_ds)} validation items" if val_ds is not None else "")
            + f"; {env.world_size} process(es) on {device.type}, batch size {cfg.batch_size} per process, "
            f"{cfg.loader_workers} loader workers"] + ([adversary.describe(adv)] if adv is not None else [])


def _location(path: str) -> str:
    """A store location as the model card records it: a URL as given (normalised), a local path absolute."""
    return storage.normalise(path) if storage.is_remote(path) else os.path.abspath(storage.local_path(path))


def model_card(cfg: TrainConfig, ds: FieldDataset, stride: int, style_norm: styles.StyleNorm | None = None
               ) -> modelfit.ModelCard:
    """The model card saved with every checkpoint: everything inference needs besides the weights (with the
    style parameters and their norm for a styled model)."""
    stores = [p for p in (cfg.train_data, cfg.val_data) if p]
    stores = [_location(p) for p in stores] or [*(cfg.train_in_patterns or ()), *(cfg.train_tgt_patterns or ())]
    version = open_train_store(cfg).meta.get("format_version") if cfg.train_data else None
    return modelfit.ModelCard(
        model=cfg.model, in_chan=sum(ds.in_chan), out_chan=sum(ds.tgt_chan), scale_factor=cfg.scale_factor,
        ndim=ds.ndim, model_kwargs=dict(cfg.misc_kwargs), callback_at=cfg.callback_at,
        in_fields=tuple(cfg.in_fields) if cfg.in_fields and cfg.train_data else None,
        tgt_fields=tuple(cfg.tgt_fields) if cfg.tgt_fields and cfg.train_data else None,
        in_chans=tuple(ds.in_chan), tgt_chans=tuple(ds.tgt_chan),
        in_norms=tuple(cfg.in_norms) if cfg.in_norms else None,
        tgt_norms=tuple(cfg.tgt_norms) if cfg.tgt_norms else None, norm_kwargs=dict(cfg.misc_kwargs),
        in_pad=tuple(tuple(p) for p in ds.in_pad), tgt_pad=tuple(tuple(p) for p in ds.tgt_pad),
        total_stride=stride, crop=tuple(ds.crop), train_stores=tuple(stores), store_format_version=version,
        map2map_version=__version__, **modelfit.ModelCard.style_fields(style_norm))


def _log_epoch(writer: Any, record: EpochRecord, stats: EpochStats, val_last: dict[str, torch.Tensor],
               in_pad, boxsize: float | None) -> None:
    """Epoch scalars, image slices and power spectra to TensorBoard (rank 0)."""
    step = record.epoch
    writer.add_scalar("loss/epoch/train", record.train_loss, global_step=step)
    if record.val_loss is not None:
        writer.add_scalar("loss/epoch/val", record.val_loss, global_step=step)
    writer.add_scalar("lr", record.lr, global_step=step)
    for key, value in (record.adv or {}).items():
        writer.add_scalar(adversary.TAGS[key].replace("/batch/", "/epoch/"), value, global_step=step)
    for key, value in (record.loss_terms or {}).items():
        writer.add_scalar(f"loss/epoch/{key}", value, global_step=step)
    log_images(writer, "train", stats.last, in_pad, step)
    log_images(writer, "val", val_last, in_pad, step)
    log_spectra(writer, "val" if val_last else "train", val_last or stats.last, step, boxsize)
    writer.flush()


@contextlib.contextmanager
def lock_run_dir(run_dir: str) -> Iterator[Any]:
    """The run directory's writer lock (`writer_lock`) for the body.  When the body fails and the lock file
    cannot be deleted then (the directory has become read-only, the reason a checkpoint failed), the body's
    error is the one raised: the lock itself goes with its file descriptor, and a lock file left behind is
    taken over by the next run (see `map2map.utils.locks`)."""
    with contextlib.ExitStack() as inner:
        lock = inner.enter_context(writer_lock(run_dir, "m2m train", inside=True))
        try:
            yield lock
        except BaseException:
            with contextlib.suppress(OSError):
                inner.close()
            raise


def _writer(run_dir: str):
    """A TensorBoard writer in ``runs/`` of the run directory (one subdirectory per start, as torch names them)."""
    from torch.utils.tensorboard import SummaryWriter

    stamp = datetime.now().strftime("%b%d_%H-%M-%S")
    return SummaryWriter(log_dir=os.path.join(run_dir, "runs", f"{stamp}_{socket.gethostname()}"))


def _train(cfg: TrainConfig, env: DistEnv, device: torch.device, opened: dict[str, Any]) -> TrainSummary:
    def say(msg: str) -> None:
        if env.is_main:
            print(msg, flush=True)

    say(_place(env, device, opened["backend"]))
    slow = precision.slow_bf16(device) if cfg.amp == "bf16" else None
    for n in [*opened["notes"], *([slow] if slow else [])]:
        say(f"note: {n}")
    say(f"precision: amp {cfg.amp}, {precision.tf32_text(cfg.tf32, opened['tf32'], device)}"
        + (", torch.compile" if cfg.compile else ""))

    # everything is checked before the run directory is touched: a bad option writes nothing
    state = agree_on_state(cfg, env)
    train_ds, val_ds, model, stride, out_shape = _data_and_model(cfg, env, device, say)
    if cfg.sync_bn:
        model = sync_batchnorm(model, env, say)
    criterion, optimizer, scheduler, notes = build_optim(cfg, model)
    criterion = build_loss(cfg, criterion, train_ds, out_shape)
    criterion.to(device)
    style_norm = style_norm_for(cfg, train_ds.style_names, state)
    scaler = precision.grad_scaler(device, cfg.amp)
    for n in notes:
        say(f"note: {n}")
    adv = build_adversary(cfg, env, device, train_ds, out_shape)

    os.makedirs(cfg.run_dir, exist_ok=True)
    if env.is_main:  # one training per run directory: rank 0 holds its lock until the run ends
        lock = opened["stack"].enter_context(lock_run_dir(cfg.run_dir))
        if lock.note:
            say(f"note: {lock.note}")
        for name in ckpt.remove_stale(cfg.run_dir):
            say(f"removed {name}, left by an interrupted checkpoint write")
    start_epoch, min_loss, losses = restore(cfg, state, model, optimizer, scheduler, env, say, scaler)
    if adv is not None:
        if state is not None:
            adv.restore(state.get("adv"), cfg.state_path, say)
        adv.sync_parameters()
    elif state is not None and state.get("adv"):
        say(f"note: {cfg.state_path} holds a discriminator; without --adv-model this run trains without it, "
            "and its checkpoints leave it out")
    del state  # its tensors are in the model and optimizer now
    if start_epoch == 0:  # per-rank streams from here on (e.g. dropout); a resumed run restored its own
        ckpt.seed_all([cfg.seed, 0, env.rank])

    raw_model = model
    if cfg.compile:  # in place, inside DDP (torch's advice): the state_dict keeps the plain names
        raw_model.compile()
    if env.distributed:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)

    train_loader, train_sampler = make_loader(train_ds, cfg, env, device, training=True)
    opened["stack"].callback(end_workers, train_loader)
    val_loader = val_sampler = None
    if val_ds is not None:
        val_loader, val_sampler = make_loader(val_ds, cfg, env, device, training=False)
        opened["stack"].callback(end_workers, val_loader)
    for line in _describe(cfg, env, device, raw_model, train_ds, val_ds, stride, out_shape, adv):
        say(line)
    if style_norm is not None:
        say(f"styles: {style_norm.describe()} (each range onto [-1, 1])")
    if cfg.loss != "lag":
        say(f"loss: {cfg.loss}" + (f" (L_lag + {cfg.eul_weight:g} L_eul)" if cfg.eul_weight is not None else "")
            + f", Eulerian margin {[list(m) for m in criterion.margin]} voxels (low, high per axis)")

    writer = opened["writer"] = _writer(cfg.run_dir) if env.is_main else None
    boxsize = _crop_boxsize(cfg, train_ds, out_shape) if env.is_main else None
    card = model_card(cfg, train_ds, stride, style_norm).to_dict()
    config = dataclasses.asdict(cfg)
    config.pop("storage_options")  # they may hold credentials, and say where the data were, not how it trained
    if adv is None:  # checkpoints of runs without an adversary stay as they were
        config = {k: v for k, v in config.items() if k not in adversary.FIELDS}
    config = {k: v for k, v in config.items()  # and so do those of runs without styles or another loss
              if k not in STYLE_LOSS_DEFAULTS or v != STYLE_LOSS_DEFAULTS[k]}

    summary = TrainSummary(run_dir=os.path.abspath(cfg.run_dir), start_epoch=start_epoch, epochs=[],
                           in_pad=[list(p) for p in train_ds.in_pad], total_stride=stride,
                           parameters=sum(p.numel() for p in raw_model.parameters()), world_size=env.world_size,
                           device=str(device), checkpoint=None, seconds=0.0, backend=opened["backend"],
                           amp=cfg.amp)
    if start_epoch >= cfg.epochs:
        say(f"already trained for {start_epoch} epochs (--epochs {cfg.epochs}); nothing to do")
    for epoch in range(start_epoch, cfg.epochs):
        train_sampler.set_epoch(epoch)  # its items carry the epoch to the dataset, in every loader worker
        lr = optimizer.param_groups[0]["lr"]
        bar = _bar(env, len(train_loader), epoch, cfg.epochs)
        try:
            stats = train_epoch(epoch, train_loader, model, criterion, optimizer, env, device, cfg,
                                writer, bar, scaler, adv, style_norm)
        finally:
            bar.close()
        val_loss, val_last, val_terms = None, {}, None
        if val_loader is not None:
            val_sampler.set_epoch(epoch)
            val_loss, val_last, val_terms = validate(epoch, val_loader, raw_model, criterion, env, device,
                                                     cfg.amp, style_norm)
        epoch_loss = val_loss if val_loss is not None else stats.loss
        if scheduler is not None:
            scheduler.step(epoch_loss)
        if stats.adv and adv.scheduler is not None:
            adv.scheduler.step(stats.adv["D"])
        if min_loss is None or epoch_loss < min_loss:
            min_loss = epoch_loss
        rngs = gather_rng(env)
        record = EpochRecord(epoch=epoch + 1, train_loss=stats.loss, val_loss=val_loss, lr=lr,
                             items_per_s=stats.items / max(stats.seconds, 1e-9),
                             data_wait=stats.wait / max(stats.seconds, 1e-9), batch_losses=stats.batch_losses,
                             first_batch_s=stats.first_wait, adv=stats.adv,
                             loss_terms=_terms(stats.terms, val_terms))
        summary.epochs.append(record)
        losses.append({"epoch": epoch + 1, "train": stats.loss, "val": val_loss, "lr": lr})
        if env.is_main:
            _log_epoch(writer, record, stats, val_last, train_ds.in_pad, boxsize)
            state = {"epoch": epoch + 1, "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict() if scheduler is not None else None,
                     "scaler": scaler.state_dict() if scaler is not None else None,
                     "rng": rngs, "min_loss": min_loss, "losses": losses, "config": json.loads(json.dumps(config, default=str)),
                     "card": card}
            if adv is not None:
                state["adv"] = adv.state_dict()
            path = save_checkpoint(state, cfg.run_dir)
            record.checkpoint = summary.checkpoint = str(path)
            val_text = f", val loss {val_loss:.4e}" if val_loss is not None else ""
            if stats.adv:
                val_text += f", discriminator loss {stats.adv['D']:.4e}" + (
                    f", adversarial loss {stats.adv['G']:.4e}" if "G" in stats.adv else "")
            say(f"epoch {epoch + 1}/{cfg.epochs}: train loss {stats.loss:.4e}{val_text}, lr {lr:.3g}, "
                f"{record.items_per_s:.1f} items/s, data wait {record.data_wait:.1%}; saved {path.name}")
            new_lr = optimizer.param_groups[0]["lr"]
            if new_lr != lr:
                say(f"learning rate reduced from {lr:.3g} to {new_lr:.3g}")
        if env.distributed:  # the others wait here while rank 0 writes
            dist.barrier()
    return summary
