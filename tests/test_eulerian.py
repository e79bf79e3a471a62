"""The Eulerian loss (`map2map.models.eulerian`): densities against a brute-force cloud-in-cell painting
in numpy (units, periodic window, narrowing to the crop), the ``--loss`` combinations against their
formulas, and gradients finite and equal to finite differences."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from map2map.errors import UserError
from map2map.models.eulerian import LOSSES, LagEulLoss, check_loss, combine, eulerian_density

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def brute_cic(dis: np.ndarray, voxels_per_unit: float) -> np.ndarray:
    """CIC painting of one sample (ndim, *spatial), particle by particle and corner by corner."""
    ndim, shape = dis.shape[0], dis.shape[1:]
    rho = np.zeros(shape)
    for q in itertools.product(*(range(n) for n in shape)):
        pos = [q[a] + dis[(a, *q)] * voxels_per_unit for a in range(ndim)]
        low = [math.floor(p) for p in pos]
        for corner in itertools.product((0, 1), repeat=ndim):
            w = 1.0
            for a in range(ndim):
                f = pos[a] - low[a]
                w *= f if corner[a] else 1 - f
            rho[tuple((low[a] + corner[a]) % shape[a] for a in range(ndim))] += w
    return rho


def sample_dis(shape, seed, amplitude=1.5, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=gen, dtype=dtype) * 2 - 1) * amplitude


@pytest.mark.parametrize("ndim, window", [(2, (7, 6)), (3, (5, 4, 6))])
def test_density_equals_brute_force_painting_in_box_units(ndim, window):
    dis = sample_dis((2, ndim, *window), seed=ndim)
    dis_norm, boxsize, meshsize = 2.0, 50.0, 20  # a voxel is 2.5 length units; dis * 2 in length units
    got = eulerian_density(dis, 0, dis_norm=dis_norm, boxsize=boxsize, meshsize=meshsize)
    assert got.shape == (2, 1, *window)
    for n in range(2):
        want = brute_cic(dis[n].numpy(), dis_norm * meshsize / boxsize)
        np.testing.assert_allclose(got[n, 0].numpy(), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.mean(dim=tuple(range(2, 2 + ndim))).numpy(), 1.0, rtol=1e-12)


def test_density_inside_the_crop_is_the_periodic_window_narrowed():
    dis = sample_dis((1, 2, 10, 9), seed=3)
    want = brute_cic(dis[0].numpy(), 1.0)
    got = eulerian_density(dis, ((2, 1), (3, 2)))
    np.testing.assert_allclose(got[0, 0].numpy(), want[2:-1, 3:-2], rtol=1e-12)
    np.testing.assert_allclose(eulerian_density(dis, 2)[0, 0].numpy(), want[2:-2, 2:-2], rtol=1e-12)


def test_density_inside_the_crop_is_exact_when_particles_move_less_than_the_pad():
    """Painting the padded window periodically gives inside the crop what painting the whole box gives."""
    box = sample_dis((1, 2, 16, 16), seed=4, amplitude=0.9)
    whole = brute_cic(box[0].numpy(), 1.0)
    window = box[:, :, 3:13, 2:14]  # a crop [5, 11) x [4, 12) with a pad of 2 voxels
    got = eulerian_density(window, 2)
    np.testing.assert_allclose(got[0, 0].numpy(), whole[5:11, 4:12], rtol=1e-12)


def test_half_precision_is_painted_in_float32():
    dis = sample_dis((1, 2, 6, 6), seed=5, dtype=torch.float16)
    got = eulerian_density(dis)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got[0, 0].numpy(), brute_cic(dis[0].float().numpy(), 1.0), rtol=1e-5)


@pytest.mark.parametrize("loss, weight", [("lag", None), ("eul", None), ("lag_eul", None), ("lag_eul", 0.3)])
def test_loss_terms_and_their_combination(loss, weight):
    out, tgt = sample_dis((2, 2, 8, 8), seed=6), sample_dis((2, 2, 8, 8), seed=7)
    terms = LagEulLoss(nn.MSELoss(), loss, weight, margin=1, dis_norm=0.5)(out, tgt)
    lag = float(((out - tgt) ** 2).mean())
    rho_out = np.stack([brute_cic(d, 0.5) for d in out.numpy()])[:, 1:-1, 1:-1]
    rho_tgt = np.stack([brute_cic(d, 0.5) for d in tgt.numpy()])[:, 1:-1, 1:-1]
    eul = float(((rho_out - rho_tgt) ** 2).mean())
    assert float(terms.lag) == pytest.approx(lag, rel=1e-12)
    if loss == "lag":
        assert terms.eul is None and terms.total is terms.lag
        return
    assert float(terms.eul) == pytest.approx(eul, rel=1e-12)
    want = {"eul": eul, "lag_eul": math.log(lag ** 3 * eul) if weight is None else lag + weight * eul}[loss]
    assert float(terms.total) == pytest.approx(want, rel=1e-12)


def test_extra_channels_are_not_painted():
    out, tgt = sample_dis((1, 3, 6, 6), seed=8), sample_dis((1, 3, 6, 6), seed=9)
    loss = LagEulLoss(nn.MSELoss(), "eul")
    assert float(loss(out, tgt).total) == pytest.approx(float(loss(out[:, :2], tgt[:, :2]).total), rel=1e-12)
    with pytest.raises(UserError, match="paints a displacement of 2 channels, but the output has 1"):
        loss(out[:, :1], tgt[:, :1])


@pytest.mark.parametrize("loss, weight", [("eul", None), ("lag_eul", None), ("lag_eul", 2.0)])
def test_gradients_are_finite_and_match_finite_differences(loss, weight):
    out, tgt = sample_dis((1, 2, 5, 5), seed=10, amplitude=0.8), sample_dis((1, 2, 5, 5), seed=11)
    fn = LagEulLoss(nn.MSELoss(), loss, weight, margin=1)
    out.requires_grad_(True)
    fn(out, tgt).total.backward()
    grad = out.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    h = 1e-6
    with torch.no_grad():
        for index in [(0, 0, 1, 2), (0, 1, 3, 3), (0, 0, 4, 0), (0, 1, 2, 1)]:
            plus, minus = out.clone(), out.clone()
            plus[index] += h
            minus[index] -= h
            fd = (float(fn(plus, tgt).total) - float(fn(minus, tgt).total)) / (2 * h)
            assert float(grad[index]) == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_combine_formulas():
    lag, eul = torch.tensor(0.2, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64)
    assert float(combine("lag_eul", lag, eul)) == pytest.approx(math.log(0.2 ** 3 * 3.0), rel=1e-14)
    assert float(combine("lag_eul", lag, eul, 0.5)) == pytest.approx(1.7, rel=1e-14)


@pytest.mark.parametrize("loss, weight, match", [
    ("euler", None, "--loss 'euler' is not one of lag, eul, lag_eul"),
    ("lag", 1.0, "--eul-weight 1.0 weighs the Eulerian term of --loss lag_eul only"),
    ("lag_eul", -1.0, "--eul-weight must be a number >= 0")])
def test_bad_loss_options(loss, weight, match):
    with pytest.raises(UserError, match=match):
        check_loss(loss, weight)
    assert LOSSES == ("lag", "eul", "lag_eul")


def test_box_size_needs_its_mesh_size():
    with pytest.raises(UserError, match="box size and its mesh size together"):
        LagEulLoss(nn.MSELoss(), "eul", boxsize=100.0)


def test_dis_norm_from_the_target_norm():
    from map2map.data.norms.cosmology import dis, dis_scale
    from map2map.models.eulerian import dis_norm_of

    kwargs = {"z": 1.0, "dis_std": 6.0, "omega_m": 0.3}
    assert dis_norm_of(dis, kwargs) == pytest.approx(dis_scale(1.0, 6.0, 0.3), rel=1e-12)
    assert dis_norm_of(None) == 1.0
    with pytest.raises(UserError, match=r"^the Eulerian loss needs .*is not a positive scaling \(undoing it maps "
                                        r"1, 2, -3 to 2.718, 7.389, 0.04979\)"):
        dis_norm_of(lambda x, undo=False, **kw: np.exp(x) if undo else np.log(x), {})
