"""`m2m train`: the training loop, in one process or many (torchrun / srun, DistributedDataParallel).

The flow, top to bottom in `train`:

1. Where am I: rank, local rank and world size from torchrun's or SLURM's
   variables (`map2map.utils.distenv`); the process group is created only
   when there are several processes (gloo on CPU, nccl on GPU, one GPU per
   process).  Rank 0 alone prints, logs to TensorBoard and writes checkpoints.
2. Data: a `FieldDataset` per split, a `DistFieldSampler` over its crops
   (disjoint per rank, reshuffled from (seed, epoch)), a `DataLoader`.
3. Model, found by name and built as ``Model(in_chan, out_chan,
   scale_factor=..., **misc_kwargs)``; its total stride is checked against the
   crops, and its output against the target crop (``--in-pad auto`` finds the
   smallest pad that covers it).
4. Criterion, optimizer and the optional ReduceLROnPlateau scheduler.
5. State: ``--load-state`` (default ``checkpoint.pt``) restores model,
   optimizer, scheduler and RNG states, or training starts fresh.
6. Epochs: train, validate, step the scheduler, log, write ``state_{epoch}.pt``
   and relink ``checkpoint.pt``.

Every source of randomness in an epoch derives from (seed, epoch) or from RNG
states saved in the checkpoint, so a resumed run continues exactly as an
uninterrupted one (bit-identical on CPU with one process).
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import sys
import time
from argparse import Namespace
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from map2map import store
from map2map.data.batching import collate
from map2map.data.fields import FieldDataset
from map2map.data.sampler import DistFieldSampler
from map2map.errors import UserError
from map2map.models import (StrideError, build_model, check_stride, narrow_cast, required_pad,
                            total_stride)
from map2map.utils import checkpoint as ckpt
from map2map.utils.distenv import DistEnv, dist_env
from map2map.utils.imports import import_attr

# ---------------------------------------------------------------- 1. processes and devices


def setup_processes(backend: str | None) -> tuple[DistEnv, torch.device]:
    """Find this process's rank, pick its device, and join the process group when there are several."""
    env = dist_env()
    if torch.cuda.is_available():
        ngpu = torch.cuda.device_count()
        if env.local_world_size > ngpu:
            raise UserError(f"{env.local_world_size} processes on this node but {ngpu} GPU(s) visible: start one "
                            f"process per GPU (e.g. torchrun --nproc-per-node {ngpu})")
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # crops have one fixed size: let cuDNN pick the fastest kernels
    else:
        device = torch.device("cpu")
        if env.local_world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            torch.set_num_threads(max(1, cores // env.local_world_size))
    if env.distributed:
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        try:
            dist.init_process_group(backend=backend, init_method="env://", rank=env.rank,
                                    world_size=env.world_size)
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"cannot start the {backend} process group for rank {env.rank} of "
                            f"{env.world_size}: {str(exc).splitlines()[0]}") from None
    return env, device


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


_DATASET_KEYS = set(inspect.signature(FieldDataset.__init__).parameters) - {"self", "kwargs"}


def make_dataset(args: Namespace, split: str, in_pad: Any, seed: int) -> FieldDataset | None:
    """The training or validation dataset from a store (``--train-data``) or .npy globs; None for no val."""
    path = getattr(args, f"{split}_data")
    in_patterns = getattr(args, f"{split}_in_patterns")
    tgt_patterns = getattr(args, f"{split}_tgt_patterns")
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
    if path is not None and not args.in_fields:
        raise UserError(f"{flag} needs the input field names: --in NAME[,NAME]")
    if (path is not None and not args.tgt_fields) or (path is None and not tgt_patterns):
        raise UserError(f"training needs targets: give --tgt NAME[,NAME] with {flag}, "
                        f"or --{split}-tgt-patterns")
    training = split == "train"
    norm_kwargs = args.misc_kwargs
    clash = sorted(set(norm_kwargs) & _DATASET_KEYS)
    if clash:
        raise UserError(f"--misc-kwargs keys {clash} clash with data set arguments; use the options instead")
    return FieldDataset(
        store=path, in_fields=args.in_fields if path else None, tgt_fields=args.tgt_fields if path else None,
        in_patterns=in_patterns, tgt_patterns=tgt_patterns,
        crop=args.crop, crop_start=args.crop_start, crop_stop=args.crop_stop, crop_step=args.crop_step,
        in_pad=in_pad, tgt_pad=args.tgt_pad, scale_factor=args.scale_factor,
        augment=args.augment and training, aug_shift=args.aug_shift if training else None,
        aug_add=args.aug_add if training else None, aug_mul=args.aug_mul if training else None,
        in_norms=args.in_norms, tgt_norms=args.tgt_norms, callback_at=args.callback_at, seed=seed,
        **norm_kwargs)


def make_loader(ds: FieldDataset, args: Namespace, env: DistEnv, device: torch.device,
                training: bool) -> tuple[DataLoader, DistFieldSampler]:
    sampler = DistFieldSampler(ds.nsample, ds.crop_counts, shuffle=training, div_data=args.div_data,
                               div_shuffle_dist=args.div_shuffle_dist, seed=args.seed,
                               rank=env.rank, world_size=env.world_size)
    loader = DataLoader(ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.loader_workers,
                        collate_fn=collate, pin_memory=device.type == "cuda", persistent_workers=False)
    return loader, sampler


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


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` on the 'meta' device (shapes only), made without copying any parameter data."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def output_shape(model: nn.Module, in_chan: int, shape: Sequence[int]) -> tuple[tuple[int, ...] | None, bool]:
    """Spatial output shape for a zero input of spatial `shape` (None if the model rejects that size),
    and whether it came from a shape-only 'meta' copy of the model.

    Models that cannot run on 'meta' get a real pass in eval mode without
    gradients (their training mode is restored).
    """
    x_shape = (1, in_chan, *shape)
    try:
        meta = meta_copy(model).eval()
        with torch.no_grad():
            return tuple(meta(torch.zeros(x_shape, device="meta")).shape[2:]), True
    except Exception:
        pass
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters(), torch.empty(0)).device
        with torch.no_grad():
            return tuple(model(torch.zeros(x_shape, device=device)).shape[2:]), False
    except (RuntimeError, ValueError):
        return None, False
    finally:
        model.train(was_training)


def auto_pad(model: nn.Module, in_chan: int, crop: Sequence[int], ndim: int, scale_factor: int,
             tgt_pad: Sequence[tuple[int, int]]) -> list[int]:
    """The smallest input pad per axis whose output covers the target crop (+ tgt-pad), by `required_pad`."""
    pads, found = [], {}
    try:
        light = meta_copy(model)  # so that required_pad's own copy holds no parameter data
    except Exception:
        light = model
    for c, (lo, hi) in zip(crop, tgt_pad):
        key = (c, (lo + hi + 1) // 2)
        if key not in found:
            try:
                found[key] = required_pad(light, in_chan, key[0], ndim, scale_factor, key[1])
            except StrideError:
                if light is model:
                    raise  # a model that cannot run on 'meta' is searched with real passes below
                found[key] = required_pad(model, in_chan, key[0], ndim, scale_factor, key[1])
        pads.append(found[key])
    return pads


def _pad_text(pad: Sequence[int]) -> str:
    return str(pad[0]) if len(set(pad)) == 1 else ",".join(map(str, pad))


def _suggest(model: nn.Module, in_chan: int, ds: FieldDataset) -> str:
    try:
        return f"--in-pad {_pad_text(auto_pad(model, in_chan, ds.crop, ds.ndim, ds.scale_factor, ds.tgt_pad))} " \
               "would (or use --in-pad auto)"
    except StrideError as exc:
        return f"no --in-pad fixes it: {exc}"


def check_geometry(model: nn.Module, ds: FieldDataset) -> tuple[int, tuple[int, ...]]:
    """Check crops, steps and pads against the model; return (total stride, output shape).

    Crop sizes and steps must be multiples of the total stride (the model is
    translation-equivariant only for such shifts), so must crop + pads, and
    the output must cover the target crop with an even margin so it narrows
    symmetrically onto the target.
    """
    in_chan = sum(ds.in_chan)
    stride = total_stride(model)
    check_stride(list(ds.crop), list(ds.grid.step), stride)
    window = tuple(c + lo + hi for c, (lo, hi) in zip(ds.crop, ds.in_pad))
    sym = all(lo == hi for lo, hi in ds.in_pad)
    pads = _pad_text([lo for lo, _ in ds.in_pad]) if sym else ",".join(f"{lo},{hi}" for lo, hi in ds.in_pad)
    if any(n % stride for n in window):
        raise StrideError(f"crop + in-pad = {list(window)} voxels per axis is not a multiple of the model's "
                          f"total stride {stride}; {_suggest(model, in_chan, ds)}")
    out, _ = output_shape(model, in_chan, window)
    tgt_crop = [c * ds.scale_factor for c in ds.crop]
    tgt = [c + lo + hi for c, (lo, hi) in zip(tgt_crop, ds.tgt_pad)]
    where = f"with crop {list(ds.crop)} and --in-pad {pads} the model"
    if out is None or len(out) != ds.ndim:
        raise UserError(f"{where} cannot run an input of {list(window)} voxels per axis (it rejects that "
                        f"size or shrinks it to nothing); {_suggest(model, in_chan, ds)}")
    if any(o < c or (o - t) % 2 for o, c, t in zip(out, tgt_crop, tgt)):
        raise UserError(f"{where} maps an input of {list(window)} voxels to {list(out)}, which does not cover "
                        f"the target crop {tgt_crop} (target window {tgt}) with an even margin; "
                        f"{_suggest(model, in_chan, ds)}")
    return stride, out


# ---------------------------------------------------------------- 4. criterion, optimizer, scheduler


def build_optim(args: Namespace, model: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer, Any, list[str]]:
    notes = []
    crit_cls = import_attr(args.criterion, ["torch.nn"], args.callback_at, what="criterion")
    try:
        criterion = crit_cls()
    except TypeError as exc:
        raise UserError(f"cannot build --criterion {args.criterion}(): {exc}") from None
    opt_cls = import_attr(args.optimizer, ["torch.optim"], args.callback_at, what="optimizer")
    opt_args = _json_dict(args.optimizer_args, "--optimizer-args")
    try:
        optimizer = opt_cls(model.parameters(), lr=args.lr, **opt_args)
    except (TypeError, ValueError) as exc:
        raise UserError(f"cannot build --optimizer {args.optimizer} with lr={args.lr} and "
                        f"--optimizer-args {json.dumps(opt_args)}: {exc}") from None
    scheduler = None
    if args.reduce_lr_on_plateau:
        sched_args = _json_dict(args.scheduler_args, "--scheduler-args")
        if "verbose" in sched_args:  # removed from torch; lr changes are printed anyway
            sched_args.pop("verbose")
            notes.append("--scheduler-args 'verbose' is no longer a torch option; ignored (lr changes are printed)")
        try:
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **sched_args)
        except (TypeError, ValueError) as exc:
            raise UserError(f"cannot build ReduceLROnPlateau with --scheduler-args {json.dumps(sched_args)}: "
                            f"{exc}") from None
    return criterion, optimizer, scheduler, notes


# ---------------------------------------------------------------- 5. state


def restore(args: Namespace, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
            env: DistEnv, say) -> tuple[int, float | None]:
    """Load ``--load-state`` if it exists and is not empty; return (start epoch, best loss)."""
    path = args.load_state
    # loaded on the CPU: load_state_dict copies onto the model's device, and RNG states stay CPU tensors
    state = ckpt.read_state(path, map_location="cpu") if path else None
    if state is None:
        why = "no --load-state" if not path else f"{path} is missing or empty"
        say(f"starting fresh ({why})")
        if args.init_weight_std is not None:
            init_weight_std(model, args.init_weight_std)
        return 0, None
    shown = os.path.realpath(path) if os.path.islink(path) else path
    problems = ckpt.load_model_state(model, state["model"], args.load_state_strict, source=path)
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
            if args.load_state_strict:
                raise UserError(f"the optimizer state in {path} does not fit --optimizer {args.optimizer}: {exc} "
                                "(use --load-state-non-strict to start the optimizer fresh)") from None
            say(f"note: optimizer state not loaded ({exc})")
    rngs = state.get("rng") or []
    epoch = int(state["epoch"])
    if len(rngs) == env.world_size:
        ckpt.set_rng_state(rngs[env.rank])
    else:
        ckpt.seed_all([args.seed, epoch, env.rank])
        say(f"note: {path} holds RNG states of {len(rngs)} processes, not {env.world_size}; reseeded")
    say(f"resuming from {os.path.basename(shown)} after epoch {epoch}")
    return epoch, state.get("min_loss")


def gather_rng(env: DistEnv) -> list[dict[str, Any]]:
    """Every rank's RNG states, in rank order (so that each rank resumes its own streams)."""
    mine = ckpt.rng_state()
    if not env.distributed:
        return [mine]
    everyone: list[Any] = [None] * env.world_size
    dist.all_gather_object(everyone, mine)
    return everyone


def _plain(args: Namespace) -> dict[str, Any]:
    """The arguments as JSON-compatible values (so a weights-only load reads them)."""
    items = {k: v for k, v in vars(args).items() if not callable(v)}
    return json.loads(json.dumps(items, default=str))


# ---------------------------------------------------------------- 6. the loop


@dataclass
class EpochStats:
    """What one training epoch measured (losses are means over all ranks' items)."""

    loss: float = 0.0
    items: int = 0
    seconds: float = 0.0
    wait: float = 0.0
    batch_losses: list[tuple[int, float]] = field(default_factory=list)
    last: dict[str, torch.Tensor] = field(default_factory=dict)


class _Timed:
    """Iterate a loader, adding the time spent waiting for each batch (and for the workers' start) to `wait`."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader, self.wait = loader, 0.0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        t0 = time.perf_counter()
        it = iter(self.loader)
        self.wait += time.perf_counter() - t0
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                self.wait += time.perf_counter() - t0
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
    return {"input": input[-1].detach().cpu(), "output": output[-1:].detach().cpu(),
            "target": target[-1:].detach().cpu()}


def train_epoch(epoch: int, loader: DataLoader, model: nn.Module, criterion: nn.Module,
                optimizer: torch.optim.Optimizer, env: DistEnv, device: torch.device, args: Namespace,
                writer: Any, bar: Any) -> EpochStats:
    model.train()
    stats, timed = EpochStats(), _Timed(loader)
    nbatch = len(loader)
    weighted = 0.0
    t_start = time.perf_counter()
    for i, batch in enumerate(timed):
        input = batch["input"].to(device, non_blocking=True)
        target = batch["target"].to(device, non_blocking=True)
        output = model(input)
        out, tgt = narrow_cast(output, target)
        loss = criterion(out, tgt)
        value = _mean_over_ranks(loss.detach().reshape(()).double(), env).item()
        if not math.isfinite(value):
            raise _nonfinite("loss", value, epoch, i)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = input.shape[0]
        weighted += value * n
        stats.items += n
        step = epoch * nbatch + i + 1
        if step % args.log_interval == 0:
            stats.batch_losses.append((step, value))
            if writer is not None:
                writer.add_scalar("loss/batch/train", value, global_step=step)
            bar.set_postfix(loss=f"{value:.3e}", refresh=False)
        bar.update(1)
        if i == nbatch - 1 and env.is_main:
            stats.last = _keep(input, out, tgt)
    stats.seconds = time.perf_counter() - t_start
    stats.wait = timed.wait
    stats.loss = weighted / max(stats.items, 1)
    stats.items *= env.world_size
    return stats


def validate(epoch: int, loader: DataLoader, model: nn.Module, criterion: nn.Module, env: DistEnv,
             device: torch.device) -> tuple[float, dict[str, torch.Tensor]]:
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    last: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for batch in loader:
            input = batch["input"].to(device, non_blocking=True)
            target = batch["target"].to(device, non_blocking=True)
            output = model(input)
            out, tgt = narrow_cast(output, target)
            loss = criterion(out, tgt)
            total[0] += loss.double() * input.shape[0]
            total[1] += input.shape[0]
            last = (input, out, tgt)
    if env.distributed:
        dist.all_reduce(total)
    value = (total[0] / total[1].clamp(min=1)).item()
    if not math.isfinite(value):
        raise _nonfinite("validation loss", value, epoch, None)
    return value, (_keep(*last) if last and env.is_main else {})


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


def _crop_boxsize(args: Namespace, ds: FieldDataset, out_shape: Sequence[int]) -> float | None:
    """Physical side length of the output crop, when the store knows its box size."""
    if args.train_data is None or len(set(out_shape)) != 1 or len(set(ds.size)) != 1:
        return None
    box = store.open_store(args.train_data).boxsize
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


def train(args: Namespace) -> list[dict[str, Any]]:
    """Run `m2m train` with parsed `args`; returns one record per epoch run (on every rank).

    Records hold ``epoch`` (1-based), ``train_loss``, ``val_loss`` (or None),
    ``lr``, ``items_per_s``, ``data_wait`` (fraction of the training loop's
    time spent waiting for batches) and ``batch_losses`` [(step, loss)].
    """
    env, device = setup_processes(args.dist_backend)
    opened: dict[str, Any] = {}
    try:
        with torch.autograd.set_detect_anomaly(args.detect_anomaly):
            return _train(args, env, device, opened)
    finally:
        if "writer" in opened:
            opened["writer"].close()
        if env.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _check_args(args: Namespace) -> None:
    args.misc_kwargs = _json_dict(args.misc_kwargs, "--misc-kwargs")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.loader_workers < 0:
        raise UserError(f"--loader-workers must be 0 or more, got {args.loader_workers}")
    if args.log_interval < 1:
        raise UserError(f"--log-interval must be at least 1, got {args.log_interval}")


def _data_and_model(args: Namespace, env: DistEnv, device: torch.device, say) -> tuple[Any, ...]:
    """Training (and validation) data and the model on `device`, with ``--in-pad auto`` resolved.

    Returns (train_ds, val_ds or None, model, total stride, output shape).
    """
    # data, with a zero pad first when the pad is to be found from the model
    auto = args.in_pad == "auto"
    data_seed = args.seed + env.rank  # augmentation draws differ per rank
    train_ds = make_dataset(args, "train", 0 if auto else args.in_pad, data_seed)
    in_chan, out_chan = sum(train_ds.in_chan), sum(train_ds.tgt_chan)

    # model: identical on every rank (same seed; DDP also broadcasts rank 0's)
    torch.manual_seed(args.seed)
    model = build_model(args.model, in_chan, out_chan, scale_factor=args.scale_factor, ndim=train_ds.ndim,
                        kwargs=args.misc_kwargs, callback_at=args.callback_at)
    model.to(device)
    in_pad: Any = args.in_pad
    if auto:
        in_pad = auto_pad(model, in_chan, train_ds.crop, train_ds.ndim, args.scale_factor, train_ds.tgt_pad)
        say(f"--in-pad auto: {_pad_text(in_pad)}")
        train_ds = make_dataset(args, "train", in_pad, data_seed)
    stride, out_shape = check_geometry(model, train_ds)
    val_ds = make_dataset(args, "val", in_pad, args.seed)
    if val_ds is not None and (val_ds.in_chan != train_ds.in_chan or val_ds.tgt_chan != train_ds.tgt_chan
                               or val_ds.crop != train_ds.crop):
        raise UserError(f"validation data (channels {val_ds.in_chan} -> {val_ds.tgt_chan}, crop "
                        f"{list(val_ds.crop)}) differ from training data (channels {train_ds.in_chan} -> "
                        f"{train_ds.tgt_chan}, crop {list(train_ds.crop)})")
    return train_ds, val_ds, model, stride, out_shape


def _describe(args: Namespace, env: DistEnv, device: torch.device, model: nn.Module, train_ds: FieldDataset,
              val_ds: FieldDataset | None, stride: int, out_shape: Sequence[int]) -> list[str]:
    """What is about to be trained, on what (two lines for the log)."""
    in_chan, out_chan = sum(train_ds.in_chan), sum(train_ds.tgt_chan)
    nparam = sum(p.numel() for p in model.parameters())
    return [f"model {args.model}: {nparam} parameters, total stride {stride}; input "
            f"{[in_chan, *(c + lo + hi for c, (lo, hi) in zip(train_ds.crop, train_ds.in_pad))]} -> output "
            f"{[out_chan, *out_shape]}, target crop {[out_chan, *(c * args.scale_factor for c in train_ds.crop)]}",
            f"{len(train_ds)} training items ({train_ds.nsample} samples x {train_ds.ncrop} crops)"
            + (f", {len(val_ds)} validation items" if val_ds is not None else "")
            + f"; {env.world_size} process(es) on {device.type}, batch size {args.batch_size} per process, "
            f"{args.loader_workers} loader workers"]


def _checkpoint_meta(args: Namespace, ds: FieldDataset, stride: int) -> dict[str, Any]:
    """What inference needs to know about the trained model, saved with every checkpoint."""
    return {"model": args.model, "in_chan": ds.in_chan, "tgt_chan": ds.tgt_chan,
            "in_fields": args.in_fields, "tgt_fields": args.tgt_fields, "ndim": ds.ndim,
            "crop": list(ds.crop), "in_pad": [list(p) for p in ds.in_pad],
            "tgt_pad": [list(p) for p in ds.tgt_pad], "scale_factor": args.scale_factor,
            "total_stride": stride, "in_norms": args.in_norms, "tgt_norms": args.tgt_norms,
            "misc_kwargs": args.misc_kwargs, "callback_at": args.callback_at}


def _log_epoch(writer: Any, record: dict[str, Any], stats: EpochStats, val_last: dict[str, torch.Tensor],
               in_pad, boxsize: float | None) -> None:
    """Epoch scalars, image slices and power spectra to TensorBoard (rank 0)."""
    step = record["epoch"]
    writer.add_scalar("loss/epoch/train", record["train_loss"], global_step=step)
    if record["val_loss"] is not None:
        writer.add_scalar("loss/epoch/val", record["val_loss"], global_step=step)
    writer.add_scalar("lr", record["lr"], global_step=step)
    log_images(writer, "train", stats.last, in_pad, step)
    log_images(writer, "val", val_last, in_pad, step)
    log_spectra(writer, "val" if val_last else "train", val_last or stats.last, step, boxsize)
    writer.flush()


def _train(args: Namespace, env: DistEnv, device: torch.device, opened: dict[str, Any]) -> list[dict[str, Any]]:
    def say(msg: str) -> None:
        if env.is_main:
            print(msg, flush=True)

    _check_args(args)
    if env.is_main:
        for name in ckpt.remove_stale("."):
            say(f"removed {name}, left by an interrupted checkpoint write")
    train_ds, val_ds, model, stride, out_shape = _data_and_model(args, env, device, say)

    criterion, optimizer, scheduler, notes = build_optim(args, model)
    criterion.to(device)
    for n in notes:
        say(f"note: {n}")
    start_epoch, min_loss = restore(args, model, optimizer, scheduler, env, say)
    if start_epoch == 0:  # per-rank streams from here on (e.g. dropout); a resumed run restored its own
        ckpt.seed_all([args.seed, 0, env.rank])

    raw_model = model
    if env.distributed:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)

    train_loader, train_sampler = make_loader(train_ds, args, env, device, training=True)
    val_loader = val_sampler = None
    if val_ds is not None:
        val_loader, val_sampler = make_loader(val_ds, args, env, device, training=False)
    for line in _describe(args, env, device, raw_model, train_ds, val_ds, stride, out_shape):
        say(line)

    writer = None
    if env.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = opened["writer"] = SummaryWriter()
    boxsize = _crop_boxsize(args, train_ds, out_shape) if env.is_main else None
    meta = _checkpoint_meta(args, train_ds, stride)

    if start_epoch >= args.epochs:
        say(f"already trained for {start_epoch} epochs (--epochs {args.epochs}); nothing to do")
    history = []
    for epoch in range(start_epoch, args.epochs):
        train_sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        bar = _bar(env, len(train_loader), epoch, args.epochs)
        try:
            stats = train_epoch(epoch, train_loader, model, criterion, optimizer, env, device, args,
                                writer, bar)
        finally:
            bar.close()
        val_loss, val_last = None, {}
        if val_loader is not None:
            val_sampler.set_epoch(epoch)
            val_ds.set_epoch(epoch)
            val_loss, val_last = validate(epoch, val_loader, raw_model, criterion, env, device)
        epoch_loss = val_loss if val_loss is not None else stats.loss
        if scheduler is not None:
            scheduler.step(epoch_loss)
        if min_loss is None or epoch_loss < min_loss:
            min_loss = epoch_loss
        rngs = gather_rng(env)
        record = {"epoch": epoch + 1, "train_loss": stats.loss, "val_loss": val_loss, "lr": lr,
                  "items_per_s": stats.items / max(stats.seconds, 1e-9),
                  "data_wait": stats.wait / max(stats.seconds, 1e-9), "batch_losses": stats.batch_losses}
        history.append(record)
        if env.is_main:
            _log_epoch(writer, record, stats, val_last, train_ds.in_pad, boxsize)
            state = {"epoch": epoch + 1, "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict() if scheduler is not None else None,
                     "rng": rngs, "min_loss": min_loss, "args": _plain(args), "meta": meta}
            path = ckpt.save_state(state, ".")
            val_text = f", val loss {val_loss:.4e}" if val_loss is not None else ""
            say(f"epoch {epoch + 1}/{args.epochs}: train loss {stats.loss:.4e}{val_text}, lr {lr:.3g}, "
                f"{record['items_per_s']:.1f} items/s, data wait {record['data_wait']:.1%}; saved {path.name}")
            new_lr = optimizer.param_groups[0]["lr"]
            if new_lr != lr:
                say(f"learning rate reduced from {lr:.3g} to {new_lr:.3g}")
        if env.distributed:
            dist.barrier()
    return history
