"""FieldDataset and the window reader on real stores: exact crops, augmentation, norms, workers, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from conftest import save_fields
from map2map import convert, geometry, store
from map2map.data import augment
from map2map.data.fields import FieldDataset, undo_norms
from map2map.data.sampler import DistFieldSampler
from map2map.data.windows import ZarrField, read_window
from map2map.errors import UserError


def make_store(tmp_path, fields: dict[str, tuple], n: int = 2, crop=None, pad=None, chunk=None,
               compressor="none", name="s.zarr") -> tuple[str, dict[str, list[np.ndarray]]]:
    arrays, specs = {}, []
    for i, (fname, shape) in enumerate(fields.items()):
        arrays[fname] = save_fields(tmp_path / "npy", fname, shape, n, seed=i + 10)
        specs.append(f"{fname}={tmp_path}/npy/{fname}_*.npy")
    out = str(tmp_path / name)
    convert.run(convert.ConvertConfig(output=out, field=tuple(specs), crop=crop, pad=pad, chunk=chunk,
                                      compressor=compressor, progress=False))
    return out, arrays


def drop_completion_mark(path) -> None:
    """Make a store look as if its writer had died before the completion mark."""
    import zarr

    group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    group.attrs[store.ATTR] = dict(group.attrs[store.ATTR], complete=False)
    zarr.consolidate_metadata(str(path))


def wrap_window(a: np.ndarray, win) -> np.ndarray:
    """Oracle: numpy.pad(mode='wrap') sliced at the window (a is (C, *spatial))."""
    pads = [(0, 0)] + [(max(0, -lo), max(0, hi - n)) for (lo, hi), n in zip(win, a.shape[1:])]
    padded = np.pad(a, pads, mode="wrap")
    return padded[(slice(None),) + tuple(slice(lo + p[0], hi + p[0]) for (lo, hi), p in zip(win, pads[1:]))]


@pytest.fixture(scope="module")
def sr_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sr")
    return make_store(tmp, {"lr": (3, 16, 16, 16), "dens": (1, 16, 16, 16), "hr": (3, 32, 32, 32)},
                      crop=[8], pad=4)


def test_items_equal_wrapped_oracle(sr_store):
    path, arrays = sr_store
    ds = FieldDataset(store=path, in_fields=["lr", "dens"], tgt_fields=["hr"], crop=8, crop_step=4,
                      in_pad=[3, 5, 0, 2, 7, 1], tgt_pad=2, scale_factor=2)
    assert len(ds) == 2 * 4 ** 3 and ds.crop_counts == (4, 4, 4)
    for idx in (0, 5, 63, 64, 127):
        item = ds[idx]
        sample, anchor = idx // 64, ds.grid.anchor(idx % 64)
        assert item["sample"] == sample and tuple(item["anchor"].tolist()) == anchor
        win = geometry.window(anchor, (8, 8, 8), ((3, 5), (0, 2), (7, 1)))
        want = np.concatenate([wrap_window(arrays["lr"][sample], win), wrap_window(arrays["dens"][sample], win)])
        assert item["input"].dtype == torch.float32 and np.array_equal(item["input"].numpy(), want)
        twin = geometry.window(tuple(2 * a for a in anchor), (16, 16, 16), ((2, 2),) * 3)
        assert np.array_equal(item["target"].numpy(), wrap_window(arrays["hr"][sample], twin))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(anchor=st.tuples(*[st.integers(-20, 40)] * 3), crop=st.integers(1, 16), pad=st.integers(0, 20))
def test_window_reader_matches_oracle(sr_store, anchor, crop, pad):
    """Any window, wrapping once or several times, through the cached chunk reader."""
    path, arrays = sr_store
    src = ZarrField(path, "lr", 2, cache_bytes=2**16)
    win = geometry.window(anchor, (crop,) * 3, ((pad, pad),) * 3)
    assert np.array_equal(read_window(src, 1, win), wrap_window(arrays["lr"][1], win))


def test_direct_path_agrees_with_zarr(tmp_path):
    path, arrays = make_store(tmp_path, {"f": (2, 20, 12, 16)}, crop=[8], pad=3)  # partial edge shards
    fast, slow = ZarrField(path, "f", 2), ZarrField(path, "f", 2, direct=False)
    assert fast.uses_direct_path and not slow.uses_direct_path
    win = ((-5, 19), (3, 17), (-2, 30))
    a, b = read_window(fast, 1, win), read_window(slow, 1, win)
    assert np.array_equal(a, b) and np.array_equal(a, wrap_window(arrays["f"][1], win))


def test_compressed_store_falls_back_to_zarr(tmp_path):
    path, arrays = make_store(tmp_path, {"f": (1, 16, 16)}, crop=[8], compressor="zstd")
    src = ZarrField(path, "f", 2)
    assert not src.uses_direct_path
    win = ((-3, 9), (10, 21))
    assert np.array_equal(read_window(src, 0, win), wrap_window(arrays["f"][0], win))


def test_read_amplification_default_layout(tmp_path):
    """crop 32 + pad 12 (the 128 + 48 layout scaled down by 4): decoded/returned <= 1.5 on the crop grid."""
    path, _ = make_store(tmp_path, {"f": (1, 64, 64, 64)}, n=1, crop=[32], pad=12)
    ds = FieldDataset(store=path, in_fields=["f"], crop=32, in_pad=12, cache_bytes=0)
    for idx in range(len(ds)):
        ds[idx]
    stats = ds.read_stats()
    assert stats.amplification <= 1.5
    assert stats.amplification == pytest.approx(geometry.read_amplification(32, 12, 16), rel=1e-9)
    # with a cache, neighbouring crops reuse the halo they share
    cached = FieldDataset(store=path, in_fields=["f"], crop=32, in_pad=12, cache_bytes=64 * 2**20)
    for idx in range(len(cached)):
        cached[idx]
    assert cached.read_stats().amplification < 1.0


def test_patterns_source_equals_store_source(sr_store, tmp_path):
    path, arrays = sr_store
    npy = path.replace("s.zarr", "npy")
    kw = dict(crop=8, in_pad=2, scale_factor=2, augment=True, seed=5)
    a = FieldDataset(store=path, in_fields=["lr"], tgt_fields=["hr"], **kw)
    b = FieldDataset(in_patterns=[f"{npy}/lr_*.npy"], tgt_patterns=[f"{npy}/hr_*.npy"], **kw)
    assert len(a) == len(b)
    for idx in range(len(a)):
        assert torch.equal(a[idx]["input"], b[idx]["input"]) and torch.equal(a[idx]["target"], b[idx]["target"])


def test_augmentation_transforms_input_and_target_alike(sr_store):
    path, _ = sr_store
    kw = dict(store=path, in_fields=["lr", "dens"], tgt_fields=["hr"], crop=8, in_pad=0, scale_factor=2)
    plain = FieldDataset(**kw)
    aug = FieldDataset(**kw, augment=True, seed=3)
    seen = set()
    for idx in range(len(plain)):
        rng = np.random.default_rng([3, 0, idx])
        element = augment.random_element(rng, 3)
        seen.add(element)
        p, q = plain[idx], aug[idx]
        want_in = np.concatenate([augment.apply(p["input"][:3].numpy(), element, vector=True),
                                  augment.apply(p["input"][3:].numpy(), element, vector=False)])
        assert np.array_equal(q["input"].numpy(), want_in)
        assert np.array_equal(q["target"].numpy(), augment.apply(p["target"].numpy(), element, vector=True))
    assert len(seen) > 8
    before = [aug[i]["input"] for i in range(len(aug))]
    aug.set_epoch(1)
    assert any(not torch.equal(aug[i]["input"], before[i]) for i in range(len(aug)))


def test_aug_shift_does_not_drift(sr_store):
    path, arrays = sr_store
    ds = FieldDataset(store=path, in_fields=["lr"], crop=8, aug_shift=4)
    anchors = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        item = ds[1]
        shift = np.asarray(item["anchor"]) - np.asarray(ds.grid.anchor(1))
        assert ((0 <= shift) & (shift < 4)).all()
        win = geometry.window(tuple(item["anchor"].tolist()), (8, 8, 8), ((0, 0),) * 3)
        assert np.array_equal(item["input"].numpy(), wrap_window(arrays["lr"][0], win))
        anchors.append(tuple(item["anchor"].tolist()))
    assert ds.grid.anchor(1) == (0, 0, 8) and len(set(anchors)) > 1


def test_noise_same_for_input_and_target(sr_store):
    path, _ = sr_store
    kw = dict(store=path, in_fields=["lr"], tgt_fields=["hr"], crop=8, scale_factor=2)
    p = FieldDataset(**kw)[2]
    q = FieldDataset(**kw, aug_add=0.5, aug_mul=0.3, seed=7)[2]
    rng = np.random.default_rng([7, 0, 2])
    add, mul = augment.add_noise(rng, 0.5), augment.mul_noise(rng, 0.3)
    for key in ("input", "target"):
        np.testing.assert_allclose(q[key].numpy(), (p[key].numpy() + np.float32(add)) * np.float32(mul), rtol=1e-6)


def test_norms_applied_per_field_and_undone(sr_store):
    path, _ = sr_store
    kw = dict(store=path, in_fields=["lr", "dens"], tgt_fields=["hr"], crop=8, scale_factor=2)
    p = FieldDataset(**kw)[0]
    q = FieldDataset(**kw, in_norms=["cosmology.dis", "none"], tgt_norms=["cosmology.dis"], z=1.0)[0]
    from map2map.data.norms import cosmology

    scale = 6.0 * cosmology.growth_factor(1.0)
    np.testing.assert_allclose(q["input"][:3].numpy(), p["input"][:3].numpy() / scale, rtol=1e-6)
    assert torch.equal(q["input"][3:], p["input"][3:])  # "none": this field is left as it is
    back = undo_norms(q["target"].clone(), ["cosmology.dis"], [3], z=1.0)
    np.testing.assert_allclose(back.numpy(), p["target"].numpy(), rtol=1e-6)


def test_callback_norm(sr_store, tmp_path):
    path, _ = sr_store
    (tmp_path / "mynorms.py").write_text("def double(x, undo=False, **kw):\n    return x / 2 if undo else x * 2\n")
    p = FieldDataset(store=path, in_fields=["lr"], crop=8)[0]
    q = FieldDataset(store=path, in_fields=["lr"], crop=8, in_norms=["mynorms.double"], callback_at=str(tmp_path))[0]
    assert torch.equal(q["input"], p["input"] * 2)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_dataloader_workers(sr_store, method):
    """Real worker processes (fork after the parent has read, and spawn), pin_memory on."""
    path, _ = sr_store
    ds = FieldDataset(store=path, in_fields=["lr"], tgt_fields=["hr"], crop=8, in_pad=2, scale_factor=2)
    ds[0]  # the parent reads first: forked workers must still work
    sampler = DistFieldSampler(ds.nsample, ds.crop_counts, seed=1)
    loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2, pin_memory=True,
                        multiprocessing_context=method)
    got = {}
    for batch in loader:
        for i, idx in enumerate(batch["index"].tolist()):
            got[idx] = batch["input"][i]
    assert sorted(got) == sorted(sampler.indices().tolist())
    for idx in list(got)[:3]:
        assert torch.equal(got[idx], ds[idx]["input"])


BAD = {
    "crop larger than field": (dict(crop=17), "larger than the field"),
    "zero step": (dict(crop=8, crop_step=0), "crop_step must be positive"),
    "crop of wrong length": (dict(crop=[8, 8]), "crop needs 1 or 3 values"),
    "negative pad": (dict(crop=8, in_pad=-1), "must not be negative"),
    "wrong scale": (dict(crop=8, tgt_fields=["hr"], scale_factor=3), "is not scale_factor=3 times"),
    "mixed input sizes": (dict(in_fields=["lr", "hr"]), "different spatial sizes"),
    "unknown field": (dict(in_fields=["nope"]), "it has lr, dens, hr"),
    "norms length": (dict(in_fields=["lr", "dens"], in_norms=["cosmology.dis"]), "lists 1 norms for 2 fields"),
    "missing callback module": (dict(in_norms=["nomodule.f"], callback_at="."), "no module 'nomodule'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(sr_store, case):
    path, _ = sr_store
    kwargs, message = BAD[case]
    kwargs = dict(dict(store=path, in_fields=["lr"]), **kwargs)
    with pytest.raises(UserError, match=message):
        FieldDataset(**kwargs)


def test_bad_patterns(sr_store):
    path, _ = sr_store
    npy = path.replace("s.zarr", "npy")
    with pytest.raises(UserError, match=r"input pattern '.*/nothing_\*.npy' matches no files"):
        FieldDataset(in_patterns=[f"{npy}/nothing_*.npy"])
    with pytest.raises(UserError, match="input patterns match different numbers of files"):
        FieldDataset(in_patterns=[f"{npy}/lr_*.npy", f"{npy}/hr_00.npy"])
    with pytest.raises(UserError, match="input patterns match 2 files but target patterns 1"):
        FieldDataset(in_patterns=[f"{npy}/lr_*.npy"], tgt_patterns=[f"{npy}/hr_01.npy"])


def test_incomplete_store_refused(tmp_path):
    path, _ = make_store(tmp_path, {"f": (1, 8, 8)})
    drop_completion_mark(path)
    with pytest.raises(UserError, match="incomplete"):
        FieldDataset(store=path, in_fields=["f"])
