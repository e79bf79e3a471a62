"""`m2m train` with styles and the Eulerian loss: items carry their sample's styles, a styled model learns
what an unstyled one cannot, the card records the style norm, exact resume, both loss terms logged to
TensorBoard as `LagEulLoss` computes them, and bad input in one line.

Toy data: per realisation one random field x, stored at several growth factors D with the target
y = D x, so the input says nothing about D and only a model that sees D can fit the target.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from map2map import modelfit, train
from map2map.cli import build_parser, main
from map2map.cli.configs import stage_of
from map2map.data.fields import FieldDataset
from map2map.data.fieldio import lookup_norms
from map2map.errors import UserError
from map2map.models import build_model, forward, narrow_cast
from map2map.models.eulerian import LagEulLoss, dis_norm_of

pytestmark = pytest.mark.usefixtures("torch_one_thread")

OM = (0.28, 0.31, 0.34)
D = (0.5, 1.0, 1.5)

CALLBACKS = '''
from torch import nn


class Tiny(nn.Module):
    """Two 3-voxel convolutions (pad 2)."""

    def __init__(self, in_chan, out_chan, mid=4, **kwargs):
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(in_chan, mid, 3), nn.LeakyReLU(0.2), nn.Conv3d(mid, out_chan, 3))

    def forward(self, x):
        return self.net(x)
'''


def toy_store(root: Path, name: str, ndim: int, *, styled: bool = True, boxsize: float | None = 100.0,
              realisations: int = 2) -> tuple[Path, np.ndarray]:
    """``root/name.zarr`` (fields x, y = D x of ndim channels on 16^ndim, styles Om,D with ``m2m convert
    --styles``) and the styles table written (nsample, 2)."""
    rng = np.random.default_rng(ndim)
    npy, rows, i = root / f"{name}_npy", [], 0
    for _ in range(realisations):
        x = rng.standard_normal((ndim, *(16,) * ndim)).astype(np.float32)
        for om, d in zip(OM, D):
            (npy / f"{i:02d}").mkdir(parents=True)
            np.save(npy / f"{i:02d}" / "x.npy", x)
            np.save(npy / f"{i:02d}" / "y.npy", (x * np.float32(d)).astype(np.float32))
            rows.append((om, d))
            i += 1
    table = root / f"{name}_styles.csv"
    table.write_text("Om,D\n" + "".join(f"{om},{d}\n" for om, d in rows))
    out = root / f"{name}.zarr"
    args = ["convert", str(out), f"--field=x={npy}/*/x.npy", f"--field=y={npy}/*/y.npy", "--no-progress"]
    args += ["--styles", str(table)] if styled else []
    args += ["--boxsize", str(boxsize)] if boxsize is not None else []
    assert main(args) == 0
    return out, np.asarray(rows, dtype=np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train_styles")
    (root / "cb").mkdir()
    (root / "cb" / "nets.py").write_text(CALLBACKS)
    s2, rows = toy_store(root, "s2", 2)
    s3, _ = toy_store(root, "s3", 3, realisations=1)
    plain, _ = toy_store(root, "plain", 2, styled=False, boxsize=None, realisations=1)
    return {"s2": s2, "s3": s3, "plain": plain, "rows": rows, "cb": root / "cb"}


def styled_args(store: Path, *extra: str, model: str = "StyledVNet", epochs: int = 1, width: int = 4,
                lr: str = "3e-3", kwargs: str = "") -> list[str]:
    return ["train", "--train-data", str(store), "--in", "x", "--tgt", "y", "--crop", "8", "--in-pad", "20",
            "--model", model, "--misc-kwargs", f'{{"width": {width}{kwargs}}}', "--lr", lr, "--batch-size", "6",
            "--loader-workers", "0", "--epochs", str(epochs), *extra]


def run(argv: list[str], run_dir: Path):
    module, config = stage_of(build_parser().parse_args([*argv, "--run-dir", str(run_dir)]))
    return module.run(config)


def state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


# ---------------------------------------------------------------- items


def test_items_carry_their_samples_styles_in_the_order_chosen(data):
    common = dict(store=str(data["s3"]), in_fields=["x"], tgt_fields=["y"], crop=8)
    plain = FieldDataset(**common)
    styled = FieldDataset(**common, styles=("D", "Om"))
    assert styled.style_names == ("D", "Om") and len(styled) == len(plain) == 3 * 8
    for idx in range(len(plain)):
        a, b = plain[idx], styled[idx]
        assert "style" not in a
        assert b["style"].dtype == torch.float32
        assert torch.equal(b["style"], torch.from_numpy(data["rows"][b["sample"], ::-1].copy()))
        assert torch.equal(a["input"], b["input"]) and torch.equal(a["target"], b["target"])
    with pytest.raises(UserError, match="not among the store's style parameters Om,D"):
        FieldDataset(**common, styles=("sigma8",))


# ---------------------------------------------------------------- learning and the card


def test_styled_model_fits_what_an_unstyled_one_cannot(data, tmp_path):
    """y = D x with x the same at every D: the best unstyled fit is E[D] x (mean squared error var(D) E[x^2]
    = 1/6), a model that sees D can reach 0.  The styled V-Net has the options that let a style carry an
    amplitude (`demodulate=False`, `style_bypass`); it must also predict a D and a field it never saw."""
    args = dict(epochs=30, width=8)
    amplitude = ', "demodulate": false, "style_bypass": true'  # options that let a style scale the output
    styled = run(styled_args(data["s2"], "--in-pad", "auto", **args, kwargs=amplitude), tmp_path / "styled").epochs
    unstyled = run(styled_args(data["s2"], "--in-pad", "auto", model="VNet", **args), tmp_path / "plain").epochs
    assert unstyled[-1].train_loss > 0.1  # at the floor of a model blind to D
    assert styled[-1].train_loss < 0.3 * unstyled[-1].train_loss
    card = state(tmp_path / "styled" / "state_30.pt")["card"]
    assert card["style_names"] == ["Om", "D"]  # all of the store's by default, in its order
    assert not state(tmp_path / "plain" / "state_30.pt")["card"].get("style_names")  # VNet: unstyled
    # a growth factor neither model saw, on a field neither saw: the styled model predicts it better than
    # the unstyled one and than its input (the identity, D = 1)
    x = torch.from_numpy(np.random.default_rng(99).standard_normal((1, 2, 48, 48)).astype(np.float32))
    d = 0.75
    want = d * x[..., 20:-20, 20:-20]
    errors = {}
    for name in ("styled", "plain"):
        ck = modelfit.read_checkpoint(str(tmp_path / name / "state_30.pt"))
        card = ck.card
        model = build_model(card.model, card.in_chan, card.out_chan, scale_factor=1, ndim=2,
                            kwargs=card.model_kwargs, style_size=card.style_size)
        model.load_state_dict(ck.model_state)
        om = 0.295  # Om and D go together in the training styles: Om 0.28 at D 0.5, 0.31 at D 1
        style = None if card.style_norm is None else card.style_norm.apply(torch.tensor([[om, d]]))
        with torch.no_grad():
            errors[name] = float(((forward(model.eval(), x, style) - want) ** 2).mean())
    identity = float(((x[..., 20:-20, 20:-20] - want) ** 2).mean())
    assert errors["styled"] < 0.5 * min(errors["plain"], identity), (errors, identity)


def test_card_records_the_chosen_styles_and_norm(data, tmp_path):
    run(styled_args(data["s2"], "--style", "D"), tmp_path)
    saved = state(tmp_path / "state_1.pt")
    card = modelfit.ModelCard.from_dict(saved["card"])
    assert card.style_names == ("D",) and card.style_size == 1
    np.testing.assert_allclose(card.style_shift, [1.0], rtol=1e-6)  # D in [0.5, 1.5] onto [-1, 1]
    np.testing.assert_allclose(card.style_scale, [0.5], rtol=1e-6)
    assert saved["config"]["style"] == ["D"] and "loss" not in saved["config"]  # defaults are left out


def test_exact_resume_with_styles(data, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    run(styled_args(data["s2"], epochs=2), whole)
    run(styled_args(data["s2"], epochs=1), part)
    summary = run(styled_args(data["s2"], epochs=2), part)
    assert summary.start_epoch == 1
    a, b = state(whole / "state_2.pt"), state(part / "state_2.pt")
    assert a["card"] == b["card"] and a["card"]["style_names"] == ["Om", "D"]
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [e["train"] for e in a["losses"]] == [e["train"] for e in b["losses"]]


def test_a_resumed_run_keeps_the_recorded_norm(data, tmp_path):
    cfg = train.TrainConfig(model="StyledVNet", lr=1e-3, train_data=str(data["s2"]), in_fields=("x",),
                            tgt_fields=("y",), run_dir=str(tmp_path))
    fresh = train.style_norm_for(cfg, ("Om", "D"), None)
    assert fresh.names == ("Om", "D")
    np.testing.assert_allclose(fresh.shift, [0.31, 1.0], rtol=1e-6)
    recorded = dataclasses.replace(fresh, shift=(0.3, 0.9), scale=(0.1, 0.7))
    card = {"card": {**_card_dict(), **modelfit.ModelCard.style_fields(recorded)}}
    assert train.style_norm_for(cfg, ("Om", "D"), card) == recorded
    with pytest.raises(UserError, match="trained with the style parameters Om,D, but this run chooses D,Om"):
        train.style_norm_for(cfg, ("D", "Om"), card)
    assert train.style_norm_for(cfg, (), card) is None


def _card_dict() -> dict:
    return modelfit.ModelCard(model="StyledVNet", in_chan=2, out_chan=2, scale_factor=1, ndim=2, model_kwargs={},
                              callback_at=None, in_fields=("x",), tgt_fields=("y",), in_chans=(2,), tgt_chans=(2,),
                              in_norms=None, tgt_norms=None, norm_kwargs={}, in_pad=((20, 20),) * 2,
                              tgt_pad=((0, 0),) * 2, total_stride=4, crop=(8, 8), train_stores=(),
                              store_format_version=None, map2map_version="test").to_dict()


# ---------------------------------------------------------------- the Eulerian loss


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = list((run_dir / "runs").iterdir())
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _tiny(cb: Path, saved: dict) -> nn.Module:
    spec = importlib.util.spec_from_file_location("g_nets", cb / "nets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.Tiny(3, 3)
    model.load_state_dict(saved["model"])
    return model.eval()


@pytest.mark.parametrize("loss", ["eul", "lag_eul"])
def test_eulerian_loss_logs_both_terms_as_lag_eul_loss_computes_them(data, tmp_path, loss):
    """One batch of all three items with a learning rate so small that the weights do not move: the logged
    terms are those of `LagEulLoss` on that batch with the checkpoint's model, computed here."""
    argv = ["train", "--train-data", str(data["s3"]), "--in", "x", "--tgt", "y", "--crop", "8", "--crop-stop", "1",
            "--in-pad", "4", "--tgt-pad", "2", "--in-norms", "cosmology.dis", "--tgt-norms", "cosmology.dis",
            "--model", "nets.Tiny", "--callback-at", str(data["cb"]), "--lr", "1e-300", "--batch-size", "3",
            "--loader-workers", "0", "--epochs", "1", "--log-interval", "1", "--val-data", str(data["s3"]),
            "--loss", loss]
    history = run(argv, tmp_path).epochs
    saved = state(tmp_path / "state_1.pt")
    assert saved["config"]["loss"] == loss and not saved["card"].get("style_names")  # unstyled on a styled store

    ds = FieldDataset(store=str(data["s3"]), in_fields=["x"], tgt_fields=["y"], crop=8, crop_stop=1, in_pad=4,
                      tgt_pad=2, in_norms=["cosmology.dis"], tgt_norms=["cosmology.dis"])
    items = [ds[i] for i in range(len(ds))]
    x = torch.stack([it["input"] for it in items])
    y = torch.stack([it["target"] for it in items])
    with torch.no_grad():
        out, tgt = narrow_cast(_tiny(data["cb"], saved)(x), y)
        (norm,) = lookup_norms(["cosmology.dis"], 1, "tgt_norms", None, {})
        expect = LagEulLoss(nn.MSELoss(), loss, margin=2, dis_norm=dis_norm_of(norm), boxsize=100.0,
                            meshsize=16)(out, tgt)
    total = expect.total.item()
    assert total == pytest.approx(math.log(expect.lag.item()) * 3 + math.log(expect.eul.item()) if loss == "lag_eul"
                                  else expect.eul.item(), rel=1e-6)

    scalars = _scalars(tmp_path)
    assert scalars["loss/batch/train"][0][1] == pytest.approx(total, rel=1e-5)
    for key, value in (("lag", expect.lag.item()), ("eul", expect.eul.item())):
        assert [s for s, _ in scalars[f"loss/batch/train/{key}"]] == [1]
        assert scalars[f"loss/batch/train/{key}"][0][1] == pytest.approx(value, rel=1e-5)
        assert scalars[f"loss/epoch/train/{key}"][0][1] == pytest.approx(value, rel=1e-5)
        assert scalars[f"loss/epoch/val/{key}"][0][1] == pytest.approx(value, rel=1e-5)
        assert history[0].loss_terms[f"val/{key}"] == pytest.approx(value, rel=1e-5)
    if loss == "eul":
        assert history[0].val_loss == pytest.approx(expect.eul.item(), rel=1e-5)


