"""Test-time augmentation (`map2map.infer.tta`): tiles stitched from augmented windows equal the average of
whole-box passes over the same transforms, with real models (strided, super-resolution, vector fields)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from map2map import tiles
from map2map.data import augment
from map2map.errors import UserError
from map2map.infer import tta
from map2map.models.srsgan import G
from map2map.models.stride import output_shape, total_stride
from map2map.models.vnet import VNet

from twoconv import TwoConv


def periodic_window(x: np.ndarray, window) -> np.ndarray:
    """Channels of `x` (C, *box) over `window` ([lo, hi) per axis, may leave the box), wrapped."""
    idx = np.ix_(range(x.shape[0]), *(np.arange(lo, hi) % n for (lo, hi), n in zip(window, x.shape[1:])))
    return x[idx]


def whole_box(model, x: np.ndarray, pad, scale: int, mode: str, in_chans, out_chans) -> np.ndarray:
    """The oracle: pad the box periodically, transform, forward, transform back, average, narrow."""
    xp = np.pad(x, [(0, 0)] + [tuple(p) for p in pad], mode="wrap")
    group = tta.elements(mode, x.ndim - 1)
    total = 0
    with torch.no_grad():
        for g in group:
            parts, start = [], 0
            for c in in_chans:
                parts.append(augment.apply(xp[start:start + c], g, vector=c == x.ndim - 1))
                start += c
            y = model(torch.from_numpy(np.concatenate(parts))[None])[0].numpy()
            parts, start = [], 0
            for c in out_chans:
                parts.append(augment.apply(y[start:start + c], augment.inverse(g), vector=c == x.ndim - 1))
                start += c
            total = total + np.concatenate(parts).astype(np.float64)
    y = total / len(group)
    box = x.shape[1:]
    offsets = tiles.narrow_offsets(box, pad, scale, y.shape[1:])
    return y[(slice(None),) + tuple(slice(o, o + n * scale) for o, n in zip(offsets, box))]


def tiled(model, x: np.ndarray, tile, pad, scale: int, mode: str, in_chans, out_chans) -> np.ndarray:
    """What the inference worker does: each tile's window through `tta.averaged`, narrowed and stitched."""
    plan = tiles.TilePlan(x.shape[1:], tuple(tile), tuple(tuple(p) for p in pad), scale)
    out_shape = output_shape(model, sum(in_chans), plan.window_shape)
    offsets = tiles.narrow_offsets(plan.tile, plan.pad, scale, out_shape)
    out = np.full((sum(out_chans),) + plan.out_box, np.nan, dtype=np.float32)
    for t in plan:
        win = torch.from_numpy(np.ascontiguousarray(periodic_window(x, plan.window(t))))[None]
        with torch.no_grad():
            y = tta.averaged(model, win, mode, in_chans, out_chans)[0].numpy()
        assert y.shape[1:] == out_shape
        keep = tuple(slice(o, o + n * scale) for o, n in zip(offsets, plan.size(t)))
        out[(slice(None),) + tuple(slice(lo, hi) for lo, hi in plan.out_region(t))] = y[(slice(None),) + keep]
    return out


