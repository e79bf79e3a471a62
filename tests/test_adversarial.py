"""The adversarial tools of `map2map.models` against independent computations: closed forms, finite
differences, and torch's own spectral normalization."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from map2map.models import (DiceLoss, InstanceNoise, PatchGAN, PatchGAN42, WDistLoss, add_spectral_norm,
                            grad_penalty_reg, rm_spectral_norm, wgan_grad_penalty)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def small_critic(in_chan: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(in_chan, 3, 2), nn.Tanh(), nn.Conv3d(3, 1, 2)).double()


# ---------------------------------------------------------------- WDistLoss and DiceLoss

def test_wasserstein_loss_is_minus_signed_mean():
    x = torch.tensor([[0.5, -2.0], [1.5, 3.0]])
    assert WDistLoss()(x, torch.ones_like(x)).item() == pytest.approx(-3.0 / 4)
    assert WDistLoss()(x, torch.zeros_like(x)).item() == pytest.approx(3.0 / 4)
    fake, real = torch.tensor([1.0, 2.0]), torch.tensor([4.0, 8.0])
    critic = WDistLoss()(fake, torch.zeros(2)) + WDistLoss()(real, torch.ones(2))
    assert critic.item() == pytest.approx(fake.mean().item() - real.mean().item())


def test_dice_loss_by_hand():
    a = torch.tensor([1.0, 1.0, 0.0, 0.0])
    b = torch.tensor([0.0, 1.0, 1.0, 0.0])
    assert DiceLoss()(a, a).item() == pytest.approx(0.0)
    assert DiceLoss()(a, 1 - a).item() == pytest.approx(1.0)
    assert DiceLoss()(a, b).item() == pytest.approx(1 - 2 * 1 / (2 + 2))
    assert DiceLoss(eps=1.0)(a, b).item() == pytest.approx(1 - (2 + 1) / (4 + 1))


# ---------------------------------------------------------------- penalties

def test_r1_of_a_linear_discriminator_is_its_squared_weight_sum():
    torch.manual_seed(1)
    lin = nn.Linear(6, 4).double()  # scores of one item: W x + b, 4 of them
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    r1 = grad_penalty_reg(lin(x), x)
    assert r1.item() == pytest.approx(lin.weight.sum(0).pow(2).sum().item(), rel=1e-12)


def _fd_grad(f, x: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    g = torch.zeros_like(x)
    flat, gflat = x.view(-1), g.view(-1)
    for i in range(flat.numel()):
        keep = flat[i].item()
        flat[i] = keep + h
        up = f(x)
        flat[i] = keep - h
        down = f(x)
        flat[i] = keep
        gflat[i] = (up - down) / (2 * h)
    return g


def test_r1_equals_finite_differences_and_its_gradient_reaches_the_weights():
    d = small_critic()
    x = torch.randn(2, 2, 3, 3, 3, dtype=torch.float64)
    with torch.no_grad():  # d(sum of item b's scores)/d(x_b) by central differences, then the mean squared norm
        grad = _fd_grad(lambda z: d(z).sum().item(), x.clone())
    want = grad.pow(2).flatten(1).sum(1).mean().item()
    sample = x.clone().requires_grad_(True)
    r1 = grad_penalty_reg(d(sample), sample)
    assert r1.item() == pytest.approx(want, rel=1e-6)
    # the penalty is differentiable in the weights: autograd's gradient equals finite differences of R1
    r1.backward()
    w = d[0].weight

    def r1_at(weight):
        with torch.no_grad():
            w.copy_(weight)
        s = x.clone().requires_grad_(True)
        return grad_penalty_reg(d(s), s).item()

    auto = w.grad.clone()
    fd = _fd_grad(r1_at, w.detach().clone())
    assert torch.allclose(auto, fd, rtol=1e-5, atol=1e-8)


def test_wgan_penalty_of_a_linear_critic_is_closed_form():
    w = torch.randn(1, 2, 3, 3, 3, dtype=torch.float64)

    def critic(z):  # per-voxel score w * z: the per-item mean has gradient w / numel, whatever z is
        return w * z

    x, y = torch.randn(4, 2, 3, 3, 3, dtype=torch.float64), torch.randn(4, 2, 3, 3, 3, dtype=torch.float64)
    gp = wgan_grad_penalty(critic, x, y, lam=10.0)
    norm = (w / w.numel()).norm().item()
    assert gp.item() == pytest.approx(10.0 * (norm - 1) ** 2, rel=1e-12)


def test_wgan_penalty_equals_finite_differences_at_its_random_points():
    d = small_critic(seed=3)
    x, y = torch.randn(2, 2, 3, 3, 3, dtype=torch.float64), torch.randn(2, 2, 3, 3, 3, dtype=torch.float64)
    torch.manual_seed(7)
    gp = wgan_grad_penalty(d, x, y, lam=3.0)
    torch.manual_seed(7)  # the same draws: one weight per item
    a = torch.rand(2, 1, 1, 1, 1, dtype=torch.float64)
    z = a * x + (1 - a) * y
    with torch.no_grad():
        grad = _fd_grad(lambda t: d(t).flatten(1).mean(1).sum().item(), z.clone())
    want = 3.0 * ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean().item()
    assert gp.item() == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------- spectral norm

@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("cls", [PatchGAN, PatchGAN42])
def test_spectral_norm_on_every_layer_as_torch_puts_it(cls, dim):
    torch.manual_seed(0)
    ours = cls(2, dim=dim)
    theirs = copy.deepcopy(ours)
    torch.manual_seed(5)
    add_spectral_norm(ours)
    torch.manual_seed(5)  # torch's own spectral_norm on the same layers, in the same order
    convs = [m for m in theirs.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear))]
    for m in convs:
        nn.utils.spectral_norm(m)
    keys = ours.state_dict().keys()
    assert keys == theirs.state_dict().keys()
    assert sum(k.endswith("weight_orig") for k in keys) == len(convs) == 4
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)
    x = torch.randn(2, 2, *(26,) * dim)  # PatchGAN42 needs 22 voxels per axis
    assert torch.equal(ours(x), theirs(x))
    add_spectral_norm(ours)  # twice is once
    assert ours.state_dict().keys() == keys


def test_spectral_norm_makes_the_largest_singular_value_one_and_comes_off():
    torch.manual_seed(0)
    conv = nn.Conv3d(3, 5, 3)
    net = add_spectral_norm(nn.Sequential(conv))
    x = torch.randn(1, 3, 4, 4, 4)
    for _ in range(30):  # power iterations, one per training forward pass
        net(x)
    sigma = torch.linalg.matrix_norm(conv.weight.detach().reshape(5, -1), ord=2).item()
    assert sigma == pytest.approx(1.0, rel=1e-4)
    net.eval()
    before = net(x)
    rm_spectral_norm(net)
    assert "weight_orig" not in dict(net.named_parameters()) and isinstance(conv.weight, nn.Parameter)
    assert not conv._forward_pre_hooks
    assert torch.allclose(net(x), before)


# ---------------------------------------------------------------- instance noise

def test_instance_noise_decays_linearly_to_zero_and_resumes():
    noise = InstanceNoise(0.8, 4)
    stds = [noise.std() for _ in range(6)]
    assert stds == pytest.approx([0.6, 0.4, 0.2, 0.0, 0.0, 0.0])
    a = InstanceNoise(1.0, 10)
    for _ in range(3):
        a.std()
    b = InstanceNoise(1.0, 10)
    b.load_state_dict(a.state_dict())
    assert [a.std() for _ in range(8)] == [b.std() for _ in range(8)]
    with pytest.raises(ValueError):
        InstanceNoise(-1.0, 3)
    with pytest.raises(ValueError):
        InstanceNoise(1.0, 0)
