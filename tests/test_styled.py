"""The styled (modulated) convolutions and the original toolkit's `StyledVNet`: the golden state file loads
strictly and reproduces the golden output, every sample of a batch gets what it gets alone, the modulated
convolution equals an independent computation, and the geometry, bypass and style checks hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from golden import golden
from map2map.errors import UserError
from map2map.modelfit import auto_pad, check_geometry
from map2map.models.build import build_model, forward, style_size_of, zero_style
from map2map.models.narrow import narrow_by
from map2map.models.stride import output_shape, required_pad
from map2map.models.srsgan import G
from map2map.models.styled import (DEMOD_EPS, BatchNormStyled, ConvStyled, ConvStyledBlock, LeakyReLUStyled,
                                   ResStyledBlock, StyledG, StyledVNet)
from map2map.models.stride import total_stride
from map2map.models.vnet import VNet

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# kind, kernel_size: the 3-voxel and 1-voxel (skip) convolutions, the strided down and transposed up ones
CONV_KINDS = [("C", 3), ("C", 1), ("D", None), ("U", None)]


def conv_params(style_size: int, cin: int, cout: int, kernel: int, dim: int) -> int:
    """Parameters of one modulated convolution: style weight and bias, weight, bias."""
    return cin * style_size + cin + cout * cin * kernel ** dim + cout


def styled_vnet_params(in_chan: int, out_chan: int, style_size: int, width: int, dim: int) -> int:
    """The parameter count of StyledVNet, block by block from the layout of its docstring."""
    s, w = style_size, width

    def c(cin, cout, k=3):
        return conv_params(s, cin, cout, k, dim)

    def b(chan):
        return 2 * chan

    res_cbacba = c(w, w) + b(w) + c(w, w) + b(w) + c(w, w, 1)
    resize = c(w, w, 2) + b(w)  # 'DBA' and 'UBA'
    m0, m1 = max(in_chan, w), max(2 * w, out_chan)
    return (c(in_chan, m0) + c(m0, w) + b(w) + c(in_chan, w, 1)          # conv_l0
            + resize + res_cbacba + resize + res_cbacba + resize         # down_l0 .. up_r1
            + c(2 * w, 2 * w) + b(2 * w) + c(2 * w, w) + b(w) + c(2 * w, w, 1)  # conv_r1
            + resize                                                     # up_r0
            + c(2 * w, m1) + c(m1, out_chan) + c(2 * w, out_chan, 1))    # conv_r0


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomize_norms(model: torch.nn.Module, seed: int) -> None:
    """Give every batch norm non-trivial running statistics and affine parameters (eval mode uses them)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BatchNormStyled):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


# --------------------------------------------------------------------------- golden data


@pytest.fixture(scope="module")
def golden_model():
    state = torch.load(golden("StyledVNet.state.pt"), map_location="cpu", weights_only=True)["model"]
    model = StyledVNet(style_size=2, in_chan=3, out_chan=3)  # the original's construction, by keyword
    return model, state


def test_golden_state_loads_strictly_with_the_same_keys_and_shapes(golden_model):
    model, state = golden_model
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == [(k, tuple(v.shape)) for k, v in state.items()]
    model.load_state_dict(state, strict=True)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_golden_output_reproduced_in_eval_mode(golden_model):
    model, state = golden_model
    model.load_state_dict(state, strict=True)
    x = torch.from_numpy(np.load(golden("StyledVNet.in.npy")))
    style = torch.from_numpy(np.load(golden("StyledVNet.style.npy")))
    want = np.load(golden("StyledVNet.out.npy"))
    model.eval()
    with torch.no_grad():
        got = model(x, style).numpy()
    assert got.shape == want.shape == (1, 3, 16, 16, 16)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_original_parameter_count():
    assert n_params(StyledVNet(3, 3, 2)) == styled_vnet_params(3, 3, 2, 64, 3) == 1_829_656


def test_golden_parameter_count(golden_model):
    model, state = golden_model
    assert n_params(model) == sum(state[name].numel() for name, _ in model.named_parameters())


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("in_chan, out_chan, style_size, width", [(1, 5, 3, 4), (6, 2, 1, 3)])
def test_parameter_count(dim, in_chan, out_chan, style_size, width):
    model = StyledVNet(in_chan, out_chan, style_size, dim=dim, width=width)
    assert n_params(model) == styled_vnet_params(in_chan, out_chan, style_size, width, dim)


