"""Style selection, normalisation and command-line assignments (`map2map.data.styles`), checked against
direct computations: the training range maps onto [-1, 1], a constant parameter onto 0, the map undoes
exactly, and every bad input is a one-line `UserError` naming the value and what there is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from map2map.data.styles import (StyleNorm, assigned_values, check_finite, fit_style_norm, parse_assignment,
                                 parse_names, select_indices)
from map2map.errors import UserError

NAMES = ("Om", "D", "h")


def test_range_maps_onto_minus_one_to_one():
    values = np.array([[0.25, 0.5, 0.7], [0.35, 1.0, 0.7], [0.30, 0.6, 0.7]], dtype=np.float32)
    norm = fit_style_norm(NAMES, values)
    assert norm.names == NAMES
    np.testing.assert_allclose(norm.shift, [0.30, 0.75, 0.7], rtol=1e-6)
    np.testing.assert_allclose(norm.scale, [0.05, 0.25, 1.0], rtol=1e-6)  # h is constant: scale 1
    got = norm.apply(values)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got.min(axis=0), [-1, -1, 0], atol=1e-6)
    np.testing.assert_allclose(got.max(axis=0), [1, 1, 0], atol=1e-6)
    np.testing.assert_allclose(got[2], [0.0, (0.6 - 0.75) / 0.25, 0.0], atol=1e-6)


@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, max_side=6),
                  elements=st.floats(-1e3, 1e3, allow_nan=False)))
def test_normalised_training_styles_lie_in_the_unit_range_and_undo_exactly(values):
    names = [f"p{i}" for i in range(values.shape[1])]
    norm = fit_style_norm(names, values)
    got = norm.apply(values)
    assert np.all(np.abs(got) <= 1 + 1e-9)
    np.testing.assert_allclose(norm.undo(got), values, rtol=1e-9, atol=1e-9)
    constant = values.min(axis=0) == values.max(axis=0)
    assert np.all(got[:, constant] == 0)


def test_torch_apply_keeps_dtype_and_device_and_agrees_with_numpy():
    norm = StyleNorm(("Om", "D"), (0.3, 0.75), (0.05, 0.25))
    t = torch.tensor([[0.31, 0.72], [0.25, 1.0]], dtype=torch.float64)
    got = norm.apply(t)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), (t.numpy() - [0.3, 0.75]) / [0.05, 0.25], rtol=1e-12)
    torch.testing.assert_close(norm.undo(got), t)


def test_round_trip_through_a_dict():
    norm = StyleNorm(("Om", "D"), (0.3, 0.75), (0.05, 0.25))
    assert StyleNorm.from_dict(norm.to_dict()) == norm
    assert norm.describe() == "Om [0.25, 0.35], D [0.5, 1]"


@pytest.mark.parametrize("shift, scale", [((0.0,), (0.0,)), ((0.0,), (-1.0,)), ((float("nan"),), (1.0,)),
                                          ((0.0, 1.0), (1.0,))])
def test_bad_norm_refused(shift, scale):
    with pytest.raises(ValueError):
        StyleNorm(("D",) * len(shift), shift, scale)


def test_nan_style_names_parameter_and_sample():
    values = np.array([[0.3, 0.5], [0.3, np.nan]])
    with pytest.raises(UserError, match=r"nan for parameter D of sample 1") as info:
        fit_style_norm(("Om", "D"), values)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="parameter Om of sample 0"):
        check_finite(("Om", "D"), np.array([[np.inf, 1.0]]))


def test_selection_by_name_in_the_given_order():
    assert select_indices(NAMES, None) == (0, 1, 2)
    assert select_indices(NAMES, ("D", "Om")) == (1, 0)
    values = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(values[:, list(select_indices(NAMES, parse_names("h,Om")))], [[2, 0], [5, 3]])


def test_unknown_name_lists_the_store_parameters():
    with pytest.raises(UserError) as info:
        select_indices(NAMES, ("D", "sigma8"))
    assert str(info.value) == "--style names sigma8, not among the store's style parameters Om,D,h"


@pytest.mark.parametrize("text, match", [("Om,,D", "empty parameter name"), ("Om,D,Om", "Om more than once")])
def test_bad_names(text, match):
    with pytest.raises(UserError, match=match):
        parse_names(text)


def test_assignment_in_the_model_order():
    assignment = parse_assignment("D=0.72, Om=0.31")
    assert assignment == {"D": 0.72, "Om": 0.31}
    got = assigned_values(assignment, ("Om", "D"))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.float32([0.31, 0.72]))


@pytest.mark.parametrize("text, match", [
    ("Om0.31", "is not NAME=VALUE"), ("=0.3", "is not NAME=VALUE"), ("Om=x", "Om: 'x' is not a number"),
    ("Om=nan", "Om: 'nan' is not finite"), ("Om=1,Om=2", "gives Om more than once")])
def test_bad_assignment(text, match):
    with pytest.raises(UserError, match=match):
        parse_assignment(text)


def test_assignment_must_match_the_model_parameters():
    with pytest.raises(UserError, match=r"names s8, not a style parameter.*Om,D: give Om=VALUE,D=VALUE"):
        assigned_values({"Om": 0.3, "D": 1.0, "s8": 0.8}, ("Om", "D"))
    with pytest.raises(UserError, match=r"--style misses D; "):
        assigned_values({"Om": 0.3}, ("Om", "D"))


def test_velocity_needs_the_parameter():
    norm = StyleNorm(("Om",), (0.3,), (0.05,))
    with pytest.raises(UserError, match="--velocity needs a style parameter D, but the model's styles are Om"):
        norm.index("D")
    assert StyleNorm(("Om", "D"), (0.3, 0.7), (0.1, 0.2)).index("D") == 1


# ---------------------------------------------------------------- from a real store on disk


def _styled_store(tmp_path, rows, names="Om,D"):
    from conftest import save_fields
    from map2map.cli import main

    save_fields(tmp_path / "in", "f", (1, 8, 8, 8), len(rows))
    out = tmp_path / "s.zarr"
    args = ["convert", str(out), f"--field=f={tmp_path}/in/f_*.npy", "--no-progress"]
    if names:
        table = tmp_path / "styles.csv"
        table.write_text(names + "\n" + "".join(",".join(repr(float(v)) for v in row) + "\n" for row in rows))
        args += ["--styles", str(table)]
    assert main(args) == 0
    return out


def test_norm_from_a_training_store(tmp_path):
    from map2map.data.styles import norm_from_store, store_styles

    path = _styled_store(tmp_path, [[0.30, 0.50], [0.35, 0.75], [0.25, 1.0]])
    names, values = store_styles(path, ("D", "Om"))
    assert names == ("D", "Om") and values.dtype == np.float32
    np.testing.assert_array_equal(values, np.float32([[0.5, 0.3], [0.75, 0.35], [1.0, 0.25]]))
    norm = norm_from_store(path, ("D",))
    assert norm.names == ("D",)
    np.testing.assert_allclose([norm.shift[0], norm.scale[0]], [0.75, 0.25], rtol=1e-6)
    assert norm_from_store(path) == fit_style_norm(("Om", "D"), store_styles(path)[1])
    with pytest.raises(UserError, match="--style names w0, not among the store's style parameters Om,D"):
        store_styles(path, ("w0",))


def test_a_store_without_styles(tmp_path):
    from map2map.data.styles import norm_from_store, store_styles

    path = _styled_store(tmp_path, [[0.3], [0.3]], names=None)
    assert store_styles(path) is None and norm_from_store(path) is None
    with pytest.raises(UserError, match=r"store .*s.zarr has no style parameters, but --style D needs them"):
        store_styles(path, ("D",))
    with pytest.raises(UserError, match="but a styled model needs them"):
        store_styles(path, required=True)
