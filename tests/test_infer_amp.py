"""`m2m infer --amp`: forward passes under autocast, predictions written as float32, and the device check.

Real stores, a real V-Net and real Dask workers on CPU.  This machine has no
GPU: where the client's view of CUDA matters it is MOCKED (`CudaInfo` facts
handed to `map2map.infer.engine`); everything else is real.

Terms: the *field's scale* is the standard deviation of the float32
prediction (in the field's physical units); a 16-bit prediction's *relative
difference* is its largest absolute difference from the float32 one divided
by that scale.  bf16 keeps 8 significant bits (about 3 decimal digits), fp16
11, so a few layers of rounding stay within a few hundredths of the scale.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from map2map import infer, store
from map2map.data.norms import cosmology
from map2map.errors import UserError
from map2map.infer import engine
from map2map.models import VNet
from map2map.utils.distenv import CudaInfo

from conftest import fails
from stores import drop_completion_mark
from test_infer import TOL, make_store, reference, save_ckpt, tame

NORM = {"z": 0.0}
RELATIVE = 2e-2  # largest relative difference allowed for a 16-bit prediction (see the module's terms)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A 3-channel displacement store (2 samples of 32^3, in Mpc/h), a tamed V-Net checkpoint, and the
    float32 whole-box reference of each sample in Mpc/h."""
    root = tmp_path_factory.mktemp("amp")
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2, 3, 32, 32, 32)) * 6).astype(np.float32)
    data = make_store(root, "in", {"dis": x}, crop=16)
    torch.manual_seed(0)
    model = tame(VNet(3, 3, dim=3, width=4), gain=0.5)
    ckpt = save_ckpt(model, root / "state_1.pt")
    refs = [cosmology.dis(reference(model, cosmology.dis(xi.copy(), **NORM), 20, (32,) * 3), undo=True, **NORM)
            for xi in x]
    return root, data, ckpt, refs


def predict(cluster, case, out: str, **kw) -> tuple[infer.InferSummary, np.ndarray]:
    root, data, ckpt, _ = case
    s = infer.run(infer.InferConfig(scheduler=cluster, out=out, model="VNet", load_state=ckpt, data=data,
                                    in_fields=("dis",), crop=(16,), model_kwargs={"width": 4},
                                    in_norms=("cosmology.dis",), tgt_norms=("cosmology.dis",), norm_kwargs=NORM,
                                    progress=False, **kw))
    return s, store.open_store(out).field("prediction")[:]


def settings_of(out: str) -> dict:
    return store.read_meta(out)["infer"]


def test_fp32_is_unchanged_and_exact(cluster, case, tmp_path):
    """amp off (the default) is the whole-box float32 pass, as before --amp existed."""
    out = str(tmp_path / "off.zarr")
    s, pred = predict(cluster, case, out)
    for p, ref in zip(pred, case[3]):
        assert float(np.abs(p - ref).max()) <= TOL * 6.0  # TOL in normalized units, times the norm's scale
    assert s.amp == "off" and not any("precision" in line for line in s.lines())
    assert settings_of(out)["amp"] == "off"


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_16_bit_prediction_is_close_to_fp32_and_written_as_float32(cluster, case, tmp_path, amp):
    """bf16 and fp16 (torch's CPU autocast runs both, as training accepts fp16 on CPU) stay within
    `RELATIVE` of the float32 prediction, are not the float32 prediction itself (autocast ran), and are
    written as float32, with the mode recorded in the store's settings and printed."""
    out = str(tmp_path / f"{amp}.zarr")
    s, pred = predict(cluster, case, out, amp=amp)
    assert pred.dtype == np.float32 and store.open_store(out).field("prediction").dtype == np.float32
    for p, ref in zip(pred, case[3]):
        scale = float(ref.std())
        rel = float(np.abs(p - ref).max()) / scale
        print(f"\nAMP {amp} on cpu: max abs diff / field std {rel:.3g} (field std {scale:.3g} Mpc/h)")
        assert 0 < rel < RELATIVE
        assert np.isfinite(p).all()
    assert s.amp == amp
    assert f"precision: amp {amp} (forward passes under autocast; predictions written as float32)" in s.lines()
    assert settings_of(out)["amp"] == amp


