"""The grouped matmul in plain XLA, tiled like the kernels: what `auto` runs where Pallas cannot (CPU).

XLA:CPU lowers `jax.lax.ragged_dot` to a dense masked product: every row is multiplied by every
group's weights, g times the work. Here the sorted rows are cut into tiles of `tile_rows`, and a
`fori_loop` runs over the (group, tile) pairs that overlap ("visits", metadata.group_tiles, the
kernels' schedule): each visit multiplies one tile by its group's weights and adds the rows of its
group into the output tile. The loop's trip count is the number of visits the rows really need, so
rows past the groups (zero-expert slots) cost nothing, and neither the weights nor the rows are
gathered per visit. Work: at most (m + g * tile_rows) * k * n, against g * m * k * n. With `layer`,
each visit reads its group's weights straight out of the layer stack (the free [L * g, k, n] view),
so rhs is never copied or sliced whole.

A while loop has no reverse-mode derivative, so the op carries its own VJP, the kernels' one:
d lhs is the same loop with the weights transposed, d rhs a loop adding x_tile^T dy_tile into its
group's slot.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.backend import same_varying_axes
from pallas_kernels.ragged_matmul.metadata import GroupTiles, group_tiles, stacked_groups

DEFAULT_TILE_ROWS = 256  # demo training step on 2 CPU cores: 128 / 256 / 512 rows took 1.02 / 1.0 / 1.10x the time


def tiled_ragged_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
                        group_offset: jax.Array | int | None = None, *, layer: int | None = None,
                        tile_rows: int = DEFAULT_TILE_ROWS) -> jax.Array:
    """Same contract as `ragged_matmul_reference`: lhs [m, k], rhs [g, k, n] (or [L, g, k, n] with
    layer), group_sizes [G] -> [m, n]."""
    num_local, first, flat = stacked_groups(rhs, layer)  # flat [L * g, k, n]: group j is flat[first + j]
    offset = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32)
    tm = max(8, min(tile_rows, -(-lhs.shape[0] // 8) * 8))
    # Inside a shard_map: one varying type for all (the loop carries must match it), and the
    # transpose of replicated weights cast to varying is the psum their gradient needs.
    return _tiled(*same_varying_axes(lhs, flat, group_sizes.astype(jnp.int32), offset), tm, first, num_local)


def _schedule(group_sizes: jax.Array, group_offset: jax.Array, num_local: int, m: int, tm: int) -> GroupTiles:
    return group_tiles(group_sizes, group_offset, num_local, m, tm, visit_empty=False)


def _padded(x: jax.Array, tm: int) -> jax.Array:
    return jnp.pad(x, ((0, -x.shape[0] % tm), (0, 0)))


def _visit_rows(tiles: GroupTiles, visit: jax.Array, tm: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """-> (local group, first row of the tile, bool[tm]: which of the tile's rows belong to the group)."""
    group, start = tiles.group_ids[visit], tiles.tile_ids[visit] * tm
    row = start + jnp.arange(tm, dtype=jnp.int32)
    return group, start, (row >= tiles.starts[group]) & (row < tiles.ends[group])


def _grouped(lhs: jax.Array, rhs: jax.Array, tiles: GroupTiles, tm: int, first: int, *,
             transpose_rhs: bool) -> jax.Array:
    """lhs [m, k] @ rhs[first + group] (rhs [G', k, n], or [G', n, k] used transposed) -> float32 [m, n]."""
    m = lhs.shape[0]
    x = _padded(lhs, tm)
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

    def visit(i, out):
        group, start, mine = _visit_rows(tiles, i, tm)
        weights = rhs[first + group].astype(lhs.dtype)  # rounded to the rows' dtype as it is read
        product = jax.lax.dot_general(jax.lax.dynamic_slice_in_dim(x, start, tm), weights, contract,
                                      preferred_element_type=jnp.float32)  # [tm, n]
        # A tile shared by two groups is visited once per group; each visit adds only its own rows.
        tile = jax.lax.dynamic_slice_in_dim(out, start, tm) + jnp.where(mine[:, None], product, 0.0)
        return jax.lax.dynamic_update_slice_in_dim(out, tile, start, 0)

    _, out = same_varying_axes(x, jnp.zeros((x.shape[0], n), jnp.float32))
    return jax.lax.fori_loop(0, tiles.num_visits, visit, out)[:m]


def _grouped_transposed(lhs: jax.Array, dy: jax.Array, tiles: GroupTiles, num_local: int, tm: int) -> jax.Array:
    """Per local group, lhs_rows^T @ dy_rows: lhs [m, k], dy [m, n] -> float32 [num_local, k, n]."""
    x, d = _padded(lhs, tm), _padded(dy, tm)

    def visit(i, acc):
        group, start, mine = _visit_rows(tiles, i, tm)
        rows = jnp.where(mine[:, None], jax.lax.dynamic_slice_in_dim(x, start, tm), 0)
        product = jax.lax.dot_general(rows, jax.lax.dynamic_slice_in_dim(d, start, tm), (((0,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)  # [k, n]
        return acc.at[group].add(product)

    _, acc = same_varying_axes(x, jnp.zeros((num_local, lhs.shape[1], dy.shape[1]), jnp.float32))
    return jax.lax.fori_loop(0, tiles.num_visits, visit, acc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _tiled(lhs, rhs, group_sizes, group_offset, tm, first, num_local):
    tiles = _schedule(group_sizes, group_offset, num_local, lhs.shape[0], tm)
    return _grouped(lhs, rhs, tiles, tm, first, transpose_rhs=False).astype(lhs.dtype)


def _tiled_forward(lhs, rhs, group_sizes, group_offset, tm, first, num_local):
    return _tiled(lhs, rhs, group_sizes, group_offset, tm, first, num_local), (lhs, rhs, group_sizes, group_offset)


def _tiled_backward(tm, first, num_local, residuals, d_out):
    lhs, rhs, group_sizes, group_offset = residuals
    tiles = _schedule(group_sizes, group_offset, num_local, lhs.shape[0], tm)
    d_out = d_out.astype(lhs.dtype)
    d_lhs = _grouped(d_out, rhs, tiles, tm, first, transpose_rhs=True).astype(lhs.dtype)
    d_groups = _grouped_transposed(lhs, d_out, tiles, num_local, tm).astype(rhs.dtype)  # [num_local, k, n]
    d_rhs = d_groups if num_local == rhs.shape[0] else jax.lax.dynamic_update_slice_in_dim(
        jnp.zeros_like(rhs), d_groups, first, 0)  # a layer of the stack: the other layers get zeros
    return d_lhs, d_rhs, None, None


_tiled.defvjp(_tiled_forward, _tiled_backward)
