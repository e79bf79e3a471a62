"""Tests of map2map.models: narrowing, resampling, blocks, models, strides and pads, P(k), lag2eul."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from map2map.errors import UserError
from map2map.models import (G, ConvBlock, init_weights, ResBlock, Resampler, StrideError, UNet, VNet, check_stride,
                            lag2eul, narrow_by, narrow_cast, narrow_like, power, required_pad,
                            resample, resample_edge, total_stride)
from map2map.utils.imports import import_attr



pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _zero_params(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


# ---------------------------------------------------------------- narrowing

def test_narrow_by_matches_slicing():
    a = _rand(2, 3, 8, 9, 10)
    assert torch.equal(narrow_by(a, 2), a[:, :, 2:-2, 2:-2, 2:-2])
    assert torch.equal(narrow_by(a, 0), a)
    with pytest.raises(ValueError):
        narrow_by(a, 5)
    with pytest.raises(ValueError):
        narrow_by(a, -1)


def test_narrow_like_per_axis_and_errors():
    a = _rand(1, 2, 10, 12)
    b = torch.zeros(1, 5, 6, 4)
    assert torch.equal(narrow_like(a, b), a[:, :, 2:8, 4:8])
    assert torch.equal(narrow_like(a, (6, 4)), a[:, :, 2:8, 4:8])
    assert torch.equal(narrow_like(a, (7, 3)), a[:, :, 1:8, 4:7])  # an odd excess: the extra voxel from the end
    with pytest.raises(ValueError):
        narrow_like(a, (12, 4))
    with pytest.raises(ValueError, match="spatial axes"):
        narrow_like(a, (6, 4, 2))


def test_narrow_cast_to_smallest():
    a, b, c = _rand(1, 1, 10, 8), _rand(1, 2, 6, 12), _rand(1, 1, 8, 6, seed=1)
    na, nb, nc = narrow_cast(a, b, c)
    assert torch.equal(na, a[:, :, 2:8, 1:7])
    assert torch.equal(nb, b[:, :, :, 3:9])
    assert torch.equal(nc, c[:, :, 1:7, :])


# ---------------------------------------------------------------- resampling

def _np_linear(x: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Separable linear interpolation at x_j = (j + 1/2)/s - 1/2 along every axis,
    and the mask of output positions (per axis) that stay within [0, n - 1]."""
    inside = []
    for axis in range(x.ndim):
        n = x.shape[axis]
        coords = (np.arange(round(n * scale)) + 0.5) / scale - 0.5
        x = np.apply_along_axis(lambda v: np.interp(coords, np.arange(n), v), axis, x)
        inside.append((coords >= 0) & (coords <= n - 1))
    return x, inside


@pytest.mark.parametrize("scale", [2, 3, 4, 0.5, 0.25, 1.5])
def test_resample_matches_numpy_and_cuts_exactly_the_clamped_edge(scale):
    x = _rand(1, 1, 8, 12, dtype=torch.float64)
    ref, inside = _np_linear(x[0, 0].numpy(), scale)
    for axis_inside in inside:
        edge = int(np.argmax(axis_inside))
        assert axis_inside.sum() == len(axis_inside) - 2 * edge
        assert edge == resample_edge(scale)
    ref = ref[np.ix_(*inside)]
    out = resample(x, scale)
    np.testing.assert_allclose(out[0, 0].numpy(), ref, atol=1e-12)
    assert torch.equal(Resampler(2, scale)(x), out)
    with pytest.raises(ValueError, match="spatial axes"):
        Resampler(3, scale)(x)
    assert resample(x, scale, narrow=False).shape[2:] == (8 * scale, 12 * scale)


def test_resample_3d_shape_and_errors():
    x = _rand(2, 3, 4, 6, 8)
    assert resample(x, 2).shape == (2, 3, 6, 10, 14)
    assert resample(x, 0.5).shape == (2, 3, 2, 3, 4)
    with pytest.raises(ValueError, match="not an integer"):
        resample(x, 1 / 3)


