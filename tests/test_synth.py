"""Synthetic LPT data: determinism, the linear spectrum, growth, and the 1LPT/2LPT physics."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate

from map2map import cosmology, synth
from map2map.analysis import correlation, power_spectrum
from map2map.cli import main
from map2map.errors import UserError
from stores import tree_digest

N, L = 32, 128.0  # grid cells per side, box side [Mpc/h]


def synthesize(outdir: Path, **kwargs) -> dict[str, list[Path]]:
    """Run the stage; the files it wrote per field."""
    summary = synth.run(synth.SynthConfig(outdir=str(outdir), **kwargs))
    return {name: [Path(p) for p in files] for name, files in summary.paths.items()}


def spectral_derivative(field: np.ndarray, axis: int, boxsize: float) -> np.ndarray:
    """d field / d x_axis by a full complex FFT (independent of synth's rfftn code)."""
    n = field.shape[axis]
    k = 2 * np.pi * np.fft.fftfreq(n, boxsize / n)
    shape = [1] * field.ndim
    shape[axis] = n
    return np.fft.ifftn(1j * k.reshape(shape) * np.fft.fftn(field)).real


def drop_nyquist(field: np.ndarray) -> np.ndarray:
    """Remove the Fourier modes on any Nyquist plane of an even grid."""
    fk = np.fft.fftn(field)
    n = field.shape[0]
    for axis in range(field.ndim):
        index = [slice(None)] * field.ndim
        index[axis] = n // 2
        fk[tuple(index)] = 0
    return np.fft.ifftn(fk).real


@pytest.fixture(scope="module")
def delta() -> np.ndarray:
    return synth.linear_field(N, L, np.random.default_rng(11))


# ------------------------------------------------------------- cosmology

def test_sigma8_normalisation_by_quad():
    """int dk k^2 P(k) W(8k)^2 / (2 pi^2) = sigma8^2, integrated independently with quad in ln k."""
    cosmo = synth.Cosmology(sigma8=0.75, omega_m=0.3)

    def integrand(lnk: float) -> float:
        k = np.exp(lnk)
        x = 8.0 * k
        w = 3 * (np.sin(x) - x * np.cos(x)) / x ** 3
        return k ** 3 * synth.linear_power(k, cosmo) * w ** 2 / (2 * np.pi ** 2)

    value, _ = integrate.quad(integrand, np.log(1e-6), np.log(50.0), limit=500, epsrel=1e-9)
    assert value == pytest.approx(0.75 ** 2, rel=1e-5)


def test_growth_factor_matches_ode():
    """D(z) against the growth ODE d^2D/dlna^2 + (2 + dlnH/dlna) dD/dlna = 1.5 Om(a) D."""
    om = 0.31

    def rhs(lna, y):
        a = np.exp(lna)
        e2 = om / a ** 3 + 1 - om
        dlnh = -1.5 * om / a ** 3 / e2
        return [y[1], -(2 + dlnh) * y[1] + 1.5 * om / a ** 3 / e2 * y[0]]

    a0 = 1e-3  # matter domination: D = a
    sol = integrate.solve_ivp(rhs, [np.log(a0), 0.0], [a0, a0], rtol=1e-10, atol=1e-14, dense_output=True)
    d_today = sol.sol(0.0)[0]
    for z in (0.0, 0.5, 1.0, 3.0):
        expected = sol.sol(-np.log(1 + z))[0] / d_today
        assert cosmology.growth_factor(z, om) == pytest.approx(expected, rel=1e-5)
    assert cosmology.growth_factor(0.0, om) == 1.0


def test_eh_transfer_limits():
    k = np.logspace(-5, 1, 200)
    t = synth.eh_nowiggle_transfer(k)
    assert t[0] == pytest.approx(1.0, abs=1e-4)
    assert np.all(np.diff(t) < 0)
    # More baryons suppress small-scale power (EH98's alpha_Gamma < 1).
    more_b = synth.eh_nowiggle_transfer(1.0, synth.Cosmology(omega_b=0.08))
    assert more_b < synth.eh_nowiggle_transfer(1.0)


# -------------------------------------------------------------- linear field

def expected_binned_power(nbins: int) -> np.ndarray:
    """Bin average of P(|k|) over the analysis bins: the spectrum of a field with |delta_k|^2 = <|delta_k|^2>."""
    ks = synth.wavevectors(N, L)
    k = np.sqrt(sum(ki ** 2 for ki in ks))
    amp = np.zeros_like(k)
    amp[k > 0] = np.sqrt(synth.linear_power(k[k > 0]) * N ** 6 / L ** 3)
    return power_spectrum(np.fft.irfftn(amp, s=(N,) * 3, axes=(0, 1, 2)), L, nbins=nbins).value


def test_linear_power_within_cosmic_variance():
    """Each bin averages nmodes/2 independent |delta_k|^2 (exponential, mean P): relative rms sqrt(2/nmodes).

    Bins 3..N/2-1 (below Nyquist, where no mode touches a Nyquist plane) must
    lie within 4 sigma, and the mean squared deviation in sigma (a chi^2 per
    bin) must be of order 1; fixed seeds make this deterministic.
    """
    nbins = N // 2 - 1
    expected = expected_binned_power(nbins)[2:]
    for seed in (0, 1):
        k, p, nmodes = power_spectrum(synth.linear_field(N, L, np.random.default_rng(seed)), L, nbins=nbins)
        z = (p[2:] / expected - 1) / np.sqrt(2 / nmodes[2:])
        assert np.all(np.abs(z) < 4), z
        assert 0.2 < np.mean(z ** 2) < 3, z
        # The mode-weighted mean ratio pools all bins: rms sqrt(2 / sum nmodes), about 1 %.
        mean_ratio = np.sum(nmodes[2:] * p[2:] / expected) / np.sum(nmodes[2:])
        assert abs(mean_ratio - 1) < 4 * np.sqrt(2 / np.sum(nmodes[2:])), mean_ratio


def test_linear_field_scales_with_growth():
    rng0, rng1 = np.random.default_rng(5), np.random.default_rng(5)
    d0 = synth.linear_field(16, L, rng0)
    d1 = synth.linear_field(16, L, rng1, redshift=1.0)
    np.testing.assert_allclose(d1, cosmology.growth_factor(1.0) * d0, rtol=1e-12, atol=1e-14)
    assert abs(d0.mean()) < 1e-14


# ------------------------------------------------------------------------ LPT

def test_za_divergence_is_minus_delta(delta):
    psi1 = synth.za_displacement(delta, L)
    div = sum(spectral_derivative(psi1[i], i, L) for i in range(3))
    np.testing.assert_allclose(div, -delta, rtol=0, atol=1e-12 * np.abs(delta).max())


def test_lpt_of_plane_waves_by_hand():
    """delta = A (cos kx + cos ky): psi1_x = -A sin(kx)/k, psi2_x = -(3/7) A^2 sin(kx) cos(ky) / (2k).

    By hand: phi1 = -delta/k^2, so source2 = phi_xx phi_yy = A^2 cos kx cos ky and
    lap phi2 = source2 gives phi2 = -A^2 cos kx cos ky / (2 k^2).  A single plane
    wave has no 2LPT correction (the Zel'dovich solution is exact in 1D).
    """
    n, amp = 16, 0.3
    k = 2 * np.pi * 2 / L
    x = np.arange(n)[:, None, None] * L / n
    y = np.arange(n)[None, :, None] * L / n
    delta = np.broadcast_to(amp * (np.cos(k * x) + np.cos(k * y)), (n,) * 3)
    psi1 = synth.za_displacement(delta, L)
    psi2 = synth.lpt2_correction(delta, L)
    atol = 1e-14 * L
    np.testing.assert_allclose(psi1[0], np.broadcast_to(-amp * np.sin(k * x) / k, (n,) * 3), atol=atol)
    np.testing.assert_allclose(psi1[2], 0, atol=atol)
    expected = -3 / 7 * amp ** 2 * np.sin(k * x) * np.cos(k * y) / (2 * k)
    np.testing.assert_allclose(psi2[0], np.broadcast_to(expected, (n,) * 3), atol=atol)
    np.testing.assert_allclose(psi2[2], 0, atol=atol)
    plane = np.broadcast_to(amp * np.cos(k * x), (n,) * 3)
    np.testing.assert_allclose(synth.lpt2_correction(plane, L), 0, atol=atol)


def test_2lpt_divergence_is_d2_times_source(delta):
    """div psi2 = D2 sum_{i<j}(phi_ii phi_jj - phi_ij^2), lap phi = delta, from an independent Hessian."""
    phi = np.fft.ifftn(np.fft.fftn(delta) * _inverse_minus_k2(N, L)).real
    hess = [[spectral_derivative(spectral_derivative(phi, i, L), j, L) for j in range(3)] for i in range(3)]
    source = sum(hess[i][i] * hess[j][j] - hess[i][j] ** 2 for i in range(3) for j in range(i + 1, 3))
    psi2 = synth.lpt2_correction(delta, L)
    div = sum(spectral_derivative(psi2[i], i, L) for i in range(3))
    expected = synth.second_order_growth(1.0) * drop_nyquist(source - source.mean())
    np.testing.assert_allclose(drop_nyquist(div), expected, rtol=0, atol=1e-10 * np.abs(expected).max())


def _inverse_minus_k2(n: int, boxsize: float) -> np.ndarray:
    k1 = 2 * np.pi * np.fft.fftfreq(n, boxsize / n)
    k2 = k1[:, None, None] ** 2 + k1[None, :, None] ** 2 + k1[None, None, :] ** 2
    out = np.zeros_like(k2)
    out[k2 > 0] = -1 / k2[k2 > 0]
    return out


def test_2lpt_scales_as_d_squared_and_is_a_small_correction(tmp_path):
    """psi1 grows as D, psi2 as D^2: the correction grows faster than the linear displacement."""
    paths = {z: synthesize(tmp_path / f"z{z}", ngrid=N, boxsize=L, seed=2, redshift=z) for z in (0.0, 1.0)}
    psi1 = {z: np.load(p["dis_za"][0]).astype(np.float64) for z, p in paths.items()}
    psi2 = {z: np.load(p["dis_2lpt"][0]) - np.load(p["dis_za"][0]).astype(np.float64) for z, p in paths.items()}
    d = cosmology.growth_factor(1.0)
    np.testing.assert_allclose(psi1[1.0], d * psi1[0.0], rtol=0, atol=1e-5 * np.abs(psi1[0.0]).max())
    np.testing.assert_allclose(psi2[1.0], d ** 2 * psi2[0.0], rtol=0, atol=1e-4 * np.abs(psi2[0.0]).max())

    def rms(a):
        return np.sqrt(np.mean(a ** 2))

    ratio0, ratio1 = rms(psi2[0.0]) / rms(psi1[0.0]), rms(psi2[1.0]) / rms(psi1[1.0])
    assert ratio1 == pytest.approx(d * ratio0, rel=1e-3)
    # 4 Mpc/h cells at z = 0 are mildly nonlinear (cell rms delta ~ 1.8): the correction is ~ 20 %.
    assert 0.05 < ratio0 < 0.3


# ------------------------------------------------------------------ densities

def test_cic_single_particles():
    cell = L / 8
    at_centre = synth.cic_paint(np.array([[2.5], [3.5], [0.5]]) * cell, 8, L)
    assert at_centre[2, 3, 0] == 1.0 and at_centre.sum() == 1.0
    corner = synth.cic_paint(np.array([[0.0], [3.0], [4.0]]) * cell, 8, L)  # between 8 centres, wraps in x
    expected = np.zeros((8, 8, 8))
    for i in (7, 0):
        expected[i, 2:4, 3:5] = 1 / 8
    np.testing.assert_allclose(corner, expected, atol=1e-15)


def test_za_density_follows_linear_density_on_large_scales(delta):
    dens = synth.density_from_displacement(synth.za_displacement(delta, L), L)
    assert abs(dens.mean()) < 1e-12  # mass conservation
    assert np.all(dens >= -1)
    assert np.all(synth.density_from_displacement(np.zeros((3, 8, 8, 8)), L) == 0)
    r = correlation(dens, delta, L, nbins=4).value
    assert r[0] > 0.99 and r[1] > 0.9, r  # nonlinear decorrelation grows with k at z = 0


# ----------------------------------------------------------------- the stage

def test_synthesize_layout_and_determinism(tmp_path):
    a = synthesize(tmp_path / "a", num_samples=2, ngrid=16, boxsize=64.0, seed=3, density=True)
    b = synthesize(tmp_path / "b", num_samples=2, ngrid=16, boxsize=64.0, seed=3, density=True)
    c = synthesize(tmp_path / "c", num_samples=1, ngrid=16, boxsize=64.0, seed=4, prefix="s")
    assert set(a) == {"dis_za", "dis_2lpt", "dens_za", "dens_2lpt"} and set(c) == {"dis_za", "dis_2lpt"}
    assert a["dis_za"][1] == tmp_path / "a" / "001" / "dis_za.npy"
    assert c["dis_za"][0] == tmp_path / "c" / "s000" / "dis_za.npy"
    for name, shape in (("dis_za", (3, 16, 16, 16)), ("dens_2lpt", (1, 16, 16, 16))):
        for pa, pb in zip(a[name], b[name]):
            assert pa.read_bytes() == pb.read_bytes()
            arr = np.load(pa)
            assert arr.shape == shape and arr.dtype == np.float32
    assert a["dis_za"][0].read_bytes() != a["dis_za"][1].read_bytes()
    assert a["dis_za"][0].read_bytes() != c["dis_za"][0].read_bytes()
    # A sample depends on (seed, i) only, not on how many samples were asked for.
    one = synthesize(tmp_path / "one", num_samples=1, ngrid=16, boxsize=64.0, seed=3)
    assert one["dis_2lpt"][0].read_bytes() == a["dis_2lpt"][0].read_bytes()
    record = json.loads(synth.params_path(tmp_path / "a").read_text())
    assert record["seed"] == 3 and record["ngrid"] == 16 and record["cosmology"]["sigma8"] == 0.81
    assert record["growth_D1"] == 1.0 and record["growth_D2"] == pytest.approx(-3 / 7)
    assert [s["dir"] for s in record["samples"]] == ["000", "001"]
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no temporaries left


def test_synthesize_cosmology_and_errors(tmp_path):
    low = synthesize(tmp_path / "low", ngrid=8, cosmology=synth.Cosmology(sigma8=0.4))
    high = synthesize(tmp_path / "high", ngrid=8, cosmology=synth.Cosmology(sigma8=0.8))
    np.testing.assert_allclose(np.load(high["dis_za"][0]), 2 * np.load(low["dis_za"][0]), rtol=1e-5, atol=1e-6)
    for kwargs in ({"ngrid": 1}, {"boxsize": -1.0}, {"redshift": -2.0}, {"num_samples": 0}, {"seed": -1},
                   {"cosmology": {"omega_m": 0.3}}):
        with pytest.raises(UserError):
            synthesize(tmp_path / "bad", **kwargs)
    with pytest.raises(UserError, match="omega_b=0.5"):
        synth.Cosmology(omega_b=0.5)
    assert not (tmp_path / "bad").exists()


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        paths = synthesize(tmp_path / "u", ngrid=4)
    finally:
        os.umask(old)
    assert (paths["dis_za"][0].stat().st_mode & 0o777) == 0o640
    assert (synth.params_path(tmp_path / "u").stat().st_mode & 0o777) == 0o640


def test_cli_prints_the_summary_lines(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "s"), "--num-samples", "2", "--ngrid", "4", "--seed", "5",
                 "--density", "--prefix", "p"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{name}: 2 files, e.g. {tmp_path / 's' / 'p000' / name}.npy"
                   for name in ("dis_za", "dis_2lpt", "dens_za", "dens_2lpt")]
    direct = synth.run(synth.SynthConfig(outdir=str(tmp_path / "t"), num_samples=2, ngrid=4, seed=5, density=True,
                                         prefix="p"))
    assert (tmp_path / "s" / "p001" / "dens_2lpt.npy").read_bytes() == Path(direct.paths["dens_2lpt"][1]).read_bytes()
    as_json = json.loads(direct.dumps())
    assert as_json["paths"]["dis_za"] == [str(tmp_path / "t" / f"p00{i}" / "dis_za.npy") for i in range(2)]
    assert as_json["params"] == str(tmp_path / "t" / "psynth.json") and as_json["seconds"] >= 0


