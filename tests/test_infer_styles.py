"""`m2m infer` with styled models: each sample's styles from the store or ``--style`` for all, the tiled
output equal to one whole-box pass, ``--velocity`` (a second output field) equal to the whole-box forward-
mode derivative and to a finite difference of the tiled displacement in D, resume over both fields, and
bad input in one line.

Toy data: per realisation one random field g of ndim channels, stored at several (Omega_m, D) with input
D g (it scales with D, as a Zel'dovich displacement does) and target D g + D^2 g^2 / 4; a StyledVNet
trained one epoch on it (only its being a styled model matters here, not how well it fits).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from map2map import infer, store
from map2map.infer import tta
from map2map.cli import main
from map2map.data.fieldio import apply_norm, lookup_norms
from map2map.data.styles import StyleNorm
from map2map.infer.markers import mark_all
from map2map.modelfit import ModelSpec, file_stamp, read_checkpoint
from map2map.models import narrow_like
from map2map.models.build import forward
from map2map.models.velocity import displacement_and_derivative, velocity_factors

from conftest import fails, run_m2m
from stores import drop_completion_mark

pytestmark = pytest.mark.usefixtures("torch_one_thread")

OM = (0.28, 0.31, 0.34)
D = (0.5, 0.75, 1.0)  # growth factors of flat LambdaCDM (D(z=0) = 1), so velocities exist
PAD = 20  # StyledVNet: n + 40 input voxels give n
NORM = "cosmology.dis"  # a constant factor: the velocity's units come through it
NONSCALING = '''
def shift(x, undo=False, **kwargs):
    """Not a scaling: adds one (undo: subtracts)."""
    return x - 1 if undo else x + 1
'''
SMOOTH = '''
import torch
from torch import nn

from map2map.models.styled import ConvStyled


class SmoothStyled(nn.Module):
    """Three modulated 3-voxel convolutions with tanh between them, plus the input (pad 3): smooth in its
    input and style, so that a finite difference converges (a LeakyReLU's kink makes it converge only
    linearly)."""

    def __init__(self, in_chan, out_chan, style_size, dim=3, mid=8, **kwargs):
        super().__init__()
        self.style_size = style_size
        self.convs = nn.ModuleList([ConvStyled(style_size, in_chan, mid, dim=dim),
                                    ConvStyled(style_size, mid, mid, dim=dim),
                                    ConvStyled(style_size, mid, out_chan, dim=dim)])

    def forward(self, x, style):
        y = x
        for i, conv in enumerate(self.convs):
            y = conv(y, style)
            y = torch.tanh(y) if i < 2 else y
        return y + x[(...,) + (slice(3, -3),) * (x.dim() - 2)]
'''


def write_npy(root: Path, name: str, arrays: dict[str, list[np.ndarray]]) -> dict[str, str]:
    """Each field's arrays as ``root/name_npy/NNN/FIELD.npy``; the glob pattern of each field."""
    for field, items in arrays.items():
        for i, a in enumerate(items):
            (root / f"{name}_npy" / f"{i:03d}").mkdir(parents=True, exist_ok=True)
            np.save(root / f"{name}_npy" / f"{i:03d}" / f"{field}.npy", a)
    return {field: f"{root}/{name}_npy/*/{field}.npy" for field in arrays}


def convert(root: Path, name: str, arrays: dict[str, list[np.ndarray]], styles: np.ndarray | None) -> Path:
    """``root/name.zarr`` from the arrays (with the style table Om,D when given), by ``m2m convert``."""
    patterns = write_npy(root, name, arrays)
    out = root / f"{name}.zarr"
    args = ["convert", str(out), *(f"--field={f}={p}" for f, p in patterns.items()), "--boxsize", "100",
            "--no-progress"]
    if styles is not None:
        table = root / f"{name}_styles.csv"
        table.write_text("Om,D\n" + "".join(f"{om},{d}\n" for om, d in styles))
        args += ["--styles", str(table)]
    assert main(args) == 0
    return out


