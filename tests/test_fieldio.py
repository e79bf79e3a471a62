"""The field I/O layer (read, normalise, stack), the shard decoder, and the inference worker's state."""

from __future__ import annotations

import os
from collections import namedtuple
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr

from map2map import geometry
from map2map.data import augment, shards
from map2map.data.fieldio import FieldStack, apply_norm, lookup_norms, undo_norms
from map2map.data.norms import cosmology
from map2map.data.windows import NpyField, ZarrField, read_window
from map2map.errors import UserError
from test_fields import make_store, wrap_window


@pytest.fixture(scope="module")
def two_fields(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fieldio")
    return make_store(tmp, {"v": (3, 16, 16, 16), "s": (1, 16, 16, 16)}, crop=[8], pad=2)


def test_stack_reads_normalises_and_concatenates(two_fields):
    path, arrays = two_fields
    norms = lookup_norms(["cosmology.dis", "none"], 2, "in_norms")
    assert norms == [cosmology.dis, None]
    stack = FieldStack([ZarrField(path, "v", 2), ZarrField(path, "s", 2)], norms, {"z": 1.0})
    win = ((-3, 9), (5, 19), (14, 20))
    out = np.full(stack.shape(win), np.nan, np.float32)
    assert stack.read(1, win, out) is out and out.shape == (4, 12, 14, 6)
    want_v = wrap_window(arrays["v"][1], win).copy()
    cosmology.dis(want_v, z=1.0)
    assert np.array_equal(out[:3], want_v)  # the same operations in the same order: bit for bit
    assert np.array_equal(out[3:], wrap_window(arrays["s"][1], win))
    assert np.array_equal(undo_norms(out, ["cosmology.dis", "none"], stack.chans, z=1.0)[3:],
                          wrap_window(arrays["s"][1], win))
    np.testing.assert_allclose(out[:3], wrap_window(arrays["v"][1], win), rtol=1e-6)


@pytest.mark.parametrize("element", [augment.CubeElement((2, 0, 1), (True, False, True)),
                                     augment.CubeElement((1, 0, 2), (False, False, True))])
def test_stack_through_a_symmetry_element(two_fields, element):
    """Reading through an element equals reading plainly then applying it (vector field turned)."""
    path, _ = two_fields
    stack = FieldStack([ZarrField(path, "v", 2), ZarrField(path, "s", 2)], [None, None])
    win = ((-2, 10), (3, 11), (0, 6))
    plain = stack.read(0, win, np.empty(stack.shape(win), np.float32))
    got = stack.read(0, win, np.empty(stack.shape(win, element), np.float32), element)
    want = np.concatenate([augment.apply(plain[:3], element, vector=True),
                           augment.apply(plain[3:], element, vector=False)])
    assert np.array_equal(got, want)


def test_stack_refuses_wrong_shapes(two_fields):
    path, _ = two_fields
    stack = FieldStack([ZarrField(path, "s", 2)], [None])
    with pytest.raises(ValueError, match="the stack needs"):
        stack.read(0, ((0, 4), (0, 4), (0, 4)), np.empty((1, 4, 4, 5), np.float32))
    with pytest.raises(ValueError, match="1 norms for 2 sources"):
        FieldStack([ZarrField(path, "s", 2), ZarrField(path, "v", 2)], [None])


def test_norm_lookup_errors_and_user_norms_returning_new_arrays(tmp_path):
    with pytest.raises(UserError, match="lists 1 norms for 2 fields"):
        lookup_norms(["cosmology.dis"], 2, "in_norms")
    with pytest.raises(UserError, match="unknown norm 'nope'"):
        lookup_norms(["nope"], 1, "in_norms")
    assert lookup_norms(None, 3, "in_norms") == [None] * 3
    (tmp_path / "mine.py").write_text("def half(x, undo=False, **kw):\n    return x * 2 if undo else x / 2\n")
    [half] = lookup_norms(["mine.half"], 1, "tgt_norms", str(tmp_path))
    x = np.arange(4, dtype=np.float32)
    apply_norm(half, x)
    assert np.array_equal(x, np.arange(4) / 2)  # the returned array was copied back in place
    undo_norms(x.reshape(1, 1, 4), ["mine.half"], [1], str(tmp_path), channel_axis=1)  # (batch, channel, x)
    assert np.array_equal(x, np.arange(4))


def test_npy_and_store_sources_stack_alike(two_fields):
    path, arrays = two_fields
    npy = os.path.join(os.path.dirname(path), "npy")
    a = FieldStack([ZarrField(path, "v", 2)], [None])
    b = FieldStack([NpyField([f"{npy}/v_{i:02d}.npy" for i in range(2)])], [None])
    win = ((15, 33), (-1, 7), (4, 8))
    assert np.array_equal(a.read(1, win, np.empty(a.shape(win), np.float32)),
                          b.read(1, win, np.empty(b.shape(win), np.float32)))


# --------------------------------------------------------------------------- the shard decoder


def test_shard_reader_chunks_equal_zarr(tmp_path):
    """Every inner chunk, edge chunks included, as zarr-python decodes it."""
    path, _ = make_store(tmp_path, {"f": (2, 20, 12, 16)}, crop=[8], pad=3)
    arr = zarr.open_group(path, mode="r")["f"]
    layout = shards.layout_of(arr)
    assert layout is not None and layout.index_bytes == np.prod(layout.per_shard) * 16 + 4
    reader = shards.ShardReader(layout, "f")
    counts = [-(-n // c) for n, c in zip(arr.shape, layout.chunk)]
    for cidx in np.ndindex(*counts):
        sl = tuple(slice(i * c, (i + 1) * c) for i, c in zip(cidx, layout.chunk))
        assert np.array_equal(reader.chunk(tuple(cidx), arr.shape), arr[sl])


def test_shard_reader_bounds_open_files(tmp_path, monkeypatch):
    path, arrays = make_store(tmp_path, {"f": (1, 16, 16)}, n=3, crop=[4], pad=0)
    monkeypatch.setattr(shards, "OPEN_FILES", 2)
    src = ZarrField(path, "f", 3, cache_bytes=0)
    for sample in range(3):
        assert np.array_equal(read_window(src, sample, ((-2, 18), (0, 16))),
                              wrap_window(arrays["f"][sample], ((-2, 18), (0, 16))))
    assert len(src._shards._files) == 2


def test_compressed_or_remote_layouts_are_not_direct(tmp_path):
    path, _ = make_store(tmp_path, {"f": (1, 8, 8)}, crop=[4], compressor="zstd")
    assert shards.layout_of(zarr.open_group(path, mode="r")["f"]) is None


def test_check_index_refuses_ranges_past_the_file():
    index = np.array([[0, 64], [64, 64], [2**64 - 1, 2**64 - 1]], dtype="<u8")
    shards.check_index(index, 128, (0,), "here")
    with pytest.raises(OSError, match=r"shard \(0,\) of here is cut short: its chunks need 128 bytes, the file has 1"):
        shards.check_index(index, 127, (0,), "here")


# --------------------------------------------------------------------------- the inference worker's state


class FakeModel(namedtuple("FakeModel", "name callback_at loaded")):
    """Hashable, as the real `ModelSpec`; `load` records the name in the `loaded` list it was given."""

    def __hash__(self) -> int:
        return hash((self.name, self.callback_at))

    def __eq__(self, other) -> bool:
        return (self.name, self.callback_at) == (other.name, other.callback_at)

    def load(self):
        self.loaded.append(self.name)
        return torch.nn.Identity()


def fake_job(token: str, model: str, source, norms=None, loaded: list | None = None) -> SimpleNamespace:
    """What `WorkerState` reads of a `Job`."""
    spec = SimpleNamespace(open=lambda: source)
    return SimpleNamespace(token=token, model=FakeModel(model, None, [] if loaded is None else loaded), device="cpu",
                           torch_threads=None, inputs=(spec,), in_norms=norms, targets=(), tgt_norms=None,
                           norm_kwargs_json="{}")


def test_worker_state_keeps_two_models_and_this_runs_readers(two_fields):
    from map2map.infer import worker

    path, _ = two_fields
    loaded: list[str] = []
    state = worker.WorkerState()
    state.setup(SimpleNamespace(name=0))
    source = ZarrField(path, "s", 2)
    for token, model in [("r1", "A"), ("r1", "A"), ("r2", "B"), ("r3", "A"), ("r4", "C"), ("r5", "B")]:
        state.begin(token)
        state.model(fake_job(token, model, source, loaded=loaded))
    assert loaded == ["A", "B", "C", "B"]  # A kept across runs; B dropped once A and C were the latest two
    assert [state.run_stats(t)["model_loads"] for t in ("r1", "r2", "r3", "r4", "r5")] == [1, 1, 0, 1, 1]
    assert [k[0].name for k in state.models] == ["C", "B"]

    job = fake_job("r5", "B", source, norms=("field.log1p",))
    number, stack = state.acquire_stack(job, "in")
    assert stack.norms[0].__name__ == "log1p"
    other_number, other = state.acquire_stack(job, "in")
    assert other is not stack and other_number != number  # a held reader is never handed out twice
    state.release_stack(job, "in", number)
    assert state.acquire_stack(job, "in") == (number, stack)  # a released one is reused
    state.begin("r6")
    assert not state.stacks and state.acquire_stack(fake_job("r6", "B", source), "in")[1] is not stack

    state.record("r6", read_s=1.0, model_s=2.0, write_s=3.0, tiles=4, max_task_bytes=100)
    state.record("r6", read_s=1.0, model_s=2.0, write_s=3.0, tiles=4, max_task_bytes=50)
    stats = state.run_stats("r6")
    assert (stats["tiles"], stats["max_task_bytes"], stats["read_s"], stats["model_s"], stats["write_s"]) == \
        (8, 100, 2.0, 4.0, 6.0)
    for i in range(worker.RUNS_KEPT + 1):
        state.begin(f"later{i}")
    assert state.run_stats("r6") == {} and len(state.stats) == worker.RUNS_KEPT


def test_geometry_of_the_window_used_by_the_stack():
    """`FieldStack.shape` permutes the window's axes as the element does."""
    win = geometry.window((0, 0, 0), (2, 3, 4), ((1, 1), (0, 0), (2, 0)))
    element = augment.CubeElement((2, 0, 1), (False, False, False))
    stack = FieldStack([SimpleNamespace(shape=(1, 5, 8, 8, 8))], [None])
    assert stack.shape(win) == (5, 4, 3, 6) and stack.shape(win, element) == (5, 6, 4, 3)