# ------------------------------------------- issue 16: existing directories, paths, ranges, memory



def refused(capsys, root: Path, args: list[str], message: str) -> None:
    """`m2m synth ARGS`: exit 2, one stderr line holding `message`, nothing under `root` changed or created."""
    before = tree_digest(root)
    capsys.readouterr()
    assert main(["synth", *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("m2m synth: error: "), captured.err
    assert message in captured.err and captured.out == "", captured.err
    assert tree_digest(root) == before


def test_existing_directory_refused_then_overwrite_removes_only_its_own(tmp_path, capsys):
    out = tmp_path / "sims"
    assert main(["synth", str(out), "--num-samples", "3", "--ngrid", "8", "--density"]) == 0
    (out / "notes.txt").write_text("mine")
    (out / "000" / "mine.npy").write_bytes(b"also mine")
    refused(capsys, tmp_path, [str(out), "--ngrid", "4"], "is not empty (it holds an earlier m2m synth's files)")
    assert main(["synth", str(out), "--ngrid", "4", "--overwrite"]) == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "000", "000/dis_2lpt.npy", "000/dis_za.npy", "000/mine.npy", "notes.txt", "synth.json"]
    assert np.load(out / "000" / "dis_za.npy").shape == (3, 4, 4, 4)  # no mix of old and new grids
    assert (out / "notes.txt").read_text() == "mine" and (out / "000" / "mine.npy").read_bytes() == b"also mine"
    record = json.loads(synth.params_path(out).read_text())
    assert record["complete"] and record["ngrid"] == 4 and [s["dir"] for s in record["samples"]] == ["000"]


def test_overwrite_never_replaces_files_it_did_not_write(tmp_path, capsys):
    foreign = tmp_path / "f"
    (foreign / "000").mkdir(parents=True)
    (foreign / "000" / "dis_za.npy").write_bytes(b"user data")
    refused(capsys, tmp_path, [str(foreign)], "is not empty (it holds files m2m synth did not write)")
    refused(capsys, tmp_path, [str(foreign), "--overwrite"], "already holds 000/dis_za.npy")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "synth.json").write_text("{}")
    refused(capsys, tmp_path, [str(tmp_path / "g"), "--overwrite"], "already holds synth.json, which is no record")


