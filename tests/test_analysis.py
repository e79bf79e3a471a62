"""Spectra against brute-force DFTs, hand-computed single modes, and across array types."""

from __future__ import annotations

import itertools

import dask
import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr
from dask.callbacks import Callback
from hypothesis import given

from strategies import shapes

from map2map import analysis
from map2map.analysis import correlation, cross_power, power_spectrum, transfer
from map2map.errors import UserError

L = 50.0  # Mpc/h
KF = 2 * np.pi / L


def brute_force_spectrum(field: np.ndarray, boxsize: float, nbins: int) -> tuple[np.ndarray, ...]:
    """Binned P(k) from an explicit DFT sum over every mode of the full Fourier space."""
    shape = field.shape
    n = shape[0]
    cells = np.array(list(itertools.product(*[range(s) for s in shape])))
    values = field.ravel()
    ksum, psum, count = np.zeros(nbins + 1), np.zeros(nbins + 1), np.zeros(nbins + 1)
    for m in itertools.product(*[range(s) for s in shape]):
        mvec = np.array([mi if mi <= s // 2 else mi - s for mi, s in zip(m, shape)])
        dk = np.sum(values * np.exp(-2j * np.pi * cells @ mvec / n))
        nmag = np.sqrt(np.sum(mvec ** 2))
        b = int(np.floor(nmag + 0.5))
        if 1 <= b <= nbins:
            ksum[b] += nmag * 2 * np.pi / boxsize
            psum[b] += abs(dk) ** 2 * boxsize ** len(shape) / field.size ** 2
            count[b] += 1
    return ksum[1:] / count[1:], psum[1:] / count[1:], count[1:]


@pytest.mark.parametrize("shape", [(6, 6, 6), (5, 5, 5), (8, 8)])
def test_matches_brute_force_dft(shape):
    field = np.random.default_rng(1).standard_normal(shape)
    nbins = int(np.rint(np.sqrt(sum((s // 2) ** 2 for s in shape))))
    k, p, nmodes = power_spectrum(field, L)
    kb, pb, cb = brute_force_spectrum(field, L, nbins)
    np.testing.assert_array_equal(nmodes, cb)
    np.testing.assert_allclose(k, kb, rtol=1e-12)
    np.testing.assert_allclose(p, pb, rtol=1e-10)


def test_vector_field_sums_component_spectra():
    field = np.random.default_rng(2).standard_normal((3, 6, 6, 6))
    total = sum(brute_force_spectrum(c, L, 5)[1] for c in field)
    np.testing.assert_allclose(power_spectrum(field, L).value, total, rtol=1e-10)


def test_single_cosine_mode_by_hand():
    """A cos(2 pi n x / L) has variance A^2/2, all of it in bin n: P_n * nmodes_n / V = A^2 / 2."""
    n, amp, N = 2, 0.7, 8
    x = (np.arange(N) + 0.5) * L / N
    field = np.broadcast_to(amp * np.cos(2 * np.pi * n * x / L)[:, None, None], (N,) * 3)
    k, p, nmodes = power_spectrum(field, L)
    # Shell counts by hand: |m|^2 in {1, 2} -> 6 + 12; |m|^2 in {3, 4, 5, 6} -> 8 + 6 + 24 + 24.
    assert nmodes[0] == 18 and nmodes[1] == 62
    assert k[0] == pytest.approx((6 * 1 + 12 * np.sqrt(2)) / 18 * KF, rel=1e-12)
    np.testing.assert_allclose(p[n - 1] * nmodes[n - 1], L ** 3 * amp ** 2 / 2, rtol=1e-12)
    others = np.delete(p, n - 1)
    assert np.all(np.abs(others) < 1e-25 * p[n - 1])


def test_single_mode_2d():
    n, amp, N = 3, 1.3, 16
    y = np.arange(N) * L / N
    field = np.broadcast_to(amp * np.sin(2 * np.pi * n * y / L)[None, :], (N, N))
    k, p, nmodes = power_spectrum(field, L)
    np.testing.assert_allclose(p[n - 1] * nmodes[n - 1], L ** 2 * amp ** 2 / 2, rtol=1e-12)
    assert np.argmax(p) == n - 1


def test_parseval_variance():
    field = np.random.default_rng(3).standard_normal((12, 12, 12))
    k, p, nmodes = power_spectrum(field, L)
    assert nmodes.sum() == field.size - 1  # every mode but k = 0 is binned
    assert np.sum(p * nmodes) / L ** 3 == pytest.approx(field.var(), rel=1e-12)


def test_nbins_truncates_and_empty_bins_are_nan():
    field = np.random.default_rng(4).standard_normal((8, 8, 8))
    full = power_spectrum(field, L)
    cut = power_spectrum(field, L, nbins=4)
    np.testing.assert_allclose(cut.value, full.value[:4])
    wide = power_spectrum(field, L, nbins=12)
    assert wide.nmodes[-1] == 0 and np.isnan(wide.value[-1]) and np.isnan(wide.k[-1])


def test_correlation_transfer_cross():
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((2, 3, 8, 8, 8))
    np.testing.assert_allclose(correlation(a, a, L).value, 1, rtol=1e-12)
    np.testing.assert_allclose(correlation(a, -a, L).value, -1, rtol=1e-12)
    np.testing.assert_allclose(transfer(2 * a, a, L).value, 2, rtol=1e-12)
    np.testing.assert_allclose(cross_power(a, b, L).value, cross_power(b, a, L).value, rtol=1e-12)
    np.testing.assert_allclose(cross_power(a, a, L).value, power_spectrum(a, L).value, rtol=1e-12)
    # r of a + noise: P_ab = P_aa, so r = sqrt(P_aa / P_bb) per bin.
    r = correlation(a, a + b, L).value
    expected = cross_power(a, a + b, L).value / np.sqrt(power_spectrum(a, L).value * power_spectrum(a + b, L).value)
    np.testing.assert_allclose(r, expected, rtol=1e-12)
    assert np.all(np.abs(r) <= 1)


def test_ndim_disambiguates_2d_vector_field():
    field = np.random.default_rng(6).standard_normal((2, 8, 8))
    vec = power_spectrum(field, L, ndim=2).value
    np.testing.assert_allclose(vec, power_spectrum(field[0], L).value + power_spectrum(field[1], L).value)


def test_bad_inputs_are_user_errors():
    with pytest.raises(UserError):
        power_spectrum(np.zeros((8, 8, 8)), None)
    with pytest.raises(UserError):
        power_spectrum(np.zeros((8, 8, 8)), -1.0)
    with pytest.raises(UserError):
        power_spectrum(np.zeros((2, 2, 8, 8, 8)), L)
    with pytest.raises(UserError):
        cross_power(np.zeros((8, 8, 8)), np.zeros((4, 4, 4)), L)


def _store_like(values: np.ndarray, chunks: bool = False) -> xr.DataArray:
    """A DataArray laid out like a store field: (sample, channel, x, y, z) with cell-centre coords."""
    n = values.shape[-1]
    centres = (np.arange(n) + 0.5) * L / n
    data = da.from_array(values, chunks=(1, -1, -1, -1, -1)) if chunks else values
    return xr.DataArray(data, dims=("sample", "channel", "x", "y", "z"),
                        coords={"x": centres, "y": centres, "z": centres,
                                "file": ("sample", [f"f{i}.npy" for i in range(len(values))])})


def test_numpy_torch_xarray_dask_agree():
    values = np.random.default_rng(7).standard_normal((3, 3, 8, 8, 8)).astype(np.float32)
    ref = np.stack([power_spectrum(v, L).value for v in values])
    np.testing.assert_allclose(power_spectrum(torch.from_numpy(values[1]), L).value, ref[1], rtol=1e-12)
    for arr in (_store_like(values), _store_like(values, chunks=True)):
        out = power_spectrum(arr)  # boxsize from the cell-centre coordinates
        assert out.dims == ("sample", "k") and list(out.coords["file"].values) == ["f0.npy", "f1.npy", "f2.npy"]
        np.testing.assert_allclose(out.values, ref, rtol=1e-6)
        np.testing.assert_allclose(out.coords["k"].values, power_spectrum(values[0], L).k)
        r = correlation(arr, 2 * arr + 1)
        np.testing.assert_allclose(r.values, 1, rtol=1e-6)
    single = _store_like(values).isel(sample=0).assign_attrs(boxsize=L).drop_vars(["x", "y", "z"])
    assert power_spectrum(single).dims == ("k",)
    with pytest.raises(UserError):
        power_spectrum(single.drop_attrs())
    fractions = _store_like(values) / 1
    for d in ("x", "y", "z"):
        fractions.coords[d] = (d, (np.arange(8) + 0.5) / 8, {"units": "box fraction"})
    with pytest.raises(UserError):
        power_spectrum(fractions)


class _Log(Callback):
    """Records the start and end of every dask compute."""

    def __init__(self, log: list):
        super().__init__()
        self.log = log

    def _start(self, dsk):
        self.log.append("start")

    def _finish(self, dsk, state, errored):
        self.log.append("end")


def test_dask_backed_computes_one_sample_at_a_time():
    values = np.random.default_rng(8).standard_normal((4, 3, 8, 8, 8))
    log: list = []

    def load(i: int) -> np.ndarray:
        log.append(i)
        return values[i:i + 1]

    blocks = [da.from_delayed(dask.delayed(load)(i), shape=(1, 3, 8, 8, 8), dtype=float) for i in range(4)]
    arr = xr.DataArray(da.concatenate(blocks), dims=("sample", "channel", "x", "y", "z"), attrs={"boxsize": L})
    with dask.config.set(scheduler="synchronous"), _Log(log):
        out = power_spectrum(arr)
    assert log == [x for i in range(4) for x in ("start", i, "end")]
    np.testing.assert_allclose(out.values[2], power_spectrum(values[2], L).value, rtol=1e-12)


@given(shapes(min_side=1, max_side=7, min_ndim=2, max_ndim=3))
def test_mode_shells_bin_every_mode_of_the_full_space_once(shape):
    """Weighted stored modes per bin equal a brute-force count over the full FFT (the rfftn half space
    stands for its conjugate twins), and the weights cover every mode exactly once."""
    shells = analysis.mode_shells(shape)
    index = shells.index.numpy()
    weight = np.broadcast_to(shells.weight.numpy(), index.shape)
    assert index.shape == tuple(shape[:-1]) + (shape[-1] // 2 + 1,)
    assert weight.sum() == np.prod(shape)
    assert shells.nbins == int(np.rint(np.sqrt(sum((n // 2) ** 2 for n in shape))))
    count = np.zeros(shells.nbins + 1)
    for m in itertools.product(*[range(n) for n in shape]):
        nmag = np.sqrt(sum(min(mi, n - mi) ** 2 for mi, n in zip(m, shape)))
        count[int(np.floor(nmag + 0.5))] += 1
    binned = np.bincount(index.ravel(), weights=weight.ravel(), minlength=shells.nbins + 1)
    np.testing.assert_array_equal(binned[1:], count[1:])


def test_binned_spectra_are_differentiable_and_batch_power_agrees():
    """`models.power` (the original's batch interface) and `power_spectrum` are one computation."""
    from map2map.models import power

    x = torch.from_numpy(np.random.default_rng(10).standard_normal((2, 3, 8, 8, 8))).requires_grad_()
    k, p, nmodes = power(x, L)
    single = [power_spectrum(x[i].detach().numpy(), L) for i in range(2)]
    filled = single[0].nmodes > 0
    np.testing.assert_array_equal(nmodes.numpy(), single[0].nmodes[filled])
    np.testing.assert_allclose(k.detach().numpy(), single[0].k[filled], rtol=1e-12)
    np.testing.assert_allclose(p.detach().numpy(), (single[0].value + single[1].value)[filled] / 2, rtol=1e-12)
    # Parseval without the k = 0 mode: sum_bins nmodes P_ab / V = sum_c (<a_c b_c> - <a_c><b_c>) over
    # the N cells, so its gradient in a is (b - <b>) / N, per component
    a = x[0].detach().clone().requires_grad_()
    b = x[1].detach()
    _, nm, (paa, pbb, pab) = analysis.binned_spectra(a, b)
    (nm * pab).sum().backward()
    centred = b - b.mean(dim=(1, 2, 3), keepdim=True)
    np.testing.assert_allclose(a.grad.numpy(), centred.numpy() / 8 ** 3, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose((nm * pbb).sum().item(), (centred ** 2).mean(dim=(1, 2, 3)).sum().item(),
                               rtol=1e-12)


def test_fundamental_mode():
    assert analysis.fundamental_mode(2 * np.pi) == 1.0


def test_plots_return_figures(tmp_path):
    from matplotlib.figure import Figure

    from map2map import plot

    rng = np.random.default_rng(9)
    true, pred = rng.standard_normal((2, 3, 8, 8, 8))
    fig = plot.plot_slices({"true": true, "pred": torch.from_numpy(pred)}, axis=0, residual=("pred", "true"))
    assert isinstance(fig, Figure) and len([a for a in fig.axes if a.images]) == 3
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array().T, true[0, 4])
    assert fig.axes[0].images[0].norm is fig.axes[1].images[0].norm  # one shared scale
    fig.savefig(tmp_path / "slices.png")
    k, p_true, _ = power_spectrum(true, L)
    fig = plot.plot_spectra(k, {"true": p_true, "pred": np.stack([p_true, 2 * p_true])})
    assert isinstance(fig, Figure) and len(fig.axes) == 1 and len(fig.axes[0].lines) == 2
    fig = plot.plot_transfer_correlation(k, {"pred": transfer(pred, true, L).value},
                                         {"pred": correlation(pred, true, L).value}, stochasticity=True)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    fig.savefig(tmp_path / "tr.png")
