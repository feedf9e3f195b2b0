"""The grouped-matmul dispatch against a per-group NumPy loop."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ragged_matmul import ragged_matmul


def numpy_grouped(lhs, rhs, group_sizes):
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    start = 0
    for g, size in enumerate(group_sizes):
        out[start:start + size] = lhs[start:start + size] @ rhs[g]
        start += size
    return out  # rows past sum(group_sizes) stay zero


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
