"""Tools of adversarial training, under the original toolkit's names.

Terms:

* *discriminator* (or *critic*): a model that scores fields, real (targets)
  or fake (generator outputs); a patch discriminator (`PatchGAN`) gives a
  field of scores, one per patch.
* *labels*: the value a criterion is asked to give a score: 1 real, 0 fake
  (a real label below 1 is one-sided label smoothing).
* *R1*: the squared norm of the discriminator's gradient with respect to
  real samples, per sample, averaged over the batch (`grad_penalty_reg`).
* *WGAN gradient penalty*: ``lam * (|grad| - 1)^2`` of the critic's gradient
  at random points between fake and real samples (`wgan_grad_penalty`).
* *instance noise*: Gaussian noise added to both real and fake samples
  before the discriminator sees them, its standard deviation falling
  linearly to zero over a number of batches (`InstanceNoise`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.nn.utils.spectral_norm import SpectralNorm

# layers that carry a weight matrix spectral normalization applies to
_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)


class WDistLoss(nn.Module):
    """Wasserstein distance loss of a critic: ``-mean((2 y - 1) x)`` for scores x and labels y.

    With label 1 the loss is minus the mean score, with label 0 the mean
    score, so a critic trained on fake (0) plus real (1) minimizes
    mean(fake scores) - mean(real scores), and a generator (label 1) raises
    its samples' scores.
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return -((2 * target - 1) * input).mean()


def grad_penalty_reg(score: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """R1 of `score` (the discriminator's output on `sample`, which requires grad): the squared norm of
    d(sum of the sample's scores)/d(sample) per sample, averaged over the batch.  Differentiable (the graph
    is kept), so adding it to a loss penalizes the discriminator's parameters."""
    grad, = torch.autograd.grad(score.sum(), sample, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def wgan_grad_penalty(critic: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                      lam: float = 10.0) -> torch.Tensor:
    """WGAN-GP penalty of `critic` between fake samples `x` and real samples `y` (same shape).

    Each item gets one uniform weight a (torch's global generator); the
    critic scores z = a x + (1 - a) y, its scores averaged per item; the
    penalty is ``lam * mean over items of (|d score / d z| - 1)^2``.
    """
    a = torch.rand(x.shape[0], *(1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
    z = (a * x.detach() + (1 - a) * y.detach()).requires_grad_(True)
    score = critic(z).flatten(1).mean(1).sum()
    grad, = torch.autograd.grad(score, z, create_graph=True)
    return lam * (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


def add_spectral_norm(module: nn.Module) -> nn.Module:
    """Put torch's spectral normalization (`torch.nn.utils.spectral_norm`) on every convolution and linear
    layer of `module`, in place; returns `module`.  Their weights become ``weight_orig`` (a parameter) with
    the power-iteration vectors ``weight_u`` and ``weight_v`` (buffers), all in the state_dict."""
    for m in list(module.modules()):
        if isinstance(m, _WEIGHTED) and not _has_spectral_norm(m):
            nn.utils.spectral_norm(m)
    return module


def rm_spectral_norm(module: nn.Module) -> nn.Module:
    """Undo `add_spectral_norm` in place: each layer keeps its current normalized weight as a plain
    ``weight`` parameter; returns `module`."""
    for m in list(module.modules()):
        if isinstance(m, _WEIGHTED) and _has_spectral_norm(m):
            nn.utils.remove_spectral_norm(m)
    return module


def _has_spectral_norm(m: nn.Module) -> bool:
    return any(isinstance(h, SpectralNorm) for h in m._forward_pre_hooks.values())


def noise_std(init_std: float, batches: int, drawn: int) -> float:
    """Instance noise's standard deviation at its `drawn`-th draw (from 1): ``init_std (1 - drawn /
    batches)``, and 0 from draw `batches` on."""
    return init_std * max(0.0, 1.0 - drawn / batches)


class InstanceNoise:
    """Instance noise annealed linearly to zero: each call of `std` is one batch.

    The state (`state_dict`: the number of draws so far) goes into training
    checkpoints, so a resumed run continues the schedule where it stopped.
    """

    def __init__(self, init_std: float, batches: int) -> None:
        if not init_std >= 0:
            raise ValueError(f"instance noise std must be 0 or more, got {init_std}")
        if batches < 1:
            raise ValueError(f"instance noise needs at least 1 batch to decay over, got {batches}")
        self.init_std, self.batches, self.drawn = float(init_std), int(batches), 0

    def std(self) -> float:
        """The standard deviation for the next batch (advances the schedule)."""
        self.drawn += 1
        return noise_std(self.init_std, self.batches, self.drawn)

    def state_dict(self) -> dict[str, Any]:
        return {"init_std": self.init_std, "batches": self.batches, "drawn": self.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.drawn = int(state["drawn"])


class DiceLoss(nn.Module):
    """Soft Dice loss over all elements: ``1 - (2 sum(x y) + eps) / (sum(x^2) + sum(y^2) + eps)``."""

    def __init__(self, eps: float = 0.0) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x, y = input.reshape(-1), target.reshape(-1)
        return 1 - (2 * (x * y).sum() + self.eps) / ((x * x).sum() + (y * y).sum() + self.eps)