def toy(ndim: int, realisations: int) -> tuple[dict[str, list[np.ndarray]], np.ndarray]:
    rng = np.random.default_rng(10 + ndim)
    fields, rows = {"x": [], "y": []}, []
    for _ in range(realisations):
        g = rng.standard_normal((ndim, *(16,) * ndim)).astype(np.float32)
        for om, d in zip(OM, D):
            fields["x"].append((d * g).astype(np.float32))
            fields["y"].append((d * g + d * d * g * g / 4).astype(np.float32))
            rows.append((om, d))
    return fields, np.asarray(rows, dtype=np.float32)


def train(store_path: Path, run_dir: Path, *extra: str, model: str = "StyledVNet", kwargs: str = '{"width": 4}',
          pad: int = PAD) -> Path:
    argv = ["train", "--train-data", str(store_path), "--in", "x", "--tgt", "y", "--crop", "8", "--in-pad",
            str(pad), "--model", model, "--misc-kwargs", kwargs, "--in-norms", NORM, "--tgt-norms",
            NORM, "--lr", "3e-3", "--batch-size", "6", "--loader-workers", "0", "--epochs", "1",
            "--run-dir", str(run_dir), *extra]
    assert main(argv) == 0
    return run_dir / "state_1.pt"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("infer_styles")
    out: dict = {"root": root}
    for ndim, realisations in ((2, 2), (3, 1)):
        fields, rows = toy(ndim, realisations)
        out[f"s{ndim}"] = convert(root, f"s{ndim}", fields, rows)
        out[f"fields{ndim}"], out[f"rows{ndim}"] = fields, rows
        out[f"ckpt{ndim}"] = train(out[f"s{ndim}"], root / f"run{ndim}")
    out["plain"] = convert(root, "plain", {k: v[:3] for k, v in out["fields2"].items()}, None)
    out["vnet"] = train(out["plain"], root / "vnet", "--model", "VNet")
    out["om_only"] = train(out["s2"], root / "om_only", "--style", "Om")
    (root / "cb").mkdir()
    (root / "cb" / "shifted.py").write_text(NONSCALING)
    (root / "cb" / "smooth.py").write_text(SMOOTH)
    out["cb"] = root / "cb"
    out["smooth"] = train(out["s2"], root / "smooth", "--callback-at", str(root / "cb"), model="smooth.SmoothStyled",
                          kwargs="{}", pad=3)
    return out


def load(ckpt: Path):
    """The checkpoint's model (eval mode) and its style norm."""
    card = read_checkpoint(str(ckpt)).card
    spec = ModelSpec(card.model, str(ckpt), file_stamp(str(ckpt)), card.in_chan, card.out_chan, card.scale_factor,
                     card.ndim, json.dumps(dict(card.model_kwargs)), card.callback_at, card.style_size)
    return spec.load(), card.style_norm


def scale_of(name: str) -> float:
    """What undoing norm `name` multiplies a field by (a constant factor)."""
    x = np.ones(1)
    apply_norm(lookup_norms((name,), 1, "norm")[0], x, undo=True)
    return float(x[0])


def whole_box(model, norm: StyleNorm, x: np.ndarray, physical, velocity: bool = False, pad: int = PAD,
              tta_mode: str = "none", input_scales: bool = True):
    """The model once over the whole box `x` (physical units) padded periodically, with the physical styles
    `physical` (averaged over the symmetries of `tta_mode`); its output in physical units, and with
    `velocity` the velocity in km/s (the input proportional to D with `input_scales`, else fixed)."""
    f = scale_of(NORM)
    padded = np.pad(x / np.float32(f), [(0, 0)] + [(pad, pad)] * (x.ndim - 1), mode="wrap")
    xt, phys = torch.from_numpy(padded)[None], torch.tensor(np.asarray(physical, dtype=np.float32))[None]
    box = x.shape[1:]
    if not velocity:
        with torch.no_grad():
            chans = (x.shape[0],)
            y = tta.averaged(lambda xb: forward(model, xb, norm.apply(phys)), xt, tta_mode, chans, chans)
            return narrow_like(y, box)[0].numpy() * f
    out, dout = displacement_and_derivative(model, xt, phys, norm, input_scales=input_scales)
    factor = velocity_factors(phys.numpy(), norm.names)[0]
    return narrow_like(out, box)[0].numpy() * f, narrow_like(dout, box)[0].numpy() * f * factor


