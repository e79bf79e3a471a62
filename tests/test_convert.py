"""`m2m convert` and `m2m info` on real files: round trips bit for bit, layouts, bad input, interruptions."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from conftest import save_fields
from map2map import convert as convert_stage
from map2map import store
from map2map.cli import main
from stores import tree_digest


def convert(*args: str) -> int:
    return main(["convert", *args, "--no-progress"])


def test_round_trip_mixed_fields(tmp_path, capsys):
    lr = save_fields(tmp_path / "in", "lr", (3, 16, 16, 16), 3, seed=1)
    hr = save_fields(tmp_path / "in", "hr", (1, 32, 32, 32), 3, seed=2)
    out = tmp_path / "s.zarr"
    assert convert(str(out), f"--field=disp={tmp_path}/in/lr_*.npy", f"--field=dens={tmp_path}/in/hr_*.npy",
                   "--crop", "8", "--pad", "3", "--boxsize", "100") == 0
    ds = xr.open_zarr(out)
    for i in range(3):
        assert np.array_equal(ds["disp"].values[i], lr[i])
        assert np.array_equal(ds["dens"].values[i], hr[i])
    assert ds["disp"].dims == ("sample", "channel_3", "x_16", "y_16", "z_16")
    assert ds["dens"].dims == ("sample", "channel_1", "x_32", "y_32", "z_32")
    np.testing.assert_allclose(ds["x_16"].values, (np.arange(16) + 0.5) * 100 / 16)
    np.testing.assert_allclose(ds["x_32"].values, (np.arange(32) + 0.5) * 100 / 32)
    assert [Path(p).name for p in ds["source_disp"].values] == ["lr_00.npy", "lr_01.npy", "lr_02.npy"]
    meta = ds.attrs["map2map"]
    assert meta["complete"] and meta["nsample"] == 3 and meta["boxsize"] == 100 and meta["periodic"]
    # shards = crop, scaled for the finer grid; inner chunk from the pad
    g = zarr.open_group(str(out), mode="r")
    assert g["disp"].shards == (1, 3, 8, 8, 8) and g["dens"].shards == (1, 1, 16, 16, 16)
    assert g["dens"].chunks[2:] == tuple(2 * c for c in g["disp"].chunks[2:])


def test_2d_and_unusual_encodings(tmp_path):
    """Big-endian, Fortran order, float64 and int data convert to the same float32 values."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal((2, 4, 24, 20))
    d = tmp_path / "in"
    d.mkdir()
    for i in range(2):
        np.save(d / f"be_{i}.npy", base[i].astype(">f4"))
        np.save(d / f"f_{i}.npy", np.asfortranarray(base[i].astype("f4")))
        np.save(d / f"d_{i}.npy", base[i])
        np.save(d / f"i_{i}.npy", (base[i] * 100).astype("i4"))
    out = tmp_path / "s.zarr"
    assert convert(str(out), f"--field=be={d}/be_*.npy", f"--field=f={d}/f_*.npy", f"--field=d={d}/d_*.npy",
                   f"--field=i={d}/i_*.npy", "--crop", "8,4") == 0
    st = store.open_store(out)
    for i in range(2):
        want = base[i].astype("f4")
        for name in ("be", "f", "d"):
            got = st.field(name)[i]
            assert got.dtype == np.float32 and np.array_equal(got, want), name
        assert np.array_equal(st.field("i")[i], (base[i] * 100).astype("i4").astype("f4"))
    assert st.field("be").shards == (1, 4, 8, 4)


def test_float64_kept_on_request(tmp_path, capsys):
    a = save_fields(tmp_path, "a", (1, 8, 8, 8), 1, dtype="float64")
    out = tmp_path / "s.zarr"
    assert convert(str(out), f"--field=a={tmp_path}/a_*.npy") == 0
    assert "float64 stored as float32" in capsys.readouterr().out
    out2 = tmp_path / "s64.zarr"
    assert convert(str(out2), f"--field=a={tmp_path}/a_*.npy", "--dtype", "float64") == 0
    assert np.array_equal(store.open_store(out2).field("a")[0], a[0])


