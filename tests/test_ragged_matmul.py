"""The grouped-matmul dispatch against a per-group NumPy loop."""

import jax.numpy as jnp
import numpy as np
import pytest

from oracles import numpy_grouped
from pallas_kernels.ragged_matmul import ragged_matmul


@pytest.mark.parametrize("group_sizes", [[3, 0, 5, 2], [0, 0, 10, 0], [1, 2, 3, 0], [0, 0, 0, 0]])
def test_matches_numpy_including_empty_groups_and_tail_rows(group_sizes):
    rng = np.random.default_rng(0)
    lhs = rng.normal(size=(10, 7)).astype(np.float32)
    rhs = rng.normal(size=(4, 7, 5)).astype(np.float32)
    got = ragged_matmul(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(group_sizes, jnp.int32))
    np.testing.assert_allclose(np.asarray(got), numpy_grouped(lhs, rhs, group_sizes), rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise_clear_errors():
    lhs, rhs, sizes = jnp.ones((4, 3)), jnp.ones((2, 3, 5)), jnp.asarray([2, 2], jnp.int32)
    with pytest.raises(ValueError, match="unknown ragged_matmul implementation 'cuda'"):
        ragged_matmul(lhs, rhs, sizes, implementation="cuda")
    with pytest.raises(ValueError, match=r"lhs \[m, k\], rhs \[g, k, n\]"):
        ragged_matmul(jnp.ones((4, 4)), rhs, sizes)


# The tiled XLA formulation that `auto` runs on CPU, against NumPy and the ragged_dot reference.

import hypothesis.strategies as st  # noqa: E402
import jax  # noqa: E402
from hypothesis import given, settings  # noqa: E402

from pallas_kernels.ragged_matmul import ragged_matmul_reference  # noqa: E402
from pallas_kernels.ragged_matmul.xla_tiled import tiled_ragged_matmul  # noqa: E402

_tiled = jax.jit(tiled_ragged_matmul, static_argnames="tile_rows")


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(0, 23), min_size=1, max_size=6), st.integers(0, 7), st.sampled_from([8, 16]))
def test_tiled_matches_numpy(group_sizes, extra_rows, tile_rows):
    m = sum(group_sizes) + extra_rows  # rows past the groups come out as zeros
    rng = np.random.default_rng(m)
    lhs = rng.normal(size=(max(m, 1), 5)).astype(np.float32)
    rhs = rng.normal(size=(len(group_sizes), 5, 3)).astype(np.float32)
    got = _tiled(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(group_sizes, jnp.int32), tile_rows=tile_rows)
    np.testing.assert_allclose(np.asarray(got), numpy_grouped(lhs, rhs, group_sizes), rtol=1e-5, atol=1e-5)


def test_tiled_with_group_offset_and_gradients_match_the_reference():
    rng = np.random.default_rng(1)
    lhs = jnp.asarray(rng.normal(size=(37, 6)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(3, 6, 4)), jnp.float32)
    sizes = jnp.asarray([5, 0, 9, 11, 4, 6], jnp.int32)  # rhs holds groups 2..4
    cotangent = jnp.asarray(rng.normal(size=(37, 4)), jnp.float32)

    def loss(fn, lhs, rhs):
        return jnp.sum(fn(lhs, rhs, sizes, 2) * cotangent)

    tiled = lambda *a: tiled_ragged_matmul(*a, tile_rows=8)  # noqa: E731
    np.testing.assert_allclose(np.asarray(tiled(lhs, rhs, sizes, 2)),
                               np.asarray(ragged_matmul_reference(lhs, rhs, sizes, 2)), rtol=1e-5, atol=1e-5)
    for want, got in zip(jax.grad(loss, (1, 2))(ragged_matmul_reference, lhs, rhs),
                         jax.grad(loss, (1, 2))(tiled, lhs, rhs)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_auto_on_cpu_is_the_tiled_formulation():
    rng = np.random.default_rng(2)
    lhs, rhs = jnp.asarray(rng.normal(size=(300, 8)), jnp.float32), jnp.asarray(rng.normal(size=(4, 8, 8)))
    sizes = jnp.asarray([100, 0, 150, 50], jnp.int32)
    auto = ragged_matmul(lhs, rhs.astype(jnp.float32), sizes)
    np.testing.assert_allclose(np.asarray(auto), numpy_grouped(np.asarray(lhs), np.asarray(rhs), [100, 0, 150, 50]),
                               rtol=1e-4, atol=1e-4)
    lowered = jax.jit(lambda a, b, s: ragged_matmul(a, b, s)).lower(lhs, rhs.astype(jnp.float32), sizes).as_text()
    assert "ragged" not in lowered  # not XLA:CPU's dense masked ragged_dot


@pytest.mark.parametrize("implementation", ["auto", "xla"])
def test_layer_of_a_stack_matches_numpy(implementation):
    """rhs stacked over layers [L, g, k, n] with a layer, also for an expert shard (group_offset): the
    tiled form gathers from the stack, the reference slices it."""
    rng = np.random.default_rng(4)
    lhs = rng.normal(size=(37, 6)).astype(np.float32)
    stack = rng.normal(size=(3, 2, 6, 4)).astype(np.float32)
    sizes = np.asarray([5, 0, 9, 11, 4, 6], np.int32)
    matmul = jax.jit(ragged_matmul, static_argnames=("layer", "implementation"))
    for layer in range(3):
        got = matmul(jnp.asarray(lhs), jnp.asarray(stack), jnp.asarray(sizes), group_offset=2, layer=layer,
                     implementation=implementation)
        np.testing.assert_allclose(np.asarray(got), numpy_grouped(lhs, stack[layer], sizes, 2), rtol=1e-5, atol=1e-5)
    full = rng.normal(size=(2, 6, 6, 4)).astype(np.float32)
    got = matmul(jnp.asarray(lhs), jnp.asarray(full), jnp.asarray(sizes), layer=1, implementation=implementation)
    np.testing.assert_allclose(np.asarray(got), numpy_grouped(lhs, full[1], sizes), rtol=1e-5, atol=1e-5)


def test_tiled_gradient_lands_on_its_layer_of_the_stack():
    rng = np.random.default_rng(5)
    lhs = jnp.asarray(rng.normal(size=(29, 6)), jnp.float32)
    stack = jnp.asarray(rng.normal(size=(3, 2, 6, 4)), jnp.float32)
    sizes = jnp.asarray([5, 0, 9, 11, 4], jnp.int32)  # the stack's layers hold groups 1..2
    cotangent = jnp.asarray(rng.normal(size=(29, 4)), jnp.float32)

    def loss(implementation, lhs, stack):
        return jnp.sum(ragged_matmul(lhs, stack, sizes, group_offset=1, layer=2, implementation=implementation)
                       * cotangent)

    want = jax.grad(loss, (1, 2))("xla", lhs, stack)
    got = jax.grad(loss, (1, 2))("auto", lhs, stack)
    for w, g in zip(want, got):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(got[1][:2]))  # the other layers get no gradient
