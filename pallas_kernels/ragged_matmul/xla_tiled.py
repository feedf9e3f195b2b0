"""The grouped matmul in plain XLA, tiled like the kernels: what `auto` runs where Pallas cannot (CPU).

XLA:CPU lowers `jax.lax.ragged_dot` to a dense masked product: every row is multiplied by every
group's weights, g times the work. Here the sorted rows are cut into tiles of `tile_rows`; each
(tile, group) pair that overlaps ("a visit", at most m/tile + g - 1 of them) multiplies its tile by
its group's weights in one batched matmul, and a masked scatter-add puts each row's one product
back. Work: (m + g * tile_rows) * k * n instead of g * m * k * n. JAX differentiates it (gathers and
scatters), so it needs no VJP of its own. Each visit gathers its group's weights straight from rhs
(from the layer stack with `layer`), so rhs itself is never copied or sliced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_matmul.metadata import stacked_groups
from pallas_kernels.ragged_matmul.reference import local_sizes


def tiled_ragged_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
                        group_offset: jax.Array | int | None = None, *, layer: int | None = None,
                        tile_rows: int = 128) -> jax.Array:
    """Same contract as `ragged_matmul_reference`: lhs [m, k], rhs [g, k, n] (or [L, g, k, n] with
    layer), group_sizes [G] -> [m, n]."""
    num_local, first, rhs = stacked_groups(rhs, layer)  # rhs [L * g, k, n]: group j is rhs[first + j]
    # sizes [skipped + g]: with skipped = 1 the rows before the local groups come first, as a group of zeros.
    sizes, skipped = local_sizes(num_local, group_sizes, group_offset)
    m, k = lhs.shape
    num_groups, n = sizes.shape[0], rhs.shape[2]
    tm = max(8, min(tile_rows, -(-m // 8) * 8))
    num_tiles = -(-m // tm)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    first_tile = starts // tm
    visits = jnp.where(sizes > 0, (ends - 1) // tm - first_tile + 1, 0)  # tiles each group overlaps
    visits_end = jnp.cumsum(visits)
    max_visits = num_tiles + num_groups - 1  # each group boundary inside a tile adds one visit
    visit = jnp.arange(max_visits, dtype=jnp.int32)
    valid = visit < visits_end[-1]
    group = jnp.minimum(jnp.searchsorted(visits_end, visit, side="right"), num_groups - 1)  # [V]
    tile = jnp.where(valid, first_tile[group] + visit - (visits_end[group] - visits[group]), 0)  # [V]

    tiles = jnp.pad(lhs, ((0, num_tiles * tm - m), (0, 0))).reshape(num_tiles, tm, k)
    weights = rhs[first + jnp.maximum(group - skipped, 0)].astype(lhs.dtype)  # [V, k, n]
    products = jnp.einsum("vtk,vkn->vtn", tiles[tile], weights, preferred_element_type=jnp.float32)  # [V, tm, n]
    rows = tile[:, None] * tm + jnp.arange(tm, dtype=jnp.int32)  # [V, tm]
    mine = ((valid & (group >= skipped))[:, None] & (rows >= starts[group][:, None])
            & (rows < ends[group][:, None]))
    out = jnp.zeros((num_tiles * tm, n), jnp.float32).at[rows.reshape(-1)].add(
        jnp.where(mine[..., None], products, 0.0).reshape(-1, n))  # one nonzero term per row: deterministic
    return out[:m].astype(lhs.dtype)