def predict(data: dict, ndim: int, out: Path, **kw) -> infer.InferSummary:
    cfg = infer.InferConfig(load_state=str(data[f"ckpt{ndim}"]), data=str(kw.pop("store", data[f"s{ndim}"])),
                            out=str(out), crop=kw.pop("crop", (8,)), device="cpu", progress=False, **kw)
    return infer.run(cfg)


def opened(path: Path, name: str) -> np.ndarray:
    return np.asarray(store.open_store(str(path)).field(name)[:])


def close(a: np.ndarray, b: np.ndarray, rtol: float) -> float:
    """The largest difference relative to the largest value of `b`, asserted at most `rtol`."""
    rel = float(np.abs(a - b).max() / np.abs(b).max())
    assert rel <= rtol, rel
    return rel


# ---------------------------------------------------------------- styles from the store or --style


@pytest.mark.parametrize("ndim", [2, 3])
def test_infer_equals_the_whole_box_pass_with_each_samples_styles(data, tmp_path, ndim):
    summary = predict(data, ndim, tmp_path / "p.zarr", batch_size=2)
    assert summary.tiles == len(data[f"rows{ndim}"]) * 2 ** ndim
    assert any("styles Om,D: each sample's from the input store" in n for n in summary.notes)
    model, norm = load(data[f"ckpt{ndim}"])
    got = opened(tmp_path / "p.zarr", "y")
    for i, (x, row) in enumerate(zip(data[f"fields{ndim}"]["x"], data[f"rows{ndim}"])):
        close(got[i], whole_box(model, norm, x, row), 1e-5)
    names, values = store.read_styles(str(tmp_path / "p.zarr"))  # the output records the styles it was given
    assert names == ("Om", "D") and np.array_equal(values, data[f"rows{ndim}"])
    # the styles matter: another sample's styles give another prediction
    assert np.abs(got[0] - whole_box(model, norm, data[f"fields{ndim}"]["x"][0], (0.34, 1.0))).max() > 1e-4


@pytest.mark.parametrize("mode", ["none", "flips"])
def test_style_option_gives_every_sample_those_values(data, tmp_path, mode):
    predict(data, 2, tmp_path / "p.zarr", style="D=0.6, Om=0.3", tta=mode)
    model, norm = load(data["ckpt2"])
    got = opened(tmp_path / "p.zarr", "y")
    for i, x in enumerate(data["fields2"]["x"]):  # a reflection changes no style
        close(got[i], whole_box(model, norm, x, (0.3, 0.6), tta_mode=mode), 1e-5)
    assert np.allclose(store.read_styles(str(tmp_path / "p.zarr"))[1], [[0.3, 0.6]] * len(got))


@pytest.mark.parametrize("velocity", [False, True])
def test_crop_auto_probes_a_styled_model(data, tmp_path, velocity):
    summary = predict(data, 2, tmp_path / "p.zarr", crop="auto", tile_memory=0.05, velocity=velocity)
    assert any(n.startswith("--crop auto: tile") for n in summary.notes)
    model, norm = load(data["ckpt2"])
    got = opened(tmp_path / "p.zarr", "y")
    for i, (x, row) in enumerate(zip(data["fields2"]["x"], data["rows2"])):
        close(got[i], whole_box(model, norm, x, row), 1e-5)


# ---------------------------------------------------------------- --velocity


@pytest.mark.parametrize("ndim", [2, 3])
def test_velocity_equals_the_whole_box_derivative(data, tmp_path, ndim):
    summary = predict(data, ndim, tmp_path / "p.zarr", velocity=True, batch_size=2)
    assert any("--velocity writes field vel in km/s" in n for n in summary.notes)
    model, norm = load(data[f"ckpt{ndim}"])
    got, vel = opened(tmp_path / "p.zarr", "y"), opened(tmp_path / "p.zarr", "vel")
    assert vel.shape == got.shape and vel.dtype == np.float32
    for i, (x, row) in enumerate(zip(data[f"fields{ndim}"]["x"], data[f"rows{ndim}"])):
        out, v = whole_box(model, norm, x, row, velocity=True)
        close(got[i], out, 1e-5)
        close(vel[i], v, 1e-5)
    plain = opened(predict(data, ndim, tmp_path / "q.zarr").output, "y")
    close(got, plain, 1e-6)  # the displacement is that without --velocity (to rounding: another computation)


