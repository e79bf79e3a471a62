"""bench/styled.py's data and error measure: the input is the realisation's ZA displacement at D = 1 whatever the
sample's redshift (so only the style tells a model the time), and the RMS is over voxels of the error vector's
length."""

from __future__ import annotations

import importlib.util
import json

from types import SimpleNamespace

import numpy as np
import torch

from conftest import ROOT
from map2map import synth
from map2map.cosmology import second_order_growth
from map2map.data.styles import StyleNorm

SCRIPT = ROOT / "bench" / "styled.py"


def _load_script():
    """bench/styled.py as a module (bench/ is no package; its directory stays off sys.path)."""
    spec = importlib.util.spec_from_file_location("bench_styled", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


styled = _load_script()


def test_input_is_za_at_d1_for_every_redshift(tmp_path):
    npy = tmp_path / "npy"
    synth.run(synth.SynthConfig(outdir=str(npy), num_samples=2, ngrid=8, boxsize=64.0, redshifts=(0.0, 1.5)))
    styled.add_za0(npy)
    samples = json.loads((npy / "synth.json").read_text())["samples"]
    za0 = [np.load(npy / s["dir"] / "dis_za0.npy") for s in samples]
    lpt = [np.load(npy / s["dir"] / "dis_2lpt.npy") for s in samples]
    # realisation-major: (r0 z0, r0 z1.5, r1 z0, r1 z1.5); z = 0's ZA is the D = 1 one
    for i in (0, 2):
        np.testing.assert_array_equal(za0[i], np.load(npy / samples[i]["dir"] / "dis_za.npy"))
        np.testing.assert_allclose(za0[i + 1], za0[i], rtol=1e-5, atol=1e-6 * np.abs(za0[i]).max())
        assert not np.array_equal(lpt[i], lpt[i + 1])  # same input, different targets: D is needed
    assert np.abs(za0[0] - za0[2]).max() > 0.1 * np.abs(za0[0]).max()  # the realisations differ


def test_rms_is_over_voxels_of_the_vector_length():
    a = np.zeros((3, 2, 2, 2), dtype=np.float32)
    b = np.zeros_like(a)
    b[0], b[1] = 3.0, 4.0
    assert styled.rms(a, b) == 5.0
    b[:, 0] = 0.0  # half the voxels exact
    assert abs(styled.rms(a, b) - np.sqrt(12.5)) < 1e-12


class Oracle2LPT(torch.nn.Module):
    """A styled 'model' that is exactly 2LPT of its input: D x + D2(D) f2, D2 = -(3/7) D^2 (in the bench's norm:
    x and the output divided by DIS_STD), with f2 the realisation's second-order displacement per unit D2."""

    style_size = 1

    def __init__(self, f2: np.ndarray, norm) -> None:
        super().__init__()
        self.f2, self.norm = torch.from_numpy(f2 / styled.DIS_STD)[None], norm

    def forward(self, x, style):
        d = self.norm.undo(style).reshape(-1, 1, 1, 1, 1)
        return d * x + (-3.0 / 7.0) * d ** 2 * self.f2


class OracleAtD(Oracle2LPT):
    """Exactly 2LPT of the ZA displacement at D: x + D2(D) f2."""

    def forward(self, x, style):
        d = self.norm.undo(style).reshape(-1, 1, 1, 1, 1)
        return x + (-3.0 / 7.0) * d ** 2 * self.f2


def test_predict_and_velocity_of_an_exact_model_are_the_2lpt_fields(tmp_path):
    """The bench's units end to end: a model that is exactly 2LPT predicts dis_2lpt, and its jvp velocity in
    km/s is synth's vel_2lpt (so the velocity factor and the undone norm are right)."""
    npy = tmp_path / "npy"
    synth.run(synth.SynthConfig(outdir=str(npy), num_samples=1, ngrid=8, boxsize=64.0, redshifts=(0.5,),
                                velocity=True))
    sample = json.loads((npy / "synth.json").read_text())["samples"][0]
    d = sample["growth_D1"]
    f = {k: np.load(npy / sample["dir"] / f"{k}.npy").astype(np.float64) for k in ("dis_za", "dis_2lpt", "vel_2lpt")}
    norm = StyleNorm(("D",), (0.7,), (0.3,))
    model = Oracle2LPT((f["dis_2lpt"] - f["dis_za"]) / second_order_growth(d), norm).double()
    card = SimpleNamespace(in_pad=((0, 0),) * 3, style_norm=norm)
    za0 = f["dis_za"] / d
    np.testing.assert_allclose(styled.predict(model, card, za0, d), f["dis_2lpt"], rtol=0, atol=1e-5)
    vel = styled.velocity(model, card, za0, d, input_scales=False)
    np.testing.assert_allclose(vel, f["vel_2lpt"], rtol=0, atol=1e-4 * np.abs(f["vel_2lpt"]).max())
    # the model of ZA at D (styled_at_D): exactly 2LPT is x + D2(D) f2; its velocity runs through the input too
    at_d = OracleAtD(model.f2.numpy()[0] * styled.DIS_STD, norm).double()
    np.testing.assert_allclose(styled.predict(at_d, card, f["dis_za"], d), f["dis_2lpt"], rtol=0, atol=1e-5)
    vel = styled.velocity(at_d, card, f["dis_za"], d, input_scales=True)
    np.testing.assert_allclose(vel, f["vel_2lpt"], rtol=0, atol=1e-4 * np.abs(f["vel_2lpt"]).max())
    assert styled.MODELS["styled_at_D"][1:] == ("za", True, True) and styled.MODELS["styled"][1:] == ("za0", True, False)