# ---------------------------------------------------------------- blocks

@pytest.mark.parametrize("dim", [2, 3])
def test_conv_block_sizes_and_channels(dim):
    x = _rand(2, 3, *(8,) * dim)
    expect = {"CBA": 6, "CACA": 4, "U": 16, "DBA": 4, "UBAC": 14}
    for seq, size in expect.items():
        assert ConvBlock(3, 5, seq=seq, dim=dim)(x).shape == (2, 5) + (size,) * dim
    block = ConvBlock(2, 5, 7, seq="CAC", dim=dim)
    convs = [m for m in block.convs if isinstance(m, nn.modules.conv._ConvNd)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(2, 7), (7, 5)]
    assert ConvBlock(4, seq="C", dim=dim).convs[0].out_channels == 4
    with pytest.raises(ValueError, match="unknown layer"):
        ConvBlock(3, seq="CXA", dim=dim)


def test_res_block_skip_is_narrowed_input():
    x = _rand(2, 3, 10, 10, 10)
    block = _zero_params(ResBlock(3, seq="CBACB")).eval()
    assert torch.equal(block(x), narrow_by(x, 2))
    block = _zero_params(ResBlock(3, 2, seq="CAC", dim=3))
    with torch.no_grad():
        block.skip.weight[:, :, 0, 0, 0] = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, -1.0]])
    y = block(x)
    ref = torch.stack([x[:, 0] + 2 * x[:, 1], -x[:, 2]], dim=1)
    torch.testing.assert_close(y, narrow_by(ref, 2))
    with pytest.raises(ValueError, match="cannot resize"):
        ResBlock(3, seq="CUC")


# ---------------------------------------------------------------- models

@pytest.mark.parametrize("model_cls", [UNet, VNet])
@pytest.mark.parametrize("dim,sizes", [(2, (44, 48, 60)), (3, (44, 48))])
def test_unet_vnet_shapes(model_cls, dim, sizes):
    model = model_cls(3, 2, scale_factor=1, dim=dim, width=2).eval()
    for n in sizes:
        assert model(_rand(1, 3, *(n,) * dim)).shape == (1, 2) + (n - 40,) * dim
    with pytest.raises(ValueError):
        model(_rand(1, 3, *(46,) * dim))


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("scale", [1, 2, 4])
def test_g_shapes(dim, scale):
    n = 10
    model = G(2, 2, scale_factor=scale, dim=dim, chan_base=4, chan_min=2, chan_max=4)
    size = n
    for _ in range(scale.bit_length() - 1):  # each block maps s to 2s - 6
        size = 2 * size - 6
    assert model(_rand(1, 2, *(n,) * dim)).shape == (1, 2) + (size,) * dim
    with pytest.raises(ValueError, match="in_chan == out_chan"):
        G(2, 3, scale_factor=scale, dim=dim)
    with pytest.raises(ValueError, match="power of 2"):
        G(2, 2, scale_factor=3, dim=dim)


@pytest.mark.parametrize("name", ["UNet", "VNet", "G"])
def test_models_accept_scale_factor_by_name(name):
    model_cls = import_attr(name, ["map2map.models"])
    model = model_cls(1, 1, scale_factor=2, dim=2, width=2)
    assert isinstance(model, nn.Module)


def test_bypass_adds_narrowed_input():
    x = _rand(1, 2, 48, 48)
    for model_cls in (UNet, VNet):
        model = _zero_params(model_cls(2, 2, dim=2, width=2)).eval()
        assert torch.equal(model(x), narrow_by(x, 20))
        assert not model_cls(2, 3, dim=2, width=2).bypass
        assert not model_cls(2, 2, bypass=False, dim=2, width=2).bypass
        with pytest.raises(ValueError, match="bypass"):
            model_cls(2, 3, bypass=True, dim=2, width=2)
    g = _zero_params(G(2, 2, scale_factor=2, dim=2, chan_base=4, chan_min=2))
    up = F.interpolate(x, scale_factor=2, mode="bilinear")
    assert torch.equal(g(x), narrow_by(up, 3))