@pytest.mark.parametrize("args,message", [
    (["--prefix", "../x"], "--prefix '../x': a prefix of sample directory names may not contain '/'"),
    (["--prefix", "a/b"], "may not contain '/'"),
    (["--num-samples", "0"], "--num-samples 0: expected a whole number >= 1"),
    (["--ngrid", "1"], "--ngrid 1: expected a whole number >= 2"),
    (["--seed", "-1"], "--seed -1"),
    (["--boxsize", "0"], "--boxsize 0.0: expected a finite positive"),
    (["--boxsize", "-5"], "--boxsize -5.0"),
    (["--boxsize", "nan"], "--boxsize nan"),
    (["--boxsize", "inf"], "--boxsize inf"),
    (["--redshift", "-1"], "--redshift -1.0: expected a finite number > -1"),
    (["--redshift", "nan"], "--redshift nan"),
    (["--ngrid", "100000"], "--ngrid 100000: making one sample needs about"),
])
def test_bad_options_refused_before_anything_is_written(tmp_path, capsys, args, message):
    refused(capsys, tmp_path, [str(tmp_path / "new" / "sims"), "--ngrid", "4", *args], message)


def test_memory_and_disk_are_checked_up_front(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "available_memory", lambda: 100 * 8 ** 3)
    config = synth.SynthConfig(outdir=str(tmp_path / "s"), ngrid=8)
    with pytest.raises(UserError, match="needs about 60 KiB of memory, 50 KiB is available"):
        synth.run(config)
    monkeypatch.setattr(synth, "available_memory", lambda: None)  # unknown: not refused
    synth.check_resources(config)
    huge = synth.SynthConfig(outdir=str(tmp_path / "s"), ngrid=512, num_samples=10 ** 6)
    with pytest.raises(UserError, match="on disk"):
        synth.check_resources(huge)
    assert list(tmp_path.iterdir()) == []
    assert synth.available_memory() is None or synth.available_memory() > 0


