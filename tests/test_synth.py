"""Synthetic LPT data: determinism, the linear spectrum, growth, and the 1LPT/2LPT physics."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
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