def test_lag_loss_logs_no_terms(data, tmp_path):
    argv = ["train", "--train-data", str(data["s3"]), "--in", "x", "--tgt", "y", "--crop", "8", "--crop-stop", "1",
            "--in-pad", "2", "--model", "nets.Tiny", "--callback-at", str(data["cb"]), "--lr", "1e-3",
            "--batch-size", "3", "--loader-workers", "0", "--epochs", "1", "--log-interval", "1"]
    history = run(argv, tmp_path).epochs
    assert history[0].loss_terms is None
    assert not [t for t in _scalars(tmp_path) if t.endswith(("/lag", "/eul"))]
    assert not {"style", "loss", "eul_weight"} & set(state(tmp_path / "state_1.pt")["config"])


# ---------------------------------------------------------------- bad input


def one_line_error(capsys, argv: list[str]) -> str:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


BAD = {
    "style without styles": ("plain", ["--style", "D"], "has no style parameters, but --style D needs them"),
    "styled model without styles": ("plain", [], "has no style parameters, but a styled model needs them"),
    "unknown names": ("s2", ["--style", "Om,sigma8"], "sigma8, not among the store's style parameters Om,D"),
    "repeated names": ("s2", ["--style", "D,D"], "names D more than once"),
    "style for an unstyled model": ("s2", ["--style", "D", "--model", "VNet"], "model VNet takes no style_size"),
    "eul without a box size": ("plain", ["--model", "VNet", "--loss", "eul"], "needs the box size"),
    "eul on a target that is no displacement": ("s2", ["--model", "VNet", "--loss", "lag_eul", "--tgt", "x,y"],
                                                "displacement of 2 channels (one per axis), but the target has 4"),
    "eul weight without lag_eul": ("s2", ["--eul-weight", "0.5"], "--eul-weight 0.5 weighs"),
    "validation store without styles": ("s2", ["--val-data", "plain"], "has no style parameters, but training with "
                                        "the styles Om,D needs them"),
    "styled model on .npy files": ("s2", ["--train-data", None, "--train-in-patterns", "s2_npy/*/x.npy",
                                          "--train-tgt-patterns", "s2_npy/*/y.npy"],
                                   "model StyledVNet is styled, and styles come from a store"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_is_one_line_and_writes_nothing(data, tmp_path, capsys, case):
    store, extra, message = BAD[case]
    argv = styled_args(data[store])
    if "--train-data" in extra:  # .npy patterns instead of the store
        del argv[1:3]
        extra = [str(data["s2"].parent / e) if e.endswith(".npy") else e for e in extra[2:]]
    extra = [str(data[e]) if e in data else e for e in extra]
    err = one_line_error(capsys, [*argv, *extra, "--run-dir", str(tmp_path / "rd")])
    assert message in err
    assert not (tmp_path / "rd").exists()
