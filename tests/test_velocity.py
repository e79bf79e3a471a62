"""Peculiar velocity from dpsi/dD (`cosmology.peculiar_velocity`): analytic limits, finite differences of the
growth factor in ln a, and the LPT velocities obtained by differentiating synth's displacements in time."""

from __future__ import annotations

import numpy as np
import pytest

from map2map import cosmology, synth

N, L = 16, 64.0


def z_of_lna(lna: float) -> float:
    return float(np.exp(-lna) - 1.0)


@pytest.mark.parametrize("z", [0.0, 0.5, 2.0, 9.0])
def test_einstein_de_sitter_by_hand(z):
    """Omega_m = 1: D = a, f = 1, H = 100 a^-3/2, so a H f D = 100 a^1/2 km/s/(Mpc/h)."""
    a = 1 / (1 + z)
    assert cosmology.velocity_factor(z, 1.0) == pytest.approx(100 * np.sqrt(a), rel=1e-12)
    assert np.allclose(cosmology.peculiar_velocity(np.array([1.0, -2.0]), z, 1.0), [100 * a ** 0.5, -200 * a ** 0.5])


@pytest.mark.parametrize("omega_m", [0.2, 0.31, 0.5])
@pytest.mark.parametrize("z", [0.0, 0.7, 3.0])
def test_factor_is_a_h_times_finite_difference_of_d_in_ln_a(z, omega_m):
    """a H dD/dln a, with dD/dln a a central difference of `growth_factor` (not of the closed-form f)."""
    lna, h = -np.log1p(z), 1e-4
    dd_dlna = (cosmology.growth_factor(z_of_lna(lna + h), omega_m)
               - cosmology.growth_factor(z_of_lna(lna - h), omega_m)) / (2 * h)
    want = cosmology.scale_factor(z) * cosmology.hubble(z, omega_m) * dd_dlna
    assert cosmology.velocity_factor(z, omega_m) == pytest.approx(want, rel=1e-7)


def test_arrays_of_redshifts_and_torch_tensors():
    zs = np.array([0.0, 1.0, 2.0])
    assert np.allclose(cosmology.velocity_factor(zs), [cosmology.velocity_factor(z) for z in zs])
    torch = pytest.importorskip("torch")
    t = torch.ones(3, 4, 4, 4, dtype=torch.float32)
    v = cosmology.peculiar_velocity(t, 0.5)
    assert isinstance(v, torch.Tensor) and v.dtype == torch.float32
    assert torch.allclose(v, torch.full_like(t, cosmology.velocity_factor(0.5)))


def _lpt(delta_l: np.ndarray, d: float) -> tuple[np.ndarray, np.ndarray]:
    """(psi1, psi2) at growth factor d from the linear field today, by synth's own LPT."""
    return synth.za_displacement(d * delta_l, L), synth.lpt2_correction(d * delta_l, L)


@pytest.mark.parametrize("z", [0.0, 1.5])
def test_lpt_velocities_are_a_h_dpsi_dlna(z):
    """v = a H dpsi/dln a of synth's 1LPT and 2LPT displacements (central differences in ln a), equal to
    peculiar_velocity of dpsi/dD (central differences in D) and to the linear-theory a H f (psi1 + 2 psi2)."""
    om = 0.31
    delta_l = synth.linear_field(N, L, np.random.default_rng(3))
    lna, h = -np.log1p(z), 1e-4
    a, hub = cosmology.scale_factor(z), cosmology.hubble(z, om)
    d = cosmology.growth_factor(z, om)
    plus = _lpt(delta_l, cosmology.growth_factor(z_of_lna(lna + h), om))
    minus = _lpt(delta_l, cosmology.growth_factor(z_of_lna(lna - h), om))
    psi1, psi2 = _lpt(delta_l, d)
    f = cosmology.growth_rate(z, om)
    scale = np.abs(a * hub * f * psi1).max()
    for order, want_lpt in ((1, psi1), (2, psi1 + 2 * psi2)):
        dpsi_dlna = sum(p - m for p, m in zip(plus[:order], minus[:order])) / (2 * h)
        by_time = a * hub * dpsi_dlna
        dd = 1e-4 * d
        dpsi_dd = sum(p - m for p, m in zip(_lpt(delta_l, d + dd)[:order], _lpt(delta_l, d - dd)[:order])) / (2 * dd)
        v = cosmology.peculiar_velocity(dpsi_dd, z, om)
        assert np.abs(v - by_time).max() < 1e-6 * scale
        assert np.abs(cosmology.peculiar_velocity(want_lpt / d, z, om) - by_time).max() < 1e-6 * scale


def test_linear_velocity_divergence_is_minus_a_h_f_delta():
    """Linear theory: div v = -a H f delta for the 1LPT velocity of the linear field delta at z."""
    z, om = 0.5, 0.31
    delta = synth.linear_field(N, L, np.random.default_rng(4), z)
    psi1 = synth.za_displacement(delta, L)
    v = cosmology.peculiar_velocity(psi1 / cosmology.growth_factor(z, om), z, om)
    k = 2 * np.pi * np.fft.fftfreq(N, L / N)
    div = sum(np.fft.ifftn(1j * k.reshape([-1 if a == i else 1 for a in range(3)]) * np.fft.fftn(v[i])).real
              for i in range(3))
    want = -cosmology.scale_factor(z) * cosmology.hubble(z, om) * cosmology.growth_rate(z, om) * delta
    assert np.abs(div - want).max() < 1e-8 * np.abs(want).max()


@pytest.mark.parametrize("omega_m", [0.25, 0.31, 1.0])
@pytest.mark.parametrize("z", [0.0, 0.3, 2.0, 50.0])
def test_redshift_of_growth_inverts_growth_factor(z, omega_m):
    assert cosmology.redshift_of_growth(cosmology.growth_factor(z, omega_m), omega_m) == pytest.approx(z, abs=1e-9)


@pytest.mark.parametrize("d", [0.0, -0.5, 10.0, float("nan")])
def test_redshift_of_growth_refuses_growth_out_of_range(d):
    with pytest.raises(ValueError, match="out of range"):
        cosmology.redshift_of_growth(d)
