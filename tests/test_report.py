"""The demo report: spectral comparison against the truth and the plain verdict."""

import numpy as np

from map2map import report, synth


def test_compare_and_verdict(tmp_path):
    paths = synth.run(synth.SynthConfig(outdir=str(tmp_path / "sims"), num_samples=1, ngrid=16, boxsize=64.0,
                                        seed=1)).paths
    za, lpt = np.load(paths["dis_za"][0]), np.load(paths["dis_2lpt"][0])
    cmp = report.compare(lpt, {"perfect": lpt.copy(), "za": za, "half": 0.5 * lpt}, 64.0)
    sel = cmp.k <= cmp.k_max
    np.testing.assert_allclose(cmp.correlation["perfect"][sel], 1.0, rtol=1e-6)
    np.testing.assert_allclose(cmp.transfer["half"][sel], 0.5, rtol=1e-6)
    np.testing.assert_allclose(cmp.correlation["half"][sel], 1.0, rtol=1e-6)
    assert cmp.k_max == np.pi * 16 / 64.0 / 2 and cmp.k[sel].max() <= cmp.k_max
    assert cmp.mean_r("za") < 1.0
    beat, text = report.verdict(cmp, "perfect", "za")
    assert beat and "BEATS" in text
    beat, text = report.verdict(cmp, "za", "perfect")
    assert not beat and "does NOT beat" in text
    md = report.markdown(cmp, text, report.figures(cmp, {"za": za, "pred": lpt, "true": lpt}, tmp_path), {"n": 16})
    assert md.count("\n| ") == int(sel.sum()) + 1  # header + one row per bin up to half Nyquist
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("spectra.png", "transfer_correlation.png", "slices.png"))