@pytest.mark.parametrize("where,message", [
    ("file", "OUTDIR {d}/file exists and is not a directory"),
    ("file/sims", "{d}/file is a file, not a directory"),
    ("/proc/x", "proc file system"),
    ("s.zarr/sims", "is inside the map2map store"),
])
def test_output_paths_that_cannot_be_written(tmp_path, capsys, where, message):
    (tmp_path / "file").write_text("x")
    from map2map import store

    store.create(tmp_path / "s.zarr", [store.FieldLayout("f", 1, (4, 4), (4, 4), (2, 2))], nsample=0, boxsize=None,
                 settings={})
    path = where if where.startswith("/") else str(tmp_path / where)
    refused(capsys, tmp_path, [path, "--ngrid", "4"], message.format(d=tmp_path))


def test_a_failing_run_removes_what_it_wrote(tmp_path, monkeypatch):
    """Interrupted after its first sample: nothing of this run is left, the files of others are kept."""
    fields = synth.sample_fields
    calls = []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return fields(*args, **kwargs)

    monkeypatch.setattr(synth, "sample_fields", second_fails)
    with pytest.raises(KeyboardInterrupt):
        synth.run(synth.SynthConfig(outdir=str(tmp_path / "new"), num_samples=3, ngrid=4))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        synth.run(synth.SynthConfig(outdir=str(tmp_path / "kept"), num_samples=3, ngrid=4, overwrite=True))
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["notes.txt"]


