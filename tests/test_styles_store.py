"""Styles in stores: `m2m convert --styles / --style-pattern`, appends, `m2m info`, `store.read_styles`,
bad input in one line, and interrupted conversions that leave nothing with styles looking complete."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from conftest import save_fields
from map2map import convert as convert_stage
from map2map import store
from map2map.cli import main

STYLES = np.array([[0.30, 0.50], [0.31, 0.625], [0.35, 0.75]])


def convert(*args: str) -> int:
    return main(["convert", *args, "--no-progress"])


def write_table(path: Path, names: str, rows) -> Path:
    path.write_text(names + "\n" + "".join(",".join(repr(float(v)) for v in row) + "\n" for row in rows))
    return path


def write_style_files(directory: Path, rows) -> str:
    """One whitespace-separated text file per sample, as the original toolkit's branches had them."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows):
        (directory / f"style_{i:02d}.txt").write_text("  ".join(repr(float(v)) for v in row) + "\n")
    return f"{directory}/style_*.txt"


@pytest.fixture
def inputs(tmp_path):
    fields = save_fields(tmp_path / "in", "f", (1, 8, 8, 8), len(STYLES))
    return tmp_path, f"--field=f={tmp_path}/in/f_*.npy", fields


def test_table_round_trip_and_xarray(inputs, capsys):
    root, field, _ = inputs
    out = root / "s.zarr"
    assert convert(str(out), field, "--styles", str(write_table(root / "t.csv", "Om,D", STYLES))) == 0
    assert "styles: Om, D" in capsys.readouterr().out
    names, values = store.read_styles(out)
    assert names == ("Om", "D") and values.dtype == np.float32
    assert np.array_equal(values, STYLES.astype(np.float32))
    ds = xr.open_zarr(out)
    assert ds["style"].dims == ("sample", "param") and list(ds["param"].values) == ["Om", "D"]
    assert np.array_equal(ds["style"].sel(param="D").values, STYLES[:, 1].astype(np.float32))
    assert store.open_store(out).style_names == ("Om", "D")


def test_pattern_files_pair_with_samples_like_fields(inputs):
    root, field, _ = inputs
    out = root / "s.zarr"
    pattern = write_style_files(root / "styles", STYLES)
    (root / "styles" / "style_01.txt").write_text("0.31\n\t0.625\n")  # any whitespace separates
    assert convert(str(out), field, "--style-pattern", pattern, "--style-names", "Om,D") == 0
    names, values = store.read_styles(out)
    assert names == ("Om", "D") and np.array_equal(values, STYLES.astype(np.float32))


def test_unstyled_store_reads_none_and_info_has_no_styles(inputs, capsys):
    root, field, _ = inputs
    out = root / "s.zarr"
    assert convert(str(out), field) == 0
    assert store.read_styles(out) is None and store.open_store(out).style_names == ()
    assert "style" not in xr.open_zarr(out).variables
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "styles" not in capsys.readouterr().out


def test_info_lists_parameters_and_ranges(inputs, capsys):
    root, field, _ = inputs
    out = root / "s.zarr"
    assert convert(str(out), field, "--styles", str(write_table(root / "t.csv", "Om,D", STYLES))) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "styles     2 parameters" in text
    assert "  Om: 0.3 to 0.35" in text and "  D: 0.5 to 0.75" in text


def test_append_adds_rows_in_the_stores_column_order(inputs):
    root, field, fields = inputs
    out = root / "s.zarr"
    assert convert(str(out), field, "--styles", str(write_table(root / "t.csv", "Om,D", STYLES))) == 0
    more = save_fields(root / "more", "f", (1, 8, 8, 8), 2, seed=5)
    new = np.array([[0.4, 0.9], [0.45, 1.0]])
    table = write_table(root / "u.csv", "D,Om", new[:, ::-1])  # columns in another order
    assert convert(str(out), f"--field=f={root}/more/f_*.npy", "--append", "--styles", str(table)) == 0
    names, values = store.read_styles(out)
    assert names == ("Om", "D")
    assert np.array_equal(values, np.concatenate([STYLES, new]).astype(np.float32))
    st = store.open_store(out)
    assert st.nsample == 5 and np.array_equal(st.field("f")[4], more[1])
    assert xr.open_zarr(out)["style"].shape == (5, 2)


APPEND_REFUSALS = {
    "other names": ("Om,sigma8", True, "has styles Om, D, but the new rows name Om, sigma8"),
    "missing on the append": (None, True, "has styles (Om, D); give --styles or --style-pattern"),
    "missing in the store": ("Om,D", False, "has no styles, but the new samples have (Om, D)"),
}