def _periodic(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Periodic padding of every spatial axis, by wrapped indices (any pad, even beyond the field size)."""
    for axis in range(2, x.dim()):
        n = x.shape[axis]
        x = x.index_select(axis, torch.arange(-pad, n + pad) % n)
    return x


@pytest.mark.parametrize("model_cls", [UNet, VNet])
@pytest.mark.parametrize("dim,n", [(2, 16), (3, 8)])
def test_unet_vnet_translation_equivariance(model_cls, dim, n):
    torch.manual_seed(0)
    model = model_cls(2, 2, bypass=False, dim=dim, width=4).eval()
    init_weights(model, 0.01)  # He init: the deep level contributes visibly (torch's default damps it)
    stride = total_stride(model)
    pad = required_pad(model, 2, n, dim)
    axes = tuple(range(2, 2 + dim))
    x = _rand(1, 2, *(n,) * dim, seed=3)
    with torch.no_grad():
        y = model(_periodic(x, pad))
        assert y.shape[2:] == x.shape[2:]
        shifted = model(_periodic(torch.roll(x, (stride,) * dim, axes), pad))
        torch.testing.assert_close(shifted, torch.roll(y, (stride,) * dim, axes))
        half = model(_periodic(torch.roll(x, (stride // 2,) * dim, axes), pad))
        assert (half - torch.roll(y, (stride // 2,) * dim, axes)).abs().max() > 1e-3 * y.abs().max()


def test_g_translation_equivariance_in_output_voxels():
    torch.manual_seed(0)
    model = G(1, 1, scale_factor=2, dim=2, chan_base=4, chan_min=4)
    x = _rand(1, 1, 8, 8, seed=5)
    pad = required_pad(model, 1, 8, 2, scale_factor=2)
    with torch.no_grad():
        y = narrow_like(model(_periodic(x, pad)), (16, 16))
        shifted = narrow_like(model(_periodic(torch.roll(x, (1, -2), (2, 3)), pad)), (16, 16))
    torch.testing.assert_close(shifted, torch.roll(y, (2, -4), (2, 3)))


# ---------------------------------------------------------------- stride and pad

def test_total_stride():
    assert total_stride(UNet(1, 1, dim=2, width=2)) == 4
    assert total_stride(VNet(1, 1, dim=3, width=2)) == 4
    assert total_stride(G(1, 1, scale_factor=4, dim=2, chan_base=2, chan_min=2)) == 1
    assert total_stride(nn.Sequential(nn.Conv3d(1, 2, 3), nn.Conv3d(2, 1, 3))) == 1
    deep = nn.Sequential(nn.Conv2d(1, 1, 2, stride=2), nn.MaxPool2d(2), nn.ConvTranspose2d(1, 1, 2, 2),
                         nn.Conv2d(1, 1, 2, stride=(2, 2)), Resampler(2, 0.5))
    assert total_stride(deep) == 8
    deep.total_stride = 3
    assert total_stride(deep) == 3


def test_check_stride():
    check_stride(32, 16, 4)
    check_stride([32, 64], None, 4)
    with pytest.raises(StrideError, match="crop 30 .* 28 or 32"):
        check_stride(30, 32, 4)
    with pytest.raises(ValueError, match="crop step 18 .* 16 or 20"):
        check_stride(32, [16, 18], 4)
    with pytest.raises(UserError, match="crop 3 .* 4"):
        check_stride(3, None, 4)


def _covers(model: nn.Module, in_chan: int, size: int, dim: int, target: int) -> bool:
    """Independent check: does a real forward pass on `size` voxels give >= target, with an even excess?"""
    try:
        with torch.no_grad():
            out = model(torch.zeros((1, in_chan) + (size,) * dim)).shape[2]
    except (RuntimeError, ValueError):
        return False
    return out >= target and (out - target) % 2 == 0


@pytest.mark.parametrize("model,in_chan,crop,dim,scale,tgt_pad,expect", [
    (UNet(2, 2, dim=2, width=2), 2, 16, 2, 1, 0, 20),
    (UNet(2, 2, dim=2, width=2), 2, 18, 2, 1, 0, 21),
    (VNet(1, 3, dim=3, width=2), 1, 8, 3, 1, 0, 20),
    (VNet(1, 1, dim=2, width=2), 1, 16, 2, 1, 2, 22),
    (G(1, 1, scale_factor=2, dim=2, chan_base=2, chan_min=2), 1, 16, 2, 2, 0, 2),
    (G(1, 1, scale_factor=2, dim=2, chan_base=2, chan_min=2), 1, 16, 2, 2, 2, 3),
    (G(2, 2, scale_factor=4, dim=3, chan_base=2, chan_min=2), 2, 8, 3, 4, 0, 3),
    (nn.Conv2d(1, 1, 5), 1, 10, 2, 1, 0, 2),
])
def test_required_pad_is_smallest_cover(model, in_chan, crop, dim, scale, tgt_pad, expect):
    model.train()
    pad = required_pad(model, in_chan, crop, dim, scale_factor=scale, tgt_pad=tgt_pad)
    assert model.training
    assert pad == expect
    model.eval()
    target = crop * scale + 2 * tgt_pad
    assert _covers(model, in_chan, crop + 2 * pad, dim, target)
    assert not any(_covers(model, in_chan, crop + 2 * p, dim, target) for p in range(pad))


class _NoMeta(nn.Module):
    """Narrows by 3 and reads a value with .item(), which a 'meta' tensor cannot do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return narrow_by(x, 3) + x.new_zeros(()).item()


def test_required_pad_falls_back_to_real_passes_and_fails_clearly():
    assert required_pad(_NoMeta(), 1, 8, 2) == 3
    with pytest.raises(StrideError, match="no pad up to 10"):
        required_pad(nn.Conv2d(1, 1, 2), 1, 8, 2, max_pad=10)
    with pytest.raises(StrideError):
        required_pad(UNet(3, 3, dim=2, width=2), 1, 8, 2, max_pad=30)


@pytest.mark.parametrize("make,in_chan,crop,dim,scale", [
    (lambda: VNet(3, 3, dim=2, width=4), 3, 8, 2, 1),
    (lambda: UNet(1, 1, dim=3, width=2), 1, 8, 3, 1),
    (lambda: G(1, 1, scale_factor=2, dim=2), 1, 6, 2, 2),
    (lambda: nn.Sequential(nn.Conv3d(2, 4, 3), nn.LeakyReLU(), nn.Conv3d(4, 2, 5)), 2, 8, 3, 1),
])
def test_real_and_meta_probes_agree(monkeypatch, make, in_chan, crop, dim, scale):
    """Probes run for real within a cost budget (a small model on the CPU) and on a 'meta' copy beyond it;
    with every pass real (an unbounded budget) or every pass meta (no budget), pads and shapes agree."""
    from map2map.models import stride

    model = make()
    got = {}
    for budget in (0.0, float("inf")):
        monkeypatch.setattr(stride, "REAL_PASS_FLOPS", budget)
        pad = required_pad(model, in_chan, crop, dim, scale_factor=scale)
        got[budget] = pad, stride.output_shape(model, in_chan, (crop + 2 * pad,) * dim)
    assert got[0.0] == got[float("inf")]
    assert all(n >= crop * scale and (n - crop * scale) % 2 == 0 for n in got[0.0][1])  # covers the target


@pytest.mark.parametrize("budget", [0.0, float("inf")])
def test_a_shape_memo_runs_each_window_once_and_changes_nothing(monkeypatch, budget):
    """With a memo shared by the pad search and the window's probe (as one inference plan shares it), the
    window's shape, already found by the search's last pass, is not run again; pads and shapes are those
    found without a memo, whether the passes are real or on 'meta'.  (The memo keeps real passes only.)"""
    from map2map.models import stride

    monkeypatch.setattr(stride, "REAL_PASS_FLOPS", budget)
    calls = []
    real = stride._run_shape
    monkeypatch.setattr(stride, "_run_shape", lambda m, c, shape: calls.append(tuple(shape)) or real(m, c, shape))
    model = nn.Sequential(nn.Conv3d(2, 4, 3), nn.LeakyReLU(), nn.Conv3d(4, 2, 3))
    plain = required_pad(model, 2, 6, 3), stride.output_shape(model, 2, (10,) * 3)
    calls.clear()
    memo = {}
    pad = required_pad(model, 2, 6, 3, memo=memo)
    searched = list(calls)
    assert (pad, stride.output_shape(model, 2, (6 + 2 * pad,) * 3, memo)) == plain == (2, (6, 6, 6))
    assert searched == [(6,) * 3, (8,) * 3, (10,) * 3]
    # real passes are memoised: the window of pad 2 was the search's last pass; 'meta' ones are not (cheap)
    assert calls == searched + ([] if budget > 0 else [(10,) * 3])


# ---------------------------------------------------------------- power spectrum

def _np_power(x: np.ndarray, boxsize: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brute force: full FFT, every mode visited, nearest-integer |k| shells."""
    n, ndim = x.shape[2], x.ndim - 2
    cells = n ** ndim
    volume = cells if boxsize is None else boxsize ** ndim
    pk = (np.abs(np.fft.fftn(x, axes=tuple(range(2, x.ndim)))) ** 2).sum(axis=1).mean(axis=0)
    freq = np.fft.fftfreq(n) * n
    ksum, psum, count = {}, {}, {}
    for idx in itertools.product(range(n), repeat=ndim):
        kmag = np.sqrt(sum(freq[i] ** 2 for i in idx))
        shell = int(np.floor(kmag + 0.5))
        if shell == 0:
            continue
        ksum[shell] = ksum.get(shell, 0) + kmag
        psum[shell] = psum.get(shell, 0) + pk[idx]
        count[shell] = count.get(shell, 0) + 1
    shells = sorted(count)
    nmodes = np.array([count[s] for s in shells])
    k = np.array([ksum[s] for s in shells]) / nmodes
    if boxsize is not None:
        k = k * 2 * np.pi / boxsize
    p = np.array([psum[s] for s in shells]) / nmodes * volume / cells ** 2
    return k, p, nmodes


@pytest.mark.parametrize("shape,boxsize", [((2, 2, 8, 8, 8), None), ((1, 3, 7, 7, 7), 100.0),
                                           ((3, 1, 10, 10), 5.0), ((2, 1, 9, 9), None)])
def test_power_matches_numpy_brute_force(shape, boxsize):
    x = _rand(*shape, seed=7, dtype=torch.float64)
    k, p, nmodes = power(x, boxsize)
    k_ref, p_ref, n_ref = _np_power(x.numpy(), boxsize)
    np.testing.assert_array_equal(nmodes.numpy(), n_ref)
    np.testing.assert_allclose(k.numpy(), k_ref, rtol=1e-12)
    np.testing.assert_allclose(p.numpy(), p_ref, rtol=1e-10)


def test_power_plane_wave_and_gradient():
    n, k0, amp = 16, 3, 2.0
    grid = torch.arange(n, dtype=torch.float64)
    x = (amp * torch.cos(2 * np.pi * k0 * grid / n)).expand(n, n, n)[None, None].clone().requires_grad_()
    k, p, nmodes = power(x)
    shell = int((k - k0).abs().argmin())
    # two modes (+-k0) each with |delta_k| = amp N / 2, P = |delta_k|^2 / N, averaged over the shell
    assert p[shell].item() == pytest.approx(2 * (amp * n ** 3 / 2) ** 2 / n ** 3 / nmodes[shell].item())
    assert torch.count_nonzero(p > 1e-9) == 1
    p[shell].backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="equal spatial"):
        power(torch.zeros(1, 1, 8, 6))


# ---------------------------------------------------------------- lag2eul

def _np_cic(dis: np.ndarray, val: np.ndarray) -> np.ndarray:
    """Brute-force periodic CIC, one particle at a time."""
    ndim, spatial = dis.shape[0], dis.shape[1:]
    out = np.zeros(spatial)
    for q in itertools.product(*(range(n) for n in spatial)):
        pos = np.array(q) + dis[(slice(None),) + q]
        base = np.floor(pos).astype(int)
        frac = pos - base
        for corner in itertools.product((0, 1), repeat=ndim):
            w = np.prod([f if c else 1 - f for f, c in zip(frac, corner)])
            out[tuple((base + np.array(corner)) % np.array(spatial))] += w * val[q]
    return out


def test_lag2eul_uniform_cases():
    zero = torch.zeros(2, 3, 8, 8, 8)
    assert torch.equal(lag2eul(zero), torch.ones(2, 1, 8, 8, 8))
    shift = torch.tensor([2.0, -3.0, 9.0]).reshape(1, 3, 1, 1, 1).expand(2, 3, 8, 8, 8)
    assert torch.equal(lag2eul(shift), torch.ones(2, 1, 8, 8, 8))


def test_lag2eul_half_voxel_shift_splits_mass():
    val = _rand(1, 2, 6, 5, dtype=torch.float64)
    dis = torch.zeros(1, 2, 6, 5, dtype=torch.float64)
    dis[:, 0] = 0.5
    out = lag2eul(dis, val)
    torch.testing.assert_close(out, 0.5 * val + 0.5 * torch.roll(val, 1, 2))


def test_lag2eul_matches_brute_force_and_conserves_mass():
    dis = 3 * _rand(2, 3, 4, 4, 4, seed=11, dtype=torch.float64)
    val = 1 + _rand(2, 1, 4, 4, 4, seed=12, dtype=torch.float64).abs()
    out = lag2eul(dis, val)
    for b in range(2):
        np.testing.assert_allclose(out[b, 0].numpy(), _np_cic(dis[b].numpy(), val[b, 0].numpy()), atol=1e-12)
    torch.testing.assert_close(out.sum(dim=(2, 3, 4)), val.sum(dim=(2, 3, 4)))
    assert lag2eul(dis).sum().item() == pytest.approx(2 * 64)


def test_lag2eul_units_and_gradient():
    dis = _rand(1, 2, 5, 5, seed=2, dtype=torch.float64)
    ref = lag2eul(dis)
    torch.testing.assert_close(lag2eul(dis * 25.0, boxsize=125.0), ref)
    torch.testing.assert_close(lag2eul(dis * 5.0, boxsize=50.0, meshsize=10), ref)
    torch.testing.assert_close(lag2eul(dis / 6.0, dis_norm=6.0), ref)
    dis = (0.7 * dis).requires_grad_()
    val = _rand(1, 1, 5, 5, seed=3, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda d, v: lag2eul(d, v), (dis, val))


@pytest.mark.parametrize("cls", ["UNet", "VNet"])
def test_bypass_models_start_as_identity(cls):
    """With the global bypass on, the untrained model predicts its (narrowed) input: training starts at the
    trivial prediction instead of below it."""
    import map2map.models as models

    model = getattr(models, cls)(3, 3, dim=3, width=4, scale_factor=1, identity_init=True).eval()
    x = torch.randn(1, 3, 48, 48, 48)
    with torch.no_grad():
        y = model(x)
    assert torch.equal(y, models.narrow_like(x, y))