def test_pairing_follows_sorted_paths(tmp_path):
    """Sample i pairs the i-th file of each field in path order, whatever the creation order."""
    for i in (2, 0, 1):
        np.save(tmp_path / f"x_{i}.npy", np.full((1, 4, 4), i, "f4"))
        np.save(tmp_path / f"y_{i}.npy", np.full((1, 4, 4), 10 + i, "f4"))
    out = tmp_path / "s.zarr"
    assert convert(str(out), f"--field=x={tmp_path}/x_*.npy", f"--field=y={tmp_path}/y_*.npy") == 0
    st = store.open_store(out)
    for i in range(3):
        assert st.field("x")[i].max() == i and st.field("y")[i].max() == 10 + i


def test_append_adds_samples(tmp_path):
    a = save_fields(tmp_path / "a", "f", (1, 16, 16), 2, seed=1)
    b = save_fields(tmp_path / "b", "f", (1, 16, 16), 3, seed=2)
    out = tmp_path / "s.zarr"
    assert convert(str(out), f"--field=f={tmp_path}/a/f_*.npy", "--crop", "8") == 0
    assert convert(str(out), f"--field=f={tmp_path}/b/f_*.npy", "--crop", "8", "--append") == 0
    st = store.open_store(out)
    assert st.nsample == 5
    for i, want in enumerate(a + b):
        assert np.array_equal(st.field("f")[i], want)
    assert len(xr.open_zarr(out).sample) == 5
    assert [Path(p).parent.name for p in st.sources("f")] == ["a", "a", "b", "b", "b"]


def test_info(tmp_path, capsys):
    save_fields(tmp_path, "f", (3, 16, 16, 16), 2)
    out = tmp_path / "s.zarr"
    assert convert(str(out), f"--field=disp={tmp_path}/f_*.npy", "--crop", "8") == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "complete   yes" in text and "samples    2" in text and "written by m2m convert" in text
    assert "disp: shape (2, 3, 16, 16, 16)" in text and "shard (8, 8, 8)" in text
    ratio = float(text.split("compression ratio")[1].split()[0])
    assert 0.95 < ratio <= 1.0  # uncompressed: only the shard indices add bytes


BAD_CASES = {
    "no match": (lambda d: [f"--field=a={d}/nothing_*.npy"], "matches no files"),
    "different counts": (lambda d: [f"--field=a={d}/a_*.npy", f"--field=b={d}/b_01*.npy"],
                         "different numbers of files"),
    "different shapes": (lambda d: [f"--field=m={d}/m_*.npy"], "has shape"),
    "complex": (lambda d: [f"--field=c={d}/c_*.npy"], "expected real numbers"),
    "strings": (lambda d: [f"--field=s={d}/s_*.npy"], "expected real numbers"),
    "truncated": (lambda d: [f"--field=t={d}/t_*.npy"], "is truncated"),
    "corrupt": (lambda d: [f"--field=g={d}/g_*.npy"], "not a readable .npy"),
    "channel last": (lambda d: [f"--field=l={d}/l_*.npy"], "channel-last"),
    "no channel axis": (lambda d: [f"--field=n={d}/n_*.npy"], "leading channel axis"),
    "bad field spec": (lambda d: ["--field=nopattern"], "expected NAME=PATTERN"),
    "bad field name": (lambda d: [f"--field=1a={d}/a_*.npy"], "starts with a letter"),
    "crop of other rank": (lambda d: [f"--field=a={d}/a_*.npy", "--crop", "4,4,4"], "--crop needs 1 or 2 values"),
}