@pytest.mark.parametrize("case", sorted(APPEND_REFUSALS))
def test_append_refusals_are_one_line_and_change_nothing(inputs, capsys, case):
    names, styled_store, message = APPEND_REFUSALS[case]
    root, field, _ = inputs
    out = root / "s.zarr"
    first = ["--styles", str(write_table(root / "t.csv", "Om,D", STYLES))] if styled_store else []
    assert convert(str(out), field, *first) == 0
    save_fields(root / "more", "f", (1, 8, 8, 8), 2, seed=5)
    extra = ["--styles", str(write_table(root / "u.csv", names, [[0.4, 0.9], [0.45, 1.0]]))] if names else []
    before = store.read_styles(out)
    capsys.readouterr()
    assert convert(str(out), f"--field=f={root}/more/f_*.npy", "--append", *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("m2m convert: error: --append") and message in err and err.count("\n") == 1
    assert store.open_store(out).nsample == 3
    after = store.read_styles(out)
    assert (before is None and after is None) or (before[0] == after[0] and np.array_equal(before[1], after[1]))


def _table(text: str):
    def make(root: Path) -> list[str]:
        (root / "bad.csv").write_text(text)
        return ["--styles", str(root / "bad.csv")]
    return make


def _files(rows: list[str], names: str):
    def make(root: Path) -> list[str]:
        (root / "sf").mkdir()
        for i, row in enumerate(rows):
            (root / "sf" / f"s_{i}.txt").write_text(row)
        return ["--style-pattern", f"{root}/sf/s_*.txt", "--style-names", names]
    return make


BAD = {
    "too few rows": (_table("Om,D\n0.3,0.5\n0.3,0.6\n"), "has 2 rows but --field gives 3 samples"),
    "too many rows": (_table("Om,D\n" + "0.3,0.5\n" * 4), "has 4 rows but --field gives 3 samples"),
    "non-numeric": (_table("Om,D\n0.3,0.5\n0.3,abc\n0.3,0.7\n"), "line 3, column D: 'abc' is not a number"),
    "nan": (_table("Om,D\n0.3,0.5\nnan,0.6\n0.3,0.7\n"), "line 3, column Om: 'nan' is not finite"),
    "missing column": (_table("Om,D\n0.3,0.5\n0.3\n0.3,0.7\n"), "line 3: 1 values, but the header names 2"),
    "duplicate names": (_table("Om,Om\n0.3,0.5\n0.3,0.6\n0.3,0.7\n"), "parameter name 'Om' is given twice"),
    "bad name": (_table("Om,D z\n0.3,0.5\n0.3,0.6\n0.3,0.7\n"), "parameter name 'D z' is not a word"),
    "empty table": (_table("\n"), "is empty; expected a header of parameter names"),
    "missing table": (lambda root: ["--styles", str(root / "nowhere.csv")], "cannot read it (FileNotFoundError"),
    "both options": (lambda root: ["--styles", "t.csv", "--style-pattern", "*.txt", "--style-names", "Om"],
                     "--styles and --style-pattern exclude each other"),
    "pattern without names": (lambda root: ["--style-pattern", f"{root}/*.txt"], "needs --style-names"),
    "names without pattern": (lambda root: ["--style-names", "Om,D"], "give --style-pattern too"),
    "names count": (_files(["0.3 0.5", "0.3 0.6", "0.3 0.7"], "Om,D,h"),
                    "holds 2 numbers, but --style-names names 3 (Om, D, h)"),
    "duplicate style-names": (_files(["0.3 0.5"] * 3, "Om,Om"), "--style-names: parameter name 'Om' is given twice"),
    "file count": (_files(["0.3 0.5"] * 2, "Om,D"), "matches 2 files but --field gives 3 samples"),
    "no files": (lambda root: ["--style-pattern", f"{root}/none_*.txt", "--style-names", "Om"], "matches no files"),
    "non-numeric file": (_files(["0.3 0.5", "0.3 x", "0.3 0.7"], "Om,D"), "parameter D: 'x' is not a number"),
    "inf in file": (_files(["0.3 0.5", "0.3 inf", "0.3 0.7"], "Om,D"), "parameter D: 'inf' is not finite"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_style_input_is_one_line_exit_2_and_writes_nothing(inputs, capsys, case):
    make, message = BAD[case]
    root, field, _ = inputs
    out = root / "s.zarr"
    assert convert(str(out), field, *make(root)) == 2
    err = capsys.readouterr().err
    assert err.startswith("m2m convert: error:") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_style_names_the_store_uses_are_no_field_names(inputs, capsys):
    root, _, _ = inputs
    for name in ("style", "param"):
        assert convert(str(root / "s.zarr"), f"--field={name}={root}/in/f_*.npy") == 2
        assert "clashes with the style array" in capsys.readouterr().err


def _die_after(monkeypatch, name: str) -> None:
    """Make `store.<name>` do its work, then die as if killed (before the completion mark)."""
    real = getattr(store, name)

    def then_die(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(store, name, then_die)


def test_killed_while_writing_styles_leaves_nothing_complete_then_redone(inputs, monkeypatch):
    root, field, fields = inputs
    out = root / "s.zarr"
    table = write_table(root / "t.csv", "Om,D", STYLES)
    config = convert_stage.ConvertConfig(output=str(out), field=(field.removeprefix("--field="),),
                                         styles=str(table), progress=False)
    _die_after(monkeypatch, "write_styles")
    with pytest.raises(KeyboardInterrupt):
        convert_stage.run(config)
    monkeypatch.undo()
    with pytest.raises(store.IncompleteStoreError):
        store.read_styles(out)
    assert convert_stage.run(config).styles == ["Om", "D"]
    assert np.array_equal(store.read_styles(out)[1], STYLES.astype(np.float32))


def test_killed_overwrite_keeps_the_old_styles(inputs, monkeypatch):
    root, field, _ = inputs
    out = root / "s.zarr"
    spec = (field.removeprefix("--field="),)
    old = convert_stage.ConvertConfig(output=str(out), field=spec, styles=str(write_table(root / "t.csv", "Om,D",
                                                                                          STYLES)), progress=False)
    convert_stage.run(old)
    again = dataclasses.replace(old, styles=str(write_table(root / "u.csv", "Om,D", STYLES + 1)), overwrite=True)
    _die_after(monkeypatch, "write_styles")
    with pytest.raises(KeyboardInterrupt):
        convert_stage.run(again)
    monkeypatch.undo()
    assert np.array_equal(store.read_styles(out)[1], STYLES.astype(np.float32))
    assert not store.read_meta(store.staged_path(out))["complete"]
    convert_stage.run(again)
    assert np.array_equal(store.read_styles(out)[1], (STYLES + 1).astype(np.float32))
    assert not Path(store.staged_path(out)).exists()


def test_killed_append_keeps_the_earlier_styles_and_is_redone(inputs, monkeypatch):
    root, field, _ = inputs
    out = root / "s.zarr"
    assert convert(str(out), field, "--styles", str(write_table(root / "t.csv", "Om,D", STYLES))) == 0
    save_fields(root / "more", "f", (1, 8, 8, 8), 2, seed=5)
    args = [str(out), f"--field=f={root}/more/f_*.npy", "--append",
            "--styles", str(write_table(root / "u.csv", "Om,D", [[0.4, 0.9], [0.45, 1.0]]))]
    _die_after(monkeypatch, "write_styles")
    assert convert(*args) != 0  # the command line reports the interruption
    monkeypatch.undo()
    names, values = store.read_styles(out)
    assert values.shape == (3, 2) and np.array_equal(values, STYLES.astype(np.float32))
    assert xr.open_zarr(out)["style"].shape == (3, 2)
    assert convert(*args) == 0
    assert store.read_styles(out)[1].shape == (5, 2)


# ----------------------------------------------------------- the store functions themselves

def _styled_store(path: Path, names, values) -> None:
    layout = store.FieldLayout("f", 1, (4, 4), (4, 4), (4, 4))
    store.create(path, [layout], nsample=len(values), boxsize=None, settings={}, style_names=names)
    store.write_styles(path, values, 0)


def test_create_write_read_and_completion(tmp_path):
    values = np.array([[1.5, -2.0, 3.0], [0.0, 1e-3, 7.0]])
    _styled_store(tmp_path / "s.zarr", ("a", "b_2", "c-d"), values)
    with pytest.raises(store.IncompleteStoreError):
        store.read_styles(tmp_path / "s.zarr")  # no completion mark yet: nothing is read
    store.mark_complete(tmp_path / "s.zarr", 2)
    st = store.open_store(tmp_path / "s.zarr")
    names, got = store.read_styles(st)
    assert names == ("a", "b_2", "c-d") and got.dtype == np.float32 and np.array_equal(got, values.astype("f4"))
    assert store.read_meta(tmp_path / "s.zarr")["styles"] == ["a", "b_2", "c-d"]
    assert store.foreign_entries(tmp_path / "s.zarr") == []  # style and param are the store's own


def test_only_complete_samples_are_read(tmp_path):
    _styled_store(tmp_path / "s.zarr", ("Om",), np.array([[0.1], [0.2], [0.3]]))
    store.mark_complete(tmp_path / "s.zarr", 2)  # as after an interrupted append: 2 complete samples
    assert np.array_equal(store.read_styles(tmp_path / "s.zarr")[1], np.array([[0.1], [0.2]], "f4"))


@pytest.mark.parametrize("names,message", [
    ((), "no parameter names"),
    (("Om", "Om"), "'Om' is given twice"),
    (("1x",), "'1x' is not a word"),
    (("a b",), "'a b' is not a word"),
    (("",), "'' is not a word"),
])
def test_style_names_refused(names, message):
    with pytest.raises(store.UserError, match=message) as info:
        store.check_style_names(names, "--opt")
    assert str(info.value).startswith("--opt") and "\n" not in str(info.value)
