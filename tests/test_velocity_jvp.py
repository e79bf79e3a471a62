"""The derivative of a styled model's output with respect to a physical style parameter
(`map2map.models.velocity`), by forward mode, against central finite differences in float64 on a small
`StyledVNet` in eval mode: through the style norm (dD physical) and without one (normalised), and the
total derivative when the input itself is proportional to D."""

from __future__ import annotations

import pytest
import torch

from map2map.data.styles import StyleNorm
from map2map.errors import UserError
from map2map.models.build import forward
from map2map.models.styled import BatchNormStyled, StyledVNet
from map2map.models.velocity import linear_input_tangent, output_and_derivative, style_tangent
from map2map.models.vnet import VNet

pytestmark = pytest.mark.usefixtures("torch_one_thread")

NORM = StyleNorm(("Om", "D"), (0.3, 0.75), (0.05, 0.25))


def small_model(dim: int, seed: int = 0) -> StyledVNet:
    torch.manual_seed(seed)
    model = StyledVNet(dim, dim, 2, dim=dim, width=3).double()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial batch statistics, which eval mode uses
        for m in model.modules():
            if isinstance(m, BatchNormStyled):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen, dtype=torch.float64) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen, dtype=torch.float64) + 0.5)
    return model.eval()


def central_difference(model, x, physical, index, h, norm):
    """(f(p + h e) - f(p - h e)) / 2h of the model at physical styles `physical`, normalised by `norm`."""
    plus, minus = physical.clone(), physical.clone()
    plus[:, index] += h
    minus[:, index] -= h
    with torch.no_grad():
        f = [forward(model, x, norm.apply(p) if norm is not None else p) for p in (plus, minus)]
    return (f[0] - f[1]) / (2 * h)


@pytest.mark.parametrize("dim, size", [(2, 44), (3, 44)])
def test_derivative_with_respect_to_physical_d_matches_central_difference(dim, size):
    model = small_model(dim)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, dim, *(size,) * dim, generator=gen, dtype=torch.float64)
    physical = torch.tensor([[0.31, 0.72], [0.27, 0.55]], dtype=torch.float64)
    out, dout = output_and_derivative(model, x, NORM.apply(physical), 1, NORM)
    with torch.no_grad():
        torch.testing.assert_close(out, forward(model, x, NORM.apply(physical)), rtol=1e-12, atol=1e-12)
    fd = central_difference(model, x, physical, 1, 1e-6, NORM)
    assert dout.shape == out.shape == (2, dim, *(size - 40,) * dim)
    rel = (dout - fd).norm() / fd.norm()
    assert float(rel) <= 1e-6
    assert float(fd.norm()) > 0
    # the chain rule through the norm: d/dD physical is d/ds normalised over the D scale
    _, d_norm = output_and_derivative(model, x, NORM.apply(physical), 1)
    torch.testing.assert_close(dout, d_norm / NORM.scale[1], rtol=1e-12, atol=1e-12)


def test_total_derivative_of_an_input_proportional_to_d():
    """A ZA input at D is D times a fixed field: the velocity is the derivative of model(D psi, D)."""
    model = small_model(2, seed=5)
    gen = torch.Generator().manual_seed(9)
    psi = torch.randn(2, 2, 44, 48, generator=gen, dtype=torch.float64)
    physical = torch.tensor([[0.31, 0.72], [0.27, 0.55]], dtype=torch.float64)
    d = physical[:, 1]
    x = psi * d.reshape(-1, 1, 1, 1)
    out, dout = output_and_derivative(model, x, NORM.apply(physical), 1, NORM, linear_input_tangent(x, d))
    h = 1e-6
    with torch.no_grad():
        f = []
        for sign in (1, -1):
            p = physical.clone()
            p[:, 1] += sign * h
            f.append(forward(model, psi * p[:, 1].reshape(-1, 1, 1, 1), NORM.apply(p)))
    fd = (f[0] - f[1]) / (2 * h)
    assert float((dout - fd).norm() / fd.norm()) <= 1e-6
    _, partial = output_and_derivative(model, x, NORM.apply(physical), 1, NORM)
    assert float((partial - fd).norm() / fd.norm()) > 1e-2  # the style alone is not the whole derivative
    with pytest.raises(ValueError, match="one positive growth factor per sample"):
        linear_input_tangent(x, torch.tensor([0.5, 0.0]))