def test_another_amp_does_not_resume_a_store_of_this_one(cluster, case, tmp_path):
    """The amp mode is one of the settings a resumed run must match: an incomplete bf16 store is started
    over by a float32 run, which then equals the float32 reference."""
    out = tmp_path / "resume.zarr"
    predict(cluster, case, str(out), amp="bf16")
    drop_completion_mark(out)  # as if the bf16 run had died before its last tile
    s, pred = predict(cluster, case, str(out))
    assert any("incomplete store from a run with other settings: starting over" in n for n in s.notes)
    assert s.computed == s.tiles
    assert float(np.abs(pred[0] - case[3][0]).max()) <= TOL * 6.0


def test_an_unknown_amp_is_refused_in_one_line_before_any_work(case, tmp_path, capsys):
    _, data, ckpt, _ = case
    out = tmp_path / "bad.zarr"
    with pytest.raises(UserError, match=r"^--amp 'fp8': expected one of off, bf16, fp16$"):
        engine.prepare(infer.InferConfig(load_state=ckpt, data=data, out=str(out), amp="fp8"))
    from map2map.cli import main

    with pytest.raises(SystemExit) as exit_:  # argparse's own error, shortened to one line
        main(["infer", "--data", data, "--load-state", ckpt, "--out", str(out), "--amp", "fp8"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert "--amp: invalid choice: 'fp8'" in err and "'bf16'" in err
    assert not out.exists()


def test_m2m_test_takes_amp_too():
    from map2map.cli import build_parser
    from map2map.cli.configs import stage_of

    args = build_parser().parse_args(["test", "--test-in-patterns", "a*.npy", "--test-tgt-patterns", "b*.npy",
                                      "--load-state", "c.pt", "--amp", "bf16"])
    assert stage_of(args)[1].amp == "bf16"


# --------------------------------------------------------------------------- --device on the client


def _mock_cuda(monkeypatch, info: CudaInfo) -> None:
    """What this process sees of CUDA, MOCKED (this machine has no GPU)."""
    monkeypatch.setattr(engine, "cuda_info", lambda: info)


def test_device_cuda_without_a_usable_gpu_names_the_reason_as_training_does(case, tmp_path, capsys,
                                                                              monkeypatch):
    """The one line is `map2map.utils.distenv.choose_device`'s, the same reason training and the workers give."""
    _, data, ckpt, _ = case
    out = tmp_path / "cuda.zarr"
    argv = ["infer", "--data", data, "--load-state", ckpt, "--out", str(out), "--device", "cuda"]
    _mock_cuda(monkeypatch, CudaInfo(torch_version="2.6.0+cpu"))
    fails(capsys, argv, "--device cuda, but this torch is a CPU-only build", "or use --device cpu")
    _mock_cuda(monkeypatch, CudaInfo(torch_version="2.6.0+cu124", cuda="12.4", visible=2, usable=False,
                                     why="The NVIDIA driver on your system is too old (found version 11040)"))
    fails(capsys, argv, "--device cuda, but 2 GPU(s) visible but CUDA does not start: The NVIDIA driver",
          "torch 2.6.0+cu124", "install a torch built for the driver's CUDA version")
    assert not out.exists()


def test_device_auto_falls_back_to_cpu_with_the_reason(case, tmp_path, monkeypatch):
    _, data, ckpt, _ = case
    cfg = infer.InferConfig(load_state=ckpt, data=data, out=str(tmp_path / "auto.zarr"), in_fields=("dis",),
                            model="VNet", model_kwargs={"width": 4}, crop=(16,))
    _mock_cuda(monkeypatch, CudaInfo(torch_version="2.6.0+cu124", cuda="12.4", visible=2, usable=False,
                                     why="The NVIDIA driver on your system is too old (found version 11040)"))
    prep = engine.prepare(cfg)
    assert prep.device == "cpu"
    assert prep.notes == ["2 GPU(s) visible but CUDA does not start: The NVIDIA driver on your system is too old "
                          "(found version 11040) (torch 2.6.0+cu124, torch.version.cuda 12.4, 2 GPU(s) visible); "
                          "predicting on cpu (--device cuda makes this an error)"]
    _mock_cuda(monkeypatch, CudaInfo(torch_version="2.6.0+cpu"))  # no GPU at all: nothing to say
    prep = engine.prepare(cfg)
    assert prep.device == "cpu" and prep.notes == []
    assert not (tmp_path / "auto.zarr").exists()