def test_second_writer_of_one_directory_is_refused(tmp_path):
    from map2map.utils.locks import writer_lock

    with writer_lock(tmp_path / "sims", "m2m synth"):
        with pytest.raises(UserError, match=f"being written by m2m synth .*pid {os.getpid()}"):
            synth.run(synth.SynthConfig(outdir=str(tmp_path / "sims"), ngrid=4))


# ------------------------------------------------- issue 14: super-resolution pairs (--sr F)

def fourier_series(field: np.ndarray, points: np.ndarray, kmax: int, boxsize: float) -> np.ndarray:
    """The field's trigonometric interpolant, modes |n_i| <= kmax only, at `points` (3, M) [Mpc/h].

    Sample (i, j, l) sits at its cell centre ((i, j, l) + 1/2) L / n; full complex FFT, a direct sum
    (independent of synth's rfftn code).
    """
    n = field.shape[0]
    fk = np.fft.fftn(field) / n ** 3
    out = np.zeros(points.shape[1], dtype=complex)
    for nx in range(-kmax, kmax + 1):
        for ny in range(-kmax, kmax + 1):
            for nz in range(-kmax, kmax + 1):
                nvec = np.array([nx, ny, nz])
                shift = np.exp(-1j * np.pi * nvec.sum() / n)  # the DFT's origin is half a cell before sample 0
                out += fk[nx % n, ny % n, nz % n] * shift * np.exp(2j * np.pi * (nvec @ points) / boxsize)
    return out.real