def test_each_sample_gets_its_own_derivative():
    model = small_model(2, seed=3)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 2, 44, 48, generator=gen, dtype=torch.float64)
    styles = NORM.apply(torch.tensor([[0.3, 0.6], [0.32, 0.9], [0.28, 1.0]], dtype=torch.float64))
    _, batch = output_and_derivative(model, x, styles, 1, NORM)
    for n in range(3):
        _, alone = output_and_derivative(model, x[n:n + 1], styles[n:n + 1], 1, NORM)
        torch.testing.assert_close(batch[n:n + 1], alone, rtol=1e-10, atol=1e-12)


def test_tangent_and_errors():
    style = torch.zeros(2, 2, dtype=torch.float64)
    torch.testing.assert_close(style_tangent(style, 1, NORM), torch.tensor([[0, 4.0], [0, 4.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="index 2 is outside the model's 2 style parameters"):
        output_and_derivative(small_model(2), torch.zeros(1, 2, 44, 44, dtype=torch.float64), style[:1], 2)
    with pytest.raises(UserError, match="VNet is not styled but was given styles"):
        output_and_derivative(VNet(2, 2, dim=2, width=2).double(), torch.zeros(1, 2, 44, 44, dtype=torch.float64),
                              style[:1], 0)


def test_displacement_and_derivative_from_physical_styles():
    from map2map.models.velocity import displacement_and_derivative

    model = small_model(2, seed=6)
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 2, 44, 44, generator=gen, dtype=torch.float64)
    physical = torch.tensor([[0.31, 0.72], [0.27, 0.55]], dtype=torch.float64)
    got = displacement_and_derivative(model, x, physical, NORM)
    want = output_and_derivative(model, x, NORM.apply(physical), 1, NORM, x / physical[:, 1].reshape(-1, 1, 1, 1))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    partial = displacement_and_derivative(model, x, physical, NORM, input_scales=False)[1]
    torch.testing.assert_close(partial, output_and_derivative(model, x, NORM.apply(physical), 1, NORM)[1])
    with pytest.raises(UserError, match="--velocity needs a style parameter D, but the model's styles are Om"):
        displacement_and_derivative(model, x, physical[:, :1], StyleNorm(("Om",), (0.3,), (0.1,)))


def test_velocity_factors_per_sample():
    import numpy as np

    from map2map.cosmology import growth_factor, growth_rate, hubble
    from map2map.models.velocity import velocity_factors

    z, om = np.array([0.0, 0.5, 2.0]), np.array([0.3, 0.25, 0.35])
    d = np.array([growth_factor(zi, oi) for zi, oi in zip(z, om)])
    want = np.array([hubble(zi, oi) * growth_rate(zi, oi) * di / (1 + zi) for zi, oi, di in zip(z, om, d)])
    np.testing.assert_allclose(velocity_factors(np.stack([om, d], 1), ("Om", "D")), want, rtol=1e-9)
    # without an Omega_m style, the given one
    want31 = hubble(0.5, 0.31) * growth_rate(0.5, 0.31) * growth_factor(0.5, 0.31) / 1.5
    np.testing.assert_allclose(velocity_factors([[growth_factor(0.5, 0.31)]], ("D",)), [want31], rtol=1e-9)


@pytest.mark.parametrize("d", [0.0, -0.5, 50.0])
def test_growth_factor_out_of_range(d):
    from map2map.models.velocity import velocity_factors

    with pytest.raises(UserError, match=f"style D={d:g} is no growth factor of flat LambdaCDM with Omega_m=0.31"):
        velocity_factors([[d]], ("D",))