def test_velocity_equals_a_finite_difference_of_the_tiled_displacement(data, tmp_path):
    """v = a H f D dpsi/dD with the input proportional to D: rerun the tiled inference at D +- h with the
    input scaled to D +- h, and compare the central difference of the predictions (of a model smooth in
    its input and style: across a LeakyReLU's kink a difference converges only linearly in h)."""
    om, d, h = 0.31, 0.75, 1e-2
    x = data["fields2"]["x"]
    data = dict(data, ckpt2=data["smooth"])
    predict(data, 2, tmp_path / "v.zarr", velocity=True, style=f"Om={om},D={d}")
    vel = opened(tmp_path / "v.zarr", "vel")
    psi = {}
    for sign in (1, -1):
        dd = d + sign * h
        scaled = convert(tmp_path, f"s{sign}", {"x": [a * np.float32(dd / d) for a in x]}, None)
        predict(data, 2, tmp_path / f"p{sign}.zarr", store=scaled, style=f"Om={om},D={dd}", out_field="y")
        psi[sign] = opened(tmp_path / f"p{sign}.zarr", "y").astype(np.float64)
    factor = velocity_factors(np.array([[om, d]]), ("Om", "D"))[0]
    fd = (psi[1] - psi[-1]) / (2 * h) * factor
    close(vel, fd, 1e-3)


def test_velocity_of_an_input_fixed_in_d(data, tmp_path):
    """--velocity-input fixed (an input that is the same at every D): the tiled velocity equals the whole-box
    derivative along the style alone and a central difference of the tiled displacement in D with the
    input unchanged, and differs from the default's, which also runs through the input."""
    om, d, h = 0.31, 0.75, 1e-2
    data = dict(data, ckpt2=data["smooth"])
    summary = predict(data, 2, tmp_path / "v.zarr", velocity=True, velocity_input="fixed", style=f"Om={om},D={d}")
    vel = opened(tmp_path / "v.zarr", "vel")
    model, norm = load(data["ckpt2"])
    for i, x in enumerate(data["fields2"]["x"]):
        close(vel[i], whole_box(model, norm, x, (om, d), velocity=True, input_scales=False)[1], 1e-5)
    psi = {}
    for sign in (1, -1):
        predict(data, 2, tmp_path / f"p{sign}.zarr", style=f"Om={om},D={d + sign * h}")
        psi[sign] = opened(tmp_path / f"p{sign}.zarr", "y").astype(np.float64)
    factor = velocity_factors(np.array([[om, d]]), ("Om", "D"))[0]
    close(vel, (psi[1] - psi[-1]) / (2 * h) * factor, 1e-3)
    scaled = predict(data, 2, tmp_path / "s.zarr", velocity=True, style=f"Om={om},D={d}")
    assert np.abs(opened(tmp_path / "s.zarr", "vel") - vel).max() > 0.1 * np.abs(vel).max()
    assert summary.computed == scaled.computed == summary.tiles
    # the choice is a setting of the run: resuming an interrupted fixed run with the default starts over
    drop_completion_mark(tmp_path / "v.zarr")
    again = predict(data, 2, tmp_path / "v.zarr", velocity=True, style=f"Om={om},D={d}")
    assert again.skipped == 0 and any("other settings: starting over" in n for n in again.notes), again.notes