@pytest.fixture
def bad_inputs(tmp_path):
    d = tmp_path / "in"
    save_fields(d, "a", (1, 8, 8), 2)
    save_fields(d, "b", (1, 8, 8), 2)
    np.save(d / "m_0.npy", np.zeros((1, 8, 8), "f4"))
    np.save(d / "m_1.npy", np.zeros((1, 8, 9), "f4"))
    np.save(d / "c_0.npy", np.zeros((1, 8, 8), "c8"))
    np.save(d / "s_0.npy", np.array([["a"] * 8] * 8)[None])
    np.save(d / "t_0.npy", np.zeros((1, 8, 8, 8), "f4"))
    with open(d / "t_0.npy", "r+b") as f:
        f.truncate(os.path.getsize(d / "t_0.npy") - 100)
    (d / "g_0.npy").write_bytes(b"this is not a numpy file at all")
    np.save(d / "l_0.npy", np.zeros((16, 16, 16, 3), "f4"))
    np.save(d / "n_0.npy", np.zeros((32, 32, 32), "f4"))
    return d


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_one_line_error(bad_inputs, tmp_path, capsys, case):
    args, message = BAD_CASES[case]
    out = tmp_path / "s.zarr"
    assert convert(str(out), *args(bad_inputs)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("m2m convert: error:")
    assert not out.exists()


FIELD_NAMES = {
    "spatial dim": (["x_64"], "clashes with the spatial dimensions"),
    "channel dim": (["channel_3"], "clashes with the channel dimensions"),
    "sample": (["sample"], "clashes with the sample dimension"),
    "source coordinate": (["source_a"], "clashes with the source-file coordinates"),
    "empty": ([""], "the field name is empty"),
    "twice": (["a", "a"], "--field 'a' is given twice"),
}


@pytest.mark.parametrize("case", sorted(FIELD_NAMES))
def test_field_names_the_store_cannot_hold(tmp_path, capsys, case):
    """Names that would clash inside the store are refused in one line, before anything is written."""
    names, message = FIELD_NAMES[case]
    save_fields(tmp_path / "in", "f", (1, 8, 8), 2)
    out = tmp_path / "s.zarr"
    assert main(["convert", str(out), *[f"--field={n}={tmp_path}/in/f_*.npy" for n in names], "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("m2m convert: error: --field") and message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_stage_summary_is_what_the_cli_prints(tmp_path, capsys):
    a = save_fields(tmp_path / "a", "f", (3, 16, 16, 16), 2, dtype="float64")
    save_fields(tmp_path / "b", "f", (3, 16, 16, 16), 1, seed=1)
    out = tmp_path / "s.zarr"
    config = convert_stage.ConvertConfig(output=str(out), field=(f"disp={tmp_path}/a/f_*.npy",), crop=(8,),
                                         pad=2, boxsize=50.0, progress=False, workers=1)
    summary = convert_stage.run(config)
    assert (summary.output, summary.nsample, summary.appended) == (str(out), 2, None)
    assert summary.bytes_written == sum(x.astype(np.float32).nbytes for x in a)
    assert summary.layouts == [{"name": "disp", "channels": 3, "spatial": (16, 16, 16), "shard": (8, 8, 8),
                                "chunk": (8, 8, 8), "dtype": "float32", "compressor": "none"}]
    assert summary.lines() == ["note: disp: float64 stored as float32",
                               "disp: 3 x (16, 16, 16), shard (8, 8, 8), inner chunk (8, 8, 8), float32",
                               f"{out}: wrote 2 samples, complete"]
    assert summary.to_json()["layouts"][0]["spatial"] == [16, 16, 16] and summary.seconds >= 0
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "t.zarr"), f"--field=disp={tmp_path}/a/f_*.npy", "--crop", "8",
                 "--pad", "2", "--boxsize", "50", "--no-progress"]) == 0
    assert capsys.readouterr().out.splitlines() == [line.replace(str(out), str(tmp_path / "t.zarr"))
                                                   for line in summary.lines()]
    more = convert_stage.run(dataclasses.replace(config, field=(f"disp={tmp_path}/b/f_*.npy",), append=True))
    assert (more.nsample, more.appended) == (3, 1) and more.notes == []
    assert more.lines()[-1] == f"{out}: appended 1 sample, now 3 samples, complete"


