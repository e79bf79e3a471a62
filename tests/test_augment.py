"""The cube group acting on fields: group structure, brute-force action, vector covariance."""

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from map2map.data.augment import (
    CubeElement,
    add_noise,
    apply,
    compose,
    cube_group,
    inverse,
    mul_noise,
    random_element,
)

from strategies import cube_elements, shapes

NDIMS = [2, 3]


def brute_force(x: np.ndarray, e: CubeElement, vector: bool) -> np.ndarray:
    """The action written point by point from the module's stated semantics."""
    out_shape = (x.shape[0],) + tuple(x.shape[1 + p] for p in e.perm)
    y = np.empty(out_shape, dtype=x.dtype)
    for c in range(out_shape[0]):
        for j in itertools.product(*(range(n) for n in out_shape[1:])):
            k = [0] * e.ndim
            for i, (p, f) in enumerate(zip(e.perm, e.flips)):
                k[p] = out_shape[1 + i] - 1 - j[i] if f else j[i]
            if vector:
                sign = -1 if e.flips[c] else 1
                y[(c, *j)] = sign * x[(e.perm[c], *k)]
            else:
                y[(c, *j)] = x[(c, *k)]
    return y


def gradient(s: np.ndarray) -> np.ndarray:
    """Periodic central-difference gradient of a scalar field shaped (1, *spatial)."""
    s = s[0]
    return np.stack([(np.roll(s, -1, axis=i) - np.roll(s, 1, axis=i)) / 2 for i in range(s.ndim)])


@pytest.mark.parametrize("ndim, order", [(2, 8), (3, 48)])
def test_group_size_identity_first(ndim, order):
    group = cube_group(ndim)
    assert len(group) == order == len(set(group))
    assert group[0] == CubeElement(tuple(range(ndim)), (False,) * ndim)


@pytest.mark.parametrize("ndim", NDIMS)
def test_closed_under_composition_and_inverse(ndim):
    group = set(cube_group(ndim))
    identity = cube_group(ndim)[0]
    for a, b in itertools.product(group, repeat=2):
        assert compose(a, b) in group
    for a in group:
        assert compose(a, inverse(a)) == identity == compose(inverse(a), a)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 3, 5)])
def test_apply_matches_brute_force(shape):
    x = np.random.default_rng(0).normal(size=shape)
    for e in cube_group(len(shape) - 1):
        np.testing.assert_array_equal(apply(x, e), brute_force(x, e, vector=False))


@pytest.mark.parametrize("shape", [(3, 3, 4, 5), (2, 3, 5)])
def test_vector_apply_matches_brute_force(shape):
    x = np.random.default_rng(1).normal(size=shape)
    for e in cube_group(len(shape) - 1):
        np.testing.assert_array_equal(apply(x, e, vector=True), brute_force(x, e, vector=True))


@given(st.sampled_from(NDIMS), st.booleans(), st.integers(1, 3), st.data())
def test_any_grid_matches_brute_force_and_composes(ndim, vector, nchan, data):
    """Any grid, also non-cubic and with sides of one voxel: the action, its inverse and composition."""
    spatial = data.draw(shapes(ndim, max_side=4))
    a, b = data.draw(cube_elements(ndim)), data.draw(cube_elements(ndim))
    shape = ((ndim if vector else nchan), *spatial)
    x = np.arange(math.prod(shape), dtype=np.float64).reshape(shape)  # every value distinct
    y = apply(x, a, vector)
    np.testing.assert_array_equal(y, brute_force(x, a, vector))
    np.testing.assert_array_equal(apply(y, inverse(a), vector), x)
    np.testing.assert_array_equal(apply(x, compose(b, a), vector), apply(y, b, vector))


@pytest.mark.parametrize("spatial", [(8, 8, 8), (4, 6, 8), (8, 8), (6, 10)])
def test_gradient_of_transformed_equals_transformed_gradient(spatial):
    s = np.random.default_rng(2).normal(size=(1, *spatial))
    g = gradient(s)
    for e in cube_group(len(spatial)):
        np.testing.assert_allclose(apply(g, e, vector=True), gradient(apply(s, e)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("ndim", NDIMS)
@pytest.mark.parametrize("vector", [False, True])
def test_composition_and_inverse_act_correctly(ndim, vector):
    x = np.random.default_rng(3).normal(size=(ndim,) + (2, 3, 4)[:ndim])
    group = cube_group(ndim)
    for a in group:
        np.testing.assert_array_equal(apply(apply(x, a, vector), inverse(a), vector), x)
    for a, b in itertools.product(group[::5], group[::3]):
        np.testing.assert_array_equal(apply(x, compose(a, b), vector), apply(apply(x, b, vector), a, vector))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("vector", [False, True])
def test_torch_equals_numpy(dtype, vector):
    x = torch.randn(3, 4, 5, 6, dtype=dtype, generator=torch.Generator().manual_seed(4))
    for e in cube_group(3):
        y = apply(x, e, vector)
        assert y.dtype == dtype and y.device == x.device and y.is_contiguous()
        np.testing.assert_array_equal(y.numpy(), apply(x.numpy(), e, vector))


def test_apply_returns_contiguous_copy():
    x = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    t = torch.from_numpy(x.copy())
    for e in cube_group(2):
        y, u = apply(x, e), apply(t, e)
        assert y.flags.c_contiguous and not np.shares_memory(y, x) and y.dtype == x.dtype
        assert u.data_ptr() != t.data_ptr()
    apply(x, cube_group(2)[0])[...] = -1
    apply(t, cube_group(2)[0])[...] = -1
    assert x.min() == 0 and t.min() == 0


def test_apply_rejects_bad_shapes():
    e = cube_group(3)[7]
    with pytest.raises(ValueError):
        apply(np.zeros((3, 4, 4)), e)
    with pytest.raises(ValueError):
        apply(np.zeros((2, 4, 4, 4)), e, vector=True)
    with pytest.raises(ValueError):
        CubeElement((0, 0, 1), (False,) * 3)


@pytest.mark.parametrize("ndim", NDIMS)
def test_random_element_is_uniform(ndim):
    group = cube_group(ndim)
    rng = np.random.default_rng(5)
    draws = 200 * len(group)
    counts = {e: 0 for e in group}
    for _ in range(draws):
        counts[random_element(rng, ndim)] += 1
    expected = draws / len(group)
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    # chi-square with len(group) - 1 degrees of freedom: mean k, std sqrt(2k); allow 5 sigma
    k = len(group) - 1
    assert min(counts.values()) > 0 and chi2 < k + 5 * np.sqrt(2 * k)


def test_noise_draws():
    std = 0.3
    adds = np.array([add_noise(np.random.default_rng(i), std) for i in range(4000)])
    muls = np.array([mul_noise(np.random.default_rng(i), std) for i in range(4000)])
    assert adds[7] == np.random.default_rng(7).normal(0.0, std)
    np.testing.assert_allclose(np.log(muls), adds, rtol=1e-12, atol=1e-15)
    assert abs(adds.mean()) < 5 * std / np.sqrt(adds.size)
    assert abs(adds.std() / std - 1) < 0.05
    assert add_noise(np.random.default_rng(0), 0.0) == 0.0 and mul_noise(np.random.default_rng(0), 0.0) == 1.0