def _field(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _vnet(in_chan, out_chan, dim, seed=1):
    torch.manual_seed(seed)
    model = VNet(in_chan, out_chan, width=3, dim=dim).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, so eval mode is not the identity map
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _g(chan, dim, seed=2):
    torch.manual_seed(seed)
    return G(chan, chan, scale_factor=2, chan_base=6, chan_min=4, chan_max=6, dim=dim).eval()


CASES = {
    # name: (model factory, box, tile, pad, scale, mode, in_chans, out_chans)
    "vnet-3d-flips-vector-in": (lambda: _vnet(3, 1, 3), (16, 8, 4), (8, 8, 4), ((20, 20),) * 3, 1, "flips",
                                (3,), (1,)),
    "vnet-2d-all": (lambda: _vnet(2, 2, 2), (24, 20), (8, 12), ((20, 20),) * 2, 1, "all", (1, 1), (2,)),
    "g-3d-all-sr-vector": (lambda: _g(3, 3), (8, 6, 4), (4, 6, 4), ((2, 2),) * 3, 2, "all", (3,), (3,)),
    "g-2d-all-sr-vector": (lambda: _g(2, 2), (10, 6), (4, 6), ((2, 2),) * 2, 2, "all", (2,), (2,)),
    "twoconv-3d-all-asymmetric-pads": (lambda: TwoConv(4, 3, width=5), (6, 4, 5), (4, 4, 3),
                                       ((1, 3), (3, 1), (2, 2)), 1, "all", (1, 3), (3,)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_stitched_tiles_equal_the_whole_box_average(name):
    make, box, tile, pad, scale, mode, in_chans, out_chans = CASES[name]
    model = make()
    assert all(n % total_stride(model) == 0 for n in box)  # the exactness condition of tta's docstring
    x = _field((sum(in_chans),) + box)
    got = tiled(model, x, tile, pad, scale, mode, in_chans, out_chans)
    want = whole_box(model, x, pad, scale, mode, in_chans, out_chans)
    assert got.shape == want.shape == (sum(out_chans),) + tuple(n * scale for n in box)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # and the augmentation changed something: the model alone differs from its average
    plain = whole_box(model, x, pad, scale, "none", in_chans, out_chans)
    assert np.abs(plain - want).max() > 1e-3


def test_group_sizes_and_modes():
    for ndim, flips, everything in ((2, 4, 8), (3, 8, 48)):
        assert len(tta.elements("none", ndim)) == 1
        assert len(tta.elements("flips", ndim)) == flips
        assert len(set(tta.elements("all", ndim))) == everything
        assert set(tta.elements("flips", ndim)) <= set(tta.elements("all", ndim))
    with pytest.raises(UserError, match=r"--tta 'some': expected one of none, flips, all"):
        tta.elements("some", 3)


def test_none_is_the_forward_pass_itself():
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    out = torch.randn(2, 3, 4, 4, dtype=torch.float16)
    assert tta.averaged(lambda _: out, x, "none", (1,), (3,)) is out


class Gradient(nn.Module):
    """Central differences of a scalar field: a vector field, exactly equivariant under the cube group."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[dim]
        self.conv = conv(1, dim, 3, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            for i in range(dim):
                lo = (i, 0) + (1,) * i + (0,) + (1,) * (dim - 1 - i)
                hi = (i, 0) + (1,) * i + (2,) + (1,) * (dim - 1 - i)
                self.conv.weight[lo] = -0.5
                self.conv.weight[hi] = 0.5

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("dim", [2, 3])
def test_an_equivariant_model_is_its_own_average(dim):
    """Independent of the group's bookkeeping: a vector output turned the wrong way would not average back."""
    model = Gradient(dim)
    x = torch.randn((2, 1) + (7,) * dim)
    with torch.no_grad():
        got = tta.averaged(model, x, "all", (1,), (dim,))
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), model(x).numpy(), rtol=1e-6, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(st.sampled_from([2, 3]), st.data())
def test_the_average_over_the_group_is_equivariant(dim, data):
    """Whatever the model, averaging over the whole group makes it commute with every element."""
    torch.manual_seed(data.draw(st.integers(0, 100)))
    model = TwoConv(1 + dim, dim, width=4, dim=dim).eval()
    g = data.draw(st.sampled_from(augment.cube_group(dim)))
    shape = tuple(data.draw(st.integers(3, 6)) for _ in range(dim))
    x = torch.randn((1, 1 + dim) + shape)
    with torch.no_grad():
        lhs = tta.averaged(model, tta.transform(x, g, (1, dim)), "all", (1, dim), (dim,))
        rhs = tta.transform(tta.averaged(model, x, "all", (1, dim), (dim,)), g, (dim,))
    np.testing.assert_allclose(lhs.numpy(), rhs.numpy(), rtol=1e-5, atol=1e-6)


def test_identity_model_output_viewing_its_input():
    """A model that returns (a view of) its input: the average must not be added into the input."""
    x = torch.randn(1, 2, 5, 5)
    keep = x.clone()
    y = tta.averaged(lambda v: v[:, :, 1:-1, 1:-1], x, "all", (2,), (2,))
    np.testing.assert_allclose(x.numpy(), keep.numpy())
    # the mean of g^-1 narrow(g x) is narrow(x) for this equivariant map
    np.testing.assert_allclose(y.numpy(), keep[:, :, 1:-1, 1:-1].numpy(), atol=1e-6)


# --------------------------------------------------------------------------- end to end: m2m infer --tta


def test_m2m_infer_tta_flips_with_auto_tiles_equals_the_whole_box_average(tmp_path):
    from conftest import run_m2m
    from test_infer import TESTS, make_store, tame

    from map2map import store

    x = _field((1, 3, 12, 12, 12), seed=5)
    data = make_store(tmp_path, "in", {"disp": x}, crop=6)
    torch.manual_seed(5)
    model = tame(TwoConv(3, 3, width=4), gain=1.0)
    ckpt = str(tmp_path / "state_1.pt")
    torch.save({"model": model.state_dict()}, ckpt)
    out = tmp_path / "pred.zarr"
    r = run_m2m("infer", "--data", data, "--in", "disp", "--model", "twoconv.TwoConv", "--callback-at", TESTS,
                "--load-state", ckpt, "--out", str(out), "--misc-kwargs", '{"width": 4}', "--workers", "1",
                "--device", "cpu", "--tta", "flips", "--crop", "auto", "--tile-memory", "0.0001")
    assert r.returncode == 0, r.stderr
    meta = store.read_meta(out)
    tile = meta["infer"]["crop"]
    assert tile != [12, 12, 12] and meta["fields"]["prediction"]["shard"] == tile  # the budget cut the box
    pred = store.open_store(out).field("prediction")[0]
    want = whole_box(model, x[0], ((1, 1),) * 3, 1, "flips", (3,), (3,))
    np.testing.assert_allclose(pred, want, rtol=0, atol=1e-5)
    assert np.abs(pred - whole_box(model, x[0], ((1, 1),) * 3, 1, "none", (3,), (3,))).max() > 1e-3


def test_infer_tta_all_super_resolution_2d_equals_the_whole_box_average(tmp_path):
    from test_infer import make_store, save_ckpt

    from map2map import infer, store

    x = _field((1, 2, 16, 12), seed=6)
    data = make_store(tmp_path, "sr", {"lo": x}, crop=4)
    model = _g(2, 2)
    with torch.no_grad():  # outputs of order one
        for m in model.modules():
            if isinstance(m, nn.modules.conv._ConvNd):
                m.weight.mul_(2.0)
    ckpt = save_ckpt(model, tmp_path / "g.pt")
    out = tmp_path / "sr-out.zarr"
    kwargs = {"chan_base": 6, "chan_min": 4, "chan_max": 6}
    infer.run(infer.InferConfig(load_state=ckpt, out=str(out), data=data, in_fields=("lo",), model="G",
                                scale_factor=2, crop=(8, 4), model_kwargs=kwargs, tta="all", workers=1,
                                device="cpu", progress=False))
    pred = store.open_store(out).field("prediction")[0]
    want = whole_box(model, x[0], ((2, 2),) * 2, 2, "all", (2,), (2,))
    assert pred.shape == (2, 32, 24)
    np.testing.assert_allclose(pred, want, rtol=0, atol=1e-5)
    assert np.abs(pred - whole_box(model, x[0], ((2, 2),) * 2, 2, "none", (2,), (2,))).max() > 1e-3