@pytest.mark.parametrize("ngrid,factor", [(8, 2), (7, 3)])
def test_sr_fine_field_is_the_coarse_field_on_the_coarse_modes(ngrid, factor):
    """At any physical point, the modes below the coarse Nyquist frequency of both fields sum to the same value."""
    low, high = synth.sr_linear_fields(ngrid, factor, L, np.random.default_rng(2))
    assert low.shape == (ngrid,) * 3 and high.shape == (ngrid * factor,) * 3
    points = np.random.default_rng(0).uniform(0, L, (3, 6))
    kmax = (ngrid - 1) // 2
    on_low, on_high = fourier_series(low, points, kmax, L), fourier_series(high, points, kmax, L)
    assert np.abs(on_low - on_high).max() < 1e-12 * np.abs(low).max()
    # ... and the fine field has more: its modes above the coarse Nyquist frequency are not zero
    assert np.abs(fourier_series(high, points, kmax + 1, L) - on_high).max() > 1e-3 * np.abs(low).max()


def test_sr_coarse_field_is_the_plain_linear_field_and_the_fine_one_has_the_linear_spectrum():
    n, factor = 16, 2
    low, high = synth.sr_linear_fields(n, factor, L, np.random.default_rng(9))
    assert np.array_equal(low, synth.linear_field(n, L, np.random.default_rng(9)))
    # fine field: modes beyond the coarse grid follow P(k) (pooled over the shells between the Nyquists)
    k, p, nmodes = power_spectrum(high, L, nbins=n * factor // 2 - 1)
    beyond = (k > np.pi * n / L) & (k < np.pi * n * factor / L * 0.9)
    ratio = np.sum(nmodes[beyond] * p[beyond] / synth.linear_power(k[beyond])) / np.sum(nmodes[beyond])
    assert abs(ratio - 1) < 0.05, ratio


def test_synth_sr_writes_pairs_that_convert_into_one_store(tmp_path, capsys):
    paths = synthesize(tmp_path / "sr", num_samples=2, ngrid=8, boxsize=32.0, seed=4, sr=2, density=True)
    assert set(paths) == {"dis_lr", "dis_hr", "dens_lr", "dens_hr"}
    for name, shape in (("dis_lr", (3, 8, 8, 8)), ("dis_hr", (3, 16, 16, 16)), ("dens_lr", (1, 8, 8, 8)),
                        ("dens_hr", (1, 16, 16, 16))):
        arr = np.load(paths[name][1])
        assert arr.shape == shape and arr.dtype == np.float32 and np.all(np.isfinite(arr))
    # the coarse displacement is the plain run's 2LPT displacement of the same seed
    plain = synthesize(tmp_path / "plain", num_samples=2, ngrid=8, boxsize=32.0, seed=4)
    assert np.array_equal(np.load(paths["dis_lr"][1]), np.load(plain["dis_2lpt"][1]))
    # the fine 2LPT field's coarse modes agree with the coarse one's up to the 2LPT coupling of small scales
    lo, hi = np.load(paths["dis_lr"][0]), np.load(paths["dis_hr"][0])
    pts = np.random.default_rng(1).uniform(0, 32.0, (3, 4))
    a, b = fourier_series(lo[0].astype(float), pts, 2, 32.0), fourier_series(hi[0].astype(float), pts, 2, 32.0)
    assert np.abs(a - b).max() < 0.2 * np.abs(a).max()
    record = json.loads(synth.params_path(tmp_path / "sr").read_text())
    assert record["sr"] == 2 and record["ngrid_hr"] == 16 and set(record["fields"]) == set(paths)
    assert main(["convert", str(tmp_path / "s.zarr"), f"--field=lr={tmp_path}/sr/*/dis_lr.npy",
                 f"--field=hr={tmp_path}/sr/*/dis_hr.npy", "--boxsize", "32", "--crop", "4", "--no-progress"]) == 0
    from map2map import store
    st = store.open_store(tmp_path / "s.zarr")
    assert st.field("hr").shape == (2, 3, 16, 16, 16) and np.array_equal(st.field("hr")[1], np.load(paths["dis_hr"][1]))


@pytest.mark.parametrize("value", ["1", "0", "-2"])
def test_sr_factor_below_two_is_refused(tmp_path, capsys, value):
    refused(capsys, tmp_path, [str(tmp_path / "sims"), "--ngrid", "4", "--sr", value],
            f"--sr {value}: expected a whole refinement factor >= 2")


def test_sr_memory_counts_the_fine_grid(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "available_memory", lambda: 200 * 8 ** 3)  # fits 8^3 alone, not 8^3 + 16^3
    synth.check_resources(synth.SynthConfig(outdir=str(tmp_path / "s"), ngrid=8))
    with pytest.raises(UserError, match="--ngrid 8 --sr 2: making one sample needs about"):
        synth.check_resources(synth.SynthConfig(outdir=str(tmp_path / "s"), ngrid=8, sr=2))


# ------------------------------------- issue 13: boxes at several redshifts and Omega_m, velocities, styles

def test_styled_run_writes_every_pair_a_style_table_and_velocities(tmp_path, capsys):
    out = tmp_path / "sims"
    summary = synth.run(synth.SynthConfig(outdir=str(out), num_samples=2, ngrid=8, boxsize=32.0, seed=1,
                                          redshifts=(0.0, 1.0), omega_m=(0.25, 0.35), velocity=True))
    assert summary.style_table == str(out / "styles.csv") and "styles: Om, D" in summary.lines()[-1]
    record = json.loads(synth.params_path(out).read_text())
    assert [s["dir"] for s in record["samples"]] == [f"{i:03d}" for i in range(8)]
    pairs = [(s["seed_sequence"][1], s["redshift"], s["omega_m"]) for s in record["samples"]]
    assert pairs == [(i, z, om) for i in range(2) for z in (0.0, 1.0) for om in (0.25, 0.35)]
    lines = (out / "styles.csv").read_text().splitlines()
    assert lines[0] == "Om,D" and len(lines) == 9
    for line, (_, z, om) in zip(lines[1:], pairs):
        assert [float(v) for v in line.split(",")] == [om, cosmology.growth_factor(z, om)]
    load = lambda i, name: np.load(out / f"{i:03d}" / f"{name}.npy").astype(np.float64)  # noqa: E731
    # the same white noise at every pair: the 1LPT field grows as D
    ratio = cosmology.growth_factor(1.0, 0.25)
    np.testing.assert_allclose(load(2, "dis_za"), ratio * load(0, "dis_za"), rtol=1e-5, atol=1e-5)
    # velocities: a H f (psi1 + 2 psi2), psi2 = dis_2lpt - dis_za
    for i, (_, z, om) in enumerate(pairs[:4]):
        psi1, psi = load(i, "dis_za"), load(i, "dis_2lpt")
        factor = cosmology.scale_factor(z) * cosmology.hubble(z, om) * cosmology.growth_rate(z, om)
        np.testing.assert_allclose(load(i, "vel_za"), factor * psi1, rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(load(i, "vel_2lpt"), factor * (2 * psi - psi1), rtol=1e-4, atol=1e-3)
    # the table is what m2m convert --styles reads
    assert main(["convert", str(tmp_path / "s.zarr"), f"--field=za={out}/*/dis_za.npy",
                 f"--field=v={out}/*/vel_2lpt.npy", "--styles", str(out / "styles.csv"), "--no-progress"]) == 0
    from map2map import store
    names, values = store.read_styles(tmp_path / "s.zarr")
    assert names == ("Om", "D")
    assert np.array_equal(values, np.array([[om, cosmology.growth_factor(z, om)] for _, z, om in pairs], "f4"))
    # --overwrite removes the table with the rest of what synth wrote
    synth.run(synth.SynthConfig(outdir=str(out), ngrid=4, overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == ["000", "synth.json"]


def test_plain_run_is_unchanged_by_the_styled_options(tmp_path):
    """Without --redshifts / --omega-m / --velocity: the same files, bit for bit, and no table."""
    plain = synthesize(tmp_path / "a", ngrid=8, redshift=0.5, seed=2)
    one = synthesize(tmp_path / "b", ngrid=8, redshifts=(0.5,), seed=2)
    assert plain["dis_2lpt"][0].read_bytes() == one["dis_2lpt"][0].read_bytes()
    assert not (tmp_path / "a" / "styles.csv").exists() and (tmp_path / "b" / "styles.csv").exists()


def test_a_foreign_style_table_is_never_replaced(tmp_path, capsys):
    out = tmp_path / "sims"
    out.mkdir()
    (out / "styles.csv").write_text("mine\n")
    refused(capsys, tmp_path, [str(out), "--ngrid", "4", "--redshifts", "0,1", "--overwrite"],
            "already holds styles.csv, which no earlier m2m synth there wrote")
    assert (out / "styles.csv").read_text() == "mine\n"


@pytest.mark.parametrize("args,message", [
    (["--redshift", "1", "--redshifts", "0,1"], "--redshift and --redshifts exclude each other"),
    (["--redshifts", "0,0"], "a value is given twice"),
    (["--redshifts", "-1"], "--redshifts -1.0: expected redshifts > -1"),
    (["--redshifts", "0,inf"], "--redshifts inf: expected finite numbers"),
    (["--omega-m", "0.01"], "--omega-m 0.01: expected Omega_m above Omega_b"),
    (["--omega-m", "1.5"], "--omega-m 1.5"),
    (["--sr", "2", "--velocity"], "leave out --redshifts, --omega-m and --velocity"),
    (["--sr", "2", "--omega-m", "0.3"], "--sr writes super-resolution pairs"),
])
def test_bad_styled_options_are_refused(tmp_path, capsys, args, message):
    refused(capsys, tmp_path, [str(tmp_path / "new" / "sims"), "--ngrid", "4", *args], message)


@settings(max_examples=30, deadline=None)
@given(ngrid=st.integers(2, 16), factor=st.integers(2, 4))
def test_shared_modes_index_the_same_frequencies_on_both_grids(ngrid, factor):
    """Every rfftn frequency with |n_i| <= (ngrid - 1) // 2, each once, at its own place on both grids."""
    lo, hi, freqs = synth.shared_modes(ngrid, factor)
    m = (ngrid - 1) // 2

    def frequencies(n: int, index) -> np.ndarray:
        axes = [np.fft.fftfreq(n, 1 / n), np.fft.fftfreq(n, 1 / n), np.fft.rfftfreq(n, 1 / n)]
        picked = [a[i] for a, i in zip(axes, index)]  # np.ix_ index: one array per axis, broadcasting
        return np.stack(np.broadcast_arrays(*np.ix_(*[p.ravel() for p in picked]))).reshape(3, -1).T

    want = np.stack(np.broadcast_arrays(*freqs)).reshape(3, -1).T
    assert np.array_equal(frequencies(ngrid, lo), want) and np.array_equal(frequencies(ngrid * factor, hi), want)
    every = {(a, b, c) for a in range(-m, m + 1) for b in range(-m, m + 1) for c in range(0, m + 1)}
    assert len(want) == len(every) and set(map(tuple, want.astype(int))) == every
