"""The adversary of `m2m train --adv-model`: a discriminator trained against the generator, batch by batch.

Terms (see also `map2map.models.adversarial`):

* *batch number*: the global 1-based count of training batches,
  ``epoch * batches per epoch + i + 1``; intervals count in it.
* *active*: the adversary takes part from epoch ``--adv-start`` (0-based) on;
  before that training is supervised only, exactly as without it.
* *discriminator samples*: the generator's output (fake) and the target
  (real), both narrowed to their common shape, with instance noise added,
  and with ``--cgan`` the input, brought to the target's grid
  (`condition`), in front of their channels.

One active batch (`Adversary.step`), as in the original toolkit:

1. The discriminator's step: its criterion on the fake samples (label 0)
   plus on the real ones (label ``--adv-label-smoothing``); every
   ``--adv-r1-reg-interval`` batches plus ``gamma / 2 * N * R1`` of the real
   samples (lazy R1, N the interval), every ``--adv-wgan-gp-interval``
   batches plus N times the WGAN gradient penalty; one backward pass, the
   gradients averaged over ranks, one optimizer step.
2. Every ``--adv-iter-ratio`` batches, the generator's loss: the
   discriminator's criterion on the fake samples with label 1 (the
   discriminator frozen), alone or, with ``--adv-weight W``, as
   ``supervised + W * adversarial``; the caller steps the generator on it.
   Batches in between train the discriminator alone.

Several processes: the discriminator is not wrapped in DDP (it runs several
forward passes and a double backward per batch); its gradients are averaged
with one all-reduce and its buffers (batch-norm statistics, spectral-norm
vectors) are broadcast from rank 0 after each step, as DDP would do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn

from map2map.errors import UserError
from map2map.models import narrow_like, resample
from map2map.models.adversarial import InstanceNoise, grad_penalty_reg, wgan_grad_penalty

WGAN_GP_LAMBDA = 10.0  # the original's weight of the WGAN gradient penalty

# TrainConfig fields of the adversary and their "off" values: any other value needs --adv-model
OPTIONS_OFF = {"adv_model_spectral_norm": False, "cgan": False, "adv_r1_reg_interval": 0,
               "adv_wgan_gp_interval": 0, "instance_noise": 0.0, "adv_weight": None, "adv_lr": None,
               "adv_optimizer_args": None, "adv_start": 0, "adv_label_smoothing": 1.0, "adv_iter_ratio": 1,
               "adv_criterion": "BCEWithLogitsLoss", "adv_r1_reg_gamma": 2.0, "instance_noise_batches": 10000}
FIELDS = ("adv_model", *OPTIONS_OFF)

# TensorBoard tags of the adversary's values per batch (per epoch: "/batch/" becomes "/epoch/")
TAGS = {"D": "loss/batch/train/adv/D", "D/fake": "loss/batch/train/adv/D/fake",
        "D/real": "loss/batch/train/adv/D/real", "G": "loss/batch/train/adv/G",
        "r1": "loss/batch/train/adv/r1", "gp": "loss/batch/train/adv/gp",
        "score/fake": "score/batch/train/fake", "score/real": "score/batch/train/real",
        "instance_noise": "adv/batch/instance_noise"}


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_options(cfg: Any) -> None:
    """Refuse adversarial options out of range, or given without ``--adv-model`` (one line each)."""
    if cfg.adv_model is None:
        given = [option(k) for k, off in OPTIONS_OFF.items() if getattr(cfg, k) != off]
        if given:
            raise UserError(f"{given[0]} needs --adv-model NAME (the discriminator it is about), e.g. "
                            "--adv-model PatchGAN")
        return
    for name in ("adv_r1_reg_interval", "adv_wgan_gp_interval", "adv_start"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 0:
            raise UserError(f"{option(name)} must be 0 (off) or a positive number of "
                            f"{'epochs' if name == 'adv_start' else 'batches'}, got {value}")
    for name in ("adv_iter_ratio", "instance_noise_batches"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{option(name)} must be at least 1, got {value}")
    s = cfg.adv_label_smoothing
    if not (isinstance(s, (int, float)) and 0 < s <= 1):
        raise UserError(f"--adv-label-smoothing is the real label and must be in (0, 1], got {s}")
    if not (math.isfinite(cfg.instance_noise) and cfg.instance_noise >= 0):
        raise UserError(f"--instance-noise must be a finite standard deviation of 0 or more, got "
                        f"{cfg.instance_noise}")
    for name in ("adv_lr", "adv_r1_reg_gamma"):
        value = getattr(cfg, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"{option(name)} must be a positive finite number, got {value}")
    if cfg.adv_weight is not None and not (math.isfinite(cfg.adv_weight) and cfg.adv_weight >= 0):
        raise UserError(f"--adv-weight must be a finite weight of 0 or more, got {cfg.adv_weight}")
    if cfg.amp == "fp16":
        raise UserError("--amp fp16 with --adv-model is not supported (one loss scaler per network would be "
                        "needed); use --amp bf16 or off")


def describe(adv: "Adversary") -> str:
    """One line for the log: the discriminator and what is on."""
    cfg = adv.cfg
    nparam = sum(p.numel() for p in adv.model.parameters())
    on = [f"criterion {cfg.adv_criterion}", f"from epoch {cfg.adv_start + 1}"]
    on += ["spectral norm"] * cfg.adv_model_spectral_norm + ["conditional (--cgan)"] * cfg.cgan
    weighted = f"supervised + {cfg.adv_weight:g} x adversarial" if cfg.adv_weight is not None else ""
    on.append(f"generator loss {weighted or 'adversarial alone'}")
    if cfg.adv_iter_ratio > 1:
        on.append(f"{cfg.adv_iter_ratio} discriminator steps per generator step")
    if cfg.adv_r1_reg_interval:
        on.append(f"R1 every {cfg.adv_r1_reg_interval} batches (gamma {cfg.adv_r1_reg_gamma:g})")
    if cfg.adv_wgan_gp_interval:
        on.append(f"WGAN gradient penalty every {cfg.adv_wgan_gp_interval} batches")
    if cfg.adv_label_smoothing != 1:
        on.append(f"real label {cfg.adv_label_smoothing:g}")
    if cfg.instance_noise > 0:
        on.append(f"instance noise {cfg.instance_noise:g} to 0 over {cfg.instance_noise_batches} batches")
    return f"adversary {cfg.adv_model}: {nparam} parameters; " + ", ".join(on)


def condition(input: torch.Tensor, target: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """``--cgan``: the input brought to the target's grid: upsampled (linear interpolation) by
    `scale_factor`, then narrowed to the target's spatial shape (the excess taken evenly from both ends, as
    outputs are narrowed to targets)."""
    if scale_factor != 1:
        input = resample(input, scale_factor, narrow=False)
    if any(a < b for a, b in zip(input.shape[2:], target.shape[2:])):
        raise UserError(f"--cgan: the input on the target's grid, {list(input.shape[2:])}, is smaller than the "
                        f"target crop {list(target.shape[2:])}; give a larger --in-pad")
    return narrow_like(input, target)


@dataclass
class AdvStats:
    """Sums over an epoch's active batches (per rank, before averaging); `n` counts the batches of each."""

    sums: dict[str, float] = field(default_factory=dict)
    n: dict[str, int] = field(default_factory=dict)

    def add(self, values: Mapping[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.n[k] = self.n.get(k, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.n[k] for k in self.sums}


class Adversary:
    """The discriminator with its criterion, optimizer, scheduler and instance noise (see the module
    docstring); built by `map2map.train.build_adversary`."""

    def __init__(self, cfg: Any, model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, distributed: bool) -> None:
        self.cfg, self.model, self.criterion = cfg, model, criterion
        self.optimizer, self.scheduler = optimizer, scheduler
        self.noise = InstanceNoise(cfg.instance_noise, cfg.instance_noise_batches)
        self.distributed = distributed
        self.stats = AdvStats()

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "noise": self.noise.state_dict()}

    def restore(self, state: Mapping[str, Any] | None, path: str, say) -> None:
        """Continue from a training state's ``adv`` entry; without one (a state written without
        ``--adv-model``) the adversary starts fresh, and says so."""
        if not state:
            say(f"note: {path} holds no discriminator (written without --adv-model); the adversary "
                f"{self.cfg.adv_model} starts fresh")
            return
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None and state.get("scheduler") is not None:
                self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"the discriminator state in {path} does not fit --adv-model {self.cfg.adv_model}: "
                            f"{first} (start fresh with --load-state '')") from None
        self.noise.load_state_dict(state["noise"])

    def sync_parameters(self) -> None:
        """Every rank starts from rank 0's discriminator."""
        if self.distributed:
            for t in [*self.model.parameters(), *self.model.buffers()]:
                dist.broadcast(t.data, 0)

    # ------------------------------------------------------------ one batch

    def active(self, epoch: int) -> bool:
        return epoch >= self.cfg.adv_start

    def generator_steps(self, batch: int) -> bool:
        """Whether the generator steps at `batch` (every ``--adv-iter-ratio``-th batch)."""
        return batch % self.cfg.adv_iter_ratio == 0

    def _labels(self, like: torch.Tensor, value: float) -> torch.Tensor:
        return torch.full_like(like, value)

    def step(self, batch: int, input: torch.Tensor, output: torch.Tensor, target: torch.Tensor,
             supervised: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, float]]:
        """One active batch (module docstring): the discriminator steps; returns the generator's loss (None
        when the generator does not step at this batch) and this rank's values for the log."""
        cfg, d, crit = self.cfg, self.model, self.criterion
        std = self.noise.std() if cfg.instance_noise > 0 else 0.0
        fake, real = output, target.detach()
        if std > 0:
            fake = fake + std * torch.randn_like(fake)
            real = real + std * torch.randn_like(real)
        if cfg.cgan:
            cond = condition(input, target, cfg.scale_factor).to(fake.dtype)
            fake, real = torch.cat([cond, fake], 1), torch.cat([cond, real], 1)

        d.train()
        d.requires_grad_(True)
        self.optimizer.zero_grad(set_to_none=True)
        score_fake = d(fake.detach())
        score_real = d(real)
        loss_fake = crit(score_fake, self._labels(score_fake, 0.0))
        loss_real = crit(score_real, self._labels(score_real, cfg.adv_label_smoothing))
        total = loss_fake + loss_real
        log = {"D": (loss_fake + loss_real).item(), "D/fake": loss_fake.item(), "D/real": loss_real.item(),
               "score/fake": score_fake.detach().float().mean().item(),
               "score/real": score_real.detach().float().mean().item()}
        if cfg.instance_noise > 0:
            log["instance_noise"] = std
        n = cfg.adv_r1_reg_interval
        if n and batch % n == 0:
            sample = real.detach().requires_grad_(True)
            r1 = grad_penalty_reg(d(sample), sample)
            total = total + cfg.adv_r1_reg_gamma / 2 * n * r1
            log["r1"] = r1.item()
        n = cfg.adv_wgan_gp_interval
        if n and batch % n == 0:
            gp = wgan_grad_penalty(d, fake, real, WGAN_GP_LAMBDA)
            total = total + n * gp
            log["gp"] = gp.item()
        total.backward()
        self._average_grads()
        self.optimizer.step()
        self._broadcast_buffers()

        if not self.generator_steps(batch):
            return None, log
        d.requires_grad_(False)
        try:
            score = d(fake)
            adv = crit(score, self._labels(score, 1.0))
        finally:
            d.requires_grad_(True)
        log["G"] = adv.item()
        loss = adv if cfg.adv_weight is None else supervised + cfg.adv_weight * adv
        return loss, log

    def _average_grads(self) -> None:
        if not self.distributed:
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def _broadcast_buffers(self) -> None:
        if self.distributed:
            for b in self.model.buffers():
                dist.broadcast(b.data, 0)
