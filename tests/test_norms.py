"""Norms: exact inverses, and the flat LambdaCDM growth physics behind the cosmology norms."""

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from map2map.data import norms
from map2map.data.norms import cosmology, field
from map2map.utils.imports import import_attr

OMEGA_MS = [0.2, 0.31, 0.5, 1.0]
ZS = np.array([0.0, 0.5, 1.0, 2.0, 5.0, 20.0])


def growth_by_quadrature(z: float, omega_m: float) -> float:
    """D(z)/D(0) from D(a) ∝ E(a) ∫_0^a da' / (a' E(a'))^3, computed independently of the module."""
    def e(a):
        return np.sqrt(omega_m / a ** 3 + 1 - omega_m)

    def d(a):
        return e(a) * quad(lambda b: (b * e(b)) ** -3, 0, a, epsabs=0, epsrel=1e-12)[0]

    return d(1 / (1 + z)) / d(1.0)


def as_array(kind: str, values: np.ndarray):
    return torch.tensor(values) if kind == "torch" else values.copy()


@pytest.mark.parametrize("name", ["cosmology.dis", "cosmology.vel", "field.log1p"])
def test_found_by_name(name):
    module, attr = name.split(".")
    assert import_attr(name, ["map2map.data.norms"]) is getattr(getattr(norms, module), attr)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("norm", [cosmology.dis, cosmology.vel, field.log1p])
def test_undo_inverts(kind, norm):
    values = np.random.default_rng(0).uniform(-0.99, 3.0, size=(3, 8, 8, 8)).astype(np.float32)
    x = as_array(kind, values)
    kwargs = dict(z=1.5, dis_std=5.0, omega_m=0.3, unrelated_option="ignored")
    y = norm(x, **kwargs)
    assert not np.allclose(np.asarray(y), values)
    np.testing.assert_allclose(np.asarray(norm(y, undo=True, **kwargs)), values, rtol=1e-5, atol=1e-6)


def test_numpy_and_torch_agree():
    values = np.random.default_rng(1).uniform(-0.9, 2.0, size=(2, 8, 8))
    for norm in (cosmology.dis, cosmology.vel, field.log1p):
        np.testing.assert_allclose(norm(torch.tensor(values), z=0.7).numpy(), norm(values.copy(), z=0.7), rtol=1e-14)


def test_dis_scale_value():
    x = np.full(4, 12.0)
    z, omega_m = 2.0, 0.25
    np.testing.assert_allclose(cosmology.dis(x, z=z, omega_m=omega_m),
                               12.0 / (6.0 * growth_by_quadrature(z, omega_m)), rtol=1e-10)


def test_log1p_values():
    delta = np.array([-1.0, 0.0, 1.0, 9.0])
    np.testing.assert_allclose(field.log1p(delta.copy(), eps=1e-3), np.log(1 + delta + 1e-3), rtol=1e-12)
    np.testing.assert_allclose(field.log1p(delta[1:].copy(), eps=0.0), np.log(1 + delta[1:]), rtol=1e-14)
    assert np.isfinite(field.log1p(delta.copy())).all()


@pytest.mark.parametrize("omega_m", OMEGA_MS)
def test_growth_factor_matches_quadrature(omega_m):
    expected = [growth_by_quadrature(z, omega_m) for z in ZS]
    np.testing.assert_allclose(cosmology.growth_factor(ZS, omega_m), expected, rtol=1e-9)
    assert cosmology.growth_factor(0.0, omega_m) == pytest.approx(1.0, rel=1e-14)
    assert np.all(np.diff(cosmology.growth_factor(ZS, omega_m)) < 0)


def test_matter_domination():
    np.testing.assert_allclose(cosmology.growth_factor(ZS, 1.0), 1 / (1 + ZS), rtol=1e-14)
    np.testing.assert_allclose(cosmology.growth_rate(ZS, 1.0), 1.0, rtol=1e-14)
    # deep in matter domination LambdaCDM grows like a too
    assert cosmology.growth_rate(200.0, 0.31) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("omega_m", OMEGA_MS)
