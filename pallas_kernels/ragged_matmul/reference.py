"""XLA reference for the grouped matmul: `jax.lax.ragged_dot`, differentiated by JAX itself."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ragged_matmul_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """lhs [m, k], rhs [g, k, n], int32 group_sizes [g] -> [m, n] in lhs.dtype.

    Rows are consumed group by group in order; rows past sum(group_sizes) come out as zeros.
    Accumulates in float32.
    """
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)