def test_interrupted_overwrite_keeps_the_old_store_and_is_redone(tmp_path, monkeypatch):
    """Killed after writing the replacement but before the swap: the old store is untouched and complete."""
    old = save_fields(tmp_path / "a", "f", (1, 8, 8), 1, seed=1)
    new = save_fields(tmp_path / "b", "f", (1, 8, 8), 2, seed=2)
    out = tmp_path / "s.zarr"
    config = convert_stage.ConvertConfig(output=str(out), field=(f"f={tmp_path}/a/f_*.npy",), progress=False)
    convert_stage.run(config)
    write = convert_stage.write_samples

    def write_then_die(*args, **kwargs):
        write(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_stage, "write_samples", write_then_die)
    again = dataclasses.replace(config, field=(f"f={tmp_path}/b/f_*.npy",), overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        convert_stage.run(again)
    monkeypatch.undo()
    st = store.open_store(out)
    assert st.nsample == 1 and np.array_equal(st.field("f")[0], old[0])
    assert not store.read_meta(store.staged_path(out))["complete"]
    assert convert_stage.run(again).nsample == 2
    assert np.array_equal(store.open_store(out).field("f")[1], new[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "s.zarr"]


def test_nonfinite_refused_then_allowed(tmp_path, capsys):
    a = np.ones((1, 8, 8, 8), "f4")
    a[0, 1, 2, 3] = np.nan
    a[0, 4, 4, 4] = np.inf
    np.save(tmp_path / "f_0.npy", a)
    out = tmp_path / "s.zarr"
    assert convert(str(out), f"--field=f={tmp_path}/f_*.npy") == 2
    err = capsys.readouterr().err
    assert "f_0.npy has 2 non-finite values" in err and "--allow-nonfinite" in err
    assert not out.exists()
    assert convert(str(out), f"--field=f={tmp_path}/f_*.npy", "--allow-nonfinite") == 0
    got = store.open_store(out).field("f")[0]
    assert np.array_equal(got, a, equal_nan=True)


def test_existing_output_refused_and_overwrite(tmp_path, capsys):
    save_fields(tmp_path / "a", "f", (1, 8, 8), 1, seed=1)
    b = save_fields(tmp_path / "b", "f", (1, 8, 8), 2, seed=2)
    out = tmp_path / "s.zarr"
    assert convert(str(out), f"--field=f={tmp_path}/a/f_*.npy") == 0
    assert convert(str(out), f"--field=f={tmp_path}/b/f_*.npy") == 2
    assert "exists and is complete" in capsys.readouterr().err
    assert store.open_store(out).nsample == 1
    assert convert(str(out), f"--field=f={tmp_path}/b/f_*.npy", "--overwrite") == 0
    st = store.open_store(out)
    assert st.nsample == 2 and np.array_equal(st.field("f")[1], b[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "s.zarr"]


def test_overwrite_with_bad_data_keeps_old_store(tmp_path, capsys):
    a = save_fields(tmp_path / "a", "f", (1, 8, 8), 1, seed=1)
    np.save(tmp_path / "nan_0.npy", np.full((1, 8, 8), np.nan, "f4"))
    out = tmp_path / "s.zarr"
    assert convert(str(out), f"--field=f={tmp_path}/a/f_*.npy") == 0
    assert convert(str(out), f"--field=f={tmp_path}/nan_*.npy", "--overwrite") == 2
    st = store.open_store(out)
    assert np.array_equal(st.field("f")[0], a[0])
    assert not os.path.exists(store.staged_path(out))


def test_refuses_to_overwrite_foreign_directory(tmp_path, capsys):
    save_fields(tmp_path / "a", "f", (1, 8, 8), 1)
    out = tmp_path / "mydata"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert convert(str(out), f"--field=f={tmp_path}/a/f_*.npy") == 2
    assert convert(str(out), f"--field=f={tmp_path}/a/f_*.npy", "--overwrite") == 2
    assert "not a map2map store" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"


def test_append_mismatch_refused(tmp_path, capsys):
    save_fields(tmp_path / "a", "f", (1, 8, 8), 1)
    save_fields(tmp_path / "b", "f", (1, 8, 16), 1)
    save_fields(tmp_path / "c", "g", (1, 8, 8), 1)
    out = tmp_path / "s.zarr"
    assert convert(str(out), f"--field=f={tmp_path}/a/f_*.npy") == 0
    assert convert(str(out), f"--field=f={tmp_path}/b/f_*.npy", "--append") == 2
    assert "--append: field f is stored as" in capsys.readouterr().err
    assert convert(str(out), f"--field=g={tmp_path}/c/g_*.npy", "--append") == 2
    assert "has fields ['f']" in capsys.readouterr().err
    assert store.open_store(out).nsample == 1


def test_append_to_missing_store(tmp_path, capsys):
    save_fields(tmp_path / "a", "f", (1, 8, 8), 1)
    assert convert(str(tmp_path / "none.zarr"), f"--field=f={tmp_path}/a/f_*.npy", "--append") == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_exit_status_and_help(tmp_path, m2m):
    res = m2m("convert", str(tmp_path / "s.zarr"), f"--field=a={tmp_path}/none*.npy")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "matches no files" in res.stderr
    res = m2m("convert", "--help")
    assert res.returncode == 0
    for option in ("--field", "--crop", "--pad", "--boxsize", "--overwrite", "--append", "--chunk",
                   "--dtype", "--compressor", "--allow-nonfinite", "--workers"):
        assert option in res.stdout
    assert "(default: float32)" in res.stdout.replace("\n", " ").replace("  ", " ") or "default: float32" in res.stdout
    res = m2m("--help")
    assert res.returncode == 0 and "convert" in res.stdout and "info" in res.stdout
    res = m2m("info", str(tmp_path / "missing.zarr"))
    assert res.returncode == 2 and "does not exist" in res.stderr


def test_tools_script_runs_the_same_program(tmp_path):
    a = save_fields(tmp_path, "f", (1, 8, 8), 1)
    script = Path(__file__).resolve().parents[1] / "tools" / "convert_npy.py"
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "s.zarr"), f"--field=f={tmp_path}/f_*.npy",
                          "--no-progress"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert np.array_equal(store.open_store(tmp_path / "s.zarr").field("f")[0], a[0])


def _start_and_kill(args: list[str], out: Path, field: str) -> int:
    """Start `m2m convert` in a subprocess and SIGKILL it once it has written some shards of `field`; its pid."""
    proc = subprocess.Popen([sys.executable, "-m", "map2map.cli", "convert", *args, "--no-progress",
                             "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 60
    chunks = out / field / "c"
    while time.time() < deadline and proc.poll() is None:
        if chunks.exists() and sum(len(f) for _, _, f in os.walk(chunks)) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "conversion finished before it could be killed: make the input larger"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc.pid


def test_killed_conversion_is_refused_then_redone(tmp_path, capsys):
    arrays = save_fields(tmp_path / "in", "f", (1, 64, 64, 64), 6)  # 3072 shards: seconds to write
    out = tmp_path / "s.zarr"
    args = [str(out), f"--field=f={tmp_path}/in/f_*.npy", "--crop", "8"]
    _start_and_kill(args, out, "f")
    with pytest.raises(store.IncompleteStoreError, match="incomplete"):
        store.open_store(out)
    assert main(["info", str(out)]) == 0
    assert "NO (interrupted" in capsys.readouterr().out
    assert convert(*args) == 0
    assert "incomplete store from an interrupted run" in capsys.readouterr().out
    st = store.open_store(out)
    assert st.nsample == 6 and all(np.array_equal(st.field("f")[i], arrays[i]) for i in (0, 5))


def test_killed_append_keeps_earlier_samples(tmp_path):
    first = save_fields(tmp_path / "a", "f", (1, 64, 64, 64), 2, seed=1)
    save_fields(tmp_path / "b", "f", (1, 64, 64, 64), 6, seed=2)
    out = tmp_path / "s.zarr"
    assert convert(str(out), f"--field=f={tmp_path}/a/f_*.npy", "--crop", "8") == 0
    before = sum(len(f) for _, _, f in os.walk(out / "f" / "c"))
    proc_args = [str(out), f"--field=f={tmp_path}/b/f_*.npy", "--crop", "8", "--append"]
    proc = subprocess.Popen([sys.executable, "-m", "map2map.cli", "convert", *proc_args, "--no-progress",
                             "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and sum(len(f) for _, _, f in os.walk(out / "f" / "c")) < before + 3:
        time.sleep(0.01)
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    st = store.open_store(out)
    assert st.nsample == 2
    for i in range(2):
        assert np.array_equal(st.field("f")[i], first[i])
    ds = xr.open_zarr(out)
    assert ds.sizes["sample"] == 2 and np.array_equal(ds["f"].values[1], first[1])
    # running the append again completes it
    assert convert(*proc_args) == 0
    assert store.open_store(out).nsample == 8


# ------------------------------------------------- issue 16: refusals leave everything as it was



def _one_line_refusal(capsys, root: Path, args: list[str], message: str) -> str:
    """Run `m2m convert ARGS`: exit 2, one stderr line holding `message`, and nothing under `root` changed."""
    before = tree_digest(root)
    capsys.readouterr()
    assert convert(*args) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and err.startswith("m2m convert: error: ") and message in err, err
    assert captured.out == ""
    assert tree_digest(root) == before
    return err


@pytest.fixture
def existing(tmp_path):
    """A complete store s.zarr of 3D 16^3 data (box 100), input files of every kind, and more data to append."""
    save_fields(tmp_path / "a", "f", (1, 16, 16, 16), 2, seed=1)
    save_fields(tmp_path / "b", "f", (1, 16, 16, 16), 1, seed=2)
    save_fields(tmp_path / "g15", "f", (1, 15, 15, 15), 1)
    save_fields(tmp_path / "g16", "f", (1, 16, 16, 16), 1)
    (tmp_path / "z").mkdir()
    np.save(tmp_path / "z" / "f_0.npy", np.zeros((0, 8, 8, 8), "f4"))
    (tmp_path / "e").mkdir()
    np.save(tmp_path / "e" / "f_0.npy", np.zeros((1, 8, 0, 8), "f4"))
    (tmp_path / "file").write_text("not a directory")
    assert convert(str(tmp_path / "s.zarr"), f"--field=f={tmp_path}/a/f_*.npy", "--crop", "8", "--boxsize",
                   "100") == 0
    return tmp_path


REFUSALS = {  # name -> (arguments after OUTPUT (s.zarr unless the first is "OUT=path"), message)
    "crop of 2 values on 3D data": (["--field=f={d}/b/f_*.npy", "--crop", "16,16"], "--crop needs 1 or 3 values"),
    "shard multiple 0": (["--field=f={d}/b/f_*.npy", "--shard-mult", "0"], "--shard-mult 0"),
    "chunk 0": (["--field=f={d}/b/f_*.npy", "--chunk", "0"], "--chunk [0]"),
    "chunk 0 of 3": (["--field=f={d}/b/f_*.npy", "--chunk", "8,0,8"], "--chunk [8, 0, 8]"),
    "zero channels": (["--field=f={d}/z/f_*.npy"], "with no channels"),
    "empty axis": (["--field=f={d}/e/f_*.npy"], "with an empty axis"),
    "negative box": (["--field=f={d}/b/f_*.npy", "--boxsize", "-5"], "--boxsize -5.0: expected a finite positive"),
    "nan box": (["--field=f={d}/b/f_*.npy", "--boxsize", "nan"], "--boxsize nan"),
    "inf box": (["--field=f={d}/b/f_*.npy", "--boxsize", "inf"], "--boxsize inf"),
    "zero box": (["--field=f={d}/b/f_*.npy", "--boxsize", "0"], "--boxsize 0.0"),
    "append another box": (["--field=f={d}/b/f_*.npy", "--append", "--boxsize", "999"],
                           "--append --boxsize 999.0: store"),
    "crop beyond the grid": (["--field=f={d}/b/f_*.npy", "--crop", "64"],
                             "--crop [64, 64, 64] is larger than the grid [16, 16, 16]"),
    "no workers": (["--field=f={d}/b/f_*.npy", "--workers", "0"], "--workers 0"),
    "negative workers": (["--field=f={d}/b/f_*.npy", "--workers", "-1"], "--workers -1"),
    "negative pad": (["--field=f={d}/b/f_*.npy", "--pad", "-1"], "--pad -1"),
    "append another grid": (["--field=f={d}/g15/f_*.npy", "--append"],
                            "--append: field f is stored as (channels, grid) [1, 16, 16, 16], but its new files "
                            "hold [1, 15, 15, 15]"),
    "append another crop": (["--field=f={d}/b/f_*.npy", "--append", "--crop", "16"],
                            "--append: the options given make field f's shard [16, 16, 16], but store"),
    "append another dtype": (["--field=f={d}/b/f_*.npy", "--append", "--dtype", "float64"],
                             "field f's dtype float64, but store"),
    "complete store": (["--field=f={d}/b/f_*.npy"], "exists and is complete; pass --overwrite"),
    "output is an input file": (["OUT={d}/b/f_00.npy", "--field=f={d}/b/f_*.npy"], "is the input"),
    "output contains the inputs": (["OUT={d}/b", "--field=f={d}/b/f_*.npy"], "contains the input"),
    "output inside a store": (["OUT={d}/s.zarr/new.zarr", "--field=f={d}/b/f_*.npy"],
                              "is inside the map2map store"),
    "output under a file": (["OUT={d}/file/new.zarr", "--field=f={d}/b/f_*.npy"], "is a file, not a directory"),
    "output in /proc": (["OUT=/proc/x.zarr", "--field=f={d}/b/f_*.npy"], "proc file system"),
    "output is a file": (["OUT={d}/file", "--field=f={d}/b/f_*.npy", "--overwrite"], "is not a directory"),
    "overwrite a foreign directory": (["OUT={d}/a", "--field=f={d}/b/f_*.npy", "--overwrite"],
                                      "is not a map2map store; refusing to delete it"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_are_one_line_and_change_nothing(existing, capsys, case):
    args, message = REFUSALS[case]
    args = [a.format(d=existing) for a in args]
    out = args.pop(0)[4:] if args[0].startswith("OUT=") else str(existing / "s.zarr")
    _one_line_refusal(capsys, existing, [out, *args], message)
    assert store.open_store(existing / "s.zarr").nsample == 2


def test_grids_that_are_not_multiples_are_refused_in_either_order(existing, capsys):
    """15^3 and 16^3: the same answer whichever field comes first (it used to depend on the order)."""
    one = _one_line_refusal(capsys, existing, [str(existing / "n.zarr"), f"--field=a={existing}/g15/f_*.npy",
                                               f"--field=b={existing}/g16/f_*.npy"], "whole number on every axis")
    two = _one_line_refusal(capsys, existing, [str(existing / "n.zarr"), f"--field=b={existing}/g16/f_*.npy",
                                               f"--field=a={existing}/g15/f_*.npy"], "whole number on every axis")
    assert one == two


def test_values_too_large_for_float32_are_named_so_without_warnings(tmp_path, m2m):
    big = np.ones((1, 8, 8, 8))
    big[0, :2] = 1e39  # finite in float64, Inf in float32
    big[0, 7, 7, 7] = np.nan
    np.save(tmp_path / "f_0.npy", big)
    res = m2m("convert", str(tmp_path / "s.zarr"), f"--field=f={tmp_path}/f_*.npy", "--no-progress",
              "--workers", "1")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "1 non-finite values (NaN/Inf) and 128 finite values too large for float32" in res.stderr
    assert "--dtype float64" in res.stderr and "RuntimeWarning" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f_0.npy"]
    res = m2m("convert", str(tmp_path / "s.zarr"), f"--field=f={tmp_path}/f_*.npy", "--no-progress",
              "--dtype", "float64")  # fits float64: only the NaN is left to refuse
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "has 1 non-finite values (NaN/Inf); fix the data" in res.stderr and "too large" not in res.stderr
    res = m2m("convert", str(tmp_path / "u.zarr"), f"--field=f={tmp_path}/f_*.npy", "--no-progress",
              "--allow-nonfinite")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    got = store.open_store(tmp_path / "u.zarr").field("f")[0]
    assert np.isposinf(got[0, :2]).all() and np.isnan(got[0, 7, 7, 7])


def test_clamp_crop_on_request_with_a_note(tmp_path, capsys):
    save_fields(tmp_path, "f", (1, 32, 32, 32), 1)
    out = tmp_path / "s.zarr"
    assert convert(str(out), f"--field=f={tmp_path}/f_*.npy", "--crop", "64,16,16", "--clamp-crop") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "note: --crop [64, 16, 16] clamped to the grid of f: [32, 16, 16]"
    assert lines[-1] == f"{out}: wrote 1 sample, complete"
    meta = store.open_store(out).meta
    assert meta["crop"] == [32, 16, 16] and meta["fields"]["f"]["shard"] == [32, 16, 16]


def test_append_takes_the_stores_layout(tmp_path, capsys):
    """--append without layout options reuses the store's crop, pad, chunk, shard multiple and dtype."""
    a = save_fields(tmp_path / "a", "f", (2, 32, 32), 1, seed=1)
    b = save_fields(tmp_path / "b", "f", (2, 32, 32), 2, seed=2)
    hr = save_fields(tmp_path / "a", "h", (1, 64, 64), 1, seed=3)
    hr += save_fields(tmp_path / "b", "h", (1, 64, 64), 2, seed=4)
    out = tmp_path / "s.zarr"
    assert convert(str(out), f"--field=f={tmp_path}/a/f_*.npy", f"--field=h={tmp_path}/a/h_*.npy", "--crop", "8",
                   "--pad", "2", "--chunk", "4", "--shard-mult", "2", "--dtype", "float64", "--boxsize", "10") == 0
    before = zarr.open_group(str(out), mode="r")
    layout = {name: (before[name].shards, before[name].chunks, before[name].dtype) for name in ("f", "h")}
    capsys.readouterr()
    # the fields in the other order, the same box size: both fine
    assert convert(str(out), f"--field=h={tmp_path}/b/h_*.npy", f"--field=f={tmp_path}/b/f_*.npy", "--append",
                   "--boxsize", "10") == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"{out}: appended 2 samples, now 3 samples, complete"
    st = store.open_store(out)
    after = zarr.open_group(str(out), mode="r")
    assert {name: (after[name].shards, after[name].chunks, after[name].dtype) for name in ("f", "h")} == layout
    assert st.nsample == 3 and st.meta["crop"] == [8, 8] and st.meta["pad"] == 2
    for i, want in enumerate(a + b):
        assert np.array_equal(st.field("f")[i], want)
    for i, want in enumerate(hr):
        assert np.array_equal(st.field("h")[i], want)
    # explicit options equal to the store's are fine too
    assert convert(str(out), f"--field=f={tmp_path}/b/f_*.npy", f"--field=h={tmp_path}/b/h_*.npy", "--append",
                   "--crop", "8", "--chunk", "4", "--shard-mult", "2", "--dtype", "float64") == 0
    assert store.open_store(out).nsample == 5


def test_overwrite_refuses_a_store_holding_foreign_files(existing, capsys):
    """An output once written inside a store (the old bug) is never deleted by --overwrite of that store."""
    pred = existing / "s.zarr" / "pred.zarr"
    store.create(pred, [store.FieldLayout("p", 1, (4, 4), (4, 4), (2, 2))], nsample=0, boxsize=None, settings={})
    store.mark_complete(pred, 0)
    _one_line_refusal(capsys, existing, [str(existing / "s.zarr"), f"--field=f={existing}/b/f_*.npy",
                                         "--overwrite"], "holds pred.zarr, which is not part of the store")
    assert store.open_store(pred).nsample == 0


# ------------------------------------------------------------------- locks with real processes

# `m2m convert ARGS...` in a process that waits, after its imports, until the file GO exists: processes
# started together then reach the store at the same moment, whatever their start-up times.
AT_ONCE = ("import os, sys, time\n"
           "from map2map.cli import main\n"
           "while not os.path.exists(sys.argv[1]):\n"
           "    time.sleep(0.001)\n"
           "sys.exit(main(['convert', *sys.argv[2:]]))\n")


def test_two_appends_at_once_one_wins_one_is_refused(tmp_path):
    first = save_fields(tmp_path / "a", "f", (1, 32, 32, 32), 1, seed=1)
    save_fields(tmp_path / "b", "f", (1, 32, 32, 32), 4, seed=2)
    out = tmp_path / "s.zarr"
    assert convert(str(out), f"--field=f={tmp_path}/a/f_*.npy", "--crop", "8") == 0
    go = tmp_path / "go"
    args = [str(out), f"--field=f={tmp_path}/b/f_*.npy", "--append", "--no-progress", "--workers", "1"]
    procs = [subprocess.Popen([sys.executable, "-c", AT_ONCE, str(go), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(0.5)
    go.touch()
    outputs = [p.communicate(timeout=300) for p in procs]
    results = [(p.pid, p.returncode, o, e) for p, (o, e) in zip(procs, outputs)]
    assert sorted(r[1] for r in results) == [0, 2], results
    (winner, _, won, _), = [r for r in results if r[1] == 0]
    (_, _, _, err), = [r for r in results if r[1] == 2]
    assert won.splitlines()[-1] == f"{out}: appended 4 samples, now 5 samples, complete"
    assert err.count("\n") == 1 and f"is being written by m2m convert (host {socket.gethostname()}, pid {winner}, " \
        "started " in err, err
    st = store.open_store(out)
    assert st.nsample == 5 and np.array_equal(st.field("f")[0], first[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "go", "s.zarr"]  # the lock file is gone too


def test_lock_of_a_killed_conversion_is_taken_over_with_a_note(tmp_path, capsys):
    save_fields(tmp_path / "in", "f", (1, 64, 64, 64), 8)
    out = tmp_path / "s.zarr"
    args = [str(out), f"--field=f={tmp_path}/in/f_*.npy", "--crop", "8"]
    pid = _start_and_kill(args, out, "f")
    assert (tmp_path / ".s.zarr.m2m-lock").exists()  # left by the killed writer
    capsys.readouterr()
    assert convert(*args) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert notes[0].startswith(f"note: took over the lock on {out} left by m2m convert (host "
                               f"{socket.gethostname()}, pid {pid}, started ")
    assert "incomplete store from an interrupted run" in notes[1]
    assert store.open_store(out).nsample == 8
    assert not (tmp_path / ".s.zarr.m2m-lock").exists()
