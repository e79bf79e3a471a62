"""The model card: `m2m train` writes it into every checkpoint, `m2m infer` needs nothing else, `m2m info` shows it.

A real training run through the CLI (V-Net of width 8, norms, ``--in-pad
auto``) on a 16^3 store, then `m2m infer` twice, each on its own local Dask
cluster: fully specified, and with only ``--load-state``, ``--data`` and
``--out``.  The two prediction stores must be equal bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from map2map import convert, store
from map2map.cli import main
from map2map.infer.defaults import resolve
from map2map.infer.specs import InferConfig
from map2map.modelfit import ModelCard, read_checkpoint
from conftest import fails
from stores import za_lpt_store

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("card")
    train_store = za_lpt_store(root, "train", 1, 1)
    test_store = za_lpt_store(root, "test", 1, 9)
    run_dir = root / "run"
    code = main(["train", "--train-data", str(train_store), "--in", "za", "--tgt", "lpt", "--model", "VNet",
                 "--misc-kwargs", '{"width": 8}', "--in-norms", "cosmology.dis", "--tgt-norms", "cosmology.dis",
                 "--crop", "8", "--crop-stop", "1", "--in-pad", "auto", "--lr", "1e-3", "--epochs", "2",
                 "--loader-workers", "0", "--run-dir", str(run_dir)])
    assert code == 0
    return {"root": root, "train": train_store, "test": test_store, "ckpt": run_dir / "checkpoint.pt"}


def test_checkpoint_carries_the_card(trained):
    ck = read_checkpoint(str(trained["ckpt"]))
    card = ck.card
    assert isinstance(card, ModelCard) and ck.epoch == 2
    assert (card.model, dict(card.model_kwargs), card.in_chan, card.out_chan, card.scale_factor, card.ndim) == \
        ("VNet", {"width": 8}, 3, 3, 1, 3)
    assert card.in_fields == ("za",) and card.tgt_fields == ("lpt",)
    assert card.in_norms == ("cosmology.dis",) and card.tgt_norms == ("cosmology.dis",)
    assert card.in_pad == ((20, 20),) * 3 and card.total_stride == 4 and card.crop == (8, 8, 8)
    assert card.train_stores == (str(trained["train"]),) and card.store_format_version == 1
    assert card.callback_at is None
    # the card is plain data: a weights-only load reads it, and it survives a JSON round trip
    raw = torch.load(trained["ckpt"], weights_only=True)["card"]
    assert ModelCard.from_dict(json.loads(json.dumps(raw))) == card
    assert [rec["epoch"] for rec in ck.raw["losses"]] == [1, 2]


def test_infer_needs_only_the_checkpoint_data_and_output(trained, tmp_path, capsys):
    full, minimal = tmp_path / "full.zarr", tmp_path / "minimal.zarr"
    assert main(["infer", "--data", str(trained["test"]), "--in", "za", "--tgt", "lpt", "--model", "VNet",
                 "--misc-kwargs", '{"width": 8}', "--in-norms", "cosmology.dis", "--tgt-norms", "cosmology.dis",
                 "--in-pad", "auto", "--load-state", str(trained["ckpt"]), "--out", str(full),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["infer", "--load-state", str(trained["ckpt"]), "--data", str(trained["test"]),
                 "--out", str(minimal)]) == 0
    out = capsys.readouterr().out
    assert "override" not in out and "sample 0: MSELoss" in out
    a, b = store.open_store(full), store.open_store(minimal)
    assert a.field_names == b.field_names == ["lpt"]
    pa, pb = a.field("lpt")[:], b.field("lpt")[:]
    assert pa.dtype == pb.dtype == np.float32 and np.abs(pa).max() > 0
    assert pa.tobytes() == pb.tobytes()
    assert a.meta["loss"] == b.meta["loss"]
    assert a.meta["infer"]["in_norms"] == b.meta["infer"]["in_norms"] == ["cosmology.dis"]


def test_explicit_options_override_the_card_and_say_so(trained):
    base = InferConfig(load_state=str(trained["ckpt"]), data=str(trained["test"]), out="unused.zarr")
    res = resolve(base)
    cfg = res.config
    assert (cfg.model, cfg.in_fields, cfg.tgt, cfg.in_norms, cfg.scale_factor) == \
        ("VNet", ("za",), ("lpt",), ("cosmology.dis",), 1)
    assert cfg.model_kwargs == {"width": 8} and cfg.norm_kwargs == {"width": 8} and res.overrides == ()
    res = resolve(dataclasses.replace(base, tgt_norms=("cosmology.vel",), model_kwargs={"width": 8, "bypass": True}))
    assert res.config.tgt_norms == ("cosmology.vel",)
    assert res.config.model_kwargs == {"width": 8, "bypass": True}
    assert any(o.startswith("--tgt-norms cosmology.vel") and "cosmology.dis" in o for o in res.overrides)
    assert any(o.startswith("model arguments") for o in res.overrides)
    # the same values as the card are no override
    assert resolve(dataclasses.replace(base, model="VNet", in_norms=("cosmology.dis",))).overrides == ()


def test_info_describes_a_checkpoint(trained, capsys):
    assert main(["info", str(trained["ckpt"])]) == 0
    out = capsys.readouterr().out
    assert "epoch      2, best loss" in out and "  epoch 1: train " in out
    assert "model      VNet(3, 3, scale_factor=1, width=8), 3D, total stride 4" in out
    assert "input      za (3 channels, norm cosmology.dis)" in out and "crop       [8, 8, 8], in-pad 20" in out
    assert f"trained on {trained['train']} (store format 1)" in out
    params = sum(v.numel() for k, v in read_checkpoint(str(trained["ckpt"])).model_state.items()
                 if not k.endswith("num_batches_tracked"))
    assert f"parameters {params} in " in out


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written




def _with_card(src: Path, dst: Path, **changes) -> str:
    state = torch.load(src, weights_only=True)
    state["card"] = dict(state["card"], **changes)
    torch.save(state, dst)
    return str(dst)


def test_corrupt_checkpoint(trained, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(trained["ckpt"].read_bytes()[:1000])
    out = tmp_path / "o.zarr"
    fails(capsys, ["infer", "--load-state", str(bad), "--data", str(trained["test"]), "--out", str(out)],
          "bad.pt is not a readable checkpoint")
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    err = fails(capsys, ["info", str(text)], "notes.pt is not a readable checkpoint")
    assert "weights_only" not in err
    assert not out.exists()


def test_card_naming_a_callback_module_that_is_gone(trained, tmp_path, capsys):
    out = tmp_path / "o.zarr"
    gone = _with_card(trained["ckpt"], tmp_path / "gone.pt", model="nets.Tiny", callback_at=str(tmp_path / "cb"))
    fails(capsys, ["infer", "--load-state", gone, "--data", str(trained["test"]), "--out", str(out)],
          "came from --callback-at", "no longer exists", "nets.py")
    (tmp_path / "cb").mkdir()  # the directory is back, the module is not
    fails(capsys, ["infer", "--load-state", gone, "--data", str(trained["test"]), "--out", str(out)],
          "no module 'nets'")
    assert not out.exists()


def test_options_the_weights_cannot_satisfy(trained, tmp_path, capsys):
    out = tmp_path / "o.zarr"
    npy = trained["root"] / "test_npy"
    three = tmp_path / "three.zarr"  # the same boxes with a third field, za again
    convert.run(convert.ConvertConfig(output=str(three), field=(f"za={npy}/*/dis_za.npy", f"zb={npy}/*/dis_za.npy",
                                                                f"lpt={npy}/*/dis_2lpt.npy"),
                                      crop=(8,), pad=2, progress=False))
    fails(capsys, ["infer", "--load-state", str(trained["ckpt"]), "--data", str(three), "--out", str(out),
                   "--in", "za,zb", "--in-norms", "cosmology.dis,cosmology.dis"],
          "the input fields give 6 channels, but the checkpoint's model takes 3")
    common = ["--load-state", str(trained["ckpt"]), "--data", str(trained["test"]), "--out", str(out)]
    fails(capsys, ["infer", *common, "--misc-kwargs", '{"width": 4}'], "does not fit the model", "in the checkpoint but")
    assert not out.exists()


def test_checkpoint_without_card_needs_the_model(trained, tmp_path, capsys):
    bare = tmp_path / "bare.pt"
    torch.save(torch.load(trained["ckpt"], weights_only=True)["model"], bare)
    out = tmp_path / "o.zarr"
    fails(capsys, ["infer", "--load-state", str(bare), "--data", str(trained["test"]), "--out", str(out)],
          "has no model card", "--model")
    assert not out.exists()


# ---------------------------------------------------------------- styles on the card (no training run needed)


def _card(**styles) -> ModelCard:
    return ModelCard(model="StyledVNet", in_chan=3, out_chan=3, scale_factor=1, ndim=3, model_kwargs={"width": 2},
                     callback_at=None, in_fields=("za",), tgt_fields=("lpt",), in_chans=(3,), tgt_chans=(3,),
                     in_norms=None, tgt_norms=None, norm_kwargs={}, in_pad=((20, 20),) * 3, tgt_pad=((0, 0),) * 3,
                     total_stride=4, crop=(8, 8, 8), train_stores=("/data/train.zarr",), store_format_version=1,
                     map2map_version="test", **styles)


def test_card_records_the_style_names_and_norm_and_round_trips(tmp_path):
    from map2map.data.styles import StyleNorm
    from map2map.modelfit import ModelSpec, file_stamp
    from map2map.models import StyledVNet

    norm = StyleNorm(("Om", "D"), (0.3, 0.75), (0.05, 0.25))
    card = _card(**ModelCard.style_fields(norm))
    assert card.style_size == 2 and card.style_norm == norm
    assert ModelCard.from_dict(json.loads(json.dumps(card.to_dict()))) == card
    assert "styles     Om [0.25, 0.35], D [0.5, 1] (each range onto [-1, 1])" in card.describe()
    # in a checkpoint, read back weights-only; the model card builds the styled model
    model = StyledVNet(3, 3, 2, width=2)
    path = tmp_path / "state.pt"
    torch.save({"model": model.state_dict(), "card": card.to_dict(), "epoch": 1}, path)
    back = read_checkpoint(str(path)).card
    assert back == card
    spec = ModelSpec(back.model, str(path), file_stamp(str(path)), back.in_chan, back.out_chan, back.scale_factor,
                     back.ndim, json.dumps(dict(back.model_kwargs)), None, style_size=back.style_size)
    loaded = spec.load()
    assert loaded.style_size == 2 and not loaded.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_cards_without_styles_load_unchanged():
    card = _card()
    old = {k: v for k, v in card.to_dict().items() if not k.startswith("style_")}  # a card written before styles
    back = ModelCard.from_dict(old)
    assert back == card and back.style_size is None and back.style_norm is None
    assert not any(line.startswith("styles") for line in back.describe())


def test_malformed_style_norm_on_a_card():
    from map2map.errors import UserError

    bad = dict(_card().to_dict(), style_names=["Om", "D"], style_shift=[0.3], style_scale=[0.1, 0.2])
    with pytest.raises(UserError, match="the checkpoint has a malformed model card .*one shift and scale per name"):
        ModelCard.from_dict(bad)