def test_growth_rate_is_log_derivative(omega_m):
    lna = np.log(1 / (1 + ZS))
    h = 1e-4
    d_plus = [growth_by_quadrature(np.exp(-(x + h)) - 1, omega_m) for x in lna]
    d_minus = [growth_by_quadrature(np.exp(-(x - h)) - 1, omega_m) for x in lna]
    expected = (np.log(d_plus) - np.log(d_minus)) / (2 * h)
    np.testing.assert_allclose(cosmology.growth_rate(ZS, omega_m), expected, rtol=1e-6)


@pytest.mark.parametrize("omega_m", [0.25, 0.31, 0.5])
def test_growth_rate_near_linder_approximation(omega_m):
    """f ~ Omega_m(z)^0.55 within 1% (it drifts to 1.3% off at omega_m = 0.2, z = 0)."""
    omega_m_z = omega_m * (1 + ZS) ** 3 / (omega_m * (1 + ZS) ** 3 + 1 - omega_m)
    np.testing.assert_allclose(cosmology.growth_rate(ZS, omega_m), omega_m_z ** 0.55, rtol=0.01)


def test_hubble():
    assert cosmology.hubble(0.0, 0.3) == 100.0
    assert cosmology.hubble(1.0, 0.3) == pytest.approx(100 * np.sqrt(0.3 * 8 + 0.7), rel=1e-14)
    np.testing.assert_allclose(cosmology.hubble(ZS, 1.0), 100 * (1 + ZS) ** 1.5, rtol=1e-14)


@pytest.mark.parametrize("z", [0.0, 0.5, 3.0])
@pytest.mark.parametrize("omega_m", [0.25, 0.31, 1.0])
def test_vel_norm_matches_zeldovich_velocity(z, omega_m):
    """psi(t) = D(t) psi0 moves particles at peculiar velocity v = a dpsi/dt = a psi0 dD/da a H."""
    psi0 = np.random.default_rng(2).normal(size=(3, 8, 8, 8))
    a, h = 1 / (1 + z), 1e-5
    dd_da = (growth_by_quadrature(1 / (a + h) - 1, omega_m) - growth_by_quadrature(1 / (a - h) - 1, omega_m)) / (2 * h)
    h_z = 100 * np.sqrt(omega_m / a ** 3 + 1 - omega_m)  # km/s/(Mpc/h)
    psi = growth_by_quadrature(z, omega_m) * psi0  # Mpc/h
    v = a * a * h_z * dd_da * psi0  # km/s
    kwargs = dict(z=z, omega_m=omega_m, dis_std=6.0)
    np.testing.assert_allclose(cosmology.vel(v, **kwargs), cosmology.dis(psi, **kwargs), rtol=1e-7)


def test_bad_omega_m():
    with pytest.raises(ValueError):
        cosmology.growth_factor(0.0, 0.0)


def test_bad_redshift():
    with pytest.raises(ValueError, match="redshift"):
        cosmology.growth_factor(-1.0)
    with pytest.raises(ValueError, match="redshift"):
        cosmology.hubble(np.array([0.0, -2.0]))


def test_one_growth_for_norms_and_synth():
    """The norms, the example data and its power spectrum all use `map2map.cosmology`'s D(z)."""
    from map2map import cosmology as physics
    from map2map import synth

    for name in ("growth_factor", "growth_rate", "hubble", "H0"):
        assert getattr(cosmology, name) is getattr(physics, name)
    k = np.logspace(-2, 0, 5)
    np.testing.assert_allclose(synth.linear_power(k, redshift=2.0),
                               physics.growth_factor(2.0) ** 2 * synth.linear_power(k), rtol=1e-14)
    assert synth.second_order_growth(physics.growth_factor(1.0)) == pytest.approx(
        -3 / 7 * growth_by_quadrature(1.0, 0.31) ** 2, rel=1e-9)