def test_resume_covers_both_fields(data, tmp_path):
    """An interrupted --velocity run resumes both fields: tiles with a marker are kept as they are (here
    zeroed, to see it), the others recomputed; the completion mark comes once both are written."""
    out = tmp_path / "p.zarr"
    predict(data, 2, out, velocity=True)
    full = {name: opened(out, name) for name in ("y", "vel")}
    drop_completion_mark(out)
    import zarr

    group = zarr.open_group(str(out), mode="r+", use_consolidated=False)
    for name in full:
        group[name][:] = 0
    done = os.path.join(out, infer.DONE_DIR)
    os.makedirs(done)
    mark_all(done, [(0, 0, None, 64), (1, 3, None, 64)])
    summary = predict(data, 2, out, velocity=True)
    assert (summary.skipped, summary.computed) == (2, summary.tiles - 2)
    assert store.read_meta(str(out))["complete"] and not os.path.exists(done)
    for name, before in full.items():
        after = opened(out, name)
        assert not after[0, :, :8, :8].any() and not after[1, :, 8:, 8:].any()  # the marked tiles: kept
        kept = np.ones(after.shape, bool)
        kept[0, :, :8, :8] = kept[1, :, 8:, 8:] = False
        assert np.array_equal(after[kept], before[kept])
    shutil.rmtree(out)


def test_other_styles_start_over(data, tmp_path):
    out = tmp_path / "p.zarr"
    predict(data, 2, out, style="Om=0.3,D=0.6")
    drop_completion_mark(out)
    summary = predict(data, 2, out, style="Om=0.3,D=0.7")
    assert summary.skipped == 0 and any("other settings: starting over" in n for n in summary.notes)


# ---------------------------------------------------------------- bad input


def infer_argv(data, ckpt: str, tmp_path: Path, *extra: str, store_key: str = "s2") -> list[str]:
    return ["infer", "--data", str(data[store_key]), "--load-state", str(data[ckpt]), "--out",
            str(tmp_path / "out.zarr"), "--crop", "8", "--device", "cpu", "--no-progress", *extra]


BAD = {
    "style with an unstyled checkpoint": ("vnet", ["--style", "Om=0.3,D=0.7"], "plain",
                                          "--style: the checkpoint's model takes no styles"),
    "velocity with an unstyled checkpoint": ("vnet", ["--velocity"], "plain",
                                             "--velocity: the checkpoint's model takes no styles"),
    "styled model on a store without styles": ("ckpt2", [], "plain", "is styled (Om,D) but store"),
    "style naming an unknown parameter": ("ckpt2", ["--style", "Om=0.3,D=0.7,s8=0.8"], "s2",
                                          "names s8, not a style parameter of the model"),
    "style missing a parameter": ("ckpt2", ["--style", "D=0.7"], "s2", "--style misses Om"),
    "style not NAME=VALUE": ("ckpt2", ["--style", "D"], "s2", "is not NAME=VALUE"),
    "velocity without a D style": ("om_only", ["--velocity"], "s2", "--velocity needs a style parameter D"),
    "velocity on a target norm that is no scaling": ("ckpt2", ["--velocity", "--tgt-norms", "shifted.shift",
                                                              "--callback-at", "cb"], "s2",
                                                     "--velocity needs a displacement target whose norm"),
    "velocity at a D no time has": ("ckpt2", ["--velocity", "--style", "Om=0.3,D=5"], "s2",
                                    "style D=5 is no growth factor of flat LambdaCDM"),
    "velocity and an output field named vel": ("ckpt2", ["--velocity", "--out-field", "vel"], "s2",
                                               "--out-field vel: --velocity writes a field of that name"),
    "velocity input unknown": ("ckpt2", ["--velocity", "--velocity-input", "sideways"], "s2",
                               "--velocity-input sideways: choose scales (the input is proportional to D) or fixed"),
    "velocity input fixed without velocity": ("ckpt2", ["--velocity-input", "fixed"], "s2",
                                              "--velocity-input fixed: it says how the velocity is differentiated"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_is_one_line_and_writes_nothing(data, tmp_path, capsys, case):
    ckpt, extra, store_key, message = BAD[case]
    extra = [str(data[e]) if e == "cb" else e for e in extra]
    fails(capsys, infer_argv(data, ckpt, tmp_path, *extra, store_key=store_key), message)
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize("case", ["style with an unstyled checkpoint", "velocity without a D style"])
def test_bad_input_through_the_m2m_program(data, tmp_path, case):
    ckpt, extra, store_key, message = BAD[case]
    done = run_m2m(*infer_argv(data, ckpt, tmp_path, *extra, store_key=store_key))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert not (tmp_path / "out.zarr").exists()
