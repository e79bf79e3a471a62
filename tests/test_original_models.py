"""The original toolkit's models, parameter for parameter: its state files load strictly into our `VNet`,
`UNet`, `G`, `PatchGAN` and `PatchGAN42` and reproduce its outputs (golden data, see `golden`); the
forward passes equal an independent functional transcription of the specification in eval and train mode;
parameter counts and output sizes follow formulas; and its checkpoints work wherever ours do (`m2m infer`,
`m2m test`, `m2m train --load-state`).  `StyledVNet` has its own file (test_styled.py)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from conftest import fails
from golden import golden
from stores import random_pair_store
from map2map import modelfit
from map2map.cli import main
from map2map.models import G, PatchGAN, PatchGAN42, UNet, VNet, narrow_by
from map2map.models.stride import output_shape
from map2map.utils import checkpoint as ckpt
from test_infer import make_store, reference

pytestmark = pytest.mark.usefixtures("torch_one_thread")

BUILD = {  # the constructions of the golden data (NAME.txt, first line)
    "VNet": lambda: VNet(3, 3),
    "UNet": lambda: UNet(3, 3),
    "G": lambda: G(3, 3, scale_factor=2, chan_base=64, chan_min=16, chan_max=64),
    "PatchGAN": lambda: PatchGAN(3),
    "PatchGAN42": lambda: PatchGAN42(3),
}
REL = 1e-5


def spec_entries(name: str) -> list[tuple[str, list[int]]]:
    """Every parameter and buffer of the original model, in order, with its shape (from NAME.txt)."""
    text = golden(f"{name}.txt").read_text()
    section = text.split("parameters and buffers", 1)[1].split("module tree", 1)[0]
    return [(key, [int(n) for n in shape.replace(",", " ").split()])
            for key, shape in re.findall(r"^\s+(\S+) \(([\d, ]*)\)$", section, re.M)]


def golden_state(name: str) -> dict:
    return torch.load(golden(f"{name}.state.pt"), weights_only=True)


def relative_error(got: torch.Tensor | np.ndarray, want: np.ndarray) -> float:
    got = got.detach().numpy() if isinstance(got, torch.Tensor) else got
    return float(np.abs(got - want).max() / np.abs(want).max())


# ---------------------------------------------------------------- golden data

@pytest.mark.parametrize("name", list(BUILD))
def test_golden_state_loads_strictly_and_reproduces_the_output(name):
    model = BUILD[name]()
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == spec_entries(name)
    model.load_state_dict(golden_state(name)["model"], strict=True)
    x = torch.from_numpy(np.load(golden(f"{name}.in.npy")))
    want = np.load(golden(f"{name}.out.npy"))
    with torch.no_grad():
        y = model.eval()(x)
    assert tuple(y.shape) == want.shape
    assert relative_error(y, want) <= REL


# ---------------------------------------------------------------- the specification, transcribed functionally

def f_block(sd: dict, prefix: str, x: torch.Tensor, seq: str, training: bool, residual: bool = False):
    """A (residual) block of the README's layer-string convention, from the state dict alone."""
    body = seq[:-1] if residual and seq.endswith("A") else seq
    y = x
    for i, letter in enumerate(body):
        p = f"{prefix}.convs.{i}."
        if letter in "CD":
            y = F.conv3d(y, sd[p + "weight"], sd[p + "bias"], stride=2 if letter == "D" else 1)
        elif letter == "U":
            y = F.conv_transpose3d(y, sd[p + "weight"], sd[p + "bias"], stride=2)
        elif letter == "B":
            y = F.batch_norm(y, sd[p + "running_mean"].clone(), sd[p + "running_var"].clone(), sd[p + "weight"],
                             sd[p + "bias"], training=training, momentum=0.1, eps=1e-5)
        else:
            y = F.leaky_relu(y, 0.01)
    if residual:
        s = F.conv3d(x, sd[f"{prefix}.skip.weight"], sd[f"{prefix}.skip.bias"])
        for axis in range(2, s.dim()):  # cut symmetrically, one more voxel on the right when odd
            s = s.narrow(axis, (s.shape[axis] - y.shape[axis]) // 2, y.shape[axis])
        y = y + s
        y = F.leaky_relu(y, 0.01) if seq.endswith("A") else y
    return y


def f_unet(sd: dict, x: torch.Tensor, training: bool, residual: bool) -> torch.Tensor:
    """VNet (residual) or UNet, as the README describes them."""
    def block(name, v, seq):
        return f_block(sd, name, v, seq, training, residual)

    def plain(name, v, seq):
        return f_block(sd, name, v, seq, training)

    y0 = block("conv_l0", x, "CACBA")
    y1 = block("conv_l1", plain("down_l0", y0, "DBA"), "CBACBA")
    u = plain("up_r1", block("conv_c", plain("down_l1", y1, "DBA"), "CBACBA"), "UBA")
    u = plain("up_r0", block("conv_r1", torch.cat([narrow_by(y1, 4), u], 1), "CBACBA"), "UBA")
    u = block("conv_r0", torch.cat([narrow_by(y0, 16), u], 1), "CAC")
    return u + narrow_by(x, 20)


def f_patchgan(sd: dict, x: torch.Tensor, training: bool) -> torch.Tensor:
    for i, seq in enumerate(["CA", "CBA", "CBA", "C"]):
        x = f_block(sd, f"convs.{i}", x, seq, training)
    return x


def f_patchgan42(sd: dict, x: torch.Tensor, training: bool) -> torch.Tensor:
    for i, norm in ((0, None), (2, 3), (5, 6)):
        x = F.conv3d(x, sd[f"convs.{i}.weight"], sd[f"convs.{i}.bias"], stride=2)
        if norm is not None:
            p = f"convs.{norm}."
            x = F.batch_norm(x, sd[p + "running_mean"].clone(), sd[p + "running_var"].clone(), sd[p + "weight"],
                             sd[p + "bias"], training=training, momentum=0.1, eps=1e-5)
        x = F.leaky_relu(x, 0.2)
    return F.conv3d(x, sd["convs.8.weight"], sd["convs.8.bias"])


def f_g(sd: dict, x: torch.Tensor, blocks: int) -> torch.Tensor:
    """G as the README describes it, drawing its noise in the same order (one draw per voxel and block step)."""
    def up(v):  # trilinear by 2, then narrow_by 1
        return narrow_by(F.interpolate(v, scale_factor=2, mode="trilinear", align_corners=False), 1)

    def noise(v, std):
        return v + std.view(-1, 1, 1, 1) * torch.randn_like(v[:, :1])

    y = x
    x = F.leaky_relu(F.conv3d(x, sd["block0.0.weight"], sd["block0.0.bias"]), 0.2)
    for b in range(blocks):
        p = f"blocks.{b}."
        x = F.conv3d(up(noise(x, sd[p + "conv.0.std"])), sd[p + "conv.2.weight"], sd[p + "conv.2.bias"])
        x = F.leaky_relu(x, 0.2)
        x = F.leaky_relu(F.conv3d(noise(x, sd[p + "conv.4.std"]), sd[p + "conv.5.weight"], sd[p + "conv.5.bias"]),
                         0.2)
        y = narrow_by(up(y), 2) + F.leaky_relu(F.conv3d(x, sd[p + "proj.0.weight"], sd[p + "proj.0.bias"]), 0.2)
    return y


def test_g_with_noise_equals_the_specification():
    """Non-zero noise strengths: the same draws (same seed, same order) give the same output."""
    model = BUILD["G"]()
    sd = golden_state("G")["model"]
    sd = {k: (torch.full_like(v, 0.3) if k.endswith(".std") else v) for k, v in sd.items()}
    model.load_state_dict(sd)
    x = torch.from_numpy(np.load(golden("G.in.npy")))
    with torch.no_grad():
        torch.manual_seed(7)
        got = model(x)
        torch.manual_seed(7)
        want = f_g(sd, x, 1)
        torch.manual_seed(8)
        other = model(x)
    assert relative_error(got, want.numpy()) <= REL
    assert relative_error(other, want.numpy()) > 1e-3  # the noise is really there


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("name", ["VNet", "UNet", "PatchGAN", "PatchGAN42"])
def test_forward_equals_the_specification_in_eval_and_train_mode(name, training):
    sd = golden_state(name)["model"]
    model = BUILD[name]()
    model.load_state_dict(sd)
    model.train(training)
    x = torch.from_numpy(np.load(golden(f"{name}.in.npy")))
    with torch.no_grad():
        got = model(x)
        if name.startswith("PatchGAN"):
            want = (f_patchgan if name == "PatchGAN" else f_patchgan42)(sd, x, training)
        else:
            want = f_unet(sd, x, training, name == "VNet")
    assert relative_error(got, want.numpy()) <= REL
    if training:  # batch statistics were used, so the result differs from eval mode
        assert relative_error(got, np.load(golden(f"{name}.out.npy"))) > 1e-3


# ---------------------------------------------------------------- parameter counts and sizes, by formula

def conv(i: int, o: int, k: int, dim: int) -> int:
    return o * i * k ** dim + o


def unet_params(cin: int, cout: int, w: int, dim: int, residual: bool) -> int:
    """Parameters of UNet / VNet block by block (README): convolutions, batch-norm scales and shifts, skips."""
    c = lambda i, o, k=3: conv(i, o, k, dim)  # noqa: E731
    mid0, midr = max(cin, w), max(2 * w, cout)
    resize = c(w, w, 2) + 2 * w                                         # 'DBA' or 'UBA'
    cbacba = 2 * (c(w, w) + 2 * w)
    levels = ((c(cin, mid0) + c(mid0, w) + 2 * w)                      # conv_l0 'CACBA'
              + resize + cbacba + resize + cbacba + resize              # down_l0 .. up_r1
              + (c(2 * w, 2 * w) + 4 * w + c(2 * w, w) + 2 * w)         # conv_r1 'CBACBA', 2w -> w
              + resize                                                  # up_r0
              + (c(2 * w, midr) + c(midr, cout)))                       # conv_r0 'CAC'
    skips = c(cin, w, 1) + 2 * c(w, w, 1) + c(2 * w, w, 1) + c(2 * w, cout, 1)
    return levels + (skips if residual else 0)


def g_params(cin: int, cout: int, scale: int, base: int, lo: int, hi: int, dim: int) -> int:
    chan = [min(max(base >> b, lo), hi) for b in range(scale.bit_length())]
    n = conv(cin, chan[0], 1, dim)
    for b in range(scale.bit_length() - 1):
        n += chan[b] + conv(chan[b], chan[b + 1], 3, dim) + chan[b + 1] + conv(chan[b + 1], chan[b + 1], 3, dim)
        n += conv(chan[b + 1], cout, 1, dim)
    return n


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_of_the_golden_constructions():
    assert n_params(VNet(3, 3)) == unet_params(3, 3, 64, 3, True) == 1_825_222  # the count
    assert n_params(UNet(3, 3)) == unet_params(3, 3, 64, 3, False)
    assert n_params(G(3, 3, scale_factor=2, chan_base=64, chan_min=16, chan_max=64)) == \
        g_params(3, 3, 2, 64, 16, 64, 3)
    assert n_params(PatchGAN(3)) == conv(3, 32, 3, 3) + conv(32, 64, 3, 3) + 128 + conv(64, 128, 3, 3) + 256 + \
        conv(128, 1, 3, 3)
    assert n_params(PatchGAN42(3)) == conv(3, 64, 4, 3) + conv(64, 128, 4, 3) + 256 + conv(128, 256, 4, 3) + \
        512 + conv(256, 1, 1, 3)


@given(cin=st.integers(1, 5), cout=st.integers(1, 5), w=st.integers(1, 6), dim=st.sampled_from([2, 3]))
def test_unet_vnet_parameter_counts(cin, cout, w, dim):
    for cls, residual in ((UNet, False), (VNet, True)):
        assert n_params(cls(cin, cout, width=w, dim=dim)) == unet_params(cin, cout, w, dim, residual)


@given(c=st.integers(1, 4), blocks=st.integers(0, 3), base=st.integers(1, 64), lo=st.integers(1, 8),
       hi=st.integers(8, 32), dim=st.sampled_from([2, 3]))
def test_g_parameter_counts(c, blocks, base, lo, hi, dim):
    model = G(c, c, scale_factor=2 ** blocks, chan_base=base, chan_min=lo, chan_max=hi, dim=dim)
    assert n_params(model) == g_params(c, c, 2 ** blocks, base, lo, hi, dim)


@given(n=st.integers(1, 12), dim=st.sampled_from([2, 3]), odd=st.integers(1, 3))
def test_unet_vnet_map_n_plus_40_to_n(n, dim, odd):
    for cls in (UNet, VNet):
        model = cls(2, 1, width=2, dim=dim)
        assert output_shape(model, 2, (4 * n + 40,) * dim) == (4 * n,) * dim
        assert output_shape(model, 2, (4 * n + 40 + odd,) + (4 * n + 40,) * (dim - 1)) is None


@given(s=st.integers(6, 24), blocks=st.integers(0, 3), dim=st.sampled_from([2, 3]))
def test_g_blocks_map_s_to_2s_minus_6(s, blocks, dim):
    size = s
    for _ in range(blocks):
        size = 2 * size - 6
    model = G(1, 1, scale_factor=2 ** blocks, chan_base=2, chan_min=2, chan_max=2, dim=dim)
    assert output_shape(model, 1, (s,) * dim) == (size,) * dim


@given(n=st.integers(22, 64), dim=st.sampled_from([2, 3]))
def test_patchgan_sizes(n, dim):
    assert output_shape(PatchGAN(2, dim=dim), 2, (n,) * dim) == (n - 8,) * dim
    size = n
    for _ in range(3):
        size = (size - 4) // 2 + 1
    assert output_shape(PatchGAN42(2, dim=dim), 2, (n,) * dim) == (size,) * dim


def test_bypass_only_when_channels_agree():
    x = torch.randn(1, 2, 44, 44)
    for cls in (UNet, VNet):
        assert cls(2, 2, dim=2, width=2).bypass and not cls(2, 3, dim=2, width=2).bypass
        with pytest.raises(ValueError, match="bypass"):
            cls(2, 3, bypass=True, dim=2, width=2)
        model = cls(2, 2, dim=2, width=2).eval()
        plain = cls(2, 2, bypass=False, dim=2, width=2).eval()
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(model(x) - plain(x), narrow_by(x, 20))
    with pytest.raises(ValueError, match="in_chan == out_chan"):
        G(2, 3, scale_factor=2)


# ---------------------------------------------------------------- the original's checkpoints in our stages

def test_checkpoint_readers_accept_the_original_format_and_ddp_prefixes(tmp_path):
    state = golden_state("VNet")
    assert sorted(state) == ["epoch", "min_loss", "model", "optimizer", "rng", "scheduler"]
    wrapped = dict(state, model={f"module.{k}": v for k, v in state["model"].items()})
    torch.save(wrapped, tmp_path / "ddp.pt")
    for path in (golden("VNet.state.pt"), tmp_path / "ddp.pt"):
        read = ckpt.read_state(path)
        assert list(read["model"]) == list(state["model"]) and read["epoch"] == 1
        ck = modelfit.read_checkpoint(str(path))
        assert ck.card is None and ck.epoch == 1 and list(ck.model_state) == list(state["model"])


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    """One 16^3 box of 3 channels (input 'disp' and target 'tgt') in a store cut into 8^3 crops."""
    root = tmp_path_factory.mktemp("original")
    return (root, *random_pair_store(root, "box", 18))


def test_m2m_infer_with_an_original_vnet_state_equals_a_whole_box_pass(box, capsys, tmp_path):
    _, x, _, data = box
    state = str(golden("VNet.state.pt"))
    out = tmp_path / "pred.zarr"
    assert main(["infer", "--model", "VNet", "--load-state", state, "--data", data, "--in", "disp",
                 "--crop", "8", "--out", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    import zarr

    got = np.asarray(zarr.open_group(str(out), mode="r")["prediction"][0])
    model = VNet(3, 3)
    model.load_state_dict(golden_state("VNet")["model"])
    want = reference(model.eval(), x[0], 20, (16, 16, 16))
    assert got.shape == want.shape == (3, 16, 16, 16)
    assert relative_error(got, want) <= REL


def test_m2m_test_with_an_original_vnet_state(box, capsys, tmp_path):
    _, x, y, _ = box
    (tmp_path / "s0").mkdir()
    np.save(tmp_path / "s0" / "lin.npy", x[0])
    np.save(tmp_path / "s0" / "nbody.npy", y[0])
    assert main(["test", "--test-in-patterns", str(tmp_path / "s*" / "lin.npy"), "--test-tgt-patterns",
                 str(tmp_path / "s*" / "nbody.npy"), "--model", "VNet", "--load-state", str(golden("VNet.state.pt")),
                 "--crop", "16", "--no-progress"]) == 0, capsys.readouterr().err
    model = VNet(3, 3)
    model.load_state_dict(golden_state("VNet")["model"])
    want = reference(model.eval(), x[0], 20, (16, 16, 16))
    assert relative_error(np.load(tmp_path / "s0" / "nbody_out.npy"), want) <= REL


def _train_argv(data: str, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--train-data", data, "--in", "disp", "--tgt", "tgt", "--crop", "16", "--in-pad", "20",
            "--model", "VNet", "--loader-workers", "0", "--epochs", "2", "--run-dir", str(run_dir),
            "--lr", "1e-4", *extra]


def test_m2m_train_continues_an_original_checkpoint_at_its_epoch(box, capsys, tmp_path):
    root, _, _, _ = box
    data = make_store(tmp_path, "whole", {"disp": box[1], "tgt": box[2]}, crop=16)
    start = tmp_path / "original_state_1.pt"
    shutil.copy(golden("VNet.state.pt"), start)
    rd = tmp_path / "run"
    assert main(_train_argv(data, rd, "--load-state", str(start), "--reduce-lr-on-plateau")) == 0, \
        capsys.readouterr().err
    out = capsys.readouterr().out
    assert "original toolkit's RNG state" in out and "after epoch 1" in out
    assert not (rd / "state_1.pt").exists()  # epoch 1 came from the original's training
    new = torch.load(rd / "state_2.pt", weights_only=True)
    old = golden_state("VNet")
    assert new["epoch"] == 2 and [r["epoch"] for r in new["losses"]] == [2]
    assert new["card"]["model"] == "VNet" and new["card"]["in_chan"] == 3
    steps = {int(s["step"]) for s in new["optimizer"]["state"].values()}
    assert steps == {int(s["step"]) + 1 for s in old["optimizer"]["state"].values()}  # Adam's moments went on
    assert new["min_loss"] <= old["min_loss"]
    assert new["scheduler"]["last_epoch"] == old["scheduler"]["last_epoch"] + 1


def test_m2m_train_refuses_an_original_checkpoint_of_another_shape_in_one_line(box, capsys, tmp_path):
    _, _, _, data = box
    rd = tmp_path / "run"
    fails(capsys, _train_argv(data, rd, "--load-state", str(golden("VNet.state.pt")), "--misc-kwargs",
                              '{"width": 8}', "--crop", "8"),
          "does not fit the model",
          "conv_l0.convs.0.weight is [64, 3, 3, 3, 3] in the checkpoint but [8, 3, 3, 3, 3] in the model")
    assert not list(rd.glob("state_*.pt"))
