"""XLA reference for the grouped matmul: `jax.lax.ragged_dot`, differentiated by JAX itself."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ragged_matmul_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
                            group_offset: jax.Array | int | None = None, *, layer: int | None = None) -> jax.Array:
    """lhs [m, k], rhs [g, k, n], int32 group_sizes [G] -> [m, n] in lhs.dtype.

    Rows are consumed group by group in order. rhs holds the groups group_offset .. group_offset+g-1
    of the G in group_sizes (expert-sharded weights; g == G without an offset); rows of the other
    groups and rows past sum(group_sizes) come out as zeros. Accumulates in float32.
    layer: rhs is [L, g, k, n] and rhs[layer] is used (sliced here: this is the reference).
    """
    rhs = (rhs if layer is None else rhs[layer]).astype(lhs.dtype)
    sizes, weights = local_groups(rhs, group_sizes, group_offset)
    out = jax.lax.ragged_dot(lhs, weights, sizes, preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)


def local_groups(rhs: jax.Array, group_sizes: jax.Array,
                 group_offset: jax.Array | int | None = None) -> tuple[jax.Array, jax.Array]:
    """(int32 sizes [g'], weights [g', k, n]) covering the rows in order, for rhs holding groups
    group_offset .. group_offset + g - 1: the rows before the local groups form one extra group with
    zero weights; the rows after them lie past sum(sizes)."""
    group_sizes = group_sizes.astype(jnp.int32)
    if group_offset is None and rhs.shape[0] == group_sizes.shape[0]:
        return group_sizes, rhs
    offset = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32)
    before = jnp.sum(jnp.where(jnp.arange(group_sizes.shape[0]) < offset, group_sizes, 0))
    local = jax.lax.dynamic_slice(group_sizes, (offset,), (rhs.shape[0],))
    sizes = jnp.concatenate([before[None], local])
    weights = jnp.concatenate([jnp.zeros((1,) + rhs.shape[1:], rhs.dtype), rhs])
    return sizes, weights