# --------------------------------------------------------------------------- the modulated convolution


def reference_conv(conv: ConvStyled, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """The modulated convolution of one sample, computed independently: the weight modulated and (unless
    the layer has ``demodulate=False``) demodulated by explicit loops over output and input channels, then
    torch's plain convolution."""
    assert x.shape[0] == style.shape[0] == 1
    cin, cout, s = conv.in_chan, conv.out_chan, style[0]
    scale = [sum(s[j] * conv.style_weight[i, j] for j in range(conv.style_size)) + conv.style_bias[i]
             for i in range(cin)]
    transposed = conv.kind == "U"
    weight = torch.empty_like(conv.weight)
    for o in range(cout):
        kernels = [(conv.weight[i, o] if transposed else conv.weight[o, i]) * scale[i] for i in range(cin)]
        norm = torch.sqrt(sum((k ** 2).sum() for k in kernels) + DEMOD_EPS) if conv.demodulate else 1.0
        for i, k in enumerate(kernels):
            if transposed:
                weight[i, o] = k / norm
            else:
                weight[o, i] = k / norm
    dim = conv.dim
    if transposed:
        fn = {2: F.conv_transpose2d, 3: F.conv_transpose3d}[dim]
    else:
        fn = {2: F.conv2d, 3: F.conv3d}[dim]
    return fn(x, weight, conv.bias, stride=conv.stride)


def make_conv(kind, kernel_size, dim, seed=0, cin=3, cout=4, style_size=2, demodulate=True):
    torch.manual_seed(seed)
    return ConvStyled(style_size, cin, cout, kind=kind, kernel_size=kernel_size, dim=dim,
                      demodulate=demodulate).double()


@pytest.mark.parametrize("demodulate", [True, False])
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("kind, kernel_size", CONV_KINDS)
def test_modulated_conv_equals_independent_computation(dim, kind, kernel_size, demodulate):
    conv = make_conv(kind, kernel_size, dim, demodulate=demodulate)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(1, 3, *(6,) * dim, generator=gen, dtype=torch.float64)
        style = torch.randn(1, 2, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            got, want = conv(x, style), reference_conv(conv, x, style)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("kind, kernel_size", CONV_KINDS)
def test_modulated_conv_batch_equals_single_samples(dim, kind, kernel_size):
    conv = make_conv(kind, kernel_size, dim).float()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 3, *(6,) * dim, generator=gen)
    style = torch.randn(3, 2, generator=gen) * 2
    with torch.no_grad():
        batch = conv(x, style)
        singles = torch.cat([conv(x[i:i + 1], style[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, singles, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(singles[0], singles[1])  # the styles differ, so the samples do


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("kind, kernel_size, grow", [("C", 3, -2), ("C", 1, 0), ("D", None, None),
                                                      ("U", None, None)])
def test_modulated_conv_parameters_and_output_shape(dim, kind, kernel_size, grow):
    conv = ConvStyled(5, 3, 4, kind=kind, kernel_size=kernel_size, dim=dim)
    k = 2 if kernel_size is None else kernel_size
    assert [n for n, _ in conv.named_parameters()] == ["style_weight", "style_bias", "weight", "bias"]
    assert conv.style_weight.shape == (3, 5)
    assert torch.equal(conv.style_bias, torch.ones(3))
    assert conv.weight.shape == ((3, 4) if kind == "U" else (4, 3)) + (k,) * dim
    assert conv.bias.shape == (4,)
    y = conv(torch.randn(2, 3, *(6,) * dim), torch.randn(2, 5))
    size = {"D": 3, "U": 12}.get(kind, 6 + (grow or 0))
    assert y.shape == (2, 4, *(size,) * dim)


def test_modulated_conv_rejects_bad_kinds():
    with pytest.raises(ValueError, match="kind"):
        ConvStyled(2, 3, 4, kind="B")
    with pytest.raises(ValueError, match="kernel 2"):
        ConvStyled(2, 3, 4, kind="D", kernel_size=3)
    with pytest.raises(ValueError, match="dim"):
        ConvStyled(2, 3, 4, dim=4)


def test_demodulation_removes_the_style_scale():
    """Multiplying every modulation scale by the same factor changes nothing (up to the epsilon)."""
    conv = make_conv("C", 3, 3)
    x = torch.randn(1, 3, 5, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        y = conv(x, torch.zeros(1, 2, dtype=torch.float64))
        conv.style_bias.mul_(7)
        torch.testing.assert_close(conv(x, torch.zeros(1, 2, dtype=torch.float64)), y)


def test_without_demodulation_the_style_scales_the_output():
    """With ``demodulate=False`` the same factor on every modulation scale multiplies the convolution
    (the output less its bias): a style can carry an amplitude, e.g. the growth factor."""
    conv = make_conv("C", 3, 3, demodulate=False)
    x = torch.randn(1, 3, 5, 5, 5, dtype=torch.float64)
    zero = torch.zeros(1, 2, dtype=torch.float64)
    bias = conv.bias.reshape(1, -1, 1, 1, 1)
    with torch.no_grad():
        y = conv(x, zero) - bias
        conv.style_bias.mul_(7)
        torch.testing.assert_close(conv(x, zero) - bias, 7 * y)
    assert "demodulate=False" in repr(conv) and "demodulate" not in repr(make_conv("C", 3, 3))


# --------------------------------------------------------------------------- blocks


def test_style_ignoring_layers():
    x = torch.randn(2, 3, 4, 4, 4)
    style = torch.randn(2, 2)
    torch.testing.assert_close(LeakyReLUStyled()(x, style), F.leaky_relu(x, 0.01))
    norm = BatchNormStyled(3).eval()
    plain = torch.nn.BatchNorm3d(3).eval()
    assert list(norm.state_dict()) == list(plain.state_dict())
    torch.testing.assert_close(norm(x, style), plain(x))
    assert BatchNormStyled(3, dim=2)(x[..., 0], style).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="expected a 4D input"):
        BatchNormStyled(3, dim=2)(x, style)


def test_block_layers_and_channels():
    block = ConvStyledBlock(2, 3, 5, seq="CBACDBAUA")
    kinds = [getattr(m, "kind", type(m).__name__) for m in block.convs]
    assert kinds == ["C", "BatchNormStyled", "LeakyReLUStyled", "C", "D", "BatchNormStyled",
                     "LeakyReLUStyled", "U", "LeakyReLUStyled"]
    convs = [m for m in block.convs if isinstance(m, ConvStyled)]
    assert [(m.in_chan, m.out_chan) for m in convs] == [(3, 5), (5, 5), (5, 5), (5, 5)]
    assert block.convs[1].num_features == 5
    assert block(torch.randn(2, 3, 10, 10, 10), torch.randn(2, 2)).shape == (2, 5, 6, 6, 6)
    with pytest.raises(ValueError, match="unknown layer letters"):
        ConvStyledBlock(2, 3, seq="CXA")


def test_residual_block():
    block = ResStyledBlock(2, 3, 4, seq="CACBA", dim=2).double().eval()
    assert isinstance(block.act, LeakyReLUStyled) and len(block.convs) == 4
    assert (block.skip.in_chan, block.skip.out_chan, block.skip.kernel_size) == (3, 4, 1)
    assert ResStyledBlock(2, 3, 3, seq="CAC").act is None
    assert ResStyledBlock(2, 3).skip.out_chan == 3  # the skip is a convolution even when channels agree
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    style = torch.randn(2, 2, dtype=torch.float64)
    with torch.no_grad():
        y = block.convs[3](block.convs[2](block.convs[1](block.convs[0](x, style), style), style), style)
        want = F.leaky_relu(y + block.skip(x, style)[:, :, 2:-2, 2:-2], 0.01)
        torch.testing.assert_close(block(x, style), want)
    with pytest.raises(ValueError, match="cannot resize"):
        ResStyledBlock(2, 3, seq="CDA")


# --------------------------------------------------------------------------- StyledVNet


@pytest.mark.parametrize("dim", [2, 3])
def test_styled_vnet_batch_equals_single_samples(dim):
    torch.manual_seed(3)
    model = StyledVNet(2, 2, 3, dim=dim, width=3).eval()
    randomize_norms(model, 4)
    x = torch.randn(3, 2, *(48,) * dim)
    style = torch.randn(3, 3)
    with torch.no_grad():
        batch = model(x, style)
        singles = torch.cat([model(x[i:i + 1], style[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, singles, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim, sizes", [(3, [(4, 4, 4), (8, 12, 4)]), (2, [(4, 4), (8, 20), (16, 12)])])
def test_output_size(dim, sizes):
    model = StyledVNet(1, 2, 2, dim=dim, width=2).eval()
    for n in sizes:
        with torch.no_grad():
            y = model(torch.randn(2, 1, *(s + 40 for s in n)), torch.randn(2, 2))
        assert y.shape == (2, 2, *n)


@pytest.mark.parametrize("size", [40, 42, 45, 46])
def test_bad_input_size(size):
    model = StyledVNet(1, 1, 2, dim=2, width=2)
    with pytest.raises(ValueError, match="40 plus a positive multiple of 4"):
        model(torch.randn(1, 1, 44, size), torch.randn(1, 2))
    with pytest.raises(ValueError, match="2 spatial axes"):
        model(torch.randn(1, 1, 44, 44, 44), torch.randn(1, 2))


@pytest.mark.parametrize("bad", [(2,), (1, 2), (2, 3), (2, 2, 1)])
def test_style_shape_checked(bad):
    model = StyledVNet(1, 1, 2, dim=2, width=2)
    with pytest.raises(ValueError, match=r"style must have shape \(batch, style_size\) = \(2, 2\)"):
        model(torch.randn(2, 1, 44, 44), torch.randn(*bad))
    with pytest.raises(ValueError, match="style must have shape"):
        ConvStyled(2, 1, 1, dim=2)(torch.randn(2, 1, 4, 4), torch.randn(*bad))


def test_bypass_only_when_channels_agree():
    assert StyledVNet(2, 2, 1, width=2).bypass
    assert not StyledVNet(2, 3, 1, width=2).bypass
    assert not StyledVNet(2, 2, 1, bypass=False, width=2).bypass
    with pytest.raises(ValueError, match="bypass needs in_chan == out_chan"):
        StyledVNet(2, 3, 1, bypass=True, width=2)


def test_bypass_adds_the_narrowed_input():
    torch.manual_seed(5)
    on = StyledVNet(2, 2, 1, dim=2, width=3).eval()
    off = StyledVNet(2, 2, 1, bypass=False, dim=2, width=3).eval()
    off.load_state_dict(on.state_dict())
    x, style = torch.randn(2, 2, 48, 52), torch.randn(2, 1)
    with torch.no_grad():
        torch.testing.assert_close(on(x, style), off(x, style) + narrow_by(x, 20))


def test_style_bypass_scales_the_input_by_an_affine_map_of_the_style():
    """``style_bypass=True`` adds ``(style @ bypass_weight.T + bypass_bias) * narrowed input``, per channel and
    per sample, computed here independently from the same model without the bypass; at its start (weight 0,
    bias 1) it is the plain bypass."""
    torch.manual_seed(6)
    scaled = StyledVNet(2, 2, 3, dim=2, width=3, style_bypass=True).double().eval()
    plain = StyledVNet(2, 2, 3, dim=2, width=3).double().eval()
    off = StyledVNet(2, 2, 3, bypass=False, dim=2, width=3).double().eval()
    state = {k: v for k, v in scaled.state_dict().items() if not k.startswith("bypass_")}
    plain.load_state_dict(state)
    off.load_state_dict(state)
    assert sorted(set(scaled.state_dict()) - set(state)) == ["bypass_bias", "bypass_weight"]
    x, style = torch.randn(2, 2, 48, 52, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(scaled(x, style), plain(x, style))  # starts as the plain bypass
        scaled.bypass_weight.copy_(torch.randn(2, 3, dtype=torch.float64))
        scaled.bypass_bias.copy_(torch.tensor([0.5, -2.0], dtype=torch.float64))
        inner = narrow_by(x, 20)
        want = off(x, style).clone()
        for n in range(2):
            for c in range(2):
                a = sum(style[n, j] * scaled.bypass_weight[c, j] for j in range(3)) + scaled.bypass_bias[c]
                want[n, c] += a * inner[n, c]
        torch.testing.assert_close(scaled(x, style), want)
    with pytest.raises(ValueError, match="style_bypass .* needs the bypass"):
        StyledVNet(2, 3, 1, width=2, style_bypass=True)


def test_undemodulated_vnet_has_the_same_parameters_and_batches_exactly():
    torch.manual_seed(7)
    model = StyledVNet(2, 2, 3, dim=2, width=3, demodulate=False).eval()
    assert list(model.state_dict()) == list(StyledVNet(2, 2, 3, dim=2, width=3).state_dict())
    convs = [m for m in model.modules() if isinstance(m, ConvStyled)]
    assert convs and not any(m.demodulate for m in convs)
    x, style = torch.randn(3, 2, 44, 48), torch.randn(3, 3)
    with torch.no_grad():
        batch = model(x, style)
        singles = torch.cat([model(x[i:i + 1], style[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, singles, rtol=1e-5, atol=1e-5)
    assert not any(m.demodulate for m in StyledG(2, 2, 3, scale_factor=2, chan_base=4, chan_min=2, dim=2,
                                                 demodulate=False).modules() if isinstance(m, ConvStyled))


@pytest.mark.parametrize("make", [
    lambda init: StyledVNet(2, 2, 3, dim=2, width=3, demodulate=False, style_bypass=True, style_init=init),
    lambda init: StyledG(2, 2, 3, scale_factor=2, chan_base=4, chan_min=2, dim=2, style_init=init),
], ids=["StyledVNet", "StyledG"])
def test_zero_style_init_starts_the_same_for_every_style_and_learns_a_dependence(make):
    """``style_init="zero"``: every style weight starts at 0, so two styles give the same output; the rest of
    the parameters are drawn as by default (same seed, same draws); one optimiser step on a loss that
    depends on the style moves the style weights off 0.  The default init depends on the style at once."""
    torch.manual_seed(8)
    zero = make("zero").eval()
    torch.manual_seed(8)
    uniform = make("uniform").eval()
    convs = [m for m in zero.modules() if isinstance(m, ConvStyled)]
    assert convs and all(not m.style_weight.any() for m in convs)
    for (k, a), b in zip(zero.state_dict().items(), uniform.state_dict().values()):
        assert torch.equal(a, b) != k.endswith("style_weight"), k
    x = torch.randn(2, 2, 44, 44)
    s1, s2 = torch.randn(1, 3).expand(2, 3), torch.randn(1, 3).expand(2, 3)
    with torch.no_grad():
        torch.testing.assert_close(zero(x, s1), zero(x, s2), rtol=0, atol=0)
        assert (uniform(x, s1) - uniform(x, s2)).abs().max() > 1e-3
    zero.train()
    opt = torch.optim.SGD(zero.parameters(), lr=0.1)
    loss = (zero(x, s1) - 1).square().mean() + (zero(x, s2) + 1).square().mean()
    loss.backward()
    opt.step()
    assert all(m.style_weight.abs().sum() > 0 for m in convs)
    with pytest.raises(ValueError, match="style_init must be one of uniform, zero, got 'ones'"):
        make("ones")


def test_extra_keywords_ignored_and_declared_stride():
    model = StyledVNet(in_chan=3, out_chan=3, style_size=2, scale_factor=1, width=2)
    assert model.total_stride == 4
    assert [name for name, _ in model.named_children()] == [
        "conv_l0", "down_l0", "conv_l1", "down_l1", "conv_c", "up_r1", "conv_r1", "up_r0", "conv_r0"]


# --------------------------------------------------------------------------- how a model is called and built

def test_forward_calls_styled_and_unstyled_models_their_way():
    torch.manual_seed(0)
    styled = StyledVNet(2, 2, 3, dim=2, width=2).eval()
    plain = VNet(2, 2, dim=2, width=2).eval()
    x, style = torch.randn(2, 2, 44, 48), torch.randn(2, 3)
    assert style_size_of(styled) == 3 and style_size_of(plain) is None
    with torch.no_grad():
        torch.testing.assert_close(forward(styled, x, style), styled(x, style), rtol=0, atol=0)
        torch.testing.assert_close(forward(plain, x), plain(x), rtol=0, atol=0)
        torch.testing.assert_close(forward(styled, x, style.double()), styled(x, style), rtol=0, atol=0)
    with pytest.raises(UserError, match=r"^model StyledVNet is styled \(3 style parameters\) but was given none"):
        forward(styled, x)
    with pytest.raises(UserError, match="^model VNet is not styled but was given styles"):
        forward(plain, x, style)
    with pytest.raises(UserError, match=r"shape \(batch, 3\) = \(2, 3\), got \(2, 2\)"):
        forward(styled, x, style[:, :2])


def test_styled_is_seen_through_wrappers():
    model = StyledVNet(2, 2, 3, dim=2, width=2)
    assert style_size_of(torch.compile(model)) == 3  # compiled lazily: nothing runs here
    assert style_size_of(torch.nn.Module()) is None
    assert zero_style(model, 2).shape == (2, 3) and not zero_style(model, 2).any()
    assert zero_style(VNet(1, 1, dim=2, width=2), 2) is None


def test_build_model_passes_the_style_size():
    model = build_model("StyledVNet", 2, 2, scale_factor=1, ndim=2, kwargs={"width": 2}, style_size=3)
    assert isinstance(model, StyledVNet) and model.style_size == 3 and model.dim == 2
    unstyled = build_model("VNet", 2, 2, scale_factor=1, ndim=2, kwargs={"width": 2})
    assert style_size_of(unstyled) is None


@pytest.mark.parametrize("name, style_size, kwargs, match", [
    ("StyledVNet", None, {}, "^model StyledVNet is styled .* but the data have no styles"),
    ("VNet", 2, {}, "^model VNet takes no style_size argument"),
    ("G", 2, {}, "^model G takes no style_size argument"),
    ("StyledVNet", 0, {}, "^style_size must be a positive number"),
    ("StyledVNet", 2, {"style_size": 2}, "^--misc-kwargs key 'style_size' is set from the data's styles")])
def test_build_model_refuses_styles_that_do_not_fit(name, style_size, kwargs, match):
    with pytest.raises(UserError, match=match) as info:
        build_model(name, 2, 2, scale_factor=1, ndim=2, kwargs=kwargs, style_size=style_size)
    assert "\n" not in str(info.value)


def test_a_user_styled_model_gets_style_size_and_is_called_with_styles(tmp_path):
    (tmp_path / "mine.py").write_text(
        "import torch\n"
        "class Shift(torch.nn.Module):\n"
        "    def __init__(self, in_chan, out_chan, style_size, **kwargs):\n"
        "        super().__init__()\n"
        "        self.lin = torch.nn.Linear(style_size, out_chan)\n"
        "    def forward(self, x, style):\n"
        "        return x[:, :1, 1:-1, 1:-1] + self.lin(style)[:, :, None, None]\n")
    model = build_model("mine.Shift", 1, 1, scale_factor=1, ndim=2, callback_at=str(tmp_path), style_size=2)
    assert style_size_of(model) == 2  # recorded by build_model: the class does not keep it
    x, style = torch.randn(2, 1, 6, 6), torch.randn(2, 2)
    with torch.no_grad():
        want = x[:, :, 1:-1, 1:-1] + model.lin(style)[:, :, None, None]
        torch.testing.assert_close(forward(model, x, style), want)
    assert output_shape(model, 1, (9, 7)) == (7, 5)


@pytest.mark.parametrize("dim", [2, 3])
def test_shape_probe_pads_and_geometry_work_for_styled_models(dim):
    model = StyledVNet(2, 2, 3, dim=dim, width=2)
    shape = (44, 48, 52)[:dim]
    with torch.no_grad():
        real = model.eval()(torch.zeros(1, 2, *shape), torch.zeros(1, 3)).shape[2:]
    model.train()
    assert output_shape(model, 2, shape) == tuple(real) == tuple(s - 40 for s in shape)
    assert model.training  # the probe leaves the mode as it was
    assert output_shape(model, 2, (45,) * dim) is None
    assert required_pad(model, 2, 8, dim) == 20
    assert auto_pad(model, 2, (8,) * dim, dim, 1, ((0, 0),) * dim) == [20] * dim
    assert check_geometry(model, 2, (8,) * dim, (8,) * dim, ((20, 20),) * dim, ((0, 0),) * dim, 1) == (4, (8,) * dim)


# --------------------------------------------------------------------------- the styled super-resolution generator

G_KW = {"chan_base": 8, "chan_min": 2, "chan_max": 6}


def styled_g_params(chan: int, style_size: int, scale_factor: int, dim: int, base=8, lo=2, hi=6) -> int:
    """Parameters of StyledG: block0, then per level two 3-voxel and one 1-voxel modulated convolutions."""
    def width(b):
        return min(max(base >> b, lo), hi)

    total = conv_params(style_size, chan, width(0), 1, dim)
    for b in range(scale_factor.bit_length() - 1):
        total += (conv_params(style_size, width(b), width(b + 1), 3, dim)
                  + conv_params(style_size, width(b + 1), width(b + 1), 3, dim)
                  + conv_params(style_size, width(b + 1), chan, 1, dim))
    return total


@pytest.mark.parametrize("dim, scale_factor, shape", [(2, 2, (9, 12)), (2, 4, (10, 11)), (3, 2, (7, 8, 9)),
                                                      (3, 4, (6, 7, 8))])
def test_styled_g_sizes_are_those_of_g(dim, scale_factor, shape):
    torch.manual_seed(0)
    model = StyledG(2, 2, 3, scale_factor=scale_factor, dim=dim, **G_KW).eval()
    plain = G(2, 2, scale_factor=scale_factor, dim=dim, **G_KW).eval()
    x, style = torch.randn(2, 2, *shape), torch.randn(2, 3)
    with torch.no_grad():
        out = model(x, style)
        want = plain(x).shape
    assert out.shape == want
    size = list(shape)
    for _ in range(scale_factor.bit_length() - 1):
        size = [2 * n - 6 for n in size]
    assert tuple(out.shape[2:]) == tuple(size)
    assert n_params(model) == styled_g_params(2, 3, scale_factor, dim)
    assert total_stride(model) == 1
    assert output_shape(model, 2, shape) == tuple(size)
    for crop in (4, 6):
        assert required_pad(model, 2, crop, dim, scale_factor) == required_pad(plain, 2, crop, dim, scale_factor)


@pytest.mark.parametrize("dim", [2, 3])
def test_styled_g_batch_equals_single_samples(dim):
    torch.manual_seed(1)
    model = StyledG(1, 1, 2, scale_factor=4, dim=dim, **G_KW).eval()
    x, style = torch.randn(3, 1, *(7,) * dim), torch.randn(3, 2)
    with torch.no_grad():
        batch = model(x, style)
        for n in range(3):
            torch.testing.assert_close(batch[n:n + 1], model(x[n:n + 1], style[n:n + 1]), rtol=1e-5, atol=1e-6)
        assert (batch[0] - model(x[:1], style[1:2])[0]).abs().max() > 1e-4  # the style matters


def test_styled_g_is_the_upsampled_input_plus_corrections():
    """One level recomposed by hand from its layers and `resample`: the input linearly upsampled and
    narrowed, plus the projected features."""
    from map2map.models.resample import resample

    torch.manual_seed(2)
    model = StyledG(1, 1, 2, scale_factor=2, dim=2, **G_KW).eval()
    x, style = torch.randn(2, 1, 10, 10), torch.randn(2, 2)
    with torch.no_grad():
        block = model.blocks[0]
        h = model.act(model.block0(x, style))
        h = model.act(block.conv2(model.act(block.conv1(resample(h, 2), style)), style))
        want = narrow_by(resample(x, 2), 2) + model.act(block.proj(h, style))
        torch.testing.assert_close(model(x, style), want)


def test_styled_g_builds_by_name_and_refuses_bad_arguments():
    model = build_model("styled.StyledG", 1, 1, scale_factor=2, ndim=2, kwargs=G_KW, style_size=2)
    assert isinstance(model, StyledG) and model.style_size == 2 and model.scale_factor == 2 and model.dim == 2
    with pytest.raises(ValueError, match="needs in_chan == out_chan"):
        StyledG(1, 2, 2)
    with pytest.raises(ValueError, match="power of 2"):
        StyledG(1, 1, 2, scale_factor=3)
    with pytest.raises(UserError, match="is styled"):
        build_model("styled.StyledG", 1, 1, scale_factor=2, ndim=2, kwargs=G_KW)
